"""Eval-loss curves of several training runs on one plot, and a table of their best and last eval loss.

    python -m avengers.quality.curves --runs runs/q_llama,runs/q_mamba,runs/q_hybrid,runs/q_tele --out runs/q_curves

Reads each run's metrics.jsonl (the eval records written with --eval_interval, and the training
loss records) and config.yaml; writes <out>/eval_curves.png, eval_curves.json and eval_curves.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any


def read_run(run: str) -> dict[str, Any]:
    """{run, model_variant, train: [(tokens, loss)], eval: [(tokens, eval_loss)]} from a run folder."""
    from avengers.config import make_config

    metrics = os.path.join(run, "metrics.jsonl")
    if not os.path.isfile(metrics):
        raise ValueError(f"--runs {run!r}: no metrics.jsonl (expected a training run folder)")
    cfg = make_config(os.path.join(run, "config.yaml")) if os.path.isfile(os.path.join(run, "config.yaml")) else None
    tokens_per_step = cfg.batch_size * cfg.seq_length * cfg.grad_accum_steps if cfg else 1
    train, evals = {}, {}
    with open(metrics) as f:
        for record in map(json.loads, f):
            if "eval_loss" in record:
                tokens = record.get("tokens_seen", record["step"] * tokens_per_step)
                evals[record["step"]] = (tokens, record["eval_loss"])
            elif "loss" in record:
                train[record["step"]] = (record["tokens_seen"], record["loss"])
    if not evals:
        raise ValueError(f"{metrics}: no eval records; train with --eval_interval > 0 and --eval_fraction > 0")
    return {
        "run": run,
        "model_variant": cfg.model_variant if cfg else os.path.basename(run),
        "train": [train[s] for s in sorted(train)],  # a resumed run may log a step twice: the last one counts
        "eval": [evals[s] for s in sorted(evals)],
    }


def summary_table(runs: list[dict[str, Any]]) -> str:
    lines = ["| run | model | best eval loss | at tokens | last eval loss |", "|---|---|---|---|---|"]
    for r in runs:
        tokens, best = min(r["eval"], key=lambda p: p[1])
        lines.append(
            f"| {r['run']} | {r['model_variant']} | {best:.4f} | {tokens / 1e6:.2f}M | {r['eval'][-1][1]:.4f} |"
        )
    return "\n".join(lines) + "\n"


def plot(runs: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, r in enumerate(runs):
        color = f"C{i}"
        ax.plot(
            [t / 1e6 for t, _ in r["eval"]],
            [v for _, v in r["eval"]],
            color=color,
            marker="o",
            ms=3,
            label=f"{r['model_variant']} eval",
        )
        if r["train"]:
            ax.plot([t / 1e6 for t, _ in r["train"]], [v for _, v in r["train"]], color=color, alpha=0.35, ls="--")
    ax.set(xlabel="training tokens (M)", ylabel="loss (eval: solid, train: dashed)", title="Held-out loss")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m avengers.quality.curves", description=__doc__.split("\n")[0])
    parser.add_argument("--runs", required=True, help="training run folders, comma-separated")
    parser.add_argument("--out", default="runs/eval_curves")
    args = parser.parse_args(argv)
    try:
        runs = [read_run(r) for r in args.runs.split(",") if r]
    except ValueError as e:
        print(f"avengers.quality.curves: error: {e}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "eval_curves.json"), "w") as f:
        json.dump({"runs": runs}, f, indent=1)
    table = summary_table(runs)
    with open(os.path.join(args.out, "eval_curves.md"), "w") as f:
        f.write(table)
    plot(runs, os.path.join(args.out, "eval_curves.png"))
    print(table + f"wrote {args.out}/eval_curves.png, .json, .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
