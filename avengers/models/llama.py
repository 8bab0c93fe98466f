"""Llama-2/3 variants on ibm-fms `LLaMA`, at the exact shapes of fms-fsdp's model table."""

from __future__ import annotations

import math

import torch
from fms.models.llama import LLaMA, LLaMABlock, LLaMAConfig

from avengers.decode.llama import KVCache, allocate_kv_cache, forward_with_cache
from avengers.decode.options import DecodeOptions
from avengers.models.registry import ModelSpec, register
from avengers.ops.loss import linear_cross_entropy


def ffn_hidden(cfg: LLaMAConfig) -> int:
    """ibm-fms GatedLinearUnit width: hidden_grow_factor * d rounded up to multiple_of."""
    return cfg.multiple_of * math.ceil(cfg.hidden_grow_factor * cfg.emb_dim / cfg.multiple_of)


def llama_param_counts(cfg: LLaMAConfig) -> tuple[int, int]:
    """(all parameters, parameters that do matmul work per token: everything but the input embedding table)."""
    d, v = cfg.emb_dim, cfg.src_vocab_size
    head_dim = d // cfg.nheads
    kv = cfg.kvheads or cfg.nheads
    attn = d * d + 2 * d * kv * head_dim + d * d
    per_layer = attn + 3 * d * ffn_hidden(cfg) + 2 * d
    body = cfg.nlayers * per_layer + d
    total = body + v * d + (0 if cfg.tie_heads else v * d)
    return total, body + v * d


def llama_flops_per_token(cfg: LLaMAConfig, seq_len: int) -> float:
    """6 * matmul params + 12 * layers * d_attn * seq_len (attention scores and values, fwd + bwd,
    no causal discount)."""
    _, matmul_params = llama_param_counts(cfg)
    return 6 * matmul_params + 12 * cfg.nlayers * cfg.emb_dim * seq_len


class Llama(LLaMA):
    """ibm-fms LLaMA with the workshop's model contract (see registry.py)."""

    def init_weights(self) -> None:
        self.reset_parameters()
        self.post_init()  # RoPE tables live outside the state dict and must be rebuilt on the real device

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, cache: KVCache | None = None, labels: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        if labels is not None:  # the training loss, without the [tokens, vocab] logits
            hidden, _ = self.base_model(x, **kwargs)
            return linear_cross_entropy(hidden, self.head.weight, labels)
        if cache is None:
            return super().forward(x, **kwargs)
        return forward_with_cache(self, x, cache)

    def allocate_cache(
        self, batch_size: int, max_seq_len: int, device=None, dtype=None, options: DecodeOptions | None = None
    ) -> KVCache:
        return allocate_kv_cache(self, batch_size, max_seq_len, device, dtype, options)


def _spec(name: str, description: str = "", **cfg_kwargs) -> ModelSpec:
    cfg = LLaMAConfig(**cfg_kwargs)
    return register(
        ModelSpec(
            name=name,
            family="llama",
            config=cfg,
            build_fn=Llama,
            block_types=(LLaMABlock,),
            flops_fn=llama_flops_per_token,
            vocab_size=cfg.src_vocab_size,
            max_seq_len=cfg.max_expected_seq_len,
            description=description,
            max_seq_len_is_limit=True,  # ibm-fms RoPE tables hold max_expected_seq_len positions
        )
    )


_L2 = dict(src_vocab_size=32000, rope_theta=1e4, max_expected_seq_len=4096)
_spec("llama2_7b", "Llama-2 7B", **_L2, emb_dim=4096, nheads=32, kvheads=32, nlayers=32)
_spec("llama2_13b", "Llama-2 13B", **_L2, emb_dim=5120, nheads=40, kvheads=0, nlayers=40)
_spec(
    "llama2_34b",
    "Code-Llama-style 34B, 16k context",
    src_vocab_size=32000,
    emb_dim=8192,
    nheads=64,
    kvheads=8,
    nlayers=48,
    hidden_grow_factor=22016 / 8192,
    rope_theta=1e6,
    max_expected_seq_len=16384,
)
_spec(
    "llama2_70b",
    "Llama-2 70B",
    **_L2,
    emb_dim=8192,
    nheads=64,
    kvheads=8,
    nlayers=80,
    hidden_grow_factor=1.3 * 8 / 3,
    multiple_of=4096,
)
_spec(
    "llama2_1.4b",
    "Llama-2 shape, 1.4B (Tele@64 baseline)",
    **_L2,
    emb_dim=2048,
    nheads=16,
    kvheads=4,
    nlayers=24,
    hidden_grow_factor=3.0,
)

_L3 = dict(src_vocab_size=128256, rope_theta=5e5)
for ctx, suffix in ((8192, ""), (4096, "_4k")):
    _spec(
        f"llama3_8b{suffix}",
        f"Llama-3 8B, {ctx} context",
        **_L3,
        max_expected_seq_len=ctx,
        emb_dim=4096,
        nheads=32,
        kvheads=8,
        nlayers=32,
        hidden_grow_factor=3.5,
    )
    _spec(
        f"llama3_1.8b{suffix}",
        f"Llama-3 shape 1.8B, {ctx} context",
        **_L3,
        max_expected_seq_len=ctx,
        emb_dim=2048,
        nheads=16,
        kvheads=8,
        nlayers=24,
        hidden_grow_factor=3.5,
    )
    _spec(
        f"llama3_3.2b{suffix}",
        f"Llama-3.2 3B shape, {ctx} context",
        **_L3,
        max_expected_seq_len=ctx,
        emb_dim=3072,
        nheads=24,
        kvheads=8,
        nlayers=24,
        hidden_grow_factor=8 / 3,
    )
    _spec(
        f"llama3_70b{suffix}",
        f"Llama-3 70B, {ctx} context",
        **_L3,
        max_expected_seq_len=ctx,
        emb_dim=8192,
        nheads=64,
        kvheads=8,
        nlayers=80,
        hidden_grow_factor=3.5,
        multiple_of=4096,
    )
_spec(
    "llama3_194m_4k",
    "Llama-3 shape 194M (0.39B with embeddings)",
    **_L3,
    max_expected_seq_len=4096,
    emb_dim=1024,
    nheads=8,
    kvheads=0,
    nlayers=10,
    hidden_grow_factor=2816 / 1024,
)

TINY_VOCAB = 4096  # the bundled demo tokenizer's vocabulary (data/sample/tokenizer.json)
_spec(
    "llama3_tiny",
    "CPU demo/test model for the bundled sample corpus",
    src_vocab_size=TINY_VOCAB,
    emb_dim=256,
    nheads=8,
    kvheads=4,
    nlayers=4,
    hidden_grow_factor=8 / 3,
    multiple_of=64,
    rope_theta=5e5,
    max_expected_seq_len=1024,
)
_spec(
    "llama3_100m_v4k",
    "Llama-3 shape ~100M on the demo vocabulary (the quality comparison, docs/quality.md)",
    src_vocab_size=TINY_VOCAB,
    emb_dim=768,
    nheads=12,
    kvheads=4,
    nlayers=14,
    hidden_grow_factor=8 / 3,
    multiple_of=256,
    rope_theta=5e5,
    max_expected_seq_len=4096,
)
