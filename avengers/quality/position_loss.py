"""Mean loss by token position on held-out documents: where a constant cache starts to cost.

    python -m avengers.quality.position_loss --ckpt runs/llama,runs/mamba,runs/tele --seq_length 4096

Each checkpoint scores the same `num_docs` documents of the eval split (`eval_fraction` of the
training config, avengers/data/heldout.py) that hold at least seq_length + 1 tokens, each from its
start ([bos] + document, as in training), one document per row: position p predicts token p + 1
from a context of p + 1 tokens. The loss is averaged per position and per log-spaced bucket of
context lengths [1], [2, 3], [4, 7], ... Writes <out>/loss_by_position.json and .png (a line per
checkpoint).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

DATA_FIELDS = ("data_path", "datasets", "eval_fraction")  # what defines the eval split


def bucket_edges(seq_len: int) -> list[tuple[int, int]]:
    """Context-length buckets [1, 1], [2, 3], [4, 7], ... covering 1..seq_len (the last one cut short)."""
    edges, lo = [], 1
    while lo <= seq_len:
        edges.append((lo, min(2 * lo - 1, seq_len)))
        lo *= 2
    return edges


@torch.no_grad()
def position_loss_sums(model: torch.nn.Module, rows: torch.Tensor, batch_size: int, device: torch.device) -> np.ndarray:
    """Sum over rows of the next-token loss at each position: rows [N, T + 1] -> float64 [T]."""
    total = torch.zeros(rows.shape[1] - 1, dtype=torch.float64)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size].to(device)
        with autocast:
            logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.float().transpose(1, 2), batch[:, 1:], reduction="none")
        total += loss.double().sum(0).cpu()
    return total.numpy()


def eval_rows(cfg: Any, seq_length: int, num_docs: int) -> torch.Tensor:
    """The first seq_length + 1 tokens of up to num_docs long-enough eval documents, datasets taken in turn."""
    from avengers.data.eval_split import heldout_documents
    from avengers.data.index import make_plan

    plan = make_plan(cfg)
    if plan.spec.eval_fraction <= 0:
        raise ValueError(
            f"eval_fraction={plan.spec.eval_fraction}: the checkpoint's run held out no documents; pass "
            f"--eval_fraction (the fraction its training used, else the documents were trained on)"
        )
    streams = [heldout_documents(plan, d, seq_length + 1) for d, w in enumerate(plan.spec.weights) if w > 0]
    rows: list[np.ndarray] = []
    while streams and len(rows) < num_docs:
        for s in list(streams):
            doc = next(s, None)
            if doc is None:
                streams.remove(s)
            elif len(rows) < num_docs:
                rows.append(doc[: seq_length + 1])
    if not rows:
        raise ValueError(
            f"no held-out document of datasets={plan.spec.datasets} has seq_length + 1 = {seq_length + 1} tokens; "
            f"use a smaller --seq_length or a larger --eval_fraction"
        )
    if len(rows) < num_docs:
        log.warning("only %d held-out documents have %d tokens (asked for %d)", len(rows), seq_length + 1, num_docs)
    return torch.from_numpy(np.stack(rows))


def loss_by_position(
    ckpts: list[str],
    seq_length: int | None = None,
    num_docs: int = 64,
    batch_size: int = 4,
    device: str = "cpu",
    labels: list[str] | None = None,
    data_overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Per-position and per-bucket mean loss of each checkpoint on the same held-out documents."""
    from avengers.config import make_config
    from avengers.train.checkpoint import load_model_from_checkpoint, resolve_checkpoint

    if not ckpts:
        raise ValueError("no checkpoint given: pass --ckpt RUN_OR_STEP_FOLDER[,...]")
    if labels and len(labels) != len(ckpts):
        raise ValueError(f"{len(labels)} labels for {len(ckpts)} checkpoints: give one label per checkpoint")
    if num_docs < 1 or batch_size < 1:
        raise ValueError(f"num_docs={num_docs}, batch_size={batch_size}: expected integers >= 1")
    step_dirs, cfgs = [], []
    for c in ckpts:
        d = resolve_checkpoint(c)
        if d is None:
            raise ValueError(f"--ckpt {c!r} holds no complete checkpoint (a run folder or checkpoints/step_N_ckp)")
        cfg = make_config(os.path.join(d, "config.yaml"), **(data_overrides or {}))
        step_dirs.append(d)
        cfgs.append(cfg)
    splits = [{k: getattr(cfg, k) for k in DATA_FIELDS} for cfg in cfgs]
    for ckpt, split in zip(ckpts, splits):
        if split != splits[0]:
            raise ValueError(
                f"{ckpt!r} was trained with {split}, {ckpts[0]!r} with {splits[0]}: their held-out documents "
                f"differ; compare checkpoints of one eval split, or pass --data_path/--datasets/--eval_fraction"
            )
    seq_length = seq_length or cfgs[0].seq_length
    if seq_length < 1:
        raise ValueError(f"seq_length={seq_length}: expected an integer >= 1")
    rows = eval_rows(cfgs[0], seq_length, num_docs)
    buckets = bucket_edges(seq_length)
    out: dict[str, Any] = {
        "seq_length": seq_length,
        "num_docs": len(rows),
        "data": splits[0],
        "buckets": buckets,
        "checkpoints": [],
    }
    dev = torch.device(device)
    for i, (ckpt, step_dir) in enumerate(zip(ckpts, step_dirs)):
        model, cfg = load_model_from_checkpoint(step_dir, device=dev)
        per_pos = position_loss_sums(model, rows, batch_size, dev) / len(rows)
        out["checkpoints"].append(
            {
                "ckpt": ckpt,
                "step_dir": step_dir,
                "label": labels[i] if labels else f"{cfg.model_variant} ({os.path.basename(step_dir)})",
                "model_variant": cfg.model_variant,
                "mean_loss": float(per_pos.mean()),
                "bucket_loss": [float(per_pos[lo - 1 : hi].mean()) for lo, hi in buckets],
                "position_loss": [float(x) for x in per_pos],
            }
        )
        log.info("%s: mean loss %.4f over %d x %d tokens", ckpt, per_pos.mean(), len(rows), seq_length)
        del model
    return out


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    centers = [np.sqrt(lo * hi) for lo, hi in result["buckets"]]
    for c in result["checkpoints"]:
        ax.plot(centers, c["bucket_loss"], marker="o", label=c["label"])
    ax.set(
        xscale="log",
        xlabel="context length (tokens, log-spaced buckets)",
        ylabel="mean next-token loss",
        title=f"Loss by position: {result['num_docs']} held-out documents, T={result['seq_length']}",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m avengers.quality.position_loss", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--ckpt", required=True, help="run or step folders, comma-separated")
    parser.add_argument("--labels", default="", help="plot labels, comma-separated, one per checkpoint")
    parser.add_argument("--seq_length", type=int, default=None, help="context length (default: the first run's)")
    parser.add_argument("--num_docs", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--out", default="runs/loss_by_position")
    parser.add_argument("--data_path", default=None, help="override the runs' data_path")
    parser.add_argument("--datasets", default=None, help="override the runs' datasets")
    parser.add_argument("--eval_fraction", type=float, default=None, help="override the runs' eval_fraction")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    overrides = {k: getattr(args, k) for k in DATA_FIELDS if getattr(args, k) is not None}
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        result = loss_by_position(
            [c for c in args.ckpt.split(",") if c],
            args.seq_length,
            args.num_docs,
            args.batch_size,
            device,
            [x for x in args.labels.split(",") if x] or None,
            overrides,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"avengers.quality.position_loss: error: {e}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "loss_by_position.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(result, os.path.join(args.out, "loss_by_position.png"))
    for c in result["checkpoints"]:
        print(c["label"], " ".join(f"{lo}-{hi}:{v:.3f}" for (lo, hi), v in zip(result["buckets"], c["bucket_loss"])))
    print(f"wrote {args.out}/loss_by_position.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
