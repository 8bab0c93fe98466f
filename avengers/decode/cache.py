"""One inference-cache interface over the three kinds of decode state.

A model's `allocate_cache(batch_size, max_seq_len, device, dtype, options)` returns an
`InferenceCache` whose `layers[i]` is that layer's state object: `KVState` for attention (grows
with context, in a preallocated buffer), `MambaState` for Mamba-2 (conv + SSM state, constant),
`TelescopingState` for telescoping attention (C slots, constant); `options` is the resolved
`DecodeOptions` every step of this cache runs with. The model's forward with `cache=` consumes
tokens, updates the per-layer states in place and finally calls `cache.advance(T)`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from avengers.decode.options import DecodeOptions

KV_CHUNK = 128  # K/V buffers are padded to a multiple of this many positions (split-K decode attention)


def padded_len(max_seq_len: int) -> int:
    """Buffer length: max_seq_len rounded up to KV_CHUNK so decode can view the values as chunks."""
    return -(-max_seq_len // KV_CHUNK) * KV_CHUNK


def check_allocation(batch_size: int, max_seq_len: int) -> None:
    if batch_size < 1 or max_seq_len < 1:
        raise ValueError(f"batch_size and max_seq_len must be >= 1, got {batch_size} and {max_seq_len}")


def allocation_target(
    model: torch.nn.Module, batch_size: int, max_seq_len: int, device=None, dtype=None
) -> tuple[torch.device, torch.dtype]:
    """Check a cache's size; its device and dtype default to the model's parameters'."""
    check_allocation(batch_size, max_seq_len)
    param = next(model.parameters())
    return (torch.device(device) if device is not None else param.device), (dtype or param.dtype)


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


def tensor_bytes(tensors) -> int:
    """Bytes of an iterable of tensors."""
    return sum(t.numel() * t.element_size() for t in tensors)


def state_tensors(cache: InferenceCache) -> list[torch.Tensor]:
    """Every tensor of the per-layer states, each once, in a fixed traversal order."""
    return list(_tensors(cache.layers, set()))


class KVState:
    """One attention layer's keys and values: [B, H_kv, S, head_dim] each, S = padded_len(max_seq_len)."""

    def __init__(
        self,
        batch_size: int,
        kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        device=None,
        dtype=None,
        k: torch.Tensor | None = None,
        v: torch.Tensor | None = None,
    ):
        shape = (batch_size, kv_heads, padded_len(max_seq_len), head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype) if k is None else k
        self.v = torch.zeros(shape, device=device, dtype=dtype) if v is None else v

    @classmethod
    def stacked(
        cls, n: int, batch_size: int, kv_heads: int, max_seq_len: int, head_dim: int, device=None, dtype=None
    ) -> list[KVState]:
        """n layers' states as views of one [n, B, H_kv, S, d] tensor each for keys and values
        (one TMA descriptor covers every layer's cache: the Gluon decode step)."""
        shape = (n, batch_size, kv_heads, padded_len(max_seq_len), head_dim)
        k, v = torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)
        return [cls(batch_size, kv_heads, max_seq_len, head_dim, k=k[i], v=v[i]) for i in range(n)]

    def update(self, k_new: torch.Tensor, v_new: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write [B, H_kv, T, d] at positions start..start+T-1; return views of positions 0..start+T-1."""
        end = start + k_new.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache of {self.k.shape[2]} positions cannot hold position {end - 1}")
        self.k[:, :, start:end] = k_new
        self.v[:, :, start:end] = v_new
        return self.k[:, :, :end], self.v[:, :, :end]

    def nbytes_written_per_step(self) -> int:
        """One position of the keys and values, and any other tensor of the state whole (a hybrid
        attention layer's conv window is rewritten every step)."""
        rest = _tensors(self, {id(self.k), id(self.v)})
        return tensor_bytes((self.k[:, :, :1], self.v[:, :, :1])) + tensor_bytes(rest)

    def write_at(self, k_new: torch.Tensor, v_new: torch.Tensor, position: torch.Tensor) -> None:
        """Write one token's [B, H_kv, 1, d] at a position held in a 0-dim device tensor (graph-safe)."""
        index = position.view(1)
        self.k.index_copy_(2, index, k_new)
        self.v.index_copy_(2, index, v_new)


class InferenceCache:
    """Per-layer decode state for a batch of equal-length sequences, the shared position, and the
    resolved DecodeOptions its steps run with."""

    def __init__(self, layers: list[Any], batch_size: int, max_seq_len: int, options: DecodeOptions | None = None):
        check_allocation(batch_size, max_seq_len)
        self.layers = layers
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        self.options = options or DecodeOptions(path="reference")
        self.seq_len = 0  # tokens consumed so far; the next token's absolute position
        # Device copy of seq_len: a CUDA-graph-captured decode step must read its position from
        # memory, because Python ints are frozen into the graph at capture time.
        first = next(_tensors(layers, set()), None)
        self.position = torch.zeros((), dtype=torch.long, device=first.device if first is not None else None)

    def check_tokens(self, input_ids: torch.Tensor) -> None:
        """input_ids [batch_size, T] fit: the right batch, and room for T more tokens."""
        if input_ids.dim() != 2 or input_ids.shape[0] != self.batch_size:
            raise ValueError(f"input_ids must be [batch={self.batch_size}, T], got {tuple(input_ids.shape)}")
        T = input_ids.shape[1]
        if self.seq_len + T > self.max_seq_len:
            raise ValueError(f"cache holds max_seq_len={self.max_seq_len} tokens; {self.seq_len} used, {T} more given")

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
        return tensor_bytes(_tensors(self.layers, set()))

    def nbytes_per_sequence(self) -> float:
        return self.nbytes() / self.batch_size

    def nbytes_written_per_step(self) -> int:
        """Bytes one decode step writes into the cache, as each layer's state counts them."""
        return sum(layer.nbytes_written_per_step() for layer in self.layers)

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
