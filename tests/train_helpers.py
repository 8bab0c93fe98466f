"""Run avengers.train in N processes on gloo (a torchrun stand-in), with faults injected from the test side.

The ranks fork from a forkserver that imported torch and the trainer once (no re-import per launch),
not from the test process: process groups that earlier tests created and destroyed there leave state
that breaks ranks forked from it (two were enough for their checkpoints to write overlapping shards,
or for them to crash). Their stdout and stderr go to files that `join_training` writes into the test
process's own, so `capfd` sees them."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import tempfile

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
FAULT_EXIT_CODE = 19  # what a process killed by an injected fault exits with


def prepare_sample(out) -> str:
    """Tokenizes the bundled sample corpus into `out`/sample (dataset name "sample"); returns `out`."""
    sample = os.path.join(ROOT, "data", "sample")
    args = ["--source", "local", "--input", os.path.join(sample, "fineweb-edu-sample.parquet")]
    args += ["--tokenizer", os.path.join(sample, "tokenizer"), "--output", str(out), "--dataset", "sample"]
    cmd = [sys.executable, "-m", "avengers.data.prepare", *args, "--workers", "1"]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, env={**os.environ, "PYTHONPATH": ROOT})
    return str(out)


def sample_data_flags(out) -> dict:
    """Trainer flags for the real loader on the sample corpus prepared into `out` (one worker per rank)."""
    return dict(
        use_dummy_dataset=False,
        data_path=prepare_sample(out),
        datasets="sample",
        logical_shards=8,
        num_workers=1,
        eos_token=1,
        bos_token=0,
        seq_length=32,
        shuffle_buffer=16,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _DieAfterSteps:
    """A loader that ends the process abruptly (os._exit, like kill -9: no cleanup, no exception) when
    the trainer asks for the batch after `steps` batches, i.e. once that many optimizer steps, their
    reports and their checkpoints are done (one batch per step: grad_accum_steps=1, fresh run)."""

    def __init__(self, loader, steps: int):
        self.loader, self.steps = loader, steps

    def __iter__(self):
        for n, batch in enumerate(self.loader):
            if n == self.steps:
                os._exit(FAULT_EXIT_CODE)
            yield batch

    def __getattr__(self, name):  # state_dict / load_state_dict for the checkpointer
        return getattr(self.loader, name)


def _inject_fault(
    die_after_step: int | None, die_in_save: int | None, nan_at_steps: tuple[int, ...], disk_full_in_save: int | None
) -> None:
    """Patch, in this process only, the trainer's data, its loss or its file writes to fail at chosen points."""
    if die_after_step is not None:
        from avengers.train import data as train_data

        build_loader = train_data.build_loader
        train_data.build_loader = lambda *a, **k: _DieAfterSteps(build_loader(*a, **k), die_after_step)
    if die_in_save is not None:
        import torch.distributed.checkpoint as dcp

        save = dcp.save

        def save_then_die(state, *, checkpoint_id, **kwargs):
            out = save(state, checkpoint_id=checkpoint_id, **kwargs)
            if str(checkpoint_id).endswith(f"step_{die_in_save}_ckp.tmp"):
                os._exit(FAULT_EXIT_CODE)  # the tensors are written, the checkpoint is not committed
            return out

        dcp.save = save_then_die
    if disk_full_in_save is not None:
        import errno

        import torch

        torch_save = torch.save

        def save_on_a_full_disk(obj, f, *args, **kwargs):
            if f"step_{disk_full_in_save}_ckp.tmp{os.sep}loader_state_" in str(f):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
            return torch_save(obj, f, *args, **kwargs)

        torch.save = save_on_a_full_disk
    if nan_at_steps:
        from avengers.ops import loss as loss_module

        apply, calls = loss_module._LinearCrossEntropy.apply, [0]

        def nan_loss(*args):  # every family's training loss; one call per step when grad_accum_steps=1
            calls[0] += 1
            loss = apply(*args)
            return loss * float("nan") if calls[0] in nan_at_steps else loss

        loss_module._LinearCrossEntropy.apply = nan_loss


def _worker(rank: int, world: int, port: int, overrides: dict, env: dict, faults: dict, logs: str) -> None:
    for fd, name in ((1, "out"), (2, "err")):
        f = os.open(os.path.join(logs, f"rank{rank}.{name}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(f, fd)
        os.close(f)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        **env,
    )
    import logging
    import sys

    import torch

    torch.set_num_threads(1)
    logging.root.handlers.clear()  # pytest's capture handlers: the trainer logs to stderr, as on the command line
    from avengers.train.__main__ import main

    _inject_fault(**faults)
    sys.exit(main([f"--{key}={value}" for key, value in {**BASE, **overrides}.items()]))


def start_training(
    world: int = 2,
    env: dict | None = None,
    die_after_step: int | None = None,
    die_in_save: int | None = None,
    nan_at_steps: tuple[int, ...] = (),
    disk_full_in_save: tuple[int, int] | None = None,
    **overrides,
) -> list[mp.Process]:
    """Start `python -m avengers.train` with BASE + overrides as flags on `world` ranks (rank r is
    the r-th process) without waiting for them; `join_training` waits.

    Injected faults: die_after_step=N, every process exits abruptly (FAULT_EXIT_CODE) after optimizer
    step N; die_in_save=N, inside step N's save, after DCP wrote the tensors; nan_at_steps, the loss
    of those steps (counted from 1 in this launch) is NaN; disk_full_in_save=(N, r), rank r's disk is full
    when step N's save writes its loader state."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "avengers.train.trainer", "train_helpers"])
    port = free_port()
    logs = tempfile.mkdtemp(prefix="ranks_")
    procs = []
    for rank in range(world):
        faults = dict(
            die_after_step=die_after_step,
            die_in_save=die_in_save,
            nan_at_steps=tuple(nan_at_steps),
            disk_full_in_save=disk_full_in_save[0] if disk_full_in_save and disk_full_in_save[1] == rank else None,
        )
        procs.append(ctx.Process(target=_worker, args=(rank, world, port, overrides, env or {}, faults, logs)))
        procs[-1].logs = logs
    for p in procs:
        p.start()
    return procs


def run_training(world: int = 2, env: dict | None = None, timeout: float = 120, **overrides) -> list[int]:
    """start_training, then join_training: each process's exit code."""
    return join_training(start_training(world, env, **overrides), timeout)


def join_training(procs: list[mp.Process], timeout: float = 120) -> list[int]:
    """Waits for every rank (killing those still alive after `timeout` s); returns their exit codes."""
    for p in procs:
        p.join(timeout)
        if p.is_alive():
            p.kill()
            p.join()
    for rank, p in enumerate(procs):  # the ranks' output, into this process's stdout and stderr
        for fd, name in ((1, "out"), (2, "err")):
            path = os.path.join(p.logs, f"rank{rank}.{name}")
            if os.path.exists(path):
                with open(path, "rb") as f, os.fdopen(os.dup(fd), "wb") as out:
                    out.write(f.read())
                os.remove(path)
    for logs in {p.logs for p in procs}:
        os.rmdir(logs)
    return [p.exitcode for p in procs]


def read_metrics(run_dir) -> dict[int, dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}
