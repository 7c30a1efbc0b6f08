"""``pcedge info``: what a bundle holds, in a readable form."""

from __future__ import annotations

import argparse
import math
import sys

from pcedge.commands.common import q
from pcedge.runtime.backends import cpu_default
from pcedge.runtime.bundle import BundleError, Int8Report, open_bundle

HELP = "show what a bundle holds (model, memory bank, index, threshold, engines, files)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle directory (NAME.pcedge)")
    parser.add_argument("--no-verify", action="store_true", help="skip checksum verification")
    parser.add_argument("--json", action="store_true", help="print the raw manifest")


def _int8_thresholds(model) -> list[str]:
    """One line per shipped INT8 graph with its own threshold (calibrated on its scores), then its FPR estimate."""
    lines = []
    reports: list[tuple[str | None, Int8Report | None]] = [(model.int8_file, model.int8),
                                                           (model.int8_cpu_file, model.int8_cpu)]
    for file, report in reports:
        if file is None or report is None or report.threshold is None:
            continue
        t = report.threshold
        lines += [f"threshold   {t.value:.5f} for FPR {t.target_fpr:g} when {file} runs (its own: {t.method}; scale {t.scale:.5f})",
                  f"            {t.false_alarm_summary()}"]
    return lines


def _cpu_default_line(bundle) -> str:
    """Which graph ONNX Runtime CPU runs without --precision, why, and at which threshold."""
    default = cpu_default(bundle)
    m = bundle.manifest
    if default.graph is None:
        return f"ort-cpu     runs {m.model.file} by default, {default.reason}; threshold {m.threshold.value:.5f}"
    return (f"ort-cpu     runs {default.graph.name} by default, {default.reason}; threshold "
            f"{m.model.int8_cpu.threshold.value:.5f}. TensorRT and ORT CUDA run float32/float16 at "
            f"{m.threshold.value:.5f} unless asked for int8")


def run(args: argparse.Namespace) -> int:
    try:
        bundle = open_bundle(args.bundle, verify=not args.no_verify)
    except BundleError as exc:
        print(f"pcedge info: {exc}", file=sys.stderr)
        return 2
    m = bundle.manifest
    if args.json:
        print(m.to_json(), end="")
        return 0
    g = m.input.geometry
    geometry = {
        "stretch": f"whole frame stretched to {g.width}x{g.height}",
        "letterbox": f"whole frame fitted into {g.width}x{g.height}, aspect kept, padded with {g.pad_value}",
        "crop": f"shorter side resized to {g.resize}, centre crop {g.width}x{g.height} (the frame's edges are not seen)",
    }.get(g.mode, g.mode)
    p = m.model.parity
    mb = m.memory_bank
    t = m.threshold
    lines = [
        f"bundle      {bundle.root}  (format {m.format} v{m.schema_version}, created {m.created})",
        "exporter    " + ", ".join(f"{k} {v}" for k, v in m.exporter.items()),
        f"input       {m.input.name} {m.input.shape} {m.input.dtype} {m.input.colour_order} in {m.input.value_range}; "
        f"{geometry}; normalisation {m.input.normalisation}",
        f"output      {m.output.name} {m.output.shape}: grid {m.output.grid_h}x{m.output.grid_w} (stride {m.output.stride}), D={m.output.dim}",
        f"model       {m.model.backbone} taps {m.model.layers} ({m.model.layer_channels} ch, strides {m.model.layer_strides}); "
        f"{m.model.aggregation} (border: {m.model.border}); projection {m.model.projection_dim or 'none'}; opset {m.model.opset}",
        f"weights     {m.model.weights}",
        f"parity      ONNX Runtime vs torch on {p.n_images} images: max abs {p.max_abs_diff:.2e}, "
        f"max rel {p.max_rel_error:.2e}, min cosine {p.min_cosine:.6f}",
        (f"fp16 graph  {m.model.fp16_file}: vs the float32 graph on {m.model.fp16_parity.n_images} images: max rel "
         f"{m.model.fp16_parity.max_rel_error:.2e}, min cosine {m.model.fp16_parity.min_cosine:.6f}"
         if m.model.fp16_file else "fp16 graph  none (TensorRT 11 FP16 engines need one: re-export)"),
        (f"int8 graph  {m.model.int8_file or 'none'}: {m.model.int8.summary()}" if m.model.int8 is not None
         else "int8 graph  none (exported before INT8 graphs, or with --no-int8)"),
        (f"int8 cpu    {m.model.int8_cpu_file or 'none'}: {m.model.int8_cpu.summary()}" if m.model.int8_cpu is not None
         else "int8 cpu    none (exported before the ONNX Runtime CPU graph, or with --no-int8; ort-cpu runs "
              "the int8 graph)"),
        f"memory bank {mb.n} x {mb.dim} {mb.dtype} = {mb.coreset_ratio:.2%} of {mb.n_features_total} features from "
        f"{mb.n_train_images} images ({mb.coreset} coreset, projection {mb.projection_dim}, seed {mb.seed}, "
        f"{mb.selection_seconds:.1f}s); coverage radius {mb.coverage_radius:.4f}",
        f"index       {m.index.kind} ({m.index.file}): space {m.index.space}, M {m.index.M}, "
        f"ef_construction {m.index.ef_construction}, default ef {m.index.ef}",
        f"scoring     k={m.scoring.k}, Eq. 7 re-weighting {'on' if m.scoring.reweight else 'off'} (b={m.scoring.reweight_b}), "
        f"blur sigma {m.scoring.blur_sigma} at {m.scoring.blur_reference_size}px",
        f"threshold   {t.value:.5f} for FPR {t.target_fpr:g}: {t.method}; source {t.source}; normalised scale {t.scale:.5f}"
        + ("" if math.isfinite(t.value) and t.value > 0 else
           "  (NOT USABLE: not a positive finite number; `pcedge verify` fails this bundle)"),
        f"            {t.false_alarm_summary()}",
        *_int8_thresholds(m.model),
        _cpu_default_line(bundle),
        "detect      " + (m.detectability.summary() + (f"\n            WARNING: {m.detectability.warning}"
                                                      if m.detectability.warning else "")
                             if m.detectability is not None else "not measured (exported without the check)"),
        f"check       {len(m.check.names)} reference images for `pcedge verify`: {', '.join(m.check.names)}",
    ]
    if m.engines:
        for e in m.engines:
            compat = [c for c in (f"hardware-compatible {e.hardware_compat}" if e.hardware_compat not in ("", "none")
                                  else "", "version-compatible" if e.version_compatible else "") if c]
            lines.append(f"engine      {e.file}: {e.precision}, {e.sm}, TensorRT {e.trt_version}, batch "
                         f"{e.min_batch}/{e.opt_batch}/{e.max_batch}, {e.device_name} ({e.device_key or 'device key not recorded'})"
                         f"{', ' + ', '.join(compat) if compat else ''}, built {e.built_at}")
    else:
        lines.append("engines     none (build on the device: pcedge build-engine BUNDLE)")
    lines.append("files       " + ", ".join(f"{k} ({v.size / 1e6:.2f} MB)" for k, v in m.files.items()))
    lines.append("checksums   " + ("not verified (--no-verify)" if args.no_verify else "all verified"))
    print("\n".join(lines))
    print(f"next: pcedge verify {q(bundle.root)}   |   pcedge predict {q(bundle.root)} IMAGES...")
    return 0
