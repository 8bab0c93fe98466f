"""Mamba-2's decode state update in Triton; reference: kernels.ref_ssd_step (same signature).

    state = state * exp(dt * A) + dt * x B^T;  y = state C + D x;  dt = softplus(dt + dt_bias)

One program owns BLOCK_P whole rows of one (sequence, head) state: it loads and stores its tile
once and reads dt, B and C once. mamba_ssm's `selective_state_update` gives a program 4 rows (1 KiB
of a bf16 state), so at large batches most of its time is per-program overhead: on an H200 at the
mamba2_1.3b layer shape it moved the state at 1.8 TB/s against this kernel's 3.8-4.1 (batch 64 /
512, bf16 state: 74.8 / 581 us against 35.5 / 267; fp32 state: 76.4 / 606 against 68.6 / 528;
batch 1: 2.8 / 3.4 against 2.3 / 3.3; BLOCK_P 64 and 8 warps the best or within 1% of it in a
sweep of 4-64 rows x 1-8 warps, 2026-12-06, docs/results.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_P = 64
NUM_WARPS = 8


@triton.jit
def _state_update_kernel(
    State,
    X,
    Dt,
    DtBias,
    A,
    B,
    C,
    D,
    Y,
    nheads,
    heads_per_group,
    P,
    N,
    s_sb,
    s_sh,
    s_sp,
    s_sn,
    s_xb,
    s_xh,
    s_xp,
    s_dtb,
    s_dth,
    s_bb,
    s_bg,
    s_bn,
    s_cb,
    s_cg,
    s_cn,
    s_yb,
    s_yh,
    s_yp,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_D: tl.constexpr,
    A_LOG: tl.constexpr,
):
    """One program: rows [pid_p * BLOCK_P, +BLOCK_P) of the state of sequence b, head h.
    state = state * exp(dt * A) + dt * x B^T; y = state C (+ D x); dt = softplus(dt + dt_bias).
    Computed in fp32, the state stored back in its own dtype, y from the unrounded state."""
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_p = tl.program_id(1)
    b = pid_bh // nheads
    h = pid_bh % nheads
    g = h // heads_per_group
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mp, mn = offs_p < P, offs_n < N
    s_ptr = State + b * s_sb + h * s_sh + offs_p[:, None] * s_sp + offs_n[None, :] * s_sn
    m = mp[:, None] & mn[None, :]
    s = tl.load(s_ptr, mask=m, other=0.0).to(tl.float32)
    x = tl.load(X + b * s_xb + h * s_xh + offs_p * s_xp, mask=mp, other=0.0).to(tl.float32)
    dt = tl.load(Dt + b * s_dtb + h * s_dth).to(tl.float32) + tl.load(DtBias + h).to(tl.float32)
    dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)  # softplus, torch's threshold
    b_vec = tl.load(B + b * s_bb + g * s_bg + offs_n * s_bn, mask=mn, other=0.0).to(tl.float32)
    c_vec = tl.load(C + b * s_cb + g * s_cg + offs_n * s_cn, mask=mn, other=0.0).to(tl.float32)
    a = tl.load(A + h).to(tl.float32)
    if A_LOG:
        a = -tl.exp(a)
    s = s * tl.exp(dt * a) + (dt * x)[:, None] * b_vec[None, :]
    tl.store(s_ptr, s.to(State.dtype.element_ty), mask=m)
    y = tl.sum(s * c_vec[None, :], axis=1)
    if HAS_D:
        y += x * tl.load(D + h).to(tl.float32)
    tl.store(Y + b * s_yb + h * s_yh + offs_p * s_yp, y.to(Y.dtype.element_ty), mask=mp)


def triton_ssd_step(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    dt_bias: torch.Tensor,
    block_p: int = BLOCK_P,
    num_warps: int = NUM_WARPS,
    a_log: bool = False,
) -> torch.Tensor:
    """ref_ssd_step's contract: state [b, h, p, n] updated in place; x [b, h, p]; raw dt [b, h];
    A, D, dt_bias [h]; B, C [b, g, n] -> y [b, h, p] in x's dtype. Any strides. With a_log, A holds
    the model's A_log and the kernel takes A = -exp(A_log) itself (one launch fewer a layer)."""
    b, h, p, n = state.shape
    g = B.shape[1]
    if h % g:
        raise ValueError(f"heads ({h}) must be a multiple of the B/C groups ({g})")
    y = torch.empty(b, h, p, device=x.device, dtype=x.dtype)
    block_p = min(block_p, triton.next_power_of_2(p))
    grid = (b * h, triton.cdiv(p, block_p))
    _state_update_kernel[grid](
        state,
        x,
        dt,
        dt_bias,
        A,
        B,
        C,
        D if D is not None else x,  # unread without D
        y,
        h,
        h // g,
        p,
        n,
        *state.stride(),
        *x.stride(),
        *dt.stride(),
        *B.stride(),
        *C.stride(),
        *y.stride(),
        BLOCK_P=block_p,
        BLOCK_N=triton.next_power_of_2(n),
        HAS_D=D is not None,
        A_LOG=a_log,
        num_warps=num_warps,
    )
    return y
