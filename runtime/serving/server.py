"""Start, wait for and stop a Triton Inference Server process on a model repository.

Which ``tritonserver``: an explicit path, else one on ``PATH`` (an install or the official container, with
its own backends), else the one inside PyPI's ``nvidia-pytriton`` wheel (Python backend only; the
repository must then be in the ``cpu_only`` form). The wheel is only used for its files -- the
``pytriton`` package is never imported.

The Python backend runs each model in a *stub* process that embeds ``libpython3.X.so`` from the system and
finds its packages the way a ``python3`` found first on ``PATH`` would: the server is started with this
interpreter's ``bin/`` first on ``PATH``, so the models see this environment's pcedge, numpy, ONNX Runtime
and hnswlib. That only works when this interpreter *is* the build of the libpython the stub links (the
standard library of one 3.11.x loaded into another fails in ``threading``): :func:`check_python_backend`
says so up front, with the fix, instead of letting every model fail to load.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path


class ServerError(RuntimeError):
    """The server cannot be found, started or reached; the message says why and what to do."""


@dataclass
class TritonInstall:
    binary: Path
    backends: Path | None  # folder to pass as --backend-directory (None: the server's own default)
    stub: Path | None  # the Python-backend stub for this interpreter (bundled install only)
    libs: Path | None  # shared libraries the bundled binary needs
    bundled: bool  # from the nvidia-pytriton wheel (Python backend only)

    @property
    def has_onnxruntime_backend(self) -> bool:
        folder = self.backends or Path("/opt/tritonserver/backends")
        return (folder / "onnxruntime").is_dir()


def _pytriton_root() -> Path | None:
    spec = importlib.util.find_spec("pytriton")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def find_tritonserver(explicit: str | os.PathLike[str] | None = None) -> TritonInstall:
    """The ``tritonserver`` to run (see the module docstring for the order)."""
    if explicit:
        path = Path(explicit)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise ServerError(f"--tritonserver {path}: not an executable file")
        return TritonInstall(path, None, None, None, bundled=False)
    on_path = shutil.which("tritonserver")
    if on_path:
        return TritonInstall(Path(on_path), None, None, None, bundled=False)
    root = _pytriton_root()
    if root is not None and (root / "tritonserver" / "bin" / "tritonserver").is_file():
        dist = root / "tritonserver"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
        return TritonInstall(dist / "bin" / "tritonserver", dist / "backends", stub,
                             root.parent / "nvidia_pytriton.libs", bundled=True)
    raise ServerError(
        "no tritonserver found: install the serving extra (pip install 'pcedge[serve]' and "
        "pip install --no-deps nvidia-pytriton, which carries a tritonserver with the Python backend), "
        "put a tritonserver on PATH, or run the official container (see README, Serving many cameras)"
    )


def _linked_libpython(stub: Path) -> Path | None:
    """The libpython the stub will load, as the dynamic linker resolves it (``ldd``)."""
    try:
        out = subprocess.run(["ldd", str(stub)], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        if "libpython" in line and "=>" in line:
            target = line.split("=>", 1)[1].strip().split(" (")[0]
            return Path(target) if target and target != "not found" else None
    return None


def _libpython_version(lib: Path) -> str | None:
    """``Py_GetVersion()`` of a libpython, read in a throw-away process (it never runs Python code)."""
    script = ("import ctypes,sys; f=ctypes.CDLL(sys.argv[1]).Py_GetVersion; f.restype=ctypes.c_char_p; "
              "print(f().decode().split()[0])")
    try:
        done = subprocess.run([sys.executable, "-c", script, str(lib)], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def check_python_backend(install: TritonInstall) -> None:
    """Raise :class:`ServerError` if the bundled Python-backend stub cannot run this environment's models."""
    if not install.bundled:
        return  # a server install or container brings its own matching Python
    ours = platform.python_version()
    if install.stub is None or not install.stub.is_file():
        raise ServerError(f"nvidia-pytriton has no Python-backend stub for Python {ours[:4]} ({install.stub})")
    lib = _linked_libpython(install.stub)
    if lib is None:
        raise ServerError(f"{install.stub}: the Python backend needs the system's shared libpython "
                          f"{sys.version_info.major}.{sys.version_info.minor} (Debian/Ubuntu: apt-get install "
                          f"libpython{sys.version_info.major}.{sys.version_info.minor})")
    theirs = _libpython_version(lib)
    if theirs != ours:
        suggestion = Path("/usr/bin") / f"python{sys.version_info.major}.{sys.version_info.minor}"
        raise ServerError(
            f"the Triton Python backend embeds {lib} (Python {theirs}) but pcedge runs on Python {ours} "
            f"({sys.executable}); its models would load this interpreter's {ours} standard library into a "
            f"{theirs} interpreter and fail. Run pcedge from a virtualenv made with that Python, e.g. "
            f"{suggestion} -m venv .venv (make test/make demo do this when {suggestion} exists)"
        )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass
class ServerOptions:
    host: str = "127.0.0.1"  # the address every endpoint binds to (0.0.0.0: all interfaces)
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    startup_timeout_s: float = 180.0
    exit_timeout_s: int = 20  # how long Triton waits for in-flight requests on SIGTERM
    tritonserver: str | None = None  # explicit binary
    log_file: Path | None = None  # server log (default: a file in the server's work folder)


class TritonServer:
    """A ``tritonserver`` child process: ``start()`` returns once every model is ready; ``stop()`` ends it.

    The process runs in its own session (Ctrl-C in the terminal reaches pcedge, which stops the server in
    order) and its Python-backend stubs are its children, so stopping ends the whole group.
    """

    def __init__(self, repository: str | os.PathLike[str], options: ServerOptions | None = None):
        self.repository = Path(repository)
        self.options = options or ServerOptions()
        self.install = find_tritonserver(self.options.tritonserver)
        self.process: subprocess.Popen | None = None
        self._workdir: Path | None = None
        self.log_file: Path | None = None

    # ---------------------------------------------------------------- endpoints
    @property
    def http_url(self) -> str:
        return f"http://{self._client_host}:{self.options.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://{self._client_host}:{self.options.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host}:{self.options.metrics_port}/metrics"

    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.options.host in ("0.0.0.0", "") else self.options.host

    # ---------------------------------------------------------------- lifecycle
    def _backend_directory(self) -> Path | None:
        """Bundled install: a private backends/ folder with the stub for this Python beside the backend."""
        if not self.install.bundled:
            return self.install.backends
        python = self._workdir / "backends" / "python"
        python.mkdir(parents=True)
        for item in (self.install.backends / "python").iterdir():
            if item.is_file():
                shutil.copy2(item, python / item.name)
        shutil.copy2(self.install.stub, python / "triton_python_backend_stub")
        return self._workdir / "backends"

    def command(self, backends: Path | None) -> list[str]:
        o = self.options
        cmd = [
            str(self.install.binary), f"--model-repository={self.repository}",
            f"--http-address={o.host}", f"--http-port={o.http_port}",
            f"--grpc-address={o.host}", f"--grpc-port={o.grpc_port}",
            f"--metrics-address={o.host}", f"--metrics-port={o.metrics_port}",
            "--allow-gpu-metrics=false", "--exit-on-error=true", "--strict-readiness=true",
            f"--exit-timeout-secs={o.exit_timeout_s}", "--disable-auto-complete-config",
        ]
        if backends is not None:
            cmd.append(f"--backend-directory={backends}")
        return cmd

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # The stubs' Python finds its packages like the first python3 on PATH: this environment's.
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env.pop("PYTHONHOME", None)
        env["PYTHONDONTWRITEBYTECODE"] = "1"  # no __pycache__ inside the model repository
        if self.install.libs is not None:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (env.get("LD_LIBRARY_PATH"), str(self.install.libs)) if p)
        return env

    def start(self) -> "TritonServer":
        if self.process is not None:
            raise ServerError("server already started")
        if not self.repository.is_dir():
            raise ServerError(f"{self.repository}: no such model repository")
        check_python_backend(self.install)
        self._workdir = Path(tempfile.mkdtemp(prefix="pcedge-triton-"))
        backends = self._backend_directory()
        self.log_file = self.options.log_file or (self._workdir / "tritonserver.log")
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(self.command(backends), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=self.environment(), start_new_session=True)
        # A server outliving its owner (an exception, a forgotten stop) would hold its ports: stop it at exit.
        atexit.register(self.stop)
        try:
            self.wait_ready(self.options.startup_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_file.read_text(errors="replace") if self.log_file else ""
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"tritonserver exited with code {self.process.returncode} before it was ready "
                                  f"(log {self.log_file}):\n{self.log_tail()}")
            if self.is_ready():
                return
            time.sleep(0.25)
        raise ServerError(f"tritonserver not ready after {timeout_s:.0f} s (log {self.log_file}):\n{self.log_tail()}")

    def stop(self, timeout_s: float | None = None) -> int | None:
        """SIGTERM (Triton finishes in-flight requests and unloads its models), then SIGKILL to the group if
        it outlives ``timeout_s``. Returns the exit code (None if it was never started)."""
        process, self.process = self.process, None
        atexit.unregister(self.stop)
        code = None
        if process is not None:
            timeout_s = self.options.exit_timeout_s + 10 if timeout_s is None else timeout_s
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    pass
            self._kill_group(process)
            code = process.wait()
        if self._workdir is not None and self.options.log_file is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)  # else it holds the log: kept for the user
        return code

    def kill(self) -> None:
        """SIGKILL the server and its stubs at once (what a crash or a power cut does)."""
        process, self.process = self.process, None
        atexit.unregister(self.stop)
        if process is not None:
            self._kill_group(process)
            process.wait()

    @staticmethod
    def _kill_group(process: subprocess.Popen) -> None:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the session we started: the server and its stubs only
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> "TritonServer":
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
