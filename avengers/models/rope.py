"""Rotary position embedding as mamba_ssm's MHA applies it (flash-attn's non-interleaved layout).

Only the first `rotary_dim` channels of each head rotate; channel i pairs with i + rotary_dim/2
(the "rotate half" layout, not ibm-fms's adjacent pairs), the rest pass through unchanged.
"""

from __future__ import annotations

import torch


def rotary_cos_sin(
    positions: torch.Tensor, rotary_dim: int, base: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, rotary_dim/2] in fp32 for integer positions [T] (a device tensor: graph-safe)."""
    if rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"rotary_dim must be a positive even number, got {rotary_dim}")
    inv_freq = 1.0 / (
        base ** (torch.arange(0, rotary_dim, 2, device=positions.device, dtype=torch.float32) / rotary_dim)
    )
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, head_dim]; cos/sin [T, r/2] with r <= head_dim. Rotation in fp32, result in x's dtype."""
    half = cos.shape[-1]
    r = 2 * half
    if r > x.shape[-1]:
        raise ValueError(f"rotary_dim {r} exceeds head_dim {x.shape[-1]}")
    x1, x2 = x[..., :half].float(), x[..., half:r].float()
    c, s = cos[:, None, :], sin[:, None, :]
    rotated = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)
    return torch.cat([rotated, x[..., r:]], dim=-1) if r < x.shape[-1] else rotated
