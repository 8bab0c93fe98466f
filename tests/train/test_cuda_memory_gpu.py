"""The trainer on CUDA: expandable segments unless the user chose an allocator config, and the
allocator's retries in every metrics line."""

import json
import os
import subprocess
import sys

import pytest
import torch
from train_helpers import BASE, ROOT

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("user_conf", [None, "garbage_collection_threshold:0.9"])
def test_allocator_config_and_retries_metric(tmp_path, user_conf):
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_CUDA_ALLOC_CONF"}
    if user_conf:
        env["PYTORCH_CUDA_ALLOC_CONF"] = user_conf
    flags = {**BASE, "device": "cuda", "seq_length": 64, "num_steps": 3, "ckpt_save_path": tmp_path}
    argv = [sys.executable, "-m", "avengers.train", *(f"--{k}={v}" for k, v in flags.items())]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"PYTORCH_CUDA_ALLOC_CONF={user_conf or 'expandable_segments:True'}" in done.stdout + done.stderr
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    retries = [r["alloc_retries"] for r in records if "loss" in r]
    assert retries and set(retries) == {0}  # a tiny model never runs the GPU short
