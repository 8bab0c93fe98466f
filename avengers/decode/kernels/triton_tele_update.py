"""A telescoping layer's batch-1 slot update, slots in place behind the cache's ring map, as one
Triton kernel; reference: decode.telescoping.fused_qkv_update_core with a ring map (ring_push).

One program per (sequence, KV head), from the fused QKV GEMV's output and the block input: RoPE on
k and on the group's queries (written out, rounded to the model dtype, for the read-out kernel), the
new token's log-mass (the linear gate from the normalised block input, or WISQ), then the step's
two cells: the merged pair into slot m's cell and the token into the cell slot m - 1 held (at the
drop step, both into the oldest slot's cell). The map is only read: the cache advances it once
every layer has taken the step (advance_ring), so no program rotates it under another.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from avengers.ops.telescoping import EMPTY_THRESHOLD

NUM_WARPS = 4
_EMPTY = tl.constexpr(EMPTY_THRESHOLD)


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
def _write_cells(X, a_row, b_row, n0, n1, merge, pa, pb):
    """Cell b_row <- the merged pair (pa * cell a + pb * cell b; cell b unchanged at the drop step),
    then cell a_row <- the new token (n0, n1): at the drop step both are one cell and the token wins."""
    ty = X.dtype.element_ty
    xa0, xa1 = tl.load(X + a_row).to(tl.float32), tl.load(X + a_row + 1).to(tl.float32)
    xb0, xb1 = tl.load(X + b_row).to(tl.float32), tl.load(X + b_row + 1).to(tl.float32)
    tl.store(X + b_row, tl.where(merge, pa * xa0 + pb * xb0, xb0).to(ty))
    tl.store(X + b_row + 1, tl.where(merge, pa * xa1 + pb * xb1, xb1).to(ty))
    tl.store(X + a_row, n0.to(ty))
    tl.store(X + a_row + 1, n1.to(ty))


@triton.jit
def _ring_update_kernel(
    QKV,
    Hin,
    LnW,
    GateW,
    InvFreq,
    Pos,
    K,
    V,
    W,
    Ring,
    RingNew,
    RingFused,
    RingMerge,
    Qout,
    s_qkv,
    s_h,
    D,
    ln_eps,
    C,
    H: tl.constexpr,
    HKV: tl.constexpr,
    HD: tl.constexpr,
    LEVELS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HAS_GATE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b, hk = pid // HKV, pid % HKV
    G: tl.constexpr = H // HKV
    offs_i = tl.arange(0, HD // 2)  # RoPE's adjacent pairs: even channels 2i, odd 2i + 1
    offs_g = tl.arange(0, BLOCK_G)
    mg = offs_g < G
    row = QKV + b * s_qkv
    pos = tl.load(Pos)
    angle = pos.to(tl.float32) * tl.load(InvFreq + offs_i)
    cos, sin = tl.cos(angle), tl.sin(angle)

    k_ptr = row + (H + hk) * HD + 2 * offs_i
    k0, k1 = tl.load(k_ptr).to(tl.float32), tl.load(k_ptr + 1).to(tl.float32)
    k0, k1 = k0 * cos - k1 * sin, k0 * sin + k1 * cos
    v_ptr = row + (H + HKV + hk) * HD + 2 * offs_i
    v0, v1 = tl.load(v_ptr).to(tl.float32), tl.load(v_ptr + 1).to(tl.float32)
    q_ptr = row + (hk * G + offs_g)[:, None] * HD + 2 * offs_i[None, :]
    q0 = tl.load(q_ptr, mask=mg[:, None], other=0.0).to(tl.float32)
    q1 = tl.load(q_ptr + 1, mask=mg[:, None], other=0.0).to(tl.float32)
    q0, q1 = q0 * cos[None, :] - q1 * sin[None, :], q0 * sin[None, :] + q1 * cos[None, :]
    o_ptr = Qout + (b * H + hk * G + offs_g)[:, None] * HD + 2 * offs_i[None, :]
    tl.store(o_ptr, q0.to(Qout.dtype.element_ty), mask=mg[:, None])
    tl.store(o_ptr + 1, q1.to(Qout.dtype.element_ty), mask=mg[:, None])

    if HAS_GATE:
        w_new = _linear_gate(Hin, LnW, GateW, b, hk, s_h, D, ln_eps, BLOCK_D)
    else:  # WISQ: logsumexp over the group's query heads of q . k / sqrt(d), both rotated
        sg = (tl.sum(q0 * k0[None, :], axis=1) + tl.sum(q1 * k1[None, :], axis=1)) * (HD**-0.5)
        sg = tl.where(mg, sg, -float("inf"))
        top = tl.max(sg, axis=0)
        w_new = top + tl.log(tl.sum(tl.exp(sg - top), axis=0))

    # the step's action a = min(ctz(t), LEVELS) (LEVELS at t = 0), and its two cells
    a = 0
    for lvl in tl.static_range(1, LEVELS + 1):
        a += (pos % (1 << lvl) == 0).to(tl.int32)
    new_cell = tl.load(Ring + tl.load(RingNew + a))
    fused_cell = tl.load(Ring + tl.load(RingFused + a))  # == new_cell at the drop step
    merge = tl.load(RingMerge + a) != 0

    state = (b * HKV + hk) * C
    wa, wb = tl.load(W + state + new_cell), tl.load(W + state + fused_cell)  # slots m - 1 and m
    hi = tl.maximum(wa, wb)  # _fusion: the fused pair's weights and log-mass
    wn = hi + tl.log(1.0 + tl.exp(-tl.abs(wa - wb)))
    fused_w = tl.where(wb <= _EMPTY, wa, tl.where(wa <= _EMPTY, wb, wn))
    pa, pb = tl.exp(wa - wn), tl.exp(wb - wn)
    a_row = (state + new_cell) * HD + 2 * offs_i
    b_row = (state + fused_cell) * HD + 2 * offs_i
    _write_cells(K, a_row, b_row, k0, k1, merge, pa, pb)
    _write_cells(V, a_row, b_row, v0, v1, merge, pa, pb)
    tl.store(W + state + fused_cell, tl.where(merge, fused_w, wb))
    tl.store(W + state + new_cell, w_new)


_INV_FREQ: dict[tuple, torch.Tensor] = {}


def _inv_freq(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """rope_cos_sin's frequencies, computed the same way, so the angles are the same fp32 products."""
    key = (head_dim, theta, str(device))
    if key not in _INV_FREQ:
        exponents = torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
        _INV_FREQ[key] = 1.0 / (theta**exponents)
    return _INV_FREQ[key]


def supports(K: torch.Tensor) -> bool:
    """Contiguous slots and a head dim of two power-of-two halves."""
    half = K.shape[-1] // 2
    return K.is_contiguous() and K.shape[-1] == 2 * half and half > 0 and (half & (half - 1)) == 0


def ring_update(
    qkv: torch.Tensor,
    h: torch.Tensor,
    ln_w: torch.Tensor,
    eps: float,
    gate_w: torch.Tensor | None,
    position: torch.Tensor,
    K: torch.Tensor,
    V: torch.Tensor,
    W: torch.Tensor,
    ring: torch.Tensor,
    tables,
    theta: float,
    n_levels: int,
) -> torch.Tensor:
    """fused_qkv_update_core for slots in place behind `ring` (read only): qkv [B, (H + 2 H_kv) d],
    h [B, D]; K, V [B, H_kv, C, d] and W [B, H_kv, C] written at two cells each -> the rotated
    queries [B, H, d] in qkv's dtype."""
    B, Hkv, C, d = K.shape
    H = qkv.shape[1] // d - 2 * Hkv
    if not (supports(K) and V.is_contiguous() and W.is_contiguous()):
        raise ValueError(f"the Triton ring update needs contiguous slots and a head dim 2^k * 2, got {d}")
    if qkv.stride(1) != 1 or h.stride(-1) != 1:
        raise ValueError("the Triton ring update needs rows of qkv and h with unit stride")
    q = torch.empty(B, H, d, device=qkv.device, dtype=qkv.dtype)
    D = h.shape[-1]
    _ring_update_kernel[(B * Hkv,)](
        qkv,
        h,
        ln_w,
        gate_w if gate_w is not None else ln_w,  # unread without a linear gate
        _inv_freq(d, theta, qkv.device),
        position,
        K,
        V,
        W,
        ring,
        tables.ring_new,
        tables.ring_fused,
        tables.ring_merge.view(torch.uint8),
        q,
        qkv.stride(0),
        h.stride(0),
        D,
        eps,
        C,
        H=H,
        HKV=Hkv,
        HD=d,
        LEVELS=n_levels,
        BLOCK_D=min(1024, triton.next_power_of_2(D)),
        BLOCK_G=triton.next_power_of_2(H // Hkv),
        HAS_GATE=gate_w is not None,
        num_warps=NUM_WARPS,
    )
    return q
