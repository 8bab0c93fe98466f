"""Mamba-2 / hybrid model config: mamba_ssm's MambaConfig flattened, and conversion to and from
the config.json of mamba_ssm's save_pretrained folders."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from avengers.models.mamba.kernels import KERNEL_MODES


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
    kernels: str = "auto"  # auto | mamba_ssm | reference (avengers.models.mamba.kernels)

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
