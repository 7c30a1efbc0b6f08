"""How much memory an export will need, estimated before any image is read (``--size 8000`` once ran a
workstation out of 23.6 GB and was killed by the kernel; now it is refused with the estimate and the flag
to change).

Three things dominate, at different times:

- the **memory bank** ``[N_img * h * w, D]`` float32, built from per-batch chunks and concatenated once, so
  twice its size at the concatenation; the greedy coreset (§3.2) then adds its projected copy
  ``[N, d_proj]`` and two distance vectors ``[N]``;
- the **backbone's activations** for one batch while the bank is built. Measured, not guessed: the same
  backbone (random weights, nothing downloaded) runs once on a small input with a hook on every layer,
  and the largest layer output is scaled by the input area and the batch. A layer's input, its output
  and the block's residual branch are alive together, hence three of the largest;
- the batch's **decoded images and network input** (float32);
- later, the **held-out images** (all of them, fitted, float32) while the threshold is calibrated, the
  parity check's batch of up to 8 images through torch, and a measured allowance for the ONNX export and
  the ONNX Runtime session (:data:`EXPORT_OVERHEAD_BYTES`).

``benchmarks/bench_export_memory.py`` compares the estimate with the peak a real export reaches.

The estimate is compared with the memory available to this process: ``MemAvailable`` of /proc/meminfo,
capped by a cgroup (container) limit and by ``ulimit -v`` when there is one.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

#: Side of the small input the backbone is measured on (a multiple of 32: every stage divides it evenly).
PROBE_SIDE = 64
#: Live copies of the largest activation (a layer's input, its output, a residual branch).
LIVE_ACTIVATIONS = 3
_F32 = 4


@dataclass
class MemoryEstimate:
    """Bytes an export needs at its peak, by part, and what this machine has."""

    n_features: int  # N = training images x h x w patch features
    dim: int  # D
    bank_bytes: int  # [N, D] float32
    bank_peak_bytes: int  # the larger of: two copies at the concatenation; one plus the coreset's working set
    activation_bytes: int  # backbone activations for one batch
    input_bytes: int  # one batch of decoded images and its network input
    threshold_bytes: int  # held-out images kept in memory + the parity batch's activations
    available_bytes: int | None  # None: unknown on this platform

    @property
    def total_bytes(self) -> int:
        # The phases follow each other: building the bank (one copy, growing; a batch in flight), assembling
        # and selecting it, then exporting the graphs and calibrating. The bank's features are still held
        # while the graphs are exported: the out-of-fold scores need them and every graph (INT8 too).
        return max(self.bank_peak_bytes, self.bank_bytes + self.activation_bytes + self.input_bytes,
                   self.bank_bytes + self.threshold_bytes)

    @property
    def fits(self) -> bool:
        return self.available_bytes is None or self.total_bytes <= self.available_bytes


def available_memory() -> int | None:
    """Bytes this process can still allocate: MemAvailable, capped by a cgroup v2/v1 limit and by ``ulimit -v``;
    None if unknown."""
    values = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                values.append(int(line.split()[1]) * 1024)
                break
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit_text = Path(limit_file).read_text().strip()
            if limit_text == "max":
                continue
            limit, usage = int(limit_text), int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit < 1 << 60:  # cgroup v1 reports "no limit" as a huge number
            values.append(max(limit - usage, 0))
    try:  # ulimit -v: the address space this process may still grow by
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            status = Path("/proc/self/status").read_text()
            vm_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmSize:"))
            values.append(max(soft - vm_kb * 1024, 0))
    except (ImportError, OSError, ValueError, StopIteration):
        pass
    if not values and hasattr(os, "sysconf"):
        try:
            values.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError):
            pass
    return min(values) if values else None


@torch.inference_mode()
def largest_activation_per_pixel(backbone_name: str) -> float:
    """Bytes of the backbone's largest layer output per input pixel and image, measured on a
    ``PROBE_SIDE`` square input with random weights (the architecture, not the weights, sets the sizes)."""
    from .backbones import build_backbone

    probe = build_backbone(backbone_name, random_weights=True, input_hw=(PROBE_SIDE, PROBE_SIDE))
    largest = [0]

    def hook(_module, _inputs, output):
        tensors = output if isinstance(output, (list, tuple)) else [output]
        for t in tensors:
            if isinstance(t, torch.Tensor):
                largest[0] = max(largest[0], t.numel() * t.element_size())

    handles = [m.register_forward_hook(hook) for m in probe.modules() if not list(m.children())]
    try:
        probe(torch.zeros(1, 3, PROBE_SIDE, PROBE_SIDE))
    finally:
        for handle in handles:
            handle.remove()
    return largest[0] / (PROBE_SIDE * PROBE_SIDE)


#: Images in the ONNX-versus-torch parity batch (the exporter's n_check + 4 training images).
PARITY_IMAGES = 8
#: What the calibration phase holds besides images and activations: torch's ONNX exporter, the ONNX Runtime
#: session, the HNSW index. Measured, not modelled: export peak minus the modelled parts was 389 MB at 224 px
#: and 441 MB at 448 px for EfficientNet-Lite0 (benchmarks/bench_export_memory.py, results/export_memory.json).
EXPORT_OVERHEAD_BYTES = 400 * 10**6


def estimate_export_memory(n_images: int, grid_hw: tuple[int, int], dim: int, input_hw: tuple[int, int],
                           batch_size: int, backbone_name: str, coreset_projection_dim: int,
                           n_val: int = 0) -> MemoryEstimate:
    """The :class:`MemoryEstimate` of fitting ``n_images`` (and holding out ``n_val``) at ``input_hw``
    (network grid ``grid_hw``, ``D = dim``)."""
    h, w = grid_hw
    H, W = input_hw
    n = n_images * h * w
    bank = n * dim * _F32
    coreset = n * (min(coreset_projection_dim, dim) + 2) * _F32
    batch = min(batch_size, n_images)
    per_image = LIVE_ACTIVATIONS * largest_activation_per_pixel(backbone_name) * H * W
    activations = int(math.ceil(per_image * batch))
    image = 3 * H * W * _F32  # one fitted float32 image
    inputs = 2 * batch * image  # the fitted images and the stacked [B, 3, H, W] tensor
    threshold = (n_val * image + int(math.ceil(per_image * PARITY_IMAGES)) + 2 * PARITY_IMAGES * image
                 + EXPORT_OVERHEAD_BYTES)
    return MemoryEstimate(
        n_features=n, dim=dim, bank_bytes=bank, bank_peak_bytes=max(2 * bank, bank + coreset),
        activation_bytes=activations, input_bytes=inputs, threshold_bytes=threshold,
        available_bytes=available_memory(),
    )


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def describe_refusal(e: MemoryEstimate, n_images: int, batch_size: int, input_hw: tuple[int, int]) -> str:
    """One line: the estimate, its parts, what is available, and which flags lower it."""
    H, W = input_hw
    return (
        f"this export needs about {_gb(e.total_bytes)} of memory but {_gb(e.available_bytes or 0)} is available: "
        f"memory bank {n_images} images x {e.n_features // max(n_images, 1)} patches x D={e.dim} x 4 B = "
        f"{_gb(e.bank_bytes)} (twice while it is assembled), backbone activations for --batch {batch_size} "
        f"at {W}x{H} = {_gb(e.activation_bytes)}, held-out images and parity check = {_gb(e.threshold_bytes)}; "
        f"lower --size (patches grow with its square), --batch, or --dim, or train on fewer images"
    )
