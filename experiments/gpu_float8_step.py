"""Where `--float8` gains and loses: one training step of a model in bf16 and with its blocks' linear
layers in float8, timed and profiled by kernel class on one GPU.

    python experiments/gpu_float8_step.py --variant tele128_llama3_1.8b --out DIR

A bare FSDP2 loop on one GPU (bf16 params, fp32 reduce and master weights, per-block compile, fused
AdamW, random tokens), the conversion the trainer makes (avengers/train/float8.py): 4 warm-up steps,
5 timed steps, then one profiled step. Writes <out>/float8_step_<variant>.json and the profiles
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
from avengers.train.float8 import convert_blocks_to_float8, float8_unavailable_reason  # noqa: E402
from avengers.train.parallel import build_mesh, find_blocks, init_distributed  # noqa: E402
from benchmarks.profiling import profile_step  # noqa: E402


def one_mode(spec, device: torch.device, float8: bool, batch: int, seq: int, out: Path, tag: str) -> dict:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    torch.manual_seed(0)
    mesh = build_mesh("fsdp", 1, "cuda", None)
    model = spec.build("meta")
    blocks = [block for _, block in find_blocks(model, spec.block_types)]
    converted = convert_blocks_to_float8(model, blocks) if float8 else 0
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for i, block in enumerate(blocks):
        block.compile()
        fully_shard(block, mesh=mesh, reshard_after_forward=i < len(blocks) - 1, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    tokens = torch.randint(0, spec.vocab_size, (batch, seq + 1), device=device)
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def step() -> None:
        model(inputs, labels=labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(4):
        step()
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(5):
        step()
    torch.cuda.synchronize(device)
    ms = (time.perf_counter() - t0) / 5 * 1e3
    print(f"{tag}: {ms:.1f} ms/step ({converted} float8 linear layers)", flush=True)
    summary = profile_step(step, device, out, tag)
    summary.pop("_rows")
    return {"ms_per_step": ms, "float8_linear_layers": converted, **summary}


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
