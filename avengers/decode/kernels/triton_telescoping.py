"""A telescoping layer's whole decode step between the projections as one Triton kernel.

Reference: decode.telescoping.step_core (RoPE, gate, push_at, slot_attention), the same maths in
torch; tests compare them step by step. One program per (sequence, KV head) reads that head's C
slots, its G = H / H_kv query rows and its new key and value, then:

1. rotates q and k (adjacent pairs; cos/sin of the step's position come in as fp32 tensors that
   torch computed once per step on the device: a GPU's fast sine loses accuracy at large angles);
2. takes the gate logit (given, the linear gate on rmsnorm(h) computed here, or WISQ: logsumexp
   over the group of q . k / sqrt(d), from the rotated fp32 q and k);
3. merges, shifts and inserts: step t merges slots m-1, m into m, m = StepTables.merge_slot[a]
   for the action a = min(ctz(t), L) found on the device (m = C at a = L: the drop step), and
   writes the new slots back in place;
4. reads out the new slots for its G query rows (k/v RMSNorm with gains, soft cap, EMPTY mask,
   softmax) as two small tl.dot products, rows padded to 16.

Merges, log-masses and norms run in fp32 (the state's log-masses are fp32). No host sync: the
position is read on the device, so a step can be replayed from a CUDA graph.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from avengers.decode.kernels.triton_pdl import pdl_kwargs
from avengers.ops import telescoping as numerics

GATE_GIVEN, GATE_WISQ, GATE_LINEAR = 0, 1, 2
MAX_SLOT_ELEMS = 128 * 128  # C * d of one head's slots: registers hold them (and their merge inputs) at once
BLOCK_DM = 512  # model-dim chunk of the fused linear gate
# the shared numerics' constants, as the compiler takes globals
EMPTY_LOG_MASS = tl.constexpr(numerics.EMPTY_LOG_MASS)
EMPTY_THRESHOLD = tl.constexpr(numerics.EMPTY_THRESHOLD)
NORM_EPS = tl.constexpr(numerics.NORM_EPS)


class LinearGate(NamedTuple):
    """The linear gate's inputs when the kernel computes it: w = rmsnorm(h; norm_weight, eps) @ weight^T."""

    h: torch.Tensor  # [B, D] block input
    norm_weight: torch.Tensor  # [D]
    eps: float
    weight: torch.Tensor  # [H_kv, D]


@triton.jit
def _rotated(X, offs_d, Cos, Sin, mask):
    """fp32 rows X[..., offs_d] rotated in adjacent pairs (x[2i], x[2i+1]) by cos/sin[i], as
    ops.rope does: x[i] * cos + x[i ^ 1] * (-sin for even i, sin for odd i)."""
    x = tl.load(X + offs_d, mask=mask, other=0.0).to(tl.float32)
    partner = tl.load(X + (offs_d ^ 1), mask=mask, other=0.0).to(tl.float32)
    c = tl.load(Cos + offs_d // 2)
    s = tl.load(Sin + offs_d // 2)
    return x * c + partner * tl.where(offs_d % 2 == 0, -s, s)


@triton.jit
def _linear_gate(Hin, LnW, GateW, b, h, eps, DM, BLOCK: tl.constexpr):
    """rmsnorm(Hin[b]) @ GateW[h] in fp32, the normalised row rounded to Hin's dtype first (as
    F.rms_norm returns it)."""
    ks = tl.arange(0, BLOCK)
    row = Hin + b * DM
    ss = tl.zeros([BLOCK], tl.float32)
    for k0 in range(0, DM, BLOCK):
        x = tl.load(row + k0 + ks, mask=k0 + ks < DM, other=0.0).to(tl.float32)
        ss += x * x
    rstd = 1.0 / tl.sqrt(tl.sum(ss, 0) / DM + eps)
    acc = tl.zeros([BLOCK], tl.float32)
    for k0 in range(0, DM, BLOCK):
        ok = k0 + ks < DM
        x = tl.load(row + k0 + ks, mask=ok, other=0.0).to(tl.float32)
        g = tl.load(LnW + k0 + ks, mask=ok, other=0.0).to(tl.float32)
        xn = (x * rstd * g).to(Hin.dtype.element_ty).to(tl.float32)
        acc += xn * tl.load(GateW + h * DM + k0 + ks, mask=ok, other=0.0).to(tl.float32)
    return tl.sum(acc, 0)


@triton.jit
def _wisq_gate(q, k, g_ok, scale):
    """logsumexp over the valid query rows of q [BG, d] . k [d] * scale."""
    s = tl.where(g_ok, tl.sum(q * k[None, :], 1) * scale, float("-inf"))
    mx = tl.max(s, 0)
    return mx + tl.log(tl.sum(tl.exp(s - mx), 0))


@triton.jit
def _action(t, L):
    """min(ctz(t), L) for a position t >= 0 (L at t = 0): the log2 of t's lowest set bit, an exact
    power of two in fp32, rounded."""
    low = (t & -t).to(tl.float32)
    ctz = (tl.log2(tl.maximum(low, 1.0)) + 0.5).to(tl.int32)
    return tl.where(t == 0, L, tl.minimum(ctz, L))


@triton.jit
def _logaddexp(a, b):
    """log(exp(a) + exp(b)) for finite a, b, with log1p's accuracy for a small second term."""
    mx = tl.maximum(a, b)
    e = tl.exp(-tl.abs(a - b))
    u = 1.0 + e
    return mx + tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def _pushed_log_mass(S, cs, c_ok, m, w_new):
    """The step's new log-masses [BC] and merge weights of the old slots m-1, m (per row; row m's
    are used): slot 0 <- w_new, 1..m-1 <- old 0..m-2, m <- logsumexp(old m-1, old m) (EMPTY + x = x),
    above m unchanged. Stored in place (all loads first)."""
    old = tl.load(S + cs, mask=c_ok, other=EMPTY_LOG_MASS)
    prev = tl.load(S + cs - 1, mask=c_ok & (cs >= 1), other=EMPTY_LOG_MASS)
    wn = _logaddexp(prev, old)
    pa, pb = tl.exp(prev - wn), tl.exp(old - wn)
    fused = tl.where(old <= EMPTY_THRESHOLD, prev, tl.where(prev <= EMPTY_THRESHOLD, old, wn))
    new = tl.where(cs == 0, w_new, tl.where(cs < m, prev, tl.where(cs == m, fused, old)))
    tl.debug_barrier()  # every thread has read the old slots before any overwrites them
    tl.store(S + cs, new, mask=c_ok)
    return new, pa, pb


@triton.jit
def _pushed_means(S, cs, c_ok, offs_d, m, x_new, pa, pb, D: tl.constexpr):
    """The step's new slot means [BC, d] (fp32 of the values stored in S's dtype): slot 0 <- x_new,
    1..m-1 <- old 0..m-2, m <- pa * old m-1 + pb * old m, above m unchanged. Stored in place."""
    at = cs[:, None] * D + offs_d[None, :]
    old = tl.load(S + at, mask=c_ok[:, None], other=0.0).to(tl.float32)
    prev = tl.load(S + at - D, mask=(c_ok & (cs >= 1))[:, None], other=0.0).to(tl.float32)
    merged = pa[:, None] * prev + pb[:, None] * old
    rows = cs[:, None]
    new = tl.where(rows == 0, x_new[None, :], tl.where(rows < m, prev, tl.where(rows == m, merged, old)))
    new = new.to(S.dtype.element_ty)
    tl.debug_barrier()
    tl.store(S + at, new, mask=c_ok[:, None])
    return new.to(tl.float32)


@triton.jit
def _rms_norm(x, Gain, offs_d, D: tl.constexpr, eps):
    """Rows of x [BC, d] times rsqrt(mean square + eps) times the gains (RMSNorm(0) = 0)."""
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / D + eps)
    return x * rstd[:, None] * tl.load(Gain + offs_d).to(tl.float32)[None, :]


@triton.jit
def _tanh(x):
    """tanh from exp (exact sign, no overflow): sign(x) (1 - e^{-2|x|}) / (1 + e^{-2|x|})."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _step_kernel(
    Q,
    Kn,
    Vn,
    Wg,
    Hin,
    LnW,
    GateW,
    Cos,
    Sin,
    Pos,
    MergeSlot,
    KS,
    VS,
    WS,
    KGain,
    VGain,
    Out,
    sqb,
    sqh,
    skb,
    skh,
    svb,
    svh,
    swb,
    H_KV,
    G,
    C,
    L,
    DM,
    eps,
    cap,
    scale,
    D: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_G: tl.constexpr,
    GATE: tl.constexpr,
    KV_NORM: tl.constexpr,
    MASK_EMPTY: tl.constexpr,
    SOFTCAP: tl.constexpr,
    GDC: tl.constexpr,
    BLOCK_DM: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // H_KV).to(tl.int64)
    h = pid % H_KV
    cs = tl.arange(0, BLOCK_C)
    c_ok = cs < C
    offs_d = tl.arange(0, D)
    gs = tl.arange(0, BLOCK_G)
    g_ok = gs < G
    # before the wait (triton_pdl.py): the position and its tables were written by plain kernels
    # before the step, the slots by this layer's previous step
    m = tl.load(MergeSlot + _action(tl.load(Pos), L))
    state = pid.to(tl.int64) * C
    if GDC:
        tl.extra.cuda.gdc_wait()
    q = _rotated(Q + b * sqb + (h * G + gs)[:, None] * sqh, offs_d[None, :], Cos, Sin, g_ok[:, None])
    k = _rotated(Kn + b * skb + h * skh, offs_d, Cos, Sin, offs_d < D)
    v = tl.load(Vn + b * svb + h * svh + offs_d).to(tl.float32)
    if GATE == 0:
        w = tl.load(Wg + b * swb + h).to(tl.float32)
    elif GATE == 1:
        w = _wisq_gate(q, k, g_ok, scale)
    else:
        w = _linear_gate(Hin, LnW, GateW, b, h, eps, DM, BLOCK_DM)
    if GDC:  # programmatic dependent launch: the next kernel may start loading its weights
        tl.extra.cuda.gdc_launch_dependents()

    w_slots, pa, pb = _pushed_log_mass(WS + state, cs, c_ok, m, w)
    k_slots = _pushed_means(KS + state * D, cs, c_ok, offs_d, m, k, pa, pb, D)
    v_slots = _pushed_means(VS + state * D, cs, c_ok, offs_d, m, v, pa, pb, D)

    if KV_NORM:
        k_slots = _rms_norm(k_slots, KGain, offs_d, D, NORM_EPS)
        v_slots = _rms_norm(v_slots, VGain, offs_d, D, NORM_EPS)
    q = q.to(Out.dtype.element_ty).to(tl.float32)  # the read-out takes q in the output dtype, as step_core
    s = tl.dot(q, tl.trans(k_slots), input_precision="ieee") * scale
    if SOFTCAP:
        s = cap * _tanh(s / cap)
    dead = ~c_ok
    if MASK_EMPTY:
        dead = dead | (w_slots <= EMPTY_THRESHOLD)
    s = tl.where(dead[None, :], float("-inf"), s)
    p = tl.exp(s - tl.max(s, 1)[:, None])
    out = tl.dot(p, v_slots, input_precision="ieee") / tl.sum(p, 1)[:, None]
    rows = (b * H_KV + h) * G + gs
    tl.store(Out + rows[:, None] * D + offs_d[None, :], out.to(Out.dtype.element_ty), mask=g_ok[:, None])


def fits(nheads: int, k_slots: torch.Tensor, log_mass: torch.Tensor) -> bool:
    """Whether the kernel takes a step of `nheads` query heads over slots k_slots [B, H_kv, C, d]
    (log-masses [B, H_kv, C]): d a power of two in [16, 256], C * d at most MAX_SLOT_ELEMS, a
    group of at most 64 query heads, half or fp32 slots with fp32 log-masses. Other shapes keep
    the torch step."""
    H = nheads
    _, Hkv, C, d = k_slots.shape
    return (
        d & (d - 1) == 0
        and 16 <= d <= 256
        and C * d <= MAX_SLOT_ELEMS
        and H % Hkv == 0
        and H // Hkv <= 64
        and k_slots.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and log_mass.dtype == torch.float32
    )


def num_warps(cache_size: int, head_dim: int) -> int:
    """Warps per program: enough threads that one head's slots fit in registers."""
    return 8 if cache_size * head_dim >= 8192 else 4


def telescoping_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor | LinearGate | None,
    position: torch.Tensor,
    K: torch.Tensor,
    V: torch.Tensor,
    W: torch.Tensor,
    merge_slot: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    opts,
    k_gain: torch.Tensor | None,
    v_gain: torch.Tensor | None,
) -> torch.Tensor:
    """decode.telescoping.step_core as one kernel: q [B, H, d], k, v [B, H_kv, d] as projected
    (unit last stride; q and k not yet rotated), the gate w (logits [B, H_kv], a LinearGate, or None:
    WISQ), the 0-dim long device position, the slots K, V [B, H_kv, C, d] and log-masses W [B, H_kv, C]
    (contiguous; updated in place), merge_slot (StepTables.merge_slot), cos, sin [d/2] fp32 of the
    position. Returns the read-out [B, H, d] in v's dtype."""
    B, H, d = q.shape
    _, Hkv, C, _ = K.shape
    if (
        not fits(H, K, W)
        or K.shape[-1] != d
        or k.shape != (B, Hkv, d)
        or v.shape != k.shape
        or min(q.stride(-1), k.stride(-1), v.stride(-1)) != 1
        or not (K.is_contiguous() and V.is_contiguous() and W.is_contiguous())
        or V.shape != K.shape
        or V.dtype != K.dtype
        or cos.shape != (d // 2,)
        or sin.shape != cos.shape
        or cos.dtype != torch.float32
        or sin.dtype != torch.float32
        or merge_slot.dtype != torch.int32
    ):
        raise ValueError(
            f"telescoping_step: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, slots "
            f"{tuple(K.shape)} {K.dtype} (log-masses {W.dtype}), cos/sin {tuple(cos.shape)} {cos.dtype} do "
            "not fit the kernel (fits(), contiguous slots, unit last strides, fp32 cos/sin [d/2], int32 merge_slot)"
        )
    out = torch.empty(B, H, d, device=q.device, dtype=v.dtype)
    gate = GATE_WISQ if w is None else GATE_LINEAR if isinstance(w, LinearGate) else GATE_GIVEN
    logits = w if gate == GATE_GIVEN else out
    lin = w if gate == GATE_LINEAR else LinearGate(out, out, 0.0, out)
    if gate == GATE_LINEAR and not (lin.h.is_contiguous() and lin.weight.is_contiguous()):
        raise ValueError("telescoping_step: the linear gate's h and weight must be contiguous")
    kn = opts.kv_norm
    if kn and k_gain is None:  # RMSNorm without gains
        k_gain = v_gain = torch.ones(d, device=q.device, dtype=torch.float32)
    _step_kernel[(B * Hkv,)](
        q,
        k,
        v,
        logits,
        lin.h,
        lin.norm_weight,
        lin.weight,
        cos,
        sin,
        position,
        merge_slot,
        K,
        V,
        W,
        k_gain if kn else out,
        v_gain if kn else out,
        out,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        logits.stride(0),
        Hkv,
        H // Hkv,
        C,
        merge_slot.shape[0] - 1,
        lin.h.shape[-1] if gate == GATE_LINEAR else 0,
        float(lin.eps),
        float(opts.softcap or 1.0),
        d**-0.5,
        D=d,
        BLOCK_C=max(16, triton.next_power_of_2(C)),
        BLOCK_G=max(16, triton.next_power_of_2(H // Hkv)),
        GATE=gate,
        KV_NORM=kn,
        MASK_EMPTY=opts.mask_empty,
        SOFTCAP=opts.softcap is not None,
        BLOCK_DM=BLOCK_DM,
        num_warps=num_warps(C, d),
        **pdl_kwargs(q.device),
    )
    return out
