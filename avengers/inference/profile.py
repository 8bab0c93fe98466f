"""Where a decode step's time goes (`python -m avengers.bench --profile`): its kernels, timed by
the torch profiler.

The profiled steps run eagerly, not replayed from a CUDA graph: the profiler sees every kernel of
an eager step, and a kernel takes as long launched from a graph. Set against the graph-replayed
step the bench timed, the kernels' sum says how much of the step the GPU spent computing and how
much it sat between kernels (launch gaps, waits). On the CPU the rows are operators.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from avengers.decode.cache import InferenceCache
from avengers.hardware import synchronize
from avengers.inference.graphs import DecodeStep


@torch.no_grad()
def profile_steps(model: nn.Module, cache: InferenceCache, start: int, steps: int, vocab: int, top: int = 8) -> dict:
    """Profile `steps` eager decode steps from position `start` (one unprofiled step first warms
    compiled code): per step, the time in device kernels (CPU: operators' own time), the launches,
    and the `top` kernels by time with their share of it."""
    device = cache.position.device
    step = DecodeStep(model, cache)
    tokens = torch.randint(0, vocab, (cache.batch_size, 1), device=device)
    cache.set_seq_len(start)
    step(tokens)
    cache.set_seq_len(start)
    synchronize(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step(tokens)
        synchronize(device)
    cache.set_seq_len(start)
    kernels = []
    for e in prof.key_averages():
        if device.type == "cuda":
            if e.device_type != DeviceType.CUDA:
                continue
            us = e.self_device_time_total
        else:
            us = e.self_cpu_time_total
        if us > 0:
            kernels.append({"name": e.key, "ms_per_step": us / 1e3 / steps, "launches_per_step": e.count / steps})
    kernels.sort(key=lambda k: -k["ms_per_step"])
    total = sum(k["ms_per_step"] for k in kernels)
    for k in kernels:
        k["share"] = k["ms_per_step"] / total
    return {
        "kernel_ms_per_step": total,
        "launches_per_step": sum(k["launches_per_step"] for k in kernels),
        "profiled_steps": steps,
        "top_kernels": kernels[:top],
    }
