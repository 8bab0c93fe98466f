"""The real loader inside the trainer: 2 ranks x 1 loader worker, killed and resumed, bit-identical."""

import pytest
from train_helpers import FAULT_EXIT_CODE, read_metrics, run_training, sample_data_flags

from avengers.train.checkpoint import complete_checkpoints


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return dict(**sample_data_flags(tmp_path_factory.mktemp("prepared")), num_steps=4, checkpoint_interval=2)


def test_real_loader_resume_is_bit_identical(data, tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert run_training(ckpt_save_path=str(ref), **data) == [0, 0]
    assert run_training(ckpt_save_path=str(run), die_after_step=3, **data) == [FAULT_EXIT_CODE, FAULT_EXIT_CODE]
    assert [s for s, _ in complete_checkpoints(str(run))] == [2]
    assert run_training(ckpt_save_path=str(run), **data) == [0, 0]
    a, b = read_metrics(ref), read_metrics(run)
    assert [b[s]["loss"] for s in (3, 4)] == [a[s]["loss"] for s in (3, 4)]
    assert a[4]["loss"] != a[3]["loss"]
