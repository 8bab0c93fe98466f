"""Depthwise causal conv1d (+ SiLU) in Triton on the channel-last layout; reference: conv.ref_causal_conv.

Mamba-2's in_proj writes [b, l, channels]; `F.conv1d` wants [b, channels, l], so without the
causal-conv1d package each layer paid a transpose copy, cuDNN's slow depthwise kernels (forward,
input grad, weight grad: an eighth of a training step of the 1.5B model) and separate
slice/SiLU kernels. Here one kernel reads the channel-last view in place (any row stride, unit
channel stride) and fuses bias and SiLU, and the backward is one pass too: it recomputes the
pre-activation from x instead of saving it, writes the input gradient and per-program partial
sums of the weight/bias gradients (deterministic, no atomics). It takes widths up to 4, as
causal-conv1d does (`triton_causal_conv` sends wider ones to the reference). At mamba2_1.3b's conv
shape on an H100 the backward takes 0.42 ms at batch 4, against 0.85 ms for the two-pass form
before it (experiments/README.md, "Causal conv backward in one pass").

    out[b, t, c] = act(bias[c] + sum_i w[c, i] * x[b, t - (W - 1) + i, c]),  x[b, < 0, c] = 0
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from avengers.models.mamba.compile import conv_channel_first_view, make_conv_op
from avengers.models.mamba.conv import ref_causal_conv

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tiles:
    """A launch's tile: BT rows (times NT row blocks a program walks, in the backward) by BC channels,
    on `warps` warps."""

    bt: int
    bc: int
    nt: int = 1
    warps: int = 4


# the fastest of experiments/gpu_causal_conv_tiles.py's candidates at mamba2_1.3b's shape, batch 2
# and 4 (H100, 2026-12-07)
FWD_TILES = Tiles(bt=8, bc=256)
BWD_TILES = Tiles(bt=8, bc=64, nt=16)
MAX_WIDTH = 4  # the backward kernel's taps


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
def _rows(P, b, sb, st, r, cols, L, c_ok):
    """P[b, r, cols] as fp32 [len(r), len(cols)], zero outside rows [0, L)."""
    m = ((r >= 0) & (r < L))[:, None] & c_ok[None, :]
    return tl.load(P + b * sb + r[:, None] * st + cols[None, :], mask=m, other=0.0).to(tl.float32)


@triton.jit
def _silu_grad(g, pre):
    s = tl.sigmoid(pre)
    return g * s * (1.0 + pre * (1.0 - s))


@triton.jit
def _bwd_kernel(
    X,
    W4,
    Bias,
    G,
    DX,
    DWp,
    DBp,
    sxb,
    sxt,
    L,
    C,
    parts_t,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
    BT: tl.constexpr,
    NT: tl.constexpr,
    BC: tl.constexpr,
):
    """The backward in one pass, for weights of 4 taps (narrower ones zero-padded on the left).

    Per block of BT rows t: the 7 row-shifted tiles x[t - 3 .. t + 3] and g[t .. t + 3] are loaded
    once; the pre-activation gradients gp[t + k] = g * silu'(pre) are formed from them, then
    dx[t] = sum_i w[i] * gp[t + 3 - i], and dw[i] += gp[t] * x[t - 3 + i], db += gp[t] are
    accumulated element-wise over the program's NT blocks and reduced over rows once at its end."""
    b, tp, cb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    cols = cb * BC + tl.arange(0, BC)
    c_ok = cols < C
    w0 = tl.load(W4 + cols * 4 + 0, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    w1 = tl.load(W4 + cols * 4 + 1, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    w2 = tl.load(W4 + cols * 4 + 2, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    w3 = tl.load(W4 + cols * 4 + 3, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    bias = _load_bias(Bias, cols, c_ok, HAS_BIAS, BC)[None, :]
    acc0 = tl.zeros((BT, BC), tl.float32)
    acc1 = tl.zeros((BT, BC), tl.float32)
    acc2 = tl.zeros((BT, BC), tl.float32)
    acc3 = tl.zeros((BT, BC), tl.float32)
    accb = tl.zeros((BT, BC), tl.float32)
    sgb = L * C
    for n in range(NT):
        rows = (tp * NT + n) * BT + tl.arange(0, BT)
        x0 = _rows(X, b, sxb, sxt, rows - 3, cols, L, c_ok)
        x1 = _rows(X, b, sxb, sxt, rows - 2, cols, L, c_ok)
        x2 = _rows(X, b, sxb, sxt, rows - 1, cols, L, c_ok)
        x3 = _rows(X, b, sxb, sxt, rows, cols, L, c_ok)
        g0 = _rows(G, b, sgb, C, rows, cols, L, c_ok)
        g1 = _rows(G, b, sgb, C, rows + 1, cols, L, c_ok)
        g2 = _rows(G, b, sgb, C, rows + 2, cols, L, c_ok)
        g3 = _rows(G, b, sgb, C, rows + 3, cols, L, c_ok)
        if SILU:
            x4 = _rows(X, b, sxb, sxt, rows + 1, cols, L, c_ok)
            x5 = _rows(X, b, sxb, sxt, rows + 2, cols, L, c_ok)
            x6 = _rows(X, b, sxb, sxt, rows + 3, cols, L, c_ok)
            g0 = _silu_grad(g0, bias + w0 * x0 + w1 * x1 + w2 * x2 + w3 * x3)
            g1 = _silu_grad(g1, bias + w0 * x1 + w1 * x2 + w2 * x3 + w3 * x4)
            g2 = _silu_grad(g2, bias + w0 * x2 + w1 * x3 + w2 * x4 + w3 * x5)
            g3 = _silu_grad(g3, bias + w0 * x3 + w1 * x4 + w2 * x5 + w3 * x6)
        dx = w3 * g0 + w2 * g1 + w1 * g2 + w0 * g3
        m = (rows < L)[:, None] & c_ok[None, :]
        tl.store(DX + (b * L + rows[:, None]) * C + cols[None, :], dx.to(DX.dtype.element_ty), mask=m)
        acc0 += g0 * x0
        acc1 += g0 * x1
        acc2 += g0 * x2
        acc3 += g0 * x3
        accb += g0
    dw = DWp + (b * parts_t + tp) * 4 * C + cols
    tl.store(dw, tl.sum(acc0, 0), mask=c_ok)
    tl.store(dw + C, tl.sum(acc1, 0), mask=c_ok)
    tl.store(dw + 2 * C, tl.sum(acc2, 0), mask=c_ok)
    tl.store(dw + 3 * C, tl.sum(acc3, 0), mask=c_ok)
    if HAS_BIAS:
        tl.store(DBp + (b * parts_t + tp) * C + cols, tl.sum(accb, 0), mask=c_ok)


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() != 3 or x.stride(-1) != 1:
        raise ValueError(
            f"x must be [b, l, channels] with unit channel stride, got shape {tuple(x.shape)} strides {x.stride()}"
        )
    if weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight has {weight.shape[0]} channels, x has {x.shape[-1]}")
    if not 1 <= weight.shape[-1] <= MAX_WIDTH:
        raise ValueError(f"conv width {weight.shape[-1]}: the Triton causal conv takes widths 1 to {MAX_WIDTH}")


def conv_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool, tiles: Tiles = FWD_TILES
) -> torch.Tensor:
    """x [b, l, channels] (unit channel stride, any row stride), weight [channels, 1, W] -> [b, l, channels]."""
    _check(x, weight)
    B, L, C = x.shape
    width = weight.shape[-1]
    w = weight.reshape(C, width).contiguous()
    out = torch.empty(B, L, C, device=x.device, dtype=x.dtype)
    grid = (B, triton.cdiv(L, tiles.bt), triton.cdiv(C, tiles.bc))
    b_or_w = bias if bias is not None else w  # unread without a bias
    _fwd_kernel[grid](
        x,
        w,
        b_or_w,
        out,
        x.stride(0),
        x.stride(1),
        L,
        C,
        width,
        bias is not None,
        silu,
        tiles.bt,
        tiles.bc,
        num_warps=tiles.warps,
    )
    return out


def conv_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    silu: bool,
    tiles: Tiles = BWD_TILES,
):
    """-> (dx [b, l, channels], dweight, dbias or None), recomputing the pre-activation from x."""
    _check(x, weight)
    B, L, C = x.shape
    width, has_bias = weight.shape[-1], bias is not None
    w = weight.reshape(C, width).contiguous()
    w4 = F.pad(w, (MAX_WIDTH - width, 0))  # zero taps on the left: the same conv
    grad = grad.contiguous()
    dx = torch.empty(B, L, C, device=x.device, dtype=x.dtype)
    parts_t = triton.cdiv(L, tiles.bt * tiles.nt)
    dw_part, db_part = _partial_buffers(x, B * parts_t, MAX_WIDTH, has_bias)
    _bwd_kernel[(B, parts_t, triton.cdiv(C, tiles.bc))](
        x, w4, bias if has_bias else w4, grad, dx, dw_part, db_part, x.stride(0), x.stride(1), L, C, parts_t,
        has_bias, silu, tiles.bt, tiles.nt, tiles.bc, num_warps=tiles.warps,
    )  # fmt: skip
    return dx, *_grads_from_partials(dw_part[:, MAX_WIDTH - width :], db_part, weight.shape, w, bias)


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
_channel_first_conv = conv_channel_first_view(triton_conv_op)


def triton_causal_conv(x, weight, bias, silu):
    """The kernels' conv (widths up to MAX_WIDTH; wider ones run the reference)."""
    if weight.shape[-1] > MAX_WIDTH:
        return ref_causal_conv(x, weight, bias, silu)
    return _channel_first_conv(x, weight, bias, silu)


def self_test(device: torch.device | str = "cuda") -> bool:
    """The kernel (forward and gradients, with SiLU and bias) against F.conv1d on random data;
    False, with a warning, on any error or mismatch, so callers can fall back to the reference."""
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
