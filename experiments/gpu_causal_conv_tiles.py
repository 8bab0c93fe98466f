"""Tiles for the Triton causal conv's forward and backward kernels at a Mamba layer's shape.

    python experiments/gpu_causal_conv_tiles.py --out DIR [--batch 2,4]

Times each candidate (`triton.testing.do_bench` median) on the layer's conv input (a column slice
of in_proj's output, bf16, SiLU and bias), checks its outputs against the fp32 reference, and
prints ms and the bandwidth over the bytes each form must move. Writes DIR/conv_tiles.json with
every row and the fastest forward and backward (`best`), which the product's FWD_TILES and
BWD_TILES are set from. The two-pass backward it was measured against on 2026-12-07 (0.85 ms at
batch 4): `git show 9e96b73:avengers/models/mamba/causal_conv_triton.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import torch

from avengers.hardware import device_spec, measure_copy_bandwidth
from avengers.models.mamba import causal_conv_triton as cc
from avengers.models.mamba.conv import ref_causal_conv

FWD = [(32, 128, 1, 4), (8, 256, 1, 4), (4, 256, 1, 4), (16, 256, 1, 8)]
BWD = [
    (4, 128, 16, 4),
    (4, 128, 32, 4),
    (4, 128, 64, 4),
    (8, 64, 16, 4),
    (4, 64, 16, 2),
    (8, 128, 16, 8),
    (2, 256, 32, 4),
    (8, 128, 8, 4),
    (4, 256, 16, 4),
]


def layer_inputs(batch, L=4096, d_inner=4096, bc=256, nheads=64, device="cuda", dtype=torch.bfloat16):
    """mamba2_1.3b's conv input: columns [d_inner, d_inner + C) of a [b, L, d_in_proj] projection."""
    g = torch.Generator(device=device).manual_seed(0)
    C = d_inner + bc
    wide = torch.randn(batch, L, 2 * d_inner + bc + nheads, device=device, generator=g).to(dtype)
    x = wide[..., d_inner : d_inner + C]
    w = (0.5 * torch.randn(C, 1, 4, device=device, generator=g)).to(dtype)
    b = torch.randn(C, device=device, generator=g).to(dtype)
    grad = torch.randn(batch, L, C, device=device, generator=g).to(dtype)
    return x, w, b, grad


def run_form(form: str, tiles, x, w, b, grad):
    """A zero-argument call of the forward or the backward with these tiles."""
    if form == "forward":
        return lambda: cc.conv_forward(x, w, b, True, tiles)
    return lambda: cc.conv_backward(grad, x, w, b, True, tiles)


def reference(x, w, b, grad):
    ins = [t.detach().float().requires_grad_() for t in (x, w, b)]
    out = ref_causal_conv(ins[0].transpose(1, 2), ins[1], ins[2], True).transpose(1, 2)
    out.backward(grad.float())
    return out.detach(), [t.grad for t in ins]


def rel_err(a, r) -> float:
    return float((a.float() - r.float()).abs().max() / r.float().abs().max())


def errors(form: str, got, ref_out, ref_grads) -> float:
    """The largest relative error of a form's outputs against the fp32 reference."""
    return rel_err(got, ref_out) if form == "forward" else max(rel_err(a, r) for a, r in zip(got, ref_grads))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch", default="2,4")
    args = ap.parse_args()
    from triton.testing import do_bench

    os.makedirs(args.out, exist_ok=True)
    rows, best = [], {}
    bw = device_spec("cuda").bandwidth or measure_copy_bandwidth(torch.device("cuda"))
    for batch in (int(v) for v in args.batch.split(",")):
        x, w, b, grad = layer_inputs(batch)
        ref_out, ref_grads = reference(x, w, b, grad)
        unit = x.numel() * 2  # one bf16 tensor of the input's shape
        floors = {"forward": 2 * unit, "backward": 3 * unit}  # bytes moved at least: x + out; x + g + dx
        for form, cands in (("forward", FWD), ("backward", BWD)):
            for bt, bcols, nt, warps in cands:
                tiles = cc.Tiles(bt, bcols, nt, warps)
                fn = run_form(form, tiles, x, w, b, grad)
                err = errors(form, fn(), ref_out, ref_grads)
                ms = do_bench(fn, warmup=25, rep=100)
                row = dict(batch=batch, form=form, tiles=dataclasses.asdict(tiles), ms=ms, err=err)
                row["gbs_over_floor"] = floors[form] / ms / 1e6
                row["x_floor"] = ms / (floors[form] / bw * 1e3)
                rows.append(row)
                print(
                    f"batch {batch} {form:8s} bt={bt:2d} bc={bcols:3d} nt={nt:2d} warps={warps}: {ms:.4f} ms "
                    f"({row['gbs_over_floor']:.0f} GB/s over its floor, {row['x_floor']:.2f}x) err {err:.2e}",
                    flush=True,
                )
        ok = [r for r in rows if r["batch"] == batch and r["err"] < 2e-2]
        fwd = min((r for r in ok if r["form"] == "forward"), key=lambda r: r["ms"])
        bwd = min((r for r in ok if r["form"] == "backward"), key=lambda r: r["ms"])
        best[batch] = dict(forward=fwd, backward=bwd)
        print(
            f"batch {batch} best: forward {fwd['tiles']} {fwd['ms']:.4f} ms; backward {bwd['tiles']} {bwd['ms']:.4f} ms"
        )
    json.dump(
        dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows, best=best),
        open(os.path.join(args.out, "conv_tiles.json"), "w"),
        indent=1,
    )


if __name__ == "__main__":
    main()
