"""Per-step loss and gradient-norm bookkeeping on the device, with the NaN/inf policy of the trainer.

A step is *non-finite* when its global gradient norm is NaN or inf. The norm is reduced over every
rank, so all ranks agree without any extra communication. Such a step is skipped: its AdamW update
is masked inside the fused kernel through `found_inf`, the input torch's GradScaler uses, so the
weights and the Adam moments keep their finite values and no host sync is needed. The step still
consumes its batch and still advances the LR schedule.

The host reads the counters only where the trainer already syncs: at each report, and before each
checkpoint save. More than `skip_nonfinite_steps` consecutive non-finite steps stop the run with
NonFiniteError. So does a non-finite mean loss on any rank. By default (0) the first non-finite step
stops the run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist


class NonFiniteError(RuntimeError):
    """The run stopped because losses or gradient norms stopped being finite numbers."""


@dataclass(frozen=True)
class Window:
    """Means over one report window's finite steps (None if it had none) and the non-finite count."""

    loss: float | None
    grad_norm: float | None
    skipped_steps: int


class StepStats:
    """Sums over a report window plus the run of consecutive non-finite steps; all device tensors."""

    def __init__(self, device: torch.device, skip_nonfinite_steps: int):
        self.patience = skip_nonfinite_steps
        self.step_loss = torch.zeros((), device=device)
        self.window = torch.zeros(4, device=device)  # finite steps' loss and grad-norm sums; finite, non-finite steps
        self.streak = torch.zeros((), device=device)  # consecutive non-finite steps up to now
        self.streak_start = torch.zeros((), device=device)  # its first step
        self.longest = torch.zeros((), device=device)  # the longest streak since the last check
        self.longest_start = torch.zeros((), device=device)

    def add_loss(self, loss: torch.Tensor) -> None:
        self.step_loss += loss.detach()

    def end_step(self, grad_norm: torch.Tensor, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Account for optimizer step `step`; call after the gradient norm, before optimizer.step()."""
        bad = ~torch.isfinite(grad_norm)
        optimizer.found_inf = bad.float()  # read by the fused AdamW kernel: skip every update if 1
        good = (~bad).float()
        sums = torch.where(bad, 0.0, torch.stack([self.step_loss, grad_norm.float()]))
        self.window += torch.cat([sums, torch.stack([good, 1 - good])])
        self.streak_start.masked_fill_(bad & (self.streak == 0), step)
        self.streak.add_(1).mul_(bad)
        longer = self.streak > self.longest
        self.longest.copy_(torch.where(longer, self.streak, self.longest))
        self.longest_start.copy_(torch.where(longer, self.streak_start, self.longest_start))
        self.step_loss.zero_()

    def check(self) -> None:
        """Stop if too many consecutive steps were non-finite (one host read; identical on every rank)."""
        longest, start = torch.stack([self.longest, self.longest_start]).tolist()
        self._check_streak(round(longest), round(start))

    def report(self, step: int, world_size: int) -> Window:
        """Average the window over ranks (one all-reduce, one host read), check it, start a new window."""
        stats = torch.cat([self.window, torch.stack([self.longest, self.longest_start])])
        dist.all_reduce(stats)
        loss_sum, gnorm_sum, good, bad, longest, start = (stats / world_size).tolist()
        self.window.zero_()
        self._check_streak(round(longest), round(start))
        if not math.isfinite(loss_sum):
            raise NonFiniteError(
                f"step {step}: the loss is {loss_sum} on at least one rank while the gradient norm is finite; "
                f"stopping before anything non-finite is saved (check the data and the model's numerics)"
            )
        good = round(good)
        return Window(loss_sum / good if good else None, gnorm_sum / good if good else None, round(bad))

    def _check_streak(self, longest: int, start: int) -> None:
        if longest > self.patience:
            allowed = "" if self.patience == 0 else f" (skip_nonfinite_steps={self.patience} allows {self.patience})"
            steps = f"step {start}" if longest == 1 else f"steps {start}-{start + longest - 1}"
            raise NonFiniteError(
                f"{steps}: non-finite gradient norm (NaN/inf), {longest} step(s) in a row{allowed}. Their updates "
                f"were skipped, so the weights stayed finite and no non-finite checkpoint was saved. Lower "
                f"learning_rate or raise warmup_steps, check the data, or set --skip_nonfinite_steps=N to skip up "
                f"to N consecutive non-finite steps"
            )
        self.longest.copy_(self.streak)
        self.longest_start.copy_(self.streak_start)
