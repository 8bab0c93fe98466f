"""Split-K GQA decode attention in Triton (flash-decoding); reference: kv_cache.decode_attention_torch.

One query token per sequence against a static key/value buffer whose valid length is read from a
device tensor, so the call can be captured in a CUDA graph. Pass 1: program (b, kv head, split)
streams its slice of keys/values once for all H/H_kv query heads of the group (rows of one
tl.dot, padded to 16) and writes an unnormalised partial output with its running max and sum,
then counts itself done on a per-(b, kv head) counter; the group's last program merges the
splits and resets the counter to zero, so one kernel does the whole attention (no second launch,
which costs more than the merge at short context). Splits past the valid length do no work.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from avengers.inference.triton_overlap import pdl_kwargs

BLOCK_N = 64
MAX_SPLITS = 64


@triton.jit
def _tile(q, k_base, v_base, n, end, offs_d, skn, svn, scale, m_i, l_i, acc, PRECISION: tl.constexpr):
    """Online-softmax update of (running max, running sum, unnormalised output) with one key tile."""
    n_mask = n < end
    k = tl.load(k_base + n[:, None] * skn + offs_d[None, :], mask=n_mask[:, None], other=0.0)
    v = tl.load(v_base + n[:, None] * svn + offs_d[None, :], mask=n_mask[:, None], other=0.0)  # both in flight
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    s = tl.where(n_mask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a fully masked tile must not give nan
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i * alpha + tl.sum(p, 1), acc


@triton.jit
def _attention_kernel(Q, K, V, Length, Acc, M, L, Count, Out, sqb, sqh, skb, skh, skn, svb, svh, svn, sob, soh,
                      H_KV, G, SPLIT, NSPLIT, scale,
                      D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK: tl.constexpr, BLOCK_S: tl.constexpr,
                      PRECISION: tl.constexpr, DYNAMIC_BOUND: tl.constexpr, STATIC_SPAN: tl.constexpr,
                      GDC: tl.constexpr):
    if GDC:  # launched with PDL (triton_overlap.py): everything read below may come from the previous kernel
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (bh // H_KV).to(tl.int64)  # 64-bit offsets: a large batch's buffer can pass 2^31 elements
    h = bh % H_KV
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK)
    g_mask = offs_g < G
    q = tl.load(Q + b * sqb + (h * G + offs_g)[:, None] * sqh + offs_d[None, :], mask=g_mask[:, None], other=0.0)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    start = split * SPLIT
    end = tl.minimum(start + SPLIT, tl.load(Length))
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    if DYNAMIC_BOUND:  # compiled: stop at the valid length
        for off in range(0, end - start, BLOCK):
            m_i, l_i, acc = _tile(q, k_base, v_base, start + off + offs_n, end, offs_d, skn, svn, scale,
                                  m_i, l_i, acc, PRECISION)
    else:  # Triton's CPU interpreter loops only to constants: visit the whole split, masked
        for off in range(0, STATIC_SPAN, BLOCK):
            m_i, l_i, acc = _tile(q, k_base, v_base, start + off + offs_n, end, offs_d, skn, svn, scale,
                                  m_i, l_i, acc, PRECISION)
    row = (bh.to(tl.int64) * NSPLIT + split) * G + offs_g
    tl.store(Acc + row[:, None] * D + offs_d[None, :], acc, mask=g_mask[:, None])
    tl.store(M + row, m_i, mask=g_mask)
    tl.store(L + row, l_i, mask=g_mask)
    tl.debug_barrier()  # every thread's partial is stored before the counter is released
    if tl.atomic_add(Count + bh, 1, sem="acq_rel") == NSPLIT - 1:
        _merge(Acc, M, L, Out, bh.to(tl.int64), b, h, G, NSPLIT, sob, soh, D, BLOCK_S)
        tl.store(Count + bh, 0)


@triton.jit
def _merge(Acc, M, L, Out, bh, b, h, G, NSPLIT, sob, soh, D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Out[b, h * G + g] for the group's G query heads from the NSPLIT partials (read past L1: other
    programs wrote them)."""
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, D)
    s_mask = offs_s < NSPLIT
    for g in range(0, G):
        row = (bh * NSPLIT + offs_s) * G + g
        m = tl.load(M + row, mask=s_mask, other=float("-inf"), cache_modifier=".cg")
        l = tl.load(L + row, mask=s_mask, other=0.0, cache_modifier=".cg")
        w = tl.exp(m - tl.max(m, 0))  # empty splits have m = -inf: weight 0
        acc = tl.load(Acc + row[:, None] * D + offs_d[None, :], mask=s_mask[:, None], other=0.0, cache_modifier=".cg")
        out = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
        tl.store(Out + b * sob + (h * G + g) * soh + offs_d, out.to(Out.dtype.element_ty))


_COUNTERS: dict = {}


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 split counters; every launch leaves them zero, so one buffer per device serves
    every call (allocated once, before any CUDA-graph capture that reuses it)."""
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        buf = _COUNTERS[device] = torch.zeros(max(n, 4096), device=device, dtype=torch.int32)
    return buf


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def num_splits(batch: int, kv_heads: int, buffer_len: int, device: torch.device) -> tuple[int, int]:
    """(split length, number of splits): about 4 programs per SM, whole BLOCK_N tiles per split."""
    sms = _sm_count(device)
    want = max(1, min(MAX_SPLITS, -(-4 * sms // (batch * kv_heads))))
    split = -(-buffer_len // want)
    split = -(-split // BLOCK_N) * BLOCK_N
    return split, -(-buffer_len // split)


def supported(q: torch.Tensor, k_buf: torch.Tensor) -> bool:
    d = q.shape[-1]
    return (d & (d - 1)) == 0 and 16 <= d <= 256 and k_buf.stride(-1) == 1 and q.stride(-1) == 1 \
        and q.dtype == k_buf.dtype and q.dtype in (torch.float16, torch.bfloat16, torch.float32)


def decode_attention_triton(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, length: torch.Tensor,
                            scale: float | None = None) -> torch.Tensor:
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
    _attention_kernel[(B * Hkv, nsplit)](
        q, k_buf, v_buf, length, acc, m, l_sum, _counters(q.device, B * Hkv), out, q.stride(0), q.stride(1),
        k_buf.stride(0), k_buf.stride(1), k_buf.stride(2), v_buf.stride(0), v_buf.stride(1), v_buf.stride(2),
        out.stride(0), out.stride(1), Hkv, G, split, nsplit, D**-0.5 if scale is None else scale, D=D,
        BLOCK_G=max(16, triton.next_power_of_2(G)), BLOCK=BLOCK_N, BLOCK_S=triton.next_power_of_2(nsplit),
        PRECISION=precision, DYNAMIC_BOUND=not interpret, STATIC_SPAN=split if interpret else 0, num_warps=4,
        num_stages=2, **pdl_kwargs(q.device),
    )
    return out
