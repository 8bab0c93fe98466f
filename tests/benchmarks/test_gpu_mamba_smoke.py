"""benchmarks/gpu_mamba.py --smoke: every CPU-runnable path of the GPU benchmark still works."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_mamba_smoke(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu_mamba.py"),
            "--smoke",
            "--out",
            str(tmp_path),
            "--parts",
            "check,train,compile",
            "--no_profile",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["check"]["pass"] is True
    for tag in ("ours_fp32_autocast", "ours_bf16", "ours_bf16_fp32_master", "ours_fsdp2_mp"):
        assert res["train"][tag]["tokens_per_s"] > 0, tag
    assert res["compile"]["ours_compiled_custom_op_explain"]["graph_breaks"] == 0
    assert res["compile"]["ours_compiled_custom_op"]["loss"] == res["compile"]["ours_eager"]["loss"]
