"""The telescoping read-out over a batch's slots as one Triton kernel; reference:
decode.telescoping.slot_attention.

One program per (sequence, KV head) reads that head's C slot keys and values once, normalises them
in registers (`kv_norm`), and reads them out for the group's G query heads: scores, softcap,
empty-slot mask, softmax, weighted values, in fp32. The two products are tensor-core dots: tf32x3
for fp32 slots, which keeps fp32's accuracy (8 warps: 125 registers on sm_90 at
tele128_llama3_1.8b's shape, without spills, where fp32 FMA dots spill), and tf32 for bf16 or fp16
slots, whose own rounding is coarser than tf32's (4 warps): tf32x3's three products a dot held the
kernel at a quarter of the bandwidth at batch 4096, and one product runs it 2.27x faster
(experiments/gpu_tele_readout_precision.py). The compiled read-out it replaces at large
batches writes the normalised slots out in fp32 and reads them back through fp32 GEMMs, about five
passes over the slots' bytes a step instead of one. The slots may be in any order (the read-out is
a softmax over all of them), so states kept in place behind a ring map need no reordering.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from avengers.ops.telescoping import EMPTY_THRESHOLD, NORM_EPS

# (dot precision, warps) by the slots' dtype
FP32_SLOTS = ("tf32x3", 8)
HALF_SLOTS = ("tf32", 4)
_EMPTY = tl.constexpr(EMPTY_THRESHOLD)
_NORM_EPS = tl.constexpr(NORM_EPS)


@triton.jit
def _normalised(X, Gain, rows, cols, mask, HD: tl.constexpr, KV_NORM: tl.constexpr):
    """Slot rows [BLOCK_C, HD] in fp32, times rsqrt(mean square + eps) and the gain with kv_norm."""
    x = tl.load(X + rows[:, None] * HD + cols[None, :], mask=mask[:, None], other=0.0).to(tl.float32)
    if KV_NORM:
        r = tl.rsqrt(tl.sum(x * x, axis=1) / HD + _NORM_EPS)
        x = x * r[:, None] * tl.load(Gain + cols).to(tl.float32)[None, :]
    return x


@triton.jit
def _readout_kernel(
    Q,
    K,
    V,
    W,
    KGain,
    VGain,
    Out,
    softcap,
    C,
    HKV: tl.constexpr,
    G: tl.constexpr,
    HD: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_G: tl.constexpr,
    KV_NORM: tl.constexpr,
    SOFTCAP: tl.constexpr,
    MASK_EMPTY: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # = b * HKV + kv head: the slots' row-major state index
    offs_c = tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, HD)
    offs_g = tl.arange(0, BLOCK_G)
    mc, mg = offs_c < C, offs_g < G
    rows = pid * C + offs_c
    q_rows = pid * G + offs_g  # Q and Out are [B, H, HD] with H = HKV * G: the group's heads are contiguous
    q = tl.load(Q + q_rows[:, None] * HD + offs_d[None, :], mask=mg[:, None], other=0.0).to(tl.float32)
    k = _normalised(K, KGain, rows, offs_d, mc, HD, KV_NORM)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * (HD**-0.5)  # [BLOCK_G, BLOCK_C]
    if SOFTCAP:
        s = softcap * (2.0 / (1.0 + tl.exp(-2.0 * s / softcap)) - 1.0)  # softcap * tanh(s / softcap)
    drop = ~mc
    if MASK_EMPTY:
        drop = drop | (tl.load(W + rows, mask=mc, other=0.0) <= _EMPTY)
    s = tl.where(drop[None, :], -float("inf"), s)
    p = tl.exp(s - tl.max(s, axis=1)[:, None])
    p = p / tl.sum(p, axis=1)[:, None]
    v = _normalised(V, VGain, rows, offs_d, mc, HD, KV_NORM)
    out = tl.dot(p, v, input_precision=PRECISION)
    tl.store(Out + q_rows[:, None] * HD + offs_d[None, :], out.to(Out.dtype.element_ty), mask=mg[:, None])


def supports(K: torch.Tensor) -> bool:
    """Contiguous slots and a power-of-two head dim of at least 16 (tl.dot's least inner size)."""
    d = K.shape[-1]
    return K.is_contiguous() and d >= 16 and (d & (d - 1)) == 0


def slot_readout(
    q: torch.Tensor,
    K: torch.Tensor,
    V: torch.Tensor,
    W: torch.Tensor,
    opts,
    k_gain: torch.Tensor | None = None,
    v_gain: torch.Tensor | None = None,
) -> torch.Tensor:
    """slot_attention: q [B, H, d] over the slots K, V [B, H_kv, C, d] (log-masses W [B, H_kv, C])
    -> [B, H, d] in q's dtype."""
    B, H, d = q.shape
    Hkv, C = K.shape[1], K.shape[2]
    if not (supports(K) and V.is_contiguous() and W.is_contiguous()):
        raise ValueError(f"the Triton slot read-out needs contiguous slots and a power-of-two head dim >= 16, got {d}")
    if opts.kv_norm and (k_gain is None or v_gain is None):
        raise ValueError("kv_norm needs the key and value gains")
    q = q.contiguous()
    out = torch.empty_like(q)
    precision, warps = FP32_SLOTS if K.dtype == torch.float32 else HALF_SLOTS
    _readout_kernel[(B * Hkv,)](
        q,
        K,
        V,
        W,
        k_gain if opts.kv_norm else K,  # unread without kv_norm
        v_gain if opts.kv_norm else K,
        out,
        opts.softcap or 1.0,
        C,
        HKV=Hkv,
        G=H // Hkv,
        HD=d,
        BLOCK_C=max(16, triton.next_power_of_2(C)),
        BLOCK_G=max(16, triton.next_power_of_2(H // Hkv)),
        KV_NORM=opts.kv_norm,
        SOFTCAP=opts.softcap is not None,
        MASK_EMPTY=opts.mask_empty,
        PRECISION=precision,
        num_warps=warps,
    )
    return out
