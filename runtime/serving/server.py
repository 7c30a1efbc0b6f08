"""Start, wait for and stop a Triton Inference Server process on a model repository.

Which ``tritonserver``: an explicit path, else one on ``PATH`` (an install or the official container, with
its own backends), else the one inside PyPI's ``nvidia-pytriton`` wheel (Python backend only; the
repository must then be in the ``cpu_only`` form). The wheel is only used for its files -- the
``pytriton`` package is never imported.

The Python backend runs each model in a *stub* process that embeds ``libpython3.X.so`` from the system and
finds its packages the way a ``python3`` found first on ``PATH`` would: the server is started with this
interpreter's ``bin/`` first on ``PATH``, so the models see this environment's pcedge, numpy, ONNX Runtime
and hnswlib. That only works when the standard library is the one of the libpython the stub links (one 3.11.x's
``threading`` fails inside another 3.11.y). When this interpreter is another build, the stubs get a small
virtualenv-shaped folder (:func:`stub_environment`) with the system interpreter of that build (e.g.
Debian's /usr/bin/python3.11) and this environment's site-packages; when there is no such interpreter,
:func:`check_python_backend` says so up front, with the fix, instead of every model failing to load.
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


def _interpreter_version(python: str | os.PathLike[str]) -> str | None:
    try:
        done = subprocess.run([str(python), "-c", "import platform; print(platform.python_version())"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def _system_interpreters(lib: Path) -> list[Path]:
    """Interpreters that may be the build of ``lib`` (the same prefix first: /lib/... -> /usr/bin/...)."""
    name = f"python{sys.version_info.major}.{sys.version_info.minor}"
    return [Path("/usr/bin") / name, Path("/usr/local/bin") / name, lib.parent.parent / "bin" / name]


def check_python_backend(install: TritonInstall, candidates: list[Path] | None = None) -> Path | None:
    """Which interpreter the bundled Python-backend stub's models must run on.

    ``None``: this one (it is the build of the libpython the stub embeds). Otherwise the path of a system
    interpreter of that build (from ``candidates``, default /usr/bin/python3.X and the like): the server
    then gets an environment with that interpreter's standard library and this environment's packages
    (compiled 3.X extensions load on any 3.X.y). :class:`ServerError` with the fix if there is none.
    """
    if not install.bundled:
        return None  # a server install or container brings its own matching Python
    ours = platform.python_version()
    if install.stub is None or not install.stub.is_file():
        raise ServerError(f"nvidia-pytriton has no Python-backend stub for Python {ours[:4]} ({install.stub})")
    lib = _linked_libpython(install.stub)
    if lib is None:
        raise ServerError(f"{install.stub}: the Python backend needs the system's shared libpython "
                          f"{sys.version_info.major}.{sys.version_info.minor} (Debian/Ubuntu: apt-get install "
                          f"libpython{sys.version_info.major}.{sys.version_info.minor})")
    theirs = _libpython_version(lib)
    if theirs == ours:
        return None
    for candidate in (_system_interpreters(lib) if candidates is None else candidates):
        if Path(candidate).is_file() and _interpreter_version(candidate) == theirs:
            return Path(candidate)
    suggestion = _system_interpreters(lib)[0]
    raise ServerError(
        f"the Triton Python backend embeds {lib} (Python {theirs}) but pcedge runs on Python {ours} "
        f"({sys.executable}) and no Python {theirs} interpreter was found to give the models its standard "
        f"library (an {ours} standard library fails inside a {theirs} interpreter). Install that Python "
        f"({suggestion}) or run pcedge from a virtualenv made with it: {suggestion} -m venv .venv "
        f"(make test/make demo do this when {suggestion} exists)"
    )


def stub_environment(folder: Path, python: Path) -> Path:
    """A virtualenv-shaped folder whose ``bin/python3`` is ``python`` and whose site-packages adds this
    environment's: its ``bin/`` first on PATH gives the stubs ``python``'s standard library with our
    packages (pcedge, numpy, ONNX Runtime, hnswlib). Returns that ``bin/``."""
    import site

    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    bin_dir = folder / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("python", "python3", f"python{version}"):
        (bin_dir / name).symlink_to(python)
    (folder / "pyvenv.cfg").write_text(f"home = {python.parent}\ninclude-system-site-packages = false\n"
                                       f"version = {_interpreter_version(python)}\n")
    packages = folder / "lib" / f"python{version}" / "site-packages"
    packages.mkdir(parents=True)
    # addsitedir, not a plain path: our site-packages' own .pth files (an editable pcedge) must run too.
    lines = [f"import site; site.addsitedir({str(p)!r})" for p in site.getsitepackages() if Path(p).is_dir()]
    (packages / "pcedge-environment.pth").write_text("\n".join(lines) + "\n")
    return bin_dir


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

    def environment(self, python_bin: Path | None = None) -> dict[str, str]:
        env = dict(os.environ)
        # The stubs' Python finds its packages like the first python3 on PATH: this environment's.
        env["PATH"] = f"{python_bin or Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
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
        system_python = check_python_backend(self.install)
        self._workdir = Path(tempfile.mkdtemp(prefix="pcedge-triton-"))
        backends = self._backend_directory()
        python_bin = stub_environment(self._workdir / "python", system_python) if system_python else None
        self.log_file = self.options.log_file or (self._workdir / "tritonserver.log")
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(self.command(backends), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=self.environment(python_bin),
                                            start_new_session=True)
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
