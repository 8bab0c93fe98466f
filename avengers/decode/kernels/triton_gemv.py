"""Small-batch GEMV with fused RMSNorm prologue, SwiGLU or residual epilogue, and RoPE, in Triton.

A Llama decode step at batch 1 is bandwidth-bound on the weights, but torch runs each block as
~15 kernels (norm, matmul, RoPE, cache write, residual add, SiLU-multiply, ...), and at 1-2B parameters their
fixed per-kernel cost is as large as the weight reads. Here a block's four
weight matmuls are four kernels that also do the work around them:

    rmsnorm(h) @ Wqkv^T          h + attn @ Wo^T          silu(g) * u, [g; u] = rmsnorm(h) @ Wg1^T          h + a @ W2^T

the first of which also rotates the query and key and writes key and value into the cache. References:
llama_block.decode_pre (+ KVState.write_at) and decode_post, the same maths in torch; tests
compare them. Each GEMV program owns BN output rows and streams those weight rows once for
every sequence of the (small) batch; BN, BK and the warp count are autotuned per shape on a GPU
(one fixed config under Triton's CPU interpreter, which cannot time kernels).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from avengers.decode.kernels.triton_pdl import pdl_kwargs

MAX_BATCH = 8  # rows the kernels take; decode steps use them at batch 1 (options.GEMV_STEP_MAX_BATCH)


def _gemv_configs() -> list[triton.Config]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({"BN": 16, "BK": 128})]
    # (rows, K block); the autotuner picks per shape
    tiles = [(2, 1024), (2, 2048), (4, 512), (4, 1024), (4, 2048), (8, 512), (8, 1024), (8, 2048), (16, 512)]
    return [triton.Config({"BN": bn, "BK": bk}, num_warps=w) for bn, bk in tiles for w in (2, 4, 8)]


def quick_bench(kernel_call, quantiles):  # autotune timing (here and triton_decode): a short run per config is enough
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


def _prune(configs, named_args, **kwargs):
    """Keep the [BB, BN, BK] product tile within a register budget for this batch size, and no K
    block wider than the narrowest one that covers K (a wider one only reads masked zeros), so a
    small model tunes a third of the tiles."""
    bb = kwargs.get("BB", named_args.get("BB", 1))
    k = named_args["K"]
    covering = min((c.kwargs["BK"] for c in configs if c.kwargs["BK"] >= k), default=None)
    kept = [
        c
        for c in configs
        if bb * c.kwargs["BN"] * c.kwargs["BK"] <= 16384 and (covering is None or c.kwargs["BK"] <= covering)
    ]
    return kept or configs[:1]


@triton.jit
def x_parts(X, NormW, Z, bs, b_ok, k0, K, sxb, szb, NORM: tl.constexpr, GATE: tl.constexpr, BK: tl.constexpr):
    """[BB, BK] fp32 tile of the input rows (times silu(z) of the gate rows Z when GATE), and that
    tile times the norm weight when NORM (else the tile again)."""
    ks = k0 + tl.arange(0, BK)
    k_ok = ks < K
    m = b_ok[:, None] & k_ok[None, :]
    # .cg: in the persistent block kernel X was just written by other programs (read past L1)
    x = tl.load(X + bs[:, None] * sxb + ks[None, :], mask=m, other=0.0, cache_modifier=".cg").to(tl.float32)
    if GATE:
        z = tl.load(Z + bs[:, None] * szb + ks[None, :], mask=m, other=0.0, cache_modifier=".cg").to(tl.float32)
        x = x * z * tl.sigmoid(z)
    gx = x
    if NORM:
        gx = x * tl.load(NormW + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    return x, gx


@triton.jit
def _gemv_acc(
    X,
    NormW,
    Z,
    W,
    Res,
    K,
    N,
    UP,
    eps,
    sxb,
    szb,
    srb,
    rows,
    r_ok,
    bs,
    b_ok,
    NORM: tl.constexpr,
    GATE: tl.constexpr,
    SWIGLU: tl.constexpr,
    RESIDUAL: tl.constexpr,
    GDC: tl.constexpr,
    BK: tl.constexpr,
):
    """fp32 [BB, BN] products of the (gated, normalised) input rows with weight rows `rows` (and with the
    up rows `rows + UP` when SWIGLU: returned second, else the first again), and the residual
    rows when RESIDUAL (read right after the wait, so that their latency overlaps the products).
    With NORM the rows' sums of squares are gathered in the product loop and their RMS scale
    applied to the products at the end (rmsnorm(x) @ W^T = rstd * ((x * g) @ W^T)): the input
    row is read once, not once for its RMS and again for the products."""
    # The first weight tile is loaded before waiting for the previous kernel: weights are never
    # written during decode, while X (a previous kernel's output) is read only after.
    ks = tl.arange(0, BK)
    wm = r_ok[:, None] & (ks < K)[None, :]
    # weights are read once per step (and a step reads far more than the L2 holds): evict them first
    w_first = tl.load(W + rows[:, None] * K + ks[None, :], mask=wm, other=0.0, eviction_policy="evict_first")
    u_first = w_first
    if SWIGLU:  # the up rows sit UP rows from the gate rows in the fused weight
        u_first = tl.load(W + (rows[:, None] + UP) * K + ks[None, :], mask=wm, other=0.0, eviction_policy="evict_first")
    if GDC:
        tl.extra.cuda.gdc_wait()
    res = tl.zeros((bs.shape[0], rows.shape[0]), tl.float32)
    if RESIDUAL:
        om = b_ok[:, None] & r_ok[None, :]
        res = tl.load(Res + bs[:, None] * srb + rows[None, :], mask=om, other=0.0, cache_modifier=".cg").to(tl.float32)
    x, gx = x_parts(X, NormW, Z, bs, b_ok, 0, K, sxb, szb, NORM, GATE, BK)
    ss = tl.sum(x * x, 1) if NORM else tl.zeros(bs.shape, tl.float32)
    acc = tl.sum(gx[:, None, :] * w_first.to(tl.float32)[None, :, :], 2)
    acc_up = acc
    if SWIGLU:
        acc_up = tl.sum(gx[:, None, :] * u_first.to(tl.float32)[None, :, :], 2)
    for k0 in range(BK, K, BK):
        ks = k0 + tl.arange(0, BK)
        x, gx = x_parts(X, NormW, Z, bs, b_ok, k0, K, sxb, szb, NORM, GATE, BK)
        if NORM:
            ss += tl.sum(x * x, 1)
        wm = r_ok[:, None] & (ks < K)[None, :]
        w = tl.load(W + rows[:, None] * K + ks[None, :], mask=wm, other=0.0, eviction_policy="evict_first")
        acc += tl.sum(gx[:, None, :] * w.to(tl.float32)[None, :, :], 2)
        if SWIGLU:
            u = tl.load(W + (rows[:, None] + UP) * K + ks[None, :], mask=wm, other=0.0, eviction_policy="evict_first")
            acc_up += tl.sum(gx[:, None, :] * u.to(tl.float32)[None, :, :], 2)
    if NORM:
        rstd = 1.0 / tl.sqrt(ss / K + eps)
        acc *= rstd[:, None]
        acc_up *= rstd[:, None]
    if GDC:  # programmatic dependent launch (triton_pdl.py): this program's weight reads are issued,
        tl.extra.cuda.gdc_launch_dependents()  # so the next kernel may start loading its own
    return acc, acc_up, res


@triton.jit
def rope_operands(tile, Cos, Sin, Pos, NQ, NK, BN: tl.constexpr):
    """What rope_store reads besides the GEMV rows of tile `tile`: cos and sin per rotation pair
    [1, BN / 2] (they carry the query's 1/sqrt(d) scale; value rows get cos 1, sin 0) and the cache
    position. Rotation pairs are adjacent rows (2j, 2j+1), so they sit in the same tile (BN even)
    and the pair index is row // 2."""
    pair = tile * (BN // 2) + tl.arange(0, BN // 2)
    rot = pair * 2 < NQ + NK
    c = tl.load(Cos + pair, mask=rot, other=1.0)[None, :]
    s = tl.load(Sin + pair, mask=rot, other=0.0)[None, :]
    return c, s, tl.load(Pos)


@triton.jit
def rope_store(
    acc,
    tile,
    c,
    s,
    pos,
    Q,
    Kc,
    Vc,
    N,
    skb,
    skh,
    skn,
    svb,
    svh,
    svn,
    NQ,
    NK,
    HEAD_DIM,
    BB: tl.constexpr,
    B: tl.constexpr,
    BN: tl.constexpr,
):
    """The QKV epilogue for fp32 rows [tile * BN, + BN) of rmsnorm(x) @ Wqkv^T, given (c, s, pos)
    from rope_operands: query rows rotated into Q [B, NQ], key rows rotated and value rows copied
    into the caches at position pos."""
    rows = tile * BN + tl.arange(0, BN)
    r_ok = rows < N
    bs = tl.arange(0, BB)
    b_ok = bs < B
    acc = acc.to(Q.dtype.element_ty).to(tl.float32)  # torch rounds the matmul output before rotating
    x0, x1 = tl.split(tl.reshape(acc, (BB, BN // 2, 2)))
    y = tl.reshape(tl.join(x0 * c - x1 * s, x0 * s + x1 * c), (BB, BN)).to(Q.dtype.element_ty)
    om = b_ok[:, None] & r_ok[None, :]
    tl.store(Q + bs[:, None] * NQ + rows[None, :], y, mask=om & (rows < NQ)[None, :])
    kr = rows - NQ
    k_at = bs[:, None] * skb + (kr // HEAD_DIM)[None, :] * skh + pos * skn + (kr % HEAD_DIM)[None, :]
    tl.store(Kc + k_at, y, mask=om & ((kr >= 0) & (kr < NK))[None, :])
    vr = rows - NQ - NK
    v_at = bs[:, None] * svb + (vr // HEAD_DIM)[None, :] * svh + pos * svn + (vr % HEAD_DIM)[None, :]
    tl.store(Vc + v_at, y, mask=om & (vr >= 0)[None, :])


@triton.autotune(
    configs=_gemv_configs(),
    key=["K", "N", "BB", "NORM", "GATE", "SWIGLU", "RESIDUAL", "GDC"],
    prune_configs_by={"early_config_prune": _prune},
    do_bench=quick_bench,
    cache_results=True,
)
@triton.jit
def _gemv_kernel(
    X,
    NormW,
    Z,
    W,
    Res,
    Out,
    K,
    N,
    UP,
    eps,
    sxb,
    szb,
    srb,
    sob,
    BB: tl.constexpr,
    B: tl.constexpr,
    NORM: tl.constexpr,
    GATE: tl.constexpr,
    SWIGLU: tl.constexpr,
    RESIDUAL: tl.constexpr,
    GDC: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    r_ok = rows < N
    bs = tl.arange(0, BB)
    b_ok = bs < B
    acc, acc_up, res = _gemv_acc(
        X, NormW, Z, W, Res, K, N, UP, eps, sxb, szb, srb, rows, r_ok, bs, b_ok, NORM, GATE, SWIGLU, RESIDUAL, GDC, BK
    )
    if SWIGLU:
        acc = acc * tl.sigmoid(acc) * acc_up
    om = b_ok[:, None] & r_ok[None, :]
    if RESIDUAL:
        acc += res
    tl.store(Out + bs[:, None] * sob + rows[None, :], acc.to(Out.dtype.element_ty), mask=om)


@triton.autotune(
    configs=_gemv_configs(),
    key=["K", "N", "BB", "GDC"],
    prune_configs_by={"early_config_prune": _prune},
    do_bench=quick_bench,
    cache_results=True,
)
@triton.jit
def _qkv_rope_kernel(
    X,
    NormW,
    W,
    Cos,
    Sin,
    Q,
    Kc,
    Vc,
    Pos,
    K,
    N,
    eps,
    sxb,
    skb,
    skh,
    skn,
    svb,
    svh,
    svn,
    NQ,
    NK,
    HEAD_DIM,
    BB: tl.constexpr,
    B: tl.constexpr,
    GDC: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """rmsnorm(x) @ Wqkv^T, then the rope_store epilogue."""
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    bs = tl.arange(0, BB)
    # read before the wait, so that their latency hides behind the products: cos, sin and the position
    # were written by the plain (non-PDL) kernels before the step's first block, which the first
    # block's kernels cannot overtake
    c, s, pos = rope_operands(tl.program_id(0), Cos, Sin, Pos, NQ, NK, BN)
    acc, _, _ = _gemv_acc(
        X, NormW, X, W, X, K, N, 0, eps, sxb, 0, 0, rows, rows < N, bs, bs < B, True, False, False, False, GDC, BK
    )
    rope_store(
        acc, tl.program_id(0), c, s, pos, Q, Kc, Vc, N, skb, skh, skn, svb, svh, svn, NQ, NK, HEAD_DIM, BB, B, BN
    )


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    residual: torch.Tensor | None = None,
    swiglu: bool = False,
    gate_last: bool = False,
    out_dtype: torch.dtype | None = None,
    gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [B, K] (B <= MAX_BATCH, unit last stride) @ weight[N', K]^T with the optional fusions:
    x * silu(gate) first (gate [B, K]: Mamba-2's gated RMSNorm over one group), then rmsnorm(.) *
    norm_weight; swiglu: weight is [gate; up] (N' = 2N; [up; gate] with gate_last, as mamba_ssm's
    GatedMLP fc1), output silu(gate) * up; residual [B, N] added last. Returns [B, N] in out_dtype
    (default x's dtype)."""
    B, K = x.shape
    if not 1 <= B <= MAX_BATCH or x.stride(-1) != 1 or not weight.is_contiguous() or weight.shape[1] != K:
        raise ValueError(
            f"gemv needs x [B <= {MAX_BATCH}, K] with unit last stride and a contiguous weight [N, K]; "
            f"got x {tuple(x.shape)} strides {x.stride()}, weight {tuple(weight.shape)}"
        )
    N = weight.shape[0] // 2 if swiglu else weight.shape[0]
    out = torch.empty(B, N, device=x.device, dtype=out_dtype or x.dtype)
    if residual is not None and (residual.shape != out.shape or residual.stride(-1) != 1):
        raise ValueError(f"residual must be [{B}, {N}] with unit last stride, got {tuple(residual.shape)}")
    if gate is not None and (gate.shape != x.shape or gate.stride(-1) != 1):
        raise ValueError(f"gate must be [{B}, {K}] with unit last stride, got {tuple(gate.shape)}")
    # gate_last: the kernel's gate rows from row N on (a view), its up rows N rows before them
    w, up = (weight[N:], -N) if swiglu and gate_last else (weight, N)
    _gemv_kernel[lambda meta: (triton.cdiv(N, meta["BN"]),)](
        x,
        norm_weight if norm_weight is not None else x,
        gate if gate is not None else x,
        w,
        residual if residual is not None else out,
        out,
        K,
        N,
        up,
        eps,
        x.stride(0),
        gate.stride(0) if gate is not None else 0,
        residual.stride(0) if residual is not None else 0,
        out.stride(0),
        BB=triton.next_power_of_2(B),
        B=B,
        NORM=norm_weight is not None,
        GATE=gate is not None,
        SWIGLU=swiglu,
        RESIDUAL=residual is not None,
        **pdl_kwargs(x.device),
    )
    return out


def decode_pre_write(
    h: torch.Tensor,
    ln_w: torch.Tensor,
    eps: float,
    qkv_w: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    H: int,
    Hkv: int,
    d: int,
    state,
    position: torch.Tensor,
) -> torch.Tensor:
    """llama_block.decode_pre + KVState.write_at as one kernel: RMSNorm + QKV GEMV, then RoPE on
    q and k (adjacent pairs; cos/sin [H + H_kv, d/2] fp32, contiguous) with k and v written into the
    caches [B, H_kv, S, d] at the 0-dim device `position`. Returns q [B, H, d] (rotated, pre-scaled)."""
    B = h.shape[0]
    x = h.reshape(B, -1)
    k_cache, v_cache = state.k, state.v
    if (
        not 1 <= B <= MAX_BATCH
        or x.stride(-1) != 1
        or not qkv_w.is_contiguous()
        or qkv_w.shape != ((H + 2 * Hkv) * d, x.shape[1])
        or cos.shape != (H + Hkv, d // 2)
        or sin.shape != cos.shape
        or not cos.is_contiguous()
        or not sin.is_contiguous()
        or cos.dtype != torch.float32
        or sin.dtype != torch.float32
        or k_cache.shape != v_cache.shape
        or k_cache.shape[-1] != d
        or k_cache.stride(-1) != 1
        or v_cache.stride(-1) != 1
    ):
        raise ValueError(
            f"decode_pre_write: h {tuple(h.shape)}, qkv weight {tuple(qkv_w.shape)}, cos/sin "
            f"{tuple(cos.shape)} (fp32, contiguous), caches {tuple(k_cache.shape)} do not fit "
            f"B <= {MAX_BATCH}, H={H}, H_kv={Hkv}, d={d}"
        )
    q = torch.empty(B, H, d, device=h.device, dtype=k_cache.dtype)
    N = qkv_w.shape[0]
    _qkv_rope_kernel[lambda meta: (triton.cdiv(N, meta["BN"]),)](
        x,
        ln_w,
        qkv_w,
        cos,
        sin,
        q,
        k_cache,
        v_cache,
        position,
        x.shape[1],
        N,
        eps,
        x.stride(0),
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        H * d,
        Hkv * d,
        d,
        BB=triton.next_power_of_2(B),
        B=B,
        **pdl_kwargs(h.device),
    )
    return q


def decode_post(
    h: torch.Tensor,
    attn: torch.Tensor,
    dense_w: torch.Tensor,
    ln_w: torch.Tensor,
    eps: float,
    wg1_w: torch.Tensor,
    w2_w: torch.Tensor,
    hidden: int,
) -> torch.Tensor:
    """llama_block.decode_post in three kernels: Wo + residual, norm + [Wg; W1] + SwiGLU, W2 + residual."""
    B, _, D = h.shape
    h2 = gemv(attn.reshape(B, -1), dense_w, residual=h.reshape(B, D))
    if wg1_w.shape[0] != 2 * hidden:
        raise ValueError(f"fused gate/up weight has {wg1_w.shape[0]} rows, expected 2 * {hidden}")
    a = gemv(h2, wg1_w, norm_weight=ln_w, eps=eps, swiglu=True)
    return gemv(a, w2_w, residual=h2).view(B, 1, D)
