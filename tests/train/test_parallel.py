"""2-process gloo runs: fsdp and ddp agree; gradient accumulation equals the larger batch; AC changes nothing."""

import pytest
from train_helpers import read_metrics, run_training

STEPS = 3


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("fsdp")
    assert run_training(ckpt_save_path=str(run), num_steps=STEPS, checkpoint_interval=100) == [0, 0]
    return read_metrics(run)


def test_ddp_matches_fsdp(fsdp_run, tmp_path):
    assert run_training(
        ckpt_save_path=str(tmp_path), num_steps=STEPS, checkpoint_interval=100, sharding_strategy="ddp"
    ) == [0, 0]
    got = read_metrics(tmp_path)
    for s in range(1, STEPS + 1):
        assert got[s]["loss"] == pytest.approx(fsdp_run[s]["loss"], rel=1e-5)


def test_accumulation_and_activation_checkpointing(fsdp_run, tmp_path):
    # batch 1 x 2 micro-batches reads the same lines as batch 2: same updates up to rounding.
    assert run_training(
        ckpt_save_path=str(tmp_path),
        num_steps=STEPS,
        checkpoint_interval=100,
        batch_size=1,
        grad_accum_steps=2,
        fsdp_activation_checkpointing=True,
        selective_checkpointing="1/2",
        sharding_strategy="hsdp",
        hsdp_shard_size=2,
    ) == [0, 0]
    got = read_metrics(tmp_path)
    for s in range(1, STEPS + 1):
        assert got[s]["loss"] == pytest.approx(fsdp_run[s]["loss"], rel=1e-5)
        assert got[s]["grad_norm"] == pytest.approx(fsdp_run[s]["grad_norm"], rel=1e-4)
        assert got[s]["tokens_seen"] == fsdp_run[s]["tokens_seen"]
