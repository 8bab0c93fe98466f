"""The telescoping cache's recurrent form: per-layer slot state, the branch-free step, the cached forward.

Each telescoping layer keeps its C slot means and log-masses (TelescopingState) and applies the
merge rule of its schedule one token at a time; the step is looked up on the device from the
position (StepTables), so it can be replayed from a CUDA graph. Small batches keep the slots in
logical order and shift them every step (push_at); from RING_MIN_BATCH sequences, and at batch 1
on the Triton paths (kernels/triton_tele_update), they stay in place behind a ring map from
logical slot to cell, one map per cache: the layers write their two cells through it (ring_push)
and the cache advances it once a step (advance_ring). Prefill runs the parallel form
(the layer's `prefill`) and loads the last row of its node table into the slots. Full-attention
layers of hybrid variants read a KVState through decode.attention.cached_attention.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from avengers.decode import llama_block
from avengers.decode.attention import cached_attention
from avengers.decode.cache import InferenceCache, KVState, allocation_target, tensor_bytes
from avengers.decode.llama_block import block_post, decode_head, decode_post, eligible
from avengers.decode.options import GEMV_STEP_MAX_BATCH, DecodeOptions
from avengers.ops.telescoping import (
    EMPTY_LOG_MASS,
    EMPTY_THRESHOLD,
    compute_dtype,
    rms_norm,
    rope,
    softcap,
    wisq_gate,
)

# One layer's compiled step core on an H200 (tele128_llama3_1.8b, CUDA graphs), shift vs ring: 27.1 vs
# 31.8 us at batch 1, 59.1 vs 44.3 at 64, 2090 vs 679 at 4096. Below 64 the step is latency-bound and
# the ring's extra index kernels cost more than the shift saves.
RING_MIN_BATCH = 64


def _fusion(wa: torch.Tensor, wb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two slots' log-masses -> their weights in the fused mean and its log-mass (EMPTY + x = x
    exactly, EMPTY + EMPTY stays at the sentinel)."""
    wn = torch.logaddexp(wa, wb)
    fused_w = torch.where(wb <= EMPTY_THRESHOLD, wa, torch.where(wa <= EMPTY_THRESHOLD, wb, wn))
    return torch.exp(wa - wn), torch.exp(wb - wn), fused_w


class TelescopingState:
    """One layer's decode state: slot means k, v [B, Hkv, C, d] and log-masses [B, Hkv, C].

    Slot i (logical order, slot 0 newest) is held in cell ring[i] of the C cells; ring, [C] long and
    shared by the batch and by every layer of a cache (every layer takes the same step), stays the
    identity unless in_place (B >= RING_MIN_BATCH), where decode steps leave the slots in place and
    write two cells through the map (ring_push), which the cache then advances (advance_ring). The
    step counter is the cache's seq_len, shared by the batch.
    """

    def __init__(
        self,
        batch_size: int,
        kv_heads: int,
        cache_size: int,
        head_dim: int,
        device=None,
        dtype=None,
        ring: torch.Tensor | None = None,
        kernel_step: bool = False,
    ):
        dtype = dtype or torch.get_default_dtype()
        self.k = torch.zeros(batch_size, kv_heads, cache_size, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.log_mass = torch.full(
            (batch_size, kv_heads, cache_size), EMPTY_LOG_MASS, device=device, dtype=compute_dtype(dtype)
        )
        self.ring = torch.arange(cache_size, device=self.k.device) if ring is None else ring
        self.kernel_step = kernel_step  # the Triton paths: batch 1 writes its cells in place (triton_tele_update)

    @property
    def in_place(self) -> bool:
        # From the batch size rather than stored: InferenceCache.broadcast_from copies a state's
        # plain attributes from its batch-1 source, and would turn the ring off at large batches.
        batch = self.k.shape[0]
        return batch >= RING_MIN_BATCH or (self.kernel_step and batch <= GEMV_STEP_MAX_BATCH)

    def nbytes_written_per_step(self) -> int:
        """Every slot when a step shifts them; in place, two cells of each (the cache's ring map, C
        longs, is left out: a step rewrites it once for all layers)."""
        slots = tensor_bytes((self.k, self.v, self.log_mass))
        return slots * 2 // self.ring.numel() if self.in_place else slots

    def load_nodes(self, nodes: tuple[torch.Tensor, torch.Tensor, torch.Tensor], ids: torch.Tensor) -> None:
        """Set the slots to the nodes `ids` [C] of a parallel pass (its last table row)."""
        K, V, W = nodes
        self.k.copy_(K[:, :, ids])
        self.v.copy_(V[:, :, ids])
        self.log_mass.copy_(W[:, :, ids])
        self.ring.copy_(torch.arange(self.ring.numel(), device=self.ring.device))

    def push(self, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, slot: int | None) -> None:
        """One step: merge slots slot-1, slot into slot (or drop the oldest), shift, insert (k, v, w).

        k, v [B, Hkv, d]; w [B, Hkv]. Vectorised over slots (one concatenation per tensor). The eager
        reference for states in logical order (the ring the identity).
        """
        if not torch.equal(self.ring, torch.arange(self.ring.numel(), device=self.ring.device)):
            raise ValueError("push needs the slots in logical order; this state's are in place behind its ring map")
        K, V, W = self.k, self.v, self.log_mass
        dt = W.dtype
        new = (k.to(K.dtype).unsqueeze(2), v.to(V.dtype).unsqueeze(2), w.to(dt).unsqueeze(2))
        if slot is None:
            parts = [(n, x[:, :, :-1]) for n, x in zip(new, (K, V, W))]
        else:
            wa, wb = W[:, :, slot - 1], W[:, :, slot]
            pa, pb, wn = _fusion(wa, wb)
            pa, pb = pa.unsqueeze(-1), pb.unsqueeze(-1)
            merged = [(pa * x[:, :, slot - 1].to(dt) + pb * x[:, :, slot].to(dt)).to(x.dtype) for x in (K, V)]
            merged.append(wn)
            parts = [
                (n, torch.cat([x[:, :, : slot - 1], m.unsqueeze(2), x[:, :, slot + 1 :]], 2))
                for n, m, x in zip(new, merged, (K, V, W))
            ]
        for (n, rest), x in zip(parts, (K, V, W)):
            x.copy_(torch.cat([n, rest], 2))


class StepTables:
    """Device tables that make one decode step branch-free (CUDA-graph safe), shifted or in place.

    Step t's action a = min(ctz(t), L) (a = L at t = 0; a = L is the drop step) picks row a.
    push_at reads an extended slot array ext = [new token, old slot 0, ..., old slot C-1]: new slot
    c takes ext[src_a[a, c]], fused with ext[src_b[a, c]] where merge[a, c] (only c = m_{a+1}).
    ring_push writes the new token into the cell of logical slot ring_new[a] (m - 1 at a merge,
    C - 1 at the drop), the merged pair (where ring_merge[a]) into the cell of slot ring_fused[a]
    (m; the drop: C - 1 again, unmerged), and gathers the new ring from the old through ring_perm[a]
    (entry 0 <- j = ring_new[a], entries 1..j <- 0..j-1, the rest in place).
    """

    def __init__(self, cache_size: int, fmap: tuple[int, ...], device: torch.device):
        L, C = len(fmap), cache_size
        src_a = np.tile(np.arange(C), (L + 1, 1))  # drop: new slot c <- ext[c]
        src_b = src_a.copy()
        merge = np.zeros((L + 1, C), dtype=bool)
        for a, m in enumerate(fmap):
            row = np.arange(C)
            row[m + 1 :] += 1  # slots above m stay where they were: old c = ext[c + 1]
            src_a[a], src_b[a] = row, row
            src_b[a, m] = m + 1
            merge[a, m] = True
        self.src_a = torch.as_tensor(src_a, device=device)
        self.src_b = torch.as_tensor(src_b, device=device)
        self.merge = torch.as_tensor(merge, device=device)
        self.pow2 = torch.as_tensor([2**k for k in range(1, L + 1)], device=device)
        j = np.array([m - 1 for m in fmap] + [C - 1])
        perm = np.tile(np.arange(C), (L + 1, 1))
        for a, ja in enumerate(j):
            perm[a, : ja + 1] = np.roll(np.arange(ja + 1), 1)
        self.ring_new = torch.as_tensor(j, device=device)
        self.ring_fused = torch.as_tensor(list(fmap) + [C - 1], device=device)
        self.ring_merge = torch.as_tensor(np.arange(L + 1) < L, device=device)
        self.ring_perm = torch.as_tensor(perm, device=device)

    def action(self, position: torch.Tensor) -> torch.Tensor:
        """min(ctz(t), L) for a 0-dim long position t (L for t = 0), on the device."""
        return (position.view(1) % self.pow2 == 0).sum().view(1)


_STEP_TABLES: dict[tuple, StepTables] = {}


def step_tables(cache_size: int, fmap: tuple[int, ...], device: torch.device) -> StepTables:
    key = (cache_size, fmap, str(device))
    if key not in _STEP_TABLES:
        _STEP_TABLES[key] = StepTables(cache_size, fmap, device)
    return _STEP_TABLES[key]


def push_at(
    K: torch.Tensor,
    V: torch.Tensor,
    W: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    position: torch.Tensor,
    tables: StepTables,
) -> None:
    """TelescopingState.push on a state's slot means K, V and log-masses W (updated in place) for
    the step at a device-side position (no host sync, graph-safe)."""
    a = tables.action(position)
    src_a, src_b = tables.src_a.index_select(0, a)[0], tables.src_b.index_select(0, a)[0]
    merge = tables.merge.index_select(0, a)[0]
    dt = W.dtype
    ext_w = torch.cat([w.to(dt).unsqueeze(2), W], 2)
    wa, wb = ext_w.index_select(2, src_a), ext_w.index_select(2, src_b)
    pa, pb, fused_w = _fusion(wa, wb)
    pa, pb = torch.where(merge, pa, 1.0).unsqueeze(-1), torch.where(merge, pb, 0.0).unsqueeze(-1)
    for x, new in ((K, k), (V, v)):
        ext = torch.cat([new.to(x.dtype).unsqueeze(2), x], 2).to(dt)
        x.copy_(pa * ext.index_select(2, src_a) + pb * ext.index_select(2, src_b))
    W.copy_(torch.where(merge, fused_w, wa))


def ring_push(
    K: torch.Tensor,
    V: torch.Tensor,
    W: torch.Tensor,
    ring: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    position: torch.Tensor,
    tables: StepTables,
) -> None:
    """push_at on slots kept in place: K, V, W indexed by cell, ring [C] (logical slot -> cell, read
    only: advance_ring moves it once all layers took the step). Writes two cells (the merged pair,
    the new token) instead of rewriting every slot. No host sync, graph-safe."""
    a = tables.action(position)
    merge = tables.ring_merge.index_select(0, a)
    new_cell = ring.index_select(0, tables.ring_new.index_select(0, a))  # [1]
    fused_cell = ring.index_select(0, tables.ring_fused.index_select(0, a))  # == new_cell at the drop step
    dt = W.dtype
    wa, wb = W.index_select(2, new_cell), W.index_select(2, fused_cell)  # slots m - 1 and m
    pa, pb, fused_w = _fusion(wa, wb)
    pa, pb = pa.unsqueeze(-1), pb.unsqueeze(-1)
    for x, new in ((K, k), (V, v)):
        xa, xb = x.index_select(2, new_cell).to(dt), x.index_select(2, fused_cell).to(dt)
        x.index_copy_(2, fused_cell, torch.where(merge, pa * xa + pb * xb, xb).to(x.dtype))
        x.index_copy_(2, new_cell, new.to(x.dtype).unsqueeze(2))
    W.index_copy_(2, fused_cell, torch.where(merge, fused_w, wb))
    W.index_copy_(2, new_cell, w.to(dt).unsqueeze(2))


def advance_ring(ring: torch.Tensor, position: torch.Tensor, tables: StepTables) -> None:
    """The ring map after the step at `position`: entry 0 (the new token's slot) <- the cell that
    ring_push wrote it to, entries 1..j <- 0..j-1, the rest in place. No host sync, graph-safe."""
    ring.copy_(ring.index_select(0, tables.ring_perm.index_select(0, tables.action(position))[0]))


def slot_attention(
    q: torch.Tensor,
    K: torch.Tensor,
    V: torch.Tensor,
    log_mass: torch.Tensor,
    opts,
    k_gain: torch.Tensor | None = None,
    v_gain: torch.Tensor | None = None,
) -> torch.Tensor:
    """Recurrent read-out for one query per sequence: q [B, H, d] over a state's C slots (means K,
    V, log-masses log_mass) -> [B, H, d]."""
    B, H, d = q.shape
    Hkv = K.shape[1]
    if opts.kv_norm:
        K, V = rms_norm(K, k_gain), rms_norm(V, v_gain)
    dt = compute_dtype(q.dtype)
    qg = q.to(dt).view(B, Hkv, H // Hkv, d)
    s = softcap(torch.einsum("bhed,bhcd->bhec", qg, K.to(dt)) * d**-0.5, opts.softcap)
    if opts.mask_empty:
        s = s.masked_fill((log_mass <= EMPTY_THRESHOLD).unsqueeze(2), float("-inf"))
    out = torch.einsum("bhec,bhcd->bhed", torch.softmax(s, -1), V.to(dt))
    return out.reshape(B, H, d).to(q.dtype)


def update_core(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor | None,
    position: torch.Tensor,
    K: torch.Tensor,
    V: torch.Tensor,
    W: torch.Tensor,
    ring: torch.Tensor | None,
    tables: StepTables,
    theta: float,
) -> torch.Tensor:
    """A decode step's slot update: q [B, 1, H, d], k, v [B, 1, H_kv, d] as projected (k and q not
    yet rotated), gate logits w [B, 1, H_kv] (None: the WISQ gate) at the 0-dim device position ->
    rotate, push into the slots (K, V, W, in place; ring None: in logical order, push_at; else in
    place behind that map, ring_push). Returns the rotated queries [B, H, d] in v's dtype."""
    q, k = rope(q, position.view(1), theta), rope(k, position.view(1), theta)
    if w is None:
        w = wisq_gate(q, k)
    if ring is None:
        push_at(K, V, W, k[:, 0], v[:, 0], w[:, 0], position, tables)
    else:
        ring_push(K, V, W, ring, k[:, 0], v[:, 0], w[:, 0], position, tables)
    return q[:, 0].to(v.dtype)


def step_core(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor | None,
    position: torch.Tensor,
    K: torch.Tensor,
    V: torch.Tensor,
    W: torch.Tensor,
    ring: torch.Tensor | None,
    tables: StepTables,
    opts,
    theta: float,
    k_gain: torch.Tensor | None,
    v_gain: torch.Tensor | None,
) -> torch.Tensor:
    """update_core, then the read-out over the updated slots: [B, H, d]. A pure function of
    tensors, so that one torch.compile serves every layer (compiled_step_core; ring None or not:
    two graphs)."""
    q = update_core(q, k, v, w, position, K, V, W, ring, tables, theta)
    return slot_attention(q, K, V, W, opts, k_gain, v_gain)


@functools.cache
def compiled_step_core():
    """step_core through torch.compile (the decode step's ~40 small kernels per layer fused into a
    few); used by the `compile` and `triton` decode paths."""
    return torch.compile(step_core, fullgraph=True)


def fused_qkv_update_core(
    qkv: torch.Tensor,
    h: torch.Tensor,
    ln_w: torch.Tensor,
    eps: float,
    gate_w: torch.Tensor | None,
    position: torch.Tensor,
    K: torch.Tensor,
    V: torch.Tensor,
    W: torch.Tensor,
    ring: torch.Tensor | None,
    tables: StepTables,
    theta: float,
) -> torch.Tensor:
    """update_core from a fused QKV GEMV's output qkv [B, (H + 2 H_kv) d] (in_proj's row order) and the
    block input h [B, D], whose normalised form the linear gate reads (gate_w None: WISQ gate)."""
    B, (Hkv, d) = qkv.shape[0], (K.shape[1], K.shape[-1])
    q, k, v = qkv.view(B, 1, -1, d).split([qkv.shape[1] // d - 2 * Hkv, Hkv, Hkv], dim=2)
    w = None
    if gate_w is not None:
        dt = compute_dtype(h.dtype)
        w = F.linear(F.rms_norm(h, (h.shape[-1],), ln_w, eps).to(dt), gate_w.to(dt)).view(B, 1, Hkv)
    return update_core(q, k, v, w, position, K, V, W, ring, tables, theta)


def fused_qkv_step_core(
    qkv: torch.Tensor,
    h: torch.Tensor,
    ln_w: torch.Tensor,
    eps: float,
    gate_w: torch.Tensor | None,
    position: torch.Tensor,
    K: torch.Tensor,
    V: torch.Tensor,
    W: torch.Tensor,
    ring: torch.Tensor | None,
    tables: StepTables,
    opts,
    theta: float,
    k_gain: torch.Tensor | None,
    v_gain: torch.Tensor | None,
) -> torch.Tensor:
    """step_core from a fused QKV GEMV's output: fused_qkv_update_core, then the read-out."""
    q = fused_qkv_update_core(qkv, h, ln_w, eps, gate_w, position, K, V, W, ring, tables, theta)
    return slot_attention(q, K, V, W, opts, k_gain, v_gain)


@functools.cache
def compiled_fused_qkv_step_core():
    return torch.compile(fused_qkv_step_core, fullgraph=True)


@functools.cache
def compiled_fused_qkv_update_core():
    return torch.compile(fused_qkv_update_core, fullgraph=True)


@functools.cache
def compiled_update_core():
    return torch.compile(update_core, fullgraph=True)


def attention_step(
    attn: nn.Module, x: torch.Tensor, state: TelescopingState, position: torch.Tensor, options: DecodeOptions
):
    """A TelescopingAttention layer's recurrent form for one token: x [B, 1, d_model] at the 0-dim
    long device `position` -> [B, 1, d_model]. No host synchronisation (graph-capturable). On the
    Triton paths: the compiled slot update, then the read-out as one Triton kernel
    (triton_tele_readout); otherwise both as one compiled (or plain) core."""
    B = x.shape[0]
    tables = step_tables(attn.opts.cache_size, attn.opts.fmap, x.device)
    ring = state.ring if state.in_place else None
    args = (*attn._project_raw(x), position, state.k, state.v, state.log_mass, ring, tables)
    if options.triton_kernels and _readout_kernel_takes(state.k):
        from avengers.decode.kernels.triton_tele_readout import slot_readout

        update = compiled_update_core() if x.is_cuda else update_core  # the interpreter's tests: plain
        q = update(*args, attn.rope_theta)
        out = slot_readout(q, state.k, state.v, state.log_mass, attn.opts, *attn._gains())
    else:
        core = compiled_step_core() if options.compiled_cores else step_core
        out = core(*args, attn.opts, attn.rope_theta, *attn._gains())
    return attn.dense(out.reshape(B, 1, attn.nheads * attn.emb_v_per_head))


def _readout_kernel_takes(K: torch.Tensor) -> bool:
    from avengers.decode.kernels import triton_tele_readout  # Triton: imported on the Triton paths only

    return triton_tele_readout.supports(K)


def _attend(q, k, v, state: KVState, position: torch.Tensor | None, backend: str, theta: float) -> torch.Tensor:
    """q, k, v [B, T, heads, d] as projected -> RoPE on q and k, the cache write and the attention
    read over the KVState: [B, T, H, d] (position None: a prefill from position 0)."""
    pos = torch.arange(q.shape[1], device=q.device) if position is None else position.view(1)
    q, k = rope(q, pos, theta).to(v.dtype), rope(k, pos, theta)
    return cached_attention(q, k, v, state, 0, position, backend=backend)


def _full_attention_step(
    attn: nn.Module, qkv: torch.Tensor, state: KVState, position: torch.Tensor, options: DecodeOptions, theta: float
) -> torch.Tensor:
    """A full-attention layer's decode step from its fused QKV output qkv [B, (H + 2 H_kv) d] -> [B, H, d]
    (before the output projection)."""
    B, d = qkv.shape[0], attn.emb_kq_per_head
    q, k, v = qkv.view(B, 1, -1, d).split([attn.nheads, attn.kvheads, attn.kvheads], dim=2)
    # a tensor of its own, as the read-out's is: a view of another layout recompiles decode_post
    return _attend(q, k, v, state, position, options.attention, theta)[:, 0].clone()


def full_attention(
    attn: nn.Module, y: torch.Tensor, state: KVState, cache: InferenceCache, position: torch.Tensor | None, theta: float
) -> torch.Tensor:
    """A hybrid variant's full-attention layer over a KVState: prefill (position None) or one step."""
    B, T, _ = y.shape
    q, k, v = attn.in_proj(y, None, None)
    q = q.view(B, T, attn.nheads, attn.emb_kq_per_head)
    k = k.view(B, T, attn.kvheads, attn.emb_kq_per_head)
    v = v.view(B, T, attn.kvheads, attn.emb_v_per_head)
    out = _attend(q, k, v, state, position, cache.options.attention, theta)
    return attn.dense(out.reshape(B, T, attn.nheads * attn.emb_v_per_head))


def allocate_cache(
    model: nn.Module,
    batch_size: int,
    max_seq_len: int,
    device=None,
    dtype=None,
    options: DecodeOptions | None = None,
) -> InferenceCache:
    """Per layer: TelescopingState (C slots) or, for full-attention layers, a KVState."""
    device, dtype = allocation_target(model, batch_size, max_seq_len, device, dtype)
    cfg = model.config
    kv, d = cfg.kvheads or cfg.nheads, cfg.emb_dim // cfg.nheads
    options = (options or DecodeOptions()).resolve("telescoping", device)
    ring = torch.arange(cfg.tele_cache_size, device=device)  # one map for every layer: they take the same steps
    slots = dict(device=device, dtype=dtype, ring=ring, kernel_step=options.triton_kernels)
    layers = [
        KVState(batch_size, kv, max_seq_len, d, device=device, dtype=dtype)
        if i in model.full_layers
        else TelescopingState(batch_size, kv, cfg.tele_cache_size, d, **slots)
        for i in range(cfg.nlayers)
    ]
    return InferenceCache(layers, batch_size, max_seq_len, options)


def forward_with_cache(model: nn.Module, x: torch.Tensor, cache: InferenceCache) -> torch.Tensor:
    """Consume x [B, T]: an empty cache is prefilled through the parallel form; a cache that holds
    tokens takes one recurrent step per token, its position read on the device."""
    cache.check_tokens(x)
    start, T = cache.seq_len, x.shape[1]
    if start == 0:
        logits = _chunk(model, x, cache, None)
    else:
        logits = torch.cat([_chunk(model, x[:, i : i + 1], cache, cache.position + i) for i in range(T)], 1)
    cache.advance(T)
    return logits


def _chunk(model: nn.Module, x: torch.Tensor, cache: InferenceCache, position: torch.Tensor | None) -> torch.Tensor:
    """Prefill (position None: tokens 0..T-1) or one decode step at a device position."""
    options = cache.options
    if position is not None and options.compiled_cores and _block_layout(model):
        step = gemv_step if options.gemv_step(x.shape[0]) else compiled_block_step
        return step(model, x, cache, position)
    base = model.base_model
    h = base.embedding(x)
    for layer, state in zip(base.layers, cache.layers):
        y = layer.ln(h)
        if isinstance(state, KVState):
            a = full_attention(layer.attn, y, state, cache, position, model.config.rope_theta)
        elif position is None:
            a = layer.attn.prefill(y, state)
        else:
            a = attention_step(layer.attn, y, state, position, options)
        h = h + a
        h = h + layer.ff_sub_layer(layer.ff_ln(h))
    if position is not None:
        _advance_ring(model, cache, position)
    return model.head(base.dec_norm(h))


def _advance_ring(model: nn.Module, cache: InferenceCache, position: torch.Tensor) -> None:
    """After every layer took the step at `position`: advance the cache's ring map (slots in place)."""
    for layer, state in zip(model.base_model.layers, cache.layers):
        if isinstance(state, TelescopingState):
            if state.in_place:  # every telescoping layer shares the map and the schedule
                opts = layer.attn.opts
                advance_ring(state.ring, position, step_tables(opts.cache_size, opts.fmap, position.device))
            return


def _block_layout(model: nn.Module) -> bool:
    """Llama's block layout in every layer (checked once): the decode steps below run llama_block's
    functions around the slot update, or a full-attention layer's cache read."""
    if not hasattr(model, "_tele_block_layout"):
        model._tele_block_layout = all(eligible(l) for l in model.base_model.layers)
    return model._tele_block_layout


def gemv_step(model: nn.Module, x: torch.Tensor, cache: InferenceCache, position: torch.Tensor) -> torch.Tensor:
    """A batch-1 step on the Triton paths: per block RMSNorm + QKV as one Triton GEMV, the slot
    update and read-out, then Wo + residual, RMSNorm + gate/up + SwiGLU, W2 + residual
    (triton_gemv.decode_post); the final norm + LM head as one GEMV."""
    from avengers.decode.kernels import triton_gemv

    def norm_qkv(h, layer):
        return triton_gemv.gemv(h, layer.attn.in_proj.qkv_fused.weight, norm_weight=layer.ln.weight, eps=layer.ln.eps)

    h = _blocks(model, x, cache, position, norm_qkv, triton_gemv.decode_post)
    logits = decode_head(model.base_model.dec_norm, model.head, h, cache.options)
    return logits if logits is not None else model.head(model.base_model.dec_norm(h))


def compiled_block_step(
    model: nn.Module, x: torch.Tensor, cache: InferenceCache, position: torch.Tensor
) -> torch.Tensor:
    """A step at any other batch on the `compile` and `triton` paths: per block RMSNorm + QKV and
    llama_block.decode_post (Wo + residual, RMSNorm + SwiGLU MLP, residual) torch.compile'd around
    the slot update and read-out, so none of the element-wise work between the GEMMs runs eager."""
    plain = _interpreted(cache.options, x)
    project = norm_linear if plain else compiled_norm_linear()
    post = decode_post if plain else llama_block.functions(cache.options, x.shape[0])[1]

    def norm_qkv(h, layer):
        return project(h, layer.ln.weight, layer.ln.eps, layer.attn.in_proj.qkv_fused.weight)

    h = _blocks(model, x, cache, position, norm_qkv, post)
    return model.head(model.base_model.dec_norm(h))


def _interpreted(options: DecodeOptions, x: torch.Tensor) -> bool:
    """Triton paths on the CPU (the interpreter, in the kernels' tests) take the plain functions:
    Inductor is not what those tests check, and compiling there costs minutes."""
    return options.triton_kernels and not x.is_cuda


def norm_linear(h: torch.Tensor, ln_w: torch.Tensor, eps: float, w: torch.Tensor) -> torch.Tensor:
    """RMSNorm then a bias-free projection: h [B, D] -> [B, N]."""
    return F.linear(F.rms_norm(h, (h.shape[-1],), ln_w, eps), w)


@functools.cache
def compiled_norm_linear():
    return torch.compile(norm_linear, dynamic=True, fullgraph=True)


def _blocks(model: nn.Module, x: torch.Tensor, cache: InferenceCache, position: torch.Tensor, norm_qkv, post):
    """The blocks of one decode step -> the last hidden state [B, 1, D]. Per block: qkv = norm_qkv(h
    [B, D], layer); the slot update (where the slots are in place and the read-out kernel takes
    them, the Triton ring update; otherwise fused_qkv_update_core) and the read-out (the Triton
    kernel on the Triton paths, else slot_attention, compiled with the update); then post."""
    options, base, B = cache.options, model.base_model, x.shape[0]
    h = base.embedding(x)
    first = next(i for i, s in enumerate(cache.layers) if isinstance(s, TelescopingState))
    opts, state0 = base.layers[first].attn.opts, cache.layers[first]
    tables = step_tables(opts.cache_size, opts.fmap, x.device)
    readout = options.triton_kernels and _readout_kernel_takes(state0.k)
    ring = state0.ring if state0.in_place else None  # one map for every telescoping layer
    plain = _interpreted(options, x)
    if readout:
        from avengers.decode.kernels.triton_tele_readout import slot_readout
        from avengers.decode.kernels.triton_tele_update import ring_update

        update = fused_qkv_update_core if plain else compiled_fused_qkv_update_core()
    else:
        core = fused_qkv_step_core if plain else compiled_fused_qkv_step_core()
    for layer, state in zip(base.layers, cache.layers):
        attn = layer.attn
        qkv = norm_qkv(h.view(B, -1), layer)
        if isinstance(state, KVState):
            out = _full_attention_step(attn, qkv, state, position, options, model.config.rope_theta)
            h = block_post(layer, h, out.reshape(B, 1, -1), post)
            continue
        gate_w = attn.gate.weight if attn.gate is not None else None
        args = (qkv, h.view(B, -1), layer.ln.weight, layer.ln.eps, gate_w, position, state.k, state.v, state.log_mass)
        if not readout:
            out = core(*args, ring, tables, attn.opts, attn.rope_theta, *attn._gains())
        else:
            if ring is not None:  # slots in place: the two cells written by the Triton kernel
                q = ring_update(*args, ring, tables, attn.rope_theta, len(opts.fmap))
            else:
                q = update(*args, None, tables, attn.rope_theta)
            out = slot_readout(q, state.k, state.v, state.log_mass, attn.opts, *attn._gains())
        h = block_post(layer, h, out.reshape(B, 1, -1), post)
    _advance_ring(model, cache, position)
    return h
