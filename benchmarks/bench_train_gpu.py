"""Training throughput on one GPU: a bare FSDP2 + compile loop vs the real trainer, same model, same run.

    python benchmarks/bench_train_gpu.py --out bench_out          # llama3_1.8b_4k, batch 4, seq 4096
    python benchmarks/bench_train_gpu.py --smoke                  # tiny CPU check of the script itself

(a) bare: fully_shard per block + root (bf16 params, fp32 reduce, fp32 master weights), block.compile(),
    fused AdamW, random tokens, nothing else; once per --bare_loss: `chunked` (the models' labels= path,
    avengers/ops/loss.py, what the trainer runs) and/or `full` (cross-entropy over the whole batch's fp32
    logits, the path before it), each with its peak memory (out of memory is reported, not fatal).
(b) trainer: avengers.train.train() with use_dummy_dataset and the same shapes (its loader, clipping,
    schedule, metrics), timed by this script's clock at the trainer's reports once the GPU has drained
    (its own logged figure beside it). `--bare_loss none` runs the trainer alone.
Both report tokens/s/GPU over the timed steps after the warm-up steps, and MFU against the device's peak.
Writes <out>/bench_train_gpu.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before CUDA starts; both runs

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from avengers.config import make_config  # noqa: E402
from avengers.models import get_model_spec  # noqa: E402
from avengers.train.metrics import mfu, peak_flops  # noqa: E402
from avengers.train.parallel import init_distributed  # noqa: E402
from benchmarks.bare_step import bare_step  # noqa: E402


def bare_loop(
    spec, device, batch: int, seq: int, warmup: int, steps: int, compile_blocks: bool, mixed: bool, loss_mode: str
) -> dict:
    """Tokens/s and peak memory of the timed steps of a minimal FSDP2 training loop (bare_step)."""
    step = bare_step(spec, device, batch, seq, compile_blocks, mixed, loss_mode)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        for _ in range(warmup):
            step()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        elapsed = time.perf_counter() - t0
        result = {"tokens_per_s_per_gpu": batch * seq * steps / elapsed}
    except torch.cuda.OutOfMemoryError as e:
        result = {"tokens_per_s_per_gpu": None, "error": f"out of memory: {str(e).splitlines()[0]}"}
    if device.type == "cuda":
        result["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    del step
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def trainer_run(
    variant: str, batch: int, seq: int, warmup: int, steps: int, compile_blocks: bool, device: str
) -> tuple[float, float, dict]:
    """Tokens/s/GPU of the trainer over the steps after the warm-up window, by the wall clock read at
    each report after the device has drained, and as the trainer logged it; and its last report.

    The clock is ours, not the trainer's own `step_time_s`: a trainer that reads its clock before the
    GPU has finished the window's queued steps overstates its speed, and this is how to see it."""
    from unittest import mock

    from avengers.train import metrics
    from avengers.train.trainer import train

    if steps % warmup != 0:
        raise SystemExit(f"--steps={steps} must be a multiple of --warmup={warmup} (the trainer's report window)")
    run = tempfile.mkdtemp(prefix="bench_train_")
    cfg = make_config(
        model_variant=variant,
        use_dummy_dataset=True,
        batch_size=batch,
        seq_length=seq,
        num_steps=warmup + steps,
        report_interval=warmup,
        checkpoint_interval=10**9,
        save_final_checkpoint=False,
        use_torch_compile=compile_blocks,
        sharding_strategy="fsdp",
        ckpt_save_path=run,
        device=device,
        learning_rate=3e-4,
        num_workers=0,
        low_cpu_fsdp=True,
    )
    stamps = {}  # report step -> wall clock once the device is idle
    log = metrics.MetricsLogger.log

    def stamped_log(self, record):
        if "tokens_per_s_per_gpu" in record:
            _sync(torch.device(device))
            stamps[record["step"]] = time.perf_counter()
        return log(self, record)

    with mock.patch.object(metrics.MetricsLogger, "log", stamped_log):
        train(cfg)
    with open(os.path.join(run, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    timed = [r for r in records if "step_time_s" in r and r["step"] > warmup]
    logged = batch * seq * steps / sum(r["step_time_s"] * warmup for r in timed)
    wall = batch * seq * steps / (stamps[warmup + steps] - stamps[warmup])
    return wall, logged, records[-1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    p.add_argument("--variant", default="llama3_1.8b_4k")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--seq_length", type=int, default=4096)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--no_compile", action="store_true")
    p.add_argument(
        "--bare_loss",
        default="chunked",
        help="comma-separated bare-loop losses: chunked (the trainer's), full; or none (the trainer only)",
    )
    p.add_argument("--smoke", action="store_true", help="llama3_tiny, tiny shapes, no compile (CPU check)")
    args = p.parse_args()
    if args.smoke:
        args.variant, args.batch_size, args.seq_length, args.warmup, args.steps = "llama3_tiny", 2, 32, 2, 4
        args.no_compile = True
    torch.backends.cuda.matmul.allow_tf32 = True
    info = init_distributed("auto")
    device = info.device
    spec = get_model_spec(args.variant)
    compile_blocks = not args.no_compile
    mixed = device.type == "cuda"
    flops = spec.flops_per_token(args.seq_length)
    peak = peak_flops(device)

    modes = [] if args.bare_loss == "none" else [m for m in args.bare_loss.split(",") if m]
    if args.bare_loss != "none" and (not modes or any(m not in ("chunked", "full") for m in modes)):
        raise SystemExit(f"--bare_loss takes chunked and/or full, or none, got {args.bare_loss!r}")
    bare_runs = {}
    for mode in modes:
        t0 = time.perf_counter()
        run = bare_loop(
            spec, device, args.batch_size, args.seq_length, args.warmup, args.steps, compile_blocks, mixed, mode
        )
        run["wall_s"] = time.perf_counter() - t0
        run["mfu"] = mfu(flops, run["tokens_per_s_per_gpu"] or 0.0, peak)
        bare_runs[mode] = run
        speed = f"{run['tokens_per_s_per_gpu']:,.0f} tokens/s/GPU" if run["tokens_per_s_per_gpu"] else run["error"]
        mem = f", peak {run['peak_mem_gib']:.1f} GiB" if "peak_mem_gib" in run else ""
        print(f"bare loop ({mode} loss): {speed}, MFU {_pct(run['mfu'])}{mem} ({run['wall_s']:.0f} s)", flush=True)
    bare = (bare_runs[modes[0]]["tokens_per_s_per_gpu"] if modes else None) or float("nan")
    t0 = time.perf_counter()
    trainer, logged, last = trainer_run(
        args.variant,
        args.batch_size,
        args.seq_length,
        args.warmup,
        args.steps,
        compile_blocks,
        "cuda" if device.type == "cuda" else "cpu",
    )
    t_trainer = time.perf_counter() - t0
    print(
        f"trainer:   {trainer:,.0f} tokens/s/GPU (its own log: {logged:,.0f}), MFU {_pct(mfu(flops, trainer, peak))} "
        f"({t_trainer:.0f} s)"
    )
    if bare_runs:
        print(f"trainer / bare = {trainer / bare:.3f}")
    result = {
        "variant": args.variant,
        "batch_size": args.batch_size,
        "seq_length": args.seq_length,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "compile": compile_blocks,
        "mixed_precision_bf16": mixed,
        "device": torch.cuda.get_device_name(device) if mixed else "cpu",
        "torch": torch.__version__,
        "flops_per_token": flops,
        "peak_flops": peak,
        "bare": bare_runs,
        "trainer": {
            "tokens_per_s_per_gpu": trainer,
            "as_logged_tokens_per_s_per_gpu": logged,
            "mfu": mfu(flops, trainer, peak),
            "wall_s": t_trainer,
            "last_report": last,
        },
        "trainer_over_bare": trainer / bare if bare_runs else None,
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_train_gpu.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")
    import torch.distributed as dist

    dist.destroy_process_group()


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


if __name__ == "__main__":
    main()
