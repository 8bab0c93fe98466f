"""benchmarks/bench_train_options.py on CPU: the checkpoint comparison end to end; float8 refuses clearly."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "benchmarks" / "bench_train_options.py")
TINY = ["--variant", "llama3_tiny", "--seq_length", "64", "--batch_size", "2", "--no_compile", "--dummy_data"]


def test_checkpoint_reads_both_stalls_and_cleans_up(tmp_path):
    cmd = [sys.executable, SCRIPT, "checkpoint", *TINY, "--steps", "4", "--out", str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "bench_checkpoint.json").read_text())
    for name in ("blocking", "async"):
        r = result["runs"][name]
        assert r["first_save_stall_s"] >= 0 and r["second_save_stall_s"] >= 0, r
        assert r["tokens_per_s_per_gpu"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench_checkpoint.json"]  # no checkpoint left behind


def test_stall_lines_split_off_the_wait_for_the_previous_write():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_train_options", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    log = (
        "[avengers.train] checkpoint step 4 -> /r/step_4_ckp (the step loop waited 15.17 s)\n"
        "[avengers.train] checkpoint step 8 -> /r/step_8_ckp (the step loop waited 30.58 s, "
        "29.90 s of it finishing the previous save's write)\n"
    )
    assert bench.STALL.findall(log) == [("4", "15.17", ""), ("8", "30.58", "29.90")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without fp8")
def test_float8_refuses_without_an_fp8_gpu(tmp_path):
    cmd = [sys.executable, SCRIPT, "float8", *TINY, "--steps", "20", "--out", str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode != 0
    assert "float8 needs an sm_89+ GPU" in run.stderr
