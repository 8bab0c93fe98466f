"""Registered telescoping variants, their training FLOPs and decode cache bytes."""

from __future__ import annotations

import dataclasses

from fms.models.llama import LLaMABlock, LLaMAConfig

from avengers.models.llama import TINY_VOCAB, llama_param_counts
from avengers.models.registry import ModelSpec, get_model_spec, register
from avengers.models.telescoping.model import TeleLlamaConfig, TelescopingLlama


def tele_flops_per_token(cfg: TeleLlamaConfig, seq_len: int) -> float:
    """6 * matmul params (incl. gates) + 12 * d_attn * (full layers * seq_len + tele layers * min(C, seq_len)).

    Each telescoping query attends exactly C entries (EMPTY sinks included), so its scores and
    values cost 2*2*C*d_attn FLOPs forward, x3 with backward. Merges and norms (elementwise,
    O(d) per node) are not counted, like Llama's norms.
    """
    _, matmul_params = llama_param_counts(cfg)
    n_full = len(cfg.full_attn_layers())
    n_tele = cfg.nlayers - n_full
    gate = n_tele * cfg.emb_dim * (cfg.kvheads or cfg.nheads) if cfg.tele_gate == "linear" else 0
    attn = 12 * cfg.emb_dim * (n_full * seq_len + n_tele * min(cfg.tele_cache_size, seq_len))
    return 6 * (matmul_params + gate) + attn


def tele_cache_bytes(cfg: TeleLlamaConfig, context: int, dtype_bytes: int = 2) -> int:
    """Decode state bytes per sequence: 2*C*Hkv*d means + C*Hkv fp32 log-masses per tele layer."""
    kv, d = cfg.kvheads or cfg.nheads, cfg.emb_dim // cfg.nheads
    n_full = len(cfg.full_attn_layers())
    tele = (cfg.nlayers - n_full) * (2 * cfg.tele_cache_size * kv * d * dtype_bytes + cfg.tele_cache_size * kv * 4)
    return tele + n_full * 2 * context * kv * d * dtype_bytes


def _tele_spec(name: str, base: str, description: str, **changes) -> ModelSpec:
    base_cfg = get_model_spec(base).config
    values = {f.name: getattr(base_cfg, f.name) for f in dataclasses.fields(LLaMAConfig)}
    values.update(changes)
    cfg = TeleLlamaConfig(**values)
    cfg.validate()
    return register(
        ModelSpec(
            name=name,
            family="telescoping",
            config=cfg,
            build_fn=TelescopingLlama,
            block_types=(LLaMABlock,),
            flops_fn=tele_flops_per_token,
            vocab_size=cfg.src_vocab_size,
            max_seq_len=cfg.max_expected_seq_len,
            description=description,
        )
    )


_tele_spec(
    "tele64_llama2_1.4b", "llama2_1.4b", "Tele@64 on the Llama-2 1.4B shape (published comparison)", tele_cache_size=64
)
for _sfx in ("", "_4k"):
    _tele_spec(
        f"tele128_llama3_1.8b{_sfx}",
        f"llama3_1.8b{_sfx}",
        "Tele@128 Llama-3 1.8B as published: 32 heads / 2 KV heads (d=64), FFN x3.75",
        tele_cache_size=128,
        nheads=32,
        kvheads=2,
        hidden_grow_factor=3.75,
    )
    for _shape in ("8b", "3.2b", "70b"):
        _tele_spec(
            f"tele128_llama3_{_shape}{_sfx}",
            f"llama3_{_shape}{_sfx}",
            f"Tele@128 on the llama3_{_shape}{_sfx} shape (its own head layout)",
            tele_cache_size=128,
        )
_tele_spec("tele128_llama3_194m_4k", "llama3_194m_4k", "Tele@128 on the llama3_194m_4k shape", tele_cache_size=128)
_tele_spec(
    "tele_tiny",
    "llama3_tiny",
    f"CPU demo/test telescoping model (C=16, fmap c16, vocab {TINY_VOCAB})",
    tele_cache_size=16,
)
_tele_spec(
    "tele64_100m_v4k", "llama3_100m_v4k", "Tele@64 on llama3_100m_v4k (the quality comparison)", tele_cache_size=64
)
