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

With `async_checkpoint`, a periodic save copies the tensors to CPU memory (on CUDA: pinned buffers
allocated at the first save and refilled at every later one) and returns; a thread
writes them while training goes on (`dcp.async_save`, over gloo groups of its own). The small
per-rank files are written at once, so they hold the state of the step saved; the checkpoint is
committed (COMPLETE, rename) only once every rank's write has finished, polled between steps
(`poll`) and waited for before the next save and at the end (`wait`). Until then the previous
checkpoint is the newest complete one, exactly as during a blocking save.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
import time
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor

try:  # DCP's tensor copier (torch >= 2.8); older releases stage with DCP's default
    from torch.distributed.checkpoint._state_dict_stager import StateDictStager
except ImportError:
    StateDictStager = None

from avengers.train.checkpoint_files import (
    MARKER,
    checkpoints_dir,
    complete_checkpoints,
    find_problem,
    resolve_checkpoint,
    saved_shapes,
    saved_variant,
    shape_mismatch,
    strip_wrapper_prefixes,
)

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved or loaded; the message names the folder and what to do."""


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


def _describe(exc: BaseException) -> str:
    """One line per failure; DCP's CheckpointException carries one exception per failed rank."""
    if isinstance(exc, CheckpointException):
        return "; ".join(f"{type(e).__name__}: {e}" for e, _ in exc.failures.values())
    return f"{type(exc).__name__}: {exc}"


def _no_space(exc: BaseException | None) -> bool:
    """ENOSPC or EDQUOT anywhere in the exception, its DCP failures or its causes."""
    seen = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(e, CheckpointException):
            stack += [failure for failure, _ in e.failures.values()]
        stack += [e.__cause__, e.__context__]
    return False


def _gather(problem: Any) -> list[tuple[int, Any]]:
    """(rank, problem) of every rank whose problem is not None. A collective: every rank must call it,
    so that a failure on one rank makes all ranks take the same branch instead of waiting for it."""
    if not dist.is_initialized():
        return [] if problem is None else [(0, problem)]
    problems: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    return [(rank, p) for rank, p in enumerate(problems) if p is not None]


def _all_finite(model: nn.Module, optimizer: torch.optim.Optimizer) -> bool:
    """True if every rank's shards of the weights and the optimizer state are finite (one all-reduce)."""
    tensors = list(model.parameters()) + [
        v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v) and v.is_floating_point()
    ]
    flags = [torch.isfinite(t.to_local() if isinstance(t, DTensor) else t).all() for t in tensors]
    ok = torch.stack(flags).all().to(torch.int32)
    if dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def _torch_load(path: str) -> Any:
    try:
        return torch.load(path, weights_only=False)
    except Exception as e:  # noqa: BLE001 - EOFError, RuntimeError, zip and pickle errors: all name the file
        raise CheckpointError(f"{path}: {type(e).__name__}: {e}") from None


@dataclass
class _PendingSave:
    step: int
    tmp: str
    final: str
    write: Future


class StagingBuffers(AsyncStager):
    """Where an asynchronous save copies the tensors before its thread writes them. On CUDA: pinned
    CPU buffers, kept from one save to the next (allocated once; the previous save has finished
    writing from them before the next one refills them), filled by non-blocking copies; DCP's
    default copies into fresh pageable memory at every save, several times slower. On the CPU:
    plain copies, also kept.

    It drives DCP's own copier (StateDictStager) rather than its DefaultStager: torch 2.11's
    DefaultStager closes that copier after every stage, which drops the buffers and fails the next
    save with "KeyError: <class 'type'>"."""

    _synchronize_after_execute = False  # stage() returns only once the copies are done

    def __init__(self) -> None:
        self._cuda = torch.cuda.is_available()
        self._copier = None

    def stage(self, state_dict):
        if self._copier is None:
            self._copier = StateDictStager(pin_memory=self._cuda, share_memory=False)
        staged = self._copier.stage(state_dict, non_blocking=self._cuda)
        if self._cuda:
            torch.cuda.current_stream().synchronize()
        return staged

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        """Frees the buffers; a later stage() allocates new ones."""
        if self._copier is not None:
            self._copier.close()
            self._copier = None


class Checkpointer:
    def __init__(self, cfg, rank: int, world_size: int):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.root = checkpoints_dir(cfg.ckpt_save_path)
        self._candidates: list[str] | None = None
        self._pending: _PendingSave | None = None
        self.previous_write_wait_s = 0.0  # what the last save() spent finishing the save before it
        self._write_group = self._poll_group = self._stager = None
        if getattr(cfg, "async_checkpoint", False) and dist.is_initialized():
            # the writer thread's collectives and the main thread's polls never share a group
            self._write_group, self._poll_group = dist.new_group(backend="gloo"), dist.new_group(backend="gloo")
            self._stager = StagingBuffers() if StateDictStager is not None else None

    # ------------------------------------------------------------------ save
    def save(
        self,
        step: int,
        tokens_seen: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler,
        loader,
        blocking: bool = True,
    ) -> str:
        """Write and commit step N's checkpoint, or raise CheckpointError on every rank and leave the
        newest committed checkpoint as it was (the partial folder is removed). blocking=False (with
        async_checkpoint): return once the tensors are staged; the commit follows (poll, wait). A
        save still being written when the next one starts is finished first (previous_write_wait_s)."""
        t0 = time.perf_counter()
        self.wait()
        self.previous_write_wait_s = time.perf_counter() - t0
        final = os.path.join(self.root, f"step_{step}_ckp")
        tmp = final + ".tmp"
        if not _all_finite(model, optimizer):
            raise CheckpointError(
                f"step {step}: the weights or optimizer state hold NaN/inf values, so no checkpoint was saved; "
                f"the newest checkpoint is still {resolve_checkpoint(self.cfg.ckpt_save_path)}"
            )

        def start() -> None:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed save
                os.makedirs(tmp)

        def write_state_files() -> None:  # the step's own state, whatever happens to the tensors' write
            torch.save(loader.state_dict(), os.path.join(tmp, f"loader_state_{self.rank}.pt"))
            torch.save(_rng_state(), os.path.join(tmp, f"rng_state_{self.rank}.pt"))
            if self.rank == 0:
                self._write_train_state(step, tokens_seen, scheduler, tmp)

        def write_tensors() -> None:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            if blocking or self._write_group is None:
                dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
            else:
                staging = {"async_stager": self._stager} if self._stager is not None else {}
                write = dcp.async_save(
                    {"model": model_sd, "optim": optim_sd},
                    checkpoint_id=tmp,
                    process_group=self._write_group,
                    **staging,
                )
                self._pending = _PendingSave(step, tmp, final, write)

        for phase in (start, write_state_files, write_tensors):  # each ends with every rank in step
            self._run(phase, step, tmp)
        if self._pending is None:
            self._run(self._commit_phase(step, tmp, final), step, tmp)
            log.info("saved checkpoint %s", final)
        return final

    def poll(self) -> None:
        """Commit a pending asynchronous save if every rank's write has finished (a CPU all-reduce
        over a gloo group; nothing when no save is pending)."""
        if self._pending is None:
            return
        done = torch.tensor([int(self._pending.write.done())])
        dist.all_reduce(done, op=dist.ReduceOp.MIN, group=self._poll_group)
        if done.item():
            self.wait()

    def wait(self) -> None:
        """Finish and commit a pending asynchronous save (every rank calls this at the same step)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        self._run(pending.write.result, pending.step, pending.tmp)
        self._run(self._commit_phase(pending.step, pending.tmp, pending.final), pending.step, pending.tmp)
        log.info("saved checkpoint %s (written while training went on)", pending.final)

    def _commit_phase(self, step: int, tmp: str, final: str):
        def commit() -> None:
            if self.rank == 0:
                self._commit(step, tmp, final)

        return commit

    def _run(self, phase, step: int, tmp: str) -> None:
        try:
            phase()
            problem = None
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - reported on every rank below
            problem = (_no_space(e), _describe(e))
        failed = _gather(problem)
        if not failed:
            return
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        newest = resolve_checkpoint(self.cfg.ckpt_save_path) or "none"
        detail = "; ".join(f"rank {r}: {text}" if self.world_size > 1 else text for r, (_, text) in failed)
        if any(no_space for _, (no_space, _) in failed):
            free = shutil.disk_usage(self.cfg.ckpt_save_path).free / 2**30
            raise CheckpointError(
                f"checkpoint of step {step}: no space left on the device of {self.root} ({free:.2f} GiB free; "
                f"{detail}). The partial save was removed; the newest complete checkpoint ({newest}) is intact. "
                f"Free space or lower ckpt_keep_last, then resume"
            )
        raise CheckpointError(
            f"checkpoint of step {step} could not be written to {tmp} ({detail}). The partial save was removed; "
            f"the newest complete checkpoint ({newest}) is intact"
        )

    def _write_train_state(self, step: int, tokens_seen: int, scheduler, tmp: str) -> None:
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

    def _commit(self, step: int, tmp: str, final: str) -> None:
        with open(os.path.join(tmp, MARKER), "w") as f:
            f.write(f"{step}\n")
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(final):  # re-saving a step (e.g. a rerun with the same stop step)
            shutil.rmtree(final)
        os.rename(tmp, final)
        self._prune(keep_path=final)

    def _prune(self, keep_path: str | None = None) -> None:
        """Keep the newest ckpt_keep_last checkpoints by step, and always the one just saved (a resume that
        fell back past a damaged newer checkpoint saves below it)."""
        keep = self.cfg.ckpt_keep_last
        found = complete_checkpoints(self.cfg.ckpt_save_path)
        if keep > 0:
            for _, path in found[:-keep]:
                if path != keep_path:
                    shutil.rmtree(path, ignore_errors=True)
        for name in os.listdir(self.root):
            if name.endswith(".tmp"):  # only rank 0 commits, so no other save is in flight
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)

    # ---------------------------------------------------------------- resume
    def own_checkpoints(self) -> list[str]:
        """This run's committed checkpoints whose files are whole, newest first (see whole_checkpoints)."""
        if self._candidates is None:
            self._candidates = whole_checkpoints(self.cfg.ckpt_save_path)
        return self._candidates

    def check_model(self, model_variant: str, expected_shapes: dict[str, tuple[int, ...]]) -> None:
        """Before the model is built: the checkpoint that resume() will load holds this variant's parameters."""
        from avengers.config import ConfigError

        own = self.own_checkpoints()
        flag, src = "ckpt_save_path", self.cfg.ckpt_save_path
        source = own[0] if own else None
        if source is None:
            flag, src = "ckpt_load_path", self.cfg.ckpt_load_path
            if not src or _same_path(src, self.cfg.ckpt_save_path) or not os.path.exists(src):
                return
            source = src if os.path.isfile(src) else resolve_checkpoint(src)
            if source is None:
                return
        try:
            mismatch = shape_mismatch(saved_shapes(source), expected_shapes)
        except Exception as e:  # noqa: BLE001 - an unreadable file is reported with its path
            raise ConfigError(f"{flag}={src!r}: cannot read the parameter shapes of {source} ({e})") from None
        variant = saved_variant(source) if os.path.isdir(source) else None
        if mismatch is None:
            if variant and variant != model_variant:
                log.warning("%s holds model_variant %r with the same shapes as %r", source, variant, model_variant)
            return
        if variant is None:
            raise ConfigError(f"{flag}={src!r}: {source} does not fit model_variant {model_variant!r}: {mismatch}")
        if variant == model_variant:
            raise ConfigError(
                f"{flag}={src!r}: {source} was saved by an earlier definition of model_variant {variant!r}: {mismatch}"
            )
        raise ConfigError(
            f"{flag}={src!r} holds a checkpoint of model_variant {variant!r}, but this run is {model_variant!r} "
            f"({mismatch}); use --model_variant={variant} or another {flag}"
        )

    def resume(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, loader) -> tuple[int, int, str]:
        """Load the newest loadable checkpoint of this run, else ckpt_load_path. Returns (step, tokens, how)."""
        failures = []
        for path in self.own_checkpoints():
            try:
                step, tokens = self._load_everywhere(path, model, optimizer, scheduler, loader, load_loader=True)
            except CheckpointError as e:
                log.warning("%s; falling back to the previous complete checkpoint", e)
                failures.append(str(e))
                continue
            return step, tokens, f"resumed from {path} (step {step})"
        if failures:
            raise CheckpointError(f"no checkpoint under {self.root} could be loaded: {'; '.join(failures)}")
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
        self._load_everywhere(
            path, model, optimizer, scheduler, loader, load_loader=self.cfg.resuming_dataset, keep_progress=False
        )
        what = "model, optimizer and data state" if self.cfg.resuming_dataset else "model and optimizer"
        return 0, 0, f"continued from {path} ({what}; step, tokens and LR schedule restart)"

    def _load_everywhere(self, path: str, *args, **kwargs) -> tuple[int, int]:
        """_load_full on every rank; if it fails on any rank, CheckpointError on all of them."""
        try:
            result, problem = self._load_full(path, *args, **kwargs), None
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - reported on every rank below
            result, problem = None, _describe(e)
        failed = _gather(problem)
        if failed:
            detail = "; ".join(f"rank {r}: {text}" if self.world_size > 1 else text for r, text in failed)
            raise CheckpointError(f"checkpoint {path} could not be loaded ({detail})")
        return result

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
        train_state = _torch_load(os.path.join(path, "train_state.pt"))
        scheduler.load_state_dict(train_state["scheduler"])
        rng = os.path.join(path, f"rng_state_{self.rank}.pt")
        if os.path.exists(rng):
            _set_rng_state(_torch_load(rng))
        return int(train_state["step"]), int(train_state["tokens_seen"])

    def _load_loader(self, path: str, loader) -> None:
        """Every rank reads all saved ranks' states (the loader rescales when the world changed)."""
        n = len([f for f in os.listdir(path) if f.startswith("loader_state_")])
        loader.load_state_dict([_torch_load(os.path.join(path, f"loader_state_{r}.pt")) for r in range(n)])


def whole_checkpoints(run_dir: str, model_only: bool = False) -> list[str]:
    """The committed checkpoints of a run whose files are whole, newest first. A damaged one is skipped
    with a warning; if every one is damaged, CheckpointError (never a silent fresh start)."""
    found = [path for _, path in reversed(complete_checkpoints(run_dir))]
    whole, problems = [], []
    for path in found:
        problem = find_problem(path, model_only)
        if problem is None:
            whole.append(path)
        else:
            problems.append(problem)
            log.warning("checkpoint %s is damaged (%s); falling back to the previous one", path, problem)
    if found and not whole:
        raise CheckpointError(
            f"every complete checkpoint under {checkpoints_dir(run_dir)} is damaged ({'; '.join(problems)}); "
            f"restore them, or move them away to start this run from scratch"
        )
    return whole


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
    sd = {strip_wrapper_prefixes(k): v for k, v in obj.items()}
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
    if step_dir != path:  # a run folder: its newest checkpoint whose model files are whole
        step_dir = whole_checkpoints(path, model_only=True)[0]
    problem = find_problem(step_dir, model_only=True)
    if problem is not None:
        raise CheckpointError(f"checkpoint {step_dir} is damaged: {problem}")
    cfg = make_config(os.path.join(step_dir, "config.yaml"))
    model = get_model_spec(cfg.model_variant).build(device)
    model.init_weights()
    sd = model.state_dict()
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.load({"model": sd}, checkpoint_id=step_dir)
    model.load_state_dict(sd)
    return model.eval(), cfg
