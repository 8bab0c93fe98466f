"""benchmarks/bench_loss.py on CPU: every loss path is timed and gives the same loss."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_every_path_timed_and_equal(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_loss.py"), "--tokens", "48", "--dim", "16"]
    cmd += ["--vocab", "96", "--chunk_tokens", "16,64", "--reps", "1", "--device", "cpu", "--out", str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    paths = json.loads((tmp_path / "bench_loss.json").read_text())["paths"]
    assert set(paths) == {"chunked 16", "chunked 64", "full logits, eager"}
    assert all(r["ms"] > 0 for r in paths.values())
    full = paths["full logits, eager"]["loss"]
    assert [r["loss"] for r in paths.values()] == pytest.approx([full] * 3, rel=1e-5)


def test_bad_device_is_refused_before_work(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_loss.py"), "--device", "tpu", "--out", str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode != 0 and "--device='tpu': expected auto, cpu or cuda" in run.stderr
    assert not list(tmp_path.iterdir())
