"""A committed training checkpoint of a seeded model, written by the trainer's own Checkpointer."""

from __future__ import annotations

import warnings

import torch

from avengers.config import make_config
from avengers.models import get_model_spec
from avengers.train.checkpoint import Checkpointer


class _NoLoader:
    def state_dict(self) -> dict:
        return {}


def save_checkpoint(run_dir, model_variant: str, seed: int = 0, step: int = 1, **config) -> torch.nn.Module:
    """Build `model_variant` with seeded weights, save it as step `step` of the run `run_dir`; returns the model."""
    cfg = make_config(model_variant=model_variant, ckpt_save_path=str(run_dir), **config)
    torch.manual_seed(seed)
    model = get_model_spec(model_variant).build()
    model.init_weights()
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process.*")
        Checkpointer(cfg, rank=0, world_size=1).save(step, 0, model, optimizer, scheduler, _NoLoader())
    return model.eval()
