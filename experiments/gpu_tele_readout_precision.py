"""The telescoping read-out kernel's dot precision and tile loads, timed alone at tele128_llama3_1.8b's
shape (one layer: 2 KV heads, 16 query heads each, 128 slots of 64 channels, kv_norm on, bf16 slots).

Variants of decode/kernels/triton_tele_readout._readout_kernel: the values' tile loaded with the keys'
(V_EARLY) and the two dots in tf32 instead of tf32x3, at 4 and 8 warps; each against the product kernel
(time, and max abs difference of the bf16 outputs). `python experiments/gpu_tele_readout_precision.py
--batch 4096 --out DIR` prints a table and writes DIR/tele_readout_precision.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton
import triton.language as tl

from avengers.decode.kernels import triton_tele_readout
from avengers.ops.telescoping import NORM_EPS

_NORM_EPS = tl.constexpr(NORM_EPS)
HKV, G, C, HD = 2, 16, 128, 64


@triton.jit
def _variant_kernel(Q, K, V, KGain, VGain, Out, HD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr,
                    G: tl.constexpr, PREC: tl.constexpr, V_EARLY: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)  # (sequence, KV head); every slot full, no softcap or mask
    offs_c, offs_d, offs_g = tl.arange(0, BLOCK_C), tl.arange(0, HD), tl.arange(0, BLOCK_G)
    slots = (pid * BLOCK_C + offs_c)[:, None] * HD + offs_d[None, :]
    q_rows = pid * G + offs_g
    mg = offs_g < G
    k = tl.load(K + slots).to(tl.float32)
    if V_EARLY:
        v = tl.load(V + slots).to(tl.float32)
    q = tl.load(Q + q_rows[:, None] * HD + offs_d[None, :], mask=mg[:, None], other=0.0).to(tl.float32)
    k = k * tl.rsqrt(tl.sum(k * k, axis=1) / HD + _NORM_EPS)[:, None] * tl.load(KGain + offs_d).to(tl.float32)[None, :]
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * (HD**-0.5)
    p = tl.exp(s - tl.max(s, axis=1)[:, None])
    p = p / tl.sum(p, axis=1)[:, None]
    if not V_EARLY:
        v = tl.load(V + slots).to(tl.float32)
    v = v * tl.rsqrt(tl.sum(v * v, axis=1) / HD + _NORM_EPS)[:, None] * tl.load(VGain + offs_d).to(tl.float32)[None, :]
    out = tl.dot(p, v, input_precision=PREC)
    tl.store(Out + q_rows[:, None] * HD + offs_d[None, :], out.to(Out.dtype.element_ty), mask=mg[:, None])


class _Opts:  # the read-out options of tele128_llama3_1.8b
    kv_norm, softcap, mask_empty = True, None, False


def inputs(batch: int, device, dtype=torch.bfloat16):
    gen = torch.Generator(device=device).manual_seed(0)
    K = torch.randn(batch, HKV, C, HD, device=device, generator=gen).to(dtype)
    V = torch.randn(batch, HKV, C, HD, device=device, generator=gen).to(dtype)
    W = torch.zeros(batch, HKV, C, device=device)
    q = torch.randn(batch, HKV * G, HD, device=device, generator=gen).to(dtype)
    gains = (torch.rand(HD, device=device, generator=gen) + 0.5, torch.rand(HD, device=device, generator=gen) + 0.5)
    return q, K, V, W, gains


def variant(q, K, V, gains, prec: str, v_early: bool, warps: int) -> torch.Tensor:
    out = torch.empty_like(q)
    _variant_kernel[(K.shape[0] * HKV,)](
        q, K, V, *gains, out, HD=HD, BLOCK_C=C, BLOCK_G=G, G=G, PREC=prec, V_EARLY=v_early, num_warps=warps
    )
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    from triton.testing import do_bench

    q, K, V, W, gains = inputs(args.batch, "cuda")
    ref = triton_tele_readout.slot_readout(q, K, V, W, _Opts, *gains)
    nbytes = (K.numel() + V.numel()) * K.element_size()
    rows = [
        {
            "variant": "product ({}, {} warps)".format(*triton_tele_readout.HALF_SLOTS),
            "us": 1e3 * do_bench(lambda: triton_tele_readout.slot_readout(q, K, V, W, _Opts, *gains)),
            "max_abs_diff": 0.0,
        }
    ]
    for prec in ("tf32x3", "tf32"):
        for warps in (4, 8):
            out = variant(q, K, V, gains, prec, True, warps)
            us = 1e3 * do_bench(lambda: variant(q, K, V, gains, prec, True, warps))
            rows.append(
                {
                    "variant": f"V early, {prec}, {warps} warps",
                    "us": us,
                    "max_abs_diff": float((out.float() - ref.float()).abs().max()),
                }
            )
    print(f"{torch.cuda.get_device_name()}, batch {args.batch}, {nbytes / 1e6:.0f} MB of slots")
    for r in rows:
        r["slot_gbs"] = nbytes / r["us"] / 1e3
        print(f"{r['variant']:28s} {r['us']:8.1f} us {r['slot_gbs']:7.0f} GB/s  max |diff| {r['max_abs_diff']:.2e}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {
            "device": torch.cuda.get_device_name(),
            "batch": args.batch,
            "torch": torch.__version__,
            "triton": triton.__version__,
        }
        (args.out / "tele_readout_precision.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
