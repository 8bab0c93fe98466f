"""Programmatic dependent launch (PDL) for the decode step's Triton kernels.

A batch-1 decode step is a chain of ~6 short kernels per layer; on Hopper each kernel may be
launched with PDL so that its programs start while the previous kernel drains. Every kernel that
takes `GDC=True` calls `gdc_wait` before it reads anything an earlier kernel wrote, so the chain
stays ordered. Read before the wait: weights, which decode never writes, and in the QKV kernel
the RoPE tables and position, which plain kernels wrote before the step's first block (a QKV
kernel follows either those plain kernels or the previous block's last GEMV, which releases it
only after its own wait, when every kernel before that GEMV has finished). Each kernel calls
`gdc_launch_dependents` once its main reads are issued (the GEMV: after its weight loop); kernels
launched without PDL wait for their predecessor as usual.
"""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def launch_option(name: str) -> bool:
    """This Triton's CUDA backend takes the launch option `name` (never under the CPU interpreter)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return name in CUDAOptions.__dataclass_fields__


@functools.cache
def _supported(device_index: int) -> bool:
    """Hopper or newer, and a Triton that can launch with PDL."""
    return launch_option("launch_pdl") and torch.cuda.get_device_capability(device_index)[0] >= 9


def pdl_kwargs(device: torch.device) -> dict:
    """Launch keywords for a kernel with a `GDC` constexpr: PDL wherever the device and Triton
    support it (it shortens the batch-1 Llama step: experiments/README.md)."""
    on = device.type == "cuda" and _supported(device.index or 0)
    return {"GDC": on, "launch_pdl": on}
