"""The telescoping-cache Llama: ibm-fms LLaMA whose attention layers keep C compressed slots.

Hybrid variants keep full attention in `tele_full_attn_layers`. Decode (allocate_cache and the
cached forward) is avengers.decode.telescoping.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from fms.models.llama import LLaMAConfig

from avengers.decode.cache import InferenceCache
from avengers.decode.options import DecodeOptions
from avengers.decode.telescoping import allocate_cache, forward_with_cache
from avengers.models.llama import Llama
from avengers.models.telescoping.attention import TeleOptions, TelescopingAttention
from avengers.models.telescoping.schedule import resolve_fmap
from avengers.ops.loss import linear_cross_entropy

HYBRID_PRESETS = {  # full-attention layer choices of the hybrid branches (spec §1), for nlayers
    "first4": lambda nl: tuple(range(min(4, nl))),
    "2and2": lambda nl: tuple(sorted({0, 1, nl - 2, nl - 1})),
    "1/6@1": lambda nl: tuple(range(0, nl, 6)),
    "1/6@4": lambda nl: tuple(range(3, nl, 6)),
}


@dataclass
class TeleLlamaConfig(LLaMAConfig):
    """LLaMAConfig plus the telescoping options (the tele_* fields)."""

    tele_cache_size: int = 128
    tele_fmap: Any = None  # preset name, {level: slot}, slot list, or None = preset for the cache size
    tele_gate: str = "linear"
    tele_mask_empty: bool = False
    tele_softcap: float | None = None
    tele_kv_norm: bool = True
    tele_full_attn_layers: Any = field(default_factory=tuple)  # layer indices or a HYBRID_PRESETS name
    tele_impl: str = "auto"  # "auto" (flex for CUDA training, gather otherwise) | "gather" | "flex"

    def tele_options(self) -> TeleOptions:
        return TeleOptions(
            self.tele_cache_size,
            resolve_fmap(self.tele_fmap, self.tele_cache_size),
            self.tele_gate,
            self.tele_mask_empty,
            self.tele_softcap,
            self.tele_kv_norm,
        )

    def full_attn_layers(self) -> tuple[int, ...]:
        spec = self.tele_full_attn_layers
        if isinstance(spec, str):
            if spec not in HYBRID_PRESETS:
                raise ValueError(
                    f"unknown tele_full_attn_layers preset {spec!r}; known: {', '.join(HYBRID_PRESETS)} "
                    "or a list of layer indices"
                )
            return HYBRID_PRESETS[spec](self.nlayers)
        layers = tuple(int(i) for i in spec)
        bad = [i for i in layers if not 0 <= i < self.nlayers]
        if bad or len(set(layers)) != len(layers):
            raise ValueError(f"tele_full_attn_layers must be distinct indices in [0, {self.nlayers}), got {layers}")
        return tuple(sorted(layers))

    def validate(self) -> None:
        self.tele_options()
        self.full_attn_layers()
        kv = self.kvheads or self.nheads
        if self.nheads % kv:
            raise ValueError(f"nheads={self.nheads} must be a multiple of kvheads={kv}")
        if self.tele_impl not in ("auto", "gather", "flex"):
            raise ValueError(f"tele_impl must be 'auto', 'gather' or 'flex', got {self.tele_impl!r}")
        if (self.rope_scaling or {}).get("rope_type", "regular") != "regular":
            raise ValueError(
                f"telescoping layers support rope_type 'regular' only, got {self.rope_scaling.get('rope_type')!r}"
            )


class TelescopingLlama(Llama):
    """ibm-fms LLaMA whose attention (except tele_full_attn_layers) is TelescopingAttention."""

    def __init__(self, config: TeleLlamaConfig):
        config.validate()
        super().__init__(config)
        opts = config.tele_options()
        self.full_layers = frozenset(config.full_attn_layers())
        for i, layer in enumerate(self.base_model.layers):
            if i not in self.full_layers:
                layer.attn = TelescopingAttention(
                    config.emb_dim,
                    config.nheads,
                    config.kvheads or config.nheads,
                    opts,
                    config.rope_theta,
                    impl=config.tele_impl,
                    use_bias=config.attn_bias,
                    fused=config.fused_weights,
                    linear_config=config.linear_config,
                )

    def _tele_layers(self) -> list[TelescopingAttention]:
        return [l.attn for i, l in enumerate(self.base_model.layers) if i not in self.full_layers]

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, cache: InferenceCache | None = None, labels: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        if kwargs:
            raise TypeError(f"TelescopingLlama.forward takes input_ids, cache= and labels= only, got {sorted(kwargs)}")
        if cache is not None:
            return forward_with_cache(self, x, cache)
        tele = self._tele_layers()
        plan = tele[0].plan(x.shape[1], x.device) if tele else None
        h = self.base_model.embedding(x)
        for i, layer in enumerate(self.base_model.layers):
            h = layer(h) if i in self.full_layers else layer(h, tele_plan=plan)
        h = self.base_model.dec_norm(h)
        if labels is not None:  # the training loss, without the [tokens, vocab] logits
            return linear_cross_entropy(h, self.head.weight, labels)
        return self.head(h)

    def allocate_cache(
        self, batch_size: int, max_seq_len: int, device=None, dtype=None, options: DecodeOptions | None = None
    ) -> InferenceCache:
        return allocate_cache(self, batch_size, max_seq_len, device, dtype, options)
