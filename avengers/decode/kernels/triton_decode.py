"""Split-K GQA decode attention in Triton (flash-decoding); reference: decode.attention.decode_attention_torch.

One query token per sequence against a static key/value buffer whose valid length is read from a
device tensor, so the call can be captured in a CUDA graph. Pass 1: program (b, kv head, split)
streams its slice of keys/values once for all H/H_kv query heads of the group (rows of one
tl.dot, padded to 16) and writes an unnormalised partial output with its running max and sum.
Pass 2: program (b, query head) merges the splits. Splits past the valid length do no work.
Key tile size, warps and pipeline depth of pass 1 are autotuned per split length on a GPU. The
split count fills the waves of pass-1 programs best (num_splits): one wave at batch 1, where
every SM streams one split (its speed against the cache-read floor: docs/results.md).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from avengers.decode.kernels.triton_gemv import quick_bench
from avengers.decode.kernels.triton_pdl import pdl_kwargs

BLOCK_N = 64  # split lengths are whole multiples of this
MAX_SPLITS = 64
ITEMS_PER_SM = 1  # pass-1 programs per SM that num_splits counts as running at once


def _partial_configs() -> list[triton.Config]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({"BLOCK": BLOCK_N}, num_warps=4)]
    return [
        triton.Config({"BLOCK": b}, num_warps=w, num_stages=s)
        for b, w, s in ((64, 4, 2), (64, 4, 3), (64, 4, 4), (128, 4, 3), (128, 8, 3))
    ]


def _prune(configs, named_args, **kwargs):
    """A key tile may not straddle two splits."""
    kept = [c for c in configs if named_args["SPLIT"] % c.kwargs["BLOCK"] == 0]
    return kept or configs[:1]


@triton.jit
def _tile(q, k_base, v_base, n, end, offs_d, skn, svn, scale, m_i, l_i, acc, PRECISION: tl.constexpr):
    """Online-softmax update of (running max, running sum, unnormalised output) with one key tile."""
    n_mask = n < end
    k = tl.load(k_base + n[:, None] * skn + offs_d[None, :], mask=n_mask[:, None], other=0.0, cache_modifier=".cg")
    v = tl.load(
        v_base + n[:, None] * svn + offs_d[None, :], mask=n_mask[:, None], other=0.0, cache_modifier=".cg"
    )  # issued together with k
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    s = tl.where(n_mask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a fully masked tile must not give nan
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i * alpha + tl.sum(p, 1), acc


@triton.jit
def partial_item(
    Q,
    K,
    V,
    Length,
    Acc,
    M,
    L,
    sqb,
    sqh,
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
    scale,
    bh,
    split,
    D: tl.constexpr,
    BLOCK_G: tl.constexpr,
    PRECISION: tl.constexpr,
    DYNAMIC_BOUND: tl.constexpr,
    STATIC_SPAN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Pass 1 for (b * H_KV + kv head, split). Q and the caches are read past L1 (.cg): in the
    persistent block kernel other programs have just written them."""
    b = (bh // H_KV).to(tl.int64)  # 64-bit offsets: a large batch's buffer can pass 2^31 elements
    h = bh % H_KV
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK)
    g_mask = offs_g < G
    q = tl.load(
        Q + b * sqb + (h * G + offs_g)[:, None] * sqh + offs_d[None, :],
        mask=g_mask[:, None],
        other=0.0,
        cache_modifier=".cg",
    )
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    start = split * SPLIT
    end = tl.minimum(start + SPLIT, tl.load(Length))
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    if DYNAMIC_BOUND:  # compiled: stop at the valid length
        for off in range(0, end - start, BLOCK):
            m_i, l_i, acc = _tile(
                q, k_base, v_base, start + off + offs_n, end, offs_d, skn, svn, scale, m_i, l_i, acc, PRECISION
            )
    else:  # Triton's CPU interpreter loops only to constants: visit the whole split, masked
        for off in range(0, STATIC_SPAN, BLOCK):
            m_i, l_i, acc = _tile(
                q, k_base, v_base, start + off + offs_n, end, offs_d, skn, svn, scale, m_i, l_i, acc, PRECISION
            )
    row = (bh.to(tl.int64) * NSPLIT + split) * G + offs_g
    tl.store(Acc + row[:, None] * D + offs_d[None, :], acc, mask=g_mask[:, None])
    tl.store(M + row, m_i, mask=g_mask)
    tl.store(L + row, l_i, mask=g_mask)


@triton.jit
def merge_item(Acc, M, L, Out, sob, soh, H_KV, G, NSPLIT, item, D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Pass 2 for item = b * H + query head: the splits' partials merged into Out[b, head]."""
    H = H_KV * G
    b = (item // H).to(tl.int64)
    hq = item % H
    bh = b * H_KV + hq // G
    g = hq % G
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, D)
    s_mask = offs_s < NSPLIT
    row = (bh.to(tl.int64) * NSPLIT + offs_s) * G + g
    m = tl.load(M + row, mask=s_mask, other=float("-inf"), cache_modifier=".cg")
    l = tl.load(L + row, mask=s_mask, other=0.0, cache_modifier=".cg")
    w = tl.exp(m - tl.max(m, 0))  # empty splits have m = -inf: weight 0
    acc = tl.load(Acc + row[:, None] * D + offs_d[None, :], mask=s_mask[:, None], other=0.0, cache_modifier=".cg")
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    tl.store(Out + b * sob + hq * soh + offs_d, out.to(Out.dtype.element_ty))


@triton.autotune(
    configs=_partial_configs(),
    key=["SPLIT", "G", "D", "PRECISION", "GDC"],
    prune_configs_by={"early_config_prune": _prune},
    do_bench=quick_bench,
    cache_results=True,
)
@triton.jit
def _partial_kernel(
    Q,
    K,
    V,
    Length,
    Acc,
    M,
    L,
    sqb,
    sqh,
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
    scale,
    D: tl.constexpr,
    BLOCK_G: tl.constexpr,
    PRECISION: tl.constexpr,
    DYNAMIC_BOUND: tl.constexpr,
    STATIC_SPAN: tl.constexpr,
    GDC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    if GDC:  # launched with PDL (triton_pdl.py): everything read below may come from the previous kernel
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    partial_item(
        Q,
        K,
        V,
        Length,
        Acc,
        M,
        L,
        sqb,
        sqh,
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
        scale,
        tl.program_id(0),
        tl.program_id(1),
        D,
        BLOCK_G,
        PRECISION,
        DYNAMIC_BOUND,
        STATIC_SPAN,
        BLOCK,
    )


@triton.jit
def _merge_kernel(Acc, M, L, Out, sob, soh, H_KV, G, NSPLIT, D: tl.constexpr, BLOCK_S: tl.constexpr, GDC: tl.constexpr):
    if GDC:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    merge_item(Acc, M, L, Out, sob, soh, H_KV, G, NSPLIT, tl.program_id(0), D, BLOCK_S)


@functools.cache
def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def num_splits(
    batch: int, kv_heads: int, buffer_len: int, device: torch.device, programs: int | None = None
) -> tuple[int, int]:
    """(split length, number of splits) for `programs` (default ITEMS_PER_SM per SM) programs at a
    time: pass-1 programs all do equal work, so a last wave that is only partly full is idle time.
    Of 1..MAX_SPLITS splits (whole BLOCK_N tiles each), the fewest whose per-slot work,
    ceil(items / programs) * (split + BLOCK_N) for items = batch * kv_heads * splits, is within 2%
    of the least: one wave of 16 splits at batch 1 with 8 kv heads on 132 SMs, and at large
    batches the split count whose waves come out fullest."""
    return _splits(batch * kv_heads, buffer_len, programs or ITEMS_PER_SM * sm_count(device))


@functools.lru_cache(maxsize=1024)
def _splits(items: int, buffer_len: int, programs: int) -> tuple[int, int]:
    options = []
    for want in range(1, MAX_SPLITS + 1):
        split = -(-buffer_len // want)
        split = -(-split // BLOCK_N) * BLOCK_N
        n = -(-buffer_len // split)
        cost = -(-items * n // programs) * (split + BLOCK_N)  # + BLOCK_N: a program's fixed cost, ~one tile
        options.append((n, split, cost))
    least = min(cost for _, _, cost in options)
    # the fewest splits within 2% of the least work: more splits cost merge work the model leaves out
    n, split, _ = min(o for o in options if o[2] <= 1.02 * least)
    return split, n


def supported(q: torch.Tensor, k_buf: torch.Tensor) -> bool:
    d = q.shape[-1]
    return (
        (d & (d - 1)) == 0
        and 16 <= d <= 256
        and k_buf.stride(-1) == 1
        and q.stride(-1) == 1
        and q.dtype == k_buf.dtype
        and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
    )


def decode_attention_triton(
    q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, length: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """q [B, H, d]; k_buf, v_buf [B, H_kv, S, d]; length 0-dim int tensor on q's device -> [B, H, d]."""
    B, H, D = q.shape
    _, Hkv, S, _ = k_buf.shape
    G = H // Hkv
    split, nsplit = num_splits(B, Hkv, S, q.device)
    acc = torch.empty(B * Hkv * nsplit * G, D, device=q.device, dtype=torch.float32)
    m = torch.empty(B * Hkv * nsplit * G, device=q.device, dtype=torch.float32)
    l_sum = torch.empty_like(m)
    out = torch.empty(B, H, D, device=q.device, dtype=q.dtype)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    _partial_kernel[(B * Hkv, nsplit)](
        q,
        k_buf,
        v_buf,
        length,
        acc,
        m,
        l_sum,
        q.stride(0),
        q.stride(1),
        k_buf.stride(0),
        k_buf.stride(1),
        k_buf.stride(2),
        v_buf.stride(0),
        v_buf.stride(1),
        v_buf.stride(2),
        Hkv,
        G,
        split,
        nsplit,
        D**-0.5 if scale is None else scale,
        D=D,
        BLOCK_G=max(16, triton.next_power_of_2(G)),
        PRECISION=precision,
        DYNAMIC_BOUND=not interpret,
        STATIC_SPAN=split if interpret else 0,
        **pdl_kwargs(q.device),
    )
    _merge_kernel[(B * H,)](
        acc,
        m,
        l_sum,
        out,
        out.stride(0),
        out.stride(1),
        Hkv,
        G,
        nsplit,
        D=D,
        BLOCK_S=triton.next_power_of_2(nsplit),
        num_warps=4,
        **pdl_kwargs(q.device),
    )
    return out
