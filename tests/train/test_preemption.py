"""SIGUSR1 / SIGTERM mid-run (2 gloo ranks, the real loader with a worker process each): every rank stops after
the same step with a checkpoint, and resuming from it reproduces an uninterrupted run bit for bit."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from train_helpers import BASE, free_port, join_training, read_metrics, run_training, sample_data_flags, start_training

from avengers.train.checkpoint import complete_checkpoints
from avengers.train.preemption import StopOnSignal

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
INTERVAL = 4  # signal_check_interval
NUM_STEPS = 1000  # the schedule's length, far more than any run here takes: signals always come mid-run


def test_signals_are_recorded_acted_on_at_check_steps_and_handlers_restored():
    before = signal.getsignal(signal.SIGTERM)
    with StopOnSignal(interval=3) as stop:
        os.kill(os.getpid(), signal.SIGUSR1)  # would end this process without the handler
        assert [stop.should_stop(step, torch.device("cpu")) for step in (1, 2, 3, 4)] == [False, False, True, True]
        assert stop.agreed is signal.SIGUSR1
    assert signal.getsignal(signal.SIGTERM) is before and signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


@pytest.fixture(scope="module")
def run_cfg(tmp_path_factory) -> dict:
    return dict(
        **sample_data_flags(tmp_path_factory.mktemp("prepared")),
        num_steps=NUM_STEPS,
        checkpoint_interval=NUM_STEPS,
        signal_check_interval=INTERVAL,
    )


@pytest.fixture(scope="module")
def reference(run_cfg, tmp_path_factory):
    """`through(n)`: the metrics of an uninterrupted run of at least n steps (one run serves several tests)."""
    runs: dict[int, dict] = {}

    def through(n: int) -> dict[int, dict]:
        if not runs or max(runs) < n:
            horizon = max(n, 12)
            run = tmp_path_factory.mktemp("reference")
            assert run_training(ckpt_save_path=str(run), stop_at_step=horizon, **run_cfg) == [0, 0]
            runs[horizon] = read_metrics(run)
        return runs[max(runs)]

    return through


def wait_for_step(run_dir, step: int, alive, timeout: float = 120) -> None:
    """Polls metrics.jsonl until it reports `step`; fails if the run ends or stalls first."""
    path = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path) and step in read_metrics(run_dir):
            return
        assert alive(), "the run ended before the signal was sent"
        time.sleep(0.02)
    raise AssertionError(f"no step {step} in {path} after {timeout} s")


def check_stopped_and_resumes_exactly(run_dir, run_cfg, reference) -> int:
    """The run stopped after a check step with a checkpoint of every rank there; resumed, it matches the reference."""
    stopped = max(read_metrics(run_dir))
    assert stopped % INTERVAL == 0 and stopped < NUM_STEPS
    assert [s for s, _ in complete_checkpoints(str(run_dir))] == [stopped]
    ckpt = os.path.join(run_dir, "checkpoints", f"step_{stopped}_ckp")
    assert {"loader_state_0.pt", "loader_state_1.pt", "rng_state_0.pt", "rng_state_1.pt"} <= set(os.listdir(ckpt))

    end = stopped + 2
    assert run_training(ckpt_save_path=str(run_dir), stop_at_step=end, **run_cfg) == [0, 0]
    got, want = read_metrics(run_dir), reference(end)
    assert sorted(got) == list(range(1, end + 1))
    for step in got:
        for key in ("loss", "grad_norm", "lr", "tokens_seen"):
            assert got[step][key] == want[step][key], (step, key)
    return stopped


def test_sigusr1_to_one_rank_stops_every_rank_at_one_step(run_cfg, reference, tmp_path):
    """Slurm's time-limit warning reaching one rank; SIGTERM takes the same path (next test)."""
    procs = start_training(ckpt_save_path=str(tmp_path), **run_cfg)
    wait_for_step(tmp_path, 2, lambda: all(p.is_alive() for p in procs))
    os.kill(procs[1].pid, signal.SIGUSR1)  # rank 1 only: rank 0 learns of it through the check's all-reduce
    assert join_training(procs) == [0, 0]
    check_stopped_and_resumes_exactly(tmp_path, run_cfg, reference)


def test_sigterm_to_torchrun_checkpoints_and_resumes_exactly(run_cfg, reference, tmp_path):
    """torchrun passes SIGTERM (a container runtime's stop) on to its workers' process groups: the ranks, which
    checkpoint and exit 0, and their loader workers, which leave stopping to their rank."""
    flags = [f"--{k}={v}" for k, v in {**BASE, **run_cfg, "ckpt_save_path": tmp_path}.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    with subprocess.Popen(
        [*cmd, "-m", "avengers.train", *flags], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as torchrun:
        try:
            wait_for_step(tmp_path, 2, lambda: torchrun.poll() is None)
            torchrun.send_signal(signal.SIGTERM)
            log = torchrun.communicate(timeout=120)[0]
        finally:
            torchrun.kill()
    stopped = check_stopped_and_resumes_exactly(tmp_path, run_cfg, reference)
    assert f"SIGTERM: stopped after step {stopped}" in log
    assert "exitcode" not in log  # torchrun lists failed workers with their exit codes; none failed
