"""Depthwise causal conv1d (+ SiLU) in Triton on the channel-last layout; reference: conv.ref_causal_conv.

Mamba-2's in_proj writes [b, l, channels]; `F.conv1d` wants [b, channels, l], so without the
causal-conv1d package each layer paid a transpose copy, cuDNN's slow depthwise kernels (forward,
input grad, weight grad: an eighth of a training step of the 1.5B model) and separate
slice/SiLU kernels. Here one kernel reads the channel-last view in place (any row stride, unit
channel stride) and fuses bias and SiLU. The backward recomputes the pre-activation instead of
saving it: one kernel writes the pre-activation gradient (fp32 scratch, with SiLU), a second one
the input gradient and per-program partial sums of the weight/bias gradients (deterministic, no
atomics). Computing that gradient once, rather than within one kernel for each of the W taps and
again for the weight gradient, took the backward from 0.935 to 0.747 ms at mamba2_1.3b's conv
shape on an H100 (experiments/README.md, "Causal conv backward in two passes").

    out[b, t, c] = act(bias[c] + sum_i w[c, i] * x[b, t - (W - 1) + i, c]),  x[b, < 0, c] = 0
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from avengers.models.mamba.compile import conv_channel_first_view, make_conv_op

log = logging.getLogger(__name__)

BLOCK_T = 32
BLOCK_C = 128


@triton.jit
def _pre_act(X, Wt, bias, b, rows, cols, sxb, sxt, L, C, WIDTH: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """bias + sum_i w[:, i] * x[rows - (WIDTH-1) + i] in fp32, [BT, BC]."""
    c_ok = cols < C
    acc = tl.zeros((BT, BC), dtype=tl.float32) + bias[None, :]
    for i in tl.static_range(WIDTH):
        r = rows - (WIDTH - 1) + i
        m = ((r >= 0) & (r < L))[:, None] & c_ok[None, :]
        x = tl.load(X + b * sxb + r[:, None] * sxt + cols[None, :], mask=m, other=0.0).to(tl.float32)
        w = tl.load(Wt + cols * WIDTH + i, mask=c_ok, other=0.0).to(tl.float32)
        acc += x * w[None, :]
    return acc


@triton.jit
def _load_bias(Bias, cols, c_ok, HAS_BIAS: tl.constexpr, BC: tl.constexpr):
    if HAS_BIAS:
        bias = tl.load(Bias + cols, mask=c_ok, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BC,), tl.float32)
    return bias


@triton.jit
def _fwd_kernel(
    X,
    Wt,
    Bias,
    Out,
    sxb,
    sxt,
    L,
    C,
    WIDTH: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
):
    b, tb, cb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = tb * BT + tl.arange(0, BT)
    cols = cb * BC + tl.arange(0, BC)
    c_ok = cols < C
    bias = _load_bias(Bias, cols, c_ok, HAS_BIAS, BC)
    y = _pre_act(X, Wt, bias, b, rows, cols, sxb, sxt, L, C, WIDTH, BT, BC)
    if SILU:
        y = y * tl.sigmoid(y)
    m = (rows < L)[:, None] & c_ok[None, :]
    tl.store(Out + (b * L + rows[:, None]) * C + cols[None, :], y.to(Out.dtype.element_ty), mask=m)


@triton.jit
def _grad_pre_kernel(
    X, Wt, Bias, G, GP, sxb, sxt, L, C, WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr
):
    """Backward pass 1 (SiLU only): gp = d loss / d pre-activation = g * silu'(pre), fp32."""
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
def _bwd_kernel(
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
    """Backward pass 2, from the pre-activation gradient gp: dx[t] = sum_i w[i] * gp[t + (WIDTH-1) - i],
    and this program's partials of dw and db."""
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


@triton.jit
def _store_partials(X, DWp, DBp, gp, part, b, rows, cols, sxb, sxt, L, C, WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Program `part`'s share of dw[c, i] = sum_t gp[t] * x[t - (WIDTH-1) + i] and db[c] = sum_t gp[t]."""
    c_ok = cols < C
    for i in tl.static_range(WIDTH):
        r = rows - (WIDTH - 1) + i
        xm = ((r >= 0) & (r < L))[:, None] & c_ok[None, :]
        x = tl.load(X + b * sxb + r[:, None] * sxt + cols[None, :], mask=xm, other=0.0).to(tl.float32)
        tl.store(DWp + (part * WIDTH + i) * C + cols, tl.sum(gp * x, 0), mask=c_ok)
    if HAS_BIAS:
        tl.store(DBp + part * C + cols, tl.sum(gp, 0), mask=c_ok)


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() != 3 or x.stride(-1) != 1:
        raise ValueError(
            f"x must be [b, l, channels] with unit channel stride, got shape {tuple(x.shape)} strides {x.stride()}"
        )
    if weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight has {weight.shape[0]} channels, x has {x.shape[-1]}")


def conv_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool) -> torch.Tensor:
    """x [b, l, channels] (unit channel stride, any row stride), weight [channels, 1, W] -> [b, l, channels]."""
    _check(x, weight)
    B, L, C = x.shape
    width = weight.shape[-1]
    w = weight.reshape(C, width).contiguous()
    out = torch.empty(B, L, C, device=x.device, dtype=x.dtype)
    grid = (B, triton.cdiv(L, BLOCK_T), triton.cdiv(C, BLOCK_C))
    b_or_w = bias if bias is not None else w  # unread without a bias
    _fwd_kernel[grid](
        x, w, b_or_w, out, x.stride(0), x.stride(1), L, C, width, bias is not None, silu, BLOCK_T, BLOCK_C
    )
    return out


def conv_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool):
    """-> (dx [b, l, channels], dweight, dbias or None), recomputing the pre-activation from x."""
    B, L, C = x.shape
    width, has_bias = weight.shape[-1], bias is not None
    w = weight.reshape(C, width).contiguous()
    grad = grad.contiguous()
    grid = (B, triton.cdiv(L, BLOCK_T), triton.cdiv(C, BLOCK_C))
    gp = grad
    if silu:
        gp = torch.empty(B, L, C, device=x.device, dtype=torch.float32)
        b_or_w = bias if has_bias else w
        _grad_pre_kernel[grid](
            x, w, b_or_w, grad, gp, x.stride(0), x.stride(1), L, C, width, has_bias, BLOCK_T, BLOCK_C
        )
    n_tb = grid[1]
    dx = torch.empty(B, L, C, device=x.device, dtype=x.dtype)
    dw_part, db_part = _partial_buffers(x, B * n_tb, width, has_bias)
    _bwd_kernel[grid](
        x, w, gp, dx, dw_part, db_part, x.stride(0), x.stride(1), L, C, n_tb, width, has_bias, BLOCK_T, BLOCK_C
    )
    return dx, *_grads_from_partials(dw_part, db_part, weight.shape, w, bias)


def _partial_buffers(x: torch.Tensor, programs: int, width: int, has_bias: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 per-program partials of dw [programs, width, C] and db [programs, C] (dw's buffer again,
    unused, without a bias)."""
    dw_part = torch.empty(programs, width, x.shape[-1], device=x.device, dtype=torch.float32)
    return dw_part, (torch.empty(programs, x.shape[-1], device=x.device, dtype=torch.float32) if has_bias else dw_part)


def _grads_from_partials(dw_part, db_part, weight_shape, w, bias):
    """(dw in the weight's shape and dtype, db or None) from the per-program partials."""
    dw = dw_part.sum(0).t().reshape(weight_shape).to(w.dtype)
    return dw, (db_part.sum(0).to(bias.dtype) if bias is not None else None)


# One op for eager and compiled blocks: a torch.library custom op is opaque to dynamo, so a compiled
# Mamba block stays one graph around it (avengers.models.mamba.compile).
triton_conv_op = make_conv_op("avengers::causal_conv", conv_forward, conv_backward)
# kernels.py's causal_conv signature: x [b, channels, l] (a transposed channel-last view, as the Mamba
# mixer passes it; a channel-first tensor costs one copy), weight [channels, 1, W] -> [b, channels, l],
# a view of a [b, l, channels] tensor.
triton_causal_conv = conv_channel_first_view(triton_conv_op)


def self_test(device: torch.device | str = "cuda") -> bool:
    """The kernel (forward and gradients, with SiLU and bias) against F.conv1d on random data;
    False, with a warning, on any error or mismatch, so callers can fall back to the reference."""
    from avengers.models.mamba.conv import ref_causal_conv

    try:
        with torch.enable_grad():  # the first use may come under no_grad (a decode or an eval)
            g = torch.Generator().manual_seed(0)
            x = torch.randn(2, 100, 200, generator=g).to(device).transpose(1, 2)
            w, b = (0.5 * torch.randn(200, 1, 4, generator=g)).to(device), torch.randn(200, generator=g).to(device)
            grads = []  # the reference in float64: cuDNN may run a float32 conv in TF32
            for fn, dtype in ((ref_causal_conv, torch.float64), (triton_causal_conv, torch.float32)):
                ins = [t.to(dtype).requires_grad_() for t in (x, w, b)]
                out = fn(*ins, True)
                out.square().sum().backward()
                grads.append([out.detach()] + [t.grad for t in ins])
            err = max(
                float((a.double() - r).abs().max() / r.abs().max().clamp_min(1e-6)) for a, r in zip(grads[1], grads[0])
            )
    except Exception as e:  # a compile or launch failure on this machine: use the reference
        log.warning("Triton causal conv unavailable (%s: %s); using F.conv1d", type(e).__name__, e)
        return False
    if not err <= 1e-3:
        log.warning("Triton causal conv self-test error %.3g > 1e-3; using F.conv1d", err)
        return False
    return True
