"""Growing key/value state for attention layers, in a buffer preallocated to max_seq_len."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from avengers.inference.cache import InferenceCache


class KVState:
    """One attention layer's keys and values: [B, H_kv, max_seq_len, head_dim] each."""

    def __init__(self, batch_size: int, kv_heads: int, max_seq_len: int, head_dim: int,
                 device=None, dtype=None):
        shape = (batch_size, kv_heads, max_seq_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

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


KV_CHUNK = 128  # decode attention splits the key axis into chunks of this many positions


def padded_len(max_seq_len: int) -> int:
    """Buffer length: max_seq_len rounded up to KV_CHUNK so decode can view the keys as chunks."""
    return -(-max_seq_len // KV_CHUNK) * KV_CHUNK


def decode_attention(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """One query token per sequence over a static key/value buffer, keys [0, length) valid.

    q [B, H, d]; k_buf, v_buf [B, H_kv, S, d] with S a multiple of KV_CHUNK; length a 0-dim long
    tensor (read on the device, so the call can be captured in a CUDA graph). The key axis is viewed
    as S/KV_CHUNK chunks so both matmuls are batched over (B, H_kv, chunk) and spread over the
    whole GPU at batch 1 (split-K), and the H/H_kv query heads of a group share one read of their
    key/value head (GQA without copying the cache). Reference: `decode_attention_reference`.
    """
    B, H, d = q.shape
    _, Hkv, S, _ = k_buf.shape
    if S % KV_CHUNK:
        raise ValueError(f"key buffer length {S} is not a multiple of KV_CHUNK={KV_CHUNK}")
    G, n = H // Hkv, S // KV_CHUNK
    qg = (q * d**-0.5).view(B, Hkv, 1, G, d)
    kc = k_buf.view(B, Hkv, n, KV_CHUNK, d)
    scores = torch.matmul(qg, kc.transpose(-1, -2)).float()  # [B, Hkv, n, G, C]
    invalid = torch.arange(S, device=q.device).view(n, 1, KV_CHUNK) >= length
    scores = scores.masked_fill(invalid, float("-inf"))
    m = scores.amax(dim=(2, 4), keepdim=True)
    p = torch.exp(scores - m)
    denom = p.sum(dim=(2, 4))  # [B, Hkv, G]
    out = torch.matmul(p.to(v_buf.dtype), v_buf.view(B, Hkv, n, KV_CHUNK, d))  # [B, Hkv, n, G, d]
    out = out.float().sum(2) / denom.unsqueeze(-1)
    return out.reshape(B, H, d).to(q.dtype)


def decode_attention_reference(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, length: int) -> torch.Tensor:
    """SDPA over the first `length` keys, GQA by repeating key/value heads."""
    B, H, d = q.shape
    G = H // k_buf.shape[1]
    k = k_buf[:, :, :length].repeat_interleave(G, dim=1)
    v = v_buf[:, :, :length].repeat_interleave(G, dim=1)
    return F.scaled_dot_product_attention(q.unsqueeze(2), k, v).squeeze(2)


def rope_tables(head_dim: int, theta: float, length: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [length, head_dim/2] in fp32, the same angles ibm-fms's RotaryEmbedding computes."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), freqs)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, d] with adjacent-pair rotation (ibm-fms layout); cos/sin [T, d/2]."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2).type_as(x)


class KVCache(InferenceCache):
    """Per-layer KVState plus the RoPE tables for every position the cache can hold."""

    def __init__(self, layers: list[KVState], batch_size: int, max_seq_len: int,
                 rope_cos: torch.Tensor, rope_sin: torch.Tensor):
        super().__init__(layers, batch_size, max_seq_len)
        self.rope_cos, self.rope_sin = rope_cos, rope_sin  # outside `layers`: not part of nbytes()

    @classmethod
    def for_llama(cls, model: nn.Module, batch_size: int, max_seq_len: int, device=None, dtype=None) -> "KVCache":
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
        layers = [KVState(batch_size, kv_heads, length, head_dim, device=device, dtype=dtype)
                  for _ in range(cfg.nlayers)]
        cos, sin = rope_tables(head_dim, cfg.rope_theta, length, device=device)
        return cls(layers, batch_size, max_seq_len, cos, sin)


def _attention(attn: nn.Module, y: torch.Tensor, state: KVState, cache: KVCache) -> torch.Tensor:
    B, T, _ = y.shape
    q, k, v = attn.in_proj(y, None, None)
    q = q.view(B, T, attn.nheads, attn.emb_kq_per_head)
    k = k.view(B, T, attn.kvheads, attn.emb_kq_per_head)
    v = v.view(B, T, attn.kvheads, attn.emb_v_per_head)
    if T == 1:  # decode: position read from the device so the step can be graph-captured
        index = cache.position.view(1)
        cos, sin = cache.rope_cos.index_select(0, index), cache.rope_sin.index_select(0, index)
    else:
        start = cache.seq_len
        cos, sin = cache.rope_cos[start:start + T], cache.rope_sin[start:start + T]
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, d]
    if T == 1:
        state.write_at(k, v, cache.position)
        out = decode_attention(q.squeeze(2), state.k, state.v, cache.position + 1).unsqueeze(1)
    else:
        start = cache.seq_len
        keys, values = state.update(k, v, start)
        group = attn.nheads // attn.kvheads
        keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
        if start == 0:
            out = F.scaled_dot_product_attention(q, keys, values, is_causal=True)
        else:  # query i sits at position start + i and sees keys 0..start+i
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=causal_lower_right(T, start + T))
        out = out.transpose(1, 2)
    return attn.dense(out.reshape(B, T, attn.nheads * attn.emb_v_per_head))


def llama_forward_with_cache(model: nn.Module, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Consume x [B, T] at positions cache.seq_len.. and return logits [B, T, V] (prefill or decode)."""
    if x.dim() != 2 or x.shape[0] != cache.batch_size:
        raise ValueError(f"input_ids must be [batch={cache.batch_size}, T], got {tuple(x.shape)}")
    if cache.seq_len + x.shape[1] > cache.max_seq_len:
        raise ValueError(
            f"cache holds max_seq_len={cache.max_seq_len} tokens; {cache.seq_len} used, {x.shape[1]} more given"
        )
    base = model.base_model
    h = base.embedding(x)
    for layer, state in zip(base.layers, cache.layers):
        h = h + _attention(layer.attn, layer.ln(h), state, cache)
        h = h + layer.ff_sub_layer(layer.ff_ln(h))
    logits = model.head(base.dec_norm(h))
    cache.advance(x.shape[1])
    return logits
