"""Jetson devices on paper: the published figures an estimate of their latency rests on, each with its source.

Every number here is either printed in an NVIDIA (or Arm) document, or derived from printed numbers by the
arithmetic spelled out in its :attr:`Figure.derivation`. Nothing is measured here and nothing is guessed:
:mod:`pcedge.runtime.evaluation.jetson_estimate` turns these figures into a per-stage estimate, and
``benchmarks/gpu_acceptance.py`` run on the device is what confirms or refutes it.

Why the headline TOPS are not used directly. NVIDIA's headline figures (40 / 67 / 275 "TOPS") are *sparse*
INT8 (2:4 structured sparsity doubles the rate; our graph is dense) and, on AGX Orin, add the two DLAs
(105 of its 275 sparse TOPS). The GPU's dense rates are therefore derived:

- dense INT8 = sparse INT8 / 2: the Orin Nano data sheet prints both ("Up to 40 (Sparse) INT8 TOPs and
  20 (Dense) INT8 TOPs"), so the factor two is NVIDIA's own;
- dense FP16 (tensor cores) = dense INT8 / 2: the AGX Orin data sheet prints "170 INT8 Sparse TOPS or
  85 Sparse FP16 TFLOPS" for the same tensor cores, i.e. FP16 runs at half the INT8 rate;
- FP32 (CUDA cores) = CUDA cores x 2 FLOPs per fused multiply-add x GPU clock: this reproduces the AGX Orin
  data sheet's printed "5.32 FP32 TFLOPS" (2048 x 2 x 1.3 GHz) and is applied to the Orin Nano, whose data
  sheet prints cores and clock but no FLOP rate;
- "Super" rates scale the printed sparse 67 TOPS the same way; 67 TOPS is the GPU at 1020 MHz (the
  MAXN_SUPER power mode): 32 tensor cores x 1.02 GHz x 2048 sparse INT8 ops per core per clock = 66.8 T.

CPU: Cortex-A78AE cores issue NEON (128-bit, 4 float32 lanes) fused multiply-adds on two pipelines
(Arm's Cortex-A78 Software Optimization Guide: FP multiply-accumulate throughput 2 per cycle on the V
pipelines), so one core peaks at 2 x 4 x 2 = 16 float32 FLOPs per cycle.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

ORIN_NANO_DATASHEET = ("NVIDIA Jetson Orin Nano Series Data Sheet, DS-11105-001 v1.1 (April 2023), NVIDIA; "
                       "copy at https://connecttech.com/ftp/pdf/nvidia_jetson_orin_datasheet.pdf")
AGX_ORIN_DATASHEET = ("NVIDIA Jetson AGX Orin Series Data Sheet, DS-10662-001 (v1.6), NVIDIA; "
                      "copy at https://static.generation-robots.com/media/Jetson-AGX-Orin-Data-Sheet.pdf")
ORIN_NANO_SUPER_GUIDE = ("Jetson Orin Nano Developer Kit User Guide, Introduction (NVIDIA), "
                         "https://docs.nvidia.com/jetson/orin-nano-devkit/user-guide/latest/index.html")
JETSON_POWER_MODES = ("Jetson Linux Developer Guide, Platform Power and Performance: Jetson Orin Nano 8GB Super "
                      "power modes (NVIDIA), https://docs.nvidia.com/jetson/archives/r36.4.4/DeveloperGuide/SD/"
                      "PlatformPowerAndPerformance/JetsonOrinNanoSeriesJetsonOrinNxSeriesAndJetsonAgxOrinSeries.html")
A78_OPTIMIZATION_GUIDE = ("Arm Cortex-A78 Core Software Optimization Guide (Arm, PJDOC-466751330-9691), "
                          "https://documentation-service.arm.com/static/60a5413bd63d3c31550c391e/")

#: float32 FLOPs per cycle of one Cortex-A78AE core: 2 NEON pipelines x 4 lanes x 2 (multiply + add).
A78_FP32_FLOPS_PER_CYCLE = 16


@dataclass(frozen=True)
class Figure:
    """One published (or derived-from-published) quantity."""

    value: float
    unit: str
    source: str  # document title and URL
    quote: str  # the words printed in the source that the value rests on
    derivation: str = ""  # empty: the value is printed as is; else the arithmetic from the quoted figures

    @property
    def published(self) -> bool:
        return not self.derivation


@dataclass(frozen=True)
class TargetDevice:
    """A Jetson module in one power mode, by its published figures (rates per second, bandwidth in bytes/s)."""

    key: str  # the --target value
    name: str
    mode: str  # the power mode the figures belong to
    gpu_fp16_dense: Figure  # FLOP/s, tensor cores, dense
    gpu_int8_dense: Figure  # op/s, tensor cores, dense
    gpu_fp32: Figure  # FLOP/s, CUDA cores
    memory_bandwidth: Figure  # bytes/s, theoretical peak (LPDDR5, shared by CPU and GPU)
    cpu_cores: Figure
    cpu_clock: Figure  # Hz
    cpu_fp32_flops_per_cycle: Figure  # one core, NEON

    @property
    def cpu_core_flops(self) -> float:
        """Peak float32 FLOP/s of one CPU core (the detector's exact index runs on one BLAS thread)."""
        return self.cpu_clock.value * self.cpu_fp32_flops_per_cycle.value

    def figures(self) -> dict[str, Figure]:
        """Every figure by field name (for printing and for the test that each one has a source)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), Figure)}


def _a78_flops() -> Figure:
    return Figure(A78_FP32_FLOPS_PER_CYCLE, "FLOP/cycle", A78_OPTIMIZATION_GUIDE,
                  "FP multiply accumulate | FMADD, FMSUB, FNMADD, FNMSUB | Execution Latency 4 (2) | Throughput 2 "
                  "| Pipeline V",
                  "2 FMA pipelines (V0, V1) x 4 float32 lanes per 128-bit NEON register x 2 FLOPs per fused "
                  "multiply-add; assumes NEON FMLA issues like the scalar FMA quoted (both on the V pipelines)")


ORIN_NANO = TargetDevice(
    key="orin-nano",
    name="Jetson Orin Nano 8GB",
    mode="original data-sheet figures (15 W mode: GPU 625 MHz, CPU 1.5 GHz, LPDDR5 2133 MHz); "
         "see orin-nano-super for the JetPack 6.1+ MAXN_SUPER mode",
    gpu_int8_dense=Figure(20e12, "op/s", ORIN_NANO_DATASHEET,
                          "Jetson Orin Nano 8GB: Up to 40 (Sparse) INT8 TOPs and 20 (Dense) INT8 TOPs"),
    # (GPU only: the Orin Nano has no DLA, so the printed dense figure is the GPU's)
    gpu_fp16_dense=Figure(10e12, "FLOP/s", f"{ORIN_NANO_DATASHEET}; ratio from {AGX_ORIN_DATASHEET}",
                          "20 (Dense) INT8 TOPs; AGX Orin: Up to 170 INT8 Sparse TOPS or 85 Sparse FP16 TFLOPS "
                          "(Tensor Cores)",
                          "20 dense INT8 TOPS / 2: the same Ampere tensor cores run FP16 at half the INT8 rate"),
    gpu_fp32=Figure(1024 * 2 * 625e6, "FLOP/s", ORIN_NANO_DATASHEET,
                    "Jetson Orin Nano 8GB: 1024 NVIDIA CUDA cores | 32 Tensor cores; Maximum Operating "
                    "Frequency: 625 MHz",
                    "1024 CUDA cores x 2 FLOPs (FMA) x 625 MHz = 1.28 TFLOPS; the same formula gives the AGX "
                    "Orin data sheet's printed 5.32 TFLOPS (2048 x 2 x 1.3 GHz)"),
    memory_bandwidth=Figure(68e9, "B/s", ORIN_NANO_DATASHEET,
                            "The theoretical peak memory bandwidth on Orin Nano 8GB is 68 GB/s"),
    cpu_cores=Figure(6, "cores", ORIN_NANO_DATASHEET, "Six-core (ON 8GB and ON 4GB) Cortex A78AE"),
    cpu_clock=Figure(1.5e9, "Hz", ORIN_NANO_DATASHEET, "Table 2: CPU Operation | Orin Nano 8GB | 6 | 1.5 GHz"),
    cpu_fp32_flops_per_cycle=_a78_flops(),
)

ORIN_NANO_SUPER = TargetDevice(
    key="orin-nano-super",
    name="Jetson Orin Nano 8GB (Super)",
    mode="MAXN_SUPER power mode (JetPack 6.1+: GPU 1020 MHz, CPU 1728 MHz, LPDDR5 3199 MHz); the default "
         "25 W mode of a Super developer kit runs the GPU at 918 MHz, about 10 % slower than estimated here",
    gpu_int8_dense=Figure(33.5e12, "op/s", ORIN_NANO_SUPER_GUIDE,
                          "Jetson Orin Nano delivers up to 67 INT8 TOPS of AI performance",
                          "67 sparse TOPS (the same sparse convention as the original's 40) / 2 for dense"),
    gpu_fp16_dense=Figure(16.75e12, "FLOP/s", f"{ORIN_NANO_SUPER_GUIDE}; ratio from {AGX_ORIN_DATASHEET}",
                          "up to 67 INT8 TOPS; AGX Orin: Up to 170 INT8 Sparse TOPS or 85 Sparse FP16 TFLOPS",
                          "33.5 dense INT8 TOPS / 2 (FP16 tensor rate is half the INT8 rate)"),
    gpu_fp32=Figure(1024 * 2 * 1020e6, "FLOP/s", f"{ORIN_NANO_DATASHEET}; clock from {JETSON_POWER_MODES}",
                    "1024 NVIDIA CUDA cores; MAXN_SUPER: GPU maximum frequency 1020 MHz",
                    "1024 CUDA cores x 2 FLOPs (FMA) x 1020 MHz = 2.09 TFLOPS"),
    memory_bandwidth=Figure(102e9, "B/s", ORIN_NANO_SUPER_GUIDE,
                            "Memory bandwidth: up to 102 GB/s with the latest software stack"),
    cpu_cores=Figure(6, "cores", ORIN_NANO_DATASHEET, "Six-core (ON 8GB and ON 4GB) Cortex A78AE"),
    cpu_clock=Figure(1.728e9, "Hz", JETSON_POWER_MODES, "MAXN_SUPER: CPU maximum frequency 1728 MHz"),
    cpu_fp32_flops_per_cycle=_a78_flops(),
)

AGX_ORIN = TargetDevice(
    key="agx-orin",
    name="Jetson AGX Orin 64GB",
    mode="MAXN (GPU 1.3 GHz, CPU 2.2 GHz, LPDDR5 3200 MHz); the two DLAs are not counted",
    gpu_int8_dense=Figure(85e12, "op/s", AGX_ORIN_DATASHEET,
                          "JAO 64GB: Ampere GPU two GPC | eight TPC | Up to 170 INT8 Sparse TOPS or 85 Sparse "
                          "FP16 TFLOPS (Tensor Cores)",
                          "170 sparse INT8 TOPS of the GPU (the headline 275 adds the two DLAs' 105) / 2 for dense"),
    gpu_fp16_dense=Figure(42.5e12, "FLOP/s", AGX_ORIN_DATASHEET,
                          "Up to 170 INT8 Sparse TOPS or 85 Sparse FP16 TFLOPS (Tensor Cores)",
                          "85 sparse FP16 TFLOPS / 2 for dense"),
    gpu_fp32=Figure(5.32e12, "FLOP/s", AGX_ORIN_DATASHEET, "Up to 5.32 FP32 TFLOPS or 10.649 FP16 TFLOPS (CUDA cores)"),
    memory_bandwidth=Figure(204.8e9, "B/s", AGX_ORIN_DATASHEET,
                            "Memory Type 256-bit LPDDR5 | Maximum Memory Bus Bandwidth (up to) 204.8 GB/s"),
    cpu_cores=Figure(12, "cores", AGX_ORIN_DATASHEET, "JAO 64GB: 12x cores | three CPU clusters (four cores/cluster)"),
    cpu_clock=Figure(2.2e9, "Hz", AGX_ORIN_DATASHEET, "JAO 64GB: ... Maximum Operating Frequency: 2.2 GHz"),
    cpu_fp32_flops_per_cycle=_a78_flops(),
)

#: Every target by its ``--target`` name.
TARGETS: dict[str, TargetDevice] = {t.key: t for t in (ORIN_NANO, ORIN_NANO_SUPER, AGX_ORIN)}


class UnknownTarget(ValueError):
    """A ``--target`` name that is not in :data:`TARGETS`; the message lists the choices."""


def parse_targets(text: str) -> tuple[TargetDevice, ...]:
    """``"orin-nano,agx-orin"`` -> the devices, in order, each once; raises :class:`UnknownTarget`."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in TARGETS]
    if bad or not names:
        raise UnknownTarget(f"unknown target {', '.join(map(repr, bad)) or repr(text)}: choose one or more of "
                            f"{', '.join(TARGETS)} (comma list or repeated --target)")
    return tuple(TARGETS[n] for n in dict.fromkeys(names))


__all__ = ["A78_FP32_FLOPS_PER_CYCLE", "AGX_ORIN", "Figure", "ORIN_NANO", "ORIN_NANO_SUPER", "TARGETS", "TargetDevice",
           "UnknownTarget", "parse_targets"]
