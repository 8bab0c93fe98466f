"""Evaluation on the held-out documents during training (`--eval_interval`, `--eval_steps`, `--eval_fraction`).

Every evaluation reads the same lines: the first eval_steps x batch_size x world_size packed lines
of the eval split (avengers/data/eval_split.py), line i going to rank i mod world_size. They are read
once, when training starts. Ranks that get fewer lines (a small split) run padding lines, whose
labels are all ignored, so every rank does the same number of forward passes under FSDP. The
reported eval_loss is the mean over every scored token of every rank.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from avengers.config import ConfigError, TrainConfig

log = logging.getLogger(__name__)


class Validator:
    """`validator.evaluate(model)` -> {"eval_loss", "eval_tokens", "eval_time_s"} over the fixed eval batches."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device):
        self.batches = batches
        self.device = device

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        start = time.perf_counter()
        was_training = model.training
        model.eval()
        totals = torch.zeros(2, device=self.device, dtype=torch.float64)  # loss sum, tokens
        for inputs, labels in self.batches:
            labels = labels.to(self.device)
            tokens = (labels != -100).sum()
            mean = model(inputs.to(self.device), labels=labels)  # the training loss path: no full logits
            totals += torch.stack([mean.double() * tokens, tokens.double()])
        if dist.is_initialized():
            dist.all_reduce(totals)
        model.train(was_training)
        loss_sum, tokens = totals.tolist()
        return {"eval_loss": loss_sum / tokens, "eval_tokens": int(tokens), "eval_time_s": time.perf_counter() - start}


def eval_batches(cfg: TrainConfig, rank: int, world_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's eval_steps batches of (inputs, labels), identical at every evaluation."""
    from avengers.data.eval_split import PAD, eval_lines
    from avengers.data.index import make_plan

    per_rank = cfg.eval_steps * cfg.batch_size
    wanted = per_rank * world_size
    lines = eval_lines(make_plan(cfg), wanted)
    if not lines:
        raise ConfigError(
            f"eval_fraction={cfg.eval_fraction} holds out no document of datasets={cfg.datasets!r} under "
            f"data_path={cfg.data_path!r}; use a larger eval_fraction (or eval_interval=0)"
        )
    if len(lines) < wanted:
        log.warning(
            "the eval split holds %d lines of seq_length %d, fewer than eval_steps x batch_size x world = %d; "
            "each evaluation reads all of them",
            len(lines),
            cfg.seq_length,
            wanted,
        )
    mine = lines[rank::world_size]
    mine += [np.full(cfg.seq_length + 1, PAD, dtype=np.int64)] * (per_rank - len(mine))
    batches = []
    for i in range(0, per_rank, cfg.batch_size):
        t = torch.from_numpy(np.stack(mine[i : i + cfg.batch_size]))
        inputs, labels = t[:, :-1].clamp(min=0), t[:, 1:].clone()
        labels[labels == PAD] = -100
        batches.append((inputs, labels))
    return batches


def build_validator(cfg: TrainConfig, rank: int, world_size: int, device: torch.device) -> Validator | None:
    """None unless eval_interval > 0; reads the eval lines now, before any training step."""
    if not cfg.eval_interval:
        return None
    return Validator(eval_batches(cfg, rank, world_size), device)
