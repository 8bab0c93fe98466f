"""How fast can one GPU stream N bytes? The floor under every batch-1 decode GEMV (issue 6).

    python benchmarks/gpu_stream_read.py --out DIR [--variant llama3_1.8b]

1. For each weight matrix of one block of the variant and its LM head: a pure read kernel (each
   program sums its tiles of a bf16 buffer; Triton-pipelined through shared memory) over a sweep
   of programs per SM, tile size, pipeline depth and warps, 50 kernels back to back in one CUDA
   graph over buffers that together exceed the L2. Printed: the best configuration per size,
   microseconds, TB/s and the time at the 4.8 TB/s roofline, without and with PDL (with PDL a
   kernel lets the next one start at once: consecutive reads overlap).
2. A decode step's weight reads alone: every block's four matrices and the LM head, each read by
   its best kernel, in the step's order (distinct buffers, as the step reads distinct weights),
   without and with PDL, against the step's roofline. No GEMV maths, no attention: what is left
   of the batch-1 step's gap to its roofline once the arithmetic is free.
3. `--modes gemv,mma`: part 1's sweep again for the matrices whose rows are a power of two, each
   tile now TILE / K weight rows multiplied by a vector, reduced per tile either across threads
   (tl.sum, as the decode GEMVs do) or in the tensor cores (tl.dot, the vector padded to 16
   rows): what the GEMV maths costs a read loop of each shape (1 program per SM: the persistent
   block kernel's phases; one tile per program: the per-kernel GEMVs).
Writes results.json under --out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avengers.decode.kernels.triton_decode import sm_count  # noqa: E402
from avengers.hardware import spec_for_name  # noqa: E402
from avengers.models.registry import get_model_spec  # noqa: E402

H200_BANDWIDTH_GBS = spec_for_name("H200").bandwidth / 1e9  # these experiments ran on an H200


@triton.jit
def _read_kernel(
    X,
    V,
    Out,
    n_tiles,
    TILE: tl.constexpr,
    STAGES: tl.constexpr,
    GDC: tl.constexpr,
    MODE: tl.constexpr,
    K: tl.constexpr,
    KC: tl.constexpr = 256,
):
    """MODE "read": sum every element (one reduction at the end). "gemv": each tile is TILE / K
    rows of K, each row's dot product with the vector V stored (a reduction per tile, as the
    decode GEMVs do). "mma": the same products by tl.dot over K chunks of KC, V padded to 16 rows
    (the reduction in the tensor cores; chunks keep the padded vector out of the registers)."""
    pid = tl.program_id(0).to(tl.int64)  # 64-bit offsets: a layer's K and V at a large batch pass 2^31 elements
    if GDC:  # the reads depend on nothing: let the next kernel start now
        tl.extra.cuda.gdc_launch_dependents()
    BN: tl.constexpr = TILE // K
    ks = tl.arange(0, K)
    acc = tl.zeros([TILE], tl.float32)
    v = tl.load(V + ks).to(tl.float32)  # once, as the GEMVs read their input row once
    for t in tl.range(pid, n_tiles, tl.num_programs(0), num_stages=STAGES):
        rows = t * BN + tl.arange(0, BN)
        if MODE == "read":
            acc += tl.load(X + t * TILE + tl.arange(0, TILE), eviction_policy="evict_first").to(tl.float32)
        elif MODE == "gemv":
            w = tl.load(X + rows[:, None] * K + ks[None, :], eviction_policy="evict_first")
            tl.store(Out + rows, tl.sum(w.to(tl.float32) * v[None, :], 1))
        else:
            y = tl.zeros([16, BN], tl.float32)
            for k0 in tl.static_range(0, K, KC):
                kc = k0 + tl.arange(0, KC)
                w = tl.load(X + rows[:, None] * K + kc[None, :], eviction_policy="evict_first")
                v16 = tl.where(tl.arange(0, 16)[:, None] == 0, tl.load(V + kc)[None, :], 0.0).to(w.dtype)
                y = tl.dot(v16, tl.trans(w), y)
            tl.store(Out + rows, tl.sum(y, 0))  # rows 1..15 of the padded vector are zero
    if MODE == "read":
        tl.store(Out + pid, tl.sum(acc))


def _launcher(
    numel: int,
    per_sm: int | None,
    tile: int,
    stages: int,
    warps: int,
    pdl: bool,
    sms: int,
    mode: str = "read",
    k: int = 16,
):
    """A function reading a buffer of `numel` bf16 (per_sm None: one program per tile) in `mode`
    (rows of k elements for "gemv" and "mma")."""
    n_tiles = numel // tile
    grid = n_tiles if per_sm is None else min(n_tiles, per_sm * sms)
    out = torch.empty(grid if mode == "read" else numel // k, device="cuda", dtype=torch.float32)  # per program / row
    v = torch.randn(k, device="cuda").to(torch.bfloat16)
    kw = {"launch_pdl": True} if pdl else {}
    return lambda buf: _read_kernel[(grid,)](
        buf, v, out, n_tiles, TILE=tile, STAGES=stages, GDC=pdl, MODE=mode, K=k, KC=min(256, k), num_warps=warps, **kw
    )


def _graph_us(calls: list, reps: int = 5) -> float:
    """Mean microseconds per call of the list, replayed in one CUDA graph."""
    for c in calls[:2]:
        c()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / reps / len(calls)


def _buffers(numel: int, min_total: int = 256 << 20) -> list[torch.Tensor]:
    count = max(2, -(-min_total // (2 * numel)))  # together well past the L2
    return [torch.randn(numel, device="cuda").to(torch.bfloat16) for _ in range(count)]


def sweep(name: str, numel: int, sms: int, mode: str = "read", k: int = 16) -> dict:
    """The best configuration for reading `numel` bf16 in `mode`, and its time with PDL."""
    bufs = _buffers(numel)
    roof_us = 2 * numel / (H200_BANDWIDTH_GBS * 1e3)
    rows = []
    tiles = (32768,) if mode == "mma" else (4096, 8192, 16384)  # mma: 16 rows of 2048 at least
    for per_sm, tile, stages, warps in itertools.product((1, 2, 4, 8, None), tiles, (2, 3, 4), (4, 8)):
        if numel % tile or tile % k or (per_sm is None and stages != 2):  # one tile per program: no pipeline
            continue
        if tile * 2 * (stages - 1) > 160 * 1024:  # the shared-memory ring must fit
            continue
        read = _launcher(numel, per_sm, tile, stages, warps, False, sms, mode, k)
        us = _graph_us([lambda b=b: read(b) for b in itertools.islice(itertools.cycle(bufs), 50)])
        rows.append({"per_sm": per_sm or "all", "tile": tile, "stages": stages, "warps": warps, "us": round(us, 2)})
    best = min(rows, key=lambda r: r["us"])
    cfg = (None if best["per_sm"] == "all" else best["per_sm"], best["tile"], best["stages"], best["warps"])
    read_pdl = _launcher(numel, *cfg, True, sms, mode, k)
    pdl_us = _graph_us([lambda b=b: read_pdl(b) for b in itertools.islice(itertools.cycle(bufs), 50)])
    res = {
        "matrix": name,
        "mode": mode,
        "MB": round(2 * numel / 1e6, 1),
        "roofline_us": round(roof_us, 2),
        "best": best,
        "best_TBs": round(2 * numel / best["us"] / 1e6, 2),
        "best_pdl_us": round(pdl_us, 2),
        "best_pdl_TBs": round(2 * numel / pdl_us / 1e6, 2),
        "config": cfg,
        "all": rows,
    }
    print(json.dumps({k: v for k, v in res.items() if k != "all"}), flush=True)
    del bufs
    return res


def step_reads(shapes: dict, best: dict, layers: int, sms: int) -> dict:
    """Every weight of a decode step read once, in order, each by its size's best kernel."""
    out = {}
    for pdl in (False, True):
        calls = []
        for layer in range(layers + 1):
            for name, numel in shapes.items():
                if (name == "lm_head") != (layer == layers):
                    continue
                buf = torch.empty(numel, device="cuda", dtype=torch.bfloat16).normal_()
                read = _launcher(numel, *best[name], pdl, sms)
                calls.append(lambda b=buf, r=read: r(b))
        us = _graph_us(calls) * len(calls)
        out["pdl" if pdl else "plain"] = round(us / 1e3, 4)
    total_bytes = 2 * sum(n * (1 if k == "lm_head" else layers) for k, n in shapes.items())
    out["weights_roofline_ms"] = round(total_bytes / (H200_BANDWIDTH_GBS * 1e6), 4)
    print(json.dumps({"step_weight_reads_ms": out}), flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="stream_read")
    p.add_argument("--variant", default="llama3_1.8b")
    p.add_argument("--modes", default="gemv,mma", help="GEMV variants to sweep after the plain reads ('' for none)")
    a = p.parse_args()
    model = get_model_spec(a.variant).build(torch.device("meta"))  # shapes only
    layer = model.base_model.layers[0]
    weights = {
        "qkv": layer.attn.in_proj.qkv_fused.weight,
        "wo": layer.attn.dense.weight,
        "gate/up": layer.ff_sub_layer.wg1_fused.weight,
        "w2": layer.ff_sub_layer.w2.weight,
        "lm_head": model.head.weight,
    }
    shapes = {name: w.numel() for name, w in weights.items()}
    layers = len(model.base_model.layers)
    sms = sm_count(torch.device("cuda"))
    print(
        f"{torch.cuda.get_device_name()}, {sms} SMs, torch {torch.__version__}, triton {triton.__version__}", flush=True
    )
    results = {"device": torch.cuda.get_device_name(), "sizes": [sweep(n, k, sms) for n, k in shapes.items()]}
    best = {r["matrix"]: r["config"] for r in results["sizes"]}
    results["step"] = step_reads(shapes, best, layers, sms)
    for mode in filter(None, a.modes.split(",")):  # the GEMV maths on top of the reads, where rows are a power of two
        results[mode] = [
            sweep(n, w.numel(), sms, mode, w.shape[1]) for n, w in weights.items() if w.shape[1] & (w.shape[1] - 1) == 0
        ]
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
