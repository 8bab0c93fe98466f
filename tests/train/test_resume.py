"""2-process gloo FSDP2 runs: an interrupted and resumed run reproduces an uninterrupted one bit for bit."""

import os

import pytest
import torch
from train_helpers import FAULT_EXIT_CODE, read_metrics, run_training

from avengers.train.checkpoint import complete_checkpoints, load_model_from_checkpoint

STEPS = 6


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("ref")
    assert run_training(ckpt_save_path=str(run), num_steps=STEPS, checkpoint_interval=2) == [0, 0]
    return run


def test_uninterrupted_run_learns_and_checkpoints(reference):
    m = read_metrics(reference)
    assert sorted(m) == list(range(1, STEPS + 1))
    assert m[STEPS]["loss"] < m[1]["loss"]
    assert m[STEPS]["tokens_seen"] == STEPS * 2 * 2 * 16
    steps = [s for s, _ in complete_checkpoints(str(reference))]
    assert steps == [2, 4, 6]  # ckpt_keep_last=3


def test_killed_then_resumed_is_bit_identical(reference, tmp_path):
    codes = run_training(ckpt_save_path=str(tmp_path), num_steps=STEPS, checkpoint_interval=2, die_after_step=3)
    assert codes == [FAULT_EXIT_CODE, FAULT_EXIT_CODE]  # died after step 3, one step after the step-2 checkpoint
    assert [s for s, _ in complete_checkpoints(str(tmp_path))] == [2]
    assert run_training(ckpt_save_path=str(tmp_path), num_steps=STEPS, checkpoint_interval=2) == [0, 0]
    ref, got = read_metrics(reference), read_metrics(tmp_path)
    for step in range(3, STEPS + 1):
        for key in ("loss", "grad_norm", "lr", "tokens_seen"):
            assert got[step][key] == ref[step][key], (step, key)


def test_crash_during_save_keeps_previous_checkpoint(reference, tmp_path):
    codes = run_training(ckpt_save_path=str(tmp_path), num_steps=STEPS, checkpoint_interval=2, die_in_save=4)
    assert codes == [FAULT_EXIT_CODE, FAULT_EXIT_CODE]
    names = sorted(os.listdir(tmp_path / "checkpoints"))
    assert names == ["step_2_ckp", "step_4_ckp.tmp"]  # the half-written save is not a checkpoint
    model, cfg = load_model_from_checkpoint(str(tmp_path))
    ref_model, _ = load_model_from_checkpoint(str(reference / "checkpoints" / "step_2_ckp"))
    for (name, a), (_, b) in zip(model.state_dict().items(), ref_model.state_dict().items()):
        assert torch.equal(a, b), name
    # Resuming restarts from step 2 and still reproduces the reference.
    assert run_training(ckpt_save_path=str(tmp_path), num_steps=STEPS, checkpoint_interval=2) == [0, 0]
    assert read_metrics(tmp_path)[STEPS]["loss"] == read_metrics(reference)[STEPS]["loss"]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_2_ckp", "step_4_ckp", "step_6_ckp"]


def test_continuation_modes_from_another_run(reference, tmp_path):
    """ckpt_load_path: a file = model only; a run folder = model + optimizer (+ data with resuming_dataset).
    Loaded on 1 process from a 2-process checkpoint (DCP reshards)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    model_file = tmp_path / "model.pt"
    dcp_to_torch_save(str(reference / "checkpoints" / f"step_{STEPS}_ckp"), str(model_file))
    losses = {}
    for mode, extra in (
        ("file", dict(ckpt_load_path=str(model_file))),
        ("dir", dict(ckpt_load_path=str(reference))),
        ("data", dict(ckpt_load_path=str(reference), resuming_dataset=True)),
    ):
        run = tmp_path / mode
        assert run_training(world=1, ckpt_save_path=str(run), num_steps=2, checkpoint_interval=100, **extra) == [0]
        m = read_metrics(run)
        assert sorted(m) == [1, 2]  # the step count restarts
        losses[mode] = m[1]["loss"]
    fresh = read_metrics(reference)[1]["loss"]
    assert losses["file"] == losses["dir"] < fresh  # same weights, same (restarted) data
    assert losses["data"] != losses["dir"]  # the data position came along


def test_async_checkpoints_hold_the_step_they_were_taken_at(reference, tmp_path):
    """async_checkpoint: the tensors are written by a thread while training goes on, and each
    checkpoint still holds exactly its own step's weights; the run's trajectory is unchanged."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flags = dict(num_steps=STEPS, checkpoint_interval=2, async_checkpoint=True)
    assert run_training(ckpt_save_path=str(tmp_path), **flags) == [0, 0]
    assert [s for s, _ in complete_checkpoints(str(tmp_path))] == [2, 4, 6]
    assert not [n for n in os.listdir(tmp_path / "checkpoints") if n.endswith(".tmp")]
    ref, got = read_metrics(reference), read_metrics(tmp_path)
    assert all(got[s]["loss"] == ref[s]["loss"] for s in range(1, STEPS + 1))
    for step in (2, 4):
        pair = []
        for run in (reference, tmp_path):
            out = tmp_path / f"{run.name}_{step}.pt"
            dcp_to_torch_save(str(run / "checkpoints" / f"step_{step}_ckp"), str(out))
            pair.append(torch.load(out, weights_only=False))
        for key, value in pair[0]["model"].items():
            assert torch.equal(pair[1]["model"][key], value), (step, key)


def test_killed_while_an_async_save_is_pending_resumes_exactly(reference, tmp_path):
    flags = dict(num_steps=STEPS, checkpoint_interval=2, async_checkpoint=True)
    codes = run_training(ckpt_save_path=str(tmp_path), die_after_step=3, **flags)
    assert codes == [FAULT_EXIT_CODE, FAULT_EXIT_CODE]
    # step 2's save is committed only once both ranks have written it: either it was, or it is not a checkpoint
    assert [s for s, _ in complete_checkpoints(str(tmp_path))] in ([], [2])
    assert run_training(ckpt_save_path=str(tmp_path), **flags) == [0, 0]
    assert read_metrics(tmp_path)[STEPS]["loss"] == read_metrics(reference)[STEPS]["loss"]


def test_each_launch_reports_its_first_step_apart(tmp_path, capfd):
    """A launch's first step (compilation, autotuning) is logged on its own and left out of the first
    throughput window, in a fresh run and in a resumed one."""
    flags = dict(world=1, ckpt_save_path=str(tmp_path), checkpoint_interval=2, report_interval=2)
    assert run_training(num_steps=2, **flags) == [0]
    assert run_training(num_steps=4, **flags) == [0]
    firsts = [line for line in capfd.readouterr().out.splitlines() if "the launch's first step" in line]
    assert [line.split(":")[0] for line in firsts] == ["[avengers.train] step 1", "[avengers.train] step 3"]
    m = read_metrics(tmp_path)
    assert m[2]["tokens_per_s_per_gpu"] > 0 and m[4]["tokens_per_s_per_gpu"] > 0
