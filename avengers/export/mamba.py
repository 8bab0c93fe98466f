"""Mamba-2 and hybrid models (mamba_ssm layout) -> Hugging Face `Mamba2ForCausalLM` / `BambaForCausalLM`.

- Pure Mamba-2 (no attention, no MLP) is transformers' Mamba2: the mamba_ssm layout with the
  embedding renamed; the vocabulary stays padded (the padded rows are part of the trained model).
- Hybrids in the Bamba layout (mamba_9.8b's): a gated MLP after every mixer, attention layers
  without a conv, head_dim = d_model / heads, RoPE on the first half of each head (Bamba fixes
  partial_rotary_factor = 0.5). mamba_ssm's MHA `in_proj` is split into q/k/v, the MLP's `fc1`
  ([value | gate]) into up/gate.
- Anything else has no transformers architecture: `hf_architecture` says why and what to use instead.

transformers normalises the mixer's gated RMSNorm with the block norms' epsilon, mamba_ssm with a
fixed 1e-5, so only models with norm_epsilon = 1e-5 (every registered one) export exactly.
"""

from __future__ import annotations

import torch

from avengers.export.hf import save_hf_folder
from avengers.models.mamba import MambaConfig

MIXER_NORM_EPS = 1e-5  # mamba_ssm's Mamba2 RMSNormGated, fixed
MIXER_PARAMS = (  # a Mamba2 mixer's, the same names in mamba_ssm, Mamba2 and Bamba
    "in_proj.weight",
    "conv1d.weight",
    "conv1d.bias",
    "dt_bias",
    "A_log",
    "D",
    "norm.weight",
    "out_proj.weight",
)


class NoHFArchitecture(ValueError):
    """This Mamba-family configuration has no transformers architecture that computes the same function."""


def hf_architecture(cfg: MambaConfig, variant: str = "this model") -> str:
    """ "Mamba2ForCausalLM" or "BambaForCausalLM" for `cfg`; NoHFArchitecture naming the reason otherwise."""
    instead = (
        "export it with --format mamba_ssm (mamba_ssm's MambaLMHeadModel.from_pretrained loads it) and score "
        "it with python -m avengers.evaluate"
    )
    if cfg.norm_epsilon != MIXER_NORM_EPS:
        raise NoHFArchitecture(
            f"{variant} has norm_epsilon={cfg.norm_epsilon}, but transformers' Mamba2 and Bamba normalise the "
            f"mixer output with that epsilon where mamba_ssm uses {MIXER_NORM_EPS}; {instead}"
        )
    if not cfg.attn_layer_idx and cfg.d_intermediate == 0:
        return "Mamba2ForCausalLM"
    reasons = []
    if cfg.d_intermediate == 0:
        reasons.append("its layers have no MLP (d_intermediate=0) while Bamba has one after every mixer")
    if cfg.attn_layer_idx:
        if cfg.attn_d_conv:
            reasons.append(
                f"its attention layers run a causal conv over q/k/v (attn_d_conv={cfg.attn_d_conv}), "
                "which transformers' Bamba lacks"
            )
        if cfg.head_dim * cfg.attn_num_heads != cfg.d_model:
            reasons.append(
                f"its attention heads are {cfg.attn_num_heads} x {cfg.head_dim} wide, Bamba's d_model / heads "
                f"= {cfg.d_model // cfg.attn_num_heads}"
            )
        if 2 * cfg.attn_rotary_emb_dim != cfg.head_dim:
            reasons.append(f"it rotates {cfg.attn_rotary_emb_dim} of {cfg.head_dim} head channels, Bamba always half")
        if cfg.attn_qkv_bias != cfg.attn_out_bias:
            reasons.append("its q/k/v and output projections differ in bias, Bamba has one attention_bias")
    if reasons:
        raise NoHFArchitecture(f"{variant} has no Hugging Face architecture: {'; '.join(reasons)}; {instead}")
    return "BambaForCausalLM"


def _mixer(sd: dict[str, torch.Tensor], src: str, dst: str) -> dict[str, torch.Tensor]:
    return {dst + n: sd[src + n] for n in MIXER_PARAMS}


def mamba2_hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    cfg: MambaConfig = model.config
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    out = {"backbone.embeddings.weight": sd["backbone.embedding.weight"]}
    out["backbone.norm_f.weight"] = sd["backbone.norm_f.weight"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layer):
        src = dst = f"backbone.layers.{i}."
        out[dst + "norm.weight"] = sd[src + "norm.weight"]
        out.update(_mixer(sd, src + "mixer.", dst + "mixer."))
    return out


def bamba_hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    cfg: MambaConfig = model.config
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    out = {"model.embed_tokens.weight": sd["backbone.embedding.weight"]}
    out["model.final_layernorm.weight"] = sd["backbone.norm_f.weight"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    hq, hk = cfg.attn_num_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    for i in range(cfg.n_layer):
        src, dst = f"backbone.layers.{i}.", f"model.layers.{i}."
        out[dst + "input_layernorm.weight"] = sd[src + "norm.weight"]
        out[dst + "pre_ff_layernorm.weight"] = sd[src + "norm2.weight"]
        value, gate = sd[src + "mlp.fc1.weight"].chunk(2, dim=0)
        out[dst + "feed_forward.up_proj.weight"] = value
        out[dst + "feed_forward.gate_proj.weight"] = gate
        out[dst + "feed_forward.down_proj.weight"] = sd[src + "mlp.fc2.weight"]
        if i not in cfg.attn_layer_idx:
            out.update(_mixer(sd, src + "mixer.", dst + "mamba."))
            continue
        for kind in ("weight", "bias") if cfg.attn_qkv_bias else ("weight",):
            q, k, v = sd[f"{src}mixer.in_proj.{kind}"].split([hq, hk, hk])
            out.update({f"{dst}self_attn.q_proj.{kind}": q, f"{dst}self_attn.k_proj.{kind}": k})
            out[f"{dst}self_attn.v_proj.{kind}"] = v
            out[f"{dst}self_attn.o_proj.{kind}"] = sd[f"{src}mixer.out_proj.{kind}"]
    return out


def _common(cfg: MambaConfig, bos_token_id: int | None, eos_token_id: int | None) -> dict:
    return dict(
        vocab_size=cfg.padded_vocab,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layer,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=None,
    )


def mamba2_hf_config(cfg: MambaConfig, bos_token_id: int | None, eos_token_id: int | None):
    from transformers import Mamba2Config

    return Mamba2Config(
        **_common(cfg, bos_token_id, eos_token_id),
        num_heads=cfg.nheads,
        head_dim=cfg.headdim,
        state_size=cfg.d_state,
        expand=cfg.expand,
        conv_kernel=cfg.d_conv,
        n_groups=cfg.ngroups,
        chunk_size=cfg.chunk_size,
        layer_norm_epsilon=cfg.norm_epsilon,
        residual_in_fp32=cfg.residual_in_fp32,
        use_bias=False,
        use_conv_bias=True,
        time_step_min=cfg.dt_min,
        time_step_max=cfg.dt_max,
        time_step_floor=cfg.dt_init_floor,
        architectures=["Mamba2ForCausalLM"],
    )


def bamba_hf_config(cfg: MambaConfig, bos_token_id: int | None, eos_token_id: int | None, max_seq_len: int):
    from transformers import BambaConfig

    return BambaConfig(
        **_common(cfg, bos_token_id, eos_token_id),
        intermediate_size=cfg.mlp_hidden,
        num_attention_heads=cfg.attn_num_heads,
        num_key_value_heads=cfg.kv_heads,
        attn_layer_indices=list(cfg.attn_layer_idx),
        attention_bias=cfg.attn_qkv_bias,
        rms_norm_eps=cfg.norm_epsilon,
        rope_theta=cfg.attn_rotary_emb_base,
        max_position_embeddings=max_seq_len,
        mamba_n_heads=cfg.nheads,
        mamba_d_head=cfg.headdim,
        mamba_n_groups=cfg.ngroups,
        mamba_d_state=cfg.d_state,
        mamba_d_conv=cfg.d_conv,
        mamba_expand=cfg.expand,
        mamba_chunk_size=cfg.chunk_size,
        mamba_conv_bias=True,
        mamba_proj_bias=False,
        architectures=["BambaForCausalLM"],
    )


def export_mamba_to_hf(
    model: torch.nn.Module,
    out_dir: str,
    *,
    variant: str = "this model",
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    max_seq_len: int = 4096,
    dtype: torch.dtype = torch.bfloat16,
) -> str:
    """Write `model` as a Mamba2ForCausalLM or BambaForCausalLM folder (hf_architecture picks which)."""
    cfg: MambaConfig = model.config
    if hf_architecture(cfg, variant) == "Mamba2ForCausalLM":
        config, state = mamba2_hf_config(cfg, bos_token_id, eos_token_id), mamba2_hf_state_dict(model)
    else:
        config = bamba_hf_config(cfg, bos_token_id, eos_token_id, max_seq_len)
        state = bamba_hf_state_dict(model)
    save_hf_folder(config, state, out_dir, dtype)
    return out_dir
