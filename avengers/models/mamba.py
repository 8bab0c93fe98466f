"""Mamba-2 and hybrid Mamba-2/attention language models with mamba_ssm's parameter layout.

State-dict keys and shapes equal mamba_ssm's `MambaLMHeadModel` (2.3.x) for the same config, so
checkpoints move both ways (`save_pretrained` / `from_pretrained` use its folder layout). Kernels
come from avengers.models.mamba_kernels: mamba_ssm's Triton kernels on CUDA, pure torch elsewhere.
Hybrid attention layers are mamba_ssm's MHA parameters run through torch SDPA with partial RoPE.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from avengers.inference.cache import InferenceCache
from avengers.inference.kv_cache import KVState, decode_attention, padded_len
from avengers.inference.llama_compiled import compiled_step_cores, triton_gemv_step
from avengers.models.mamba_kernels import KERNEL_MODES, REFERENCE, Kernels, select_kernels
from avengers.models.registry import ModelSpec, register
from avengers.models.rope import apply_rotary, rotary_cos_sin


@dataclass(frozen=True)
class MambaConfig:
    """mamba_ssm's MambaConfig flattened (ssm_cfg / attn_cfg fields carry ssm_ / attn_ prefixes)."""

    d_model: int = 2048
    n_layer: int = 48
    vocab_size: int = 128256
    d_intermediate: int = 0  # gated-MLP width after every mixer; 0 = no MLP
    # Mamba-2 mixer (mamba_ssm Mamba2 defaults)
    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    ngroups: int = 1
    chunk_size: int = 256
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    A_init_range: tuple[float, float] = (1.0, 16.0)
    # attention layers (mamba_ssm MHA)
    attn_layer_idx: tuple[int, ...] = ()
    attn_num_heads: int = 32
    attn_num_heads_kv: int | None = None  # None = num_heads (MHA)
    attn_head_dim: int | None = None  # None = d_model // num_heads
    attn_rotary_emb_dim: int = 0  # 0 = no RoPE; < head_dim = partial rotary
    attn_rotary_emb_base: float = 10000.0
    attn_d_conv: int = 0  # depthwise causal conv over q/k/v (no activation), as mamba_ssm's MHA
    attn_qkv_bias: bool = False
    attn_out_bias: bool = False
    # model
    norm_epsilon: float = 1e-5
    residual_in_fp32: bool = True
    fused_add_norm: bool = True  # use the fused add+RMSNorm kernel where mamba_ssm is available
    pad_vocab_size_multiple: int = 16
    tie_embeddings: bool = True
    kernels: str = "auto"  # auto | mamba_ssm | reference (avengers.models.mamba_kernels)

    def __post_init__(self) -> None:
        object.__setattr__(self, "attn_layer_idx", tuple(self.attn_layer_idx))
        object.__setattr__(self, "A_init_range", tuple(self.A_init_range))
        self.validate()

    def validate(self) -> None:
        def bad(name: str, value, accepted: str) -> ValueError:
            return ValueError(f"MambaConfig.{name}={value!r}: {accepted}")

        for name in (
            "d_model",
            "n_layer",
            "vocab_size",
            "d_state",
            "d_conv",
            "expand",
            "headdim",
            "ngroups",
            "chunk_size",
            "pad_vocab_size_multiple",
        ):
            if getattr(self, name) < 1:
                raise bad(name, getattr(self, name), "must be >= 1")
        if self.d_inner % self.headdim:
            raise bad("headdim", self.headdim, f"must divide expand * d_model = {self.d_inner}")
        if self.nheads % self.ngroups:
            raise bad("ngroups", self.ngroups, f"must divide the number of SSM heads {self.nheads}")
        if self.d_intermediate < 0:
            raise bad("d_intermediate", self.d_intermediate, "must be >= 0 (0 = no MLP)")
        if self.kernels not in KERNEL_MODES:
            raise bad("kernels", self.kernels, f"expected one of {KERNEL_MODES}")
        if not 0 < self.A_init_range[0] <= self.A_init_range[1]:
            raise bad("A_init_range", self.A_init_range, "must satisfy 0 < low <= high")
        if any(not 0 <= i < self.n_layer for i in self.attn_layer_idx) or len(set(self.attn_layer_idx)) != len(
            self.attn_layer_idx
        ):
            raise bad("attn_layer_idx", self.attn_layer_idx, f"must be distinct layer indices in [0, {self.n_layer})")
        if self.attn_layer_idx:
            kv = self.kv_heads
            if self.attn_num_heads < 1 or self.attn_num_heads % kv:
                raise bad(
                    "attn_num_heads_kv", self.attn_num_heads_kv, f"must divide attn_num_heads={self.attn_num_heads}"
                )
            if self.attn_head_dim is None and self.d_model % self.attn_num_heads:
                raise bad("attn_head_dim", None, f"None needs attn_num_heads to divide d_model={self.d_model}")
            r = self.attn_rotary_emb_dim
            if r < 0 or r % 2 or r > self.head_dim:
                raise bad("attn_rotary_emb_dim", r, f"must be 0 or an even number <= head_dim={self.head_dim}")
            if self.attn_d_conv < 0:
                raise bad("attn_d_conv", self.attn_d_conv, "must be >= 0")

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def nheads(self) -> int:
        return self.d_inner // self.headdim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.ngroups * self.d_state

    @property
    def kv_heads(self) -> int:
        return self.attn_num_heads_kv or self.attn_num_heads

    @property
    def head_dim(self) -> int:
        return self.attn_head_dim or self.d_model // self.attn_num_heads

    @property
    def padded_vocab(self) -> int:
        m = self.pad_vocab_size_multiple
        return -(-self.vocab_size // m) * m

    @property
    def mlp_hidden(self) -> int:
        """mamba_ssm GatedMLP rounds its hidden width up to a multiple of 128."""
        return -(-self.d_intermediate // 128) * 128

    # ---- mamba_ssm config.json -------------------------------------------------------------
    def to_mamba_ssm(self) -> dict:
        """The dict mamba_ssm's MambaConfig(**d) accepts (what its save_pretrained writes)."""
        attn = {}
        if self.attn_layer_idx:
            attn = dict(
                causal=True,
                num_heads=self.attn_num_heads,
                head_dim=self.head_dim,
                rotary_emb_dim=self.attn_rotary_emb_dim,
                rotary_emb_base=self.attn_rotary_emb_base,
                d_conv=self.attn_d_conv,
                qkv_proj_bias=self.attn_qkv_bias,
                out_proj_bias=self.attn_out_bias,
            )
            if self.attn_num_heads_kv is not None:
                attn["num_heads_kv"] = self.attn_num_heads_kv
        ssm = dict(
            layer="Mamba2",
            d_state=self.d_state,
            d_conv=self.d_conv,
            expand=self.expand,
            headdim=self.headdim,
            ngroups=self.ngroups,
            chunk_size=self.chunk_size,
            dt_min=self.dt_min,
            dt_max=self.dt_max,
            dt_init_floor=self.dt_init_floor,
            A_init_range=list(self.A_init_range),
        )
        return dict(
            d_model=self.d_model,
            d_intermediate=self.d_intermediate,
            n_layer=self.n_layer,
            vocab_size=self.vocab_size,
            ssm_cfg=ssm,
            attn_layer_idx=list(self.attn_layer_idx),
            attn_cfg=attn,
            rms_norm=True,
            residual_in_fp32=self.residual_in_fp32,
            fused_add_norm=self.fused_add_norm,
            pad_vocab_size_multiple=self.pad_vocab_size_multiple,
            tie_embeddings=self.tie_embeddings,
        )

    @classmethod
    def from_mamba_ssm(cls, d: dict, **overrides) -> MambaConfig:
        """Inverse of to_mamba_ssm. Missing keys take mamba_ssm's defaults (MambaConfig, Mamba2, MHA);
        settings this implementation does not run are refused by name."""
        d = {**_SSM_TOP_DEFAULTS, **d}
        ssm, attn = dict(d.pop("ssm_cfg") or {}), dict(d.pop("attn_cfg") or {})
        if ssm.pop("layer", "Mamba1") != "Mamba2":
            raise ValueError(f"ssm_cfg.layer must be 'Mamba2' (Mamba-1 is not supported), got ssm_cfg {ssm}")
        if not d.pop("rms_norm"):
            raise ValueError("rms_norm=False (LayerNorm blocks) is not supported")
        ssm.pop("use_mem_eff_path", None)  # a kernel choice, not part of the model
        odd = {k: ssm[k] for k in _MAMBA2_FIXED if k in ssm and _as_list(ssm[k]) != _as_list(_MAMBA2_FIXED[k])}
        odd.update({k: attn[k] for k in _MHA_FIXED if k in attn and attn[k] != _MHA_FIXED[k]})
        if odd:
            raise ValueError(f"settings {odd} are not supported; supported: Mamba2 {_MAMBA2_FIXED}, MHA {_MHA_FIXED}")
        ssm = {k: v for k, v in ssm.items() if k not in _MAMBA2_FIXED}
        attn = {k: v for k, v in attn.items() if k not in _MHA_FIXED}
        unknown = set(attn) - set(_MHA_RENAMED)
        if unknown:
            raise ValueError(f"attn_cfg keys {sorted(unknown)} are not supported; known: {sorted(_MHA_RENAMED)}")
        if attn:  # mamba_ssm's MHA has biases on by default, this dataclass off
            attn = {"qkv_proj_bias": True, "out_proj_bias": True, **attn}
        kwargs = {**d, **ssm, **{_MHA_RENAMED[k]: v for k, v in attn.items()}}
        unknown = set(kwargs) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"config keys {sorted(unknown)} are not MambaConfig fields")
        return cls(**{**kwargs, **overrides})


# mamba_ssm 2.3 MambaConfig defaults, and the Mamba2 / MHA settings this implementation fixes.
_SSM_TOP_DEFAULTS = dict(
    d_model=2560,
    d_intermediate=0,
    n_layer=64,
    vocab_size=50277,
    ssm_cfg={},
    attn_layer_idx=[],
    attn_cfg={},
    rms_norm=True,
    residual_in_fp32=True,
    fused_add_norm=True,
    pad_vocab_size_multiple=8,
    tie_embeddings=True,
)
_MAMBA2_FIXED = dict(
    rmsnorm=True,
    norm_before_gate=False,
    D_has_hdim=False,
    bias=False,
    conv_bias=True,
    d_ssm=None,
    dt_limit=(0.0, float("inf")),
    conv_init=None,
)
_MHA_FIXED = dict(causal=True, mlp_dim=0, rotary_emb_interleaved=False, softmax_scale=None)
_MHA_RENAMED = {
    "num_heads": "attn_num_heads",
    "num_heads_kv": "attn_num_heads_kv",
    "head_dim": "attn_head_dim",
    "rotary_emb_dim": "attn_rotary_emb_dim",
    "rotary_emb_base": "attn_rotary_emb_base",
    "d_conv": "attn_d_conv",
    "qkv_proj_bias": "attn_qkv_bias",
    "out_proj_bias": "attn_out_bias",
}


def _as_list(v):
    return list(v) if isinstance(v, (tuple, list)) else v


# ---- decode state --------------------------------------------------------------------------


class MambaState:
    """One Mamba-2 layer's constant decode state: the last d_conv conv inputs and the SSM state."""

    def __init__(self, batch_size: int, cfg: MambaConfig, device=None, dtype=None):
        self.conv = torch.zeros(batch_size, cfg.conv_dim, cfg.d_conv, device=device, dtype=dtype)
        self.ssm = torch.zeros(batch_size, cfg.nheads, cfg.headdim, cfg.d_state, device=device, dtype=torch.float32)


class AttentionState(KVState):
    """KV buffers (padded to KV_CHUNK for split-K decode) plus, with attn_d_conv, the q/k/v conv inputs."""

    def __init__(self, batch_size: int, cfg: MambaConfig, max_seq_len: int, device=None, dtype=None):
        super().__init__(batch_size, cfg.kv_heads, padded_len(max_seq_len), cfg.head_dim, device=device, dtype=dtype)
        qkv_dim = cfg.head_dim * (cfg.attn_num_heads + 2 * cfg.kv_heads)
        self.conv = (
            torch.zeros(batch_size, qkv_dim, cfg.attn_d_conv, device=device, dtype=dtype)
            if cfg.attn_d_conv > 0
            else None
        )


def _conv_with_state(
    x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool
) -> torch.Tensor:
    """Causal depthwise conv of x [B, T, D] continuing from conv_state [B, D, w] (updated in place)."""
    w = weight.shape[-1]
    full = torch.cat([conv_state[..., 1:].to(x.dtype), x.transpose(1, 2)], dim=-1)  # [B, D, w-1+T]
    conv_state.copy_(full[..., -w:])
    out = F.conv1d(full, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), groups=weight.shape[0])
    return (F.silu(out) if silu else out).transpose(1, 2)


# ---- modules -------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))


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
    """conv_step through torch.compile, under llama_compiled's "inductor" decode mode (bench --compile)."""
    return torch.compile(conv_step, fullgraph=True)


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

    def allocate_state(self, batch_size: int, max_seq_len: int, device, dtype) -> MambaState:
        return MambaState(batch_size, self.cfg, device=device, dtype=dtype)

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
        if state is not None and T == 1:  # one token: shift the window, dot with the kernel
            step = compiled_conv_step() if compiled_step_cores() else conv_step
            xBC, A = step(state.conv, xBC, self.conv1d.weight, self.conv1d.bias, self.A_log)
        else:
            A = -torch.exp(self.A_log.float())
            if state is None:
                xBC = k.causal_conv(xBC.transpose(1, 2), self.conv1d.weight, self.conv1d.bias, True).transpose(1, 2)
            else:
                xBC = _conv_with_state(xBC, state.conv, self.conv1d.weight, self.conv1d.bias, silu=True)
        x, B, C = torch.split(xBC, [cfg.d_inner, cfg.ngroups * cfg.d_state, cfg.ngroups * cfg.d_state], dim=-1)
        x = x.reshape(b, T, cfg.nheads, cfg.headdim)
        B, C = B.reshape(b, T, cfg.ngroups, cfg.d_state), C.reshape(b, T, cfg.ngroups, cfg.d_state)
        if state is not None and T == 1:
            y = k.ssd_step(state.ssm, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], self.D, self.dt_bias).unsqueeze(1)
        else:
            initial = state.ssm if state is not None and cache is not None and cache.seq_len > 0 else None
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
        return k.gated_rmsnorm(y.reshape(b, T, cfg.d_inner), z, self.norm.weight, self.norm.eps)


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

    def allocate_state(self, batch_size: int, max_seq_len: int, device, dtype) -> AttentionState:
        return AttentionState(batch_size, self.cfg, max_seq_len, device=device, dtype=dtype)

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
                qkv = _conv_with_state(qkv, state.conv, self.conv1d.weight, self.conv1d.bias, silu=False)
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
            cos, sin = rotary_cos_sin(positions, cfg.attn_rotary_emb_dim, cfg.attn_rotary_emb_base)
            q, key = apply_rotary(q, cos, sin), apply_rotary(key, cos, sin)
        q, key, v = q.transpose(1, 2), key.transpose(1, 2), v.transpose(1, 2)  # [b, heads, T, d]
        if state is not None and T == 1:
            state.write_at(key.to(state.k.dtype), v.to(state.v.dtype), cache.position)
            out = decode_attention(q.squeeze(2).to(state.k.dtype), state.k, state.v, cache.position + 1)
            out = out.to(qkv.dtype).unsqueeze(1)  # [b, 1, heads, d]
        else:
            start = 0
            if state is not None:
                start = cache.seq_len
                key, v = state.update(key.to(state.k.dtype), v.to(state.v.dtype), start)
                key, v = key.to(q.dtype), v.to(q.dtype)
            group = self.heads // self.kv_heads
            if group > 1:
                key, v = key.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            if start == 0:
                out = F.scaled_dot_product_attention(q, key, v, is_causal=True)
            else:
                out = F.scaled_dot_product_attention(q, key, v, attn_mask=causal_lower_right(T, start + T))
            out = out.transpose(1, 2)
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

    def forward(self, input_ids: torch.Tensor, cache: InferenceCache | None = None) -> torch.Tensor:
        if cache is not None:
            if input_ids.dim() != 2 or input_ids.shape[0] != cache.batch_size:
                raise ValueError(f"input_ids must be [batch={cache.batch_size}, T], got {tuple(input_ids.shape)}")
            if cache.seq_len + input_ids.shape[1] > cache.max_seq_len:
                raise ValueError(
                    f"cache holds max_seq_len={cache.max_seq_len} tokens; {cache.seq_len} used, "
                    f"{input_ids.shape[1]} more given"
                )
        hidden = self.backbone.embedding(input_ids)
        k = select_kernels(hidden.device, self.config.kernels)
        if cache is not None and input_ids.shape[1] == 1 and self._triton_decode_applies(input_ids.shape[0]):
            return self._triton_decode(hidden, cache, k)
        residual = None
        for i, layer in enumerate(self.backbone.layers):
            hidden, residual = layer(hidden, residual, None if cache is None else cache.layers[i], cache, k)
        add_norm = k.add_rmsnorm if self.config.fused_add_norm else REFERENCE.add_rmsnorm
        norm_f = self.backbone.norm_f
        hidden, _ = add_norm(hidden, residual, norm_f.weight, norm_f.eps, self.config.residual_in_fp32)
        logits = self.lm_head(hidden)
        if cache is not None:
            cache.advance(input_ids.shape[1])
        return logits

    def _triton_decode_applies(self, batch: int) -> bool:
        """The "triton" decode mode's path: blocks whose projections have no biases, batch 1."""
        return triton_gemv_step(batch) and self._gemv_layout

    @functools.cached_property
    def _gemv_layout(self) -> bool:  # the layout is fixed at build: not re-checked every decode step
        # (GatedMLP's projections never have biases; attention's may: attn_qkv_bias, attn_out_bias)
        return all(
            layer.mixer.in_proj.bias is None and layer.mixer.out_proj.bias is None for layer in self.backbone.layers
        )

    def _triton_decode(self, hidden: torch.Tensor, cache: InferenceCache, k: Kernels) -> torch.Tensor:
        """One decode step with the residual stream kept whole in fp32: per block RMSNorm + in_proj
        as one Triton GEMV, the mixer's core (Mamba-2 or attention), out_proj + residual add as one
        GEMV, and where the block has a gated MLP, RMSNorm + fc1 + SwiGLU and fc2 + residual as two
        more; the final norm and the LM head as one GEMV (triton_gemv.py). The same maths as the
        block protocol's (hidden, residual) pair, which add_rmsnorm sums before every norm."""
        from avengers.inference import triton_gemv

        B = hidden.shape[0]
        h = hidden.reshape(B, -1).float()
        for layer, state in zip(self.backbone.layers, cache.layers):
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
        norm_f = self.backbone.norm_f
        logits = triton_gemv.gemv(
            h, self.lm_head.weight, norm_weight=norm_f.weight, eps=norm_f.eps, out_dtype=hidden.dtype
        )
        cache.advance(1)
        return logits.unsqueeze(1)

    def allocate_cache(self, batch_size: int, max_seq_len: int, device=None, dtype=None) -> InferenceCache:
        """Per layer: MambaState (constant size) or AttentionState (a KVState growing with max_seq_len)."""
        if batch_size < 1 or max_seq_len < 1:
            raise ValueError(f"batch_size and max_seq_len must be >= 1, got {batch_size} and {max_seq_len}")
        param = self.lm_head.weight
        device = torch.device(device) if device is not None else param.device
        dtype = dtype or param.dtype
        layers = [layer.mixer.allocate_state(batch_size, max_seq_len, device, dtype) for layer in self.backbone.layers]
        return InferenceCache(layers, batch_size, max_seq_len)


# ---- mamba_ssm checkpoint folders ----------------------------------------------------------

CONFIG_NAME, WEIGHTS_NAME = "config.json", "pytorch_model.bin"


def save_pretrained(model: MambaLM, save_directory: str) -> None:
    """Write mamba_ssm's save_pretrained layout: config.json + pytorch_model.bin (full state dict)."""
    os.makedirs(save_directory, exist_ok=True)
    with open(os.path.join(save_directory, CONFIG_NAME), "w") as f:
        json.dump(model.config.to_mamba_ssm(), f, indent=4)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, os.path.join(save_directory, WEIGHTS_NAME))


def from_pretrained(
    path: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, **config_overrides
) -> MambaLM:
    """Load a mamba_ssm save_pretrained folder (ours or mamba_ssm's own)."""
    cfg_path, weights_path = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    for p in (cfg_path, weights_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(
                f"{p} not found: a mamba_ssm checkpoint folder holds {CONFIG_NAME} and {WEIGHTS_NAME}"
            )
    with open(cfg_path) as f:
        cfg = MambaConfig.from_mamba_ssm(json.load(f), **config_overrides)
    with torch.device("meta"):
        model = MambaLM(cfg)
    model.to_empty(device=device)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.backbone.embedding.weight
    state = torch.load(weights_path, map_location=device, weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.to(dtype) if dtype is not None else model


# ---- FLOPs ---------------------------------------------------------------------------------


def matmul_params(cfg: MambaConfig) -> int:
    """Weights that do a multiply-add per token: projections, convs, MLP, LM head (not the embedding lookup)."""
    d = cfg.d_model
    mamba = (
        d * (2 * cfg.d_inner + 2 * cfg.ngroups * cfg.d_state + cfg.nheads) + cfg.d_inner * d + cfg.conv_dim * cfg.d_conv
    )
    qkv = cfg.head_dim * (cfg.attn_num_heads + 2 * cfg.kv_heads)
    attn = d * qkv + cfg.attn_num_heads * cfg.head_dim * d + qkv * cfg.attn_d_conv
    mlp = 3 * d * cfg.mlp_hidden
    n_attn = len(cfg.attn_layer_idx)
    return (cfg.n_layer - n_attn) * mamba + n_attn * attn + cfg.n_layer * mlp + cfg.padded_vocab * d


def ssd_flops_per_token(cfg: MambaConfig, seq_len: int) -> float:
    """Training (fwd + bwd = 3 x fwd) FLOPs of one Mamba-2 layer's chunked SSD, per token.

    Forward per token, chunk Q = min(chunk_size, seq_len), groups g, heads H, headdim P, state N:
    C.B^T inside the chunk 2*Q*g*N, scores @ x 2*Q*H*P, chunk-state B^T x 2*H*P*N, state read-out
    C.state 2*H*P*N, passing states between chunks 2*H*P*N/Q (no causal discount, like attention's).
    """
    Q = min(cfg.chunk_size, seq_len)
    H, P, N, g = cfg.nheads, cfg.headdim, cfg.d_state, cfg.ngroups
    fwd = 2 * Q * (g * N + H * P) + 4 * H * P * N + 2 * H * P * N / Q
    return 3 * fwd


def mamba_flops_per_token(cfg: MambaConfig, seq_len: int) -> float:
    """6 * matmul params + SSD work of the Mamba layers + 12 * L_attn * d_attn * seq_len."""
    n_attn = len(cfg.attn_layer_idx)
    attn = 12 * n_attn * cfg.attn_num_heads * cfg.head_dim * seq_len
    return 6 * matmul_params(cfg) + (cfg.n_layer - n_attn) * ssd_flops_per_token(cfg, seq_len) + attn


# ---- registry ------------------------------------------------------------------------------


def _spec(name: str, description: str, max_seq_len: int = 4096, **cfg_kwargs) -> ModelSpec:
    cfg = MambaConfig(**cfg_kwargs)
    return register(
        ModelSpec(
            name=name,
            family="mamba",
            config=cfg,
            build_fn=MambaLM,
            block_types=(MambaBlock,),
            flops_fn=mamba_flops_per_token,
            vocab_size=cfg.vocab_size,
            max_seq_len=max_seq_len,
            description=description,
        )
    )


for _name, _d, _n in (
    ("130m", 768, 24),
    ("370m", 1024, 48),
    ("780m", 1536, 48),
    ("1.3b", 2048, 48),
    ("2.7b", 2560, 64),
):
    _spec(f"mamba2_{_name}", f"pure Mamba-2, d_model {_d}, {_n} layers", d_model=_d, n_layer=_n)

_HYBRID = dict(attn_rotary_emb_dim=64, attn_head_dim=128, tie_embeddings=True)
_spec(
    "mamba_9.8b",
    "Bamba-9B shape: 32 layers, attention at 9/18/27 (32 heads, 8 KV), gated MLP 14336",
    d_model=4096,
    n_layer=32,
    d_intermediate=14336,
    attn_layer_idx=(9, 18, 27),
    attn_num_heads=32,
    attn_num_heads_kv=8,
    **{**_HYBRID, "tie_embeddings": False},
)
_spec(
    "mamba_2.9b",
    "hybrid 2.9B: 64 layers, MHA (30 x 128, conv 4) at 9/18/27/36/45/56, tied",
    d_model=2560,
    n_layer=64,
    attn_layer_idx=(9, 18, 27, 36, 45, 56),
    attn_num_heads=30,
    attn_d_conv=4,
    **_HYBRID,
)
_spec(
    "mamba_1.5b",
    "hybrid 1.5B: 48 layers, MHA (24 x 128, conv 4) at 8/16/24/32/40, tied",
    d_model=2048,
    n_layer=48,
    attn_layer_idx=(8, 16, 24, 32, 40),
    attn_num_heads=24,
    attn_d_conv=4,
    **_HYBRID,
)

TINY_VOCAB = 4096  # avengers.models.llama.TINY_VOCAB: the bundled demo tokenizer's vocabulary
_TINY = dict(vocab_size=TINY_VOCAB, d_model=64, d_state=16, headdim=16, chunk_size=16)
_spec("mamba2_tiny", "CPU demo/test pure Mamba-2", max_seq_len=1024, n_layer=2, **_TINY)
_spec(
    "hybrid_tiny",
    "CPU demo/test hybrid: attention (4 heads, 2 KV, partial RoPE, conv) at layers 1, 3; MLP",
    max_seq_len=1024,
    n_layer=4,
    d_intermediate=128,
    attn_layer_idx=(1, 3),
    attn_num_heads=4,
    attn_num_heads_kv=2,
    attn_head_dim=16,
    attn_rotary_emb_dim=8,
    attn_d_conv=4,
    **_TINY,
)
