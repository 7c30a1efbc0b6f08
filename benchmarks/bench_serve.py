"""Serving on Triton versus local detectors: throughput and latency at 1, 2, 4, 8 concurrent camera streams.

Every stream is a camera that sends its next frame as soon as the previous result is back (closed loop),
``--frames`` frames per stream after ``--warmup``; all streams start together. Frames are real BSData
test images (good and pitting), decoded once beforehand (a camera delivers decoded frames). Both servers
stay up for the whole run and the modes alternate within each of ``--rounds`` rounds, so load from other
work on this shared machine hits them alike; the JSON keeps every run and the medians.

- ``local``: N independent processes, each with its own :class:`~pcedge.runtime.detector.Detector`
  (ONNX Runtime CPU, default threads) -- one Jetson per camera, squeezed onto this machine;
- ``triton`` / ``triton-nobatch``: one ``pcedge serve``-style server (the --cpu-only repository of the same
  bundle; nvidia-pytriton's tritonserver) with and without dynamic batching, N client threads each with its
  own :class:`~pcedge.runtime.serving.client.RemoteDetector` over gRPC (geometry and map placement on the
  client, backbone + index + scoring on the server).

Reported per run: frames/s (all frames / wall time), per-frame latency p50/p95 (client side, end to end),
CPU milliseconds per frame on the server (user+system of tritonserver and its Python-backend stubs, from
/proc) and in the clients, the embedder's mean batch size (Triton's own counters), and the load average.
Also the link arithmetic behind sending tensors rather than JPEG bytes over 1 GbE, the scorer's CPU per
frame, and the backbone's CPU per frame at batch 1 and 8 (what dynamic batching can save on this CPU).

    python benchmarks/bench_serve.py                       # results/serve.json
    python benchmarks/bench_serve.py --streams 1 2 --frames 6 --rounds 1   # smoke run
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import re
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BSDATA, RESULTS, cached_bundle, load_average, log, machine_info, write_json  # noqa: E402

from pcedge.runtime.preprocess import fit_geometry, list_images, read_image, to_tensor  # noqa: E402

LINK_BITS_PER_S = 1e9  # 1 GbE


@dataclass
class Run:
    mode: str  # local | triton | triton-nobatch
    streams: int
    frames: int
    seconds: float
    fps: float
    latency_p50_ms: float
    latency_p95_ms: float
    server_cpu_ms_per_frame: float | None  # tritonserver + stubs
    client_cpu_ms_per_frame: float  # the benchmark's clients (local: the detector processes)
    mean_embedder_batch: float | None
    loadavg_before: list[float]
    loadavg_after: list[float]


@dataclass
class LinkCost:
    """Bytes per frame each way and what they cost on a 1 GbE link, against decoding on the server."""

    tensor_request_bytes: int  # [3, H, W] float32
    jpeg_request_bytes_mean: float  # the source files as stored (JPEG/PNG)
    response_bytes: int  # map [H, W] + patch grid + scalars
    tensor_ms_on_1gbe: float
    jpeg_ms_on_1gbe: float
    response_ms_on_1gbe: float
    decode_and_geometry_cpu_ms: float  # what the server would spend per frame if it were sent JPEG bytes
    scorer_cpu_ms: float  # the scorer model's work per frame (index, Eq. 7, map at network size), one thread
    link_limit_fps_tensor: float
    link_limit_fps_jpeg: float


@dataclass
class Report:
    machine: dict
    bundle: str
    images: int
    frames_per_stream: int
    warmup: int
    link: LinkCost
    embedder_cpu_ms_per_frame: dict[str, float]
    rounds: int
    runs: list[Run] = field(default_factory=list)
    medians: list[dict] = field(default_factory=list)
    target: dict = field(default_factory=dict)


def test_images(data: Path, n: int) -> list[Path]:
    good = list_images(data / "test" / "good")
    bad = list_images(data / "test" / "pitting")
    mixed = [p for pair in zip(good, bad) for p in pair]
    return mixed[:n]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


# ------------------------------------------------------------------------------------------------ local


def _local_worker(bundle: str, paths: list[str], frames: int, warmup: int, offset: int, ready, go, out) -> None:
    from pcedge.runtime.detector import Detector

    decoded = [read_image(p) for p in paths]
    with Detector.open(bundle) as detector:
        for k in range(warmup):
            detector.run_frames([decoded[(offset + k) % len(decoded)]])
        ready.release()
        go.wait()
        cpu0 = time.process_time()
        latencies = []
        for k in range(frames):
            t = time.perf_counter()
            detector.run_frames([decoded[(offset + k) % len(decoded)]])
            latencies.append((time.perf_counter() - t) * 1e3)
        out.put((latencies, time.process_time() - cpu0, time.perf_counter()))


def run_local(bundle: Path, paths: list[Path], streams: int, frames: int, warmup: int) -> Run:
    ctx = mp.get_context("spawn")
    ready, go, out = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    workers = [ctx.Process(target=_local_worker, args=(str(bundle), [str(p) for p in paths], frames, warmup, i * 3,
                                                       ready, go, out)) for i in range(streams)]
    for w in workers:
        w.start()
    for _ in workers:
        ready.acquire()
    before = load_average()
    start = time.perf_counter()
    go.set()
    results = [out.get() for _ in workers]
    for w in workers:
        w.join()
    seconds = max(r[2] for r in results) - start
    latencies = [x for r in results for x in r[0]]
    n = streams * frames
    return Run("local", streams, n, seconds, n / seconds, percentile(latencies, 50), percentile(latencies, 95),
               None, sum(r[1] for r in results) * 1e3 / n, None, before, load_average())


# ------------------------------------------------------------------------------------------------ triton


def group_cpu_seconds(pgid: int) -> float:
    """user + system CPU seconds of every live process in process group ``pgid`` (server and stubs)."""
    total, tick = 0.0, os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid:  # fields[2]: pgrp
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def embedder_counts(metrics_url: str, model: str) -> tuple[float, float]:
    """Triton's (inference count, execution count) for ``model``: their ratio is the mean batch size."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    values = {}
    for name in ("nv_inference_count", "nv_inference_exec_count"):
        match = re.search(rf'^{name}{{model="{model}",version="1"}} (\S+)$', text, re.M)
        values[name] = float(match.group(1)) if match else 0.0
    return values["nv_inference_count"], values["nv_inference_exec_count"]


def run_triton(server, mode: str, decoded: list[np.ndarray], streams: int, frames: int, warmup: int) -> Run:
    from pcedge.runtime.serving.client import RemoteDetector

    remotes = [RemoteDetector(server.grpc_url, "bsd") for _ in range(streams)]
    for i, remote in enumerate(remotes):
        for k in range(warmup):
            remote.run_frames([decoded[(i * 3 + k) % len(decoded)]])
    latencies: list[list[float]] = [[] for _ in range(streams)]
    barrier = threading.Barrier(streams + 1)
    finished = [0.0] * streams

    def stream(i: int) -> None:
        barrier.wait()
        for k in range(frames):
            t = time.perf_counter()
            remotes[i].run_frames([decoded[(i * 3 + k) % len(decoded)]])
            latencies[i].append((time.perf_counter() - t) * 1e3)
        finished[i] = time.perf_counter()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    counts0 = embedder_counts(server.metrics_url, "bsd_embedder")
    before = load_average()
    server_cpu0, client_cpu0 = group_cpu_seconds(server.process.pid), time.process_time()
    start = time.perf_counter()
    barrier.wait()
    for t in threads:
        t.join()
    seconds = max(finished) - start
    server_cpu = group_cpu_seconds(server.process.pid) - server_cpu0
    client_cpu = time.process_time() - client_cpu0
    counts1 = embedder_counts(server.metrics_url, "bsd_embedder")
    for remote in remotes:
        remote.close()
    n = streams * frames
    executions = counts1[1] - counts0[1]
    all_latencies = [x for row in latencies for x in row]
    return Run(mode, streams, n, seconds, n / seconds, percentile(all_latencies, 50), percentile(all_latencies, 95),
               server_cpu * 1e3 / n, client_cpu * 1e3 / n,
               (counts1[0] - counts0[0]) / executions if executions else None, before, load_average())


# ------------------------------------------------------------------------------------------------ link


def embedder_cpu_ms(bundle: Path, decoded: list[np.ndarray], batches=(1, 8), repeats: int = 3) -> dict[str, float]:
    """CPU ms per frame of the backbone (ONNX Runtime CPU, default threads) at batch 1 and batch 8: what
    dynamic batching can save per frame on this machine."""
    from pcedge.runtime.detector import Detector

    out = {}
    with Detector.open(bundle) as detector:
        tensor = to_tensor([fit_geometry(f, detector.geometry)[0] for f in decoded[:8]])
        detector.embed(tensor[:1])
        for b in batches:
            t = time.process_time()
            frames = 0
            for _ in range(repeats):
                for i in range(0, 8, b):
                    detector.embed(tensor[i : i + b])
                    frames += b
            out[f"batch{b}"] = (time.process_time() - t) * 1e3 / frames
    return out


def scorer_cpu_ms(bundle: Path, decoded: list[np.ndarray]) -> float:
    """CPU ms per frame of what the scorer model runs (Detector.score_embeddings, maps at network size)."""
    from pcedge.runtime.detector import Detector

    with Detector.open(bundle) as detector:
        tensor = to_tensor([fit_geometry(f, detector.geometry)[0] for f in decoded])
        embeddings = detector.embed(tensor)
    scorer = Detector.open_scoring(bundle)
    scorer.score_embeddings(embeddings[:1], None)  # warm-up
    t = time.process_time()
    for i in range(embeddings.shape[0]):
        scorer.score_embeddings(embeddings[i : i + 1], None)
    ms = (time.process_time() - t) * 1e3 / embeddings.shape[0]
    scorer.close()
    return ms


def link_cost(paths: list[Path], decoded: list[np.ndarray], geometry, scorer_ms: float) -> LinkCost:
    H, W = geometry.height, geometry.width
    tensor = 3 * H * W * 4
    jpeg = float(np.mean([p.stat().st_size for p in paths]))
    response = H * W * 4 + 28 * 28 * 4 + 5 * 8 + 4 + 1
    decode_ms = []
    for p in paths:
        data = np.fromfile(p, dtype=np.uint8)
        t = time.perf_counter()
        image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
        to_tensor([fit_geometry(image, geometry)[0]])
        decode_ms.append((time.perf_counter() - t) * 1e3)

    def ms(b: float) -> float:
        return b * 8 / LINK_BITS_PER_S * 1e3

    return LinkCost(tensor, jpeg, response, ms(tensor), ms(jpeg), ms(response), float(np.median(decode_ms)),
                    scorer_ms, 1e3 / ms(max(tensor, response)), 1e3 / ms(max(jpeg, response)))


# ------------------------------------------------------------------------------------------------ main


def main() -> int:
    from pcedge.runtime.bundle import open_bundle
    from pcedge.runtime.serving.repository import RepositoryOptions, write_repository
    from pcedge.runtime.serving.server import ServerOptions, TritonServer, free_port

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=BSDATA)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--frames", type=int, default=24, help="timed frames per stream (default 24)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; the JSON keeps each and the median")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--max-queue-delay-us", type=int, default=5000)
    parser.add_argument("--out", type=Path, default=RESULTS / "serve.json")
    args = parser.parse_args()

    machine = machine_info()
    bundle = cached_bundle("bsdata_default", args.data).path
    paths = test_images(args.data, args.images)
    decoded = [read_image(p) for p in paths]
    geometry = open_bundle(bundle).manifest.input.geometry
    report = Report(machine=machine, bundle=str(bundle), images=len(paths), frames_per_stream=args.frames,
                    warmup=args.warmup, link=link_cost(paths, decoded, geometry, scorer_cpu_ms(bundle, decoded)),
                    embedder_cpu_ms_per_frame=embedder_cpu_ms(bundle, decoded), rounds=args.rounds)
    log(f"link: {report.link}")
    log(f"embedder CPU ms/frame: {report.embedder_cpu_ms_per_frame}")
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        servers = {}
        try:
            for batching in (True, False):  # both servers up for the whole run: the modes alternate
                mode = "triton" if batching else "triton-nobatch"
                repo = write_repository([("bsd", bundle)], Path(tmp) / mode, RepositoryOptions(
                    cpu_only=True, dynamic_batching=batching, max_batch_size=8,
                    max_queue_delay_us=args.max_queue_delay_us))
                options = ServerOptions(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                                        log_file=Path(tmp) / f"{mode}.log")
                servers[mode] = TritonServer(repo.root, options).start()
            # Rounds, and within a round every mode at each stream count back to back: load from other
            # work on this shared machine then hits all modes alike.
            for round_ in range(args.rounds):
                for n in args.streams:
                    for mode in ("local", "triton", "triton-nobatch"):
                        if mode == "local":
                            run = run_local(bundle, paths, n, args.frames, args.warmup)
                        else:
                            run = run_triton(servers[mode], mode, decoded, n, args.frames, args.warmup)
                        cpu = f", server CPU {run.server_cpu_ms_per_frame:.1f} ms/frame, batch {run.mean_embedder_batch:.2f}" \
                            if run.server_cpu_ms_per_frame is not None else ""
                        log(f"round {round_} {mode:14s} x{n}: {run.fps:5.1f} fps, p50 {run.latency_p50_ms:4.0f} ms, "
                            f"p95 {run.latency_p95_ms:4.0f} ms, client CPU {run.client_cpu_ms_per_frame:.1f} ms/frame{cpu}; "
                            f"load {run.loadavg_before[0]}")
                        report.runs.append(run)
        finally:
            for server in servers.values():
                server.stop()
    for n in args.streams:
        for mode in ("local", "triton", "triton-nobatch"):
            runs = [r for r in report.runs if r.mode == mode and r.streams == n]
            report.medians.append({"mode": mode, "streams": n,
                                   "fps": float(np.median([r.fps for r in runs])),
                                   "latency_p50_ms": float(np.median([r.latency_p50_ms for r in runs])),
                                   "latency_p95_ms": float(np.median([r.latency_p95_ms for r in runs]))})
    by = {(m["mode"], m["streams"]): m for m in report.medians}
    top = max(args.streams)
    local, served = by[("local", top)], by[("triton", top)]
    report.target = {
        "streams": top, "goal": "triton with dynamic batching >= 1.5x the local fps at the same p95 bound",
        "fps_ratio": served["fps"] / local["fps"], "p95_local_ms": local["latency_p95_ms"],
        "p95_triton_ms": served["latency_p95_ms"],
        "met": served["fps"] >= 1.5 * local["fps"] and served["latency_p95_ms"] <= local["latency_p95_ms"],
        "fps_ratio_without_batching": by[("triton-nobatch", top)]["fps"] / local["fps"],
    }
    write_json(args.out, report)
    log(f"wrote {args.out}: {report.target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
