"""Serving on a real Triton Inference Server (the tritonserver of PyPI's nvidia-pytriton, Python backend).

Every server here is started by the tests on free loopback ports and stopped by them. The bundles are the
session's fixture exports (fixtures/ball_screw_drive and fixtures/pcb); the repository is the --cpu-only
form (the embedder runs ONNX Runtime in a Python-backend model), the form this server runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from conftest import BSD, PCB, ROOT
from pcedge.runtime.detector import Detector
from pcedge.runtime.preprocess import read_image
from pcedge.runtime.serving.client import ClientOptions, RemoteDetector, RemoteError, ServerUnavailable
from pcedge.runtime.serving.repository import (MARKER, RepositoryError, RepositoryOptions, embedder_config,
                                               parse_bundle_argument, write_repository)
from pcedge.runtime.serving.server import (ServerError, ServerOptions, TritonServer,
                                           check_python_backend, find_tritonserver, free_port)
from pcedge.runtime.bundle import open_bundle

BSD_IMAGES = sorted((BSD / "test").rglob("*.jpg"))[:4] + sorted((BSD / "test").rglob("*.png"))[:2]
PCB_IMAGES = sorted((PCB / "test").rglob("*.png"))[:6]


def server_options(tmp: Path, **overrides) -> ServerOptions:
    values = dict(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                  log_file=tmp / "tritonserver.log", startup_timeout_s=180.0)
    values.update(overrides)
    return ServerOptions(**values)


def parse_config(path: Path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def assert_same(local, remote) -> None:
    """The issue's bar: image scores within 1e-5 relative, maps within 1e-4 (NaN where the local one is)."""
    assert remote.score == pytest.approx(local.score, rel=1e-5)
    assert remote.s_star == pytest.approx(local.s_star, rel=1e-5)
    assert remote.anomalous == local.anomalous and remote.threshold == local.threshold
    assert remote.normalised == pytest.approx(local.normalised, abs=1e-6)
    assert remote.anomaly_map.shape == local.anomaly_map.shape
    assert np.array_equal(np.isnan(remote.anomaly_map), np.isnan(local.anomaly_map))
    seen = ~np.isnan(local.anomaly_map)
    assert np.abs(remote.anomaly_map[seen] - local.anomaly_map[seen]).max() <= 1e-4
    assert np.abs(remote.patch_scores - local.patch_scores).max() <= 1e-4 * max(1.0, float(local.patch_scores.max()))


@pytest.fixture(scope="module")
def served(fixture_bundle, pcb_bundle, tmp_path_factory):
    """One server with both fixture bundles (bsd, pcb), dynamic batching on; local results to compare."""
    tmp = tmp_path_factory.mktemp("served")
    report = write_repository([("bsd", fixture_bundle), ("pcb", pcb_bundle)], tmp / "repo",
                              RepositoryOptions(cpu_only=True, max_batch_size=8, threads=1))
    frames = {"bsd": [read_image(p) for p in BSD_IMAGES], "pcb": [read_image(p) for p in PCB_IMAGES]}
    expected = {}
    for name, bundle in (("bsd", fixture_bundle), ("pcb", pcb_bundle)):
        with Detector.open(bundle) as detector:
            expected[name] = detector.run_frames(frames[name])
    server = TritonServer(report.root, server_options(tmp))
    server.start()
    try:
        yield server, frames, expected
    finally:
        server.stop()


# --------------------------------------------------------------------------------------------------
# Repository generation
# --------------------------------------------------------------------------------------------------


def test_repository_layout_and_configs_parse_with_tritons_model_config_schema(fixture_bundle, pcb_bundle, tmp_path):
    for options in (RepositoryOptions(cpu_only=True), RepositoryOptions(),
                    RepositoryOptions(dynamic_batching=False, embedder_instances=2, kind="cpu", max_batch_size=4)):
        out = tmp_path / options.form / str(options.embedder_instances)
        report = write_repository([("bsd", fixture_bundle), ("pcb", pcb_bundle)], out, options)
        assert sorted(report.models) == ["bsd", "bsd_embedder", "bsd_scorer", "pcb", "pcb_embedder", "pcb_scorer"]
        assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(report.models)
        for model in report.models:
            config = parse_config(out / model / "config.pbtxt")
            assert config.name == model
            assert (out / model / "1").is_dir()  # every model has a version folder
            assert config.max_batch_size == options.max_batch_size
        embedder = parse_config(out / "bsd_embedder" / "config.pbtxt")
        scorer = parse_config(out / "bsd_scorer" / "config.pbtxt")
        ensemble = parse_config(out / "bsd" / "config.pbtxt")
        manifest = open_bundle(fixture_bundle).manifest
        assert list(embedder.input[0].dims) == [3, manifest.input.geometry.height, manifest.input.geometry.width]
        assert list(embedder.output[0].dims) == [manifest.output.grid_h * manifest.output.grid_w, manifest.output.dim]
        if options.cpu_only:
            assert embedder.backend == "python" and (out / "bsd_embedder" / "1" / "model.py").is_file()
            assert embedder.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
        else:
            assert embedder.backend == "onnxruntime" and embedder.default_model_filename == "model.onnx"
            expected_kind = "KIND_CPU" if options.kind == "cpu" else "KIND_GPU"
            assert model_config_pb2.ModelInstanceGroup.Kind.Name(embedder.instance_group[0].kind) == expected_kind
        assert (out / "bsd_embedder" / "1" / "model.onnx").read_bytes() == (fixture_bundle / "model.onnx").read_bytes()
        assert embedder.instance_group[0].count == options.embedder_instances
        assert embedder.HasField("dynamic_batching") == options.dynamic_batching
        assert scorer.backend == "python" and scorer.parameters["bundle"].string_value == "bundle"
        open_bundle(out / "bsd_scorer" / "1" / "bundle", verify=True)  # a complete, verified bundle copy
        assert ensemble.platform == "ensemble"
        steps = [s.model_name for s in ensemble.ensemble_scheduling.step]
        assert steps == ["bsd_embedder", "bsd_scorer"]
        assert [o.name for o in ensemble.output] == [o.name for o in scorer.output]
        params = json.loads(ensemble.parameters["pcedge"].string_value)
        assert params["threshold"] == manifest.threshold.value and params["geometry"]["height"] == 224
        # model.py names the library's class and imports nothing else
        source = (out / "bsd_scorer" / "1" / "model.py").read_text()
        assert "from pcedge.runtime.serving.python_models import ScorerModel as TritonPythonModel" in source


def test_plan_form_config_and_missing_engine(fixture_bundle, tmp_path):
    bundle = open_bundle(fixture_bundle)
    config = text_format.Parse(embedder_config("bsd", bundle, RepositoryOptions(plan=True, max_batch_size=4)),
                               model_config_pb2.ModelConfig())
    assert config.platform == "tensorrt_plan" and config.default_model_filename == "model.plan"
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    with pytest.raises(RepositoryError, match="build-engine"):
        write_repository([("bsd", fixture_bundle)], tmp_path / "plan", RepositoryOptions(plan=True))
    assert not (tmp_path / "plan").exists()  # nothing half-written


def test_names_options_and_foreign_folders_are_refused(fixture_bundle, tmp_path):
    assert parse_bundle_argument(str(fixture_bundle))[0] == fixture_bundle.name.removesuffix(".pcedge")
    assert parse_bundle_argument(f"line_3={fixture_bundle}") == ("line_3", fixture_bundle)
    for bad in ("3line", "a b", "x/y", "é"):
        with pytest.raises(RepositoryError, match="not valid"):
            parse_bundle_argument(f"{bad}={fixture_bundle}")
    with pytest.raises(RepositoryError, match="already used"):
        write_repository([("a", fixture_bundle), ("a", fixture_bundle)], tmp_path / "dup")
    with pytest.raises(RepositoryError, match="already used"):
        write_repository([("a", fixture_bundle), ("a_scorer", fixture_bundle)], tmp_path / "dup")
    with pytest.raises(RepositoryError, match="exclude"):
        write_repository([("a", fixture_bundle)], tmp_path / "x", RepositoryOptions(cpu_only=True, plan=True))
    with pytest.raises(RepositoryError, match="no such bundle"):
        write_repository([("a", tmp_path / "missing.pcedge")], tmp_path / "x")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(RepositoryError, match="not written by pcedge"):
        write_repository([("a", fixture_bundle)], foreign)
    assert (foreign / "keep.txt").read_text() == "mine"
    ours = tmp_path / "ours"
    write_repository([("a", fixture_bundle)], ours)
    write_repository([("b", fixture_bundle)], ours)  # its own output: replaced whole
    assert (ours / MARKER).is_file() and (ours / "b").is_dir() and not (ours / "a").exists()


def test_cli_triton_writes_a_repository_and_rejects_bad_input(fixture_bundle, tmp_path, capsys):
    from pcedge.cli import main

    assert main(["triton", f"bsd={fixture_bundle}", "-o", str(tmp_path / "repo"), "--cpu-only",
                 "--max-batch-size", "4", "--scorer-instances", "2"]) == 0
    out = capsys.readouterr().out
    assert "bsd_embedder + bsd_scorer" in out and "next:" in out
    assert parse_config(tmp_path / "repo" / "bsd_scorer" / "config.pbtxt").instance_group[0].count == 2
    assert main(["triton", str(fixture_bundle), "-o", str(tmp_path / "r2"), "--max-batch-size", "0"]) == 2
    assert "--max-batch-size" in capsys.readouterr().err
    assert main(["triton", str(tmp_path / "nope.pcedge"), "-o", str(tmp_path / "r3")]) == 2
    assert "no such bundle" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "nope.pcedge"), "--http-port", "18000", "--grpc-port", "18001",
                 "--metrics-port", "18002"]) == 2
    assert "no such bundle" in capsys.readouterr().err
    assert main(["serve", str(fixture_bundle), "--http-port", "18000", "--grpc-port", "18000"]) == 2
    assert "must differ" in capsys.readouterr().err
    assert main(["predict", "bsd", str(BSD_IMAGES[0]), "--server", "ftp://host:1"]) == 2
    assert "scheme" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# The Python backend's interpreter
# --------------------------------------------------------------------------------------------------


def test_this_environment_passes_the_python_backend_check():
    install = find_tritonserver()
    python = check_python_backend(install)  # raises with the fix if the stubs could not run our models
    assert python is None or python.is_file()  # None: this interpreter is the stub's build


def test_the_stub_environment_has_the_system_standard_library_and_our_packages(tmp_path):
    """What `pcedge serve` gives the Python-backend stubs when this venv's Python is another 3.11 build
    than the libpython they embed: the system interpreter of that build, with this venv's packages."""
    from pcedge.runtime.serving.server import _libpython_version, _linked_libpython, stub_environment

    install = find_tritonserver()
    lib = _linked_libpython(install.stub)
    wanted = _libpython_version(lib)
    system = next((p for p in (Path("/usr/bin/python3.11"), Path("/usr/local/bin/python3.11"))
                   if p.is_file()), None)
    assert system is not None, "no system python3.11 beside the libpython the stub embeds"
    bin_dir = stub_environment(tmp_path / "env", system)
    script = ("import platform, threading, numpy, onnxruntime, hnswlib, cv2\n"
              "from pcedge.runtime.serving.python_models import ScorerModel\n"
              "threading.Event().wait(0.01)\n"
              "print(platform.python_version(), threading.__file__)")
    done = subprocess.run([str(bin_dir / "python3"), "-c", script], capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")})
    assert done.returncode == 0, done.stderr
    version, threading_file = done.stdout.split()
    stdlib = subprocess.run([str(system), "-c", "import sysconfig; print(sysconfig.get_paths()['stdlib'])"],
                            capture_output=True, text=True).stdout.strip()
    assert version == wanted
    assert Path(threading_file).parent == Path(stdlib)  # the system build's standard library, not ours


def test_no_interpreter_for_the_stub_gets_a_clear_message_not_the_rlock_traceback():
    import platform

    from pcedge.runtime.serving.server import _libpython_version, _linked_libpython

    install = find_tritonserver()
    theirs = _libpython_version(_linked_libpython(install.stub))
    if theirs != platform.python_version():
        with pytest.raises(ServerError) as caught:
            check_python_backend(install, candidates=[])  # as on a machine without /usr/bin/python3.11
        message = str(caught.value)
    else:  # this venv is that build: ask from another 3.11 (pyenv's here), loading server.py by path
        other = next((c for c in ("/root/.pyenv/shims/python3.11", "/usr/local/bin/python3.11")
                      if Path(c).exists()), None)
        if other is None:
            pytest.skip("this interpreter matches the stub and no other Python 3.11 build is installed")
        script = (
            "import importlib.util, sys, pathlib\n"
            f"spec = importlib.util.spec_from_file_location('server', {str(ROOT / 'runtime/serving/server.py')!r})\n"
            "server = importlib.util.module_from_spec(spec); sys.modules['server'] = server; spec.loader.exec_module(server)\n"
            f"install = server.TritonInstall(pathlib.Path({str(install.binary)!r}), None, pathlib.Path({str(install.stub)!r}), None, True)\n"
            "try:\n    server.check_python_backend(install, candidates=[])\nexcept server.ServerError as exc:\n    print(exc); sys.exit(3)\n"
        )
        done = subprocess.run([other, "-c", script], capture_output=True, text=True, timeout=60)
        assert done.returncode == 3, done.stdout + done.stderr
        message = done.stdout
    assert "-m venv" in message and "standard library" in message and theirs in message
    assert "_recursion_count" not in message


def test_server_errors_are_clear(tmp_path):
    with pytest.raises(ServerError, match="no such model repository"):
        TritonServer(tmp_path / "nothing", server_options(tmp_path)).start()
    with pytest.raises(ServerError, match="not an executable"):
        find_tritonserver(tmp_path / "tritonserver")
    broken = tmp_path / "broken"
    (broken / "m").mkdir(parents=True)
    (broken / "m" / "config.pbtxt").write_text('name: "m"\nbackend: "python"\nnot_a_field: 1\n')
    with pytest.raises(ServerError, match="exited with code"):
        TritonServer(broken, server_options(tmp_path, startup_timeout_s=60)).start()


# --------------------------------------------------------------------------------------------------
# A real server
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_two_bundles_served_at_once_give_the_local_detectors_results(served, protocol):
    server, frames, expected = served
    url = server.http_url if protocol == "http" else server.grpc_url
    for name in ("bsd", "pcb"):
        with RemoteDetector(url, name) as remote:
            assert remote.max_batch == 8 and remote.threshold == expected[name][0].threshold
            results = remote.run_frames(frames[name])  # one batched request
            single = [remote.run_frames([f])[0] for f in frames[name][:2]]  # and one by one
        assert len(results) == len(expected[name])
        for local, got in zip(expected[name], results):
            assert_same(local, got)
        for local, got in zip(expected[name], single):
            assert_same(local, got)


def test_eight_concurrent_clients(served):
    server, frames, expected = served
    errors: list[str] = []
    counts = [0] * 8

    def client(i: int) -> None:
        name = ("bsd", "pcb")[i % 2]
        url = server.grpc_url if i % 4 < 2 else server.http_url
        try:
            with RemoteDetector(url, name) as remote:
                for k in range(3):
                    j = (i + k) % len(frames[name])
                    assert_same(expected[name][j], remote.run_frames([frames[name][j]])[0])
                    counts[i] += 1
        except BaseException as exc:  # collected: a thread's assertion must fail the test
            errors.append(f"client {i}: {exc!r}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert counts == [3] * 8


def test_malformed_requests_get_clear_errors_and_the_server_keeps_serving(served):
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    server, frames, expected = served
    client = http.InferenceServerClient(server.http_url.removeprefix("http://"))
    try:
        cases = [("bsd", np.zeros((1, 3, 100, 100), np.float32), "FP32", "shape"),
                 ("bsd", np.zeros((1, 3, 224, 224), np.float64), "FP64", "data-type|datatype|type"),
                 ("no_such_model", np.zeros((1, 3, 224, 224), np.float32), "FP32", "unknown model|not found")]
        for model, array, dtype, pattern in cases:
            image = http.InferInput("IMAGES", list(array.shape), dtype)
            image.set_data_from_numpy(array)
            with pytest.raises(InferenceServerException, match=f"(?i){pattern}"):
                client.infer(model, [image])
    finally:
        client.close()
    with pytest.raises(RemoteError, match="no model 'nope'.*bsd"):
        RemoteDetector(server.http_url, "nope")
    with pytest.raises(RemoteError, match="not a pcedge ensemble"):
        RemoteDetector(server.http_url, "bsd_scorer")
    with RemoteDetector(server.http_url, "bsd") as remote:
        with pytest.raises(RemoteError, match="(?i)shape"):
            remote.embed(np.zeros((1, 3, 64, 64), np.float32))
        assert_same(expected["bsd"][0], remote.run_frames([frames["bsd"][0]])[0])  # still serving
    assert server.is_ready() and server.process.poll() is None


def test_server_killed_and_restarted_while_clients_stream(fixture_bundle, tmp_path):
    """SIGKILL the server (and its stubs) mid-stream, start it again on the same ports: every frame of
    every client is either scored (identically) or failed with a reason, and the clients recover."""
    report = write_repository([("bsd", fixture_bundle)], tmp_path / "repo", RepositoryOptions(cpu_only=True, threads=1))
    options = server_options(tmp_path)
    server = TritonServer(report.root, options)
    server.start()
    frames = [read_image(p) for p in BSD_IMAGES]
    with Detector.open(fixture_bundle) as detector:
        expected = detector.run_frames(frames)
    per_client = 10
    outcomes: dict[int, list] = {i: [] for i in range(4)}
    remotes: list[RemoteDetector] = []
    started = threading.Barrier(5)
    errors: list[str] = []

    def client(i: int) -> None:
        url = server.http_url if i % 2 else server.grpc_url
        try:
            remote = RemoteDetector(url, "bsd", ClientOptions(retry_s=120, backoff_max_s=1.0))
            remotes.append(remote)
            started.wait()
            for k in range(per_client):
                j = (i + k) % len(frames)
                try:
                    outcomes[i].append(("scored", j, remote.run_frames([frames[j]])[0]))
                except (ServerUnavailable, RemoteError) as exc:
                    outcomes[i].append(("failed", j, str(exc)))
                time.sleep(0.05)
        except BaseException as exc:
            errors.append(f"client {i}: {exc!r}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    try:
        for t in threads:
            t.start()
        started.wait()
        time.sleep(0.6)
        server.kill()
        time.sleep(1.0)
        restarted = TritonServer(report.root, ServerOptions(**{**options.__dict__, "log_file": tmp_path / "restart.log"}))
        restarted.start()
        for t in threads:
            t.join(300)
    finally:
        server.stop()
        if "restarted" in locals():
            restarted.stop()
    assert not errors, errors
    for i, events in outcomes.items():
        assert len(events) == per_client, f"client {i}: {len(events)} of {per_client} frames accounted for"
        for kind, j, value in events:
            if kind == "scored":
                assert_same(expected[j], value)
            else:
                assert value  # a failure carries its reason
    scored = sum(kind == "scored" for events in outcomes.values() for kind, _, _ in events)
    assert scored == 4 * per_client  # the restart came well inside the retry window: nothing was lost
    assert sum(r.retries for r in remotes) > 0  # the clients did see the outage and recovered from it
    for remote in remotes:
        remote.close()


def test_unreachable_server_fails_each_frame_with_a_reason(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServerUnavailable, match="unreachable"):
        RemoteDetector(url, "bsd", ClientOptions(retry_s=0.5))


def _wait_for_line(stream, marker: str, timeout_s: float) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            break
        lines.append(line)
        if marker in line:
            return lines
    raise AssertionError("".join(lines))


def test_cli_serve_then_predict_and_watch_with_server(fixture_bundle, pcb_bundle, tmp_path, capsys):
    """`pcedge serve` in a subprocess; `pcedge predict --server` and `pcedge watch --server` against it give
    the local commands' JSONL; SIGTERM stops the server cleanly."""
    from pcedge.cli import main

    ports = [free_port() for _ in range(3)]
    serve = subprocess.Popen(
        [sys.executable, "-m", "pcedge.cli", "serve", str(fixture_bundle), f"pcb={pcb_bundle}",
         "--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]),
         "--model-threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        lines = _wait_for_line(serve.stdout, "next:", 240)
        text = "".join(lines)
        assert f"http://127.0.0.1:{ports[0]}" in text and f"grpc://127.0.0.1:{ports[1]}" in text
        assert f"http://127.0.0.1:{ports[2]}/metrics" in text
        images = [str(p) for p in BSD_IMAGES]
        assert main(["predict", str(fixture_bundle), *images, "--jsonl", str(tmp_path / "local.jsonl"), "--quiet"]) == 0
        assert main(["predict", str(fixture_bundle), *images, "--server", f"http://127.0.0.1:{ports[0]}",
                     "--jsonl", str(tmp_path / "remote.jsonl"), "--save-maps", str(tmp_path / "maps"), "--quiet"]) == 0
        local = [json.loads(line) for line in (tmp_path / "local.jsonl").read_text().splitlines()]
        remote = [json.loads(line) for line in (tmp_path / "remote.jsonl").read_text().splitlines()]
        assert [r["path"] for r in remote] == [r["path"] for r in local]
        for a, b in zip(local, remote):
            assert b["score"] == pytest.approx(a["score"], rel=1e-5) and b["verdict"] == a["verdict"]
        assert len(list((tmp_path / "maps").glob("*_overlay.png"))) == len(images)
        # watch: a folder of PCB images through the gRPC endpoint, every frame in the event log
        assert main(["watch", "pcb", str(PCB / "test" / "defect"), "--server", f"grpc://127.0.0.1:{ports[1]}",
                     "--jsonl", str(tmp_path / "watch.jsonl")]) == 0
        events = [json.loads(line) for line in (tmp_path / "watch.jsonl").read_text().splitlines()]
        processed = [e for e in events if e.get("event") == "processed" or e.get("outcome") == "processed"]
        assert processed and len(processed) == len(list((PCB / "test" / "defect").glob("*.png")))
        # a wrong model name: a clear message, exit code 2
        assert main(["predict", "nope", images[0], "--server", f"http://127.0.0.1:{ports[0]}"]) == 2
        assert "no model 'nope'" in capsys.readouterr().err
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            code = serve.wait(90)
        except subprocess.TimeoutExpired:
            serve.kill()
            raise
        err = serve.stderr.read()
    assert code == 0, err
    assert "SIGTERM: stopping the server" in err and "stopped (tritonserver exit code 0)" in err


def test_predict_with_server_accounts_for_every_frame_when_the_server_dies(fixture_bundle, tmp_path, capsys,
                                                                         monkeypatch):
    """The server is killed during `pcedge predict --server`: every image gets a JSONL line, scored or failed
    with the reason, and the run goes on to the end."""
    from pcedge.cli import main
    from pcedge.runtime.serving import client

    report = write_repository([("bsd", fixture_bundle)], tmp_path / "repo", RepositoryOptions(cpu_only=True, threads=1))
    server = TritonServer(report.root, server_options(tmp_path))
    server.start()
    images = sorted(str(p) for p in (BSD / "test").rglob("*") if p.suffix in (".jpg", ".png"))[:16]
    real_run_frames = client.RemoteDetector.run_frames
    batches: list[int] = []

    def kill_after_the_first_batch(self, frames, *args, **kwargs):
        # The kill comes from the client side, once the first batch's results are in its hands: a kill timed
        # from the server's metrics could land before that batch's response left the server.
        results = real_run_frames(self, frames, *args, **kwargs)
        batches.append(len(results))
        if len(batches) == 1:
            server.kill()
        return results

    monkeypatch.setattr(client.RemoteDetector, "run_frames", kill_after_the_first_batch)
    try:
        code = main(["predict", "bsd", *images, "--server", server.http_url, "--retry", "1", "--batch", "4",
                     "--jsonl", str(tmp_path / "p.jsonl"), "--quiet"])
    finally:
        server.stop()
    records = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["path"] for r in records] == images  # every frame accounted for, in order
    failed = [r for r in records if "error" in r]
    assert all("unreachable" in r["error"] or "model bsd" in r["error"] for r in failed), failed
    assert all("score" in r for r in records if "error" not in r)
    assert batches == [4] and len(records) - len(failed) == 4 and len(failed) == 12  # first batch scored, the rest not
    out = capsys.readouterr().out
    assert "4 scored" in out and "12 failed" in out
    assert code == 1


def test_watch_with_server_rides_out_a_server_restart(fixture_bundle, tmp_path, capsys):
    """`pcedge watch --server` on a folder played at 8 fps while the server is killed and started again on
    the same ports: the client reconnects and every frame is processed, each one in the event log."""
    from pcedge.cli import main

    report = write_repository([("bsd", fixture_bundle)], tmp_path / "repo", RepositoryOptions(cpu_only=True, threads=1))
    options = server_options(tmp_path)
    servers = [TritonServer(report.root, options).start()]
    moments: dict[str, float] = {}

    def restart() -> None:
        time.sleep(0.8)
        servers[0].kill()
        time.sleep(1.0)
        servers.append(TritonServer(report.root, ServerOptions(**{**options.__dict__,
                                                                  "log_file": tmp_path / "restart.log"})).start())
        moments["restarted"] = time.monotonic()

    bouncer = threading.Thread(target=restart)
    bouncer.start()
    try:
        code = main(["watch", "bsd", str(BSD / "test" / "good"), "--server", servers[0].grpc_url, "--fps", "8",
                     "--loop", "--max-frames", "24", "--retry", "60", "--jsonl", str(tmp_path / "w.jsonl")])
        moments["finished"] = time.monotonic()
    finally:
        bouncer.join()
        for server in servers:
            server.stop()
    assert code == 0, capsys.readouterr().err
    events = [json.loads(line) for line in (tmp_path / "w.jsonl").read_text().splitlines()]
    frames = [e for e in events if e.get("event") in ("processed", "dropped", "skipped")]
    assert [e["event"] for e in frames] == ["processed"] * 24
    assert len(servers) == 2 and moments["restarted"] < moments["finished"]  # the outage fell inside the run
