"""Loss by token position on held-out documents (avengers/quality/position_loss.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from avengers.config import make_config
from avengers.data.heldout import is_heldout
from avengers.quality.position_loss import bucket_edges, eval_rows, loss_by_position, main
from avengers.train.checkpoint import load_model_from_checkpoint


def test_bucket_edges_are_log_spaced_and_cover_every_position():
    assert bucket_edges(10) == [(1, 1), (2, 3), (4, 7), (8, 10)]
    assert bucket_edges(8) == [(1, 1), (2, 3), (4, 7), (8, 8)]
    assert bucket_edges(1) == [(1, 1)]


def test_rows_are_starts_of_heldout_documents(tiny_run):
    run, _, docs = tiny_run
    cfg = make_config(str(run / "config.yaml"))
    rows = eval_rows(cfg, 32, 100)
    assert rows.shape[1] == 33 and 0 < len(rows) < 36
    for row in rows.tolist():
        assert row[0] == 0  # bos, as in training
        assert row[1:] == list(range(row[1], row[1] + 32))  # the corpus's documents are runs of ids
    # each row's first token identifies its document: it is held out
    starts = {int(d[0]): k for k, d in docs.items()}
    assert all(is_heldout(starts[r[1]][1], starts[r[1]][2], 0.25) for r in rows.tolist())


def test_loss_by_position_matches_a_direct_computation(tiny_run):
    run, _, _ = tiny_run
    result = loss_by_position([str(run), str(run)], seq_length=32, num_docs=4, labels=["x", "y"])
    assert result["num_docs"] == 4 and result["seq_length"] == 32
    a, b = result["checkpoints"]
    assert a["position_loss"] == b["position_loss"] and (a["label"], b["label"]) == ("x", "y")
    model, cfg = load_model_from_checkpoint(str(run))
    rows = eval_rows(cfg, 32, 4)
    with torch.no_grad():
        loss = F.cross_entropy(model(rows[:, :-1]).transpose(1, 2), rows[:, 1:], reduction="none").mean(0)
    np.testing.assert_allclose(a["position_loss"], loss.numpy(), rtol=1e-5, atol=1e-6)
    for (lo, hi), v in zip(result["buckets"], a["bucket_loss"]):
        assert v == pytest.approx(float(loss[lo - 1 : hi].mean()), rel=1e-5)
    assert a["mean_loss"] == pytest.approx(float(loss.mean()), rel=1e-5)


def test_cli_writes_json_and_plot_and_refuses_a_run_without_a_split(tiny_run, tmp_path, capsys):
    run, _, _ = tiny_run
    out = tmp_path / "pos"
    assert (
        main(["--ckpt", str(run), "--seq_length", "16", "--num_docs", "3", "--out", str(out), "--device", "cpu"]) == 0
    )
    result = json.loads((out / "loss_by_position.json").read_text())
    assert len(result["checkpoints"][0]["position_loss"]) == 16 and len(result["buckets"]) == 5
    assert (out / "loss_by_position.png").stat().st_size > 1000
    assert main(["--ckpt", str(run), "--eval_fraction", "0", "--out", str(out)]) == 2
    assert "held out no documents" in capsys.readouterr().err
    assert main(["--ckpt", str(tmp_path), "--out", str(out)]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
