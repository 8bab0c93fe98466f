"""Mamba-2 and hybrid decode: per-layer state, the one-token mixer step, the cached forward.

A Mamba-2 layer's state is constant: the last d_conv conv inputs and the SSM state [h, p, n] in
fp32 (MambaState). Hybrid attention layers keep a KVState (plus their q/k/v conv window) and read
it through decode.attention.cached_attention. At batch 1 the `triton` path runs every projection
as a Triton GEMV with its RMSNorm, SwiGLU or residual add fused in (gemv_step), and a Mamba-2
layer is three kernels: in_proj with the conv step, the state update, out_proj with the gated norm,
and a hybrid attention layer five (attention_layer_step).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from avengers.decode.cache import InferenceCache, KVState, allocation_target, tensor_bytes
from avengers.decode.options import DecodeOptions
from avengers.ops.rope import rope_cos_sin


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
    """conv_step through torch.compile, on the `compile` decode path."""
    return torch.compile(conv_step, fullgraph=True)


def mixer_step(
    mixer: nn.Module, xBC: torch.Tensor, dt: torch.Tensor, k, state: MambaState, options: DecodeOptions
) -> torch.Tensor:
    """A Mamba2Mixer's one-token step between in_proj's split and the gated norm: xBC [b, 1, conv_dim],
    raw dt [b, 1, h] -> y [b, 1, h, p]; the conv window and SSM state are updated in place. The
    Triton paths run it as two kernels (conv step, state update taking A_log)."""
    cfg = mixer.cfg
    b = xBC.shape[0]
    if options.triton_kernels:
        from avengers.decode.kernels.triton_mamba_step import conv_step as triton_conv_step
        from avengers.models.mamba.ssd_step_triton import triton_ssd_step

        xBC = triton_conv_step(state.conv, xBC[:, 0], mixer.conv1d.weight, mixer.conv1d.bias)
        A, ssd_step = mixer.A_log, functools.partial(triton_ssd_step, a_log=True)
    else:
        step = compiled_conv_step() if options.compiled_cores else conv_step
        xBC, A = step(state.conv, xBC, mixer.conv1d.weight, mixer.conv1d.bias, mixer.A_log)
        xBC, ssd_step = xBC[:, 0], k.ssd_step
    x, B, C = torch.split(xBC, [cfg.d_inner, cfg.ngroups * cfg.d_state, cfg.ngroups * cfg.d_state], dim=-1)
    x = x.reshape(b, cfg.nheads, cfg.headdim)
    B, C = B.reshape(b, cfg.ngroups, cfg.d_state), C.reshape(b, cfg.ngroups, cfg.d_state)
    return ssd_step(state.ssm, x, dt[:, 0], A, B, C, mixer.D, mixer.dt_bias).unsqueeze(1)


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
    more; the final norm and the LM head as one GEMV (triton_gemv.py). A Mamba-2 layer whose gated
    norm spans the whole row (one B/C group) takes mamba_layer_step instead. The same maths as the
    block protocol's (hidden, residual) pair, which add_rmsnorm sums before every norm."""
    from avengers.decode.kernels import triton_gemv

    B = hidden.shape[0]
    h = hidden.reshape(B, -1).float()
    cfg = model.config
    rope, length = (None, None), None
    if cfg.attn_layer_idx:  # one position for every attention layer of the step
        length = cache.position + 1
        if cfg.attn_rotary_emb_dim > 0:
            rope = rope_cos_sin(cache.position.view(1), cfg.attn_rotary_emb_dim, cfg.attn_rotary_emb_base)
    for layer, state in zip(model.backbone.layers, cache.layers):
        mixer = layer.mixer
        if isinstance(state, MambaState) and mixer.cfg.ngroups == 1:
            h = mamba_layer_step(layer, h, state, hidden.dtype)
        elif isinstance(state, AttentionState) and not mixer.head_dim & (mixer.head_dim - 1):  # rope_write's tile
            h = attention_layer_step(layer, h, state, cache, rope, length, hidden.dtype)
        else:
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


def mamba_layer_step(layer: nn.Module, h: torch.Tensor, state: MambaState, dtype: torch.dtype) -> torch.Tensor:
    """A Mamba-2 block's mixer at batch <= 8 in three Triton kernels, on the fp32 residual stream h
    [B, d_model] -> h after the block's mixer: RMSNorm + in_proj with the conv step in its epilogue
    (triton_mamba_step), the SSM state update reading x, B, C and dt where in_proj wrote them
    (ssd_step_triton), and the gated RMSNorm (one group) + out_proj + residual add as one GEMV. The
    maths of in_proj, conv_step, ssd_step, gated_rmsnorm and out_proj (mixer_step's path)."""
    from avengers.decode.kernels import triton_gemv
    from avengers.models.mamba.ssd_step_triton import triton_ssd_step

    mixer, cfg = layer.mixer, layer.mixer.cfg
    B = h.shape[0]
    zxbcdt = _in_proj_conv(layer, h, state, dtype, conv_start=cfg.d_inner)
    n = cfg.ngroups * cfg.d_state
    z, x, Bm, Cm, dt = torch.split(zxbcdt, [cfg.d_inner, cfg.d_inner, n, n, cfg.nheads], dim=-1)
    y = triton_ssd_step(
        state.ssm,
        x.view(B, cfg.nheads, cfg.headdim),
        dt,
        mixer.A_log,
        Bm.view(B, cfg.ngroups, cfg.d_state),
        Cm.view(B, cfg.ngroups, cfg.d_state),
        mixer.D,
        mixer.dt_bias,
        a_log=True,
    )
    return triton_gemv.gemv(
        y.view(B, cfg.d_inner),
        mixer.out_proj.weight,
        norm_weight=mixer.norm.weight,
        eps=mixer.norm.eps,
        gate=z,
        residual=h,
        out_dtype=torch.float32,
    )


def attention_layer_step(
    layer: nn.Module,
    h: torch.Tensor,
    state: AttentionState,
    cache: InferenceCache,
    rope,
    length: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """A hybrid attention block's mixer at batch <= 8 on the fp32 residual stream h [B, d_model]:
    RMSNorm + in_proj (with the q/k/v conv step in its epilogue where the layer has one), RoPE and
    the cache write (triton_mamba_step.rope_write; rope = rope_cos_sin at the step's position, or
    (None, None)), decode attention over the first `length` (the position + 1) keys, out_proj +
    residual. Attention.core's maths."""
    from avengers.decode.attention import decode_attention
    from avengers.decode.kernels import triton_gemv, triton_mamba_step

    mixer = layer.mixer
    B = h.shape[0]
    if mixer.cfg.attn_d_conv > 0:
        qkv = _in_proj_conv(layer, h, state, dtype, conv_start=0, silu=False)
    else:
        qkv = triton_gemv.gemv(
            h, mixer.in_proj.weight, norm_weight=layer.norm.weight, eps=layer.norm.eps, out_dtype=dtype
        )
    q = triton_mamba_step.rope_write(qkv, *rope, cache.position, mixer.heads, state)
    out = decode_attention(q, state.k, state.v, length, backend=cache.options.attention)
    return triton_gemv.gemv(out.to(dtype).reshape(B, -1), mixer.out_proj.weight, residual=h, out_dtype=torch.float32)


def _in_proj_conv(layer: nn.Module, h: torch.Tensor, state, dtype: torch.dtype, conv_start: int, silu: bool = True):
    """The block's RMSNorm + its mixer's in_proj, with the conv step of the columns from conv_start on."""
    from avengers.decode.kernels.triton_mamba_step import in_proj_conv

    m = layer.mixer
    return in_proj_conv(
        h, m.in_proj.weight, layer.norm.weight, layer.norm.eps, state.conv, m.conv1d.weight, m.conv1d.bias,
        conv_start=conv_start, out_dtype=dtype, silu=silu,
    )  # fmt: skip
