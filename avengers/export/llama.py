"""Llama (ibm-fms layout) -> Hugging Face `LlamaForCausalLM`, which transformers, lm-eval and vLLM load."""

from __future__ import annotations

import torch

from avengers.export.hf import save_hf_folder
from avengers.models.llama import ffn_hidden


def _fms_to_hf_rope(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """ibm-fms rotates interleaved (even, odd) pairs; HF rotates (first half, second half).

    Reordering the output rows of q/k projections per head makes HF's RoPE produce the same
    attention scores (the inverse of ibm-fms's own hf->fms adapter).
    """
    heads = w.shape[0] // head_dim
    return w.view(heads, head_dim // 2, 2, w.shape[1]).transpose(1, 2).reshape(w.shape)


def llama_to_hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    cfg = model.config
    head_dim = cfg.emb_dim // cfg.nheads
    q_rows = cfg.nheads * head_dim
    kv_rows = (cfg.kvheads or cfg.nheads) * head_dim
    hidden = ffn_hidden(cfg)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    out = {
        "model.embed_tokens.weight": sd["base_model.embedding.weight"],
        "model.norm.weight": sd["base_model.dec_norm.weight"],
    }
    if not cfg.tie_heads:
        out["lm_head.weight"] = sd["head.weight"]
    for i in range(cfg.nlayers):
        src, dst = f"base_model.layers.{i}.", f"model.layers.{i}."
        q, k, v = sd[src + "attn.in_proj.qkv_fused.weight"].split([q_rows, kv_rows, kv_rows])
        gate, up = sd[src + "ff_sub_layer.wg1_fused.weight"].split([hidden, hidden])
        out.update(
            {
                dst + "self_attn.q_proj.weight": _fms_to_hf_rope(q, head_dim),
                dst + "self_attn.k_proj.weight": _fms_to_hf_rope(k, head_dim),
                dst + "self_attn.v_proj.weight": v,
                dst + "self_attn.o_proj.weight": sd[src + "attn.dense.weight"],
                dst + "mlp.gate_proj.weight": gate,
                dst + "mlp.up_proj.weight": up,
                dst + "mlp.down_proj.weight": sd[src + "ff_sub_layer.w2.weight"],
                dst + "input_layernorm.weight": sd[src + "ln.weight"],
                dst + "post_attention_layernorm.weight": sd[src + "ff_ln.weight"],
            }
        )
    return out


def llama_hf_config(model: torch.nn.Module, bos_token_id: int | None, eos_token_id: int | None):
    from transformers import LlamaConfig

    cfg = model.config
    if cfg.attn_bias or cfg.mlp_bias:
        raise ValueError(
            f"attn_bias={cfg.attn_bias}, mlp_bias={cfg.mlp_bias}: the HF export maps bias-free Llama "
            "variants only (every registered one)"
        )
    if (cfg.rope_scaling or {}).get("rope_type", "regular") != "regular":
        raise ValueError(f"rope_scaling {cfg.rope_scaling}: only regular RoPE exports to HF Llama")
    return LlamaConfig(
        vocab_size=cfg.src_vocab_size,
        hidden_size=cfg.emb_dim,
        intermediate_size=ffn_hidden(cfg),
        num_hidden_layers=cfg.nlayers,
        num_attention_heads=cfg.nheads,
        num_key_value_heads=cfg.kvheads or cfg.nheads,
        head_dim=cfg.emb_dim // cfg.nheads,
        max_position_embeddings=cfg.max_expected_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_heads,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        architectures=["LlamaForCausalLM"],
    )


def export_llama_to_hf(
    model: torch.nn.Module,
    out_dir: str,
    *,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> str:
    """Write `model` as a LlamaForCausalLM folder (config.json, model.safetensors, generation_config.json)."""
    save_hf_folder(llama_hf_config(model, bos_token_id, eos_token_id), llama_to_hf_state_dict(model), out_dir, dtype)
    return out_dir
