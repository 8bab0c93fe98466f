"""The training loop: config -> model (FSDP2) -> AdamW + schedule -> steps, metrics, checkpoints.

python -m avengers.train --config configs/demo.yaml             # one process (CPU or one GPU)
torchrun --nproc_per_node=8 -m avengers.train --config ...     # every visible GPU
"""

from __future__ import annotations

import importlib.util
import logging
import os
import random
import time
from typing import Any

import torch
from torch import nn

from avengers.config import ConfigError, TrainConfig, validate
from avengers.models import get_model_spec
from avengers.train import checks
from avengers.train import data as train_data
from avengers.train.checkpoint import Checkpointer, resolve_checkpoint
from avengers.train.float8 import convert_blocks_to_float8, float8_unavailable_reason
from avengers.train.metrics import MetricsLogger, build_profiler, mfu, peak_flops, peak_memory_gib
from avengers.train.nonfinite import StepStats
from avengers.train.parallel import build_mesh, find_blocks, init_distributed, parallelize
from avengers.train.preemption import StopOnSignal
from avengers.train.schedule import build_scheduler
from avengers.train.validation import build_validator

log = logging.getLogger(__name__)

NO_DECAY_SUFFIXES = ("A_log", "D", "dt_bias")  # Mamba's SSM parameters


def param_groups(model: nn.Module, weight_decay: float, decay_all: bool) -> list[dict[str, Any]]:
    """Decay matrices only: no decay on 1-D tensors (norms, biases), embeddings or Mamba's A_log/D/dt_bias."""
    if decay_all:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        skip = p.ndim < 2 or id(p) in embedding_params or leaf in NO_DECAY_SUFFIXES
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with the config's LR, betas, eps and weight decay over `param_groups`; fused: one kernel,
    and it can skip a non-finite step on the device (nonfinite.py)."""
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay, cfg.decay_all_params),
        lr=cfg.learning_rate,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.adam_eps,
        fused=True,
    )


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy through pinned memory so the host never waits for the GPU to drain (keeps launches ahead)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


def build_model(cfg: TrainConfig, spec, device: torch.device, mesh, mixed_precision: bool) -> nn.Module:
    """Full init on CPU then shard; with low_cpu_fsdp, shard on meta, materialise shards, then init."""
    if cfg.low_cpu_fsdp:
        model = spec.build("meta")
    else:
        model = spec.build("cpu")
        model.init_weights()
        model.to(device)
    if cfg.float8:
        convert_blocks_to_float8(model, [block for _, block in find_blocks(model, spec.block_types)])
    parallelize(
        model,
        spec.block_types,
        mesh,
        activation_checkpointing=cfg.fsdp_activation_checkpointing,
        selective=cfg.selective_checkpointing,
        compile_blocks=cfg.use_torch_compile,
        mixed_precision=mixed_precision,
        compile_cache_size_limit=cfg.compile_cache_size_limit,
    )
    if cfg.low_cpu_fsdp:
        model.to_empty(device=device)
        with torch.no_grad():
            model.init_weights()
    return model


def _check_tracker(cfg: TrainConfig) -> None:
    module = {"wandb": "wandb", "aim": "aim", "tensorboard": "torch.utils.tensorboard"}.get(cfg.tracker or "")
    if module and importlib.util.find_spec(module.split(".")[0]) is None:
        raise ConfigError(
            f"tracker={cfg.tracker!r} but {module} is not installed; pip install it, "
            f"or use tracker=None (metrics.jsonl is always written)"
        )
    if cfg.tracker == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("tracker='tensorboard' but tensorboard is not installed; pip install tensorboard")


def _check_load_path(cfg: TrainConfig) -> None:
    src = cfg.ckpt_load_path
    if not src or resolve_checkpoint(cfg.ckpt_save_path) is not None or os.path.isfile(src):
        return
    if os.path.realpath(src) == os.path.realpath(cfg.ckpt_save_path):
        return
    if not os.path.isdir(src) or resolve_checkpoint(src) is None:
        raise ConfigError(
            f"ckpt_load_path={src!r} is neither a model file nor a run/step folder with a complete "
            f"checkpoint (checkpoints/step_N_ckp/COMPLETE); use None to start from scratch"
        )


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) training; returns a summary with the last reported metrics.

    SIGUSR1 or SIGTERM ends it early: every rank stops after the same step, with a checkpoint.
    """
    with StopOnSignal(cfg.signal_check_interval) as stop:
        return _train(cfg, stop)


def _train(cfg: TrainConfig, stop: StopOnSignal) -> dict[str, Any]:
    info = init_distributed(cfg.device)
    logging.basicConfig(
        level=logging.INFO if info.rank == 0 else logging.WARNING, format="%(asctime)s %(name)s: %(message)s"
    )
    validate(cfg, info.world_size, info.local_world_size)
    _check_tracker(cfg)
    spec = get_model_spec(cfg.model_variant)
    checks.note_unused_vocab_size(cfg, spec.vocab_size)
    train_data.validate_data(cfg, info.world_size, spec.vocab_size)
    _check_load_path(cfg)
    if cfg.float8 and (reason := float8_unavailable_reason(spec.family, info.device)):
        raise ConfigError(reason)
    shapes = {name: tuple(t.shape) for name, t in spec.build("meta").state_dict().items()}
    checks.check_run_folder(cfg.ckpt_save_path, checks.checkpoint_bytes(spec.num_params(), cfg, info.world_size))
    ckpt = Checkpointer(cfg, info.rank, info.world_size)
    ckpt.check_model(cfg.model_variant, shapes)
    validator = build_validator(cfg, info.rank, info.world_size, info.device)

    device, rank, world = info.device, info.rank, info.world_size
    on_gpu = device.type == "cuda"
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    mixed = cfg.mixed_precision and on_gpu
    mesh = build_mesh(cfg.sharding_strategy, world, device.type, cfg.hsdp_shard_size or info.local_world_size)
    model = build_model(cfg, spec, device, mesh, mixed)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg.num_steps, cfg.training_stage, cfg.warmup_steps, cfg.min_lr_ratio)
    loader = train_data.build_loader(cfg, rank, world, spec.vocab_size)
    step, tokens_seen, how = ckpt.resume(model, optimizer, scheduler, loader)
    if rank == 0:  # only now: a launch that fails to start leaves the run's config.yaml as it was
        cfg.save(os.path.join(cfg.ckpt_save_path, "config.yaml"))
    metrics = MetricsLogger(cfg, rank, step)
    metrics.event(
        f"[avengers.train] {spec.name}: {spec.num_params() / 1e6:.1f}M params, world {world} "
        f"({cfg.sharding_strategy}, {device.type}), {how}"
    )

    flops_tok = spec.flops_per_token(cfg.seq_length)
    peak = peak_flops(device)
    tokens_per_step = world * cfg.batch_size * cfg.seq_length * cfg.grad_accum_steps
    last_step = min(cfg.num_steps, cfg.stop_at_step or cfg.num_steps)
    batches = iter(loader)
    profiler = build_profiler(cfg, rank)
    if profiler is not None:
        profiler.start()
    stats = StepStats(device, cfg.skip_nonfinite_steps)
    first_step = step + 1
    window_steps, window_start, summary = 0, time.perf_counter(), {}
    model.train()
    while step < last_step:
        for micro in range(cfg.grad_accum_steps):
            inputs, labels = (to_device(t, device) for t in next(batches))
            model.set_requires_gradient_sync(micro == cfg.grad_accum_steps - 1)
            loss = model(inputs, labels=labels) / cfg.grad_accum_steps  # no [tokens, vocab] logits held
            loss.backward()
            stats.add_loss(loss)
        gnorm = clip_grad_norm(model, cfg.grad_clip_thresh)
        stats.end_step(gnorm, optimizer, step + 1)  # a non-finite step's update is skipped on the device
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window_steps += 1
        tokens_seen += tokens_per_step
        metrics.step()
        ckpt.poll()  # commits an asynchronous save once every rank has written it
        if step == first_step:
            _report_first_step(metrics, step, window_start, device)
            if step % cfg.report_interval and step != last_step:  # the first window starts after it
                window_steps, window_start = 0, time.perf_counter()
        if profiler is not None:
            profiler.step()
        if stop.should_stop(step, device):
            last_step = step  # report, checkpoint and return after this step
        if step % cfg.report_interval == 0 or step == last_step:
            window = stats.report(step, world)  # raises NonFiniteError past skip_nonfinite_steps
            elapsed = time.perf_counter() - window_start
            tok_s = cfg.batch_size * cfg.seq_length * cfg.grad_accum_steps * window_steps / elapsed
            summary = {
                "step": step,
                "loss": window.loss,
                "lr": _lr_of_step(scheduler, step),
                "grad_norm": window.grad_norm,
                "skipped_steps": window.skipped_steps,
                "tokens_seen": tokens_seen,
                "tokens_per_s_per_gpu": tok_s,
                "step_time_s": elapsed / window_steps,
                "mfu": mfu(flops_tok, tok_s, peak),
                **peak_memory_gib(device),
            }
            metrics.log(summary)
            window_steps, window_start = 0, time.perf_counter()
        if validator is not None and (step % cfg.eval_interval == 0 or step == last_step):
            record = {"step": step, "tokens_seen": tokens_seen, **validator.evaluate(model)}
            metrics.log(record)
            window_start += record["eval_time_s"]  # evaluation is not training time
        if step % cfg.checkpoint_interval == 0 or (
            step == last_step and (cfg.save_final_checkpoint or stop.agreed is not None)
        ):
            t_save = time.perf_counter()
            stats.check()  # never save after more non-finite steps than allowed
            path = ckpt.save(step, tokens_seen, model, optimizer, scheduler, loader, blocking=step == last_step)
            stall = time.perf_counter() - t_save
            behind = ckpt.previous_write_wait_s
            of_which = f", {behind:.2f} s of it finishing the previous save's write" if behind >= 0.005 else ""
            metrics.event(
                f"[avengers.train] checkpoint step {step} -> {path} (the step loop waited {stall:.2f} s{of_which})"
            )
            window_start += stall  # the save is not training time
    ckpt.wait()  # an asynchronous save still being written is committed before the run ends
    if profiler is not None:
        profiler.stop()
    if stop.agreed is not None:
        metrics.event(f"[avengers.train] {stop.agreed.name}: stopped after step {step}; the same command resumes")
    metrics.close()
    return summary


def _report_first_step(metrics, step: int, start: float, device: torch.device) -> None:
    """Log how long a launch's first step took: it compiles the model and autotunes Triton kernels
    (Mamba-2's, on a cold cache), which no later step repeats."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    metrics.event(
        f"[avengers.train] step {step}: {time.perf_counter() - start:.1f} s, the launch's first step "
        "(compilation and kernel autotuning; the throughput report starts after it)"
    )


def _lr_of_step(scheduler, step: int) -> float:
    """The LR the optimizer used at `step` (the scheduler has already moved on to step + 1)."""
    return scheduler.base_lrs[0] * scheduler.lr_lambdas[0](step - 1)


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Global L2 norm over all (sharded) gradients, clipped in place when max_norm > 0; no host sync."""
    from torch.distributed.tensor import DTensor

    params = [p for p in model.parameters() if p.grad is not None]
    grads = [p.grad for p in params]
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
    return total
