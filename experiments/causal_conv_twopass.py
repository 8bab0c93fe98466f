"""A two-pass backward for the channel-last causal conv (candidate; the product's is one kernel).

The product's `_bwd_kernel` (avengers/models/mamba/causal_conv_triton.py) recomputes the
pre-activation of its rows five times (once per tap of dx, once for the weight gradient), each from
four loads of x, and measured 595 us a layer at the mamba2_1.3b shape on an H100 (docs/mamba.md,
"Training speed"), 9x its memory bound. Here the pre-activation gradient is made once:

    pass 1 (SiLU only): gp[b, t, c] = g * silu'(pre) in fp32, into a scratch [B, L, C] tensor
    pass 2: dx[t] = sum_i w[i] * gp[t + W-1 - i];  per-program partials of dw[c, i] and db[c]

`CausalConvTwoPass` has the product's forward and this backward; `experiments/gpu_causal_conv.py`
times both on a GPU and checks them against each other.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from avengers.models.mamba.causal_conv_triton import (
    BLOCK_C,
    BLOCK_T,
    CausalConvChannelLast,
    _load_bias,
    _pre_act,
    _store_partials,
    grads_from_partials,
    partial_buffers,
)


@triton.jit
def _grad_pre_kernel(
    X, Wt, Bias, G, GP, sxb, sxt, L, C, WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr
):
    b, tb, cb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = tb * BT + tl.arange(0, BT)
    cols = cb * BC + tl.arange(0, BC)
    c_ok = cols < C
    m = (rows < L)[:, None] & c_ok[None, :]
    bias = _load_bias(Bias, cols, c_ok, HAS_BIAS, BC)
    y = _pre_act(X, Wt, bias, b, rows, cols, sxb, sxt, L, C, WIDTH, BT, BC)
    s = tl.sigmoid(y)
    g = tl.load(G + (b * L + rows[:, None]) * C + cols[None, :], mask=m, other=0.0).to(tl.float32)
    tl.store(GP + (b * L + rows[:, None]) * C + cols[None, :], g * s * (1.0 + y * (1.0 - s)), mask=m)


@triton.jit
def _bwd_from_grad_pre_kernel(
    X,
    Wt,
    GP,
    DX,
    DWp,
    DBp,
    sxb,
    sxt,
    L,
    C,
    n_tb,
    WIDTH: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
):
    b, tb, cb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = tb * BT + tl.arange(0, BT)
    cols = cb * BC + tl.arange(0, BC)
    c_ok = cols < C
    dx = tl.zeros((BT, BC), dtype=tl.float32)
    for i in tl.static_range(WIDTH):
        r = rows + (WIDTH - 1) - i
        m = (r < L)[:, None] & c_ok[None, :]
        gp = tl.load(GP + (b * L + r[:, None]) * C + cols[None, :], mask=m, other=0.0).to(tl.float32)
        w = tl.load(Wt + cols * WIDTH + i, mask=c_ok, other=0.0).to(tl.float32)
        dx += gp * w[None, :]
    m = (rows < L)[:, None] & c_ok[None, :]
    tl.store(DX + (b * L + rows[:, None]) * C + cols[None, :], dx.to(DX.dtype.element_ty), mask=m)
    gp = tl.load(GP + (b * L + rows[:, None]) * C + cols[None, :], mask=m, other=0.0).to(tl.float32)
    _store_partials(X, DWp, DBp, gp, b * n_tb + tb, b, rows, cols, sxb, sxt, L, C, WIDTH, HAS_BIAS)


def twopass_backward(x, w, bias, grad, silu: bool, weight_shape):
    """(dx, dw, db) of CausalConvChannelLast for x [B, L, C] (unit channel stride), w [C, W]."""
    B, L, C = x.shape
    width = w.shape[-1]
    grid = (B, triton.cdiv(L, BLOCK_T), triton.cdiv(C, BLOCK_C))
    has_bias = bias is not None
    if silu:
        gp = torch.empty(B, L, C, device=x.device, dtype=torch.float32)
        _grad_pre_kernel[grid](
            x, w, bias if has_bias else w, grad, gp, x.stride(0), x.stride(1), L, C, width, has_bias, BLOCK_T, BLOCK_C
        )
    else:
        gp = grad
    n_tb = grid[1]
    dx = torch.empty(B, L, C, device=x.device, dtype=x.dtype)
    dw_part, db_part = partial_buffers(x, B * n_tb, width, has_bias)
    _bwd_from_grad_pre_kernel[grid](
        x, w, gp, dx, dw_part, db_part, x.stride(0), x.stride(1), L, C, n_tb, width, has_bias, BLOCK_T, BLOCK_C
    )
    return dx, *grads_from_partials(dw_part, db_part, weight_shape, w, bias)


class CausalConvTwoPass(CausalConvChannelLast):
    """The product's forward; the two-pass backward."""

    @staticmethod
    def backward(ctx, grad):
        x, w, bias = ctx.saved_tensors
        return (*twopass_backward(x, w, bias, grad.contiguous(), ctx.silu, ctx.weight_shape), None)


def twopass_causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool) -> torch.Tensor:
    """triton_causal_conv's signature and layouts (x [b, channels, l], a transposed channel-last view)."""
    x_blc = x.transpose(1, 2)
    if x_blc.stride(-1) != 1:
        x_blc = x_blc.contiguous()
    return CausalConvTwoPass.apply(x_blc, weight, bias, silu).transpose(1, 2)
