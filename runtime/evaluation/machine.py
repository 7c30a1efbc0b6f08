"""The machine a measurement ran on: CPU model and vector extensions, usable cores, BLAS, package versions,
load average. Every benchmark report carries one, so that figures from different machines are not mixed."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field

import numpy as np

from ..versions import package_versions


@dataclass
class MachineInfo:
    cpu_model: str
    simd: list[str]  # vector extensions that set the peak (avx2, fma, avx512f, ...; asimd on ARM)
    logical_cpus: int
    usable_cpus: int  # this process's affinity (a container's share)
    platform: str
    python: str
    versions: dict[str, str]
    blas: str
    loadavg_start: list[float]  # os.getloadavg() before measuring: other work on the machine
    loadavg_end: list[float] = field(default_factory=list)



def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else platform.processor())."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


#: The /proc/cpuinfo flags that matter for float32 throughput.
SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "asimd", "sve")


def simd_flags() -> list[str]:
    """Vector extensions of this CPU (Linux /proc/cpuinfo ``flags`` or ``Features``), in :data:`SIMD_FLAGS` order."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith(("flags", "features")):
                    present = set(line.split(":", 1)[1].split())
                    return [f for f in SIMD_FLAGS if f in present]
    except OSError:
        pass
    return []


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def blas_description() -> str:
    try:
        config = np.show_config(mode="dicts")
        blas = config["Build Dependencies"]["blas"]
        return f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    except Exception:  # older numpy without mode="dicts"
        return "unknown"


def machine_info() -> MachineInfo:
    return MachineInfo(
        cpu_model=cpu_model(), simd=simd_flags(), logical_cpus=os.cpu_count() or 1, usable_cpus=usable_cpus(),
        platform=platform.platform(), python=platform.python_version(), versions=package_versions(),
        blas=blas_description(), loadavg_start=list(os.getloadavg()),
    )


# --------------------------------------------------------------------------------------------------
