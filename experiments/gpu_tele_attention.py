"""Telescoping attention alone on one GPU: forward and forward+backward time of each flex layout.

    python benchmarks/gpu_tele_attention.py --out DIR      # one H200, about 3 minutes
    python benchmarks/gpu_tele_attention.py --smoke        # CPU, tiny shapes, forward only (wiring)

One layer of the Tele@128 1.8B shape (B 4, n 4096, 32 heads / 2 KV heads, d 64, bf16) read out
through telescoping_flex with the node-array columns (block_q None) and with per-query-block
column runs (block_q 128, 256), with and without the EMPTY-slot bias; against flex_attention with
a plain causal mask on the same shape and SDPA (cuDNN/flash) causal attention on the Llama-3 1.8B
shape (16 heads / 8 KV heads, d 128), the baseline's attention. Reports the number of 128x128
blocks each mask visits. Writes <out>/tele_attention.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avengers.models.telescoping import FMAP_PRESETS, TeleOptions, get_plan  # noqa: E402
from avengers.models.telescoping.flex import flex_attention_nodes  # noqa: E402


def timed(fn, grad: bool, iters: int, device: torch.device, inputs: list[torch.Tensor]) -> float:
    """Median ms of fn(*inputs) (and its backward with grad)."""

    def once():
        out = fn(*inputs)
        if grad:
            out.backward(torch.ones_like(out))

    for _ in range(3):
        once()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            once()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            once()
            times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    grad = device.type == "cuda"  # no flex backward on CPU
    B, n, H, Hkv, d, C, fmap = (4, 4096, 32, 2, 64, 128, "c128") if not args.smoke else (1, 300, 4, 2, 16, 8, "c8")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device="cpu").manual_seed(0)
    rows: dict[str, dict] = {}

    def record(name: str, fn, inputs, blocks=None):
        try:
            t0 = time.perf_counter()
            fwd = timed(fn, False, args.iters, device, inputs)
            both = timed(fn, True, args.iters, device, inputs) if grad else None
            rows[name] = {
                "fwd_ms": round(fwd, 3),
                "fwd_bwd_ms": both and round(both, 3),
                "blocks_per_qblock": blocks,
                "setup_s": round(time.perf_counter() - t0, 1),
            }
        except Exception as e:  # report and go on with the other layouts
            rows[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(f"{name}: {rows[name]}", flush=True)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype).requires_grad_(grad)

    opts = TeleOptions(C, FMAP_PRESETS[fmap])
    for block_q in (None, 128, 256):
        for mask_empty in (False, True):
            o = TeleOptions(C, FMAP_PRESETS[fmap], mask_empty=mask_empty)
            plan = get_plan(n, C, opts.fmap, device, flex=True, flex_block_q=block_q)
            q, k, v = rand(B, n, H, d), rand(B, Hkv, plan.num_nodes, d), rand(B, Hkv, plan.num_nodes, d)
            fn = lambda q, k, v, plan=plan, o=o: flex_attention_nodes(q, k, v, plan, o)
            if device.type == "cuda":
                fn = torch.compile(fn, fullgraph=True)
            kv_blocks = plan.block_mask.kv_num_blocks.float().mean().item()
            full = plan.block_mask.full_kv_num_blocks
            blocks = {
                "partial": round(kv_blocks, 2),
                "full": round(full.float().mean().item(), 2) if full is not None else 0,
                "columns": len(plan.layout.birth),
            }
            record(f"tele_block_q{block_q}_mask_empty{mask_empty}", fn, [q, k, v], blocks)

    causal = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, n, n, device=str(device))
    q, k, v = rand(B, H, n, d), rand(B, Hkv, n, d), rand(B, Hkv, n, d)
    fl = lambda q, k, v: flex_attention(q, k, v, block_mask=causal, enable_gqa=True)
    record(
        "flex_causal_tele_shape",
        torch.compile(fl, fullgraph=True) if device.type == "cuda" else fl,
        [q, k, v],
        {
            "partial": round(causal.kv_num_blocks.float().mean().item(), 2),
            "full": round(causal.full_kv_num_blocks.float().mean().item(), 2),
        },
    )
    Hl, Hkvl, dl = (16, 8, 128) if not args.smoke else (4, 2, 16)
    q, k, v = rand(B, Hl, n, dl), rand(B, Hkvl, n, dl), rand(B, Hkvl, n, dl)
    record(
        "sdpa_causal_llama_shape",
        lambda q, k, v: F.scaled_dot_product_attention(
            q, k.repeat_interleave(Hl // Hkvl, 1), v.repeat_interleave(Hl // Hkvl, 1), is_causal=True
        ),
        [q, k, v],
    )
    info = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "shape": dict(B=B, n=n, H=H, Hkv=Hkv, d=d, C=C),
        "dtype": str(dtype),
    }
    (out_dir / "tele_attention.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    print(json.dumps(info))


if __name__ == "__main__":
    main()
