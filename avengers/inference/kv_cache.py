"""Growing key/value state for attention layers (preallocated buffers) and Llama's cached forward.

`KVCache.for_llama` and `llama_forward_with_cache` are what avengers.models.llama.Llama calls for
`allocate_cache` and `forward(..., cache=)`. Decode attention lives in attention.py (re-exported
here for the other families).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from avengers.inference.attention import (  # noqa: F401 - re-exported for the model families
    DECODE_BACKENDS,
    KV_CHUNK,
    decode_attention,
    decode_attention_reference,
    decode_attention_torch,
    decode_backends_used,
    invalid_positions,
    padded_len,
    set_decode_backend,
)
from avengers.inference.cache import InferenceCache
from avengers.inference.llama_compiled import decode_block, decode_head, eligible, fused_decode_mode, is_plain_rms_norm


class KVState:
    """One attention layer's keys and values: [B, H_kv, max_seq_len, head_dim] each."""

    def __init__(
        self,
        batch_size: int,
        kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        device=None,
        dtype=None,
        k: torch.Tensor | None = None,
        v: torch.Tensor | None = None,
    ):
        shape = (batch_size, kv_heads, max_seq_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype) if k is None else k
        self.v = torch.zeros(shape, device=device, dtype=dtype) if v is None else v

    @classmethod
    def stacked(
        cls, n: int, batch_size: int, kv_heads: int, max_seq_len: int, head_dim: int, device=None, dtype=None
    ) -> list[KVState]:
        """n layers' states as views of one [n, B, H_kv, max_seq_len, d] tensor each for keys and
        values (one TMA descriptor covers every layer's cache: gluon_step's decode kernel)."""
        shape = (n, batch_size, kv_heads, max_seq_len, head_dim)
        k, v = torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)
        return [cls(batch_size, kv_heads, max_seq_len, head_dim, k=k[i], v=v[i]) for i in range(n)]

    def update(self, k_new: torch.Tensor, v_new: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write [B, H_kv, T, d] at positions start..start+T-1; return views of positions 0..start+T-1."""
        end = start + k_new.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache of {self.k.shape[2]} positions cannot hold position {end - 1}")
        self.k[:, :, start:end] = k_new
        self.v[:, :, start:end] = v_new
        return self.k[:, :, :end], self.v[:, :, :end]

    def write_at(self, k_new: torch.Tensor, v_new: torch.Tensor, position: torch.Tensor) -> None:
        """Write one token's [B, H_kv, 1, d] at a position held in a 0-dim device tensor (graph-safe)."""
        index = position.view(1)
        self.k.index_copy_(2, index, k_new)
        self.v.index_copy_(2, index, v_new)


def rope_table(head_dim: int, theta: float, length: int, device=None) -> torch.Tensor:
    """complex64 [length, head_dim/2]: e^(i * position * freq), the angles ibm-fms's RotaryEmbedding uses."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), freqs)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, d], adjacent channel pairs rotated (ibm-fms layout) by cis [T, H or 1, d/2]; x's dtype."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * cis).flatten(-2).type_as(x)


class KVCache(InferenceCache):
    """Per-layer KVState plus the RoPE table for every position the cache can hold."""

    def __init__(
        self, layers: list[KVState], batch_size: int, max_seq_len: int, rope: torch.Tensor, head_scale: torch.Tensor
    ):
        super().__init__(layers, batch_size, max_seq_len)
        # Outside `layers`, so not counted by nbytes(). head_scale [H + H_kv, 1] folds the softmax
        # scale 1/sqrt(d) into the query rotation: q and k are rotated by one multiply.
        self.rope, self.head_scale = rope, head_scale

    @classmethod
    def for_llama(cls, model: nn.Module, batch_size: int, max_seq_len: int, device=None, dtype=None) -> KVCache:
        cfg = model.config
        if batch_size < 1 or max_seq_len < 1:
            raise ValueError(f"batch_size and max_seq_len must be >= 1, got {batch_size} and {max_seq_len}")
        rope_type = (cfg.rope_scaling or {}).get("rope_type", "regular")
        if rope_type != "regular":
            raise ValueError(f"cached decode supports rope_type 'regular' only, got {rope_type!r}")
        param = next(model.parameters())
        device = torch.device(device) if device is not None else param.device
        dtype = dtype or param.dtype
        head_dim = cfg.emb_dim // cfg.nheads
        kv_heads = cfg.kvheads or cfg.nheads
        length = padded_len(max_seq_len)
        layers = KVState.stacked(cfg.nlayers, batch_size, kv_heads, length, head_dim, device=device, dtype=dtype)
        scale = torch.ones(cfg.nheads + kv_heads, 1, device=device)
        scale[: cfg.nheads] = head_dim**-0.5
        return cls(layers, batch_size, max_seq_len, rope_table(head_dim, cfg.rope_theta, length, device), scale)


def _rms_norm(ln: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if not is_plain_rms_norm(ln):
        return ln(x)
    return F.rms_norm(x, (x.shape[-1],), ln.weight, ln.eps)


def _qkv(attn: nn.Module, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q and k as one [B, T, H + H_kv, d] tensor, v [B, T, H_kv, d])."""
    B, T, _ = y.shape
    H, Hkv, d = attn.nheads, attn.kvheads, attn.emb_kq_per_head
    if hasattr(attn.in_proj, "qkv_fused"):  # ibm-fms FusedQKV: q, k, v from one matmul
        qkv = attn.in_proj.qkv_fused(y)
        qk, v = qkv[..., : (H + Hkv) * d], qkv[..., (H + Hkv) * d :]
    else:
        q, k, v = attn.in_proj(y, None, None)
        qk = torch.cat([q, k], dim=-1)
    return qk.unflatten(-1, (H + Hkv, d)), v.unflatten(-1, (Hkv, attn.emb_v_per_head))


def _attention(
    attn: nn.Module,
    y: torch.Tensor,
    state: KVState,
    cache: KVCache,
    cis: torch.Tensor,
    decode: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    B, T, _ = y.shape
    H, Hkv = attn.nheads, attn.kvheads
    qk, v = _qkv(attn, y)
    qk = apply_rope(qk, cis)  # queries come out scaled by 1/sqrt(d)
    q, k = qk[:, :, :H], qk[:, :, H:]
    if decode is not None:  # one token at the position held on the device; (valid length, invalid mask)
        state.write_at(k.transpose(1, 2), v.transpose(1, 2), cache.position)
        out = decode_attention(q.reshape(B, H, -1), state.k, state.v, decode[0], scale=1.0, invalid=decode[1])
    else:
        start = cache.seq_len
        keys, values = state.update(k.transpose(1, 2), v.transpose(1, 2), start)
        keys, values = keys.repeat_interleave(H // Hkv, dim=1), values.repeat_interleave(H // Hkv, dim=1)
        q = q.transpose(1, 2)
        if start == 0:
            out = F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=1.0)
        else:  # query i sits at position start + i and sees keys 0..start+i
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=causal_lower_right(T, start + T), scale=1.0)
        out = out.transpose(1, 2)
    return attn.dense(out.reshape(B, T, -1))


def llama_forward_with_cache(model: nn.Module, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Consume x [B, T] at positions cache.seq_len.. and return logits [B, T, V] (prefill or decode).

    Decode (T == 1) reads its position from cache.position only, so it can be captured in a CUDA
    graph; prefill (T > 1) uses the host-side cache.seq_len.
    """
    if x.dim() != 2 or x.shape[0] != cache.batch_size:
        raise ValueError(f"input_ids must be [batch={cache.batch_size}, T], got {tuple(x.shape)}")
    T = x.shape[1]
    if cache.seq_len + T > cache.max_seq_len:
        raise ValueError(f"cache holds max_seq_len={cache.max_seq_len} tokens; {cache.seq_len} used, {T} more given")
    if T == 1 and fused_decode_mode() == "gluon" and x.shape[0] == 1 and x.is_cuda:
        from avengers.inference.gluon_step import LlamaStepKernel

        step = LlamaStepKernel.for_model(model)
        if step is not None and cache.max_seq_len <= step.MAX_CACHE_TOKENS:
            # the whole step in one kernel: embedding, every block, the LM head
            logits = step(x, cache)
            cache.advance(1, on_device=False)  # the kernel advanced cache.position
            return logits
    if T == 1:
        cis = cache.rope.index_select(0, cache.position.view(1))
        length = cache.position + 1
        decode = (length, invalid_positions(cache.layers[0].k.shape[2], length))
    else:
        cis, decode = cache.rope[cache.seq_len : cache.seq_len + T], None
    cis = cis[:, None, :] * cache.head_scale  # [T, H + H_kv, d/2]
    base = model.base_model
    h = base.embedding(x)
    fused = decode is not None and fused_decode_mode() != "off"
    if fused:  # once per step, not per layer
        cos, sin = (t.contiguous() for t in torch.view_as_real(cis[0]).unbind(-1))
    for layer, state in zip(base.layers, cache.layers):
        if fused and eligible(layer):
            h = decode_block(
                layer,
                h,
                state,
                cache.position,
                cos,
                sin,
                lambda q, s=state: decode_attention(q, s.k, s.v, decode[0], scale=1.0, invalid=decode[1]),
                decode[0],
            )
            continue
        h = h + _attention(layer.attn, _rms_norm(layer.ln, h), state, cache, cis, decode)
        h = h + layer.ff_sub_layer(_rms_norm(layer.ff_ln, h))
    logits = decode_head(base.dec_norm, model.head, h) if fused else None
    if logits is None:
        logits = model.head(_rms_norm(base.dec_norm, h))
    cache.advance(T)
    return logits
