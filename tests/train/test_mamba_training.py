"""2-process gloo FSDP2 training of hybrid_tiny through avengers.train: learns, resumes exactly."""

import pytest
from train_helpers import FAULT_EXIT_CODE, read_metrics, run_training

from avengers.train.checkpoint import complete_checkpoints, load_model_from_checkpoint

STEPS = 4
MAMBA = dict(model_variant="hybrid_tiny", seq_length=40, checkpoint_interval=2)  # 40 = 2.5 SSD chunks


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("mamba_ref")
    assert run_training(ckpt_save_path=str(run), num_steps=STEPS, **MAMBA) == [0, 0]
    return run


def test_hybrid_trains_and_checkpoints(reference):
    m = read_metrics(reference)
    assert sorted(m) == list(range(1, STEPS + 1))
    assert m[STEPS]["loss"] < m[1]["loss"]
    assert [s for s, _ in complete_checkpoints(str(reference))] == [2, 4]
    model, cfg = load_model_from_checkpoint(str(reference))
    assert cfg.model_variant == "hybrid_tiny"
    assert model.lm_head.weight is model.backbone.embedding.weight


def test_hybrid_killed_then_resumed_matches(reference, tmp_path):
    codes = run_training(ckpt_save_path=str(tmp_path), num_steps=STEPS, die_after_step=3, **MAMBA)
    assert codes == [FAULT_EXIT_CODE, FAULT_EXIT_CODE]
    assert run_training(ckpt_save_path=str(tmp_path), num_steps=STEPS, **MAMBA) == [0, 0]
    ref, got = read_metrics(reference), read_metrics(tmp_path)
    for step in range(3, STEPS + 1):
        for key in ("loss", "grad_norm", "tokens_seen"):
            assert got[step][key] == ref[step][key], (step, key)


def test_meta_init_and_activation_checkpointing(tmp_path):
    """low_cpu_fsdp: init_weights runs on sharded DTensors; AC wraps blocks that return (hidden, residual)."""
    assert run_training(
        ckpt_save_path=str(tmp_path),
        num_steps=2,
        low_cpu_fsdp=True,
        fsdp_activation_checkpointing=True,
        selective_checkpointing="1/2",
        **MAMBA,
    ) == [0, 0]
    m = read_metrics(tmp_path)
    assert m[2]["loss"] < m[1]["loss"] + 0.5 and abs(m[1]["loss"] - 8.3) < 0.5  # ~ln(4096) at init


def test_export_trained_run_to_mamba_ssm_folder(reference, tmp_path):
    import torch

    from avengers.export import export_checkpoint
    from avengers.models.mamba import from_pretrained

    out = export_checkpoint(str(reference), str(tmp_path / "export"), dtype="float32")
    model, _ = load_model_from_checkpoint(str(reference))
    loaded = from_pretrained(out)
    ids = torch.randint(0, 4096, (1, 24))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)
