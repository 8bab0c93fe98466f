"""Registered Mamba-2 and hybrid variants and their training FLOPs."""

from __future__ import annotations

from avengers.models.mamba.config import MambaConfig
from avengers.models.mamba.model import MambaBlock, MambaLM
from avengers.models.registry import ModelSpec, register


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
# the tiny hybrids: 4 layers, attention (4 heads, 2 KV, head 16, partial RoPE) at layers 1 and 3, gated MLPs
_TINY_HYBRID = dict(
    max_seq_len=1024,
    n_layer=4,
    d_intermediate=128,
    attn_layer_idx=(1, 3),
    attn_num_heads=4,
    attn_num_heads_kv=2,
    attn_head_dim=16,
    attn_rotary_emb_dim=8,
    **_TINY,
)
_spec(
    "hybrid_tiny",
    "CPU demo/test hybrid: attention with a conv on its inputs at layers 1, 3; MLP",
    attn_d_conv=4,
    **_TINY_HYBRID,
)
_spec(
    "bamba_tiny",
    "CPU demo/test hybrid in the Bamba layout (mamba_9.8b's): hybrid_tiny without the attention conv",
    **_TINY_HYBRID,
)
# ~100M on the demo vocabulary: the quality comparison with llama3_100m_v4k (docs/quality.md)
_spec(
    "mamba2_100m_v4k",
    "pure Mamba-2 ~100M, d_model 768, 24 layers, demo vocabulary",
    vocab_size=TINY_VOCAB,
    d_model=768,
    n_layer=24,
)
_spec(
    "hybrid_100m_v4k",
    "hybrid ~100M: 26 layers, attention (12 heads, 4 KV, half RoPE) at 5/12/19/25, demo vocabulary",
    vocab_size=TINY_VOCAB,
    d_model=768,
    n_layer=26,
    attn_layer_idx=(5, 12, 19, 25),
    attn_num_heads=12,
    attn_num_heads_kv=4,
    attn_head_dim=64,
    attn_rotary_emb_dim=32,
)
