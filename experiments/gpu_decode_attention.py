"""How close the batch-1 split-K decode attention gets to the cache read floor (issue 6, 32k target).

    python benchmarks/gpu_decode_attention.py --out DIR [--variant llama3_1.8b] [--contexts 1k,32k,128k] [--batch 1]

For each context: every layer's K/V cache of the variant at `--batch` attended once per layer, the
layers' calls back to back in one CUDA graph (as in the decode step), timed for
1. the default path (`decode_attention_triton`: splits from triton_decode.num_splits, pass 1
   autotuned), split pass and merge;
2. a sweep of the split pass over number of splits, key tile, warps and pipeline stages, with
   the merge of that many splits;
3. the read floor: a read-only kernel (gpu_stream_read.py's sweep) over the same bytes.
Printed and written to results.json: microseconds per layer and TB/s of cache read.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avengers.decode.kernels import triton_decode as td  # noqa: E402
from avengers.inference.bench import parse_size  # noqa: E402
from avengers.models.registry import get_model_spec  # noqa: E402
from experiments.gpu_stream_read import _graph_us, sweep  # noqa: E402


def attention_call(q, k, v, length, nsplit: int, block: int, warps: int, stages: int):
    """One layer's split pass + merge with a fixed configuration (the autotuner bypassed)."""
    B, H, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    split = -(-S // nsplit)
    split = -(-split // max(block, td.BLOCK_N)) * max(block, td.BLOCK_N)
    nsplit = -(-S // split)
    acc = torch.empty(B * Hkv * nsplit * G, D, device=q.device, dtype=torch.float32)
    m, l_sum = (torch.empty(B * Hkv * nsplit * G, device=q.device) for _ in range(2))
    out = torch.empty_like(q)
    interpret = os.environ.get("TRITON_INTERPRET") == "1"  # tests: the interpreter loops only to constants

    def partial():
        td._partial_kernel.fn[(B * Hkv, nsplit)](
            q,
            k,
            v,
            length,
            acc,
            m,
            l_sum,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            k.stride(2),
            v.stride(0),
            v.stride(1),
            v.stride(2),
            Hkv,
            G,
            split,
            nsplit,
            D**-0.5,
            D=D,
            BLOCK_G=max(16, triton.next_power_of_2(G)),
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            DYNAMIC_BOUND=not interpret,
            STATIC_SPAN=split if interpret else 0,
            GDC=False,
            BLOCK=block,
            num_warps=warps,
            num_stages=stages,
        )

    def merge():
        td._merge_kernel[(B * H,)](
            acc,
            m,
            l_sum,
            out,
            out.stride(0),
            out.stride(1),
            Hkv,
            G,
            nsplit,
            D=D,
            BLOCK_S=triton.next_power_of_2(nsplit),
            GDC=False,
            num_warps=4,
        )

    return {"partial": partial, "merge": merge, "out": out, "nsplit": nsplit, "split": split}


def context_part(cfg, context: int, batch: int, layers: int, sms: int, args) -> dict:
    head_dim = cfg.emb_dim // cfg.nheads
    kvh = cfg.kvheads or cfg.nheads
    S = context + 64  # the bench's buffer: context plus decode steps
    kv = [
        (
            torch.randn(batch, kvh, S, head_dim, device="cuda", dtype=torch.bfloat16),
            torch.randn(batch, kvh, S, head_dim, device="cuda", dtype=torch.bfloat16),
        )
        for _ in range(layers)
    ]
    q = torch.randn(batch, cfg.nheads, head_dim, device="cuda", dtype=torch.bfloat16)
    length = torch.tensor(context, device="cuda")
    cache_bytes = 2 * 2 * batch * kvh * context * head_dim  # K and V read per layer
    ref = td.decode_attention_triton(q, *kv[0], length).float()

    def tbs(us: float) -> float:
        return round(cache_bytes / us / 1e6, 3)

    default_us = _graph_us([lambda k=k, v=v: td.decode_attention_triton(q, k, v, length) for k, v in kv])
    split, nsplit = td.num_splits(batch, kvh, S, q.device)
    res = {
        "context": context,
        "batch": batch,
        "layers": layers,
        "cache_MB_per_layer": round(cache_bytes / 1e6, 2),
        "roofline_us": round(cache_bytes / 4.8e6, 2),
        "default": {"nsplit": nsplit, "split": split, "us": round(default_us, 2), "TBs": tbs(default_us)},
    }
    print(json.dumps(res), flush=True)
    rows = []
    for n, block, warps, stages in itertools.product(args.splits, args.blocks, args.warps, args.stages):
        if block * head_dim * 2 * 2 * (stages - 1) > 228 * 1024:  # the K and V ring must fit in shared memory
            continue
        calls = [attention_call(q, k, v, length, n, block, warps, stages) for k, v in kv]
        try:
            calls[0]["partial"]()
            calls[0]["merge"]()
        except Exception as e:  # out of resources: skip the configuration
            print(f"skip splits={n} block={block} warps={warps} stages={stages}: {type(e).__name__}", flush=True)
            continue
        torch.cuda.synchronize()
        part_us = _graph_us([c["partial"] for c in calls])
        both_us = _graph_us([f for c in calls for f in (c["partial"], c["merge"])]) * 2
        row = {
            "nsplit": calls[0]["nsplit"],
            "split": calls[0]["split"],
            "block": block,
            "warps": warps,
            "stages": stages,
            "partial_us": round(part_us, 2),
            "partial_TBs": tbs(part_us),
            "us": round(both_us, 2),
            "TBs": tbs(both_us),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    res["sweep"] = rows
    best = min(rows, key=lambda r: r["us"])
    check = attention_call(q, *kv[0], length, best["nsplit"], best["block"], best["warps"], best["stages"])
    check["partial"]()
    check["merge"]()
    res["best"] = best
    res["best_vs_default_max_abs_diff"] = float((check["out"].float() - ref).abs().max())
    res["read_floor"] = {k: v for k, v in sweep(f"kv@{context}", cache_bytes // 2, sms).items() if k != "all"}
    summary = {
        "context": context,
        "best": best,
        "default_us": res["default"]["us"],
        "floor_us": res["read_floor"]["best"]["us"],
        "diff": res["best_vs_default_max_abs_diff"],
    }
    print(json.dumps(summary), flush=True)
    del kv
    torch.cuda.empty_cache()
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="decode_attention")
    p.add_argument("--variant", default="llama3_1.8b")
    p.add_argument("--contexts", default="1k,32k,128k")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--splits", default="16,32,64,128,256")
    p.add_argument("--blocks", default="32,64,128,256")
    p.add_argument("--warps", default="4,8")
    p.add_argument("--stages", default="2,3,4")
    a = p.parse_args()
    for name in ("splits", "blocks", "warps", "stages"):
        setattr(a, name, [int(x) for x in getattr(a, name).split(",")])
    cfg = get_model_spec(a.variant).config
    sms = td.sm_count(torch.device("cuda"))
    print(
        f"{torch.cuda.get_device_name()}, {sms} SMs, torch {torch.__version__}, triton {triton.__version__}", flush=True
    )
    results = {"device": torch.cuda.get_device_name(), "variant": a.variant, "contexts": []}
    Path(a.out).mkdir(parents=True, exist_ok=True)
    for ctx in (parse_size(c) for c in a.contexts.split(",")):
        layer_bytes = a.batch * 2 * (cfg.kvheads or cfg.nheads) * (ctx + 64) * (cfg.emb_dim // cfg.nheads) * 2
        # past 32k or at a large batch a few layers already far exceed the L2: at most 16 GiB of caches
        layers = max(2, min(cfg.nlayers, (16 << 30) // layer_bytes))
        results["contexts"].append(context_part(cfg, ctx, a.batch, layers, sms, a))
        (Path(a.out) / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
