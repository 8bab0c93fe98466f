"""`python -m avengers.generate`: continue prompts with a trained checkpoint or a randomly initialised variant.

    python -m avengers.generate --ckpt runs/demo --prompt "The cell membrane" --max_new_tokens 40
    python -m avengers.generate --model_variant llama3_tiny --prompt_ids 1,2,3   # random weights, token ids

On a GPU the decode step takes the fastest tested path for the model (`--decode auto`, replayed
from a CUDA graph); `--decode reference` is the plain per-module path every other one is tested against.

The tokenizer comes from --tokenizer, else from the checkpoint's saved config (tokenizer_path).
Prompts that tokenize to the same length are generated as one batch; others in separate batches.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

import torch

from avengers.decode.options import DECODE_PATHS, SSM_STATE_DTYPES, DecodeOptions
from avengers.dtypes import DTYPES
from avengers.inference.generate import generate


class Tokenizer:
    """A `tokenizers` tokenizer.json (file or folder holding one) behind encode/decode."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer as _Tok

        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"tokenizer {path!r}: expected a tokenizer.json file or a folder holding one")
        self._tok = _Tok.from_file(file)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)


def load(args: argparse.Namespace) -> tuple[torch.nn.Module, Tokenizer | None, int | None, int | None]:
    """(model, tokenizer or None, bos id, eos id) from --ckpt or --model_variant."""
    bos = eos = None
    tok_path = args.tokenizer
    if args.ckpt:
        from avengers.train.checkpoint import load_model_from_checkpoint

        model, cfg = load_model_from_checkpoint(args.ckpt, device=args.device)
        tok_path = tok_path or getattr(cfg, "tokenizer_path", None)
        bos, eos = getattr(cfg, "bos_token", None), getattr(cfg, "eos_token", None)
    else:
        from avengers.models.registry import get_model_spec

        torch.manual_seed(args.seed)
        model = get_model_spec(args.model_variant).build(args.device)
        model.init_weights()
    if args.dtype:
        model.to(DTYPES[args.dtype])
    tokenizer = Tokenizer(tok_path) if tok_path else None
    return model.eval(), tokenizer, bos, eos


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m avengers.generate", description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="run folder (newest checkpoint) or checkpoint step folder")
    src.add_argument("--model_variant", help="registry variant with random weights")
    p.add_argument("--prompt", action="append", default=[], help="text prompt (repeat for a batch)")
    p.add_argument("--prompt_ids", action="append", default=[], help="comma-separated token ids (repeatable)")
    p.add_argument(
        "--tokenizer", help="tokenizer.json or a folder holding one (default: the checkpoint's tokenizer_path)"
    )
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=None, help="sample from the k most likely tokens (0 or unset: all)")
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--eos_token_id", type=int, default=None, help="default: the checkpoint's eos_token")
    p.add_argument("--no_eos", action="store_true", help="never stop early")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default=None)
    p.add_argument(
        "--decode",
        choices=DECODE_PATHS,
        default="auto",
        help="decode path (docs/inference.md); auto: the fastest tested one for the model, device and batch",
    )
    p.add_argument(
        "--ssm_state",
        choices=SSM_STATE_DTYPES,
        default="fp32",
        help="dtype of Mamba-2 layers' SSM state: fp32, or the model's own dtype (model: half the bytes)",
    )
    p.add_argument(
        "--no_cuda_graph", action="store_true", help="run decode steps eagerly on CUDA (default: replay a CUDA graph)"
    )
    args = p.parse_args(argv)
    if not args.prompt and not args.prompt_ids:
        p.error("give at least one --prompt or --prompt_ids")
    try:
        DecodeOptions(args.decode, ssm_state=args.ssm_state).resolve("llama", args.device)
    except ValueError as e:
        p.error(str(e))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model, tokenizer, bos, eos = load(args)
    if args.prompt and tokenizer is None:
        raise SystemExit(
            "--prompt needs a tokenizer: pass --tokenizer or a --ckpt whose config has tokenizer_path "
            "(or give token ids with --prompt_ids)"
        )
    eos = None if args.no_eos else (args.eos_token_id if args.eos_token_id is not None else eos)
    prompts: list[tuple[str, list[int]]] = []
    for text in args.prompt:
        prompts.append((text, ([bos] if bos is not None else []) + tokenizer.encode(text)))
    for ids in args.prompt_ids:
        try:
            prompts.append((ids, [int(i) for i in ids.split(",") if i.strip()]))
        except ValueError:
            raise SystemExit(f"--prompt_ids must be comma-separated integers, got {ids!r}") from None
    embeddings = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    vocab = embeddings[0].num_embeddings if embeddings else None
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, (_, ids) in enumerate(prompts):
        if not ids:
            raise SystemExit(f"prompt {prompts[i][0]!r} is empty after tokenization")
        if vocab is not None and max(ids) >= vocab:
            raise SystemExit(f"prompt {prompts[i][0]!r} has token id {max(ids)} >= vocabulary size {vocab}")
        by_len[len(ids)].append(i)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    results: dict[int, list[int]] = {}
    options = DecodeOptions(args.decode, ssm_state=args.ssm_state)
    for length, idx in by_len.items():  # one batch per prompt length: no padding (see generate's docstring)
        batch = torch.tensor([prompts[i][1] for i in idx], dtype=torch.long, device=args.device)
        out = generate(
            model,
            batch,
            args.max_new_tokens,
            args.temperature,
            args.top_k,
            args.top_p,
            eos,
            generator=gen,
            cuda_graph=False if args.no_cuda_graph else None,
            options=options,
        )
        for row, i in zip(out.tolist(), idx):
            results[i] = row[length:]
    for i, (prompt, _) in enumerate(prompts):
        new = results[i]
        if eos is not None and eos in new:
            new = new[: new.index(eos) + 1]
        text = tokenizer.decode(new) if tokenizer is not None else " ".join(map(str, new))
        print(f"=== prompt {i}: {prompt}\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
