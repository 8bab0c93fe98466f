"""Rotary position embedding: one frequency formula, the two channel layouts the families use.

- `rotate_pairs`: channels 2i and 2i+1 form a pair (ibm-fms's LLaMA layout; the Llama decode path
  and the telescoping model use it).
- `rotate_half`: channel i pairs with i + r/2 over the first r channels, the rest pass through
  (mamba_ssm's MHA, flash-attn's non-interleaved partial rotary; the Mamba-2 hybrids use it).

Angles are position * theta^(-2i/d), computed in fp32 from integer positions that may live on the
device (a decode step reads its position from memory, so the step can be replayed from a CUDA graph).
"""

from __future__ import annotations

import torch


def rope_cos_sin(positions: torch.Tensor, dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, dim/2] in fp32 for positions [T]."""
    if dim <= 0 or dim % 2:
        raise ValueError(f"rotary dim must be a positive even number, got {dim}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim))
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Adjacent channel pairs of x [..., d] rotated by cos/sin [..., d/2] (broadcast), in their
    promoted dtype: callers choose the precision by the dtype of x they pass."""
    pairs = x.unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


def rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, head_dim]; cos/sin [T, r/2] with r <= head_dim. Rotation in fp32, result in x's dtype."""
    half = cos.shape[-1]
    r = 2 * half
    if r > x.shape[-1]:
        raise ValueError(f"rotary_dim {r} exceeds head_dim {x.shape[-1]}")
    x1, x2 = x[..., :half].float(), x[..., half:r].float()
    c, s = cos[:, None, :], sin[:, None, :]
    rotated = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)
    return torch.cat([rotated, x[..., r:]], dim=-1) if r < x.shape[-1] else rotated
