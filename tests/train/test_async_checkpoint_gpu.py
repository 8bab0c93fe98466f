"""Asynchronous checkpoints on CUDA, where the tensors are staged into pinned CPU buffers that are
reused from one save to the next: every checkpoint still holds its own step's weights."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import BASE, ROOT

from avengers.train.checkpoint import complete_checkpoints

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

FLAGS = {
    **BASE,
    "device": "cuda",
    "seq_length": 64,
    "num_steps": 6,
    "checkpoint_interval": 2,
    "ckpt_keep_last": 3,
    "seed": 0,
}


def _train(run: Path, **extra) -> None:
    """`python -m avengers.train` in its own process (a forked one could not use CUDA after this
    test process has)."""
    argv = [sys.executable, "-m", "avengers.train", f"--ckpt_save_path={run}"]
    argv += [f"--{k}={v}" for k, v in {**FLAGS, **extra}.items()]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_async_saves_hold_the_weights_of_their_step(tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    _train(tmp_path / "blocking")
    _train(tmp_path / "async", async_checkpoint=True)
    for name in ("blocking", "async"):
        assert [s for s, _ in complete_checkpoints(str(tmp_path / name))] == [2, 4, 6]
    for step in (2, 4):  # the saves whose buffers the next save refilled
        states = []
        for name in ("blocking", "async"):
            out = tmp_path / f"{name}_{step}.pt"
            dcp_to_torch_save(str(tmp_path / name / "checkpoints" / f"step_{step}_ckp"), str(out))
            states.append(torch.load(out, weights_only=False)["model"])
        # the runs differ only by CUDA's atomics (~1e-7); a neighbouring step's weights differ by ~LR
        for key, value in states[0].items():
            torch.testing.assert_close(states[1][key], value, atol=1e-5, rtol=0, msg=f"step {step} {key}")
