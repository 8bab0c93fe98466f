"""Passkey retrieval vs context length and needle depth, offline and synthetic.

    python -m avengers.quality.passkey --ckpt runs/llama --lengths 512,1024,2048,4096 --depths 0,0.25,0.5,0.75,1

A prompt of exactly `length` tokens hides a random 5-digit number in filler text at a relative
depth (0 = right after the instruction, 1 = right before the question) and ends by asking for it:

    <instruction> <filler ...> <needle: The secret number is 48213. Remember it.> <filler ...> <question>

A trial counts as retrieved when every token of the number is the model's greedy prediction
(teacher-forced, which equals greedy decoding of those tokens). The filler is a few sentences
repeated, or the text of --filler_file (e.g. held-out documents). Writes <out>/passkey.json and a
heat map <out>/passkey.png (depth x length, a panel per checkpoint).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

INSTRUCTION = "Somewhere in the text below a secret number is hidden. Find it and remember it.\n"
FILLER = "The river runs to the sea. Birds fly over the hills. Rain falls and the fields grow green. "
NEEDLE_HEAD, NEEDLE_TAIL = " The secret number is", ". Remember it. "
QUESTION = "\nWhat is the secret number? The secret number is"


@dataclass(frozen=True)
class PromptParts:
    """Token ids of the fixed pieces of every prompt."""

    instruction: list[int]
    filler: list[int]
    needle_head: list[int]
    needle_tail: list[int]
    question: list[int]

    @classmethod
    def from_tokenizer(cls, encode, filler_text: str = FILLER) -> PromptParts:
        parts = cls(
            encode(INSTRUCTION), encode(filler_text), encode(NEEDLE_HEAD), encode(NEEDLE_TAIL), encode(QUESTION)
        )
        if not parts.filler:
            raise ValueError("the filler text encodes to no tokens; give a non-empty --filler_file")
        return parts


def build_prompt(parts: PromptParts, answer: list[int], length: int, depth: float) -> list[int]:
    """A prompt of exactly `length` tokens with the needle after round(depth * filler) filler tokens."""
    needle = parts.needle_head + answer + parts.needle_tail
    fixed = len(parts.instruction) + len(needle) + len(parts.question)
    n_filler = length - fixed
    if n_filler < 0:
        raise ValueError(f"length={length} is too short for the passkey prompt; use lengths >= {fixed}")
    if not 0 <= depth <= 1:
        raise ValueError(f"depth={depth}: expected a number in [0, 1]")
    reps = -(-n_filler // len(parts.filler))
    filler = (parts.filler * reps)[:n_filler]
    cut = round(depth * n_filler)
    return parts.instruction + filler[:cut] + needle + filler[cut:] + parts.question


def longest_answer(encode) -> list[int]:
    return max((encode(f" {k}") for k in (10_000, 99_999, 12_345, 55_555)), key=len)


def check_grid(
    parts: PromptParts, encode, lengths: list[int], depths: list[float], max_seq_len: int | None = None
) -> None:
    """Every length fits the prompt (and the model's max_seq_len with the answer after it) and every
    depth is in [0, 1]; raises ValueError naming the first value that does not."""
    if not lengths or not depths:
        raise ValueError(f"lengths={lengths}, depths={depths}: give at least one of each")
    for depth in depths:
        if not 0 <= depth <= 1:
            raise ValueError(f"depth={depth}: expected a number in [0, 1]")
    answer = longest_answer(encode)
    for length in lengths:
        build_prompt(parts, answer, length, 0.0)
        if max_seq_len is not None and length + len(answer) - 1 > max_seq_len:
            raise ValueError(
                f"length={length}: with the answer the model reads {length + len(answer) - 1} positions, more than "
                f"its max_seq_len={max_seq_len}; use lengths <= {max_seq_len - len(answer) + 1}"
            )


@torch.no_grad()
def retrieved(
    model: torch.nn.Module, prompts: list[list[int]], answers: list[list[int]], device: torch.device
) -> list[bool]:
    """Per prompt: is every answer token the greedy prediction after the prompt (+ earlier answer tokens)?"""
    seqs = [p + a[:-1] for p, a in zip(prompts, answers)]
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)  # right padding: causal, so harmless
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    with autocast:
        logits = model(ids.to(device))
    out = []
    for i, (p, a) in enumerate(zip(prompts, answers)):
        pred = logits[i, len(p) - 1 : len(p) - 1 + len(a)].argmax(-1).cpu()
        out.append(bool(torch.equal(pred, torch.tensor(a))))
    return out


def passkey_grid(
    model: torch.nn.Module,
    encode,
    lengths: list[int],
    depths: list[float],
    trials: int = 8,
    seed: int = 0,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    filler_text: str = FILLER,
) -> dict[str, Any]:
    """accuracy[d][l] over `trials` random numbers per (depth, length); the same numbers in every cell."""
    parts = PromptParts.from_tokenizer(encode, filler_text)
    check_grid(parts, encode, lengths, depths)
    rng = np.random.default_rng(seed)
    keys = [int(k) for k in rng.integers(10_000, 100_000, size=trials)]
    answers = [encode(f" {k}") for k in keys]
    device = torch.device(device)
    model.eval()
    accuracy = []
    for depth in depths:
        row = []
        for length in lengths:
            prompts = [build_prompt(parts, a, length, depth) for a in answers]
            hits = []
            for start in range(0, trials, batch_size):
                end = start + batch_size
                hits += retrieved(model, prompts[start:end], answers[start:end], device)
            row.append(sum(hits) / trials)
        accuracy.append(row)
        log.info("depth %.2f: %s", depth, " ".join(f"{l}:{a:.2f}" for l, a in zip(lengths, row)))
    return {"lengths": lengths, "depths": depths, "trials": trials, "seed": seed, "keys": keys, "accuracy": accuracy}


def plot(results: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panel = max(3.2, 1.2 + 0.7 * max(len(r["lengths"]) for r in results))
    fig, axes = plt.subplots(1, len(results), figsize=(panel * len(results) + 1.2, 3.6), layout="constrained")
    axes = np.atleast_1d(axes)
    for k, (ax, r) in enumerate(zip(axes, results)):
        acc = np.asarray(r["accuracy"])
        im = ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(r["lengths"])), [str(x) for x in r["lengths"]])
        ax.set_yticks(range(len(r["depths"])), [f"{d:.2f}" for d in r["depths"]])
        ax.set_xlabel("context length (tokens)")
        ax.set_title(r["label"], fontsize=9)
        if k == 0:
            ax.set_ylabel("needle depth")
        for (i, j), v in np.ndenumerate(acc):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=list(axes), shrink=0.8, label="retrieval accuracy")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def token_encoder(tokenizer_path: str):
    """text -> token ids (no special tokens) with the tokenizer at tokenizer_path."""
    from avengers.data.prepare import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    return lambda text: tok.encode(text, add_special_tokens=False).ids


def plan_checkpoints(
    ckpts: list[str], lengths: list[int] | None, depths: list[float], tokenizer: str | None, filler: str
) -> list[dict[str, Any]]:
    """Resolve every checkpoint, its tokenizer and lengths, and check every grid before any model loads."""
    from avengers.config import make_config
    from avengers.models import get_model_spec
    from avengers.train.checkpoint import resolve_checkpoint

    if not ckpts:
        raise ValueError("no checkpoint given: pass --ckpt RUN_OR_STEP_FOLDER[,...]")
    jobs = []
    for ckpt in ckpts:
        step_dir = resolve_checkpoint(ckpt)
        if step_dir is None:
            raise ValueError(f"--ckpt {ckpt!r} holds no complete checkpoint (a run folder or checkpoints/step_N_ckp)")
        cfg = make_config(os.path.join(step_dir, "config.yaml"))
        if not (tokenizer or cfg.tokenizer_path):
            raise ValueError(f"{ckpt!r}: its run has no tokenizer_path; pass --tokenizer")
        encode = token_encoder(tokenizer or cfg.tokenizer_path)
        max_seq_len = get_model_spec(cfg.model_variant).max_seq_len
        room = max_seq_len - len(longest_answer(encode)) + 1
        its_lengths = lengths or [n for n in (cfg.seq_length * m // 8 for m in (1, 2, 4, 8, 16)) if n <= room]
        check_grid(PromptParts.from_tokenizer(encode, filler), encode, its_lengths, depths, max_seq_len)
        jobs.append({"ckpt": ckpt, "step_dir": step_dir, "encode": encode, "lengths": its_lengths})
    return jobs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m avengers.quality.passkey", description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, help="run or step folders, comma-separated")
    parser.add_argument(
        "--lengths", default=None, help="prompt lengths in tokens (default: 1/8..2x the run's seq_length that fit)"
    )
    parser.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    parser.add_argument("--trials", type=int, default=8, help="random numbers per (length, depth)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--tokenizer", default=None, help="default: the run's tokenizer_path")
    parser.add_argument("--filler_file", default=None, help="a text file to use as filler instead of the default")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--out", default="runs/passkey")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from avengers.train.checkpoint import load_model_from_checkpoint

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    results = []
    try:
        if args.trials < 1 or args.batch_size < 1:
            raise ValueError(f"trials={args.trials}, batch_size={args.batch_size}: expected integers >= 1")
        depths = [float(x) for x in args.depths.split(",") if x]
        filler = FILLER
        if args.filler_file:
            with open(args.filler_file) as f:
                filler = f.read()
        ckpts = [c for c in args.ckpt.split(",") if c]
        jobs = plan_checkpoints(ckpts, _ints(args.lengths) if args.lengths else None, depths, args.tokenizer, filler)
        for job in jobs:
            model, cfg = load_model_from_checkpoint(job["step_dir"], device=device)
            grid = passkey_grid(
                model, job["encode"], job["lengths"], depths, args.trials, args.seed, args.batch_size, device, filler
            )
            label = f"{cfg.model_variant} ({os.path.basename(job['step_dir'])})"
            results.append({"ckpt": job["ckpt"], "model_variant": cfg.model_variant, "label": label, **grid})
    except (ValueError, FileNotFoundError) as e:  # a bad tokenizer path raises PrepareError, a ValueError
        print(f"avengers.quality.passkey: error: {e}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "passkey.json"), "w") as f:
        json.dump({"results": results}, f, indent=1)
    plot(results, os.path.join(args.out, "passkey.png"))
    print(f"wrote {args.out}/passkey.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
