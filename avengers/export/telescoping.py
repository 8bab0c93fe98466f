"""Telescoping Llama -> a Hugging Face folder with its own modeling code (`trust_remote_code=True`).

transformers has no telescoping architecture, so the folder carries modeling_telescoping.py (torch +
transformers only) and a config.json whose `auto_map` points AutoConfig / AutoModelForCausalLM at
it. The weights keep ibm-fms's RoPE channel order (adjacent pairs), which that file implements.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from avengers.export.hf import CONFIG_NAME, dtype_name, write_weights
from avengers.models.llama import ffn_hidden

MODELING_FILE = os.path.join(os.path.dirname(__file__), "modeling_telescoping.py")
MODEL_TYPE = "avengers_telescoping"


def telescoping_hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    cfg = model.config
    head_dim = cfg.emb_dim // cfg.nheads
    q_rows, kv_rows = cfg.nheads * head_dim, (cfg.kvheads or cfg.nheads) * head_dim
    hidden = ffn_hidden(cfg)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    out = {
        "model.embed_tokens.weight": sd["base_model.embedding.weight"],
        "model.norm.weight": sd["base_model.dec_norm.weight"],
        # written untied: one fewer convention for the loader, at the cost of one embedding's bytes
        "lm_head.weight": sd["head.weight"].clone() if cfg.tie_heads else sd["head.weight"],
    }
    for i in range(cfg.nlayers):
        src, dst = f"base_model.layers.{i}.", f"model.layers.{i}."
        q, k, v = sd[src + "attn.in_proj.qkv_fused.weight"].split([q_rows, kv_rows, kv_rows])
        gate, up = sd[src + "ff_sub_layer.wg1_fused.weight"].split([hidden, hidden])
        out.update(
            {
                dst + "self_attn.q_proj.weight": q,
                dst + "self_attn.k_proj.weight": k,
                dst + "self_attn.v_proj.weight": v,
                dst + "self_attn.o_proj.weight": sd[src + "attn.dense.weight"],
                dst + "mlp.gate_proj.weight": gate,
                dst + "mlp.up_proj.weight": up,
                dst + "mlp.down_proj.weight": sd[src + "ff_sub_layer.w2.weight"],
                dst + "input_layernorm.weight": sd[src + "ln.weight"],
                dst + "post_attention_layernorm.weight": sd[src + "ff_ln.weight"],
            }
        )
        for name in ("gate.weight", "k_norm.weight", "v_norm.weight"):
            if src + "attn." + name in sd:
                out[dst + "self_attn." + name] = sd[src + "attn." + name]
    return out


def telescoping_hf_config(model: torch.nn.Module, bos_token_id: int | None, eos_token_id: int | None) -> dict:
    cfg = model.config
    if cfg.attn_bias or cfg.mlp_bias:
        raise ValueError(f"attn_bias={cfg.attn_bias}, mlp_bias={cfg.mlp_bias}: the export maps bias-free models only")
    opts = cfg.tele_options()
    return {
        "architectures": ["TelescopingForCausalLM"],
        "model_type": MODEL_TYPE,
        "auto_map": {
            "AutoConfig": "modeling_telescoping.TelescopingConfig",
            "AutoModelForCausalLM": "modeling_telescoping.TelescopingForCausalLM",
        },
        "vocab_size": cfg.src_vocab_size,
        "hidden_size": cfg.emb_dim,
        "intermediate_size": ffn_hidden(cfg),
        "num_hidden_layers": cfg.nlayers,
        "num_attention_heads": cfg.nheads,
        "num_key_value_heads": cfg.kvheads or cfg.nheads,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_expected_seq_len,
        "tele_cache_size": opts.cache_size,
        "tele_fmap": list(opts.fmap),
        "tele_gate": opts.gate,
        "tele_mask_empty": opts.mask_empty,
        "tele_softcap": opts.softcap,
        "tele_kv_norm": opts.kv_norm,
        "tele_full_attn_layers": list(cfg.full_attn_layers()),
        "tie_word_embeddings": False,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "use_cache": True,
    }


def export_telescoping_to_hf(
    model: torch.nn.Module,
    out_dir: str,
    *,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> str:
    """Write config.json (auto_map), modeling_telescoping.py, model.safetensors, generation_config.json."""
    config = telescoping_hf_config(model, bos_token_id, eos_token_id)
    write_weights(telescoping_hf_state_dict(model), out_dir, dtype)
    config["dtype"] = config["torch_dtype"] = dtype_name(dtype)
    with open(os.path.join(out_dir, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    generation = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "use_cache": True}
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({k: v for k, v in generation.items() if v is not None}, f, indent=2)
        f.write("\n")
    shutil.copy(MODELING_FILE, os.path.join(out_dir, os.path.basename(MODELING_FILE)))
    return out_dir
