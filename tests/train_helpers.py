"""Run avengers.train in N forked processes on gloo (a torchrun stand-in that costs no re-import)."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BASE = dict(
    model_variant="llama3_tiny",
    use_dummy_dataset=True,
    seq_length=16,
    batch_size=2,
    report_interval=1,
    use_torch_compile=False,
    device="cpu",
    learning_rate=1e-3,
    sharding_strategy="fsdp",
)


def prepare_sample(out) -> str:
    """Tokenizes the bundled sample corpus into `out`/sample (dataset name "sample"); returns `out`."""
    sample = os.path.join(ROOT, "data", "sample")
    args = ["--source", "local", "--input", os.path.join(sample, "fineweb-edu-sample.parquet")]
    args += ["--tokenizer", os.path.join(sample, "tokenizer"), "--output", str(out), "--dataset", "sample"]
    cmd = [sys.executable, "-m", "avengers.data.prepare", *args, "--workers", "1"]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, env={**os.environ, "PYTHONPATH": ROOT})
    return str(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, overrides: dict, env: dict) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        **env,
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    from avengers.config import make_config
    from avengers.train.trainer import train

    train(make_config(**{**BASE, **overrides}))
    dist.destroy_process_group()


def start_training(world: int = 2, env: dict | None = None, **overrides) -> list[mp.Process]:
    """Starts the ranks (rank r is the r-th process) without waiting for them; `join_training` waits."""
    ctx = mp.get_context("fork")
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, overrides, env or {})) for r in range(world)]
    for p in procs:
        p.start()
    return procs


def run_training(world: int = 2, env: dict | None = None, timeout: float = 120, **overrides) -> list[int]:
    """Returns each process's exit code."""
    return join_training(start_training(world, env, **overrides), timeout)


def join_training(procs: list[mp.Process], timeout: float = 120) -> list[int]:
    """Waits for every rank (killing those still alive after `timeout` s); returns their exit codes."""
    for p in procs:
        p.join(timeout)
        if p.is_alive():
            p.kill()
            p.join()
    return [p.exitcode for p in procs]


def read_metrics(run_dir) -> dict[int, dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}
