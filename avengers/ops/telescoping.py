"""The telescoping cache's numerics, shared by its parallel form (training, prefill) and its
recurrent form (decode): EMPTY slots, full-precision merges and norms, the gates, RoPE.

An EMPTY slot has log-mass EMPTY_LOG_MASS, so it carries zero weight in any merge; its key and
value are 0, so unmasked it acts as a logit-0 / value-0 sink (the documented version).
"""

from __future__ import annotations

import torch

from avengers.ops.rope import rope_cos_sin, rotate_pairs

EMPTY_LOG_MASS = -1000.0  # log-mass of an EMPTY slot: zero weight in any merge
EMPTY_THRESHOLD = -100.0  # a slot is EMPTY iff its log-mass is at or below this
NORM_EPS = 1e-6


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types, fp64 stays fp64: merges, log-masses and norms never run in half."""
    return torch.promote_types(dtype, torch.float32)


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """x [B, T, h, d] rotated in adjacent pairs at `positions` [T]; returns compute_dtype(x.dtype),
    since keys are merged in full precision."""
    dt = compute_dtype(x.dtype)
    cos, sin = rope_cos_sin(positions, x.shape[-1], theta)
    return rotate_pairs(x.to(dt), cos.to(dt)[:, None, :], sin.to(dt)[:, None, :])


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """g * x / rms(x) over the last dim, in compute_dtype; RMSNorm(0) = 0 keeps EMPTY at 0."""
    xf = x.to(compute_dtype(x.dtype))
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + NORM_EPS)
    return out if weight is None else out * weight.to(out.dtype)


def wisq_gate(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """w_t = logsumexp over a KV head's query group of q_t . k_t / sqrt(d); q [B,T,H,d], k [B,T,Hkv,d]."""
    B, T, H, d = q.shape
    Hkv = k.shape[2]
    qg = q.to(k.dtype).view(B, T, Hkv, H // Hkv, d)
    return torch.logsumexp((qg * k.unsqueeze(3)).sum(-1) * d**-0.5, dim=-1)


def softcap(scores: torch.Tensor, cap: float | None) -> torch.Tensor:
    return scores if cap is None else cap * torch.tanh(scores / cap)
