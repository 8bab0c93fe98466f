"""A grid-wide barrier for persistent kernels (the Gluon decode step, gluon_chain.py).

Every program adds one to a zeroed int32 counter Count[0] (a release) when it has stored its part
of a phase (`grid_arrive`) and, before it reads another program's output, polls the counter with
acquire reads until it reaches `phase * number of programs` (`grid_wait`; Count[1] is set if a
wait gave up). A barrier costs about a microsecond. Correct only if all
programs of the grid are resident at once: never with programmatic dependent launch, and as a
cooperative launch where Triton offers it (the driver then refuses a grid that cannot be resident
instead of letting it hang). Under Triton's CPU interpreter programs run one after another, so
only a grid of one program works.
"""

import torch
import triton
import triton.language as tl

from avengers.decode.kernels.triton_pdl import launch_option


def cooperative_kwargs(device: torch.device) -> dict:
    """Launch keywords for a kernel that uses these barriers."""
    return (
        {"launch_cooperative_grid": True} if device.type == "cuda" and launch_option("launch_cooperative_grid") else {}
    )


@triton.jit
def grid_arrive(Count):
    tl.debug_barrier()  # every thread's stores are issued before the release
    tl.atomic_add(Count, 1, sem="release")


MAX_SPINS = tl.constexpr(1 << 22)  # polls (a few seconds) before a barrier gives up instead of hanging the GPU


@triton.jit
def grid_wait(Count, target):
    """Wait for the counter Count[0] to reach target. A program that polls MAX_SPINS times without
    seeing it (a grid that is not all resident) sets Count[1] and goes on: its kernel's output is
    then wrong, which the callers' checks catch, instead of the GPU hanging."""
    spins = 0
    # each poll is an acquire: the reads after the loop see the other programs' stores
    while (tl.atomic_add(Count, 0, sem="acquire") < target) & (spins < MAX_SPINS):
        spins += 1
    if spins == MAX_SPINS:
        tl.atomic_xchg(Count + 1, 1)
    tl.debug_barrier()
