"""Validation loss during training: --eval_interval / --eval_steps / --eval_fraction."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from train_helpers import run_training

from avengers.config import ConfigError, make_config, validate
from avengers.data.eval_split import eval_lines
from avengers.data.index import make_plan
from avengers.train.checkpoint import load_model_from_checkpoint
from avengers.train.validation import eval_batches


def test_eval_loss_is_logged_and_is_the_loss_on_the_heldout_lines(tiny_run):
    run, _, _ = tiny_run
    with open(run / "metrics.jsonl") as f:
        evals = [r for r in map(json.loads, f) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert evals[0]["eval_loss"] != evals[1]["eval_loss"]
    model, cfg = load_model_from_checkpoint(str(run))  # the step-4 model, evaluated at step 4
    total = tokens = 0.0
    with torch.no_grad():
        for inputs, labels in eval_batches(cfg, 0, 1):
            logits = model(inputs)
            total += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum").item()
            tokens += int((labels != -100).sum())
    assert evals[1]["eval_tokens"] == tokens == 2 * 2 * 32  # eval_steps x batch_size x seq_length, no padding
    assert evals[1]["eval_loss"] == pytest.approx(total / tokens, rel=1e-5)


def test_two_ranks_report_the_loss_over_the_same_lines_as_one(tiny_run, tmp_path):
    run, _, _ = tiny_run
    cfg = make_config(str(run / "config.yaml"))
    two = tmp_path / "two"
    flags = {k: getattr(cfg, k) for k in ("data_path", "datasets", "tokenizer_path", "bos_token", "eos_token")}
    flags.update(use_dummy_dataset=False, logical_shards=4, num_workers=0, seq_length=32, shuffle_buffer=0)
    flags.update(num_steps=2, eval_fraction=0.25, eval_interval=2, eval_steps=1)  # 1 x 2 x 2 ranks = 4 lines
    assert run_training(world=2, ckpt_save_path=str(two), **flags) == [0, 0]
    with open(two / "metrics.jsonl") as f:
        (record,) = [r for r in map(json.loads, f) if "eval_loss" in r]
    model, cfg = load_model_from_checkpoint(str(two))
    cfg.eval_steps = 2  # the same 4 lines on one rank
    total = tokens = 0.0
    with torch.no_grad():
        for inputs, labels in eval_batches(cfg, 0, 1):
            total += F.cross_entropy(model(inputs).flatten(0, 1), labels.flatten(), reduction="sum").item()
            tokens += labels.numel()
    assert record["eval_tokens"] == tokens == 4 * 32
    assert record["eval_loss"] == pytest.approx(total / tokens, rel=1e-5)


def test_eval_batches_split_one_set_of_lines_over_any_world(tiny_run):
    run, _, _ = tiny_run
    cfg = make_config(str(run / "config.yaml"))
    cfg.eval_steps = 2
    one = torch.cat([torch.cat([x[:, :1], y], 1) for x, y in eval_batches(cfg, 0, 1)])
    cfg.eval_steps = 1
    two = [torch.cat([torch.cat([x[:, :1], y], 1) for x, y in eval_batches(cfg, r, 2)]) for r in range(2)]
    interleaved = torch.stack(two, 1).flatten(0, 1)  # line i is on rank i mod 2
    assert torch.equal(one, interleaved)
    lines = torch.from_numpy(np.stack(eval_lines(make_plan(cfg), 4)))
    assert torch.equal(one, lines)


def test_a_small_split_is_padded_to_the_same_batches_on_every_rank(tiny_run):
    run, _, _ = tiny_run
    cfg = make_config(str(run / "config.yaml"))
    n = len(eval_lines(make_plan(cfg), 10_000))  # the whole split
    cfg.eval_steps = n  # asks for n x 2 x 2 lines: more than there are
    per_rank = [eval_batches(cfg, r, 2) for r in range(2)]
    assert [len(b) for b in per_rank] == [n, n]
    scored = sum(int((y != -100).any(1).sum()) for b in per_rank for _, y in b)
    assert scored == n  # every real line once, the rest padding whose labels are all ignored


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(eval_interval=5, use_dummy_dataset=True, eval_fraction=0.1), "needs real data"),
        (dict(eval_interval=5, use_dummy_dataset=False, eval_fraction=0.0), "set eval_fraction"),
        (dict(eval_fraction=1.0), r"eval_fraction=1.0: expected a number in \[0, 1\)"),
        (dict(eval_steps=0), "eval_steps=0: expected an integer >= 1"),
        (dict(eval_interval=-1), "eval_interval=-1: expected an integer >= 0"),
    ],
)
def test_eval_flags_are_validated(fields, message):
    cfg = make_config(**{"model_variant": "llama3_tiny", "use_dummy_dataset": True, "logical_shards": 1, **fields})
    with pytest.raises(ConfigError, match=message):
        validate(cfg)
