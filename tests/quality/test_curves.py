"""Eval-loss curves of training runs (avengers/quality/curves.py)."""

from __future__ import annotations

import json

from avengers.quality.curves import main, read_run


def test_curves_read_the_eval_records_of_a_run(tiny_run, tmp_path, capsys):
    run, _, _ = tiny_run
    r = read_run(str(run))
    with open(run / "metrics.jsonl") as f:
        evals = [x for x in map(json.loads, f) if "eval_loss" in x]
    assert r["model_variant"] == "llama3_tiny"
    assert r["eval"] == [(2 * 2 * 32, evals[0]["eval_loss"]), (4 * 2 * 32, evals[1]["eval_loss"])]  # tokens_seen
    assert len(r["train"]) == 4  # report_interval=1
    assert main(["--runs", f"{run},{run}", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "eval_curves.png").stat().st_size > 1000
    assert (tmp_path / "eval_curves.md").read_text().count("llama3_tiny") == 2
    assert main(["--runs", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
