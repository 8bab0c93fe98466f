"""Time the causal conv's backward: the product's one kernel against the two-pass candidate.

    python experiments/gpu_causal_conv.py --out $OUT/conv          # GPU, mamba2_1.3b's conv shape
    TRITON_INTERPRET=1 python experiments/gpu_causal_conv.py --smoke  # CPU: the wiring only
    PYTHONPATH=.triton-site python experiments/gpu_causal_conv.py --sm90  # CPU: registers and spills

The input is what the Mamba-2 mixer hands the conv: the x|B|C columns of the in_proj output
(d_inner 4096, d_state 128, 64 heads: [z 4096 | xBC 4352 | dt 64]), bf16, SiLU and bias on. For
each batch: forward + backward time of both (triton.testing.do_bench, median), the backward alone
(forward time subtracted), and the largest gradient difference between them. Writes
<out>/causal_conv_ab.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avengers.models.mamba.causal_conv_triton import triton_causal_conv  # noqa: E402
from experiments.causal_conv_twopass import twopass_causal_conv  # noqa: E402


def inputs(batch: int, seq: int, channels: int, z: int, dt: int, device: str):
    g = torch.Generator(device=device).manual_seed(0)
    proj = torch.randn(batch, seq, z + channels + dt, device=device, generator=g, dtype=torch.bfloat16)
    x = proj[..., z : z + channels].transpose(1, 2)  # [b, channels, l], channel-last underneath
    weight = 0.5 * torch.randn(channels, 1, 4, device=device, generator=g, dtype=torch.bfloat16)
    bias = 0.5 * torch.randn(channels, device=device, generator=g, dtype=torch.bfloat16)
    grad = torch.randn(batch, seq, channels, device=device, generator=g, dtype=torch.bfloat16).transpose(1, 2)
    return x, weight, bias, grad


def run(fn, x, weight, bias, grad, backward: bool):
    ins = [t.detach().requires_grad_(backward) for t in (x, weight, bias)]
    out = fn(*ins, True)
    if backward:
        out.backward(grad)
        return [t.grad for t in ins]
    return [out]


def bench(fn, *args) -> float:
    if not torch.cuda.is_available():
        t0 = time.perf_counter()
        fn(*args)
        return (time.perf_counter() - t0) * 1e3
    from triton.testing import do_bench

    return do_bench(lambda: fn(*args), warmup=25, rep=200)


def sm90_usage() -> None:
    """Compile the product's backward and the candidate's two kernels for sm_90 (no GPU needed) and
    print registers and stack (spill) bytes a thread, as tests/decode/sm90_compile_cases.py does."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "decode"))
    from sm90_compile_cases import compile_case, resource_usage

    from avengers.models.mamba import causal_conv_triton as product
    from experiments import causal_conv_twopass as twopass

    bf, f32 = "*bf16", "*fp32"
    conv = dict(WIDTH=4, HAS_BIAS=True, BT=product.BLOCK_T, BC=product.BLOCK_C)
    kernels = (
        ("product backward", product._bwd_kernel, {"G": bf, "DX": bf, "DWp": f32, "DBp": f32}, {"SILU": True}),
        ("two-pass grad_pre", twopass._grad_pre_kernel, {"G": bf, "GP": f32}, {}),
        ("two-pass dx/dw", twopass._bwd_from_grad_pre_kernel, {"GP": f32, "DX": bf, "DWp": f32, "DBp": f32}, {}),
    )
    for name, kernel, pointers, extra in kernels:
        inputs = {"X": bf, "Wt": bf} | ({"Bias": bf} if "Bias" in kernel.arg_names else {})
        compiled = compile_case(kernel, inputs | pointers, conv | extra)
        print(json.dumps({"kernel": name, **resource_usage(compiled)}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    p.add_argument("--batches", default="2,4")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU under TRITON_INTERPRET=1)")
    p.add_argument("--sm90", action="store_true", help="compile for sm_90 and print registers and spills, then exit")
    args = p.parse_args()
    if args.sm90:
        return sm90_usage()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    seq, channels, z, dt = (64, 40, 16, 4) if args.smoke else (4096, 4352, 4096, 64)
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "rows": []}
    for batch in (int(b) for b in args.batches.split(",")):
        x, weight, bias, grad = inputs(batch, seq, channels, z, dt, device)
        row = {"batch": batch, "seq": seq, "channels": channels}
        grads = {}
        for name, fn in (("product", triton_causal_conv), ("twopass", twopass_causal_conv)):
            fwd = bench(run, fn, x, weight, bias, grad, False)
            both = bench(run, fn, x, weight, bias, grad, True)
            row[name] = {"forward_ms": round(fwd, 4), "fwd_bwd_ms": round(both, 4), "bwd_ms": round(both - fwd, 4)}
            grads[name] = run(fn, x, weight, bias, grad, True)
        row["max_grad_diff"] = [
            float((a.float() - b.float()).abs().max() / b.float().abs().max())
            for a, b in zip(grads["twopass"], grads["product"])
        ]
        row["bwd_speedup"] = round(row["product"]["bwd_ms"] / max(row["twopass"]["bwd_ms"], 1e-9), 3)
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "causal_conv_ab.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
