"""mamba_ssm's save_pretrained folder layout: config.json + pytorch_model.bin, read and written."""

from __future__ import annotations

import json
import os

import torch

from avengers.models.mamba.config import MambaConfig
from avengers.models.mamba.model import MambaLM

CONFIG_NAME, WEIGHTS_NAME = "config.json", "pytorch_model.bin"


def save_pretrained(model: MambaLM, save_directory: str) -> None:
    """Write mamba_ssm's save_pretrained layout: config.json + pytorch_model.bin (full state dict)."""
    os.makedirs(save_directory, exist_ok=True)
    with open(os.path.join(save_directory, CONFIG_NAME), "w") as f:
        json.dump(model.config.to_mamba_ssm(), f, indent=4)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, os.path.join(save_directory, WEIGHTS_NAME))


def from_pretrained(
    path: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, **config_overrides
) -> MambaLM:
    """Load a mamba_ssm save_pretrained folder (ours or mamba_ssm's own)."""
    cfg_path, weights_path = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    for p in (cfg_path, weights_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(
                f"{p} not found: a mamba_ssm checkpoint folder holds {CONFIG_NAME} and {WEIGHTS_NAME}"
            )
    with open(cfg_path) as f:
        cfg = MambaConfig.from_mamba_ssm(json.load(f), **config_overrides)
    with torch.device("meta"):
        model = MambaLM(cfg)
    model.to_empty(device=device)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.backbone.embedding.weight
    state = torch.load(weights_path, map_location=device, weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.to(dtype) if dtype is not None else model
