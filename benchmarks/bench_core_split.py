"""Both cores for the single-stream CPU path: each lever timed alone, variants interleaved round by round.

On the default BSData bundle (cached under ``results/bundles/``, exported on first use) and its test frames
(1130x460, decoded once):

1. ``resize``: the INTER_AREA shrink of a frame to the network input in one OpenCV call vs in bands on a
   :class:`~pcedge.runtime.core_split.CoreSplit` (runtime/area_bands.py), at the camera's size and at
   smaller ones (where the hand-off may cost more than it saves: ``MIN_SPLIT_SOURCE_PIXELS``); the
   outputs are compared bit for bit.
2. ``index``: the exact index's search of one image's 784 real queries (the bundle's backbone on a test
   image), at the default bank (1,176 rows) and larger ones (the bank tiled, plus noise of 1 % of its
   spread, so the sizes are real even where the rows are not): one call on one BLAS thread (the
   detector's default), one call on two BLAS threads (``DetectorOptions.blas_threads = 2``), and the
   detector's own split of the query rows over two threads on one BLAS thread each. Ids are compared.
3. ``backbone``: the ONNX Runtime session with the backend's options (runtime/backends.py) and one change
   each: intra-op spinning on, 1 intra-op thread, ``session.dynamic_block_base`` 4, denormals as zero,
   and (for the input/output copies) ``run_with_iobinding`` with both buffers bound once.

Each variant runs ``--repeats`` calls per round; rounds interleave the variants so a burst of other work
lands on all of them. Reported: the median and the minimum over rounds of each round's median, with the
load average per round (2 shared cores: other engineers' work runs beside it).

    python benchmarks/bench_core_split.py     # -> results/core_split.json, .md (~1 min on a cached bundle)
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BSDATA, RESULTS, cached_bundle, load_average, log, machine_info, write_json  # noqa: E402

from pcedge.runtime.files import write_text_atomic  # noqa: E402

#: Frame sizes (width, height) timed: the camera's, then smaller ones (the same frame shrunk) down to where
#: a split stops paying; each has a bit-exact band boundary to 224x224.
RESIZE_SIZES = ((1130, 460), (848, 345), (565, 230), (448, 280), (336, 252))
BANK_TILES = (1, 2, 4, 10)  # default bank x this: 1,176 / 2,352 / 4,704 / 11,760 rows
BACKBONE_VARIANTS = ("shipped", "spinning", "1-thread", "dynamic-block-base-4", "denormal-as-zero", "iobinding")


@dataclass
class Timing:
    section: str  # resize | index | backbone
    case: str  # e.g. "1130x460", "1176 rows"
    variant: str  # e.g. "one call", "split 2"
    median_ms: float  # median over rounds of the round's median
    min_ms: float  # smallest round median (the least disturbed round)
    by_round_ms: list[float]
    note: str = ""  # identity checks, bands used


@dataclass
class Report:
    bundle: str
    machine: object
    repeats: int
    rounds: int
    loadavg_by_round: list[list[float]]
    timings: list[Timing] = field(default_factory=list)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=BSDATA)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=100, help="timed calls per variant per round")
    parser.add_argument("--sections", nargs="+", default=["resize", "index", "backbone"],
                        choices=["resize", "index", "backbone"])
    parser.add_argument("--out", type=Path, default=RESULTS / "core_split.json")
    return parser.parse_args(argv)


def median_ms(work: Callable[[], object], repeats: int, blas: int = 1) -> float:
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=blas, user_api="blas"):
        work()  # warm: buffers, plans, BLAS wake-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            work()
            times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def resize_cases(frame: np.ndarray, split) -> dict[tuple[str, str], Callable[[], object]]:
    import cv2

    from pcedge.runtime.preprocess import _resize, _ResizeBuffer

    cases = {}
    for size in RESIZE_SIZES:
        image = frame if size == frame.shape[1::-1] else cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
        name = f"{image.shape[1]}x{image.shape[0]}"
        one, banded = _ResizeBuffer(), _ResizeBuffer()
        cases[("resize", name, "one call")] = (lambda i=image, b=one: _resize(i, 224, 224, b, None))
        if not banded.bands(image.shape[0], image.shape[1], 224, 224, split.threads):
            log(f"resize {name} -> 224x224: no bit-exact band boundary, not split")
            continue
        # The threshold is bypassed here on purpose: the point is to measure where it should be.
        cases[("resize", name, "split 2")] = (lambda i=image, b=banded: _banded(i, b, split))
    return cases


def _banded(image: np.ndarray, buffer, split) -> np.ndarray:
    from pcedge.runtime.preprocess import _resize_band

    bands = buffer.bands(image.shape[0], image.shape[1], 224, 224, split.threads)
    dst = buffer.get((224, 224, *image.shape[2:]), image.dtype)
    split.map(lambda band: _resize_band(image, dst, band), bands)
    return dst


def index_cases(bank: np.ndarray, queries: np.ndarray, split) -> dict:
    from threadpoolctl import threadpool_limits

    from pcedge.runtime.index import ExactIndex

    rng = np.random.default_rng(0)
    spread = float(bank.std())
    cases = {}
    for tiles in BANK_TILES:
        big = bank if tiles == 1 else np.concatenate([bank] * tiles)
        if tiles > 1:
            big = (big + rng.normal(0.0, 0.01 * spread, big.shape)).astype(np.float32)
        index = ExactIndex(big)
        name = f"{big.shape[0]} rows"

        # The BLAS limit is set around each variant's whole timing loop (BLAS_THREADS), not per call:
        # threadpoolctl scans the loaded libraries each time, which would add ~1 ms to every call.
        cases[("index", name, "one call, 1 BLAS thread")] = (lambda index=index: index.query(queries, 1))
        cases[("index", name, "one call, 2 BLAS threads")] = (lambda index=index: index.query(queries, 1))
        cases[("index", name, "split 2, 1 BLAS thread each")] = (
            lambda index=index: index.query(queries, 1, split))
    return cases


def blas_threads(variant: str) -> int:
    """numpy's BLAS threads while a variant is timed: 2 only for the variant that says so."""
    return 2 if "2 BLAS threads" in variant else 1


def backbone_cases(model: Path, image: np.ndarray) -> dict:
    import onnxruntime as ort

    from pcedge.runtime.backends import OrtBackend

    cases = {}
    for variant in BACKBONE_VARIANTS:
        threads = 1 if variant == "1-thread" else 2
        backend = OrtBackend(model, "ort-cpu", threads)
        if variant in ("spinning", "dynamic-block-base-4", "denormal-as-zero"):
            # The backend's own options with one config entry changed: rebuild its session from them.
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.add_session_config_entry("session.intra_op.allow_spinning", "1" if variant == "spinning" else "0")
            if variant == "dynamic-block-base-4":
                options.add_session_config_entry("session.dynamic_block_base", "4")
            if variant == "denormal-as-zero":
                options.add_session_config_entry("session.set_denormal_as_zero", "1")
            options.log_severity_level = 3
            backend.session = ort.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"])
        if variant == "iobinding":
            session = backend.session
            binding = session.io_binding()
            binding.bind_cpu_input(backend.input_name, image)
            out_shape = backend(image).shape
            output = np.empty(out_shape, dtype=np.float32)
            binding.bind_output(backend.output_name, "cpu", 0, np.float32, list(out_shape), output.ctypes.data)
            # `output` is bound by address: the lambda keeps it alive as long as the binding is used.
            cases[("backbone", "224x224", variant)] = (
                lambda s=session, b=binding, o=output: s.run_with_iobinding(b))
        else:
            cases[("backbone", "224x224", variant)] = (lambda b=backend: b(image))
    return cases


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pcedge.runtime.core_split import CoreSplit
    from pcedge.runtime.detector import Detector, DetectorOptions
    from pcedge.runtime.preprocess import list_images, read_image

    bundle = cached_bundle("bsdata_default", args.data).path
    frames = [read_image(p) for p in list_images(args.data / "test" / "good")[:4]]
    split = CoreSplit(2)
    cases: dict = {}
    with Detector.open(bundle, DetectorOptions(backend="ort-cpu", index="exact", split_threads=1,
                                               verify_checksums=False)) as detector:
        tensor, _ = detector.input_buffers().prepare(frames[:1])
        tensor = tensor.copy()
        queries = np.ascontiguousarray(detector.embed(tensor)[0], dtype=np.float32)  # [784, D]
        bank = detector.bank
        model = detector.bundle.model_path
    if "resize" in args.sections:
        cases.update(resize_cases(frames[0], split))
    if "index" in args.sections:
        cases.update(index_cases(bank, queries, split))
    if "backbone" in args.sections:
        cases.update(backbone_cases(model, tensor))

    notes = {}
    for (section, case, variant), work in cases.items():  # identity checks, once, before timing
        if section == "resize" and variant == "split 2":
            one = np.array(cases[(section, case, "one call")](), copy=True)
            banded = work()
            notes[(section, case, variant)] = f"bit-identical to one call: {bool(np.array_equal(one, banded))}"
        if section == "index" and variant.startswith("split"):
            from threadpoolctl import threadpool_limits

            with threadpool_limits(limits=1, user_api="blas"):
                d1, i1 = cases[(section, case, "one call, 1 BLAS thread")]()
                d2, i2 = work()
            notes[(section, case, variant)] = (f"ids equal: {bool(np.array_equal(i1, i2))}, "
                                               f"distances equal: {bool(np.array_equal(d1, d2))}")
    report = Report(str(bundle), machine_info(), args.repeats, args.rounds, [])
    by_round: dict = {key: [] for key in cases}
    keys = list(cases)
    for number in range(args.rounds):
        report.loadavg_by_round.append(load_average())
        order = keys[number % len(keys):] + keys[: number % len(keys)]  # rotate who goes first
        for key in order:
            by_round[key].append(median_ms(cases[key], args.repeats, blas_threads(key[2])))
        log(f"round {number + 1}/{args.rounds} done, load {report.loadavg_by_round[-1]}")
    split.close()
    for key in keys:
        values = by_round[key]
        report.timings.append(Timing(*key, float(np.median(values)), float(min(values)),
                                     [round(v, 4) for v in values], notes.get(key, "")))
    write_json(args.out, report)
    lines = ["# Both cores for the single-stream path (benchmarks/bench_core_split.py)", "",
             f"Bundle {bundle}; {args.rounds} rounds x {args.repeats} calls; load average per round "
             f"{report.loadavg_by_round}.", "",
             "| section | case | variant | median of rounds ms | best round ms | note |", "|---|---|---|---|---|---|"]
    for t in report.timings:
        lines.append(f"| {t.section} | {t.case} | {t.variant} | {t.median_ms:.3f} | {t.min_ms:.3f} | {t.note} |")
    write_text_atomic(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
