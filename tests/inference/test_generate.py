"""generate(): greedy equals the full-forward argmax loop, sampling filters, EOS, and the CLI."""

import os

import pytest
import torch

from avengers.generate import main as generate_main
from avengers.inference.generate import generate, sample_next

TOKENIZER = os.path.join(os.path.dirname(__file__), "..", "..", "data", "sample", "tokenizer")


@torch.no_grad()
def test_greedy_matches_full_forward_loop(tiny):
    spec, model = tiny
    ids = torch.randint(0, spec.vocab_size, (3, 7), generator=torch.Generator().manual_seed(0))
    seq = ids
    for _ in range(6):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(generate(model, ids, 6), seq)


def test_sampling_filters():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]]).repeat(200, 1)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next(logits, 1.0, top_k=1, generator=g), torch.ones(200, dtype=torch.long))
    assert set(sample_next(logits, 1.0, top_k=2, generator=g).tolist()) == {1, 3}
    # softmax([3, 2, 1, 0]) = [.64, .24, .09, .03]: top_p=0.8 keeps the first two
    assert set(sample_next(logits, 1.0, top_p=0.8, generator=g).tolist()) == {1, 3}
    assert set(sample_next(logits, 5.0, generator=g).tolist()) == {0, 1, 2, 3}
    assert torch.equal(sample_next(logits, 0.0), torch.ones(200, dtype=torch.long))
    # top_k=0 disables the filter (the Hugging Face convention), as None does
    assert set(sample_next(logits, 5.0, top_k=0, generator=g).tolist()) == {0, 1, 2, 3}


def test_sampling_is_reproducible_and_eos_stops(tiny):
    spec, model = tiny
    ids = torch.randint(0, spec.vocab_size, (2, 5), generator=torch.Generator().manual_seed(3))
    a = generate(model, ids, 8, temperature=1.0, top_k=50, generator=torch.Generator().manual_seed(7))
    b = generate(model, ids, 8, temperature=1.0, top_k=50, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.shape == (2, 13)
    greedy = generate(model, ids, 8)
    eos = int(greedy[0, 7])  # row 0's third new token
    out = generate(model, ids, 8, eos_token_id=eos)
    first = (out[0, 5:] == eos).nonzero()[0].item()
    assert first <= 2 and (out[0, 5 + first :] == eos).all()  # a finished row is filled with EOS
    assert torch.equal(out[1, :8], greedy[1, :8])
    alone = generate(model, ids[:1], 8, eos_token_id=eos)  # every row finished: stop early
    assert alone.shape == (1, 5 + first + 1) and torch.equal(alone[0], greedy[0, : 5 + first + 1])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_p=1.5), "top_p"),
    ],
)
def test_bad_sampling_arguments_raise(tiny, kwargs, match):
    _, model = tiny
    with pytest.raises(ValueError, match=match):
        generate(model, torch.zeros(1, 3, dtype=torch.long), 2, **kwargs)


def test_cli_random_weights_with_tokenizer(capsys):
    rc = generate_main(
        [
            "--model_variant",
            "llama3_tiny",
            "--prompt",
            "The sun",
            "--prompt",
            "A b c",
            "--prompt_ids",
            "5,6",
            "--tokenizer",
            TOKENIZER,
            "--max_new_tokens",
            "4",
            "--device",
            "cpu",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and out.count("=== prompt") == 3 and "The sun" in out


def test_cli_loads_a_checkpoint(tmp_path, tiny, capsys):
    import torch.distributed.checkpoint as dcp

    from avengers.config import make_config
    from avengers.train.checkpoint import MARKER

    spec, model = tiny
    step = tmp_path / "checkpoints" / "step_3_ckp"
    step.mkdir(parents=True)
    make_config(model_variant="llama3_tiny", tokenizer_path=TOKENIZER, eos_token=0).save(str(step / "config.yaml"))
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(step))
    (step / MARKER).write_text("3\n")
    assert (
        generate_main(
            ["--ckpt", str(tmp_path), "--prompt", "Hello", "--max_new_tokens", "3", "--device", "cpu", "--no_eos"]
        )
        == 0
    )
    expected = generate(model, torch.tensor([get_tok().encode("Hello")]), 3)[0, -3:].tolist()
    assert get_tok().decode(expected) in capsys.readouterr().out


def get_tok():
    from avengers.generate import Tokenizer

    return Tokenizer(TOKENIZER)


def test_cli_decode_path_takes_that_path_and_matches(capsys, monkeypatch):
    from avengers.decode import llama, llama_block

    monkeypatch.setattr(llama_block.torch, "compile", lambda fn, **kw: fn)  # the compile path's maths, fast
    llama_block._torch_functions.cache_clear()
    args = ["--model_variant", "llama3_tiny", "--prompt_ids", "5,6,7", "--max_new_tokens", "5", "--device", "cpu"]
    assert generate_main(args) == 0
    plain = capsys.readouterr().out
    calls = []
    real = llama.decode_block
    monkeypatch.setattr(llama, "decode_block", lambda *a, **k: calls.append(1) or real(*a, **k))
    try:
        assert generate_main(args + ["--decode", "compile"]) == 0
    finally:
        llama_block._torch_functions.cache_clear()
    assert capsys.readouterr().out == plain and calls  # same greedy tokens, through the block functions


def test_cli_rejects_triton_decode_on_cpu(capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(SystemExit):
        generate_main(["--model_variant", "llama3_tiny", "--prompt_ids", "1", "--device", "cpu", "--decode", "triton"])
    assert "needs a CUDA device" in capsys.readouterr().err


def test_cli_top_k_zero_samples_from_the_whole_vocabulary(capsys):
    """`--top_k 0` is Hugging Face's "no top-k filter", not a crash."""
    argv = ["--model_variant", "llama3_tiny", "--prompt_ids", "5,6", "--max_new_tokens", "3", "--device", "cpu"]
    assert generate_main([*argv, "--temperature", "1.0", "--top_k", "0", "--seed", "1"]) == 0
    sampled = capsys.readouterr().out
    assert generate_main([*argv, "--temperature", "1.0", "--seed", "1"]) == 0
    assert capsys.readouterr().out == sampled  # the same draw as no top-k at all
