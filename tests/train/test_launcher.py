"""train_llama.sh passes the seed's flags through torchrun to avengers.train (1 CPU process)."""

import json
import os
import subprocess
import sys

from test_config import SEED_LLAMA_FLAGS
from train_helpers import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_train_llama_sh_runs_the_seed_flags(tmp_path):
    run = str(tmp_path / "run")
    flags = SEED_LLAMA_FLAGS + [  # same launch line; only model size, data and paths changed for a CPU test
        "--model_variant=llama3_tiny",
        "--use_dummy_dataset=True",
        "--vocab_size=None",
        "--seq_length=16",
        "--batch_size=2",
        "--num_steps=2",
        "--report_interval=1",
        "--use_torch_compile=False",
        f"--ckpt_save_path={run}",
        f"--ckpt_load_path={run}",
        "--device=cpu",
    ]
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "PYTHONPATH": ROOT,
        "NPROC_PER_NODE": "1",
        "MASTER_PORT": str(free_port()),
        "OMP_NUM_THREADS": "1",
    }
    out = subprocess.run(
        ["bash", os.path.join(ROOT, "train_llama.sh"), *flags],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    with open(os.path.join(run, "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == [1, 2]
    assert os.path.isfile(os.path.join(run, "checkpoints", "step_2_ckp", "COMPLETE"))
    saved = open(os.path.join(run, "config.yaml")).read()
    assert "sharding_strategy: hsdp" in saved and "logical_shards: 960" in saved and "eos_token: 128000" in saved
