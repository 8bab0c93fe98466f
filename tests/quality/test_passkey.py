"""Passkey retrieval vs context length and depth (avengers/quality/passkey.py)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from avengers.data.prepare import load_tokenizer
from avengers.quality.passkey import PromptParts, build_prompt, main, passkey_grid

TOKENIZER = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "data/sample/tokenizer")


@pytest.fixture(scope="module")
def encode():
    tok = load_tokenizer(TOKENIZER)
    return lambda text: tok.encode(text, add_special_tokens=False).ids


class CopyModel(nn.Module):
    """Predicts the token that followed the latest earlier occurrence of the last `k` tokens: a model
    that can read the answer out of its context whenever the needle is there."""

    def __init__(self, vocab_size: int, k: int = 4):
        super().__init__()
        self.vocab_size, self.k = vocab_size, k

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*ids.shape, self.vocab_size)
        for b, row in enumerate(ids.tolist()):
            for t in range(self.k - 1, len(row)):
                suffix = row[t - self.k + 1 : t + 1]
                for s in range(t - 1, self.k - 2, -1):
                    if row[s - self.k + 1 : s + 1] == suffix:
                        logits[b, t, row[s + 1]] = 1.0
                        break
        return logits


def test_prompt_has_the_exact_length_and_the_needle_at_the_depth(encode):
    parts = PromptParts.from_tokenizer(encode)
    answer = encode(" 48213")
    needle = parts.needle_head + answer + parts.needle_tail
    for depth, where in ((0.0, len(parts.instruction)), (1.0, 200 - len(parts.question) - len(needle))):
        prompt = build_prompt(parts, answer, 200, depth)
        assert len(prompt) == 200
        assert prompt[where : where + len(needle)] == needle
        assert prompt[-len(parts.question) :] == parts.question
    fixed = len(parts.instruction) + len(needle) + len(parts.question)
    with pytest.raises(ValueError, match=f"use lengths >= {fixed}"):
        build_prompt(parts, answer, fixed - 1, 0.5)


def test_a_model_that_can_copy_the_needle_scores_one_and_a_blind_one_zero(encode):
    grid = passkey_grid(CopyModel(4096), encode, [80, 160], [0.0, 0.5, 1.0], trials=4, seed=1)
    assert grid["accuracy"] == [[1.0, 1.0]] * 3
    assert len(set(grid["keys"])) == 4
    blind = passkey_grid(CopyModel(4096, k=40), encode, [80, 160], [0.0, 1.0], trials=4, seed=1)
    assert blind["accuracy"] == [[0.0, 0.0]] * 2  # a 40-token match never recurs: nothing is read back


def test_cli_on_a_checkpoint_is_deterministic(tiny_run, tmp_path, capsys):
    run, _, _ = tiny_run
    args = ["--ckpt", str(run), "--lengths", "64,96", "--depths", "0,0.5,1", "--trials", "3", "--device", "cpu"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    a = json.loads((tmp_path / "a" / "passkey.json").read_text())
    b = json.loads((tmp_path / "b" / "passkey.json").read_text())
    assert a == b
    (r,) = a["results"]
    assert r["lengths"] == [64, 96] and r["depths"] == [0.0, 0.5, 1.0] and len(r["keys"]) == 3
    assert [len(row) for row in r["accuracy"]] == [2, 2, 2]
    assert all(v in (0.0, 1 / 3, 2 / 3, 1.0) for row in r["accuracy"] for v in row)
    assert (tmp_path / "a" / "passkey.png").stat().st_size > 1000
    assert main(args[:2] + ["--lengths", "8", "--out", str(tmp_path / "c")]) == 2
    assert "too short for the passkey prompt" in capsys.readouterr().err
    assert main(args[:2] + ["--lengths", "1024", "--out", str(tmp_path / "c")]) == 2  # llama3_tiny: RoPE to 1024
    assert "more than its max_seq_len=1024" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()  # refused before any model ran
