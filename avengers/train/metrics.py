"""Rank-0 metrics: metrics.jsonl (always), wandb / aim / tensorboard (chosen by `tracker`), tqdm on a TTY.

MFU = flops_per_token(seq_length) * tokens/s/GPU / peak dense bf16 FLOP/s of the device.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

import torch

from avengers.hardware import device_spec

log = logging.getLogger(__name__)


def peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of one device, or None where unknown (CPU, unlisted GPUs)."""
    return device_spec(device).bf16_flops


def mfu(flops_per_token: float, tokens_per_s_per_device: float, peak: float | None) -> float | None:
    return None if not peak else flops_per_token * tokens_per_s_per_device / peak


def peak_memory_gib(device: torch.device) -> dict[str, float]:
    """CUDA: the window's peaks, and alloc_retries, how often the caching allocator ran out, freed
    its cache and retried since the run started (each retry stalls the step; a growing count means
    the batch barely fits)."""
    if device.type == "cuda":
        out = {
            "mem_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "mem_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
            "alloc_retries": torch.cuda.memory_stats(device).get("num_alloc_retries", 0),
        }
        torch.cuda.reset_peak_memory_stats(device)
        return out
    import resource

    return {"cpu_max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


class MetricsLogger:
    """Writes on rank 0 only; other ranks get a no-op logger."""

    def __init__(self, cfg, rank: int, start_step: int):
        self.enabled = rank == 0
        self.cfg = cfg
        self.path = os.path.join(cfg.ckpt_save_path, "metrics.jsonl")
        self.tracker = None
        self.bar = None
        if not self.enabled:
            return
        os.makedirs(cfg.ckpt_save_path, exist_ok=True)
        self.file = open(self.path, "a")
        if cfg.tracker:
            self.tracker = _open_tracker(cfg)
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.num_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def step(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")  # unix seconds
        self.file.flush()
        text = " ".join(f"{k}={_fmt(v)}" for k, v in record.items())
        if self.bar is not None:
            if "loss" in record:  # eval records carry eval_loss only
                loss = record["loss"]  # None when every step of the window was skipped as non-finite
                self.bar.set_postfix(loss="n/a" if loss is None else f"{loss:.4f}")
            self.bar.write(text)
        else:
            print(text, flush=True)
        if self.tracker is not None:
            self.tracker(record)

    def event(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.bar is not None:
                self.bar.close()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "n/a" if v is None else str(v)


def _open_tracker(cfg):
    """Returns record -> None for the chosen tracker; imported lazily, a clear error if missing."""
    name = cfg.tracker
    root = cfg.tracker_dir or os.path.join(cfg.ckpt_save_path, "tracker")
    try:
        if name == "wandb":
            import wandb

            run = wandb.init(
                project=cfg.tracker_project_name, dir=root, id=cfg.tracker_run_id, resume="allow", config=cfg.to_dict()
            )
            return lambda r: run.log({k: v for k, v in r.items() if v is not None}, step=r["step"])
        if name == "aim":
            import aim

            run = aim.Run(experiment=cfg.tracker_project_name, repo=root, run_hash=cfg.tracker_run_id)
            run["hparams"] = cfg.to_dict()
            return lambda r: [
                run.track(v, name=k, step=r["step"])
                for k, v in r.items()
                if k != "step" and isinstance(v, (int, float))
            ]
        if name == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=os.path.join(root, cfg.tracker_run_id or "tb"))

            def write(r):
                for k, v in r.items():
                    if k != "step" and isinstance(v, (int, float)):
                        writer.add_scalar(k, v, r["step"])
                writer.flush()

            return write
    except ImportError as e:
        pip = {"wandb": "wandb", "aim": "aim", "tensorboard": "tensorboard"}[name]
        raise RuntimeError(
            f"tracker={name!r} but it is not installed ({e}); pip install {pip}, "
            f"or use tracker=None (metrics.jsonl is always written)"
        ) from None
    raise ValueError(f"tracker={name!r}: expected None, wandb, aim or tensorboard")


def write_operator_tables(averages, path: str, sorts: tuple[str, ...]) -> None:
    """The top 40 operators of a profile's key averages, one table per sort key."""
    with open(path, "w") as f:
        for i, sort in enumerate(sorts):
            f.write(("\n" if i else "") + f"top operators over the 3 profiled steps, by {sort}\n")
            f.write(averages.table(sort_by=sort, row_limit=40))


def build_profiler(cfg, rank: int):
    """torch.profiler over 6 steps (wait 1, warmup 2, active 3): a trace under <run>/profile_traces and,
    beside it, ops_rank<r>.txt, the top operators by self device time and by self CPU time (CPU time
    alone without a GPU), and on a GPU host_gpu_rank<r>.txt, whether the host or the GPU sets the step
    (trace_summary); or None."""
    if not cfg.use_profiler or (cfg.profiler_rank0_only and rank != 0):
        return None
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

    from avengers.train.trace_summary import write_for_newest_trace

    on_gpu = torch.cuda.is_available()
    folder = os.path.join(cfg.ckpt_save_path, "profile_traces")
    write_trace = tensorboard_trace_handler(folder, worker_name=f"rank{rank}")

    def on_trace_ready(prof) -> None:
        write_trace(prof)
        # On a GPU also by host time: when the kernels finish faster than the host launches them, the
        # host sets the step, and the device-time table alone does not show it (Mamba-2 at batch 2).
        sorts = ("self_device_time_total", "self_cpu_time_total") if on_gpu else ("self_cpu_time_total",)
        write_operator_tables(prof.key_averages(), os.path.join(folder, f"ops_rank{rank}.txt"), sorts)
        try:  # a diagnosis: never the reason a run stops
            summary = write_for_newest_trace(folder, f"rank{rank}", os.path.join(folder, f"host_gpu_rank{rank}.txt"))
        except (OSError, ValueError, KeyError) as e:
            log.warning("profiler: no host/GPU summary of the trace: %s", e)
            summary = None
        if summary is not None:
            log.info("profiler: %s (host_gpu_rank%d.txt)", summary.verdict(), rank)
        log.info("profiler: trace and operator tables in %s", folder)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    return profile(
        activities=activities,
        schedule=schedule(wait=1, warmup=2, active=3, repeat=1),
        on_trace_ready=on_trace_ready,
        profile_memory=True,
        record_shapes=True,
        with_stack=False,
    )
