"""Decode attention for one query token per sequence over a static key/value buffer.

The kernel is chosen here and only here: the Triton split-K kernel (triton_decode.py) on CUDA once
it has passed a self-test on its first use, else `decode_attention_torch`. Both are tested against
`decode_attention_reference` (SDPA over the valid keys).
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

KV_CHUNK = 128  # decode attention splits the key axis into chunks of this many positions


def padded_len(max_seq_len: int) -> int:
    """Buffer length: max_seq_len rounded up to KV_CHUNK so decode can view the values as chunks."""
    return -(-max_seq_len // KV_CHUNK) * KV_CHUNK


def invalid_positions(buffer_len: int, length: torch.Tensor) -> torch.Tensor:
    """Bool [buffer_len]: True at positions >= length (a 0-dim device tensor); shared by all layers of a step."""
    return torch.arange(buffer_len, device=length.device) >= length


DECODE_BACKENDS = ("auto", "triton", "torch")
_backend = {"name": os.environ.get("AVENGERS_DECODE_ATTN", "auto"), "verified": {}, "used": set()}


def set_decode_backend(name: str) -> None:
    """auto: the Triton kernel on CUDA when it passes a self-test on first use, else torch."""
    if name not in DECODE_BACKENDS:
        raise ValueError(f"decode attention backend must be one of {DECODE_BACKENDS}, got {name!r}")
    _backend["name"] = name


def decode_backends_used() -> list[str]:
    return sorted(_backend["used"])


def decode_attention(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    length: torch.Tensor,
    scale: float | None = None,
    invalid: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query token per sequence over a static key/value buffer; graph-capturable.

    q [B, H, d]; k_buf, v_buf [B, H_kv, S, d] with S a multiple of KV_CHUNK; keys [0, length) are
    valid, length a 0-dim long device tensor; scale defaults to 1/sqrt(d) as in SDPA; `invalid`
    (invalid_positions, optional) saves the torch path recomputing the mask in every layer.
    Chooses the Triton kernel (triton_decode.py) or decode_attention_torch; both are tested
    against decode_attention_reference.
    """
    if _use_triton(q, k_buf):
        from avengers.inference.triton_decode import decode_attention_triton

        _backend["used"].add("triton")
        return decode_attention_triton(q, k_buf, v_buf, length, scale)
    _backend["used"].add("torch")
    return decode_attention_torch(q, k_buf, v_buf, length if invalid is None else invalid, scale)


def _use_triton(q: torch.Tensor, k_buf: torch.Tensor) -> bool:
    name = _backend["name"]
    if name == "torch" or not q.is_cuda:
        return False
    try:
        from avengers.inference.triton_decode import supported
    except ImportError:
        if name == "triton":
            raise
        return False
    if not supported(q, k_buf):
        if name == "triton":
            raise ValueError(f"Triton decode attention does not support q {tuple(q.shape)} {q.dtype}")
        return False
    key = (q.device, q.dtype, q.shape[-1], q.shape[1] // k_buf.shape[1])
    if key not in _backend["verified"]:
        if torch.cuda.is_current_stream_capturing():
            return False  # a self-test cannot run inside a graph capture
        _backend["verified"][key] = _self_test(*key) if name == "auto" else True
    return _backend["verified"][key]


def _self_test(device: torch.device, dtype: torch.dtype, d: int, group: int) -> bool:
    """The Triton kernel against the torch path on random data; False (with a warning) on any failure."""
    from avengers.inference.triton_decode import decode_attention_triton

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
