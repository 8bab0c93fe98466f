"""The `gluon` decode path: a Llama's whole batch-1 decode step as one launch of gluon_chain's
warp-specialised kernel (DECODE), and the host side around it: eligibility, the packed weights and
their TMA descriptors, per-cache buffers and counters, and what to do with caches it does not take.
"""

from __future__ import annotations

import logging

import torch
import triton
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from avengers.decode.kernels import gluon_chain as gc

log = logging.getLogger(__name__)


class LlamaStepKernel:
    """A Llama's batch-1 decode step through all its blocks as one kernel (the `gluon` path):
    gluon_chain's GEMV chain with RoPE and the cache write in the QKV epilogue and an attention phase
    (split-K; the program that finishes a kv head's last split merges it) before Wo, and the final
    norm + LM head after the last block (its weight streamed in place), the phases separated by grid
    barriers (triton_grid). The keys and values stream through the weights' ring (the loader copies
    them right after the block's QKV weights) when the caches are one tensor (KVState.stacked) and
    KV_RING is set; else the consumer warps load them. Holds a packed copy of the block weights
    (2.6 GB for llama3_1.8b) and the step's buffers."""

    STAGES = 12
    NUM_WARPS = 8
    KV_RING = True
    # longer caches take the per-kernel Triton path: there reading the cache dominates, and its
    # split-K attention kernel (every warp of every SM loading keys) outruns this kernel's attention
    # phase (docs/results.md: the two paths at 32k-128k)
    MAX_CACHE_TOKENS = 32768
    # the loader keeps at most this many copies (16 KB each) in flight: with the ring's 12 allowed,
    # the grid barriers' atomics and the attention's loads queue behind the stream; 1 starves it
    INFLIGHT = 2
    SPLIT_PROGRAMS = None  # programs the attention's split plan fills (None: the SMs, rounded to kv heads)

    def __init__(self, model):
        from avengers.decode.kernels.triton_decode import sm_count

        layers = model.base_model.layers
        a0, f0 = layers[0].attn, layers[0].ff_sub_layer
        self.H, self.Hkv, self.d = a0.nheads, a0.kvheads, a0.emb_kq_per_head
        self.D, self.hid = layers[0].ln.weight.shape[0], f0.hidden_dim
        self.nqkv = (self.H + 2 * self.Hkv) * self.d
        self.eps = layers[0].ln.eps
        self.w, self.w2 = gc.pack(
            [l.attn.in_proj.qkv_fused.weight for l in layers],
            [l.attn.dense.weight for l in layers],
            [l.ff_sub_layer.wg1_fused.weight for l in layers],
            [l.ff_sub_layer.w2.weight for l in layers],
            rope_pairs=True,
        )
        self.w_d, self.w2_d = gc.descriptors(self.w, self.w2)
        head = model.head.weight  # streamed in place (not packed): [V, D] rows are the kernel's items already
        self.V = head.shape[0]
        self.head_d = gc.descriptors(head, head)[0]
        self.dec_norm, self.head_eps = model.base_model.dec_norm.weight, model.base_model.dec_norm.eps
        self.emb = model.base_model.embedding.weight
        self.ln = torch.stack([l.ln.weight for l in layers]).contiguous()
        self.ffln = torch.stack([l.ff_ln.weight for l in layers]).contiguous()
        self.programs = sm_count(self.w.device)
        self._buffers = {}
        # profiling: an int64 [programs, 4096, 4] tensor gets the phases' timestamps (`chain`'s slots;
        # phase = block * 5 + k, k: QKV, attention, Wo, gate/up, W2; then the LM head)
        self.stamps = None

    @staticmethod
    def for_model(model) -> LlamaStepKernel | None:
        """The model's step, or None where the kernel does not apply (logged). Built once per set of
        weights: a model moved or cast (the bench checks in fp32, then times bf16) is looked at again."""
        w = next(model.parameters())
        key = (w.data_ptr(), w.dtype, w.device)
        step = getattr(model, "_gluon_decode_step", None)
        if step is None or step[0] != key:
            reason = LlamaStepKernel.unsupported(model)
            if reason:
                log.warning("decode path gluon: %s; this model's decode steps take the Triton path", reason)
            step = model._gluon_decode_step = (key, None if reason else LlamaStepKernel(model))
        return step[1]

    @staticmethod
    def unsupported(model) -> str:
        """Why the kernel does not take this model ("" when it does): it needs a CUDA Hopper device
        with Triton 3.6's Gluon, bf16, plain RMS norms without biases, heads of 128 with 2, 4 or 8
        query heads per kv head, and widths that whole weight items divide."""
        from avengers.decode.llama_block import eligible, is_plain_rms_norm

        p = next(model.parameters())
        if not gc.GLUON_API:
            return f"Triton {triton.__version__}'s Gluon API is not the one this kernel is written for (3.6)"
        if p.device.type != "cuda" or torch.cuda.get_device_capability(p.device)[0] < 9:
            return f"needs a Hopper (sm_90+) CUDA device, the model is on {p.device}"
        if p.dtype != torch.bfloat16:
            return f"needs bf16 weights, got {p.dtype}"
        layers = model.base_model.layers
        a0 = layers[0].attn
        D, hid = layers[0].ln.weight.shape[0], layers[0].ff_sub_layer.hidden_dim
        if not all(eligible(l) and is_plain_rms_norm(l.ln) and is_plain_rms_norm(l.ff_ln) for l in layers):
            return "needs plain RMS norms and bias-free fused projections in every block"
        if len({l.ln.eps for l in layers} | {l.ff_ln.eps for l in layers}) != 1:
            return "needs one norm eps in every block"
        head = model.head
        if (
            not is_plain_rms_norm(model.base_model.dec_norm)
            or getattr(head, "bias", None) is not None
            or head.weight.shape[0] % gc.ROWS
            or not head.weight.is_contiguous()
        ):
            return (
                f"needs a plain final RMS norm and a bias-free, contiguous LM head with a multiple of {gc.ROWS} "
                f"rows, got {tuple(head.weight.shape)}"
            )
        if (
            a0.emb_kq_per_head != 128
            or a0.nheads * 128 != D
            or a0.nheads % a0.kvheads
            or a0.nheads // a0.kvheads not in (2, 4, 8)
        ):
            return (
                f"needs heads of 128 covering the width and 2, 4 or 8 query heads per kv head, got "
                f"{a0.nheads} heads of {a0.emb_kq_per_head} ({a0.kvheads} kv heads) at width {D}"
            )
        if D % gc.ITEM_K or hid % gc.ITEM_K or max(D, hid) > gc.MAX_K_ITEMS * gc.ITEM_K:
            limit = gc.MAX_K_ITEMS * gc.ITEM_K
            return f"needs width {D} and hidden size {hid} to be multiples of {gc.ITEM_K} up to {limit}"
        from avengers.decode.kernels.triton_decode import sm_count

        programs, nqkv = sm_count(p.device), (a0.nheads + 2 * a0.kvheads) * a0.emb_kq_per_head
        parked = max(gc.parked_row_blocks(2 * hid, programs), gc.parked_row_blocks(nqkv, programs))
        if parked > gc.MAX_PARKED:
            return (
                f"needs at most {gc.MAX_PARKED} gate/up or QKV row blocks of {gc.ROWS} rows per SM, "
                f"got {parked} on {programs} SMs"
            )
        return ""

    def _buffers_for(self, cache):
        """Per-cache buffers (made on the first, uncaptured decode step of that cache)."""
        from avengers.decode.kernels.triton_decode import num_splits

        programs = self.SPLIT_PROGRAMS or max(1, self.programs // self.Hkv) * self.Hkv
        key = (programs, *(t.data_ptr() for s in cache.layers for t in (s.k, s.v)))
        if key not in self._buffers:
            dev, L, S = self.w.device, len(cache.layers), cache.layers[0].k.shape[2]
            k0 = cache.layers[0].k
            split, nsplit = num_splits(1, self.Hkv, S, dev, programs=programs)
            G = self.H // self.Hkv
            i32 = dict(device=dev, dtype=torch.int32)
            self._buffers = {
                key: dict(  # one cache at a time
                    koff=self._offsets([s.k for s in cache.layers]),
                    voff=self._offsets([s.v for s in cache.layers]),
                    kv_descriptors=self._kv_descriptors(cache),
                    skh=k0.stride(1),
                    skn=k0.stride(2),
                    split=split,
                    nsplit=nsplit,
                    # rows between phases as int32 words: bf16 bits and the writing phase's tag (_put)
                    x=torch.zeros(self.D, **i32),
                    qkv=torch.zeros(self.nqkv, **i32),
                    h2=torch.zeros(self.D, **i32),
                    rope=cache.rope,  # [positions, d / 2, (cos, sin)] fp32, contiguous
                    a=torch.zeros(self.hid, **i32),
                    attn=torch.zeros(self.H * self.d, **i32),
                    # grid barrier, gave-up flag, one per (block, kv head), the exit counter (zero between
                    # launches: the kernel's last program resets them), then the launch count (the tags' base)
                    count=torch.zeros(4 + L * self.Hkv, **i32),
                    pacc=torch.empty(self.Hkv * nsplit * G, self.d, device=dev, dtype=torch.float32),
                    pm=torch.empty(self.Hkv * nsplit * G, device=dev, dtype=torch.float32),
                    pl=torch.empty(self.Hkv * nsplit * G, device=dev, dtype=torch.float32),
                )
            }
        return self._buffers[key]

    @staticmethod
    def _kv_descriptors(cache):
        """TMA descriptors over all blocks' keys and values as [rows of 8 keys, 4, 256] (what the
        loader copies), or None where the caches are not consecutive views of one tensor each."""
        out = []
        for name in ("k", "v"):
            views = [getattr(s, name) for s in cache.layers]
            whole = views[0]._base
            step = views[0].numel() * views[0].element_size()
            if (
                whole is None
                or not whole.is_contiguous()
                or whole.numel() != len(views) * views[0].numel()
                or any(t._base is not whole or t.data_ptr() != whole.data_ptr() + i * step for i, t in enumerate(views))
                or views[0].shape[2] % 64
            ):
                return None
            rows = whole.view(-1, gc.CHUNKS, gc.CW)
            box = [gc.ROWS, gc.CHUNKS, gc.CW]
            out.append(TensorDescriptor(rows, list(rows.shape), list(rows.stride()), box, gc.box_layout()))
        return out

    @staticmethod
    def _offsets(caches: list[torch.Tensor]) -> torch.Tensor:
        """Each block's cache as an element offset from block 0's (int64), all 16-byte aligned."""
        if any(t.data_ptr() % 16 or t.stride(-1) != 1 for t in caches):
            raise ValueError("the Gluon decode step needs 16-byte aligned caches with contiguous head dims")
        base = caches[0].data_ptr()
        return torch.tensor(
            [(t.data_ptr() - base) // t.element_size() for t in caches], device=caches[0].device, dtype=torch.int64
        )

    def __call__(self, tokens: torch.Tensor, cache) -> torch.Tensor:
        """tokens [1, 1] (int64) -> logits [1, 1, V] (bf16): the whole decode step at cache.position,
        which the kernel advances (the caller advances cache.seq_len: `advance(1, on_device=False)`).
        Embedding, RoPE angles (from the cache's table), every block's key and value write, and
        resetting its own counters for the next launch happen inside the kernel: one launch a step."""
        b = self._buffers_for(cache)
        kv = b["kv_descriptors"] if self.KV_RING else None
        logits = torch.empty(self.V, device=tokens.device, dtype=torch.bfloat16)
        gc.chain_kernel[(self.programs,)](
            self.w_d,
            self.w2_d,
            b["x"],
            b["qkv"],
            b["h2"],
            b["a"],
            b["count"],
            self.ln,
            self.ffln,
            len(cache.layers),
            self.nqkv,
            self.D,
            self.hid,
            self.eps,
            b["count"] if self.stamps is None else self.stamps,
            b["rope"],
            self.d**-0.5,
            cache.position,
            tokens,
            cache.layers[0].k,
            cache.layers[0].v,
            b["koff"],
            b["voff"],
            b["skh"],
            b["skn"],
            b["attn"],
            b["pacc"],
            b["pm"],
            b["pl"],
            self.H * self.d,
            self.Hkv * self.d,
            self.Hkv,
            b["nsplit"],
            b["split"],
            *(kv or (self.w_d, self.w_d)),
            cache.layers[0].k.shape[2],
            self.head_d,
            logits,
            self.dec_norm,
            self.V,
            self.head_eps,
            self.emb,
            STAGES=self.STAGES,
            num_warps=self.NUM_WARPS,
            DECODE=True,
            G=self.H // self.Hkv,
            HD=self.d,
            BLOCK_S=triton.next_power_of_2(b["nsplit"]),
            STAMPS=self.stamps is not None,
            KV_RING=kv is not None,
            INFLIGHT=self.INFLIGHT,
            launch_cooperative_grid=True,
        )
        return logits.view(1, 1, -1)
