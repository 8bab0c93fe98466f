"""One inference-cache interface over the three kinds of decode state.

A model's `allocate_cache(batch_size, max_seq_len, device, dtype)` returns an `InferenceCache`
whose `layers[i]` is that layer's state object: `KVState` for attention (grows with context, in
a preallocated buffer), `MambaState` for Mamba-2 (conv + SSM state, constant), `TelescopingState`
for telescoping attention (C slots, constant). The model's forward with `cache=` consumes tokens,
updates the per-layer states in place and finally calls `cache.advance(T)`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

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
        # Device copy of seq_len: a CUDA-graph-captured decode step must read its position from
        # memory, because Python ints are frozen into the graph at capture time.
        first = next(_tensors(layers, set()), None)
        self.position = torch.zeros((), dtype=torch.long, device=first.device if first is not None else None)

    def advance(self, n_tokens: int, on_device: bool = True) -> None:
        """n_tokens more are cached; on_device=False: a kernel has already advanced `position`."""
        self.seq_len += n_tokens
        if on_device:
            self.position += n_tokens
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

    def set_seq_len(self, seq_len: int) -> None:
        """Move the position (host and device copies); the states themselves are left as they are."""
        if not 0 <= seq_len <= self.max_seq_len:
            raise ValueError(f"seq_len must be in [0, max_seq_len={self.max_seq_len}], got {seq_len}")
        self.seq_len = seq_len
        self.position.fill_(seq_len)

    def broadcast_from(self, src: InferenceCache) -> None:
        """Copy a batch-1 cache's state into every row of this cache (same model, same max_seq_len).

        Used by the benchmark to give a large batch a real prefilled state without prefilling
        every row. Tensors are matched in traversal order; leading dim is the batch.
        """
        if src.batch_size != 1:
            raise ValueError(f"broadcast_from needs a batch-1 source cache, got batch_size={src.batch_size}")
        _broadcast(src.layers, self.layers, "layers")
        self.set_seq_len(src.seq_len)


def _broadcast(src: Any, dst: Any, where: str) -> None:
    if isinstance(src, torch.Tensor):
        ok = isinstance(dst, torch.Tensor) and (
            src.shape == dst.shape or (src.dim() > 0 and src.shape[0] == 1 and src.shape[1:] == dst.shape[1:])
        )
        if not ok:
            got = tuple(dst.shape) if isinstance(dst, torch.Tensor) else type(dst).__name__
            raise ValueError(f"cannot broadcast {where}: source {tuple(src.shape)} vs destination {got}")
        dst.copy_(src.expand_as(dst))
    elif isinstance(src, (list, tuple)):
        if len(src) != len(dst):
            raise ValueError(f"cannot broadcast {where}: {len(src)} vs {len(dst)} entries")
        for i, (s, d) in enumerate(zip(src, dst)):
            _broadcast(s, d, f"{where}[{i}]")
    elif isinstance(src, dict):
        for k, v in src.items():
            _broadcast(v, dst[k], f"{where}[{k!r}]")
    elif hasattr(src, "__dict__") and not isinstance(src, (int, float, bool, str)):
        for k, v in vars(src).items():
            if k in ("batch_size", "batch"):
                continue
            if isinstance(v, (int, float, bool, str)) or v is None:
                setattr(dst, k, v)  # per-layer counters travel with the state
            else:
                _broadcast(v, getattr(dst, k), f"{where}.{k}")
