import os

from avengers.config import make_config
from avengers.train.checkpoint import MARKER, Checkpointer, complete_checkpoints, resolve_checkpoint


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
