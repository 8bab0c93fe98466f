"""Llama-3 1.8B's GEMV chain (every block's QKV, Wo, gate/up and W2 at batch 1; no attention) as one
warp-specialised Gluon kernel (avengers/decode/kernels/gluon_chain.py) against the per-kernel Triton
GEMVs launched with PDL, on the same random weights, both in CUDA graphs, on one GPU:
`python3 experiments/gpu_gluon_chain_probe.py --out DIR`. Prints and writes gluon_chain_probe.json."""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avengers.decode.kernels import gluon_chain as gc  # noqa: E402
from avengers.decode.kernels.triton_decode import sm_count  # noqa: E402
from avengers.decode.kernels.triton_gemv import gemv  # noqa: E402
from experiments.gpu_stream_read import _graph_us  # noqa: E402

L, D, NQKV, HID, EPS = 24, 2048, 3072, 7168, 1e-5  # llama3_1.8b


def per_kernel(x, ws, ln, ffln):
    h = x.view(1, D)
    for layer in range(L):
        qkv = gemv(h, ws[0][layer], norm_weight=ln[layer], eps=EPS)
        h2 = gemv(qkv[:, :D], ws[1][layer], residual=h)
        a = gemv(h2, ws[2][layer], norm_weight=ffln[layer], eps=EPS, swiglu=True)
        h = gemv(a, ws[3][layer], residual=h2)
    return h.view(D)


def graph_ms(fn, reps=50):
    """(best, median) of five means over `reps` replays of fn captured in a CUDA graph."""
    times = sorted(_graph_us([fn], reps) / 1e3 for _ in range(5))
    return times[0], times[2]


def phase_profile(t, names=("qkv", "wo", "gate_up", "w2")):
    """Per phase kind (`names`: a block's phases in order), means over blocks (us) from stamps t
    [programs, phases, 4]: the barrier (last program done with the previous phase -> median
    program past the barrier), the input row, the
    median and slowest program's reduction, and how far the loaders were ahead (median program's
    barrier pass minus its loader's last copy of the previous phase: > 0, that phase's copies were
    already under way)."""
    t = t - t[:, :, 1:].min()
    out = {}
    for k, name in enumerate(names):
        rows = []
        for ph in range(k, t.shape[1], len(names)):
            if ph == 0:
                continue
            done_prev = t[:, ph - 1, 3].max()
            passed = t[:, ph, 1]
            rows.append(
                [
                    (passed.median() - done_prev).item(),
                    (t[:, ph, 2] - passed).median().item(),
                    (t[:, ph, 3] - t[:, ph, 2]).median().item(),
                    (t[:, ph, 3] - t[:, ph, 2]).max().item(),
                    (passed - t[:, ph - 1, 0]).median().item(),
                    (t[:, ph, 3].max() - done_prev).item(),
                ]
            )
        m = torch.tensor(rows).mean(0).tolist()
        out[name] = dict(
            zip(
                ("barrier_us", "input_row_us", "reduce_median_us", "reduce_max_us", "loader_lead_us", "phase_us"),
                [round(v, 2) for v in m],
            )
        )
    out["step_us"] = round((t[:, :, 3].max() - t[:, :, 1:].min()).item(), 1)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="probe_out")
    ap.add_argument(
        "--variants",
        default="12:8",
        help="comma list of ring stages:consumer warps",
    )
    ap.add_argument("--skip_per_kernel", action="store_true")
    ap.add_argument("--stamps", action="store_true", help="also profile the first variant's phases (per-phase stamps)")
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = "cuda"
    ws = [
        torch.randn(L, n, k, device=dev, dtype=torch.bfloat16) * 0.02
        for n, k in ((NQKV, D), (D, D), (2 * HID, D), (D, HID))
    ]
    ln = 1 + 0.1 * torch.randn(L, D, device=dev, dtype=torch.bfloat16)
    ffln = 1 + 0.1 * torch.randn(L, D, device=dev, dtype=torch.bfloat16)
    x0 = torch.randn(D, device=dev, dtype=torch.bfloat16)
    ref = gc.chain_reference(x0, *ws, ln, ffln, EPS).float()
    weight_bytes = sum(w.numel() * 2 for w in ws)
    res = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "weight_bytes": weight_bytes,
        "read_ms_at_4.8TBps": weight_bytes / 4.8e9,
        "runs": [],
    }

    def rel_err(out):
        return ((out.float() - ref).norm() / ref.norm()).item()

    if not args.skip_per_kernel:
        t = time.time()
        err = rel_err(per_kernel(x0.clone(), ws, ln, ffln))
        ms = graph_ms(lambda: per_kernel(x0.clone(), ws, ln, ffln))
        res["runs"].append(
            {
                "path": "per-kernel Triton GEMVs (PDL)",
                "rel_err": err,
                "ms_best_median": ms,
                "TBps": weight_bytes / ms[0] / 1e9,
                "setup_s": time.time() - t,
            }
        )
        print(res["runs"][-1], flush=True)
    w, w2 = gc.pack(list(ws[0]), list(ws[1]), list(ws[2]), list(ws[3]))
    w_d, w2_d = gc.descriptors(w, w2)
    progs = sm_count(torch.device(dev))
    bufs = (
        torch.empty(NQKV, device=dev, dtype=torch.bfloat16),
        torch.empty(D, device=dev, dtype=torch.bfloat16),
        torch.empty(HID, device=dev, dtype=torch.bfloat16),
        torch.zeros(2, device=dev, dtype=torch.int32),
    )
    for v in args.variants.split(","):
        stages, warps = (int(f) for f in v.split(":"))
        kw = dict(stages=stages, num_warps=warps)
        t = time.time()
        x = x0.clone()
        gc.chain(w_d, w2_d, x, ln, ffln, bufs, L, NQKV, HID, EPS, progs, **kw)
        torch.cuda.synchronize()
        err, gave_up = rel_err(x), int(bufs[3][1].item())
        ms = graph_ms(lambda: gc.chain(w_d, w2_d, x, ln, ffln, bufs, L, NQKV, HID, EPS, progs, **kw))
        res["runs"].append(
            {
                "path": f"gluon chain {kw}",
                "rel_err": err,
                "barrier_gave_up": gave_up,
                "ms_best_median": ms,
                "TBps": weight_bytes / ms[0] / 1e9,
                "setup_s": time.time() - t,
            }
        )
        print(res["runs"][-1], flush=True)
    if args.stamps:
        stages, warps = (int(f) for f in args.variants.split(",")[0].split(":"))
        stamps = torch.zeros(progs, 4096, 4, device=dev, dtype=torch.int64)
        for _ in range(3):  # the last of three back-to-back steps
            gc.chain(
                w_d,
                w2_d,
                x0.clone(),
                ln,
                ffln,
                bufs,
                L,
                NQKV,
                HID,
                EPS,
                progs,
                stages=stages,
                num_warps=warps,
                stamps=stamps,
            )
        torch.cuda.synchronize()
        res["phases"] = phase_profile(stamps[:, : 4 * L].cpu().double() / 1e3)
        print(json.dumps(res["phases"], indent=1), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "gluon_chain_probe.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
