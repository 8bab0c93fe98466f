"""One Llama block for one token, as two pure functions around the attention read.

A decode step at batch 1 is a chain of small kernels (norms, RoPE, SiLU, residual adds) between
the weight matmuls; on a 1-2B model their launch and tail time is comparable to the time spent
reading the weights. `decode_pre` (RMSNorm, QKV, RoPE) and `decode_post` (output projection,
residual, RMSNorm, SwiGLU MLP, residual) take the weights as arguments, so one torch.compile'd
graph serves every layer (the `compile` path); the key/value write and the attention kernel stay
outside (an in-place write inside a compiled function could become a copy of the whole cache).
The `triton` path runs them as the fused GEMVs of kernels/triton_gemv.py. The per-module path in
llama.py is the reference the tests compare both against.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from avengers.decode.options import DecodeOptions
from avengers.ops.rope import rotate_pairs


def is_plain_rms_norm(norm: nn.Module) -> bool:
    """An ibm-fms LayerNormParameterized that is RMSNorm with a gain and no shift."""
    return not norm.use_mean and norm.elementwise_scale and not norm.elementwise_shift


def eligible(layer: nn.Module) -> bool:
    """The block has the layout the pure functions assume (fused weights, no biases, SiLU, RMSNorm)."""
    attn, ff = layer.attn, layer.ff_sub_layer
    norms_ok = is_plain_rms_norm(layer.ln) and is_plain_rms_norm(layer.ff_ln)
    return (
        norms_ok
        and hasattr(attn.in_proj, "qkv_fused")
        and getattr(ff, "wg1_fused", None) is not None
        and isinstance(ff.a, nn.SiLU)
        and attn.in_proj.qkv_fused.bias is None
        and attn.dense.bias is None
        and ff.wg1_fused.bias is None
        and ff.w2.bias is None
        and not getattr(ff, "p_dropout", 0)
    )


def decode_pre(
    h: torch.Tensor,
    ln_w: torch.Tensor,
    eps: float,
    qkv_w: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    H: int,
    Hkv: int,
    d: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h [B, 1, D] -> q [B, H, d] (rotated, pre-scaled), k, v [B, H_kv, 1, d]; cos/sin [H + H_kv, d/2]."""
    B = h.shape[0]
    qkv = F.linear(F.rms_norm(h, (h.shape[-1],), ln_w, eps), qkv_w).reshape(B, -1)
    qk = qkv[:, : (H + Hkv) * d].reshape(B, H + Hkv, d).float()
    rot = rotate_pairs(qk, cos, sin).to(h.dtype)
    return rot[:, :H], rot[:, H:].unsqueeze(2), qkv[:, (H + Hkv) * d :].reshape(B, Hkv, 1, d)


def decode_post(
    h: torch.Tensor,
    attn: torch.Tensor,
    dense_w: torch.Tensor,
    ln_w: torch.Tensor,
    eps: float,
    wg1_w: torch.Tensor,
    w2_w: torch.Tensor,
    hidden: int,
) -> torch.Tensor:
    """Residual + attention output projection, then the gated MLP block (ibm-fms order: wg, then w1)."""
    h = h + F.linear(attn, dense_w)
    wg, w1 = F.linear(F.rms_norm(h, (h.shape[-1],), ln_w, eps), wg1_w).split(hidden, dim=-1)
    return h + F.linear(F.silu(wg) * w1, w2_w)


@functools.cache
def _torch_functions(compiled: bool):
    """(pre_write, post) from the torch functions, plain or torch.compile'd (built once, dynamic
    shapes); the cache write stays outside the compiled graph."""
    pre, post = decode_pre, decode_post
    if compiled:
        pre = torch.compile(decode_pre, dynamic=True, fullgraph=True)
        post = torch.compile(decode_post, dynamic=True, fullgraph=True)

    def pre_write(*args, state, position):
        q, k, v = pre(*args)
        state.write_at(k, v, position)
        return q

    return pre_write, post


def functions(options: DecodeOptions, batch_size: int):
    """(pre_write, post) for the path: pre_write(h, ln_w, eps, qkv_w, cos, sin, H, H_kv, d, state,
    position) -> q also writes the token's key/value into the cache."""
    if options.gemv_step(batch_size):
        from avengers.decode.kernels import triton_gemv

        return triton_gemv.decode_pre_write, triton_gemv.decode_post
    return _torch_functions(options.compiled_cores)


def decode_block(
    layer: nn.Module,
    h: torch.Tensor,
    state,
    position: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    attention,
    options: DecodeOptions,
) -> torch.Tensor:
    """One Llama block for one token; `attention(q [B, H, d]) -> [B, H, d]` reads the updated cache.
    cos/sin [H + H_kv, d/2], fp32 and contiguous."""
    attn = layer.attn
    pre_write, post = functions(options, h.shape[0])
    q = pre_write(
        h,
        layer.ln.weight,
        layer.ln.eps,
        attn.in_proj.qkv_fused.weight,
        cos,
        sin,
        attn.nheads,
        attn.kvheads,
        attn.emb_kq_per_head,
        state=state,
        position=position,
    )
    return block_post(layer, h, attention(q).reshape(h.shape[0], 1, -1), post)


def block_post(layer: nn.Module, h: torch.Tensor, attn_out: torch.Tensor, post=decode_post) -> torch.Tensor:
    """The block after its attention: `post` (decode_post or its Triton GEMVs) with the layer's weights."""
    ff = layer.ff_sub_layer
    return post(
        h,
        attn_out,
        layer.attn.dense.weight,
        layer.ff_ln.weight,
        layer.ff_ln.eps,
        ff.wg1_fused.weight,
        ff.w2.weight,
        ff.hidden_dim,
    )


def decode_head(norm: nn.Module, head: nn.Linear, h: torch.Tensor, options: DecodeOptions) -> torch.Tensor | None:
    """Final RMSNorm + LM head of a decode step as one Triton GEMV (GEMV steps, plain RMSNorm,
    bias-free head); None where the caller's own path applies."""
    B = h.shape[0]
    if not options.gemv_step(B) or head.bias is not None or not is_plain_rms_norm(norm):
        return None
    from avengers.decode.kernels import triton_gemv

    return triton_gemv.gemv(h.reshape(B, -1), head.weight, norm_weight=norm.weight, eps=norm.eps).view(B, 1, -1)
