import os

import torch

from avengers.config import make_config
from avengers.train.checkpoint import MARKER, Checkpointer, StagingBuffers, complete_checkpoints, resolve_checkpoint


def _fake(run, step, complete=True, suffix=""):
    path = run / "checkpoints" / f"step_{step}_ckp{suffix}"
    path.mkdir(parents=True)
    if complete:
        (path / MARKER).write_text(f"{step}\n")
    return path


def test_newest_complete_wins_and_retention(tmp_path):
    for step in (1, 2, 10, 5):
        _fake(tmp_path, step)
    _fake(tmp_path, 20, complete=False)  # crashed before its marker: not a checkpoint
    _fake(tmp_path, 30, suffix=".tmp")
    assert [s for s, _ in complete_checkpoints(str(tmp_path))] == [1, 2, 5, 10]  # by step, not by name or time
    assert resolve_checkpoint(str(tmp_path)).endswith("step_10_ckp")
    assert resolve_checkpoint(str(tmp_path / "checkpoints" / "step_2_ckp")).endswith("step_2_ckp")
    assert resolve_checkpoint(str(tmp_path / "checkpoints" / "step_20_ckp")) is None
    Checkpointer(make_config(ckpt_save_path=str(tmp_path), ckpt_keep_last=2), 0, 1)._prune()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_10_ckp", "step_20_ckp", "step_5_ckp"]


def test_staging_buffers_are_refilled_by_every_save_and_outlive_a_close():
    """Each save stages into the buffers of the first (torch 2.11's DefaultStager dropped them after
    every stage and failed the next with "KeyError: <class 'type'>"), and holds its own values; after
    close() the next save stages into new buffers."""
    weights = {"w": torch.arange(6.0), "step": torch.tensor(1.0), "meta": {"kind": dict}}
    stager = StagingBuffers()
    first = stager.stage(weights)
    weights["w"].add_(10)
    second = stager.stage(weights)
    assert second["w"].untyped_storage().data_ptr() == first["w"].untyped_storage().data_ptr()
    assert second["w"].tolist() == [10.0, 11.0, 12.0, 13.0, 14.0, 15.0] and second["meta"] == {"kind": dict}
    stager.close()
    weights["w"].add_(10)
    assert stager.stage(weights)["w"].tolist() == [20.0, 21.0, 22.0, 23.0, 24.0, 25.0]
