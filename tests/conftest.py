"""Fixtures shared by several test files; slurm-marked tests run only when selected (`-m slurm`)."""

import pytest
import torch

from avengers.models.registry import get_model_spec


def _build_tiny(device="cpu"):
    torch.manual_seed(0)
    spec = get_model_spec("llama3_tiny")
    model = spec.build(device)
    model.init_weights()
    return spec, model.eval()


@pytest.fixture(scope="module")
def tiny():
    """(spec, model) of llama3_tiny with seeded random weights, in eval mode."""
    return _build_tiny()


@pytest.fixture(scope="module")
def tiny_on_device(request):
    """As `tiny`, built on the test module's DEVICE (CPU when it has none)."""
    return _build_tiny(getattr(request.module, "DEVICE", "cpu"))


def pytest_collection_modifyitems(config, items):
    if "slurm" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="starts a local Slurm cluster: make test-slurm (pytest -m slurm)")
    for item in items:
        if item.get_closest_marker("slurm"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A 4-step llama3_tiny run on a small arrow corpus with a quarter of the documents held out
    and an evaluation every 2 steps: (run folder, data folder, {(dataset, file key, index): tokens})."""
    import os

    from corpus_helpers import write_corpus
    from train_helpers import run_training

    data = tmp_path_factory.mktemp("tiny_corpus")
    docs = write_corpus(data, {"a": [12, 12], "b": [12]}, lengths=(20, 70))
    run = tmp_path_factory.mktemp("tiny_run")
    codes = run_training(
        world=1,
        ckpt_save_path=str(run),
        use_dummy_dataset=False,
        data_path=str(data),
        datasets="a,b",
        tokenizer_path=os.path.join(os.path.dirname(os.path.dirname(__file__)), "data/sample/tokenizer"),
        logical_shards=4,
        num_workers=0,
        bos_token=0,
        eos_token=1,
        seq_length=32,
        shuffle_buffer=0,
        num_steps=4,
        checkpoint_interval=4,
        eval_fraction=0.25,
        eval_interval=2,
        eval_steps=2,
    )
    assert codes == [0]
    return run, data, docs
