"""Attention over a KVState: `cached_attention` (prefill and decode, every family's attention
layers) and `decode_attention`, one query token per sequence over a static key/value buffer.

The decode kernel is chosen here and only here: the Triton split-K kernel (kernels/triton_decode.py)
on CUDA once it has passed a self-test on its first use, else `decode_attention_torch`; the
cache's DecodeOptions.attention can force either. Both are tested against
`decode_attention_reference` (SDPA over the valid keys).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from avengers.decode.cache import KV_CHUNK, KVState

log = logging.getLogger(__name__)

_VERIFIED: dict[tuple, bool] = {}  # (device, dtype, head dim, group) -> the Triton kernel passed its self-test


def invalid_positions(buffer_len: int, length: torch.Tensor) -> torch.Tensor:
    """Bool [buffer_len]: True at positions >= length (a 0-dim device tensor); shared by all layers of a step."""
    return torch.arange(buffer_len, device=length.device) >= length


def decode_attention(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    length: torch.Tensor,
    scale: float | None = None,
    invalid: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """One query token per sequence over a static key/value buffer; graph-capturable.

    q [B, H, d]; k_buf, v_buf [B, H_kv, S, d] with S a multiple of KV_CHUNK; keys [0, length) are
    valid, length a 0-dim long device tensor; scale defaults to 1/sqrt(d) as in SDPA; `invalid`
    (invalid_positions, optional) saves the torch path recomputing the mask in every layer.
    `backend` (DecodeOptions.attention): the Triton kernel (triton_decode.py) or
    decode_attention_torch; both are tested against decode_attention_reference.
    """
    if _use_triton(q, k_buf, backend):
        from avengers.decode.kernels.triton_decode import decode_attention_triton

        return decode_attention_triton(q, k_buf, v_buf, length, scale)
    return decode_attention_torch(q, k_buf, v_buf, length if invalid is None else invalid, scale)


def _use_triton(q: torch.Tensor, k_buf: torch.Tensor, backend: str) -> bool:
    if backend == "torch" or not q.is_cuda:
        return False
    try:
        from avengers.decode.kernels.triton_decode import supported
    except ImportError:
        if backend == "triton":
            raise
        return False
    if not supported(q, k_buf):
        if backend == "triton":
            raise ValueError(f"Triton decode attention does not support q {tuple(q.shape)} {q.dtype}")
        return False
    if backend == "triton":
        return True
    key = (q.device, q.dtype, q.shape[-1], q.shape[1] // k_buf.shape[1])
    if key not in _VERIFIED:
        if torch.cuda.is_current_stream_capturing():
            return False  # a self-test cannot run inside a graph capture
        _VERIFIED[key] = _self_test(*key)
    return _VERIFIED[key]


def _self_test(device: torch.device, dtype: torch.dtype, d: int, group: int) -> bool:
    """The Triton kernel against the torch path on random data; False (with a warning) on any failure."""
    from avengers.decode.kernels.triton_decode import decode_attention_triton

    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(2, 2 * group, d, device=device, dtype=dtype, generator=g)
    k, v = torch.randn(2, 2, 2, 3 * KV_CHUNK, d, device=device, dtype=dtype, generator=g)
    length = torch.tensor(3 * KV_CHUNK - 37, device=device)
    try:
        got = decode_attention_triton(q, k, v, length)
        err = float((got.float() - decode_attention_torch(q.float(), k.float(), v.float(), length).float()).abs().max())
    except Exception as e:  # noqa: BLE001 - any compile/launch failure means: use the torch path
        log.warning("Triton decode attention unavailable (%s: %s); using the torch path", type(e).__name__, e)
        return False
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    if not err <= tol:
        log.warning("Triton decode attention self-test error %.3g > %.g; using the torch path", err, tol)
        return False
    return True


def decode_attention_torch(
    q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, valid: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """The torch-ops path: `valid` is the valid length (0-dim long tensor) or an invalid_positions mask.

    Scores are one batched matmul over all S keys; the value matmul reduces over S, so it is split
    into S/KV_CHUNK chunks (split-K) to keep the GPU busy at batch 1, and the partial sums are added.
    """
    B, H, d = q.shape
    _, Hkv, S, _ = k_buf.shape
    if S % KV_CHUNK:
        raise ValueError(f"key buffer length {S} is not a multiple of KV_CHUNK={KV_CHUNK}")
    G, n = H // Hkv, S // KV_CHUNK
    invalid = valid if valid.dtype == torch.bool else invalid_positions(S, valid)
    if scale != 1.0:
        q = q * (d**-0.5 if scale is None else scale)
    scores = torch.matmul(q.view(B, Hkv, G, d), k_buf.transpose(-1, -2))  # [B, Hkv, G, S]
    p = torch.softmax(scores.masked_fill(invalid, float("-inf")), dim=-1, dtype=torch.float32).to(v_buf.dtype)
    pc = p.view(B, Hkv, G, n, KV_CHUNK).transpose(2, 3)  # [B, Hkv, n, G, C]
    out = torch.matmul(pc, v_buf.view(B, Hkv, n, KV_CHUNK, d)).sum(2)  # [B, Hkv, G, d]
    return out.reshape(B, H, d)


def decode_attention_reference(
    q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, length: int, scale: float | None = None
) -> torch.Tensor:
    """SDPA over the first `length` keys, GQA by repeating key/value heads."""
    G = q.shape[1] // k_buf.shape[1]
    k = k_buf[:, :, :length].repeat_interleave(G, dim=1)
    v = v_buf[:, :, :length].repeat_interleave(G, dim=1)
    return F.scaled_dot_product_attention(q.unsqueeze(2), k, v, scale=scale).squeeze(2)


def cached_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: KVState,
    start: int,
    position: torch.Tensor | None = None,
    scale: float | None = None,
    invalid: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Causal attention of T new tokens over a KVState: q [B, T, H, d], k, v [B, T, H_kv, d]
    (already rotated) -> [B, T, H, d] in q's dtype. Every attention layer of every family
    (Llama, hybrid attention, telescoping full layers) reads its cache through this.

    Prefill (position None): the keys/values are written at start.. and SDPA runs causally,
    lower-right aligned when the cache already holds `start` tokens (chunked prefill).
    Decode (T == 1, position a 0-dim device tensor): the write and the valid length come from
    `position`, so the step can be replayed from a CUDA graph; `invalid` as in decode_attention.
    """
    B, T, H, _ = q.shape
    k, v = k.transpose(1, 2).to(state.k.dtype), v.transpose(1, 2).to(state.v.dtype)
    if position is not None:
        state.write_at(k, v, position)
        length = position + 1
        out = decode_attention(q[:, 0].to(state.k.dtype), state.k, state.v, length, scale, invalid, backend)
        return out.to(q.dtype).unsqueeze(1)
    keys, values = state.update(k, v, start)
    group = H // keys.shape[1]
    keys, values = keys.repeat_interleave(group, 1).to(q.dtype), values.repeat_interleave(group, 1).to(q.dtype)
    qt = q.transpose(1, 2)
    if start == 0:
        out = F.scaled_dot_product_attention(qt, keys, values, is_causal=True, scale=scale)
    else:  # query i sits at position start + i and sees keys 0..start+i
        mask = causal_lower_right(T, start + T)
        out = F.scaled_dot_product_attention(qt, keys, values, attn_mask=mask, scale=scale)
    return out.transpose(1, 2)
