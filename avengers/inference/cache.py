"""One inference-cache interface over the three kinds of decode state.

A model's `allocate_cache(batch_size, max_seq_len, device, dtype)` returns an `InferenceCache`
whose `layers[i]` is that layer's state object: `KVState` for attention (grows with context, in
a preallocated buffer), `MambaState` for Mamba-2 (conv + SSM state, constant), `TelescopingState`
for telescoping attention (C slots, constant). The model's forward with `cache=` consumes tokens,
updates the per-layer states in place and finally calls `cache.advance(T)`.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch


def _tensors(obj: Any, seen: set[int]) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        if id(obj) not in seen:
            seen.add(id(obj))
            yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v, seen)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v, seen)
    elif hasattr(obj, "__dict__"):
        for v in vars(obj).values():
            yield from _tensors(v, seen)


class InferenceCache:
    """Per-layer decode state for a batch of equal-length sequences, plus the shared position."""

    def __init__(self, layers: list[Any], batch_size: int, max_seq_len: int):
        self.layers = layers
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        self.seq_len = 0  # tokens consumed so far; the next token's absolute position

    def advance(self, n_tokens: int) -> None:
        self.seq_len += n_tokens
        if self.seq_len > self.max_seq_len:
            raise ValueError(
                f"cache holds at most max_seq_len={self.max_seq_len} tokens, got {self.seq_len}; "
                "allocate a larger cache"
            )

    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds, measured from the allocated tensors."""
        return sum(t.numel() * t.element_size() for t in _tensors(self.layers, set()))

    def nbytes_per_sequence(self) -> float:
        return self.nbytes() / self.batch_size
