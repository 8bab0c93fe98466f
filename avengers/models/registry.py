"""Variant name -> ModelSpec. The only place the trainer, exporter and benchmarks learn about models.

Every family module (llama.py, mamba.py, telescoping.py) calls `register()` at import time.
Every model built from a spec follows one contract:

    model(input_ids[B, T])               -> logits[B, T, V]   (training / full forward)
    model(input_ids[B, T], cache=cache)  -> logits[B, T, V]   (consumes T tokens, advances cache)
    model(input_ids[B, T], labels=labels[B, T]) -> mean next-token loss, fp32 scalar (ops/loss.py:
                                            the [B*T, V] logits are never materialised; -100 ignored)
    model.allocate_cache(batch_size, max_seq_len, device, dtype) -> avengers.decode.cache.InferenceCache
    model.init_weights()                 re-initialises every parameter (used after meta-device build)
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # "llama" | "mamba" | "telescoping"
    config: Any  # the family's own config object
    build_fn: Callable[[Any], nn.Module]  # config -> model, on torch's current default device
    block_types: tuple[type[nn.Module], ...]  # units for FSDP sharding, activation checkpointing, compile
    flops_fn: Callable[[Any, int], float]  # (config, seq_len) -> training FLOPs per token (fwd + bwd)
    vocab_size: int
    max_seq_len: int
    description: str = ""
    max_seq_len_is_limit: bool = False  # True: longer inputs fail (e.g. precomputed RoPE tables end there)

    def build(self, device: torch.device | str | None = None) -> nn.Module:
        """Build the model; on "meta" no memory is allocated (call to_empty + init_weights later).
        Its parameters are not guaranteed initialised (ibm-fms allocates its norm weights with
        torch.empty): call init_weights() or load a state dict before using it."""
        with torch.device(device or "cpu"):
            return self.build_fn(self.config)

    def flops_per_token(self, seq_len: int) -> float:
        return float(self.flops_fn(self.config, seq_len))

    def num_params(self) -> int:
        """Exact count of unique parameters (tied weights counted once), built on the meta device."""
        model = self.build("meta")
        return sum(p.numel() for p in model.parameters())

    def replace(self, **config_changes: Any) -> ModelSpec:
        """A copy whose family config has some fields changed (e.g. a hybrid's attention layers)."""
        if dataclasses.is_dataclass(self.config):
            config = dataclasses.replace(self.config, **config_changes)
        else:  # ibm-fms ModelConfig
            config = self.config.updated(**config_changes)
        vocab = config_changes.get("vocab_size", config_changes.get("src_vocab_size", self.vocab_size))
        return dataclasses.replace(self, config=config, vocab_size=vocab)


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"model variant {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def _load_families() -> None:
    # Imported lazily so `registry` stays importable from the family modules themselves.
    import importlib

    for module in ("llama", "mamba", "telescoping"):
        try:
            importlib.import_module(f"avengers.models.{module}")
        except ModuleNotFoundError as e:
            if e.name != f"avengers.models.{module}":
                raise


def list_variants() -> list[str]:
    _load_families()
    return sorted(_REGISTRY)


def get_model_spec(name: str) -> ModelSpec:
    _load_families()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model_variant {name!r}.{hint} Known variants: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]
