"""Learning-rate multipliers: fms-fsdp's warmup + cosine and annealing, shifted so step 1 has LR > 0.

Optimizer steps are counted from s = 1 (the first update) to s = N = num_steps. With w warm-up steps:

    initial / cosine : m(s) = min(1 - (1 - s/w)^2 if s < w else 1,  r + (1 - r)/2 * (1 + cos(pi * s / N)))
    constant         : m(s) = min(1 - (1 - s/w)^2 if s < w else 1,  1)
    annealing        : m(s) = 1 - (s - 1) / N                  (linear from 1 at s=1 to 1/N at s=N)

w defaults to fms-fsdp's min(2000, N/20) and r (min_lr_ratio) to 0.1. fms-fsdp evaluates the same
curves at s - 1, so its first update runs at LR 0; evaluating at s makes it (1 - (1 - 1/w)^2) * lr.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def default_warmup(num_steps: int) -> float:
    return min(2000.0, num_steps / 20)


def lr_multiplier(
    step: int, num_steps: int, stage: str = "initial", warmup_steps: float | None = None, min_lr_ratio: float = 0.1
) -> float:
    """Multiplier of the peak LR for the 1-based optimizer step `step`."""
    if stage == "annealing":
        return 1.0 - (step - 1) / num_steps
    w = default_warmup(num_steps) if warmup_steps is None else float(warmup_steps)
    warm = 1.0 - (1.0 - step / w) ** 2 if 0 < w and step < w else 1.0
    if stage == "constant":
        return warm
    if stage not in ("initial", "cosine"):
        raise ValueError(f"training_stage={stage!r}: expected initial, cosine, annealing or constant")
    cos = min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * step / num_steps))
    return min(warm, cos)


def build_scheduler(
    optimizer: torch.optim.Optimizer, num_steps: int, stage: str, warmup_steps: int | None, min_lr_ratio: float
) -> LambdaLR:
    """LambdaLR whose `last_epoch` counts completed optimizer steps; call .step() after each update."""
    return LambdaLR(optimizer, lambda done: lr_multiplier(done + 1, num_steps, stage, warmup_steps, min_lr_ratio))
