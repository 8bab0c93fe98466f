"""Llama's cache (a KVState per layer plus a RoPE table) and its cached forward: prefill and decode.

`allocate_kv_cache` and `forward_with_cache` are what avengers.models.llama.Llama calls for
`allocate_cache` and `forward(..., cache=)`. A decode step takes the cache's DecodeOptions path:
the per-module reference below, the pure block functions of llama_block.py (`compile`,
`triton`), or the whole step as one Gluon kernel (`gluon`, kernels/gluon_step.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from avengers.decode.attention import cached_attention, decode_attention, invalid_positions
from avengers.decode.cache import InferenceCache, KVState, allocation_target, padded_len
from avengers.decode.llama_block import decode_block, decode_head, eligible, is_plain_rms_norm
from avengers.decode.options import DecodeOptions
from avengers.ops.rope import rope_cos_sin, rotate_pairs


class KVCache(InferenceCache):
    """Per-layer KVState plus the RoPE table for every position the cache can hold."""

    def __init__(
        self,
        layers: list[KVState],
        batch_size: int,
        max_seq_len: int,
        rope: torch.Tensor,
        head_scale: torch.Tensor,
        options: DecodeOptions | None = None,
    ):
        super().__init__(layers, batch_size, max_seq_len, options)
        # Outside `layers`, so not counted by nbytes(). rope [positions, d/2, (cos, sin)] fp32;
        # head_scale [H + H_kv, 1] folds the softmax scale 1/sqrt(d) into the query rotation, so q
        # and k are rotated by one multiply.
        self.rope, self.head_scale = rope, head_scale


def allocate_kv_cache(
    model: nn.Module,
    batch_size: int,
    max_seq_len: int,
    device=None,
    dtype=None,
    options: DecodeOptions | None = None,
) -> KVCache:
    cfg = model.config
    device, dtype = allocation_target(model, batch_size, max_seq_len, device, dtype)
    rope_type = (cfg.rope_scaling or {}).get("rope_type", "regular")
    if rope_type != "regular":
        raise ValueError(f"cached decode supports rope_type 'regular' only, got {rope_type!r}")
    head_dim = cfg.emb_dim // cfg.nheads
    kv_heads = cfg.kvheads or cfg.nheads
    layers = KVState.stacked(cfg.nlayers, batch_size, kv_heads, max_seq_len, head_dim, device=device, dtype=dtype)
    cos, sin = rope_cos_sin(torch.arange(padded_len(max_seq_len), device=device), head_dim, cfg.rope_theta)
    scale = torch.ones(cfg.nheads + kv_heads, 1, device=device)
    scale[: cfg.nheads] = head_dim**-0.5
    options = (options or DecodeOptions()).resolve("llama", device)
    return KVCache(layers, batch_size, max_seq_len, torch.stack((cos, sin), -1), scale, options)


def _rms_norm(ln: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if not is_plain_rms_norm(ln):
        return ln(x)
    return F.rms_norm(x, (x.shape[-1],), ln.weight, ln.eps)


def _qkv(attn: nn.Module, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q and k as one [B, T, H + H_kv, d] tensor, v [B, T, H_kv, d])."""
    H, Hkv, d = attn.nheads, attn.kvheads, attn.emb_kq_per_head
    if hasattr(attn.in_proj, "qkv_fused"):  # ibm-fms FusedQKV: q, k, v from one matmul
        qkv = attn.in_proj.qkv_fused(y)
        qk, v = qkv[..., : (H + Hkv) * d], qkv[..., (H + Hkv) * d :]
    else:
        q, k, v = attn.in_proj(y, None, None)
        qk = torch.cat([q, k], dim=-1)
    return qk.unflatten(-1, (H + Hkv, d)), v.unflatten(-1, (Hkv, attn.emb_v_per_head))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, d] in adjacent pairs by cos/sin [T, H or 1, d/2] (fp32), in x's dtype."""
    return rotate_pairs(x.float(), cos, sin).type_as(x)


def _attention(
    attn: nn.Module,
    y: torch.Tensor,
    state: KVState,
    cache: KVCache,
    cos: torch.Tensor,
    sin: torch.Tensor,
    invalid: torch.Tensor | None,
) -> torch.Tensor:
    B, T, _ = y.shape
    H = attn.nheads
    qk, v = _qkv(attn, y)
    qk = apply_rope(qk, cos, sin)  # queries come out scaled by 1/sqrt(d)
    position = cache.position if invalid is not None else None
    out = cached_attention(
        qk[:, :, :H],
        qk[:, :, H:],
        v,
        state,
        cache.seq_len,
        position,
        scale=1.0,
        invalid=invalid,
        backend=cache.options.attention,
    )
    return attn.dense(out.reshape(B, T, -1))


def forward_with_cache(model: nn.Module, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Consume x [B, T] at positions cache.seq_len.. and return logits [B, T, V] (prefill or decode).

    Decode (T == 1) reads its position from cache.position only, so it can be captured in a CUDA
    graph; prefill (T > 1) uses the host-side cache.seq_len.
    """
    cache.check_tokens(x)
    T, options = x.shape[1], cache.options
    if T == 1 and options.path == "gluon" and x.shape[0] == 1 and x.is_cuda:
        from avengers.decode.kernels.gluon_step import LlamaStepKernel

        step = LlamaStepKernel.for_model(model)
        if step is not None and cache.max_seq_len <= step.MAX_CACHE_TOKENS:
            # the whole step in one kernel: embedding, every block, the LM head
            logits = step(x, cache)
            cache.advance(1, on_device=False)  # the kernel advanced cache.position
            return logits
    if T == 1:
        rope = cache.rope.index_select(0, cache.position.view(1))
        length = cache.position + 1
        invalid = invalid_positions(cache.layers[0].k.shape[2], length)
    else:
        rope, invalid = cache.rope[cache.seq_len : cache.seq_len + T], None
    cos, sin = (t[:, None, :] * cache.head_scale for t in rope.unbind(-1))  # [T, H + H_kv, d/2]
    base = model.base_model
    h = base.embedding(x)
    fused = invalid is not None and options.path != "reference"
    if fused:  # once per step, not per layer
        cos0, sin0 = cos[0].contiguous(), sin[0].contiguous()
    for layer, state in zip(base.layers, cache.layers):
        if fused and eligible(layer):

            def attention(q, s=state):
                return decode_attention(q, s.k, s.v, length, 1.0, invalid, options.attention)

            h = decode_block(layer, h, state, cache.position, cos0, sin0, attention, options)
            continue
        h = h + _attention(layer.attn, _rms_norm(layer.ln, h), state, cache, cos, sin, invalid)
        h = h + layer.ff_sub_layer(_rms_norm(layer.ff_ln, h))
    logits = decode_head(base.dec_norm, model.head, h, options) if fused else None
    if logits is None:
        logits = model.head(_rms_norm(base.dec_norm, h))
    cache.advance(T)
    return logits
