"""The trainer on CUDA reports the caching allocator's retries in every metrics line."""

import json
import subprocess
import sys

import pytest
import torch
from train_helpers import BASE, ROOT

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_metrics_report_allocator_retries(tmp_path):
    flags = {**BASE, "device": "cuda", "seq_length": 64, "num_steps": 3, "ckpt_save_path": tmp_path}
    argv = [sys.executable, "-m", "avengers.train", *(f"--{k}={v}" for k, v in flags.items())]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    retries = [r["alloc_retries"] for r in records if "loss" in r]
    assert retries and set(retries) == {0}  # a tiny model never runs the GPU short
