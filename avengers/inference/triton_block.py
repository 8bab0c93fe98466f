"""One Llama decode block as one persistent Triton kernel (batch <= 8): `fused_decode` "persistent".

The per-kernel path (triton_gemv.py) runs a block as six kernels, and at every boundary the weight
stream stops: the last programs drain, the next kernel starts, its first loads wait a memory
latency (together about a third of a 1.8B model's batch-1 step on the H200, docs/benchmarks.md).
Here one program per SM runs the six phases, separated by grid barriers (triton_grid.py):

    1. q, k, v = rmsnorm(h) @ Wqkv^T; RoPE; k, v written into the cache     row tiles
    2. attention pass 1 over the cache                                       (kv head, split)
    3. attention pass 2: the splits merged                                   query heads
    4. h2 = h + attn @ Wo^T                                                  row tiles
    5. a = silu(g) * u, [g; u] = rmsnorm(h2) @ Wg1^T                        row tiles
    6. out = h2 + a @ W2^T                                                   row tiles

In a GEMV phase a program normalises its input row once, then walks its row tiles (each covering
all of K) with the next tile's load issued before the current one is reduced, and it issues its
first tile's load before it waits at the barrier, so the memory keeps streaming while the slowest
program finishes the previous phase. Optionally (PREFETCH_TILES) each program also asks the L2
for its first tiles of the next GEMV where the memory would idle: Wo during the attention, gate/up
and W2 at the barriers before them. The tile maths is the per-kernel path's (triton_gemv.x_tile,
rope_store; triton_decode.partial_item, merge_item); tests compare the two paths.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from avengers.inference.triton_decode import BLOCK_N, merge_item, partial_item, sm_count
from avengers.inference.triton_decode import num_splits as attention_splits
from avengers.inference.triton_gemv import MAX_BATCH, rope_store, x_tile
from avengers.inference.triton_grid import cooperative_kwargs, grid_arrive, grid_wait

NUM_WARPS = 8
TILE_ELEMENTS = 8192  # weight elements per row tile (two tiles in flight per program, gate and up each)
PREFETCH_TILES = 0  # row tiles per program of the next GEMV hinted into the L2 while waiting (0: none)


@triton.jit
def _rows(W, t, N, K, ks, k_ok, SWIGLU: tl.constexpr, BN: tl.constexpr):
    """Row tile t of W [N(, + N up rows), K] as loaded values (masked past N: no memory traffic)."""
    rows = t * BN + tl.arange(0, BN)
    m = (rows < N)[:, None] & k_ok[None, :]
    w = tl.load(W + rows[:, None] * K + ks[None, :], mask=m, other=0.0, eviction_policy="evict_first")
    u = w
    if SWIGLU:
        u = tl.load(W + (rows[:, None] + N) * K + ks[None, :], mask=m, other=0.0, eviction_policy="evict_first")
    return w, u


@triton.jit
def _prefetch_l2(W, pid, P, N, K, TILES: tl.constexpr, SWIGLU: tl.constexpr, BN: tl.constexpr):
    """Ask the L2 for this program's first TILES row tiles of W (cp.async.bulk.prefetch, sm_90+): a
    hint nothing waits for, issued where the memory would otherwise idle (a barrier, attention at
    short context)."""
    if TILES > 0:
        elem: tl.constexpr = W.dtype.element_ty.primitive_bitwidth // 8
        i = tl.arange(0, 512)  # >= threads per program (16 warps): no thread repeats another's prefetch
        rows = (pid + i * P) * BN
        nbytes = tl.where(i < TILES, tl.maximum(tl.minimum(N - rows, BN), 0) * K * elem, 0).to(tl.int32)
        at = W.to(tl.pointer_type(tl.int8)) + rows.to(tl.int64) * K * elem
        asm: tl.constexpr = "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }"
        tl.inline_asm_elementwise(asm, "=r,l,r", [at, nbytes], dtype=tl.int32, is_pure=False, pack=1)
        if SWIGLU:  # the up rows, N rows below
            tl.inline_asm_elementwise(asm, "=r,l,r", [at + N * K * elem, nbytes], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _gemv_phase(X, NormW, W, Res, Out, K, N, eps, sxb, srb, sob, Count, target, pid, P,
                Cos, Sin, Q, Kc, Vc, Pos, skb, skh, skn, svb, svh, svn, NQ, NK, HEAD_DIM,
                BB: tl.constexpr, B: tl.constexpr, NORM: tl.constexpr, SWIGLU: tl.constexpr,
                RESIDUAL: tl.constexpr, ROPE: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """This program's row tiles pid, pid + P, ... of one GEMV with triton_gemv.gemv's fusions (or the
    QKV epilogue when ROPE), after waiting for the counter to reach `target` (0: no wait)."""
    bs = tl.arange(0, BB)
    b_ok = bs < B
    ks = tl.arange(0, BK)
    k_ok = ks < K
    w_next, u_next = _rows(W, pid, N, K, ks, k_ok, SWIGLU, BN)  # in flight across the barrier
    if target > 0:
        grid_wait(Count, target)
    rstd = tl.full(bs.shape, 1.0, tl.float32)
    if NORM:
        x = x_tile(X, NormW, rstd, bs, b_ok, 0, K, sxb, False, BK, W.dtype.element_ty)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / K + eps)
    x = x_tile(X, NormW, rstd, bs, b_ok, 0, K, sxb, NORM, BK, W.dtype.element_ty)
    for t in range(pid, tl.cdiv(N, BN), P):
        w, u = w_next, u_next
        w_next, u_next = _rows(W, t + P, N, K, ks, k_ok, SWIGLU, BN)
        acc = tl.sum(x[:, None, :] * w.to(tl.float32)[None, :, :], 2)
        if SWIGLU:
            acc = acc * tl.sigmoid(acc) * tl.sum(x[:, None, :] * u.to(tl.float32)[None, :, :], 2)
        if ROPE:
            rope_store(acc, t, Cos, Sin, Q, Kc, Vc, Pos, N, skb, skh, skn, svb, svh, svn, NQ, NK, HEAD_DIM, BB, B, BN)
        else:
            rows = t * BN + tl.arange(0, BN)
            om = b_ok[:, None] & (rows < N)[None, :]
            if RESIDUAL:
                acc += tl.load(Res + bs[:, None] * srb + rows[None, :], mask=om, other=0.0,
                               cache_modifier=".cg").to(tl.float32)
            tl.store(Out + bs[:, None] * sob + rows[None, :], acc.to(Out.dtype.element_ty), mask=om)


@triton.jit
def _block_kernel(X, LnW, Wqkv, Cos, Sin, Kc, Vc, Pos, Length, Wo, FfLnW, Wg1, W2,
                  Q, Acc, M, L, Attn, H2, A, Out, Count,
                  D, HID, NQKV, NQ, NK, eps, ff_eps, skb, skh, skn, svb, svh, svn, H_KV, G, SPLIT, NSPLIT,
                  BB: tl.constexpr, B: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BN_QKV: tl.constexpr, BN_O: tl.constexpr, BN_UP: tl.constexpr, BN_DOWN: tl.constexpr,
                  BK_D: tl.constexpr, BK_Q: tl.constexpr, BK_HID: tl.constexpr,
                  BLOCK_G: tl.constexpr, BLOCK: tl.constexpr, BLOCK_S: tl.constexpr, PRECISION: tl.constexpr,
                  DYNAMIC_BOUND: tl.constexpr, STATIC_SPAN: tl.constexpr, PREFETCH: tl.constexpr):
    pid = tl.program_id(0)
    P = tl.num_programs(0)
    # 1. QKV + RoPE + cache write (X comes from the previous kernel: no wait)
    _gemv_phase(X, LnW, Wqkv, X, X, D, NQKV, eps, D, 0, 0, Count, 0, pid, P,
                Cos, Sin, Q, Kc, Vc, Pos, skb, skh, skn, svb, svh, svn, NQ, NK, HEAD_DIM,
                BB, B, True, False, False, True, BN_QKV, BK_D)
    grid_arrive(Count)
    _prefetch_l2(Wo, pid, P, D, NQ, PREFETCH, False, BN_O)  # fetched while the attention runs
    # 2. attention pass 1 (reads this step's k, v and q)
    grid_wait(Count, P)
    for item in range(pid, B * H_KV * NSPLIT, P):
        partial_item(Q, Kc, Vc, Length, Acc, M, L, NQ, HEAD_DIM, skb, skh, skn, svb, svh, svn, H_KV, G, SPLIT,
                     NSPLIT, 1.0, item // NSPLIT, item % NSPLIT, HEAD_DIM, BLOCK_G, PRECISION, DYNAMIC_BOUND,
                     STATIC_SPAN, BLOCK)
    grid_arrive(Count)
    # 3. attention pass 2
    grid_wait(Count, 2 * P)
    for item in range(pid, B * H_KV * G, P):
        merge_item(Acc, M, L, Attn, NQ, HEAD_DIM, H_KV, G, NSPLIT, item, HEAD_DIM, BLOCK_S)
    grid_arrive(Count)
    # 4. h2 = h + attn @ Wo^T
    _gemv_phase(Attn, X, Wo, X, H2, NQ, D, 0.0, NQ, D, D, Count, 3 * P, pid, P,
                Cos, Sin, Q, Kc, Vc, Pos, skb, skh, skn, svb, svh, svn, NQ, NK, HEAD_DIM,
                BB, B, False, False, True, False, BN_O, BK_Q)
    grid_arrive(Count)
    _prefetch_l2(Wg1, pid, P, HID, D, PREFETCH, True, BN_UP)
    # 5. a = SwiGLU(rmsnorm(h2) @ Wg1^T)
    _gemv_phase(H2, FfLnW, Wg1, X, A, D, HID, ff_eps, D, 0, HID, Count, 4 * P, pid, P,
                Cos, Sin, Q, Kc, Vc, Pos, skb, skh, skn, svb, svh, svn, NQ, NK, HEAD_DIM,
                BB, B, True, True, False, False, BN_UP, BK_D)
    grid_arrive(Count)
    _prefetch_l2(W2, pid, P, D, HID, PREFETCH, False, BN_DOWN)
    # 6. out = h2 + a @ W2^T
    _gemv_phase(A, X, W2, H2, Out, HID, D, 0.0, HID, D, D, Count, 5 * P, pid, P,
                Cos, Sin, Q, Kc, Vc, Pos, skb, skh, skn, svb, svh, svn, NQ, NK, HEAD_DIM,
                BB, B, False, False, True, False, BN_DOWN, BK_HID)


def _programs(device: torch.device) -> int:
    """One program per SM (all must be resident for the grid barriers); one under the interpreter,
    which runs programs one after another."""
    return 1 if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1" else sm_count(device)


def _tile_rows(K: int, swiglu: bool = False) -> int:
    """Rows per tile so that a tile (gate and up: two) is about TILE_ELEMENTS weights, at least 2 (RoPE pairs)."""
    return max(2, TILE_ELEMENTS // (triton.next_power_of_2(K) * (2 if swiglu else 1)))


def decode_block(h: torch.Tensor, ln_w: torch.Tensor, eps: float, qkv_w: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, H: int, Hkv: int, d: int, state, position: torch.Tensor, length: torch.Tensor,
                 dense_w: torch.Tensor, ff_ln_w: torch.Tensor, ff_eps: float, wg1_w: torch.Tensor,
                 w2_w: torch.Tensor, hidden: int, num_splits: int | None = None) -> torch.Tensor:
    """A whole Llama block for one token: llama_compiled.decode_pre + KVState.write_at + attention over
    the cache up to the 0-dim `length` + decode_post, as one kernel. h [B, 1, D] -> [B, 1, D].
    num_splits: attention splits of the cache (default: about one (kv head, split) per program)."""
    B, _, D = h.shape
    x = h.reshape(B, D)
    k_cache, v_cache = state.k, state.v
    NQ, NK = H * d, Hkv * d
    if (not 1 <= B <= MAX_BATCH or not x.is_contiguous() or qkv_w.shape != (NQ + 2 * NK, D)
            or dense_w.shape != (D, NQ) or wg1_w.shape != (2 * hidden, D) or w2_w.shape != (D, hidden)
            or not all(w.is_contiguous() for w in (qkv_w, dense_w, wg1_w, w2_w))
            or cos.shape != (H + Hkv, d // 2) or sin.shape != cos.shape or cos.dtype != torch.float32
            or not cos.is_contiguous() or not sin.is_contiguous() or k_cache.shape != v_cache.shape
            or k_cache.shape[1] != Hkv or k_cache.shape[-1] != d or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1
            or d & (d - 1) or H % Hkv):
        raise ValueError(f"persistent decode block: h {tuple(h.shape)}, weights qkv {tuple(qkv_w.shape)} wo "
                         f"{tuple(dense_w.shape)} wg1 {tuple(wg1_w.shape)} w2 {tuple(w2_w.shape)}, cos/sin "
                         f"{tuple(cos.shape)} (fp32, contiguous), caches {tuple(k_cache.shape)} do not fit "
                         f"B <= {MAX_BATCH}, H={H}, H_kv={Hkv}, d={d} (a power of 2), hidden={hidden}")
    dev, dt = h.device, h.dtype
    programs = _programs(dev)
    split, nsplit = attention_splits(B, Hkv, k_cache.shape[2], dev,  # about one item per program
                                   programs=num_splits * B * Hkv if num_splits else programs)
    G = H // Hkv
    q = torch.empty(B, NQ, device=dev, dtype=dt)
    attn = torch.empty(B, NQ, device=dev, dtype=dt)
    h2 = torch.empty(B, D, device=dev, dtype=dt)
    a = torch.empty(B, hidden, device=dev, dtype=dt)
    out = torch.empty(B, D, device=dev, dtype=dt)
    acc = torch.empty(B * Hkv * nsplit * G, d, device=dev, dtype=torch.float32)
    m = torch.empty(B * Hkv * nsplit * G, device=dev, dtype=torch.float32)
    l_sum = torch.empty_like(m)
    count = torch.zeros(2, device=dev, dtype=torch.int32)  # arrivals; 1 if a barrier wait gave up
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    _block_kernel[(programs,)](
        x, ln_w, qkv_w, cos, sin, k_cache, v_cache, position, length, dense_w, ff_ln_w, wg1_w, w2_w,
        q, acc, m, l_sum, attn, h2, a, out, count,
        D, hidden, NQ + 2 * NK, NQ, NK, eps, ff_eps, *k_cache.stride()[:3], *v_cache.stride()[:3], Hkv, G, split, nsplit,
        BB=triton.next_power_of_2(B), B=B, HEAD_DIM=d,
        BN_QKV=_tile_rows(D), BN_O=_tile_rows(NQ), BN_UP=_tile_rows(D, swiglu=True), BN_DOWN=_tile_rows(hidden),
        BK_D=triton.next_power_of_2(D), BK_Q=triton.next_power_of_2(NQ), BK_HID=triton.next_power_of_2(hidden),
        BLOCK_G=max(16, triton.next_power_of_2(G)), BLOCK=128 if split % 128 == 0 and not interpret else BLOCK_N,
        BLOCK_S=triton.next_power_of_2(nsplit), PRECISION="ieee" if dt == torch.float32 else "tf32",
        DYNAMIC_BOUND=not interpret, STATIC_SPAN=split if interpret else 0,
        PREFETCH=0 if interpret or torch.cuda.get_device_capability(dev)[0] < 9 else PREFETCH_TILES, num_warps=NUM_WARPS,
        **cooperative_kwargs(dev),
    )
    return out.view(B, 1, D)
