"""A telescoping layer's decode step between its projections as one Triton kernel; reference:
decode.telescoping.fused_qkv_step_core (same arguments, slots in logical order).

From the fused QKV GEMV's output and the block input: RoPE on q and k, the gate (linear, from the
normalised block input, or WISQ), the slot update of the step's action (merge slots m - 1 and m,
shift, insert the new token: push_at) and the read-out of every query head of the group over the
updated slots. One program owns one (sequence, kv head): it reads its C slots once, writes them
once, and reads them from registers for the G query heads. The compiled step core runs the same
work as several kernels per layer, latency-bound at small batches. Rows are held as their even and
odd channels (RoPE's adjacent pairs), which every other operation here treats alike.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from avengers.ops.telescoping import EMPTY_THRESHOLD, NORM_EPS

NUM_WARPS = 8
# as constants the kernel can read
_EMPTY = tl.constexpr(EMPTY_THRESHOLD)
_NORM_EPS = tl.constexpr(NORM_EPS)
DOT_PRECISION = tl.constexpr("tf32x3")


@triton.jit
def _rotate(x0, x1, cos, sin):
    return x0 * cos - x1 * sin, x0 * sin + x1 * cos


@triton.jit
def _rms(x0, x1, Gain, offs_i, HD: tl.constexpr):
    """rms_norm over the last dim of rows held as (even, odd) halves, times the gain (ops.rms_norm)."""
    r = tl.rsqrt((tl.sum(x0 * x0, axis=1) + tl.sum(x1 * x1, axis=1)) / HD + _NORM_EPS)[:, None]
    g0 = tl.load(Gain + 2 * offs_i).to(tl.float32)
    g1 = tl.load(Gain + 2 * offs_i + 1).to(tl.float32)
    return x0 * r * g0[None, :], x1 * r * g1[None, :]


@triton.jit
def _slot_rows(Base, src, new0, new1, offs_i, mask, HD: tl.constexpr):
    """ext[src] for the rows of one (sequence, kv head): ext = [new token, old slot 0, ..., C - 1]."""
    ptr = Base + (src - 1)[:, None] * HD + 2 * offs_i[None, :]
    m = (mask & (src > 0))[:, None]
    old0 = tl.load(ptr, mask=m, other=0.0).to(tl.float32)
    old1 = tl.load(ptr + 1, mask=m, other=0.0).to(tl.float32)
    is_new = (src == 0)[:, None]
    return tl.where(is_new, new0[None, :], old0), tl.where(is_new, new1[None, :], old1)


@triton.jit
def _tele_step_kernel(
    QKV,
    Hin,
    LnW,
    GateW,
    InvFreq,
    Pos,
    K,
    V,
    W,
    SrcA,
    SrcB,
    Merge,
    KGain,
    VGain,
    Out,
    s_qkv,
    s_h,
    D,
    ln_eps,
    softcap,
    C,
    H: tl.constexpr,
    HKV: tl.constexpr,
    HD: tl.constexpr,
    LEVELS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HAS_GATE: tl.constexpr,
    KV_NORM: tl.constexpr,
    SOFTCAP: tl.constexpr,
    MASK_EMPTY: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b, hk = pid // HKV, pid % HKV
    G: tl.constexpr = H // HKV
    HALF: tl.constexpr = HD // 2
    offs_i = tl.arange(0, HALF)
    offs_c = tl.arange(0, BLOCK_C)
    mc = offs_c < C
    row = QKV + b * s_qkv

    pos = tl.load(Pos)
    angle = pos.to(tl.float32) * tl.load(InvFreq + offs_i)
    cos, sin = tl.cos(angle), tl.sin(angle)
    k_ptr = row + (H + hk) * HD + 2 * offs_i
    k0, k1 = _rotate(tl.load(k_ptr).to(tl.float32), tl.load(k_ptr + 1).to(tl.float32), cos, sin)
    v_ptr = row + (H + HKV + hk) * HD + 2 * offs_i
    v0, v1 = tl.load(v_ptr).to(tl.float32), tl.load(v_ptr + 1).to(tl.float32)
    offs_g = tl.arange(0, BLOCK_G)  # the group's query heads
    mg = offs_g < G
    q_ptr = row + (hk * G + offs_g)[:, None] * HD + 2 * offs_i[None, :]
    q0 = tl.load(q_ptr, mask=mg[:, None], other=0.0).to(tl.float32)
    q1 = tl.load(q_ptr + 1, mask=mg[:, None], other=0.0).to(tl.float32)
    q0, q1 = _rotate(q0, q1, cos[None, :], sin[None, :])

    # the new token's log-mass
    if HAS_GATE:  # linear: gate_w . rms_norm(h) (the norm's output rounded to the model dtype)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            x = tl.load(Hin + b * s_h + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)
            acc += x * x
        r = tl.rsqrt(tl.sum(acc) / D + ln_eps)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            md = offs_d < D
            x = tl.load(Hin + b * s_h + offs_d, mask=md, other=0.0).to(tl.float32)
            lw = tl.load(LnW + offs_d, mask=md, other=0.0).to(tl.float32)
            y = (x * r * lw).to(Hin.dtype.element_ty).to(tl.float32)
            acc += y * tl.load(GateW + hk * D + offs_d, mask=md, other=0.0).to(tl.float32)
        w_new = tl.sum(acc)
    else:  # WISQ: logsumexp over the group's query heads of q . k / sqrt(d), q and k rotated
        sg = (tl.sum(q0 * k0[None, :], axis=1) + tl.sum(q1 * k1[None, :], axis=1)) * (HD**-0.5)
        sg = tl.where(mg, sg, -float("inf"))
        top = tl.max(sg, axis=0)
        w_new = top + tl.log(tl.sum(tl.exp(sg - top), axis=0))

    # the step's action a = min(ctz(t), LEVELS) (LEVELS at t = 0) and its table rows
    a = 0
    for lvl in tl.static_range(1, LEVELS + 1):
        a += (pos % (1 << lvl) == 0).to(tl.int32)
    src_a = tl.load(SrcA + a * C + offs_c, mask=mc, other=0)
    src_b = tl.load(SrcB + a * C + offs_c, mask=mc, other=0)
    merge = tl.load(Merge + a * C + offs_c, mask=mc, other=0) != 0

    state = (b * HKV + hk) * C
    w_ptr = W + state
    wa = tl.where(src_a == 0, w_new, tl.load(w_ptr + src_a - 1, mask=mc & (src_a > 0), other=0.0))
    # at most one slot merges: ext[src_b] differs from ext[src_a] in that row only, held as one row
    merges = tl.sum(merge.to(tl.int32), axis=0)
    mb = tl.sum(tl.where(merge, src_b, 0), axis=0)  # >= 1: an old slot
    wb = tl.sum(tl.where(merge, tl.load(w_ptr + src_b - 1, mask=mc & merge, other=0.0), 0.0), axis=0)
    # _fusion: the weights of the two fused slots, and the fused log-mass
    hi = tl.maximum(wa, wb)
    wn = hi + tl.log(1.0 + tl.exp(-tl.abs(wa - wb)))
    fused_w = tl.where(wb <= _EMPTY, wa, tl.where(wa <= _EMPTY, wb, wn))
    pa = tl.where(merge, tl.exp(wa - wn), 1.0)[:, None]
    pb = tl.where(merge, tl.exp(wb - wn), 0.0)[:, None]
    w_out = tl.where(merge, fused_w, wa)

    # new slots: pa * ext[src_a] + pb * ext[src_b] (the new token rounded to the slots' dtype first)
    kv_ty = K.dtype.element_ty
    k0n, k1n = k0.to(kv_ty).to(tl.float32), k1.to(kv_ty).to(tl.float32)
    v0n, v1n = v0.to(kv_ty).to(tl.float32), v1.to(kv_ty).to(tl.float32)
    kslots, vslots = K + state * HD, V + state * HD
    b_row = (mb - 1) * HD + 2 * offs_i
    mb_row = offs_i * 0 + merges > 0  # the merge's old row (none at the drop step)
    ka0, ka1 = _slot_rows(kslots, src_a, k0n, k1n, offs_i, mc, HD)
    kb0 = tl.load(kslots + b_row, mask=mb_row, other=0.0).to(tl.float32)[None, :]
    kb1 = tl.load(kslots + b_row + 1, mask=mb_row, other=0.0).to(tl.float32)[None, :]
    K0, K1 = (pa * ka0 + pb * kb0).to(kv_ty), (pa * ka1 + pb * kb1).to(kv_ty)
    va0, va1 = _slot_rows(vslots, src_a, v0n, v1n, offs_i, mc, HD)
    vb0 = tl.load(vslots + b_row, mask=mb_row, other=0.0).to(tl.float32)[None, :]
    vb1 = tl.load(vslots + b_row + 1, mask=mb_row, other=0.0).to(tl.float32)[None, :]
    V0, V1 = (pa * va0 + pb * vb0).to(kv_ty), (pa * va1 + pb * vb1).to(kv_ty)
    tl.debug_barrier()  # every warp has read the old slots before any overwrites them
    out_ptr = offs_c[:, None] * HD + 2 * offs_i[None, :]
    m2 = mc[:, None]
    tl.store(kslots + out_ptr, K0, mask=m2)
    tl.store(kslots + out_ptr + 1, K1, mask=m2)
    tl.store(vslots + out_ptr, V0, mask=m2)
    tl.store(vslots + out_ptr + 1, V1, mask=m2)
    tl.store(w_ptr + offs_c, w_out, mask=mc)

    # read-out over the updated slots: the scores, then the values (fewer fp32 rows live at once)
    K0, K1 = K0.to(tl.float32), K1.to(tl.float32)
    if KV_NORM:
        K0, K1 = _rms(K0, K1, KGain, offs_i, HD)
    drop = ~mc
    if MASK_EMPTY:
        drop = drop | (w_out <= _EMPTY)
    # every head of the group at once: [G, C] scores, in fp32 (q rounded to the model dtype, as the
    # read-out's q is)
    q0 = q0.to(QKV.dtype.element_ty).to(tl.float32)
    q1 = q1.to(QKV.dtype.element_ty).to(tl.float32)
    s = tl.dot(q0, tl.trans(K0), input_precision=DOT_PRECISION) + tl.dot(
        q1, tl.trans(K1), input_precision=DOT_PRECISION
    )
    s = s * (HD**-0.5)
    if SOFTCAP:
        s = softcap * (2.0 / (1.0 + tl.exp(-2.0 * s / softcap)) - 1.0)  # softcap * tanh(s / softcap)
    s = tl.where(drop[None, :], -float("inf"), s)
    p = tl.exp(s - tl.max(s, axis=1)[:, None])
    p = p / tl.sum(p, axis=1)[:, None]
    V0, V1 = V0.to(tl.float32), V1.to(tl.float32)
    if KV_NORM:
        V0, V1 = _rms(V0, V1, VGain, offs_i, HD)
    o_ptr = Out + (b * H + hk * G + offs_g)[:, None] * HD + 2 * offs_i[None, :]
    out_ty = Out.dtype.element_ty
    tl.store(o_ptr, tl.dot(p, V0, input_precision=DOT_PRECISION).to(out_ty), mask=mg[:, None])
    tl.store(o_ptr + 1, tl.dot(p, V1, input_precision=DOT_PRECISION).to(out_ty), mask=mg[:, None])


_INV_FREQ: dict[tuple, torch.Tensor] = {}


def _inv_freq(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """rope_cos_sin's frequencies, computed the same way, so the angles are the same fp32 products."""
    key = (head_dim, theta, str(device))
    if key not in _INV_FREQ:
        exponents = torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
        _INV_FREQ[key] = 1.0 / (theta**exponents)
    return _INV_FREQ[key]


def supports(K: torch.Tensor, head_dim: int) -> bool:
    """Whether the kernel takes a state: slots in logical order (not behind a ring map), contiguous,
    a power-of-two head dim of at least 32 (tl.dot's least inner dim, in halves)."""
    return K.is_contiguous() and head_dim >= 32 and head_dim & (head_dim - 1) == 0


def triton_tele_step(
    qkv: torch.Tensor,
    h: torch.Tensor,
    ln_w: torch.Tensor,
    eps: float,
    gate_w: torch.Tensor | None,
    position: torch.Tensor,
    K: torch.Tensor,
    V: torch.Tensor,
    W: torch.Tensor,
    tables,
    opts,
    theta: float,
    k_gain: torch.Tensor | None,
    v_gain: torch.Tensor | None,
) -> torch.Tensor:
    """fused_qkv_step_core for slots in logical order: qkv [B, (H + 2 H_kv) d]; h [B, D]; K, V
    [B, H_kv, C, d] and W [B, H_kv, C] updated in place -> [B, H, d] in qkv's dtype."""
    B, Hkv, C, d = K.shape
    H = qkv.shape[1] // d - 2 * Hkv
    if not supports(K, d) or not (V.is_contiguous() and W.is_contiguous()):
        raise ValueError(
            f"the Triton telescoping step needs contiguous slots and a power-of-two head dim >= 32, got {d}"
        )
    if qkv.stride(1) != 1 or h.stride(-1) != 1:
        raise ValueError("the Triton telescoping step needs rows of qkv and h with unit stride")
    out = torch.empty(B, H, d, device=qkv.device, dtype=qkv.dtype)
    D = h.shape[-1]
    _tele_step_kernel[(B * Hkv,)](
        qkv,
        h,
        ln_w,
        gate_w if gate_w is not None else ln_w,  # unread without a linear gate
        _inv_freq(d, theta, qkv.device),
        position,
        K,
        V,
        W,
        tables.src_a,
        tables.src_b,
        tables.merge.view(torch.uint8),
        k_gain if k_gain is not None else ln_w,  # unread without kv_norm
        v_gain if v_gain is not None else ln_w,
        out,
        qkv.stride(0),
        h.stride(0),
        D,
        eps,
        opts.softcap or 1.0,
        C,
        H=H,
        HKV=Hkv,
        HD=d,
        LEVELS=len(opts.fmap),
        BLOCK_C=max(16, triton.next_power_of_2(C)),
        BLOCK_D=min(1024, triton.next_power_of_2(D)),
        BLOCK_G=max(16, triton.next_power_of_2(H // Hkv)),
        HAS_GATE=gate_w is not None,
        KV_NORM=opts.kv_norm,
        SOFTCAP=opts.softcap is not None,
        MASK_EMPTY=opts.mask_empty,
        num_warps=NUM_WARPS,
    )
    return out
