"""Growing key/value state for attention layers, in a buffer preallocated to max_seq_len."""

from __future__ import annotations

import torch


class KVState:
    """One attention layer's keys and values: [B, H_kv, max_seq_len, head_dim] each."""

    def __init__(self, batch_size: int, kv_heads: int, max_seq_len: int, head_dim: int,
                 device=None, dtype=None):
        shape = (batch_size, kv_heads, max_seq_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def update(self, k_new: torch.Tensor, v_new: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write [B, H_kv, T, d] at positions start..start+T-1; return views of positions 0..start+T-1."""
        end = start + k_new.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache of {self.k.shape[2]} positions cannot hold position {end - 1}")
        self.k[:, :, start:end] = k_new
        self.v[:, :, start:end] = v_new
        return self.k[:, :, :end], self.v[:, :, :end]
