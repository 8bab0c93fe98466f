"""The trainer's view of data: the real loader (avengers.data.loader) or a stateful dummy stream."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch


class DummyLoader:
    """Consecutive integers mod vocab_size, packed into lines; labels are the next tokens.

    Line k of the global stream starts at token k * seq_length; rank r of W reads lines r, r+W, ...
    The state is the number of lines this rank has read, so resume is exact and resuming on a
    different world size continues from the same global line.
    """

    def __init__(self, batch_size: int, seq_length: int, vocab_size: int, rank: int, world_size: int):
        self.batch_size, self.seq_length, self.vocab_size = batch_size, seq_length, vocab_size
        self.rank, self.world_size = rank, world_size
        self.lines_read = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        offsets = torch.arange(self.seq_length + 1)
        while True:
            ks = (self.lines_read + torch.arange(self.batch_size)) * self.world_size + self.rank
            lines = (ks[:, None] * self.seq_length + offsets) % self.vocab_size
            self.lines_read += self.batch_size
            yield lines[:, :-1].clone(), lines[:, 1:].clone()

    def state_dict(self) -> dict[str, Any]:
        return {"lines_read": self.lines_read, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any] | list[dict[str, Any]]) -> None:
        """This rank's state, or the list of all saved ranks' states (they read in lock-step)."""
        if isinstance(state, list):
            state = state[0]
        self.lines_read = state["lines_read"] * state["world_size"] // self.world_size


def build_loader(cfg, rank: int, world_size: int, vocab_size: int):
    if cfg.use_dummy_dataset:
        return DummyLoader(cfg.batch_size, cfg.seq_length, cfg.vocab_size or vocab_size, rank, world_size)
    try:
        from avengers.data.loader import build_dataloader
    except ModuleNotFoundError as e:
        if e.name != "avengers.data.loader":
            raise
        raise RuntimeError("avengers.data.loader is not installed; use --use_dummy_dataset=True") from None
    return build_dataloader(cfg, rank, world_size, vocab_size=vocab_size)


def validate_data(cfg, world_size: int, vocab_size: int) -> None:
    """The loader's own checks (paths, shard files, token ids) before the model is built."""
    if cfg.use_dummy_dataset:
        return
    try:
        from avengers.data.loader import validate_data_config
    except ModuleNotFoundError as e:
        if e.name != "avengers.data.loader":
            raise
        return
    from avengers.config import ConfigError

    try:
        validate_data_config(cfg, world_size, vocab_size)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from None
