"""Where `--float8` gains and loses: one training step of a model in bf16 and with its blocks' linear
layers in float8, timed and profiled by kernel class on one GPU.

    python experiments/gpu_float8_step.py --variant tele128_llama3_1.8b --out DIR

benchmarks/bare_step.py's step on one GPU (bf16 params, fp32 reduce and master weights, per-block
compile, fused AdamW, random tokens; float8: the trainer's conversion): 4 warm-up steps, 5 timed
steps, then one profiled step. Writes <out>/float8_step_<variant>.json and the profiles
(benchmarks/profiling.py). Needs an sm_89+ GPU and torchao.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avengers.models import get_model_spec  # noqa: E402
from avengers.train.float8 import float8_unavailable_reason  # noqa: E402
from avengers.train.parallel import init_distributed  # noqa: E402
from benchmarks.bare_step import bare_step  # noqa: E402
from benchmarks.profiling import profile_step  # noqa: E402


def one_mode(spec, device: torch.device, float8: bool, batch: int, seq: int, out: Path, tag: str) -> dict:
    step = bare_step(spec, device, batch, seq, compile_blocks=True, mixed=True, loss_mode="chunked", float8=float8)
    for _ in range(4):
        step()
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(5):
        step()
    torch.cuda.synchronize(device)
    ms = (time.perf_counter() - t0) / 5 * 1e3
    print(f"{tag}: {ms:.1f} ms/step", flush=True)
    summary = profile_step(step, device, out, tag)
    summary.pop("_rows")
    return {"ms_per_step": ms, **summary}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="tele128_llama3_1.8b")
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--seq_length", type=int, default=4096)
    p.add_argument("--out", default="bench_out")
    args = p.parse_args()
    info = init_distributed("auto")
    spec = get_model_spec(args.variant)
    if reason := float8_unavailable_reason(spec.family, info.device):
        raise SystemExit(reason)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name(info.device), "torch": torch.__version__, **vars(args)}
    for mode in ("bf16", "float8"):
        tag = f"{args.variant}_{mode}"
        result[mode] = one_mode(spec, info.device, mode == "float8", args.batch_size, args.seq_length, out, tag)
        torch.cuda.empty_cache()
    path = out / f"float8_step_{args.variant}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"float8 / bf16 step time {result['float8']['ms_per_step'] / result['bf16']['ms_per_step']:.3f} -> {path}")


if __name__ == "__main__":
    main()
