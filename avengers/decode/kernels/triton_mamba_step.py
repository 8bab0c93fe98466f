"""The Mamba-2 family's decode kernels in Triton: the conv step in the in_proj GEMV's epilogue at
batch <= 8 and alone above, and a hybrid attention layer's RoPE + cache write.

A Mamba-2 decode step at batch 1 streams the weights once; what else it does per layer (the conv
window's shift and dot, SiLU, the SSM state update, the gated RMSNorm) used to run as about eight
small kernels, and their fixed cost was a third of the step (docs/results.md, "Decode on one
H100"). Here a layer is three kernels:

    zxbcdt = rmsnorm(h) @ W_in^T, with silu(conv(window, xBC)) in place of xBC and the window shifted
    y = state update (models/mamba/ssd_step_triton.py, reading x, B, C and dt from zxbcdt)
    h = h + rmsnorm(y * silu(z)) @ W_out^T     (triton_gemv.gemv with gate=z)

Every conv channel is one output row of in_proj, owned by one program, so a program shifts the
windows of its own channels: nothing is read after another program wrote it. Larger batches run
in_proj as a GEMM and `conv_step` as one kernel (it replaces three compiled kernels that copied
the windows through a `cat`, and the per-layer A = -exp(A_log), which the state update now takes).
A hybrid's attention layer at batch 1 is five: in_proj with its q/k/v conv (no SiLU), `rope_write`
(partial rotate_half RoPE of q and k, k and v into the caches), the split-K attention's two, and
out_proj + residual. References: in_proj + decode.mamba.conv_step, and Attention.core; tests
compare them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from avengers.decode.kernels.triton_gemv import MAX_BATCH, _gemv_acc, _gemv_configs, _prune, quick_bench
from avengers.decode.kernels.triton_pdl import pdl_kwargs

CONV_BLOCK_B, CONV_BLOCK_C = 4, 256  # sequences x channels per program of the standalone conv step


@triton.autotune(
    configs=_gemv_configs(),
    key=["K", "N", "BB", "WIDTH", "SILU", "GDC"],
    prune_configs_by={"early_config_prune": _prune},
    do_bench=quick_bench,
    cache_results=True,
    restore_value=["Window"],  # timing runs shift the windows; each config must start from the same ones
)
@triton.jit
def _in_proj_conv_kernel(
    X,
    NormW,
    W,
    Out,
    Window,
    ConvW,
    ConvB,
    K,
    N,
    C0,
    CD,
    eps,
    sxb,
    sob,
    swb,
    swc,
    sww,
    BB: tl.constexpr,
    B: tl.constexpr,
    WIDTH: tl.constexpr,
    SILU: tl.constexpr,
    GDC: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """rmsnorm(x) @ W^T; output rows [C0, C0 + CD) are conv channels: the window Window[b, c, :]
    shifted by the row's value, silu(window . ConvW[c] + ConvB[c]) (without SILU: the conv alone)
    stored in its place."""
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    r_ok = rows < N
    bs = tl.arange(0, BB)
    b_ok = bs < B
    acc, _, _ = _gemv_acc(
        X, NormW, X, W, X, K, N, 0, eps, sxb, 0, 0, rows, r_ok, bs, b_ok, True, False, False, False, GDC, BK
    )
    v = acc.to(Out.dtype.element_ty).to(tl.float32)  # torch rounds in_proj's output before the conv
    c = rows - C0
    conv_row = r_ok & (c >= 0) & (c < CD)
    c = tl.where(conv_row, c, 0)
    cm = b_ok[:, None] & conv_row[None, :]
    at = Window + bs[:, None] * swb + c[None, :] * swc
    y = v * tl.load(ConvW + c * WIDTH + WIDTH - 1, mask=conv_row, other=0.0).to(tl.float32)[None, :]
    y += tl.load(ConvB + c, mask=conv_row, other=0.0).to(tl.float32)[None, :]
    for w in tl.static_range(WIDTH - 1):  # tap w reads window slot w + 1, then slot w takes it
        s = tl.load(at + (w + 1) * sww, mask=cm, other=0.0)
        y += s.to(tl.float32) * tl.load(ConvW + c * WIDTH + w, mask=conv_row, other=0.0).to(tl.float32)[None, :]
        tl.store(at + w * sww, s, mask=cm)
    tl.store(at + (WIDTH - 1) * sww, v.to(Window.dtype.element_ty), mask=cm)
    if SILU:
        y = y * tl.sigmoid(y)
    out = tl.where(conv_row[None, :], y, v)
    tl.store(Out + bs[:, None] * sob + rows[None, :], out.to(Out.dtype.element_ty), mask=b_ok[:, None] & r_ok[None, :])


def in_proj_conv(
    h: torch.Tensor,
    weight: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    window: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor,
    conv_start: int,
    out_dtype: torch.dtype,
    silu: bool = True,
) -> torch.Tensor:
    """rmsnorm(h [B, K]) * norm_weight @ weight [N, K]^T -> [B, N] in out_dtype, where the columns
    [conv_start, conv_start + C) are silu(causal conv) (the conv alone without silu: a hybrid's
    q/k/v) of their values continuing the conv window [B, C, width] (shifted in place);
    conv_weight [C, 1, width], conv_bias [C]. Columns outside that range are in_proj's own output
    (Mamba-2's z and dt)."""
    B, K = h.shape
    C, width = window.shape[1], window.shape[2]
    N = weight.shape[0]
    if (
        not 1 <= B <= MAX_BATCH
        or h.stride(-1) != 1
        or not weight.is_contiguous()
        or weight.shape[1] != K
        or window.shape[0] != B
        or conv_start + C > N
        or conv_weight.shape != (C, 1, width)
        or not conv_weight.is_contiguous()
        or conv_bias is None
        or conv_bias.shape != (C,)
    ):
        raise ValueError(
            f"in_proj_conv: h {tuple(h.shape)}, weight {tuple(weight.shape)}, conv window {tuple(window.shape)}, "
            f"conv weight {tuple(conv_weight.shape)} from column {conv_start} do not fit B <= {MAX_BATCH}, "
            "a contiguous [N, K] weight and a biased depthwise conv [C, 1, width] within N"
        )
    out = torch.empty(B, N, device=h.device, dtype=out_dtype)
    _in_proj_conv_kernel[lambda meta: (triton.cdiv(N, meta["BN"]),)](
        h,
        norm_weight,
        weight,
        out,
        window,
        conv_weight,
        conv_bias,
        K,
        N,
        conv_start,
        C,
        eps,
        h.stride(0),
        out.stride(0),
        *window.stride(),
        BB=triton.next_power_of_2(B),
        B=B,
        WIDTH=width,
        SILU=silu,
        **pdl_kwargs(h.device),
    )
    return out


@triton.jit
def _conv_step_kernel(
    Window,
    Xbc,
    ConvW,
    ConvB,
    Out,
    B,
    C,
    sxb,
    swb,
    swc,
    sww,
    sob,
    WIDTH: tl.constexpr,
    WP: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Rows [BLOCK_B] x channels [BLOCK_C]: each window Window[b, c, :] shifted by Xbc[b, c] and
    silu(window . ConvW[c] + ConvB[c]) stored to Out[b, c]. The tile is read once, in one piece
    (the windows one slot on, the new value in the last slot), and written back whole."""
    bs = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ws = tl.arange(0, WP)
    bc = (bs < B)[:, None] & (cs < C)[None, :]
    v = tl.load(Xbc + bs[:, None] * sxb + cs[None, :], mask=bc, other=0.0).to(Window.dtype.element_ty)
    at = Window + bs[:, None, None] * swb + cs[None, :, None] * swc + ws[None, None, :] * sww
    shifted = tl.load(at + sww, mask=bc[:, :, None] & (ws < WIDTH - 1)[None, None, :], other=0.0)
    shifted = tl.where((ws == WIDTH - 1)[None, None, :], v[:, :, None], shifted)
    tl.store(at, shifted, mask=bc[:, :, None] & (ws < WIDTH)[None, None, :])
    wm = (cs < C)[:, None] & (ws < WIDTH)[None, :]
    w = tl.load(ConvW + cs[:, None] * WIDTH + ws[None, :], mask=wm, other=0.0).to(tl.float32)
    y = tl.sum(shifted.to(tl.float32) * w[None, :, :], axis=2)
    y += tl.load(ConvB + cs, mask=cs < C, other=0.0).to(tl.float32)[None, :]
    tl.store(Out + bs[:, None] * sob + cs[None, :], (y * tl.sigmoid(y)).to(Out.dtype.element_ty), mask=bc)


def conv_step(
    window: torch.Tensor, xbc: torch.Tensor, conv_weight: torch.Tensor, conv_bias: torch.Tensor
) -> torch.Tensor:
    """decode.mamba.conv_step's conv for any batch: the windows [B, C, width] shifted in place by
    xbc [B, C] (unit last stride) -> silu(conv) [B, C] in xbc's dtype; conv_weight [C, 1, width]
    (contiguous), conv_bias [C]."""
    B, C, width = window.shape
    if (
        xbc.shape != (B, C)
        or xbc.stride(-1) != 1
        or conv_weight.shape != (C, 1, width)
        or not conv_weight.is_contiguous()
        or conv_bias is None
        or conv_bias.shape != (C,)
    ):
        raise ValueError(
            f"conv_step: window {tuple(window.shape)}, input {tuple(xbc.shape)} (unit last stride), conv weight "
            f"{tuple(conv_weight.shape)} (contiguous [C, 1, width]) and a bias [C] do not match"
        )
    out = torch.empty(B, C, device=xbc.device, dtype=xbc.dtype)
    block_b = min(CONV_BLOCK_B, triton.next_power_of_2(B))
    grid = (triton.cdiv(B, block_b), triton.cdiv(C, CONV_BLOCK_C))
    _conv_step_kernel[grid](
        window,
        xbc,
        conv_weight,
        conv_bias,
        out,
        B,
        C,
        xbc.stride(0),
        *window.stride(),
        out.stride(0),
        WIDTH=width,
        WP=triton.next_power_of_2(width),
        BLOCK_B=block_b,
        BLOCK_C=CONV_BLOCK_C,
        num_warps=4,
    )
    return out


@triton.jit
def _rope_write_kernel(
    QKV,
    Cos,
    Sin,
    Pos,
    Q,
    Kc,
    Vc,
    sqkv,
    sqb,
    sqh,
    skb,
    skh,
    skn,
    svb,
    svh,
    svn,
    H,
    HKV,
    HALF,
    HD: tl.constexpr,
):
    """Program (b, j): head j of the row's [q heads | k heads | v heads] (HD channels each). Query and
    key heads get rotate_half over their first 2 * HALF channels (the rest pass through); a query
    head goes to Q[b, j], key head j - H and its value head into the caches at the position."""
    b = (tl.program_id(0) // (H + HKV)).to(tl.int64)
    j = tl.program_id(0) % (H + HKV)
    d = tl.arange(0, HD)
    row = QKV + b * sqkv + j * HD
    x = tl.load(row + d).to(tl.float32)
    rot = d < 2 * HALF
    first = d < HALF
    i = tl.where(first, d, d - HALF)  # the pair's frequency
    partner = tl.load(row + tl.where(first, d + HALF, d - HALF), mask=rot, other=0.0).to(tl.float32)
    c = tl.load(Cos + i, mask=rot, other=1.0)
    s = tl.load(Sin + i, mask=rot, other=0.0)
    y = tl.where(rot, x * c + tl.where(first, -partner, partner) * s, x)
    if j < H:
        tl.store(Q + b * sqb + j * sqh + d, y.to(Q.dtype.element_ty))
    else:
        kh = j - H
        pos = tl.load(Pos)
        tl.store(Kc + b * skb + kh * skh + pos * skn + d, y.to(Kc.dtype.element_ty))
        v = tl.load(QKV + b * sqkv + (H + HKV + kh) * HD + d)
        tl.store(Vc + b * svb + kh * svh + pos * svn + d, v.to(Vc.dtype.element_ty))


def rope_write(
    qkv: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    position: torch.Tensor,
    heads: int,
    state,
) -> torch.Tensor:
    """A hybrid attention layer's decode step between its in_proj (and conv) and the attention:
    qkv [B, (heads + 2 * H_kv) * d] -> q [B, heads, d] in the caches' dtype, with q and k rotated
    by rotate_half over the first 2 * cos.shape[-1] channels (cos/sin [1, r/2] fp32 at `position`,
    ops.rope.rope_cos_sin; None: no rotary), k and v written into state.k/state.v [B, H_kv, S, d]
    at the 0-dim device `position`."""
    B = qkv.shape[0]
    k_cache, v_cache = state.k, state.v
    Hkv, d = k_cache.shape[1], k_cache.shape[-1]
    half = 0 if cos is None else cos.shape[-1]
    if (
        qkv.shape[1] != (heads + 2 * Hkv) * d
        or qkv.stride(-1) != 1
        or d & (d - 1)
        or 2 * half > d
        or (cos is not None and not (cos.is_contiguous() and sin.is_contiguous() and cos.dtype == torch.float32))
        or k_cache.stride(-1) != 1
        or v_cache.stride(-1) != 1
    ):
        raise ValueError(
            f"rope_write: qkv {tuple(qkv.shape)} does not hold {heads} query and {Hkv} key/value heads of a "
            f"power-of-two dim {d} with unit stride, or rotary cos/sin {None if cos is None else tuple(cos.shape)} "
            "are not contiguous fp32 within the head"
        )
    q = torch.empty(B, heads, d, device=qkv.device, dtype=k_cache.dtype)
    _rope_write_kernel[(B * (heads + Hkv),)](
        qkv,
        cos if cos is not None else qkv,  # unread without rotary channels
        sin if sin is not None else qkv,
        position,
        q,
        k_cache,
        v_cache,
        qkv.stride(0),
        *q.stride()[:2],
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        heads,
        Hkv,
        half,
        HD=d,
        num_warps=1,
    )
    return q
