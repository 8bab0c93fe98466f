"""One Llama decode block as one persistent Triton kernel (batch <= 8): `fused_decode` "persistent".

The per-kernel path (triton_gemv.py) runs a block as six kernels, and at every boundary the weight
stream stops: the last programs drain, the next kernel starts, its first loads wait a memory
latency. Here PROGRAMS_PER_SM programs per SM run five phases, separated by grid barriers
(triton_grid.py):

    1. q, k, v = rmsnorm(h) @ Wqkv^T; RoPE; k, v written into the cache     row tiles
    2. attention over the cache, split; the last split of a kv head merges   (kv head, split)
    3. h2 = h + attn @ Wo^T                                                  row tiles
    4. a = silu(g) * u, [g; u] = rmsnorm(h2) @ Wg1^T                        row tiles
    5. out = h2 + a @ W2^T                                                   row tiles

In a GEMV phase a program normalises its input row once, then walks its row tiles (each covering
all of K) through Triton's software pipeline: a STAGES-deep ring of shared memory filled by
cp.async, so STAGES - 1 tiles stream in while one is reduced (register double-buffering, the first
version, reached ~2 TB/s: one tile in flight per SM). Splits of the attention are merged by the
program that finishes a kv head's last split (a counter per head), which saves a barrier and a
phase. Measured against the per-kernel path in docs/benchmarks.md; set STAMPS to time each phase
(benchmarks/gpu_decode_profile.py `_s`). The tile maths is the per-kernel path's
(triton_gemv.x_tile, rope_store; triton_decode.partial_item, merge_item); tests compare the two.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from avengers.inference.triton_decode import BLOCK_N, merge_item, partial_item, sm_count
from avengers.inference.triton_decode import num_splits as attention_splits
from avengers.inference.triton_gemv import MAX_BATCH, rope_operands, rope_store, x_tile
from avengers.inference.triton_grid import cooperative_kwargs, grid_arrive, grid_wait

# Tuned on the H200 at 1k context (docs/benchmarks.md). 2 programs per SM measured 4% faster in bf16,
# but an fp32 model's tiles do not fit twice: the cooperative launch then refuses the grid.
NUM_WARPS = 4
PROGRAMS_PER_SM = 1
TILE_ELEMENTS = 16384  # weight elements per row tile (gate and up: each)
STAGES = 3  # shared-memory ring of row tiles per program: STAGES - 1 in flight
STAMPS: torch.Tensor | None = None  # int64 [programs, 16]: if set, each program's phase-end times (ns), for profiling


@triton.jit
def _stamp(Stamps, pid, i: tl.constexpr, ON: tl.constexpr):
    """Stamps[pid, i] = the GPU's global timer (ns), when profiling (benchmarks/gpu_decode_profile.py)."""
    if ON:
        tl.debug_barrier()
        now = tl.inline_asm_elementwise(
            "mov.u64 $0, %globaltimer;", "=l,r", [pid], dtype=tl.int64, is_pure=False, pack=1
        )
        tl.store(Stamps + pid * 16 + i, now)


@triton.jit
def _gemv_phase(
    X,
    NormW,
    W,
    Res,
    Out,
    K,
    N,
    eps,
    sxb,
    srb,
    sob,
    Count,
    target,
    pid,
    P,
    Cos,
    Sin,
    Q,
    Kc,
    Vc,
    Pos,
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
    NORM: tl.constexpr,
    SWIGLU: tl.constexpr,
    RESIDUAL: tl.constexpr,
    ROPE: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    STAGES: tl.constexpr,
    Stamps,
    STAMP: tl.constexpr,
    STAMPS: tl.constexpr,
    ARRIVE: tl.constexpr,
):
    """This program's row tiles pid, pid + P, ... of one GEMV with triton_gemv.gemv's fusions (or the
    QKV epilogue when ROPE), after waiting for the counter to reach `target` (0: no wait); then its
    phase-end stamp STAMP and, if ARRIVE, its arrival at the next barrier. Triton's pipeliner
    streams the weight tiles through a STAGES-deep ring of shared memory (cp.async), so
    STAGES - 1 tiles are in flight while one is reduced."""
    bs = tl.arange(0, BB)
    b_ok = bs < B
    ks = tl.arange(0, BK)
    k_ok = ks < K
    if target > 0:
        grid_wait(Count, target)
    rstd = tl.full(bs.shape, 1.0, tl.float32)
    if NORM:
        x = x_tile(X, NormW, rstd, bs, b_ok, 0, K, sxb, False, BK, W.dtype.element_ty)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / K + eps)
    x = x_tile(X, NormW, rstd, bs, b_ok, 0, K, sxb, NORM, BK, W.dtype.element_ty)
    for t in tl.range(pid, tl.cdiv(N, BN), P, num_stages=STAGES):
        rows = t * BN + tl.arange(0, BN)
        r_ok = rows < N
        wm = r_ok[:, None] & k_ok[None, :]
        # weights are read once per step (and a step reads far more than the L2 holds): evict them first
        w = tl.load(W + rows[:, None] * K + ks[None, :], mask=wm, other=0.0, eviction_policy="evict_first")
        acc = tl.sum(x[:, None, :] * w.to(tl.float32)[None, :, :], 2)
        if SWIGLU:  # the up rows sit N rows below the gate rows in the fused [gate; up] weight
            u = tl.load(W + (rows[:, None] + N) * K + ks[None, :], mask=wm, other=0.0, eviction_policy="evict_first")
            acc = acc * tl.sigmoid(acc) * tl.sum(x[:, None, :] * u.to(tl.float32)[None, :, :], 2)
        if ROPE:
            c, s, pos = rope_operands(t, Cos, Sin, Pos, NQ, NK, BN)
            rope_store(acc, t, c, s, pos, Q, Kc, Vc, N, skb, skh, skn, svb, svh, svn, NQ, NK, HEAD_DIM, BB, B, BN)
        else:
            om = b_ok[:, None] & r_ok[None, :]
            if RESIDUAL:
                acc += tl.load(Res + bs[:, None] * srb + rows[None, :], mask=om, other=0.0, cache_modifier=".cg").to(
                    tl.float32
                )
            tl.store(Out + bs[:, None] * sob + rows[None, :], acc.to(Out.dtype.element_ty), mask=om)
    _stamp(Stamps, pid, STAMP, STAMPS)
    if ARRIVE:
        grid_arrive(Count)


@triton.jit
def _block_kernel(
    X,
    LnW,
    Wqkv,
    Cos,
    Sin,
    Kc,
    Vc,
    Pos,
    Length,
    Wo,
    FfLnW,
    Wg1,
    W2,
    Q,
    Acc,
    M,
    L,
    Attn,
    H2,
    A,
    Out,
    Count,
    Stamps,
    D,
    HID,
    NQKV,
    NQ,
    NK,
    eps,
    ff_eps,
    skb,
    skh,
    skn,
    svb,
    svh,
    svn,
    H_KV,
    G: tl.constexpr,
    SPLIT,
    NSPLIT,
    BB: tl.constexpr,
    B: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BN_QKV: tl.constexpr,
    BN_O: tl.constexpr,
    BN_UP: tl.constexpr,
    BN_DOWN: tl.constexpr,
    BK_D: tl.constexpr,
    BK_Q: tl.constexpr,
    BK_HID: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_S: tl.constexpr,
    PRECISION: tl.constexpr,
    DYNAMIC_BOUND: tl.constexpr,
    STATIC_SPAN: tl.constexpr,
    STAMPS: tl.constexpr,
    STAGES: tl.constexpr,
):
    pid = tl.program_id(0)
    P = tl.num_programs(0)
    _stamp(Stamps, pid, 0, STAMPS)
    # 1. QKV + RoPE + cache write (X comes from the previous kernel: no wait)
    _gemv_phase(
        X,
        LnW,
        Wqkv,
        X,
        X,
        D,
        NQKV,
        eps,
        D,
        0,
        0,
        Count,
        0,
        pid,
        P,
        Cos,
        Sin,
        Q,
        Kc,
        Vc,
        Pos,
        skb,
        skh,
        skn,
        svb,
        svh,
        svn,
        NQ,
        NK,
        HEAD_DIM,
        BB,
        B,
        True,
        False,
        False,
        True,
        BN_QKV,
        BK_D,
        STAGES,
        Stamps,
        1,
        STAMPS,
        True,
    )
    # 2. attention (reads this step's k, v and q): each (kv head, split) item's partial output; the
    # program that finishes a kv head's last split merges that head's splits (no barrier for pass 2)
    grid_wait(Count, P)
    _stamp(Stamps, pid, 2, STAMPS)
    for item in range(pid, B * H_KV * NSPLIT, P):
        bh = item // NSPLIT
        partial_item(
            Q,
            Kc,
            Vc,
            Length,
            Acc,
            M,
            L,
            NQ,
            HEAD_DIM,
            skb,
            skh,
            skn,
            svb,
            svh,
            svn,
            H_KV,
            G,
            SPLIT,
            NSPLIT,
            1.0,
            bh,
            item % NSPLIT,
            HEAD_DIM,
            BLOCK_G,
            PRECISION,
            DYNAMIC_BOUND,
            STATIC_SPAN,
            BLOCK,
        )
        tl.debug_barrier()  # every thread's partial is stored before the release below
        if tl.atomic_add(Count + 2 + bh, 1, sem="acq_rel") == NSPLIT - 1:
            for g in tl.static_range(G):  # query heads of kv head bh: merge items b * H + h * G + g = bh * G + g
                merge_item(Acc, M, L, Attn, NQ, HEAD_DIM, H_KV, G, NSPLIT, bh * G + g, HEAD_DIM, BLOCK_S)
    _stamp(Stamps, pid, 3, STAMPS)
    grid_arrive(Count)
    # 3. h2 = h + attn @ Wo^T
    _gemv_phase(
        Attn,
        X,
        Wo,
        X,
        H2,
        NQ,
        D,
        0.0,
        NQ,
        D,
        D,
        Count,
        2 * P,
        pid,
        P,
        Cos,
        Sin,
        Q,
        Kc,
        Vc,
        Pos,
        skb,
        skh,
        skn,
        svb,
        svh,
        svn,
        NQ,
        NK,
        HEAD_DIM,
        BB,
        B,
        False,
        False,
        True,
        False,
        BN_O,
        BK_Q,
        STAGES,
        Stamps,
        4,
        STAMPS,
        True,
    )
    # 4. a = SwiGLU(rmsnorm(h2) @ Wg1^T)
    _gemv_phase(
        H2,
        FfLnW,
        Wg1,
        X,
        A,
        D,
        HID,
        ff_eps,
        D,
        0,
        HID,
        Count,
        3 * P,
        pid,
        P,
        Cos,
        Sin,
        Q,
        Kc,
        Vc,
        Pos,
        skb,
        skh,
        skn,
        svb,
        svh,
        svn,
        NQ,
        NK,
        HEAD_DIM,
        BB,
        B,
        True,
        True,
        False,
        False,
        BN_UP,
        BK_D,
        STAGES,
        Stamps,
        5,
        STAMPS,
        True,
    )
    # 5. out = h2 + a @ W2^T
    _gemv_phase(
        A,
        X,
        W2,
        H2,
        Out,
        HID,
        D,
        0.0,
        HID,
        D,
        D,
        Count,
        4 * P,
        pid,
        P,
        Cos,
        Sin,
        Q,
        Kc,
        Vc,
        Pos,
        skb,
        skh,
        skn,
        svb,
        svh,
        svn,
        NQ,
        NK,
        HEAD_DIM,
        BB,
        B,
        False,
        False,
        True,
        False,
        BN_DOWN,
        BK_HID,
        STAGES,
        Stamps,
        6,
        STAMPS,
        False,
    )


def _programs(device: torch.device) -> int:
    """PROGRAMS_PER_SM programs per SM (all must be resident for the grid barriers); one under the
    interpreter, which runs programs one after another."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return 1
    return PROGRAMS_PER_SM * sm_count(device)


def _tile_rows(K: int, swiglu: bool = False) -> int:
    """Rows per tile so that a tile (gate and up: two) is about TILE_ELEMENTS weights, at least 2 (RoPE pairs)."""
    return max(2, TILE_ELEMENTS // (triton.next_power_of_2(K) * (2 if swiglu else 1)))


def decode_block(
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
    length: torch.Tensor,
    dense_w: torch.Tensor,
    ff_ln_w: torch.Tensor,
    ff_eps: float,
    wg1_w: torch.Tensor,
    w2_w: torch.Tensor,
    hidden: int,
    num_splits: int | None = None,
) -> torch.Tensor:
    """A whole Llama block for one token: llama_compiled.decode_pre + KVState.write_at + attention over
    the cache up to the 0-dim `length` + decode_post, as one kernel. h [B, 1, D] -> [B, 1, D].
    num_splits: attention splits of the cache (default: about one (kv head, split) per program)."""
    B, _, D = h.shape
    x = h.reshape(B, D)
    k_cache, v_cache = state.k, state.v
    NQ, NK = H * d, Hkv * d
    if (
        not 1 <= B <= MAX_BATCH
        or not x.is_contiguous()
        or qkv_w.shape != (NQ + 2 * NK, D)
        or dense_w.shape != (D, NQ)
        or wg1_w.shape != (2 * hidden, D)
        or w2_w.shape != (D, hidden)
        or not all(w.is_contiguous() for w in (qkv_w, dense_w, wg1_w, w2_w))
        or cos.shape != (H + Hkv, d // 2)
        or sin.shape != cos.shape
        or cos.dtype != torch.float32
        or not cos.is_contiguous()
        or not sin.is_contiguous()
        or k_cache.shape != v_cache.shape
        or k_cache.shape[1] != Hkv
        or k_cache.shape[-1] != d
        or k_cache.stride(-1) != 1
        or v_cache.stride(-1) != 1
        or d & (d - 1)
        or H % Hkv
    ):
        raise ValueError(
            f"persistent decode block: h {tuple(h.shape)}, weights qkv {tuple(qkv_w.shape)} wo "
            f"{tuple(dense_w.shape)} wg1 {tuple(wg1_w.shape)} w2 {tuple(w2_w.shape)}, cos/sin "
            f"{tuple(cos.shape)} (fp32, contiguous), caches {tuple(k_cache.shape)} do not fit "
            f"B <= {MAX_BATCH}, H={H}, H_kv={Hkv}, d={d} (a power of 2), hidden={hidden}"
        )
    dev, dt = h.device, h.dtype
    programs = _programs(dev)
    heads = B * Hkv  # at most one (head, split) item per program: a second round would double the phase
    split, nsplit = attention_splits(
        B, Hkv, k_cache.shape[2], dev, programs=num_splits * heads if num_splits else max(1, programs // heads) * heads
    )
    G = H // Hkv
    q = torch.empty(B, NQ, device=dev, dtype=dt)
    attn = torch.empty(B, NQ, device=dev, dtype=dt)
    h2 = torch.empty(B, D, device=dev, dtype=dt)
    a = torch.empty(B, hidden, device=dev, dtype=dt)
    out = torch.empty(B, D, device=dev, dtype=dt)
    acc = torch.empty(B * Hkv * nsplit * G, d, device=dev, dtype=torch.float32)
    m = torch.empty(B * Hkv * nsplit * G, device=dev, dtype=torch.float32)
    l_sum = torch.empty_like(m)
    # arrivals at the grid barriers; 1 if a barrier wait gave up; finished splits per (sequence, kv head)
    count = torch.zeros(2 + B * Hkv, device=dev, dtype=torch.int32)
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    _block_kernel[(programs,)](
        x,
        ln_w,
        qkv_w,
        cos,
        sin,
        k_cache,
        v_cache,
        position,
        length,
        dense_w,
        ff_ln_w,
        wg1_w,
        w2_w,
        q,
        acc,
        m,
        l_sum,
        attn,
        h2,
        a,
        out,
        count,
        STAMPS if STAMPS is not None else count,
        D,
        hidden,
        NQ + 2 * NK,
        NQ,
        NK,
        eps,
        ff_eps,
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        Hkv,
        G,
        split,
        nsplit,
        BB=triton.next_power_of_2(B),
        B=B,
        HEAD_DIM=d,
        BN_QKV=_tile_rows(D),
        BN_O=_tile_rows(NQ),
        BN_UP=_tile_rows(D, swiglu=True),
        BN_DOWN=_tile_rows(hidden),
        BK_D=triton.next_power_of_2(D),
        BK_Q=triton.next_power_of_2(NQ),
        BK_HID=triton.next_power_of_2(hidden),
        BLOCK_G=max(16, triton.next_power_of_2(G)),
        BLOCK=128 if split % 128 == 0 and not interpret else BLOCK_N,
        BLOCK_S=triton.next_power_of_2(nsplit),
        PRECISION="ieee" if dt == torch.float32 else "tf32",
        DYNAMIC_BOUND=not interpret,
        STATIC_SPAN=split if interpret else 0,
        STAMPS=STAMPS is not None,
        STAGES=STAGES,
        num_warps=NUM_WARPS,
        **cooperative_kwargs(dev),
    )
    return out.view(B, 1, D)
