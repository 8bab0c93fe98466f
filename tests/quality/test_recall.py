"""MQAR data, scoring, and the recall sweep over every registry family (avengers/quality/recall.py)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from avengers.quality.mqar import IGNORE, MQARTask, mqar_batch, recall_accuracy
from avengers.quality.recall import (
    PRESETS,
    RecallModel,
    RecallSweep,
    _attention,
    cache_bytes_per_sequence,
    model_spec,
    run_sweep,
    train_and_score,
)


def test_mqar_sequences_hold_each_key_once_and_score_its_value_after_the_query():
    task = MQARTask(seq_len=64, kv_pairs=8, vocab_size=256)
    inputs, labels = mqar_batch(task, 32, torch.Generator().manual_seed(0))
    again, _ = mqar_batch(task, 32, torch.Generator().manual_seed(0))
    assert torch.equal(inputs, again)
    assert inputs.shape == labels.shape == (32, 64)
    for x, y in zip(inputs.tolist(), labels.tolist()):
        keys, values = x[0:16:2], x[1:16:2]
        assert len(set(keys)) == 8 and all(1 <= k < 128 for k in keys) and all(128 <= v < 256 for v in values)
        queries = [(t, x[t], y[t]) for t in range(64) if y[t] != IGNORE]
        assert len(queries) == 8 and all(t >= 16 and t % 2 == 0 for t, _, _ in queries)
        assert sorted(k for _, k, _ in queries) == sorted(keys)  # every key asked once
        assert all(dict(zip(keys, values))[k] == v for _, k, v in queries)  # the target is its value


def test_recall_accuracy_counts_value_positions_only():
    task = MQARTask(seq_len=32, kv_pairs=4, vocab_size=64)
    inputs, labels = mqar_batch(task, 8, torch.Generator().manual_seed(1))
    oracle = torch.zeros(8, 32, 64)
    for b in range(8):
        pairs = dict(zip(inputs[b, 0:8:2].tolist(), inputs[b, 1:8:2].tolist()))
        for t in range(32):
            oracle[b, t, pairs.get(int(inputs[b, t]), 0) if labels[b, t] != IGNORE else 0] = 1.0
    assert recall_accuracy(oracle, labels) == (32, 32)  # 8 rows x 4 queries, everything else unscored
    oracle[0, labels[0] != IGNORE] = torch.roll(oracle[0, labels[0] != IGNORE], 1, dims=-1)
    assert recall_accuracy(oracle, labels) == (28, 32)


def test_bad_tasks_are_refused_with_the_accepted_values():
    with pytest.raises(ValueError, match=r"use kv_pairs <= 16"):
        MQARTask(seq_len=64, kv_pairs=17, vocab_size=8192)
    with pytest.raises(ValueError, match="use vocab_size >= 34"):
        MQARTask(seq_len=64, kv_pairs=16, vocab_size=32)
    sweep = dataclasses.replace(PRESETS["smoke"], models=(RecallModel("x", "llama3_tiny", {"d_model": 8}),))
    with pytest.raises(ValueError, match="emb_dim"):  # an unknown field: the base variant's fields are listed
        sweep.validate()


def test_attention_learns_mqar_through_the_trainers_optimizer_and_schedule():
    sweep = RecallSweep(
        models=(_attention(32),),
        seq_lens=(16,),
        kv_pairs=(2, 4),
        vocab_size=32,
        steps=300,
        batch_size=32,
        learning_rates=(5e-3,),
        warmup_steps=30,
        eval_examples=64,
    )
    result = train_and_score(
        model_spec(sweep.models[0], 32, 16), sweep.tasks(16), sweep, 5e-3, torch.device("cpu"), seed=0
    )
    assert min(result["accuracy"].values()) >= 0.95  # chance is 1/16
    assert result["train_loss"] < 0.2


def test_cache_bytes_are_measured_from_the_allocated_cache():
    attention = model_spec(_attention(64), 256, 512).build()
    mamba = model_spec(RecallModel("mamba2", "mamba2_tiny", dict(d_model=64, n_layer=2, d_state=16)), 256, 512).build()
    # 2 layers x (k, v) x 2 KV heads x positions padded to 128 x head dim 32 x 2 bytes (bf16)
    assert cache_bytes_per_sequence(attention, 64) == 2 * 2 * 2 * 128 * 32 * 2
    assert cache_bytes_per_sequence(attention, 512) == 2 * 2 * 2 * 512 * 32 * 2
    assert cache_bytes_per_sequence(mamba, 64) == cache_bytes_per_sequence(mamba, 512) > 0  # constant state


def test_smoke_sweep_covers_every_family_writes_reports_and_resumes(tmp_path):
    sweep = PRESETS["smoke"]
    assert run_sweep(sweep, str(tmp_path), time_budget_s=0) == []  # the budget is spent before the first run
    rows = run_sweep(sweep, str(tmp_path))
    assert {r["family"] for r in rows} == {"attention", "mamba2", "hybrid", "telescoping"}
    assert len(rows) == len(sweep.models) * 2  # one seq_len x kv_pairs 2 and 4
    for r in rows:
        assert 0 <= r["accuracy"] <= 1 and r["cache_bytes_per_seq"] > 0 and r["params"] > 0
    by_family = {r["family"]: r["cache_bytes_per_seq"] for r in rows}
    assert by_family["telescoping"] < by_family["attention"]  # C=8 slots < 128 padded KV positions
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == rows
    assert "| T | family |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "recall.png").stat().st_size > 1000
    again = run_sweep(sweep, str(tmp_path))  # everything is there: nothing is retrained
    assert again == rows
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == len(rows)
    fresh = run_sweep(sweep, str(tmp_path / "fresh"), families=("mamba2",))

    def numbers(rs):
        return [{k: v for k, v in r.items() if k not in ("train_s", "run_s")} for r in rs]

    assert numbers(fresh) == numbers([r for r in rows if r["family"] == "mamba2"])  # seeded: the same again


def test_a_sweep_file_gives_the_same_sweep_as_its_fields(tmp_path):
    from avengers.quality.recall import load_sweep

    path = tmp_path / "sweep.yaml"
    path.write_text(
        "models:\n"
        "  - {family: mamba2, base: mamba2_tiny, overrides: {d_model: 32, d_state: 8}, label: m}\n"
        "seq_lens: [16, 32]\nkv_pairs: [2, 4]\nvocab_size: 64\nsteps: 5\nlearning_rates: [0.001]\n"
    )
    sweep = load_sweep(str(path))
    assert sweep == RecallSweep(
        models=(RecallModel("mamba2", "mamba2_tiny", {"d_model": 32, "d_state": 8}, "m"),),
        seq_lens=(16, 32),
        kv_pairs=(2, 4),
        vocab_size=64,
        steps=5,
        learning_rates=(0.001,),
    )
    path.write_text("models: []\nseq_len: [16]\n")
    with pytest.raises(ValueError, match="unknown sweep fields \\['seq_len'\\]"):
        load_sweep(str(path))


def test_a_models_own_learning_rates_replace_the_sweeps(tmp_path):
    from avengers.quality.recall import load_sweep

    path = tmp_path / "sweep.yaml"
    path.write_text(
        "models:\n"
        "  - {family: mamba2, base: mamba2_tiny, overrides: {d_model: 32, d_state: 8}, learning_rates: [0.02]}\n"
        "  - {family: mamba2, base: mamba2_tiny, overrides: {d_model: 32, d_state: 4}}\n"
        "seq_lens: [16]\nkv_pairs: [2]\nvocab_size: 32\nsteps: 3\nwarmup_steps: 1\nbatch_size: 4\n"
        "eval_examples: 4\nlearning_rates: [0.001, 0.003]\n"
    )
    sweep = load_sweep(str(path))
    assert sweep.models[0].learning_rates == (0.02,) and sweep.models[1].learning_rates == ()
    rows = run_sweep(sweep, str(tmp_path / "out"))
    lrs = {r["model"]: r["learning_rate"] for r in rows}
    assert lrs[sweep.models[0].name] == 0.02
    assert lrs[sweep.models[1].name] in (0.001, 0.003)
    bad = dataclasses.replace(sweep, models=(dataclasses.replace(sweep.models[0], learning_rates=(0.0,)),))
    with pytest.raises(ValueError, match="learning_rates=\\(0.0,\\): expected positive numbers"):
        bad.validate()


def test_gpu_presets_train_each_model_at_its_familys_learning_rate():
    from avengers.quality.recall import FAMILY_LR

    for name in ("gpu", "gpu_long"):
        for m in PRESETS[name].models:
            assert m.learning_rates == (FAMILY_LR[m.family],), (name, m.name)
