"""The only writer of training checkpoints (torch.distributed.checkpoint, committed atomically).

Layout of one checkpoint, `<ckpt_save_path>/checkpoints/step_<N>_ckp/`:

    .metadata, __<r>_0.distcp   DCP: {"model": ..., "optim": ...} (sharded; loads on any world size)
    train_state.pt              rank 0: step, tokens_seen, LR-scheduler state, world size
    loader_state_<r>.pt         rank r: its data loader's state_dict()
    rng_state_<r>.pt            rank r: torch / CUDA / python RNG states
    config.yaml, metadata.json  the resolved config; step, tokens, world size, time (human readable)
    COMPLETE                    written last; a folder without it is never loaded

Everything is written into `step_<N>_ckp.tmp` and renamed after every rank has finished, so a
crash during a save leaves the previous checkpoint as the newest complete one.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
_STEP_RE = re.compile(r"^step_(\d+)_ckp$")
_FAULT_ENV = "AVENGERS_FAULT_IN_SAVE"  # tests: exit abruptly inside the save of this step


def checkpoints_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def complete_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, folder) of every committed checkpoint under run_dir/checkpoints, oldest first."""
    root = checkpoints_dir(run_dir)
    found = []
    if os.path.isdir(root):
        for name in os.listdir(root):
            m = _STEP_RE.match(name)
            path = os.path.join(root, name)
            if m and os.path.isfile(os.path.join(path, MARKER)):
                found.append((int(m.group(1)), path))
    return sorted(found)


def resolve_checkpoint(path: str) -> str | None:
    """A committed step folder, or the newest one in a run folder; None if there is none."""
    if os.path.isfile(os.path.join(path, MARKER)):
        return path
    found = complete_checkpoints(path)
    return found[-1][1] if found else None


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _strip_prefixes(sd: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in sd.items():
        for junk in ("_orig_mod.", "_checkpoint_wrapped_module.", "module."):
            key = key.replace(junk, "")
        out[key] = value
    return out


class Checkpointer:
    def __init__(self, cfg, rank: int, world_size: int):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.root = checkpoints_dir(cfg.ckpt_save_path)

    # ------------------------------------------------------------------ save
    def save(
        self, step: int, tokens_seen: int, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, loader
    ) -> str:
        final = os.path.join(self.root, f"step_{step}_ckp")
        tmp = final + ".tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed save
            os.makedirs(tmp)
        _barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
        if os.environ.get(_FAULT_ENV) == str(step):
            os._exit(17)
        torch.save(loader.state_dict(), os.path.join(tmp, f"loader_state_{self.rank}.pt"))
        torch.save(_rng_state(), os.path.join(tmp, f"rng_state_{self.rank}.pt"))
        _barrier()
        if self.rank == 0:
            train_state = {
                "step": step,
                "tokens_seen": tokens_seen,
                "scheduler": scheduler.state_dict(),
                "world_size": self.world_size,
            }
            torch.save(train_state, os.path.join(tmp, "train_state.pt"))
            self.cfg.save(os.path.join(tmp, "config.yaml"))
            meta = {
                "step": step,
                "tokens_seen": tokens_seen,
                "world_size": self.world_size,
                "model_variant": self.cfg.model_variant,
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            with open(os.path.join(tmp, "metadata.json"), "w") as f:
                json.dump(meta, f, indent=2)
            with open(os.path.join(tmp, MARKER), "w") as f:
                f.write(f"{step}\n")
                f.flush()
                os.fsync(f.fileno())
            if os.path.exists(final):  # re-saving a step (e.g. a rerun with the same stop step)
                shutil.rmtree(final)
            os.rename(tmp, final)
            self._prune()
        _barrier()
        log.info("saved checkpoint %s", final)
        return final

    def _prune(self) -> None:
        keep = self.cfg.ckpt_keep_last
        found = complete_checkpoints(self.cfg.ckpt_save_path)
        if keep > 0:
            for _, path in found[:-keep]:
                shutil.rmtree(path, ignore_errors=True)
        for name in os.listdir(self.root):
            if name.endswith(".tmp"):  # only rank 0 commits, so no other save is in flight
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)

    # ---------------------------------------------------------------- resume
    def resume(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, loader) -> tuple[int, int, str]:
        """Load the newest complete checkpoint of this run, else ckpt_load_path. Returns (step, tokens, how)."""
        own = resolve_checkpoint(self.cfg.ckpt_save_path)
        if own is not None:
            step, tokens = self._load_full(own, model, optimizer, scheduler, loader, load_loader=True)
            return step, tokens, f"resumed from {own} (step {step})"
        src = self.cfg.ckpt_load_path
        if not src or _same_path(src, self.cfg.ckpt_save_path):
            return 0, 0, "started from scratch"
        if os.path.isfile(src):
            load_model_file(model, src)
            return 0, 0, f"initialised the model from {src} (model only; optimizer, data and step are new)"
        path = resolve_checkpoint(src) if os.path.isdir(src) else None
        if path is None:
            raise FileNotFoundError(
                f"ckpt_load_path={src!r} is neither a model file nor a folder with a complete checkpoint "
                f"(a run folder with checkpoints/step_N_ckp/{MARKER}, or such a step folder)"
            )
        self._load_full(
            path, model, optimizer, scheduler, loader, load_loader=self.cfg.resuming_dataset, keep_progress=False
        )
        what = "model, optimizer and data state" if self.cfg.resuming_dataset else "model and optimizer"
        return 0, 0, f"continued from {path} ({what}; step, tokens and LR schedule restart)"

    def _load_full(
        self, path: str, model, optimizer, scheduler, loader, load_loader: bool, keep_progress: bool = True
    ) -> tuple[int, int]:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        if load_loader:
            self._load_loader(path, loader)
        if not keep_progress:
            _restart_optimizer_hparams(optimizer, scheduler, self.cfg)
            return 0, 0
        train_state = torch.load(os.path.join(path, "train_state.pt"), weights_only=False)
        scheduler.load_state_dict(train_state["scheduler"])
        rng = os.path.join(path, f"rng_state_{self.rank}.pt")
        if os.path.exists(rng):
            _set_rng_state(torch.load(rng, weights_only=False))
        return int(train_state["step"]), int(train_state["tokens_seen"])

    def _load_loader(self, path: str, loader) -> None:
        """Every rank reads all saved ranks' states (the loader rescales when the world changed)."""
        n = len([f for f in os.listdir(path) if f.startswith("loader_state_")])
        states = [torch.load(os.path.join(path, f"loader_state_{r}.pt"), weights_only=False) for r in range(n)]
        loader.load_state_dict(states)


def _same_path(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _restart_optimizer_hparams(optimizer: torch.optim.Optimizer, scheduler, cfg) -> None:
    """Continued pre-training: keep Adam moments, take LR schedule and hyper-parameters from cfg."""
    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.learning_rate
        group["betas"] = (cfg.beta1, cfg.beta2)
        group["eps"] = cfg.adam_eps
        if group["weight_decay"] > 0:
            group["weight_decay"] = cfg.weight_decay
    scheduler.base_lrs = [cfg.learning_rate] * len(optimizer.param_groups)
    scheduler.last_epoch = 0
    for group, fn in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["lr"] = cfg.learning_rate * fn(0)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def load_model_file(model: nn.Module, path: str) -> None:
    """Model weights from one torch file: {"model_state": sd}, {"model": sd} (dcp_to_torch_save) or sd."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model_state", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    sd = _strip_prefixes(obj)
    expected = set(get_model_state_dict(model))
    missing, unexpected = expected - set(sd), set(sd) - expected
    if missing or unexpected:
        raise KeyError(
            f"{path}: does not match the model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True))


def load_model_from_checkpoint(path: str, device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """(model in eval mode, TrainConfig) from a run folder (newest checkpoint) or a step folder.

    Works in a plain single process: no process group and no GPU are needed.
    """
    from avengers.config import make_config
    from avengers.models import get_model_spec

    step_dir = resolve_checkpoint(path)
    if step_dir is None:
        raise FileNotFoundError(
            f"{path!r} holds no complete checkpoint (expected a run folder with "
            f"checkpoints/step_N_ckp/{MARKER} or such a step folder)"
        )
    cfg = make_config(os.path.join(step_dir, "config.yaml"))
    model = get_model_spec(cfg.model_variant).build(device)
    model.init_weights()
    sd = model.state_dict()
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.load({"model": sd}, checkpoint_id=step_dir)
    model.load_state_dict(sd)
    return model.eval(), cfg
