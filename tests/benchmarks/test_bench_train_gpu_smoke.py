"""benchmarks/bench_train_gpu.py --smoke: the bare loop with both losses and the trainer run, on CPU."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_reports_both_losses_and_the_trainer(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_train_gpu.py"), "--smoke", "--bare_loss", "chunked,full"]
    run = subprocess.run([*cmd, "--out", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "bench_train_gpu.json").read_text())
    assert set(result["bare"]) == {"chunked", "full"}
    assert all(r["tokens_per_s_per_gpu"] > 0 for r in result["bare"].values())
    trainer = result["trainer"]
    assert trainer["tokens_per_s_per_gpu"] > 0 and trainer["as_logged_tokens_per_s_per_gpu"] > 0
    # on CPU nothing is queued, so our clock and the trainer's own agree
    assert trainer["tokens_per_s_per_gpu"] == pytest.approx(trainer["as_logged_tokens_per_s_per_gpu"], rel=0.2)


def test_bare_loss_none_runs_the_trainer_alone(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_train_gpu.py"), "--smoke", "--bare_loss", "none"]
    run = subprocess.run([*cmd, "--out", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "bench_train_gpu.json").read_text())
    assert result["bare"] == {} and result["trainer_over_bare"] is None
    assert result["trainer"]["tokens_per_s_per_gpu"] > 0
    assert "trainer / bare" not in run.stdout
