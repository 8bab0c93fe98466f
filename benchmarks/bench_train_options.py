"""Two trainer options against the same run's baseline, through the real CLI (`python -m avengers.train`):

    python benchmarks/bench_train_options.py float8 --out $OUT/float8          # bf16 vs --float8
    python benchmarks/bench_train_options.py checkpoint --out $OUT/checkpoint  # blocking vs --async_checkpoint

float8: the same model, data, seed and steps with and without --float8: tokens/s/GPU after the warm-up
window, and the loss curves (JSON + PNG). On the bundled sample corpus when it is prepared
(scripts/prepare_data.sh sample), else random tokens. Needs an fp8 GPU (sm_89+).
checkpoint: two periodic saves of the model and optimizer with and without --async_checkpoint; what
the step loop waited for each, read from the trainer's log line (which also says how much of a
wait was spent finishing the previous asynchronous save), and the tokens/s of the run.
Writes <out>/bench_<mode>.json (and loss_curves.png for float8).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

SAMPLE = "data/prepared/sample"
STALL = re.compile(
    r"checkpoint step (\d+) -> .* \(the step loop waited ([0-9.]+) s(?:, ([0-9.]+) s of it finishing the previous save's write)?\)"
)


def train(flags: dict, run: str) -> tuple[list[dict], str]:
    """Run the trainer CLI into `run`; returns its metrics records and its output."""
    argv = [sys.executable, "-m", "avengers.train", f"--ckpt_save_path={run}"]
    argv += [f"--{k}={v}" for k, v in flags.items()]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    with open(os.path.join(run, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return records, proc.stdout


def base_flags(args) -> dict:
    flags = dict(
        model_variant=args.variant,
        batch_size=args.batch_size,
        seq_length=args.seq_length,
        num_steps=args.steps,
        warmup_steps=min(20, args.steps // 10),
        learning_rate=args.learning_rate,
        report_interval=args.report_interval,
        use_torch_compile=not args.no_compile,
        sharding_strategy="fsdp",
        num_workers=1,
        seed=args.seed,
    )
    if os.path.isdir(SAMPLE) and not args.dummy_data:
        flags.update(
            data_path=SAMPLE, datasets="fineweb-edu-sample,dolma-sample", weights="1,1", eos_token=1, bos_token=0
        )
    else:
        flags.update(use_dummy_dataset=True)
    return flags


def tokens_per_s(records: list[dict], after_step: int) -> float:
    timed = [r for r in records if "tokens_per_s_per_gpu" in r and r["step"] > after_step]
    return sum(r["tokens_per_s_per_gpu"] for r in timed) / len(timed)


def losses(records: list[dict]) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]


def float8(args, tmp: str) -> dict:
    import torch

    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
        raise SystemExit(f"float8 needs an sm_89+ GPU (L4, L40, H100, H200); this machine has {name}")
    flags = {**base_flags(args), "checkpoint_interval": 10**9, "save_final_checkpoint": False}
    result = {"device": torch.cuda.get_device_name(), "flags": flags, "runs": {}}
    for name, extra in (("bf16", {}), ("float8", {"float8": True})):
        records, _ = train({**flags, **extra}, os.path.join(tmp, name))
        result["runs"][name] = {
            "tokens_per_s_per_gpu": tokens_per_s(records, args.report_interval),
            "peak_mem_gib": max(r.get("mem_allocated_gib", 0) for r in records),
            "loss": losses(records),
        }
        print(f"{name}: {result['runs'][name]['tokens_per_s_per_gpu']:,.0f} tokens/s/GPU", flush=True)
    bf16, fp8 = (result["runs"][k] for k in ("bf16", "float8"))
    result["speedup"] = fp8["tokens_per_s_per_gpu"] / bf16["tokens_per_s_per_gpu"]
    result["final_loss_delta"] = fp8["loss"][-1][1] - bf16["loss"][-1][1]
    plot_losses(result["runs"], os.path.join(args.out, "loss_curves.png"), args.variant)
    return result


def plot_losses(runs: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, run in runs.items():
        steps, loss = zip(*run["loss"])
        ax.plot(steps, loss, label=f"{name} ({run['tokens_per_s_per_gpu']:,.0f} tok/s)")
    ax.set(xlabel="step", ylabel="training loss (report window mean)", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def checkpoint(args, tmp: str) -> dict:
    """Two periodic saves per run (the first async one also sets up its process groups and pinned
    buffers; the second is what every later save costs), no final save."""
    every = args.steps // 2
    flags = {**base_flags(args), "checkpoint_interval": every, "ckpt_keep_last": 1, "save_final_checkpoint": False}
    flags["num_steps"] = 2 * every + 1
    result = {"flags": flags, "runs": {}}
    for name, extra in (("blocking", {}), ("async", {"async_checkpoint": True})):
        run = os.path.join(tmp, name)
        records, out = train({**flags, **extra}, run)
        stalls = {int(s): (float(w), float(prev or 0)) for s, w, prev in STALL.findall(out)}
        first, second = stalls.get(every, (None, 0.0)), stalls.get(2 * every, (None, 0.0))
        result["runs"][name] = {
            "first_save_stall_s": first[0],
            "second_save_stall_s": second[0],
            "second_save_waiting_for_first_s": second[1],
            "tokens_per_s_per_gpu": tokens_per_s(records, 0),
        }
        print(f"{name}: the step loop waited {stalls} s (step: (seconds, of them for the previous write))", flush=True)
        if second[1] > 0:
            print(
                f"  the save at step {2 * every} first waited {second[1]:.1f} s for the one at step {every}: "
                "space the saves further apart (--steps) to time a save alone",
                flush=True,
            )
        shutil.rmtree(run)  # a 1.8B model's checkpoint is ~22 GB: one run's at a time on the disk
    runs = result["runs"]
    if runs["blocking"]["second_save_stall_s"]:
        result["stall_ratio"] = runs["async"]["second_save_stall_s"] / runs["blocking"]["second_save_stall_s"]
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("float8", "checkpoint"))
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    p.add_argument("--variant", default="llama3_1.8b_4k")
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--seq_length", type=int, default=4096)
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="default: 200 (float8 and checkpoint; checkpoint saves at steps/2 and steps, which must be "
        "further apart than one save takes to write for the second to time a save alone)",
    )
    p.add_argument("--report_interval", type=int, default=10)
    p.add_argument("--learning_rate", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=2023)
    p.add_argument("--no_compile", action="store_true")
    p.add_argument("--dummy_data", action="store_true", help="random tokens even where the sample corpus is prepared")
    args = p.parse_args()
    args.steps = args.steps or 200
    if args.steps < 2 or args.steps % 2:
        raise SystemExit(f"--steps must be an even number >= 2, got {args.steps}")
    if args.mode == "float8" and args.steps <= args.report_interval:
        raise SystemExit(f"--steps ({args.steps}) must exceed --report_interval ({args.report_interval})")
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"bench_{args.mode}_", dir=args.out) as tmp:
        result = (float8 if args.mode == "float8" else checkpoint)(args, tmp)
    path = os.path.join(args.out, f"bench_{args.mode}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k not in ("flags", "runs")}), f"-> {path}")


if __name__ == "__main__":
    main()
