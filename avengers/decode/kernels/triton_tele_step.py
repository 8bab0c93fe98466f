"""A telescoping layer's decode step between its projections as two Triton kernels; reference:
decode.telescoping.fused_qkv_step_core (same arguments, slots in logical order).

From the fused QKV GEMV's output and the block input:
- `_update_kernel`, one program per (sequence, KV head): RoPE on k, the new token's log-mass (the
  linear gate from the normalised block input, or WISQ over the group's rotated queries), and the
  step's slot update (merge slots m - 1 and m, shift, insert the token: push_at), in place.
- `_readout_kernel`, one program per (sequence, query head): RoPE on q and its read-out over the
  updated slots (kv_norm, softcap, empty slots masked), in fp32.
Two launches because the read-out must see every slot updated: the compiled step core runs the
same work as about eight kernels a layer, and one kernel per (sequence, KV head) doing both phases
left batch 1 with two busy SMs (41.9 us a layer against the compiled 36.7, experiments/README.md).
Rows are held as their even and odd channels (RoPE's adjacent pairs), which every operation here
treats alike.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from avengers.ops.telescoping import EMPTY_THRESHOLD, NORM_EPS

# warps per program: a program holds whole [C, d] slot tiles; at tele128_llama3_1.8b's shape these
# keep both kernels below 255 registers without spills (sm_90, tests/decode/sm90_compile_cases.py)
UPDATE_WARPS, READOUT_WARPS = 16, 8
_EMPTY = tl.constexpr(EMPTY_THRESHOLD)
_NORM_EPS = tl.constexpr(NORM_EPS)


@triton.jit
def _rotate(x0, x1, cos, sin):
    return x0 * cos - x1 * sin, x0 * sin + x1 * cos


@triton.jit
def _angles(Pos, InvFreq, offs_i):
    angle = tl.load(Pos).to(tl.float32) * tl.load(InvFreq + offs_i)
    return tl.cos(angle), tl.sin(angle)


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
def _linear_gate(Hin, LnW, GateW, b, hk, s_h, D, ln_eps, BLOCK_D: tl.constexpr):
    """gate_w[hk] . rms_norm(h[b]) * ln_w, the norm's output rounded to the model dtype first."""
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
    return tl.sum(acc)


@triton.jit
def _update_kernel(
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
    s_qkv,
    s_h,
    D,
    ln_eps,
    C,
    H: tl.constexpr,
    HKV: tl.constexpr,
    HD: tl.constexpr,
    LEVELS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HAS_GATE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b, hk = pid // HKV, pid % HKV
    G: tl.constexpr = H // HKV
    offs_i = tl.arange(0, HD // 2)
    offs_c = tl.arange(0, BLOCK_C)
    mc = offs_c < C
    row = QKV + b * s_qkv
    cos, sin = _angles(Pos, InvFreq, offs_i)
    k_ptr = row + (H + hk) * HD + 2 * offs_i
    k0, k1 = _rotate(tl.load(k_ptr).to(tl.float32), tl.load(k_ptr + 1).to(tl.float32), cos, sin)
    v_ptr = row + (H + HKV + hk) * HD + 2 * offs_i
    v0, v1 = tl.load(v_ptr).to(tl.float32), tl.load(v_ptr + 1).to(tl.float32)

    if HAS_GATE:
        w_new = _linear_gate(Hin, LnW, GateW, b, hk, s_h, D, ln_eps, BLOCK_D)
    else:  # WISQ: logsumexp over the group's query heads of q . k / sqrt(d), q and k rotated
        offs_g = tl.arange(0, BLOCK_G)
        mg = offs_g < G
        q_ptr = row + (hk * G + offs_g)[:, None] * HD + 2 * offs_i[None, :]
        q0 = tl.load(q_ptr, mask=mg[:, None], other=0.0).to(tl.float32)
        q1 = tl.load(q_ptr + 1, mask=mg[:, None], other=0.0).to(tl.float32)
        q0, q1 = _rotate(q0, q1, cos[None, :], sin[None, :])
        sg = (tl.sum(q0 * k0[None, :], axis=1) + tl.sum(q1 * k1[None, :], axis=1)) * (HD**-0.5)
        sg = tl.where(mg, sg, -float("inf"))
        top = tl.max(sg, axis=0)
        w_new = top + tl.log(tl.sum(tl.exp(sg - top), axis=0))

    # the step's action a = min(ctz(t), LEVELS) (LEVELS at t = 0) and its table rows
    pos = tl.load(Pos)
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
    va0, va1 = _slot_rows(vslots, src_a, v0n, v1n, offs_i, mc, HD)
    vb0 = tl.load(vslots + b_row, mask=mb_row, other=0.0).to(tl.float32)[None, :]
    vb1 = tl.load(vslots + b_row + 1, mask=mb_row, other=0.0).to(tl.float32)[None, :]
    tl.debug_barrier()  # every warp has read the old slots before any overwrites them
    out_ptr = offs_c[:, None] * HD + 2 * offs_i[None, :]
    m2 = mc[:, None]
    tl.store(kslots + out_ptr, (pa * ka0 + pb * kb0).to(kv_ty), mask=m2)
    tl.store(kslots + out_ptr + 1, (pa * ka1 + pb * kb1).to(kv_ty), mask=m2)
    tl.store(vslots + out_ptr, (pa * va0 + pb * vb0).to(kv_ty), mask=m2)
    tl.store(vslots + out_ptr + 1, (pa * va1 + pb * vb1).to(kv_ty), mask=m2)
    tl.store(w_ptr + offs_c, w_out, mask=mc)


@triton.jit
def _readout_kernel(
    QKV,
    InvFreq,
    Pos,
    K,
    V,
    W,
    KGain,
    VGain,
    Out,
    s_qkv,
    softcap,
    C,
    H: tl.constexpr,
    HKV: tl.constexpr,
    HD: tl.constexpr,
    BLOCK_C: tl.constexpr,
    KV_NORM: tl.constexpr,
    SOFTCAP: tl.constexpr,
    MASK_EMPTY: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b, h = pid // H, pid % H
    hk = h // (H // HKV)
    offs_i = tl.arange(0, HD // 2)
    offs_c = tl.arange(0, BLOCK_C)
    mc = offs_c < C
    cos, sin = _angles(Pos, InvFreq, offs_i)
    q_ptr = QKV + b * s_qkv + h * HD + 2 * offs_i
    q0, q1 = _rotate(tl.load(q_ptr).to(tl.float32), tl.load(q_ptr + 1).to(tl.float32), cos, sin)
    q_ty = QKV.dtype.element_ty  # the read-out's q is rounded to the model dtype, as the core's is
    q0, q1 = q0.to(q_ty).to(tl.float32), q1.to(q_ty).to(tl.float32)

    state = (b * HKV + hk) * C
    slot_ptr = state * HD + offs_c[:, None] * HD + 2 * offs_i[None, :]
    m2 = mc[:, None]
    K0 = tl.load(K + slot_ptr, mask=m2, other=0.0).to(tl.float32)
    K1 = tl.load(K + slot_ptr + 1, mask=m2, other=0.0).to(tl.float32)
    if KV_NORM:
        K0, K1 = _rms(K0, K1, KGain, offs_i, HD)
    s = (tl.sum(K0 * q0[None, :], axis=1) + tl.sum(K1 * q1[None, :], axis=1)) * (HD**-0.5)
    if SOFTCAP:
        s = softcap * (2.0 / (1.0 + tl.exp(-2.0 * s / softcap)) - 1.0)  # softcap * tanh(s / softcap)
    drop = ~mc
    if MASK_EMPTY:
        drop = drop | (tl.load(W + state + offs_c, mask=mc, other=0.0) <= _EMPTY)
    s = tl.where(drop, -float("inf"), s)
    p = tl.exp(s - tl.max(s, axis=0))
    p = p / tl.sum(p, axis=0)
    V0 = tl.load(V + slot_ptr, mask=m2, other=0.0).to(tl.float32)
    V1 = tl.load(V + slot_ptr + 1, mask=m2, other=0.0).to(tl.float32)
    if KV_NORM:
        V0, V1 = _rms(V0, V1, VGain, offs_i, HD)
    o_ptr = Out + (b * H + h) * HD + 2 * offs_i
    out_ty = Out.dtype.element_ty
    tl.store(o_ptr, tl.sum(p[:, None] * V0, axis=0).to(out_ty))
    tl.store(o_ptr + 1, tl.sum(p[:, None] * V1, axis=0).to(out_ty))


_INV_FREQ: dict[tuple, torch.Tensor] = {}


def _inv_freq(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """rope_cos_sin's frequencies, computed the same way, so the angles are the same fp32 products."""
    key = (head_dim, theta, str(device))
    if key not in _INV_FREQ:
        exponents = torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
        _INV_FREQ[key] = 1.0 / (theta**exponents)
    return _INV_FREQ[key]


def supports(K: torch.Tensor) -> bool:
    """Whether the kernels take a state: contiguous slots in logical order (not behind a ring map)
    and an even head dim whose halves are a power of two."""
    half = K.shape[-1] // 2
    return K.is_contiguous() and K.shape[-1] == 2 * half and half > 0 and (half & (half - 1)) == 0


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
    if not supports(K) or not (V.is_contiguous() and W.is_contiguous()):
        raise ValueError(f"the Triton telescoping step needs contiguous slots and a head dim 2^k * 2, got {d}")
    if qkv.stride(1) != 1 or h.stride(-1) != 1:
        raise ValueError("the Triton telescoping step needs rows of qkv and h with unit stride")
    inv_freq = _inv_freq(d, theta, qkv.device)
    block_c = triton.next_power_of_2(C)
    D = h.shape[-1]
    _update_kernel[(B * Hkv,)](
        qkv,
        h,
        ln_w,
        gate_w if gate_w is not None else ln_w,  # unread without a linear gate
        inv_freq,
        position,
        K,
        V,
        W,
        tables.src_a,
        tables.src_b,
        tables.merge.view(torch.uint8),
        qkv.stride(0),
        h.stride(0),
        D,
        eps,
        C,
        H=H,
        HKV=Hkv,
        HD=d,
        LEVELS=len(opts.fmap),
        BLOCK_C=block_c,
        BLOCK_D=min(1024, triton.next_power_of_2(D)),
        BLOCK_G=triton.next_power_of_2(H // Hkv),
        HAS_GATE=gate_w is not None,
        num_warps=UPDATE_WARPS,
    )
    out = torch.empty(B, H, d, device=qkv.device, dtype=qkv.dtype)
    _readout_kernel[(B * H,)](
        qkv,
        inv_freq,
        position,
        K,
        V,
        W,
        k_gain if k_gain is not None else ln_w,  # unread without kv_norm
        v_gain if v_gain is not None else ln_w,
        out,
        qkv.stride(0),
        opts.softcap or 1.0,
        C,
        H=H,
        HKV=Hkv,
        HD=d,
        BLOCK_C=block_c,
        KV_NORM=opts.kv_norm,
        SOFTCAP=opts.softcap is not None,
        MASK_EMPTY=opts.mask_empty,
        num_warps=READOUT_WARPS,
    )
    return out
