"""`python -m avengers.export --ckpt RUN --out DIR [--format auto|hf|mamba_ssm] [--tokenizer T] [--dtype bf16]`."""

from __future__ import annotations

import argparse
import logging
import sys

from avengers.dtypes import DTYPES
from avengers.export import ExportError, export_checkpoint


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m avengers.export",
        description="Export a checkpoint to Hugging Face transformers or mamba_ssm (see avengers/export/__init__.py).",
    )
    p.add_argument("--ckpt", required=True, help="run folder (its newest checkpoint) or a checkpoint step folder")
    p.add_argument("--out", required=True, help="new folder to write (must not exist or be empty)")
    p.add_argument(
        "--format",
        default="auto",
        choices=("auto", "hf", "mamba_ssm"),
        help="auto: hf for llama and telescoping, mamba_ssm for the mamba family",
    )
    p.add_argument("--tokenizer", help="tokenizer folder, tokenizer.json or Hub id (default: the run's tokenizer_path)")
    p.add_argument("--dtype", default="bf16", help=f"weights dtype, one of {', '.join(DTYPES)}")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("huggingface_hub").setLevel(logging.WARNING)  # it reports the temporary folder's path
    args = build_parser().parse_args(argv)
    try:
        export_checkpoint(args.ckpt, args.out, format=args.format, tokenizer=args.tokenizer, dtype=args.dtype)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
