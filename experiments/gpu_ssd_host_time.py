"""Host time against GPU time of mamba_ssm's SSD scan (forward + backward) at a Mamba-2 layer's shape.

    python experiments/gpu_ssd_host_time.py --out DIR [--batch 4] [--chunks 256,128] [--layers 48]

For each chunk size, one forward + backward of `mamba_chunk_scan_combined` (bf16, mamba2_1.3b's
heads, head dim, state and groups) measured three ways:
- host: the time to issue it while the GPU is kept busy (`torch.cuda._sleep` queued first), so the
  host never waits: what the Python wrappers, Triton's launcher and autograd cost;
- GPU: the summed kernel time of the call under torch.profiler;
- wall: `triton.testing.do_bench`'s median, which is the larger of the two when they do not overlap.
A host time near the queued sleep (tens of ms) would mean the call synchronises with the GPU. A step
whose host issues the layers slower than the GPU runs them is host-bound (docs/mamba.md, "Training
speed"). Also checks that chunk sizes agree (the SSD does not depend on
them up to rounding). Writes DIR/ssd_host_time.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from statistics import median

import torch


def inputs(batch: int, L=4096, H=64, P=64, G=1, N=128, device="cuda"):
    g = torch.Generator(device=device).manual_seed(0)
    bf = dict(device=device, dtype=torch.bfloat16)

    def leaf(*shape, scale=1.0, **kw):
        return (torch.randn(*shape, generator=g, **(kw or bf)) * scale).requires_grad_()

    return dict(
        x=leaf(batch, L, H, P),
        dt=leaf(batch, L, H, scale=0.5),
        A=(-torch.rand(H, device=device, generator=g) - 0.5).requires_grad_(),
        B=leaf(batch, L, G, N),
        C=leaf(batch, L, G, N),
        D=leaf(H, **bf),
        dt_bias=leaf(H, scale=0.5, **bf),
        dy=torch.randn(batch, L, H, P, generator=g, **bf),
    )


def measure(chunk: int, t: dict, reps: int = 20) -> dict:
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    from torch.profiler import ProfilerActivity, profile
    from triton.testing import do_bench

    leaves = [t[k] for k in ("x", "dt", "A", "B", "C", "D", "dt_bias")]

    def call():
        y = mamba_chunk_scan_combined(*leaves[:5], chunk, D=t["D"], dt_bias=t["dt_bias"], dt_softplus=True)
        y.backward(t["dy"])
        for p in leaves:
            p.grad = None

    for _ in range(3):  # autotuning, then warm
        call()
    torch.cuda.synchronize()
    host = []
    for _ in range(reps):
        torch.cuda._sleep(50_000_000)  # tens of ms of queued GPU work: the host never waits below
        t0 = time.perf_counter()
        call()
        host.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            call()
        torch.cuda.synchronize()
    gpu = sum(e.self_device_time_total for e in prof.key_averages()) / 5 / 1e3
    wall = do_bench(call, warmup=10, rep=100)
    y = mamba_chunk_scan_combined(*leaves[:5], chunk, D=t["D"], dt_bias=t["dt_bias"], dt_softplus=True)
    return dict(host_ms=median(host), gpu_ms=gpu, wall_ms=wall, y=y.detach().float())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--chunks", default="256,128")
    ap.add_argument("--layers", type=int, default=48, help="to print the per-step totals")
    a = ap.parse_args()
    t = inputs(a.batch)
    rows, ys = {}, {}
    for chunk in (int(c) for c in a.chunks.split(",")):
        r = measure(chunk, t)
        ys[chunk] = r.pop("y")
        rows[chunk] = r
        print(
            f"chunk {chunk}: host {r['host_ms']:.3f} ms, GPU {r['gpu_ms']:.3f} ms, wall {r['wall_ms']:.3f} ms "
            f"a layer; x {a.layers} layers: host {r['host_ms'] * a.layers:.0f} ms, GPU {r['gpu_ms'] * a.layers:.0f} ms",
            flush=True,
        )
    first = next(iter(ys.values()))
    diffs = {c: ((y - first).abs().max() / first.abs().max()).item() for c, y in ys.items()}
    print("max |y(chunk) - y(first)| / max |y|:", diffs)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "ssd_host_time.json"), "w") as f:
        json.dump(
            dict(gpu=torch.cuda.get_device_name(), batch=a.batch, rows=rows, rel_diff_to_first=diffs), f, indent=1
        )


if __name__ == "__main__":
    main()
