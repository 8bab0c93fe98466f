"""Export trained checkpoints to formats other tools read.

Llama (ibm-fms layout) -> Hugging Face `LlamaForCausalLM` (safetensors + config.json), so lm-eval,
vLLM and transformers load it directly. Mamba-2 / hybrids save in mamba_ssm's `save_pretrained`
layout (see avengers.models.mamba). Telescoping models have no HF architecture and are exported
as a plain state dict plus our variant name.

    python -m avengers.export --ckpt runs/demo --out exports/demo-hf
"""

from __future__ import annotations

import json
import os
import shutil

import torch

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
        "lm_head.weight": sd["head.weight"],
    }
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
    return {k: v.contiguous() for k, v in out.items()}


def llama_hf_config(model: torch.nn.Module, bos_token_id: int | None, eos_token_id: int | None):
    from transformers import LlamaConfig

    cfg = model.config
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
        attention_bias=cfg.attn_bias,
        mlp_bias=cfg.mlp_bias,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        torch_dtype="bfloat16",
    )


def export_llama_to_hf(
    model: torch.nn.Module,
    out_dir: str,
    *,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> str:
    from transformers import LlamaForCausalLM

    hf_config = llama_hf_config(model, bos_token_id, eos_token_id)
    with torch.device("meta"):
        hf_model = LlamaForCausalLM(hf_config)
    state = {k: v.to(dtype) for k, v in llama_to_hf_state_dict(model).items()}
    hf_model.load_state_dict(state, assign=True, strict=True)
    hf_model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def export_checkpoint(ckpt: str, out: str, tokenizer_path: str | None = None, dtype: str = "bfloat16") -> str:
    """Export a training run folder or checkpoint folder to `out` in the family's standard format."""
    from avengers.models import get_model_spec
    from avengers.train.checkpoint import load_model_from_checkpoint

    model, cfg = load_model_from_checkpoint(ckpt, device="cpu")
    spec = get_model_spec(cfg.model_variant)
    os.makedirs(out, exist_ok=True)
    torch_dtype = getattr(torch, dtype)
    if spec.family == "llama":
        bos = cfg.bos_token if cfg.bos_token is not None else None
        export_llama_to_hf(model, out, bos_token_id=bos, eos_token_id=cfg.eos_token, dtype=torch_dtype)
    elif spec.family == "mamba":
        from avengers.models.mamba import save_pretrained

        save_pretrained(model.to(torch_dtype), out)
    else:
        torch.save({k: v.to(torch_dtype) for k, v in model.state_dict().items()}, os.path.join(out, "model.pt"))
        with open(os.path.join(out, "variant.json"), "w") as f:
            json.dump({"model_variant": cfg.model_variant, "family": spec.family}, f, indent=2)
    tok = tokenizer_path or getattr(cfg, "tokenizer_path", None)
    if tok and os.path.isdir(tok):
        for name in os.listdir(tok):
            if name.startswith(("tokenizer", "special_tokens")):
                shutil.copy(os.path.join(tok, name), out)
    return out


if __name__ == "__main__":
    import fire

    fire.Fire(export_checkpoint)
