"""Pure-torch Mamba-2 state-space duality (SSD): the chunked form, the sequential recurrence, one step.

Shapes (g groups of B/C shared by h/g heads each, p = headdim, n = d_state):
    x [b, l, h, p]   dt [b, l, h] (already softplus'd, > 0)   A [h] (< 0)
    B, C [b, l, g, n]   D [h] or None   state [b, h, p, n]

The recurrence every form computes, per head:
    state_t = exp(dt_t * A) * state_{t-1} + dt_t * x_t (outer) B_t
    y_t     = state_t @ C_t + D * x_t

`ssd_chunked` is the reference the Triton kernel (mamba_ssm's mamba_chunk_scan_combined) is
tested against; `ssd_sequential` is the ground truth `ssd_chunked` is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)  # bf16 -> fp32, fp64 stays fp64


def segsum(a: torch.Tensor) -> torch.Tensor:
    """[..., T] -> [..., T, T] with out[i, j] = a[j+1] + ... + a[i] for i >= j, -inf above the diagonal.

    Built by masked cumulative sums rather than cumsum differences, which lose precision when the
    cumulative decay is large.
    """
    T = a.shape[-1]
    rep = a.unsqueeze(-1).expand(*a.shape, T)  # rep[..., i, j] = a[i]
    below = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=-1)
    out = torch.cumsum(rep.masked_fill(~below, 0), dim=-2)
    keep = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device))
    return out.masked_fill(~keep, float("-inf"))


def _expand_groups(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t.repeat_interleave(heads // t.shape[2], dim=2) if t.shape[2] != heads else t


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [b, l, h, p] in x's dtype, final state [b, h, p, n] in the compute dtype).

    Per chunk of Q positions: a masked (Q x Q) attention-like product inside the chunk, the state
    each chunk hands on, a recurrence over chunk states, and each chunk's read-out of the state it
    received. Work is O(l Q) instead of the recurrence's l sequential steps.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    b, l, h, p = x.shape
    if h % B.shape[2]:
        raise ValueError(f"heads {h} must be a multiple of the B/C groups {B.shape[2]}")
    out_dtype, ct = x.dtype, _compute_dtype(x)
    x, dt, A = x.to(ct), dt.to(ct), A.to(ct)
    B, C = _expand_groups(B.to(ct), h), _expand_groups(C.to(ct), h)
    pad = -l % chunk_size  # dt = 0 on padded steps: decay 1, no input, so the final state is unchanged
    if pad:
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    c, Q = (l + pad) // chunk_size, chunk_size
    x, B, C = (t.reshape(b, c, Q, h, -1) for t in (x, B, C))
    dt = dt.reshape(b, c, Q, h)
    a = (dt * A).permute(0, 3, 1, 2)  # [b, h, c, Q] log-decay per step
    a_cum = torch.cumsum(a, dim=-1)
    xdt = x * dt.unsqueeze(-1)

    # 1. inside each chunk
    decay = torch.exp(segsum(a))  # [b, h, c, Q(target), Q(source)]
    scores = torch.einsum("bclhn,bcshn->bhcls", C, B) * decay
    y = torch.einsum("bhcls,bcshp->bclhp", scores, xdt)

    # 2. the state each chunk ends with, from its own inputs only
    to_end = torch.exp(a_cum[..., -1:] - a_cum)  # [b, h, c, Q]
    chunk_states = torch.einsum("bcshn,bhcs,bcshp->bchpn", B, to_end, xdt)

    # 3. pass states across chunks (a recurrence of length c, written as one masked product)
    init = torch.zeros_like(chunk_states[:, :1]) if initial_state is None else initial_state.to(ct).unsqueeze(1)
    chunk_states = torch.cat([init, chunk_states], dim=1)  # [b, c+1, h, p, n]
    across = torch.exp(segsum(F.pad(a_cum[..., -1], (1, 0))))  # [b, h, c+1, c+1]
    states = torch.einsum("bhzc,bchpn->bzhpn", across, chunk_states)
    entering, final = states[:, :-1], states[:, -1]

    # 4. each position reads the state that entered its chunk
    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", C, entering, torch.exp(a_cum))
    if D is not None:
        y = y + x * D.to(ct)[:, None]
    y = y.reshape(b, c * Q, h, p)[:, :l]
    return y.to(out_dtype), final


def ssd_step(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
) -> torch.Tensor:
    """One position: updates `state` [b, h, p, n] in place and returns y [b, h, p] in x's dtype.

    x [b, h, p], dt [b, h] (softplus'd), B, C [b, g, n]. Computed in fp32 (fp64 stays fp64); a
    half-precision state is rounded once, when the update is stored.
    """
    h = x.shape[1]
    ct = torch.promote_types(state.dtype, torch.float32)
    B, C = _expand_groups(B.unsqueeze(1), h).squeeze(1), _expand_groups(C.unsqueeze(1), h).squeeze(1)
    dt, xf = dt.to(ct), x.to(ct)
    dA = torch.exp(dt * A.to(ct))  # [b, h]
    s = state.to(ct)  # state itself unless it is stored in half precision
    s.mul_(dA[:, :, None, None]).add_((dt[:, :, None] * xf).unsqueeze(-1) * B.to(ct).unsqueeze(2))
    if s is not state:
        state.copy_(s)
    y = torch.einsum("bhpn,bhn->bhp", s, C.to(ct))
    if D is not None:
        y = y + xf * D.to(ct)[:, None]
    return y.to(x.dtype)


def ssd_sequential(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence one position at a time: slow, obviously right, the tests' ground truth."""
    b, l, h, p = x.shape
    ct = _compute_dtype(x)
    n = B.shape[-1]
    state = (
        torch.zeros(b, h, p, n, dtype=ct, device=x.device) if initial_state is None else initial_state.to(ct).clone()
    )
    ys = [ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D) for t in range(l)]
    return torch.stack(ys, dim=1), state
