"""Mamba-2 and hybrid decode: per-layer state, the one-token mixer step, the cached forward.

A Mamba-2 layer's state is constant: the last d_conv conv inputs and the SSM state [h, p, n] in
fp32 (MambaState). Hybrid attention layers keep a KVState (plus their q/k/v conv window) and read
it through decode.attention.cached_attention. At batch 1 the `triton` path runs every projection
as a Triton GEMV with its RMSNorm, SwiGLU or residual add fused in (gemv_step).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from avengers.decode.cache import InferenceCache, KVState, allocation_target, tensor_bytes
from avengers.decode.options import DecodeOptions


class MambaState:
    """One Mamba-2 layer's constant decode state: the last d_conv conv inputs (in the model's dtype)
    and the SSM state (fp32 unless ssm_dtype says otherwise: DecodeOptions.ssm_state)."""

    def __init__(self, batch_size: int, cfg, device=None, dtype=None, ssm_dtype: torch.dtype = torch.float32):
        self.conv = torch.zeros(batch_size, cfg.conv_dim, cfg.d_conv, device=device, dtype=dtype)
        self.ssm = torch.zeros(batch_size, cfg.nheads, cfg.headdim, cfg.d_state, device=device, dtype=ssm_dtype)

    def nbytes_written_per_step(self) -> int:
        """A recurrent state is rewritten whole every step."""
        return tensor_bytes((self.conv, self.ssm))


class AttentionState(KVState):
    """KV buffers (padded to KV_CHUNK for split-K decode) plus, with attn_d_conv, the q/k/v conv inputs."""

    def __init__(self, batch_size: int, cfg, max_seq_len: int, device=None, dtype=None):
        super().__init__(batch_size, cfg.kv_heads, max_seq_len, cfg.head_dim, device=device, dtype=dtype)
        qkv_dim = cfg.head_dim * (cfg.attn_num_heads + 2 * cfg.kv_heads)
        self.conv = (
            torch.zeros(batch_size, qkv_dim, cfg.attn_d_conv, device=device, dtype=dtype)
            if cfg.attn_d_conv > 0
            else None
        )


def conv_with_state(
    x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool
) -> torch.Tensor:
    """Causal depthwise conv of x [B, T, D] continuing from conv_state [B, D, w] (updated in place)."""
    w = weight.shape[-1]
    full = torch.cat([conv_state[..., 1:].to(x.dtype), x.transpose(1, 2)], dim=-1)  # [B, D, w-1+T]
    conv_state.copy_(full[..., -w:])
    out = F.conv1d(full, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), groups=weight.shape[0])
    return (F.silu(out) if silu else out).transpose(1, 2)


def conv_step(
    conv_state: torch.Tensor, xBC: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, A_log: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A decode step's elementwise work before the SSM update: the conv window conv_state [B, C, W]
    shifted by the token's xBC [B, 1, C] (in place), its depthwise dot with weight [C, 1, W] + bias,
    SiLU -> [B, 1, C]; and A = -exp(A_log). Plain torch, so one torch.compile fuses it for all layers."""
    conv_state.copy_(torch.cat([conv_state[..., 1:], xBC.transpose(1, 2).to(conv_state.dtype)], dim=-1))
    out = (conv_state * weight.squeeze(1)).sum(-1) + bias
    return F.silu(out).to(xBC.dtype).unsqueeze(1), -torch.exp(A_log.float())


@functools.cache
def compiled_conv_step():
    """conv_step through torch.compile, on the `compile` and `triton` decode paths."""
    return torch.compile(conv_step, fullgraph=True)


def mixer_step(
    mixer: nn.Module, xBC: torch.Tensor, dt: torch.Tensor, k, state: MambaState, compiled: bool
) -> torch.Tensor:
    """A Mamba2Mixer's one-token step between in_proj's split and the gated norm: xBC [b, 1, conv_dim],
    raw dt [b, 1, h] -> y [b, 1, h, p]; the conv window and SSM state are updated in place."""
    cfg = mixer.cfg
    b = xBC.shape[0]
    step = compiled_conv_step() if compiled else conv_step
    xBC, A = step(state.conv, xBC, mixer.conv1d.weight, mixer.conv1d.bias, mixer.A_log)
    x, B, C = torch.split(xBC[:, 0], [cfg.d_inner, cfg.ngroups * cfg.d_state, cfg.ngroups * cfg.d_state], dim=-1)
    x = x.reshape(b, cfg.nheads, cfg.headdim)
    B, C = B.reshape(b, cfg.ngroups, cfg.d_state), C.reshape(b, cfg.ngroups, cfg.d_state)
    return k.ssd_step(state.ssm, x, dt[:, 0], A, B, C, mixer.D, mixer.dt_bias).unsqueeze(1)


def allocate_cache(
    model: nn.Module,
    batch_size: int,
    max_seq_len: int,
    device=None,
    dtype=None,
    options: DecodeOptions | None = None,
) -> InferenceCache:
    """Per layer: MambaState (constant size) or AttentionState (a KVState growing with max_seq_len)."""
    device, dtype = allocation_target(model, batch_size, max_seq_len, device, dtype)
    options = (options or DecodeOptions()).resolve("mamba", device)
    ssm_dtype = torch.float32 if options.ssm_state == "fp32" else dtype
    cfg = model.config
    layers = [
        AttentionState(batch_size, cfg, max_seq_len, device=device, dtype=dtype)
        if i in cfg.attn_layer_idx
        else MambaState(batch_size, cfg, device=device, dtype=dtype, ssm_dtype=ssm_dtype)
        for i in range(cfg.n_layer)
    ]
    return InferenceCache(layers, batch_size, max_seq_len, options)


def forward_with_cache(model: nn.Module, input_ids: torch.Tensor, cache: InferenceCache, k) -> torch.Tensor:
    """Consume input_ids [B, T] at positions cache.seq_len.. (prefill or decode) with kernels k."""
    cache.check_tokens(input_ids)
    T = input_ids.shape[1]
    hidden = model.backbone.embedding(input_ids)
    if T == 1 and cache.options.gemv_step(input_ids.shape[0]) and _gemv_layout(model):
        logits = gemv_step(model, hidden, cache, k)
    else:
        residual = None
        for layer, state in zip(model.backbone.layers, cache.layers):
            hidden, residual = layer(hidden, residual, state, cache, k)
        logits = model.logits(hidden, residual, k)
    cache.advance(T)
    return logits


def _gemv_layout(model: nn.Module) -> bool:
    """Blocks whose projections have no biases (GatedMLP's never do; attention's may); checked once."""
    if not hasattr(model, "_mamba_gemv_layout"):
        model._mamba_gemv_layout = all(
            layer.mixer.in_proj.bias is None and layer.mixer.out_proj.bias is None for layer in model.backbone.layers
        )
    return model._mamba_gemv_layout


def gemv_step(model: nn.Module, hidden: torch.Tensor, cache: InferenceCache, k) -> torch.Tensor:
    """One decode step with the residual stream kept whole in fp32: per block RMSNorm + in_proj
    as one Triton GEMV, the mixer's core (Mamba-2 or attention), out_proj + residual add as one
    GEMV, and where the block has a gated MLP, RMSNorm + fc1 + SwiGLU and fc2 + residual as two
    more; the final norm and the LM head as one GEMV (triton_gemv.py). The same maths as the
    block protocol's (hidden, residual) pair, which add_rmsnorm sums before every norm."""
    from avengers.decode.kernels import triton_gemv

    B = hidden.shape[0]
    h = hidden.reshape(B, -1).float()
    for layer, state in zip(model.backbone.layers, cache.layers):
        mixer = layer.mixer
        projected = triton_gemv.gemv(
            h, mixer.in_proj.weight, norm_weight=layer.norm.weight, eps=layer.norm.eps, out_dtype=hidden.dtype
        )
        y = mixer.core(projected.unsqueeze(1), k, state, cache)
        h = triton_gemv.gemv(y.reshape(B, -1), mixer.out_proj.weight, residual=h, out_dtype=torch.float32)
        if layer.mlp is not None:
            act = triton_gemv.gemv(
                h,
                layer.mlp.fc1.weight,
                norm_weight=layer.norm2.weight,
                eps=layer.norm2.eps,
                swiglu=True,
                gate_last=True,
                out_dtype=hidden.dtype,
            )
            h = triton_gemv.gemv(act, layer.mlp.fc2.weight, residual=h, out_dtype=torch.float32)
    norm_f = model.backbone.norm_f
    logits = triton_gemv.gemv(
        h, model.lm_head.weight, norm_weight=norm_f.weight, eps=norm_f.eps, out_dtype=hidden.dtype
    )
    return logits.unsqueeze(1)
