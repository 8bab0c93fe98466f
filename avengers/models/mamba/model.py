"""Mamba-2 and hybrid Mamba-2/attention language models with mamba_ssm's parameter layout.

State-dict keys and shapes equal mamba_ssm's `MambaLMHeadModel` (2.3.x) for the same config, so
checkpoints move both ways (io.py). Kernels come from kernels.py: mamba_ssm's Triton kernels on
CUDA, pure torch elsewhere. Hybrid attention layers are mamba_ssm's MHA parameters run through
torch SDPA with partial RoPE. Decode (the cache and the one-token step) is avengers.decode.mamba.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from avengers.decode.attention import cached_attention
from avengers.decode.cache import InferenceCache
from avengers.decode.mamba import (
    AttentionState,
    MambaState,
    allocate_cache,
    conv_with_state,
    forward_with_cache,
    mixer_step,
)
from avengers.decode.options import DecodeOptions
from avengers.models.mamba.config import MambaConfig
from avengers.models.mamba.kernels import REFERENCE, Kernels, select_kernels
from avengers.ops.loss import linear_cross_entropy
from avengers.ops.rope import rope_cos_sin, rotate_half


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))


class Mamba2Mixer(nn.Module):
    """mamba_ssm's Mamba2 parameters: in_proj -> [z, xBC, dt]; conv1d; SSD; gated RMSNorm; out_proj."""

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.cfg = cfg
        d_in_proj = 2 * cfg.d_inner + 2 * cfg.ngroups * cfg.d_state + cfg.nheads
        self.in_proj = nn.Linear(cfg.d_model, d_in_proj, bias=False)
        self.conv1d = nn.Conv1d(cfg.conv_dim, cfg.conv_dim, cfg.d_conv, groups=cfg.conv_dim, padding=cfg.d_conv - 1)
        self.dt_bias = nn.Parameter(torch.empty(cfg.nheads))
        self.A_log = nn.Parameter(torch.empty(cfg.nheads))
        self.D = nn.Parameter(torch.ones(cfg.nheads))
        self.norm = RMSNorm(cfg.d_inner, eps=1e-5)
        self.out_proj = nn.Linear(cfg.d_inner, cfg.d_model, bias=False)

    @torch.no_grad()
    def init_ssm_parameters(self) -> None:
        """dt_bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max]; A = -uniform(A_init_range); D = 1.

        In-place ops on the parameters themselves, so this also works on FSDP2-sharded DTensors.
        """
        cfg = self.cfg
        lo, hi = math.log(cfg.dt_min), math.log(cfg.dt_max)
        dt = self.dt_bias
        dt.uniform_(0, 1).mul_(hi - lo).add_(lo).exp_().clamp_(min=cfg.dt_init_floor)
        dt.add_(torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_log.uniform_(*cfg.A_init_range).log_()
        self.D.fill_(1.0)

    def forward(
        self, u: torch.Tensor, k: Kernels, state: MambaState | None = None, cache: InferenceCache | None = None
    ) -> torch.Tensor:
        return self.out_proj(self.core(self.in_proj(u), k, state, cache))

    def core(
        self, zxbcdt: torch.Tensor, k: Kernels, state: MambaState | None = None, cache: InferenceCache | None = None
    ) -> torch.Tensor:
        """Between the projections: in_proj's output [b, T, d_in_proj] -> out_proj's input [b, T, d_inner]."""
        cfg = self.cfg
        b, T, _ = zxbcdt.shape
        z, xBC, dt = torch.split(zxbcdt, [cfg.d_inner, cfg.conv_dim, cfg.nheads], dim=-1)
        if state is not None and T == 1:
            y = mixer_step(self, xBC, dt, k, state, cache.options)
        else:
            A = -torch.exp(self.A_log.float())
            if state is None:
                xBC = k.causal_conv(xBC.transpose(1, 2), self.conv1d.weight, self.conv1d.bias, True).transpose(1, 2)
            else:
                xBC = conv_with_state(xBC, state.conv, self.conv1d.weight, self.conv1d.bias, silu=True)
            x, B, C = torch.split(xBC, [cfg.d_inner, cfg.ngroups * cfg.d_state, cfg.ngroups * cfg.d_state], dim=-1)
            x = x.reshape(b, T, cfg.nheads, cfg.headdim)
            B, C = B.reshape(b, T, cfg.ngroups, cfg.d_state), C.reshape(b, T, cfg.ngroups, cfg.d_state)
            initial = state.ssm.float() if state is not None and cache is not None and cache.seq_len > 0 else None
            y, final = k.ssd(
                x,
                dt,
                A,
                B,
                C,
                cfg.chunk_size,
                self.D,
                self.dt_bias,
                initial_state=initial,
                return_final=state is not None,
            )
            if state is not None:
                state.ssm.copy_(final)
        group = cfg.d_inner // cfg.ngroups
        return k.gated_rmsnorm(y.reshape(b, T, cfg.d_inner), z, self.norm.weight, self.norm.eps, group)


class Attention(nn.Module):
    """mamba_ssm's MHA parameters (in_proj = [q | k | v], optional conv1d, out_proj), run with torch SDPA."""

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.cfg = cfg
        self.heads, self.kv_heads, self.head_dim = cfg.attn_num_heads, cfg.kv_heads, cfg.head_dim
        qkv_dim = self.head_dim * (self.heads + 2 * self.kv_heads)
        self.in_proj = nn.Linear(cfg.d_model, qkv_dim, bias=cfg.attn_qkv_bias)
        if cfg.attn_d_conv > 0:
            self.conv1d = nn.Conv1d(qkv_dim, qkv_dim, cfg.attn_d_conv, groups=qkv_dim, padding=cfg.attn_d_conv - 1)
        self.out_proj = nn.Linear(self.heads * self.head_dim, cfg.d_model, bias=cfg.attn_out_bias)

    def forward(
        self, x: torch.Tensor, k: Kernels, state: AttentionState | None = None, cache: InferenceCache | None = None
    ) -> torch.Tensor:
        return self.out_proj(self.core(self.in_proj(x), k, state, cache))

    def core(
        self, qkv: torch.Tensor, k: Kernels, state: AttentionState | None = None, cache: InferenceCache | None = None
    ) -> torch.Tensor:
        """Between the projections: in_proj's output [b, T, qkv_dim] -> out_proj's input [b, T, heads * d]."""
        cfg = self.cfg
        b, T, _ = qkv.shape
        if cfg.attn_d_conv > 0:
            if state is None:
                qkv = k.causal_conv(qkv.transpose(1, 2), self.conv1d.weight, self.conv1d.bias, False).transpose(1, 2)
            else:
                qkv = conv_with_state(qkv, state.conv, self.conv1d.weight, self.conv1d.bias, silu=False)
        hq, hk = self.heads * self.head_dim, self.kv_heads * self.head_dim
        q, key, v = torch.split(qkv, [hq, hk, hk], dim=-1)
        q = q.reshape(b, T, self.heads, self.head_dim)
        key, v = key.reshape(b, T, self.kv_heads, self.head_dim), v.reshape(b, T, self.kv_heads, self.head_dim)
        if cfg.attn_rotary_emb_dim > 0:
            if state is None:
                positions = torch.arange(T, device=qkv.device)
            elif T == 1:  # read from the device so a decode step can be graph-captured
                positions = cache.position.view(1)
            else:
                positions = torch.arange(cache.seq_len, cache.seq_len + T, device=qkv.device)
            cos, sin = rope_cos_sin(positions, cfg.attn_rotary_emb_dim, cfg.attn_rotary_emb_base)
            q, key = rotate_half(q, cos, sin), rotate_half(key, cos, sin)
        if state is not None:
            position = cache.position if T == 1 else None
            out = cached_attention(q, key, v, state, cache.seq_len, position, backend=cache.options.attention)
        else:
            q, key, v = q.transpose(1, 2), key.transpose(1, 2), v.transpose(1, 2)  # [b, heads, T, d]
            group = self.heads // self.kv_heads
            if group > 1:
                key, v = key.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            out = F.scaled_dot_product_attention(q, key, v, is_causal=True).transpose(1, 2)
        return out.reshape(b, T, hq)


class GatedMLP(nn.Module):
    """mamba_ssm's GatedMLP: fc1 -> [value | gate], value * silu(gate), fc2."""

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.d_model, 2 * cfg.mlp_hidden, bias=False)
        self.fc2 = nn.Linear(cfg.mlp_hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(value * F.silu(gate))


class MambaBlock(nn.Module):
    """One residual block (the unit of FSDP sharding, checkpointing and compile).

    forward(hidden, residual) -> (hidden, residual) as mamba_ssm's Block: the residual stream is the
    running sum (kept in fp32 with residual_in_fp32) and `hidden` the last sublayer's output, so the
    add and the next RMSNorm fuse into one kernel.
    """

    # FSDP2's mixed precision would cast the fp32 residual to bf16 at every block boundary
    # (avengers.train.parallel reads this); the block casts what its kernels need itself.
    fsdp_cast_forward_inputs = False

    def __init__(self, cfg: MambaConfig, layer_idx: int):
        super().__init__()
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.norm = RMSNorm(cfg.d_model, cfg.norm_epsilon)
        self.mixer = Attention(cfg) if layer_idx in cfg.attn_layer_idx else Mamba2Mixer(cfg)
        if cfg.d_intermediate > 0:
            self.norm2 = RMSNorm(cfg.d_model, cfg.norm_epsilon)
            self.mlp = GatedMLP(cfg)
        else:
            self.mlp = None

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None = None,
        state=None,
        cache: InferenceCache | None = None,
        kernels: Kernels | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The model passes `kernels` in, so a compiled block never traces the selection itself.
        k = kernels or select_kernels(hidden.device, self.cfg.kernels)
        if k.for_compile is not None and torch.compiler.is_compiling():
            k = k.for_compile
        add_norm = k.add_rmsnorm if self.cfg.fused_add_norm else REFERENCE.add_rmsnorm
        fp32 = self.cfg.residual_in_fp32
        hidden, residual = add_norm(hidden, residual, self.norm.weight, self.norm.eps, fp32)
        hidden = self.mixer(hidden, k, state, cache)
        if self.mlp is not None:
            hidden, residual = add_norm(hidden, residual, self.norm2.weight, self.norm2.eps, fp32)
            hidden = self.mlp(hidden)
        return hidden, residual


class MixerModel(nn.Module):
    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.embedding = nn.Embedding(cfg.padded_vocab, cfg.d_model)
        self.layers = nn.ModuleList(MambaBlock(cfg, i) for i in range(cfg.n_layer))
        self.norm_f = RMSNorm(cfg.d_model, cfg.norm_epsilon)


class MambaLM(nn.Module):
    """mamba_ssm MambaLMHeadModel's layout (backbone.*, lm_head) with the workshop's model contract."""

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.config = cfg
        self.backbone = MixerModel(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.padded_vocab, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """mamba_ssm's init: default Linear/Conv1d init with zero Linear biases, SSM parameters from
        their ranges, N(0, 0.02) embeddings, out_proj/fc2 scaled by 1/sqrt(residuals per layer * n_layer)."""
        cfg = self.config
        if cfg.tie_embeddings and self.lm_head.weight is not self.backbone.embedding.weight:
            self.lm_head.weight = self.backbone.embedding.weight  # to_empty() may have untied them
        for name, m in self.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv1d)) and not (cfg.tie_embeddings and m is self.lm_head):
                m.reset_parameters()
                if isinstance(m, nn.Linear) and m.bias is not None:
                    m.bias.zero_()
                if name.endswith(("out_proj", "fc2")):
                    m.weight.div_(math.sqrt((2 if cfg.d_intermediate > 0 else 1) * cfg.n_layer))
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)
            elif isinstance(m, Mamba2Mixer):
                m.init_ssm_parameters()
        nn.init.normal_(self.backbone.embedding.weight, std=0.02)

    def forward(
        self, input_ids: torch.Tensor, cache: InferenceCache | None = None, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        k = select_kernels(input_ids.device, self.config.kernels)
        if cache is not None:
            return forward_with_cache(self, input_ids, cache, k)
        hidden, residual = self.backbone.embedding(input_ids), None
        for layer in self.backbone.layers:
            hidden, residual = layer(hidden, residual, kernels=k)
        if labels is not None:  # the training loss, without the [tokens, vocab] logits
            return linear_cross_entropy(self.final_norm(hidden, residual, k), self.lm_head.weight, labels)
        return self.logits(hidden, residual, k)

    def final_norm(self, hidden: torch.Tensor, residual: torch.Tensor | None, k: Kernels) -> torch.Tensor:
        """The last residual add and the final RMSNorm."""
        add_norm = k.add_rmsnorm if self.config.fused_add_norm else REFERENCE.add_rmsnorm
        norm_f = self.backbone.norm_f
        return add_norm(hidden, residual, norm_f.weight, norm_f.eps, self.config.residual_in_fp32)[0]

    def logits(self, hidden: torch.Tensor, residual: torch.Tensor | None, k: Kernels) -> torch.Tensor:
        """The last residual add, the final RMSNorm and the LM head."""
        return self.lm_head(self.final_norm(hidden, residual, k))

    def allocate_cache(
        self, batch_size: int, max_seq_len: int, device=None, dtype=None, options: DecodeOptions | None = None
    ) -> InferenceCache:
        return allocate_cache(self, batch_size, max_seq_len, device, dtype, options)
