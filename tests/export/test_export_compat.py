"""Every Hugging Face export loads and computes our logits and greedy continuations, with its tokenizer
adding BOS as training did, on the installed transformers (5.x) and on the oldest supported 4.x.

The 4.x run needs `make test-compat` (which installs transformers at requirements.txt's floor, with
its own tokenizers and huggingface_hub, into .compat/transformers4); without that folder it is skipped.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoint_helpers import save_checkpoint
from tokenizers import Tokenizer

from avengers.export import export_checkpoint
from avengers.inference.generate import generate

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = ROOT / "data" / "sample" / "tokenizer"
TRANSFORMERS4 = ROOT / ".compat" / "transformers4"
CHECKER = Path(__file__).with_name("hf_checker.py")
TEXT = "The history of the cell"
BOS, EOS = 0, 1
# variant, --format, trust_remote_code
EXPORTS = [
    ("llama3_tiny", "auto", False),
    ("mamba2_tiny", "hf", False),
    ("bamba_tiny", "hf", False),
    ("tele_tiny", "auto", True),
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(cases for hf_checker, our logits and greedy continuations) of fp32 exports of seeded checkpoints."""
    root = tmp_path_factory.mktemp("exports")
    ids = torch.randint(2, 4096, (2, 24), generator=torch.Generator().manual_seed(0))
    cases, ours = [], []
    for variant, fmt, remote in EXPORTS:
        model = save_checkpoint(
            root / variant, variant, tokenizer_path=str(TOKENIZER), bos_token=BOS, eos_token=EOS, seq_length=64
        )
        out = export_checkpoint(str(root / variant), str(root / f"{variant}-hf"), format=fmt, dtype="fp32")
        with torch.no_grad():
            ours.append({"logits": model(ids).float(), "generated": generate(model, ids[:, :16], 8)})
        cases.append(
            dict(path=out, trust_remote_code=remote, input_ids=ids.tolist(), prompt_len=16, max_new_tokens=8, text=TEXT)
        )
    return cases, ours


def _expected_text_ids() -> list[int]:
    plain = Tokenizer.from_file(str(TOKENIZER / "tokenizer.json")).encode(TEXT, add_special_tokens=False).ids
    return [BOS, *plain]


def _check(results: dict, ours: list[dict]) -> None:
    for (variant, _, _), got, want in zip(EXPORTS, results["cases"], ours):
        assert (
            got["architecture"]
            in {
                "llama3_tiny": "LlamaForCausalLM",
                "mamba2_tiny": "Mamba2ForCausalLM",
                "bamba_tiny": "BambaForCausalLM",
                "tele_tiny": "TelescopingForCausalLM",
            }[variant]
        )
        torch.testing.assert_close(got["logits"], want["logits"], atol=2e-4, rtol=1e-4, msg=variant)
        assert got["text_ids"] == _expected_text_ids(), variant
        assert torch.equal(got["generated"], want["generated"]), variant


def test_exports_match_on_installed_transformers(exported):
    sys.path.insert(0, str(CHECKER.parent))
    try:
        import transformers
        from hf_checker import run
    finally:
        sys.path.remove(str(CHECKER.parent))
    assert int(transformers.__version__.split(".")[0]) >= 5
    cases, ours = exported
    _check({"cases": [run(c) for c in cases]}, ours)


def _floor() -> str:
    reqs = (ROOT / "requirements.txt").read_text()
    return re.search(r"^transformers>=([\w.]+)", reqs, re.M).group(1)


@pytest.mark.skipif(not TRANSFORMERS4.is_dir(), reason="no .compat/transformers4: run `make test-compat`")
def test_exports_match_on_oldest_supported_transformers(exported, tmp_path):
    cases, ours = exported
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    env = {**os.environ, "PYTHONPATH": str(TRANSFORMERS4), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, str(CHECKER), str(tmp_path / "cases.json"), str(tmp_path / "out.pt")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = torch.load(tmp_path / "out.pt", weights_only=False)
    assert results["transformers"] == _floor()  # the floor in requirements.txt is the version tested here
    _check(results, ours)
