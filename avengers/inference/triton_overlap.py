"""How the decode step's Triton kernels overlap across kernel boundaries: PDL and an L2 prefetch.

A batch-1 decode step is a chain of ~6 short kernels per layer, and between two of them the
weight stream stops. Programmatic dependent launch (PDL, Hopper+): each kernel may be launched so
that its programs start while the previous kernel drains. Every kernel that takes `GDC=True` calls
`gdc_wait` before it reads anything an earlier kernel wrote (only weights, which decode never
writes, may be read before the wait), so the chain stays ordered, and `gdc_launch_dependents` once
its main reads are issued (the GEMV: after its weight loop); kernels launched without PDL wait for
their predecessor as usual. L2 prefetch (triton_gemv.py, sm_90+): each GEMV asks the L2 for the
first MiB of the next kernel's weights once its own are read.
"""

from __future__ import annotations

import functools
import os

import torch

_state = {"on": True, "prefetch_bytes": 0}  # 10% faster Llama decode step on the H200 at batch 1 (docs/benchmarks.md)


def set_pdl(enabled: bool) -> None:
    """Launch the decode kernels with PDL where supported (default on)."""
    _state["on"] = bool(enabled)


@functools.cache
def _supported(device_index: int) -> bool:
    """Hopper or newer, and a Triton that can launch with PDL (never the CPU interpreter)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "launch_pdl" in CUDAOptions.__dataclass_fields__ and torch.cuda.get_device_capability(device_index)[0] >= 9


def set_l2_prefetch(mib: float) -> None:
    """MiB of the next kernel's weights each decode GEMV asks the L2 to prefetch (default 0: none)."""
    if mib < 0:
        raise ValueError(f"L2 prefetch size must be >= 0 MiB, got {mib}")
    _state["prefetch_bytes"] = int(mib * 2**20)


def l2_prefetch_bytes(device: torch.device) -> int:
    """The prefetch budget where the device can take the hint (sm_90+, not the interpreter), else 0."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return 0
    return _state["prefetch_bytes"] if torch.cuda.get_device_capability(device)[0] >= 9 else 0


def pdl_kwargs(device: torch.device) -> dict:
    """Launch keywords for a kernel with a `GDC` constexpr: PDL on or off for this device."""
    on = _state["on"] and device.type == "cuda" and _supported(device.index or 0)
    return {"GDC": on, "launch_pdl": on}
