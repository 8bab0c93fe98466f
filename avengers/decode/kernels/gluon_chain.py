"""The GEMV chain of a Llama decode step (every block's QKV, Wo, gate/up and W2 GEMVs at batch 1)
as one warp-specialised persistent Gluon kernel: the first part of a one-kernel decode step.

Why: at batch 1 a Llama step is a chain of GEMVs whose weights do not depend
on the token, but at every kernel (or grid-barrier phase) boundary the weight stream stops until
the previous phase's output is there. Here it never stops: in every program (one per SM) a
one-warp loader partition walks the weights of all blocks in step order and copies them with TMA
into a ring of shared-memory stages, throttled by free stages (and, INFLIGHT, by the copies not
yet landed: the decode step keeps LlamaStepKernel.INFLIGHT in flight, so that the barriers'
atomics do not queue behind a deep stream), while the consumer warps wait at the grid barriers,
put their input row into shared memory and reduce the staged weights against it. Every weight
item is one TMA box of ROWS rows x ITEM_K columns (16 KB in bf16).

Two entry points share the kernel. `chain` runs the GEMVs alone (the Wo phase reads the q rows of
the QKV output; `chain_reference` is its torch twin), for experiments/gpu_gluon_chain_probe.py.
`gluon_step.LlamaStepKernel` (DECODE, the `gluon` decode path) is a whole batch-1 decode step in one
launch: the token's embedding row, RoPE and the cache write in the QKV epilogue, a split-K
attention phase whose keys and values stream through the same ring, and the final norm + LM head;
its rows between phases are stored as int32 words carrying the writing phase's tag (_put). Weights
are packed once (`pack`): every block's [Wqkv; Wo; Wg1 with gate and up rows interleaved in groups
of ROWS // 2] stacked into one [rows, D] matrix, and every W2 into [L * D, hidden]; the LM head is
streamed in place.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language._standard import _import_from_triton
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from avengers.decode.kernels import triton_grid

ROWS = 8  # weight rows per item
CHUNKS = 4  # TMA box: [ROWS, CHUNKS, CW] = ROWS rows of ITEM_K columns
CW = 256  # TMA boxes are at most 256 elements per dimension
ITEM_K = CHUNKS * CW
MAX_K_ITEMS = 8  # the input row buffer holds K <= MAX_K_ITEMS * ITEM_K
# row blocks a program parks per phase (gate/up, QKV with RoPE) for one epilogue at the phase's end
MAX_PARKED = 16
# the same, as constants the kernels can read
_R, _CH, _CW, _IK = gl.constexpr(ROWS), gl.constexpr(CHUNKS), gl.constexpr(CW), gl.constexpr(ITEM_K)
_MAXK = gl.constexpr(MAX_K_ITEMS)
_MP = gl.constexpr(MAX_PARKED)


# Written against Triton 3.6's Gluon (the one torch 2.11 ships); later releases renamed
# thread_barrier, _reinterpret and the TMA copies
GLUON_API = hasattr(gl, "thread_barrier")


@gluon.jit
def _views(stage, xbuf):
    """A ring stage as [row group, row, chunk, column] and the input row buffer as [K item, chunk,
    column], both row-major (what TMA writes with no swizzle)."""
    plain: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [3, 2, 1, 0])
    return (
        stage._reinterpret(gl.bfloat16, [2, _R // 2, _CH, _CW], plain),
        xbuf._reinterpret(gl.bfloat16, [_MAXK, _CH, _CW], xbuf.layout),
    )


@gluon.jit
def _stamp(Stamps, pid, ph, slot: gl.constexpr, ON: gl.constexpr):
    """Stamps[pid, ph, slot] = the GPU's global timer (ns), when profiling (`chain(stamps=...)`)."""
    if ON:
        t = gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [pid], dtype=gl.int64, is_pure=False, pack=1)
        gl.store(Stamps + (pid * 4096 + ph) * 4 + slot, t)


DETAIL_STAMPS = 2048  # Stamps[:, DETAIL_STAMPS + phase]: the attention phase's steps (_stamp_after)
_DETAIL = gl.constexpr(DETAIL_STAMPS)


@gluon.jit
def _stamp_after(Stamps, pid, ph, slot: gl.constexpr, ON: gl.constexpr, dep):
    """Stamps[pid, DETAIL_STAMPS + ph, slot] = the global timer once `dep` (an int32 scalar computed
    from the data waited for) is there: the attention phase's detail profile."""
    if ON:
        t = gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [dep], dtype=gl.int64, is_pure=False, pack=1)
        gl.store(Stamps + (pid * 4096 + _DETAIL + ph) * 4 + slot, t)


@gluon.jit
def _copy(desc, row, chunk, ring, ready, empty, i, STAGES: gl.constexpr, INFLIGHT: gl.constexpr = 0):
    """Ring position i: wait for its stage to be free (INFLIGHT > 0: and for copy i - INFLIGHT to
    have landed), then TMA-copy desc's box at [row, chunk, 0] into it. Returns i + 1."""
    s = i % STAGES
    if INFLIGHT > 0:
        if i >= INFLIGHT:
            j = i - INFLIGHT
            mbarrier.wait(ready.index(j % STAGES), (j // STAGES) & 1)
    mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)
    mbarrier.expect(ready.index(s), _R * _IK * 2)
    tma.async_copy_global_to_shared(desc, [row, chunk, 0], ready.index(s), ring.index(s))
    return i + 1


@gluon.jit
def _load_phase(
    desc,
    row0,
    nrb,
    k_items,
    pid,
    P,
    ring,
    ready,
    empty,
    i,
    STAGES: gl.constexpr,
    INFLIGHT: gl.constexpr,
):
    """This program's row blocks pid, pid + P, ... of one GEMV, K item by K item, into the ring."""
    for rb in range(pid, nrb, P):
        for kc in range(k_items):
            i = _copy(desc, row0 + rb * _R, kc * _CH, ring, ready, empty, i, STAGES, INFLIGHT)
    return i


@gluon.jit
def _loader(
    w_d,
    w2_d,
    k_d,
    v_d,
    h_d,
    ring,
    ready,
    empty,
    n_layers,
    P,
    NQKV,
    D,
    HID,
    Stamps,
    Pos,
    HKV,
    S,
    NSPLIT,
    SPLIT,
    V,
    STAGES: gl.constexpr,
    STAMPS: gl.constexpr,
    DECODE: gl.constexpr,
    KV_RING: gl.constexpr,
    INFLIGHT: gl.constexpr,
):
    """Worker partition (one warp): every weight item this program reduces, in the consumer's
    order (stamp 0: when the phase's last copy was issued; DECODE: 5 phases a block, the attention
    phase stamped when its keys and values are issued, with KV_RING, else with the QKV copies, and
    the LM head after the last block)."""
    pid = gl.program_id(0)
    per_layer = NQKV + D + 2 * HID
    kd = D // _IK
    i = 0
    length = 0
    if KV_RING:
        length = gl.load(Pos).to(gl.int32) + 1  # TMA coordinates are 32-bit
    for layer in range(n_layers):
        row0 = layer * per_layer
        ph = layer * (4 + DECODE)
        i = _load_phase(w_d, row0, NQKV // _R, kd, pid, P, ring, ready, empty, i, STAGES, INFLIGHT)
        _stamp(Stamps, pid, ph, 0, STAMPS)
        if DECODE:
            if KV_RING:
                i = _load_kv(
                    k_d,
                    v_d,
                    layer,
                    HKV,
                    S,
                    length,
                    NSPLIT,
                    SPLIT,
                    pid,
                    P,
                    ring,
                    ready,
                    empty,
                    i,
                    STAGES,
                    INFLIGHT,
                )
            _stamp(Stamps, pid, ph + 1, 0, STAMPS)
        i = _load_phase(w_d, row0 + NQKV, D // _R, kd, pid, P, ring, ready, empty, i, STAGES, INFLIGHT)
        _stamp(Stamps, pid, ph + 1 + DECODE, 0, STAMPS)
        i = _load_phase(w_d, row0 + NQKV + D, 2 * HID // _R, kd, pid, P, ring, ready, empty, i, STAGES, INFLIGHT)
        _stamp(Stamps, pid, ph + 2 + DECODE, 0, STAMPS)
        i = _load_phase(w2_d, layer * D, D // _R, HID // _IK, pid, P, ring, ready, empty, i, STAGES, INFLIGHT)
        _stamp(Stamps, pid, ph + 3 + DECODE, 0, STAMPS)
    if DECODE:  # the LM head
        i = _load_phase(h_d, 0, V // _R, kd, pid, P, ring, ready, empty, i, STAGES, INFLIGHT)
        _stamp(Stamps, pid, n_layers * 5, 0, STAMPS)


# the Triton kernels' grid barrier (triton_grid.py), called from Gluon (measured faster than polling
# with plain acquire loads, or a flag that the last arrival sets: experiments/README.md).
_grid_arrive = _import_from_triton(triton_grid.grid_arrive)
_grid_wait = _import_from_triton(triton_grid.grid_wait)


@gluon.jit
def _rows(ring, ready, empty, xbuf, i, k_items, STAGES: gl.constexpr, L4: gl.constexpr):
    """[2, _R // 2] fp32 products of one row block's staged weight items with the input row in
    xbuf; element [a, b] is row a * _R // 2 + b of the block."""
    acc = gl.zeros([2, _R // 2, _CH, _CW], gl.float32, L4)
    for kc in range(k_items):
        s = i % STAGES
        mbarrier.wait(ready.index(s), (i // STAGES) & 1)
        stage, xs = _views(ring.index(s), xbuf)
        w = stage.load(L4)
        x = xs.index(kc).load(gl.SliceLayout(0, gl.SliceLayout(0, L4)))
        # every warp has read the stage before it is handed back to the loader (reads before an
        # async-proxy write need no proxy fence, as in CUTLASS's TMA pipelines)
        gl.thread_barrier()
        mbarrier.arrive(empty.index(s), count=1)
        acc += w.to(gl.float32) * gl.expand_dims(gl.expand_dims(x.to(gl.float32), 0), 0)
        i += 1
    return gl.sum(gl.sum(acc, 2), 2), i  # chunks in-thread first: one shuffle tree per row


@gluon.jit
def _row_index(K, LX: gl.constexpr):
    """Offsets and mask of a K-element row in xbuf's [_MAXK * _CH, _CW] shape."""
    r = gl.arange(0, _MAXK * _CH, layout=gl.SliceLayout(1, LX))
    e = gl.arange(0, _CW, layout=gl.SliceLayout(0, LX))
    idx = gl.expand_dims(r, 1) * _CW + gl.expand_dims(e, 0)
    return idx, idx < K


@gluon.jit
def _tag(tbase, phase):
    """Phase `phase`'s tag in the launch whose phases start at tbase: 15 bits of the phase's index
    among all launches', top bit set (a zeroed word carries none)."""
    return ((tbase + phase) & 0x7FFF) | 0x8000


@gluon.jit
def _put(ptr, offs, y, tag, mask, FMT: gl.constexpr):
    """Store y rounded to bf16; FMT (the decode step's buffers): as int32 words, the bf16 bits low
    and the writing phase's 16-bit tag high (_tag: which launch and phase wrote the word; _get
    reads the low half)."""
    v = y.to(gl.bfloat16)
    if FMT:
        bits = v.to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
        gl.store(ptr + offs, bits | (tag << 16), mask=mask)
    else:
        gl.store(ptr + offs, v, mask=mask)


@gluon.jit
def _get(ptr, offs, mask, FMT: gl.constexpr):
    """Load a 2-D block of a row stored by _put, as fp32 (other programs' stores: read past L1;
    FMT: the bf16 bits of the int32 words)."""
    if FMT:
        raw = gl.load(ptr + offs, mask=mask, other=0, cache_modifier=".cg")
        return (raw & 0xFFFF).to(gl.int16).to(gl.bfloat16, bitcast=True).to(gl.float32)
    else:
        return gl.load(ptr + offs, mask=mask, other=0.0, cache_modifier=".cg").to(gl.float32)


@gluon.jit
def _enter(
    xbuf,
    X,
    NormW,
    K,
    eps,
    NORM: gl.constexpr,
    LX: gl.constexpr,
    Count,
    phase,
    P,
    wait,
    pid,
    Stamps,
    ON: gl.constexpr,
    FMT: gl.constexpr = False,
):
    """Start a phase: pass its grid barrier (when `wait`), then put its input row into xbuf: X [K]
    as stored, or rmsnorm(X) * NormW rounded to bf16 (NORM). The norm weights do not depend on the
    barrier: their load is issued before it, so its latency is not added to the row's."""
    idx, ok = _row_index(K, LX)
    if NORM:
        w = gl.load(NormW + idx, mask=ok, other=0.0)
    if wait:
        _grid_wait(Count, phase * P)
    _stamp(Stamps, pid, phase, 1, ON)
    x = _get(X, idx, ok, FMT)  # other programs' stores
    if NORM:
        rstd = 1.0 / gl.sqrt(gl.sum(gl.sum(x * x, 1), 0) / K + eps)
        x = x * rstd * w.to(gl.float32)
    xbuf.store(x.to(gl.bfloat16))
    gl.thread_barrier()
    _stamp(Stamps, pid, phase, 2, ON)


@gluon.jit
def _leave(Count, phase, pid, Stamps, ON: gl.constexpr):
    """End a phase: this program's outputs are stored; arrive at the next barrier. Returns the next phase."""
    _stamp(Stamps, pid, phase, 3, ON)
    _grid_arrive(Count)
    return phase + 1


@gluon.jit
def _rope_angles(rb, gb, Rope, q_scale, pos, NQ, NK, HD: gl.constexpr):
    """(cos, sin) of row blocks rb's rotation pairs gb at `pos` (1, 0 for value rows). Rope: the
    cache's table as fp32 [positions, HD / 2, (cos, sin)]; the query's angles carry q_scale
    (1/sqrt(d)). The same in every block: loaded once a launch."""
    pair = rb * (_R // 2) + gb
    rot = pair * 2 < NQ + NK
    at = (pos * (HD // 2) + pair % (HD // 2)) * 2
    scale = gl.where(pair * 2 < NQ, q_scale, 1.0)
    return gl.load(Rope + at, mask=rot, other=1.0) * scale, gl.load(Rope + at + 1, mask=rot, other=0.0) * scale


@gluon.jit
def _park(ybuf, j, y):
    """Row block sums y [2, _R // 2] into parking slot j; returns j + 1. Epilogues that pair rows
    held by different warps (SwiGLU, RoPE) run once a phase over all its parked row blocks
    (_parked), instead of a cross-warp reduction with CTA barriers after every row block."""
    slots = ybuf._reinterpret(gl.float32, [_MP, 2, _R // 2], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    slots.index(j).store(y)
    return j + 1


@gluon.jit
def _parked(ybuf, LB: gl.constexpr):
    """The phase's parked row sums as (first, second) [slot, _R // 2]: rows a * _R // 2 + b of
    every parked row block, a = 0 and 1 (other warps stored them: a CTA barrier first)."""
    gl.thread_barrier()
    yy = ybuf.load(LB)
    a = gl.expand_dims(gl.expand_dims(gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(2, LB))), 0), 2)
    return gl.sum(gl.where(a == 0, yy, 0.0), 1), gl.sum(gl.where(a == 1, yy, 0.0), 1)


@gluon.jit
def _rope_store(x0, x1, rb, gb, c, s, pos, Q, Kb, Vb, skh, skn, NQ, NK, NQKV, tag, HD: gl.constexpr):
    """The QKV epilogue of the parked row blocks rb [slot, 1] (rows packed [0, 2, 4, 6, 1, 3, 5, 7]:
    x0[j, b] and x1[j, b] are a rotation pair): query rows rotated into Q, key rows rotated and value
    rows copied into this block's caches at `pos` (triton_gemv.rope_operands + rope_store, batch
    1), by the angles c, s (_rope_angles). Every row also goes to Q (_put, tagged): the attention
    reads this step's key and value there."""
    x0 = x0.to(gl.bfloat16).to(gl.float32)  # torch rounds the matmul output before rotating
    x1 = x1.to(gl.bfloat16).to(gl.float32)
    pair = rb * (_R // 2) + gb
    ok = rb < NQKV // _R
    for a in gl.static_range(2):
        row = pair * 2 + a
        val = (x0 * c - x1 * s) if a == 0 else (x0 * s + x1 * c)
        _put(Q, row, val, tag, ok, True)
        val = val.to(gl.bfloat16)
        kr = row - NQ
        gl.store(Kb + (kr // HD) * skh + pos * skn + kr % HD, val, mask=ok & (kr >= 0) & (kr < NK))
        vr = row - NQ - NK
        gl.store(Vb + (vr // HD) * skh + pos * skn + vr % HD, val, mask=ok & (vr >= 0))


@gluon.jit
def _online_tile(q, k, v, valid, m, l, acc):
    """One tile of keys (k, v [warp, 1, key, HD] fp32; valid [warp, 1, key]) into the running max
    m [warp, G], per-lane sums l [warp, G, key] and outputs acc [warp, G, key, HD]."""
    sc = gl.where(valid, gl.sum(q * k, 3), float("-inf"))  # [warp, G, key]
    m_new = gl.maximum(m, gl.max(sc, 2))
    m_use = gl.where(m_new == float("-inf"), 0.0, m_new)  # a warp may have no key below end yet
    alpha = gl.expand_dims(gl.exp(m - m_use), 2)  # [warp, G, 1]
    p = gl.exp(sc - gl.expand_dims(m_use, 2))
    return m_new, l * alpha + p, acc * gl.expand_dims(alpha, 3) + gl.expand_dims(p, 3) * v


@gluon.jit
def _attention_item(
    xbuf,
    ybuf,
    Q,
    Kb,
    Vb,
    pos,
    length,
    PAcc,
    PM,
    PL,
    h,
    sp,
    SPLIT,
    NSPLIT,
    skh,
    skn,
    ring,
    ready,
    empty,
    i,
    NQ,
    NK,
    G: gl.constexpr,
    HD: gl.constexpr,
    BK: gl.constexpr,
    STAGES: gl.constexpr,
    KV_RING: gl.constexpr,
    num_warps: gl.constexpr,
    Stamps=None,
    pid=0,
    ph=0,
    ON: gl.constexpr = False,
):
    """Pass 1 of split-K attention for kv head h, split sp (triton_decode.partial_item, batch 1): the
    G query heads' unnormalised output, running max and sum over keys [sp SPLIT, +SPLIT) below
    `length`, into the partials. The query is pre-scaled (the RoPE tables carry 1/sqrt(d)).
    Each warp keeps its own running max/sum/output over its BK keys of every tile, so a tile's
    reductions stay inside a warp; the warps are merged once, at the end. The query and this
    step's key and value come from Q (the QKV phase's output); older keys from the cache, KV_RING:
    through the ring (the loader copied them, 64 keys a stage, K then V), else plain loads, the
    next tile's issued before this tile's maths. Returns the ring position."""
    # [warp, query head, key, head dim]: 8 lanes x 4 along the head dim, 4 lanes along the keys
    L: gl.constexpr = gl.BlockedLayout([1, G, 1, 4], [1, 1, 4, 8], [num_warps, 1, 1, 1], [3, 2, 1, 0])
    LKV: gl.constexpr = gl.SliceLayout(1, L)  # [warp, key, head dim]
    LS: gl.constexpr = gl.SliceLayout(3, L)  # [warp, query head, key]
    LO: gl.constexpr = gl.SliceLayout(2, L)  # [warp, query head, head dim]
    LQ: gl.constexpr = gl.SliceLayout(0, LO)  # [query head, head dim]
    TILE: gl.constexpr = num_warps * BK
    g = gl.arange(0, G, layout=gl.SliceLayout(1, LQ))
    d = gl.arange(0, HD, layout=gl.SliceLayout(0, LQ))
    q = _get(Q, gl.expand_dims(h * G + g, 1) * HD + gl.expand_dims(d, 0), True, True)
    q = gl.expand_dims(gl.expand_dims(q, 0), 2)  # [1, G, 1, HD]
    LKD: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(1, L))  # [1, head dim] of LKV's last two dims
    dn = gl.expand_dims(gl.arange(0, HD, layout=gl.SliceLayout(0, LKD)), 0)
    k_now = gl.expand_dims(_get(Q, NQ + h * HD + dn, True, True), 0)  # [1, 1, HD]
    v_now = gl.expand_dims(_get(Q, NQ + NK + h * HD + dn, True, True), 0)
    if ON:
        _stamp_after(
            Stamps,
            pid,
            ph,
            0,
            ON,
            (
                gl.sum(gl.sum(gl.sum(gl.sum(q, 3), 2), 1), 0)
                + gl.sum(gl.sum(gl.sum(k_now, 2), 1), 0)
                + gl.sum(gl.sum(gl.sum(v_now, 2), 1), 0)
            ).to(gl.int32),
        )
    w3 = gl.arange(0, num_warps, layout=gl.SliceLayout(1, gl.SliceLayout(2, LKV)))
    n3 = gl.arange(0, BK, layout=gl.SliceLayout(0, gl.SliceLayout(2, LKV)))
    d3 = gl.expand_dims(gl.expand_dims(gl.arange(0, HD, layout=gl.SliceLayout(0, gl.SliceLayout(1, LKV))), 0), 1)
    key = gl.expand_dims(gl.expand_dims(w3, 1) * BK + gl.expand_dims(n3, 0), 2)  # [warp, key, 1]: key in tile
    at = key * skn + h * skh + d3
    ws = gl.arange(0, num_warps, layout=gl.SliceLayout(1, gl.SliceLayout(1, LS)))
    ns = gl.arange(0, BK, layout=gl.SliceLayout(0, gl.SliceLayout(1, LS)))
    key_s = gl.expand_dims(gl.expand_dims(ws, 1) * BK + gl.expand_dims(ns, 0), 1)  # [warp, 1, key]
    start = sp * SPLIT
    end = gl.minimum(start + SPLIT, length)
    m = gl.full([num_warps, G], float("-inf"), gl.float32, layout=gl.SliceLayout(2, LS))
    # per lane (its key of the tile): sums over the keys wait until the end, saving shuffles per tile
    l = gl.zeros([num_warps, G, BK], gl.float32, layout=LS)
    acc = gl.zeros([num_warps, G, BK, HD], gl.float32, L)
    if KV_RING:
        gl.static_assert(2 * TILE * HD == _R * _IK, "a ring stage holds two tiles of keys")
        plain: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0])  # of a half stage, row-major
        for t0 in range(start, end, 2 * TILE):
            sk = i % STAGES
            sv = (i + 1) % STAGES
            mbarrier.wait(ready.index(sk), (i // STAGES) & 1)
            mbarrier.wait(ready.index(sv), ((i + 1) // STAGES) & 1)
            ks = ring.index(sk)._reinterpret(gl.bfloat16, [2, num_warps, BK, HD], plain)
            vs = ring.index(sv)._reinterpret(gl.bfloat16, [2, num_warps, BK, HD], plain)
            for half in gl.static_range(2):
                off = t0 + half * TILE
                k = gl.where(off + key == pos, k_now, ks.index(half).load(LKV).to(gl.float32))
                v = gl.where(off + key == pos, v_now, vs.index(half).load(LKV).to(gl.float32))
                m, l, acc = _online_tile(q, gl.expand_dims(k, 1), gl.expand_dims(v, 1), off + key_s < end, m, l, acc)
            gl.thread_barrier()  # every warp has read both stages before they are handed back
            mbarrier.arrive(empty.index(sk), count=1)
            mbarrier.arrive(empty.index(sv), count=1)
            i += 2
    else:
        k_next = gl.load(Kb + start * skn + at, mask=start + key < end, other=0.0, cache_modifier=".cg")
        v_next = gl.load(Vb + start * skn + at, mask=start + key < end, other=0.0, cache_modifier=".cg")
        for off in range(start, end, TILE):
            # this step's key and value from Q: the cache row may not show the QKV phase's write yet
            k = gl.expand_dims(gl.where(off + key == pos, k_now, k_next.to(gl.float32)), 1)  # [warp, 1, key, HD]
            v = gl.expand_dims(gl.where(off + key == pos, v_now, v_next.to(gl.float32)), 1)
            nxt = off + TILE
            k_next = gl.load(Kb + nxt * skn + at, mask=nxt + key < end, other=0.0, cache_modifier=".cg")
            v_next = gl.load(Vb + nxt * skn + at, mask=nxt + key < end, other=0.0, cache_modifier=".cg")
            m, l, acc = _online_tile(q, k, v, off + key_s < end, m, l, acc)
    # merge the warps (an empty split keeps m = -inf: the merge pass gives it weight 0)
    if ON:
        _stamp_after(Stamps, pid, ph, 1, ON, gl.sum(gl.sum(gl.sum(l, 2), 1), 0).to(gl.int32))
    row = (h * NSPLIT + sp) * G
    if G * num_warps * HD * 4 <= _MAXK * _CH * _CW * 2:
        # through shared memory (the idle input row buffer): every warp's state stored once, one CTA
        # barrier, then the warps merged in-thread, where reductions over warps would cost a barrier
        # round each
        LM: gl.constexpr = gl.BlockedLayout([num_warps, 1, 1], [1, 1, 32], [1, 2, num_warps // 2], [2, 1, 0])
        LMG: gl.constexpr = gl.SliceLayout(2, LM)  # [warp, G]
        acc_s = xbuf._reinterpret(gl.float32, [num_warps, G, HD], gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0]))
        ml_s = ybuf._reinterpret(gl.float32, [2, num_warps, G], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
        acc_s.store(gl.sum(acc, 2))
        ml_s.index(0).store(m)
        ml_s.index(1).store(gl.sum(l, 2))
        gl.thread_barrier()
        m = ml_s.index(0).load(LMG)
        m_all = gl.max(m, 0)  # [G]
        scale = gl.exp(m - gl.expand_dims(gl.where(m_all == float("-inf"), 0.0, m_all), 0))  # [warp, G]
        l_all = gl.sum(ml_s.index(1).load(LMG) * scale, 0)
        out = gl.sum(acc_s.load(LM) * gl.expand_dims(scale, 2), 0)  # [G, HD]
        gl.thread_barrier()  # read before the buffers are written again
        go = gl.arange(0, G, layout=gl.SliceLayout(1, gl.SliceLayout(0, LM)))
        do = gl.arange(0, HD, layout=gl.SliceLayout(0, gl.SliceLayout(0, LM)))
        gl.store(PAcc + gl.expand_dims(row + go, 1) * HD + gl.expand_dims(do, 0), out)
        gm = gl.arange(0, G, layout=gl.SliceLayout(0, LMG))
    else:
        m_all = gl.max(m, 0)  # [G]
        scale = gl.exp(m - gl.expand_dims(gl.where(m_all == float("-inf"), 0.0, m_all), 0))  # [warp, G]
        l_all = gl.sum(gl.sum(l, 2) * scale, 0)
        acc_w = gl.sum(acc, 2)  # [warp, G, HD]
        out = gl.sum(acc_w * gl.expand_dims(gl.convert_layout(scale, gl.SliceLayout(2, LO)), 2), 0)  # [G, HD]
        gl.store(PAcc + gl.expand_dims(row + g, 1) * HD + gl.expand_dims(d, 0), out)
        gm = gl.arange(0, G, layout=gl.SliceLayout(0, gl.SliceLayout(2, LS)))
    gl.store(PM + row + gm, m_all)
    gl.store(PL + row + gm, l_all)
    return i


@gluon.jit
def _load_kv(
    k_d,
    v_d,
    layer,
    HKV,
    S,
    length,
    NSPLIT,
    SPLIT,
    pid,
    P,
    ring,
    ready,
    empty,
    i,
    STAGES: gl.constexpr,
    INFLIGHT: gl.constexpr,
):
    """The loader's share of a block's attention (KV_RING): for this program's items (kv head,
    split), in the consumer's order, 64 keys of K then of V per stage (cache rows viewed as
    [8 keys, 4, 256] boxes; S, the cache length, a multiple of 64)."""
    for item in range(pid, HKV * NSPLIT, P):
        start = (item % NSPLIT) * SPLIT
        end = gl.minimum(start + SPLIT, length)
        row0 = (layer * HKV + item // NSPLIT) * (S // 8)
        for t0 in range(start, end, 64):
            i = _copy(k_d, row0 + t0 // 8, 0, ring, ready, empty, i, STAGES, INFLIGHT)
            i = _copy(v_d, row0 + t0 // 8, 0, ring, ready, empty, i, STAGES, INFLIGHT)
    return i


@gluon.jit
def _attention_merge(
    PAcc,
    PM,
    PL,
    Attn,
    h,
    NSPLIT,
    tag,
    G: gl.constexpr,
    HD: gl.constexpr,
    BLOCK_S: gl.constexpr,
    num_warps: gl.constexpr,
):
    """Pass 2 for kv head h (triton_decode.merge_item): its G query heads' outputs into Attn (tagged).
    Every thread holds all splits of one (query head, dim) element: the sums over splits are in-thread."""
    LM: gl.constexpr = gl.BlockedLayout([BLOCK_S, 1, 1], [1, 1, 32], [1, 2, num_warps // 2], [2, 1, 0])
    LMS: gl.constexpr = gl.SliceLayout(2, LM)  # [BLOCK_S, G]
    sidx = gl.arange(0, BLOCK_S, layout=gl.SliceLayout(1, LMS))
    g = gl.arange(0, G, layout=gl.SliceLayout(0, LMS))
    ok = gl.expand_dims(sidx < NSPLIT, 1)
    row = gl.expand_dims((h * NSPLIT + sidx) * G, 1) + gl.expand_dims(g, 0)  # [BLOCK_S, G]
    d = gl.expand_dims(gl.expand_dims(gl.arange(0, HD, layout=gl.SliceLayout(0, gl.SliceLayout(0, LM))), 0), 0)
    acc = gl.load(
        PAcc + gl.expand_dims(row, 2) * HD + d, mask=gl.expand_dims(ok, 2), other=0.0, cache_modifier=".cg"
    )  # [BLOCK_S, G, HD]
    m = gl.load(PM + row, mask=ok, other=float("-inf"), cache_modifier=".cg")
    l = gl.load(PL + row, mask=ok, other=0.0, cache_modifier=".cg")
    w = gl.exp(m - gl.expand_dims(gl.max(m, 0), 0))  # empty splits: m = -inf, weight 0
    num = gl.sum(acc * gl.expand_dims(w, 2), 0)  # [G, HD]
    den = gl.sum(gl.expand_dims(l * w, 2), 0)  # [G, 1]
    gq = gl.expand_dims(gl.arange(0, G, layout=gl.SliceLayout(1, gl.SliceLayout(0, LM))), 1)
    _put(Attn, (h * G + gq) * HD + gl.sum(d, 0), num / den, tag, True, True)


@gluon.jit
def _consumer(
    ring,
    ready,
    empty,
    xbuf,
    ybuf,
    X,
    Qkv,
    H2,
    A,
    Count,
    LnW,
    FfLnW,
    n_layers,
    P,
    NQKV,
    D,
    HID,
    eps,
    Stamps,
    Rope,
    q_scale,
    Pos,
    Tok,
    K0,
    V0,
    KOff,
    VOff,
    skh,
    skn,
    Attn,
    PAcc,
    PM,
    PL,
    NQ,
    NK,
    HKV,
    NSPLIT,
    SPLIT,
    STAGES: gl.constexpr,
    ON: gl.constexpr,
    Logits,
    DecNormW,
    V,
    head_eps,
    Emb,
    DECODE: gl.constexpr,
    G: gl.constexpr,
    HD: gl.constexpr,
    BLOCK_S: gl.constexpr,
    KV_RING: gl.constexpr,
    num_warps: gl.constexpr,
):
    """Default partition: row blocks pid, pid + P, ... of every GEMV. Stamps per phase: 1 barrier
    passed, 2 input row in shared memory, 3 phase done."""
    # [row group, row, chunk, column]: a warp reduces whole rows (no cross-warp reduction), 8 columns
    # per lane; with 8 warps the two row groups go to two warpgroups
    L4: gl.constexpr = gl.BlockedLayout(
        [8 // num_warps, 1, _CH, 8], [1, 1, 1, 32], [num_warps // 4, 4, 1, 1], [3, 2, 1, 0]
    )
    LX: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [num_warps, 1], [1, 0])
    LY: gl.constexpr = gl.SliceLayout(2, gl.SliceLayout(2, L4))
    pid = gl.program_id(0)
    kd = D // _IK
    ga = gl.expand_dims(gl.arange(0, 2, layout=gl.SliceLayout(1, LY)), 1)
    gb = gl.arange(0, _R // 2, layout=gl.SliceLayout(0, LY))
    offs = ga * (_R // 2) + gl.expand_dims(gb, 0)  # [2, _R // 2]: the rows of a block
    # parked row blocks [slot, a, b] (_park), a in-thread; slot j is row block pid + j * P
    LB: gl.constexpr = gl.BlockedLayout([1, 2, 1], [8, 1, 4], [num_warps, 1, 1], [2, 1, 0])
    LB2: gl.constexpr = gl.SliceLayout(1, LB)
    pb = gl.expand_dims(pid + gl.arange(0, _MP, layout=gl.SliceLayout(1, LB2)) * P, 1)  # [slot, 1]
    bb = gl.expand_dims(gl.arange(0, _R // 2, layout=gl.SliceLayout(0, LB2)), 0)  # [1, _R // 2]
    i = 0
    phase = 0
    pos = 0
    length = 0
    tbase = 0
    n_count = 3 + n_layers * HKV  # barrier, gave-up flag (kept), attention heads, exit; then the launch count
    if DECODE:
        pos = gl.load(Pos)
        length = pos + 1
        emb_row = Emb + gl.load(Tok) * D  # the token's embedding: block 0's input row
        # this launch's phases start at tbase among all launches' (the tags, _tag)
        tbase = gl.load(Count + n_count) * (5 * n_layers + 1)
        rope_c, rope_s = _rope_angles(pb, bb, Rope, q_scale, pos, NQ, NK, HD)
    for layer in range(n_layers):
        # 1. qkv = rmsnorm(x) @ Wqkv^T (DECODE: RoPE, q, k, v to Qkv (tagged), k and v into the caches;
        # else Wo reads q); x comes from the launch (DECODE: the embedding row) for the first block
        if DECODE:
            # this block's caches, as element offsets from block 0's (16-byte aligned: vector loads)
            Kb = K0 + gl.multiple_of(gl.load(KOff + layer), 8)
            Vb = V0 + gl.multiple_of(gl.load(VOff + layer), 8)
            if layer == 0:
                _enter(xbuf, emb_row, LnW, D, eps, True, LX, Count, phase, P, False, pid, Stamps, ON)
            else:
                _enter(
                    xbuf,
                    X,
                    LnW + layer * D,
                    D,
                    eps,
                    True,
                    LX,
                    Count,
                    phase,
                    P,
                    True,
                    pid,
                    Stamps,
                    ON,
                    True,
                )
        else:
            _enter(xbuf, X, LnW + layer * D, D, eps, True, LX, Count, phase, P, layer > 0, pid, Stamps, ON)
        j = 0
        for rb in range(pid, NQKV // _R, P):
            y, i = _rows(ring, ready, empty, xbuf, i, kd, STAGES, L4)
            if DECODE:
                j = _park(ybuf, j, y)
            else:
                gl.store(Qkv + rb * _R + offs, y.to(gl.bfloat16))
        if DECODE:
            x0, x1 = _parked(ybuf, LB)
            _rope_store(
                x0, x1, pb, bb, rope_c, rope_s, pos, Qkv, Kb, Vb, skh, skn, NQ, NK, NQKV, _tag(tbase, phase), HD
            )
        phase = _leave(Count, phase, pid, Stamps, ON)
        if DECODE:
            # 1b. attention: items (kv head, split); the program finishing a head's last split merges it
            _grid_wait(Count, phase * P)
            _stamp(Stamps, pid, phase, 1, ON)
            _stamp(Stamps, pid, phase, 2, ON)
            for item in range(pid, HKV * NSPLIT, P):
                h = item // NSPLIT
                i = _attention_item(
                    xbuf,
                    ybuf,
                    Qkv,
                    Kb,
                    Vb,
                    pos,
                    length,
                    PAcc,
                    PM,
                    PL,
                    h,
                    item % NSPLIT,
                    SPLIT,
                    NSPLIT,
                    skh,
                    skn,
                    ring,
                    ready,
                    empty,
                    i,
                    NQ,
                    NK,
                    G,
                    HD,
                    4,
                    STAGES,
                    KV_RING,
                    num_warps,
                    Stamps,
                    pid,
                    phase,
                    ON,
                )
                gl.thread_barrier()  # every thread's partial is stored before the release below
                _stamp(Stamps, pid, _DETAIL + phase, 2, ON)
                arrived = gl.atomic_add(Count + 2 + layer * HKV + h, 1, sem="acq_rel")
                if ON:
                    _stamp_after(Stamps, pid, phase, 3, ON, arrived)
                if arrived == NSPLIT - 1:
                    _attention_merge(PAcc, PM, PL, Attn, h, NSPLIT, _tag(tbase, phase), G, HD, BLOCK_S, num_warps)
            phase = _leave(Count, phase, pid, Stamps, ON)
        # 2. h2 = x + attention @ Wo^T (the probe chain: q @ Wo^T)
        if DECODE:
            _enter(
                xbuf,
                Attn,
                X,
                D,
                eps,
                False,
                LX,
                Count,
                phase,
                P,
                True,
                pid,
                Stamps,
                ON,
                True,
            )
        else:
            _enter(xbuf, Qkv, X, D, eps, False, LX, Count, phase, P, True, pid, Stamps, ON)
        for rb in range(pid, D // _R, P):
            # the residual's load is issued before the reduction
            if DECODE:
                if layer == 0:
                    res = _get(emb_row, rb * _R + offs, True, False)
                else:
                    res = _get(X, rb * _R + offs, True, True)
            else:
                res = _get(X, rb * _R + offs, True, False)
            y, i = _rows(ring, ready, empty, xbuf, i, kd, STAGES, L4)
            _put(H2, rb * _R + offs, y + res, _tag(tbase, phase), True, DECODE)
        phase = _leave(Count, phase, pid, Stamps, ON)
        # 3. a = silu(g) * u, [g; u] = rmsnorm(h2) @ Wg1^T (a block: _R // 2 gate rows, then their up rows)
        _enter(
            xbuf,
            H2,
            FfLnW + layer * D,
            D,
            eps,
            True,
            LX,
            Count,
            phase,
            P,
            True,
            pid,
            Stamps,
            ON,
            DECODE,
        )
        j = 0
        for _rb in range(pid, 2 * HID // _R, P):
            y, i = _rows(ring, ready, empty, xbuf, i, kd, STAGES, L4)
            j = _park(ybuf, j, y)
        g, u = _parked(ybuf, LB)
        _put(A, pb * (_R // 2) + bb, g / (1.0 + gl.exp(-g)) * u, _tag(tbase, phase), pb < 2 * HID // _R, DECODE)
        phase = _leave(Count, phase, pid, Stamps, ON)
        # 4. x = h2 + a @ W2^T
        _enter(
            xbuf,
            A,
            A,
            HID,
            eps,
            False,
            LX,
            Count,
            phase,
            P,
            True,
            pid,
            Stamps,
            ON,
            DECODE,
        )
        for rb in range(pid, D // _R, P):
            res = _get(H2, rb * _R + offs, True, DECODE)
            y, i = _rows(ring, ready, empty, xbuf, i, HID // _IK, STAGES, L4)
            _put(X, rb * _R + offs, y + res, _tag(tbase, phase), True, DECODE)
        phase = _leave(Count, phase, pid, Stamps, ON)
    if DECODE:
        # 5. logits = rmsnorm(x) @ Whead^T (the final norm's own weight and eps)
        _enter(
            xbuf,
            X,
            DecNormW,
            D,
            head_eps,
            True,
            LX,
            Count,
            phase,
            P,
            True,
            pid,
            Stamps,
            ON,
            True,
        )
        for rb in range(pid, V // _R, P):
            y, i = _rows(ring, ready, empty, xbuf, i, kd, STAGES, L4)
            gl.store(Logits + rb * _R + offs, y.to(gl.bfloat16))
        _stamp(Stamps, pid, phase, 3, ON)
        # the last program out resets the counters for the next launch, counts the launch (the
        # tags' base) and advances the position (every program has read both by then)
        gl.thread_barrier()
        if gl.atomic_add(Count + n_count - 1, 1, sem="acq_rel") == P - 1:
            LC: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
            for c0 in range(0, n_count, 32 * num_warps):
                o = c0 + gl.arange(0, 32 * num_warps, layout=LC)
                gl.store(Count + o, gl.zeros([32 * num_warps], gl.int32, LC), mask=(o < n_count) & (o != 1))
            gl.store(Count + n_count, gl.load(Count + n_count) + 1)
            gl.store(Pos, pos + 1)


@gluon.jit
def chain_kernel(
    w_d,
    w2_d,
    X,
    Qkv,
    H2,
    A,
    Count,
    LnW,
    FfLnW,
    n_layers,
    NQKV,
    D,
    HID,
    eps,
    Stamps,
    Rope,
    q_scale,
    Pos,
    Tok,
    K0,
    V0,
    KOff,
    VOff,
    skh,
    skn,
    Attn,
    PAcc,
    PM,
    PL,
    NQ,
    NK,
    HKV,
    NSPLIT,
    SPLIT,
    k_d,
    v_d,
    S,
    h_d,
    Logits,
    DecNormW,
    V,
    head_eps,
    Emb,
    STAGES: gl.constexpr,
    num_warps: gl.constexpr,
    STAMPS: gl.constexpr = False,
    DECODE: gl.constexpr = False,
    G: gl.constexpr = 4,
    HD: gl.constexpr = 128,
    BLOCK_S: gl.constexpr = 16,
    KV_RING: gl.constexpr = False,
    INFLIGHT: gl.constexpr = 0,
):
    P = gl.num_programs(0)
    ring = gl.allocate_shared_memory(gl.bfloat16, [STAGES, _R, _CH, _CW], w_d.layout)
    xbuf = gl.allocate_shared_memory(gl.bfloat16, [_MAXK * _CH, _CW], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    ybuf = gl.allocate_shared_memory(gl.float32, [_MP, 2, _R // 2], gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0]))
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)
    gl.warp_specialize(
        [
            (
                _consumer,
                (
                    ring,
                    ready,
                    empty,
                    xbuf,
                    ybuf,
                    X,
                    Qkv,
                    H2,
                    A,
                    Count,
                    LnW,
                    FfLnW,
                    n_layers,
                    P,
                    NQKV,
                    D,
                    HID,
                    eps,
                    Stamps,
                    Rope,
                    q_scale,
                    Pos,
                    Tok,
                    K0,
                    V0,
                    KOff,
                    VOff,
                    skh,
                    skn,
                    Attn,
                    PAcc,
                    PM,
                    PL,
                    NQ,
                    NK,
                    HKV,
                    NSPLIT,
                    SPLIT,
                    STAGES,
                    STAMPS,
                    Logits,
                    DecNormW,
                    V,
                    head_eps,
                    Emb,
                    DECODE,
                    G,
                    HD,
                    BLOCK_S,
                    KV_RING,
                    num_warps,
                ),
            ),
            (
                _loader,
                (
                    w_d,
                    w2_d,
                    k_d,
                    v_d,
                    h_d,
                    ring,
                    ready,
                    empty,
                    n_layers,
                    P,
                    NQKV,
                    D,
                    HID,
                    Stamps,
                    Pos,
                    HKV,
                    S,
                    NSPLIT,
                    SPLIT,
                    V,
                    STAGES,
                    STAMPS,
                    DECODE,
                    KV_RING,
                    INFLIGHT,
                ),
            ),
        ],
        [1],
        [40],
    )


def chain_reference(x: torch.Tensor, qkv_w, wo, wg1, w2, ln_w, ff_ln_w, eps: float) -> torch.Tensor:
    """What `chain` computes, in torch with the same bf16 roundings: per block qkv = rmsnorm(x) @ Wqkv^T,
    h2 = x + q @ Wo^T (q: the first D rows of qkv), x = h2 + (silu(g) * u) @ W2^T with
    [g; u] = rmsnorm(h2) @ Wg1^T. x [D]; weights as lists of per-block tensors."""
    D = x.shape[0]
    x = x.float()
    for q, o, g1, down, ln, ffln in zip(qkv_w, wo, wg1, w2, ln_w, ff_ln_w):
        xn = (x * torch.rsqrt((x * x).mean() + eps) * ln.float()).bfloat16().float()
        qkv = (q.float() @ xn).bfloat16().float()
        h2 = (x + o.float() @ qkv[:D]).bfloat16().float()
        xn2 = (h2 * torch.rsqrt((h2 * h2).mean() + eps) * ffln.float()).bfloat16().float()
        gu = g1.float() @ xn2
        hid = gu.shape[0] // 2
        a = (torch.nn.functional.silu(gu[:hid]) * gu[hid:]).bfloat16().float()
        x = (h2 + down.float() @ a).bfloat16().float()
    return x.bfloat16()


def parked_row_blocks(rows: int, programs: int) -> int:
    """Row blocks a program parks in a phase of `rows` weight rows (at most MAX_PARKED)."""
    return -(-rows // ROWS // programs)


def box_layout():
    return gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16, rank=3)


PAIR_ORDER = list(range(0, ROWS, 2)) + list(range(1, ROWS, 2))  # a QKV row block's rows for RoPE (decode)


def pack(
    qkv_w: list[torch.Tensor],
    wo: list[torch.Tensor],
    wg1: list[torch.Tensor],
    w2: list[torch.Tensor],
    rope_pairs: bool = False,
):
    """Per-block weights -> (W [L * (NQKV + D + 2 HID), D], W2 [L * D, HID]) in the kernel's order;
    wg1 is [gate; up] ([2 HID, D]), packed as groups of ROWS // 2 gate rows and their up rows.
    rope_pairs: every ROWS-row block of Wqkv in PAIR_ORDER, so that a rotation pair (rows 2j, 2j + 1)
    lands in one thread of the decode epilogue."""
    blocks = []
    for q, o, g1 in zip(qkv_w, wo, wg1):
        if rope_pairs:
            q = q.reshape(-1, ROWS, q.shape[1])[:, PAIR_ORDER].reshape(q.shape)
        hid = g1.shape[0] // 2
        gu = torch.stack(
            [g1[:hid].reshape(-1, ROWS // 2, g1.shape[1]), g1[hid:].reshape(-1, ROWS // 2, g1.shape[1])], 1
        )
        blocks += [q, o, gu.reshape(2 * hid, g1.shape[1])]
    return torch.cat(blocks).contiguous(), torch.cat(w2).contiguous()


def descriptors(w: torch.Tensor, w2: torch.Tensor):
    box = [ROWS, CHUNKS, CW]
    views = [t.view(t.shape[0], t.shape[1] // CW, CW) for t in (w, w2)]
    return [TensorDescriptor(v, list(v.shape), list(v.stride()), box, box_layout()) for v in views]


def chain(
    w_d,
    w2_d,
    x,
    ln_w,
    ff_ln_w,
    bufs,
    n_layers,
    nqkv,
    hid,
    eps,
    programs,
    stages=12,
    num_warps=8,
    stamps=None,
):
    """chain_reference in place on x [D] (bf16) with the packed weights' descriptors (`descriptors`)
    and stacked norm weights [L, D]; `num_warps` (4 or 8) consumer warps and a ring of `stages` 16 KB
    stages per program; bufs = (qkv bf16 [NQKV], h2 bf16 [D], a bf16 [HID], count
    int32 [2], zeroed here; count[1] = 1 if a grid barrier gave up). `programs` must all be resident
    (one per SM). stamps: int64 [programs, 4096, 4] for per-phase timestamps (ns; phase = block * 4
    + GEMV: 0 the loader's last copy issued, 1 the barrier passed, 2 the input row ready, 3 the
    phase done)."""
    if not GLUON_API:
        raise RuntimeError(f"gluon chain needs Triton 3.6's Gluon API; this is Triton {triton.__version__}")
    D = x.shape[0]
    if D % ITEM_K or hid % ITEM_K or nqkv % ROWS or D > MAX_K_ITEMS * ITEM_K or hid > MAX_K_ITEMS * ITEM_K:
        raise ValueError(
            f"gluon chain: D={D}, hidden={hid} must be multiples of {ITEM_K} up to "
            f"{MAX_K_ITEMS * ITEM_K}, NQKV={nqkv} a multiple of {ROWS}"
        )
    if parked_row_blocks(2 * hid, programs) > MAX_PARKED:
        raise ValueError(
            f"gluon chain: {programs} programs park {parked_row_blocks(2 * hid, programs)} gate/up row "
            f"blocks each at hidden={hid}, at most {MAX_PARKED}"
        )
    if stamps is not None and (
        stamps.shape != (programs, 4096, 4) or stamps.dtype != torch.int64 or 4 * n_layers > 4096
    ):
        raise ValueError(
            f"stamps must be int64 [{programs}, 4096, 4] (at most 1024 blocks), got "
            f"{stamps.dtype} {tuple(stamps.shape)} for {n_layers} blocks"
        )
    qkv, h2, a, count = bufs
    count.zero_()
    none = count  # pointer arguments the chain does not use
    chain_kernel[(programs,)](
        w_d,
        w2_d,
        x,
        qkv,
        h2,
        a,
        count,
        ln_w,
        ff_ln_w,
        n_layers,
        nqkv,
        D,
        hid,
        eps,
        stamps if stamps is not None else count,
        none,
        1.0,
        none,
        none,
        none,
        none,
        none,
        none,
        0,
        0,
        none,
        none,
        none,
        none,
        0,
        0,
        0,
        1,
        1,
        w_d,
        w_d,
        0,
        w_d,
        none,
        none,
        0,
        0.0,
        none,
        STAGES=stages,
        num_warps=num_warps,
        STAMPS=stamps is not None,
        launch_cooperative_grid=True,
    )
