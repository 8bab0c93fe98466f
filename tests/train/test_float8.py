"""--float8: which layers are converted, and a clear error where fp8 training cannot run."""

import subprocess
import sys

import pytest
import torch

from avengers.models import get_model_spec
from avengers.train.float8 import convert_blocks_to_float8, float8_unavailable_reason
from avengers.train.parallel import find_blocks

float8_linear = pytest.importorskip("torchao.float8.float8_linear", reason="torchao is not installed")


@pytest.mark.parametrize("variant,per_block", [("llama3_tiny", 4), ("tele_tiny", 4)])
def test_block_linears_convert_the_head_and_odd_shapes_do_not(variant, per_block):
    spec = get_model_spec(variant)
    model = spec.build("cpu")
    blocks = [b for _, b in find_blocks(model, spec.block_types)]
    assert convert_blocks_to_float8(model, blocks) == per_block * len(blocks)
    fp8 = [n for n, m in model.named_modules() if isinstance(m, float8_linear.Float8Linear)]
    assert len(fp8) == per_block * len(blocks) and not any(n.startswith("head") for n in fp8)
    if variant == "tele_tiny":  # the gate (d_model -> kv heads) is too narrow for fp8 matmuls
        assert not any(n.endswith("attn.gate") for n in fp8)


def test_unavailable_reasons():
    assert "llama and telescoping" in float8_unavailable_reason("mamba", torch.device("cuda"))
    assert "needs a CUDA GPU" in float8_unavailable_reason("llama", torch.device("cpu"))


def test_train_refuses_float8_on_cpu_before_building(tmp_path):
    cmd = [sys.executable, "-m", "avengers.train", "--model_variant=llama3_tiny", "--use_dummy_dataset=True"]
    cmd += ["--device=cpu", "--float8=True", f"--ckpt_save_path={tmp_path}", "--num_steps=2", "--seq_length=64"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "--float8 needs a CUDA GPU with fp8 tensor cores" in run.stderr
    assert not list(tmp_path.glob("checkpoints/*"))
