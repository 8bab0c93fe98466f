"""A grid-wide barrier for persistent Triton kernels (triton_block.py).

Every program adds one to a zeroed int32 counter when it has stored its part of a phase
(`grid_arrive`) and, before it reads another program's output, spins until the counter reaches
`phase * number of programs` (`grid_wait`). Correct only if all programs of the grid are resident
at once: launch at most one program per SM, never with programmatic dependent launch, and as a
cooperative launch where Triton offers it (the driver then refuses a grid that cannot be resident
instead of letting it hang). Under Triton's CPU interpreter programs run one after another, so
only a grid of one program works.
"""

import functools
import os

import torch
import triton
import triton.language as tl


@functools.cache
def _cooperative_supported() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "launch_cooperative_grid" in CUDAOptions.__dataclass_fields__


def cooperative_kwargs(device: torch.device) -> dict:
    """Launch keywords for a kernel that uses these barriers."""
    on = device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1" and _cooperative_supported()
    return {"launch_cooperative_grid": True} if on else {}


@triton.jit
def grid_arrive(Count):
    tl.debug_barrier()  # every thread's stores are issued before the release
    tl.atomic_add(Count, 1, sem="release")


@triton.jit
def grid_wait(Count, target):
    while tl.load(Count, volatile=True) < target:
        pass
    tl.atomic_add(Count, 0, sem="acquire")  # order the reads below after the other programs' stores
    tl.debug_barrier()
