"""scripts/slurm/train.sbatch on a real one-node Slurm cluster (`make test-slurm`: root; installs Slurm with apt).

Two CPU ranks over gloo (GPUS_PER_NODE=2, `sbatch --gres=none`) train the tiny Llama on the bundled sample
corpus, with a loader worker each. The reference job runs through. The other is cancelled (SIGTERM to every
process, as on preemption), resubmitted, warned of its time limit (SIGUSR1 to the batch shell, which is what
`--signal=B:USR1@<s>` does) and requeued; its losses must equal the reference's bit for bit.
"""

import os
import re
import sys
import time

import pytest
from slurm_cluster import LocalSlurm, ensure_installed
from train_helpers import ROOT, free_port, prepare_sample, read_metrics

from avengers.train.checkpoint import complete_checkpoints

pytestmark = pytest.mark.slurm

SBATCH = os.path.join(ROOT, "scripts", "slurm", "train.sbatch")
STEPS = 40
INTERVAL = 4  # signal_check_interval
JOB_TIMEOUT = 180  # seconds, for one job including its requeue


@pytest.fixture(scope="module")
def slurm(request):
    ensure_installed()
    cluster = LocalSlurm()
    request.addfinalizer(cluster.stop)  # before start(): a half-started cluster is taken down too
    cluster.start()
    return cluster


@pytest.fixture(scope="module")
def flags(tmp_path_factory) -> list[str]:
    data = prepare_sample(tmp_path_factory.mktemp("prepared"))
    return [
        "--config=configs/demo.yaml",
        f"--data_path={data}",
        "--datasets=sample",
        "--device=cpu",
        f"--num_steps={STEPS}",
        "--seq_length=32",
        "--batch_size=2",
        "--logical_shards=8",
        "--num_workers=1",
        "--shuffle_buffer=16",
        "--report_interval=1",
        f"--checkpoint_interval={STEPS}",
        f"--signal_check_interval={INTERVAL}",
    ]


def submit(slurm: LocalSlurm, run, flags: list[str]) -> int:
    run.mkdir(exist_ok=True)
    env = {"GPUS_PER_NODE": "2", "PYTHON": sys.executable, "MASTER_PORT": str(free_port()), "PYTHONPATH": ROOT}
    options = ["--gres=none", f"--cpus-per-task={slurm.cpus}", f"--output={run}/slurm-%j.out"]
    return slurm.sbatch(*options, SBATCH, *flags, f"--ckpt_save_path={run}", env=env, cwd=ROOT)


def output(run, job_id: int) -> str:
    with open(run / f"slurm-{job_id}.out") as f:
        return f.read()


def wait_for_step(slurm: LocalSlurm, job_id: int, run, step: int, timeout: float = JOB_TIMEOUT) -> None:
    """Until metrics.jsonl reports `step`; fails if the job ends first."""
    deadline = time.monotonic() + timeout
    while not (os.path.exists(run / "metrics.jsonl") and max(read_metrics(run), default=0) >= step):
        info = slurm.job(job_id)
        assert info["JobState"] in ("PENDING", "RUNNING"), output(run, job_id)
        assert time.monotonic() < deadline, f"no step {step} after {timeout} s\n{output(run, job_id)}"
        time.sleep(0.2)


def checkpoint_steps(run) -> list[int]:
    return [step for step, _ in complete_checkpoints(str(run))]


@pytest.fixture(scope="module")
def reference(slurm, flags, tmp_path_factory):
    run = tmp_path_factory.mktemp("reference")
    job = submit(slurm, run, flags)
    return run, job, slurm.wait(job, JOB_TIMEOUT)


def test_sbatch_runs_cpu_ranks_over_gloo(reference, slurm):
    run, job, info = reference
    log = output(run, job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log + slurm.logs()
    assert "llama3_tiny: 5.0M params, world 2 (fsdp, cpu), started from scratch" in log
    assert sorted(read_metrics(run)) == list(range(1, STEPS + 1))
    assert read_metrics(run)[STEPS]["tokens_seen"] == STEPS * 2 * 2 * 32
    assert checkpoint_steps(run) == [STEPS]
    files = set(os.listdir(run / "checkpoints" / f"step_{STEPS}_ckp"))
    assert {"COMPLETE", "loader_state_0.pt", "loader_state_1.pt", "train_state.pt"} <= files


def test_cancel_resubmit_and_time_limit_requeue_match_the_reference(reference, slurm, flags, tmp_path):
    # scancel: SIGTERM to every process of the job, as on preemption
    first = submit(slurm, tmp_path, flags)
    wait_for_step(slurm, first, tmp_path, 2)
    slurm.cmd("scancel", str(first))
    assert slurm.wait(first, JOB_TIMEOUT)["JobState"] == "CANCELLED"
    cancelled_at = max(read_metrics(tmp_path))
    assert cancelled_at % INTERVAL == 0 and cancelled_at < STEPS
    assert checkpoint_steps(tmp_path) == [cancelled_at]
    assert f"SIGTERM: stopped after step {cancelled_at}" in output(tmp_path, first)

    # resubmitted, it resumes; then the time-limit warning: requeued, it resumes again and finishes
    second = submit(slurm, tmp_path, flags)
    wait_for_step(slurm, second, tmp_path, cancelled_at + 2)
    slurm.cmd("scancel", "--batch", "--signal=USR1", str(second))
    info = slurm.wait(second, JOB_TIMEOUT)
    log = output(tmp_path, second)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log
    warned_at = int(re.search(r"SIGUSR1: stopped after step (\d+)", log).group(1))
    assert cancelled_at < warned_at < STEPS and warned_at % INTERVAL == 0
    assert f"resumed from {tmp_path}/checkpoints/step_{cancelled_at}_ckp (step {cancelled_at})" in log
    assert f"requeueing job {second}" in log
    assert f"resumed from {tmp_path}/checkpoints/step_{warned_at}_ckp (step {warned_at})" in log
    assert checkpoint_steps(tmp_path) == [cancelled_at, warned_at, STEPS]

    got, want = read_metrics(tmp_path), read_metrics(reference[0])
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step in want:
        for key in ("loss", "grad_norm", "lr", "tokens_seen"):
            assert got[step][key] == want[step][key], (step, key)
