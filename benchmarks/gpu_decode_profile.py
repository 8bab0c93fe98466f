"""Where a batch-1 Llama decode step spends its time on one GPU (the roofline target of issue 6).

    python benchmarks/gpu_decode_profile.py --out DIR [--variant llama3_1.8b] [--context 1024]

1. Each weight GEMV of one block (and the LM head) alone, 50 calls back to back in one CUDA graph
   (no CPU launch cost, inter-kernel gaps included): torch (norm + F.linear + epilogue as separate
   kernels) vs the fused Triton GEMV (autotuned; the chosen config is printed) without and with
   PDL, as microseconds and GB/s of weight read; also the QKV GEMV with RoPE and the cache write.
2. The whole decode step at `--context` for every mode: a fused-decode mode (off, inductor,
   triton, persistent, gluon) with options `_pdl` (PDL, triton_pdl.py), `_a<n>` (attention split
   programs per SM that the split count plans for, triton_decode.ITEMS_PER_SM), `_k<n>` (GEMV K
   tiles of n elements only), and for persistent `_t<weights per tile>`, `_w<warps>`, `_g<programs per SM>`, `_d<pipeline stages>`
   and `_s` (a global-timer stamp per program at every phase end: where the kernel's time goes;
   for gluon, the Gluon step kernel's per-phase profile as gpu_gluon_chain_probe.py's `--stamps`;
   gluon's `_p`: keys and values loaded by the consumer warps, not streamed through the ring;
   `_tags`: tagged rows polled between the phases instead of grid barriers; `_n<splits>`: the
   attention's split plan for that many programs per kv head; `_f<copies>`: the loader's copies
   in flight (LlamaStepKernel.INFLIGHT, 0: up to the ring's stages);
   timing only, wrong results: `_noload`, no weight or K/V copies (what the consumer warps alone
   cost), `_nomath`, staged weights released unread; `_s` also times the attention phase's steps,
   `attention_detail`),
   e.g. persistent_t16384_w8_d4_s. Every mode autotunes the GEMVs anew (`--keep_gemv_picks`: the
   first mode's picks for all, so an A/B of another knob is not moved by the GEMV picks); rows
   name the picks.
   Reported: CUDA-graph step time vs the weight+cache roofline, and a profile of a few graph
   replays: kernel time and launches per step, so the gap between the kernels' sum and the step
   time (launch/tail cost) is visible.
Writes results.json, log.txt and profile_<mode>.{txt,json} under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avengers.inference.bench import H200_BANDWIDTH_GBS, weight_bytes_per_step  # noqa: E402
from avengers.inference.graphs import DecodeStep  # noqa: E402
from avengers.inference.kv_cache import KVState  # noqa: E402
from avengers.inference.llama_compiled import set_fused_decode  # noqa: E402
from avengers.inference.triton_pdl import set_pdl  # noqa: E402
from avengers.models.registry import get_model_spec  # noqa: E402
from benchmarks.profiling import profile_step  # noqa: E402

OUT = Path(".")


def log(msg: str) -> None:
    print(msg, flush=True)
    with open(OUT / "log.txt", "a") as f:
        f.write(msg + "\n")


def graph_us(fn, reps: int = 50) -> float:
    """Microseconds per call of fn, `reps` calls captured back to back in one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        g.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / (10 * reps) * 1e6


def gemv_part(model, batch: int) -> list[dict]:
    from avengers.inference import triton_gemv as tg

    layer = model.base_model.layers[0]
    attn, ff = layer.attn, layer.ff_sub_layer
    D, hid = attn.dense.weight.shape[0], ff.hidden_dim
    dev, dt = attn.dense.weight.device, attn.dense.weight.dtype
    x = torch.randn(batch, D, device=dev, dtype=dt)
    a = torch.randn(batch, hid, device=dev, dtype=dt)
    o = torch.randn(batch, attn.dense.weight.shape[1], device=dev, dtype=dt)
    ln, eps = layer.ln.weight, layer.ln.eps
    head = model.head.weight
    cases = {
        "norm+qkv": (
            attn.in_proj.qkv_fused.weight,
            lambda w: F.linear(F.rms_norm(x, (D,), ln, eps), w),
            lambda w: tg.gemv(x, w, norm_weight=ln, eps=eps),
        ),
        "wo+residual": (attn.dense.weight, lambda w: x + F.linear(o, w), lambda w: tg.gemv(o, w, residual=x)),
        "norm+wg1+swiglu": (
            ff.wg1_fused.weight,
            lambda w: (lambda g: F.silu(g[0]) * g[1])(F.linear(F.rms_norm(x, (D,), ln, eps), w).split(hid, -1)),
            lambda w: tg.gemv(x, w, norm_weight=ln, eps=eps, swiglu=True),
        ),
        "w2+residual": (ff.w2.weight, lambda w: x + F.linear(a, w), lambda w: tg.gemv(a, w, residual=x)),
        "norm+lm_head": (
            head,
            lambda w: F.linear(F.rms_norm(x, (D,), ln, eps), w),
            lambda w: tg.gemv(x, w, norm_weight=ln, eps=eps),
        ),
    }
    # the QKV GEMV as the decode step runs it: RoPE and the key/value cache write in its epilogue
    H, Hkv, d = attn.nheads, attn.kvheads, attn.emb_kq_per_head
    state = KVState(batch, Hkv, 1024, d, device=dev, dtype=dt)
    cos, sin = torch.ones(H + Hkv, d // 2, device=dev), torch.zeros(H + Hkv, d // 2, device=dev)
    pos = torch.tensor(5, device=dev)
    qkv_w = attn.in_proj.qkv_fused.weight
    cases["norm+qkv+rope+cache"] = (
        qkv_w,
        lambda w: F.linear(F.rms_norm(x, (D,), ln, eps), w)[:, : H * d],
        lambda w: tg.decode_pre_write(x.view(batch, 1, D), ln, eps, w, cos, sin, H, Hkv, d, state, pos).reshape(
            batch, -1
        ),
    )
    rows = []
    for name, (w, ref, fused) in cases.items():
        err = ((fused(w).float() - ref(w).float()).abs().max() / ref(w).float().abs().max()).item()
        gb = w.numel() * w.element_size() / 1e9
        t_ref = graph_us(lambda: ref(w))
        set_pdl(False)
        t_fused = graph_us(lambda: fused(w))
        set_pdl(True)
        t_pdl = graph_us(lambda: fused(w))
        kernel = tg._qkv_rope_kernel if "rope" in name else tg._gemv_kernel
        cfg = getattr(kernel, "best_config", None)
        row = {
            "op": name,
            "batch": batch,
            "weight_shape": list(w.shape),
            "torch_us": round(t_ref, 2),
            "triton_us": round(t_fused, 2),
            "triton_pdl_us": round(t_pdl, 2),
            "torch_GBs": round(gb / t_ref * 1e6),
            "triton_GBs": round(gb / t_fused * 1e6),
            "triton_pdl_GBs": round(gb / t_pdl * 1e6),
            "roofline_us": round(gb / H200_BANDWIDTH_GBS * 1e6, 2),
            "max_rel_err": err,
            "config": f"{cfg.kwargs} warps={cfg.num_warps}" if cfg else None,
        }
        rows.append(row)
        log(json.dumps(row))
    return rows


@torch.no_grad()
def step_part(model, spec, context: int, modes: list[str], steps: int, keep_gemv_picks: bool = False) -> list[dict]:
    dev = next(model.parameters()).device
    rows = []
    from avengers.inference import gemv_tuning, triton_block, triton_decode

    knobs = ("TILE_ELEMENTS", "NUM_WARPS", "PROGRAMS_PER_SM", "STAGES")
    defaults = {k: getattr(triton_block, k) for k in knobs}
    items_per_sm = triton_decode.ITEMS_PER_SM
    step_knobs = {}  # the Gluon step kernel's class knobs, restored after the modes
    if any(m.startswith("gluon") for m in modes):
        from avengers.inference.gluon_step import LlamaStepKernel

        step_knobs = {
            k: getattr(LlamaStepKernel, k) for k in ("KV_RING", "TAGGED", "SPLIT_PROGRAMS", "LOAD", "MATH", "INFLIGHT")
        }
    gemv_kernels = gemv_tuning.decode_gemv_kernels()
    gemv_configs = {name: k.configs for name, k in gemv_kernels.items()}
    for mode in modes:  # "triton_pdl": with PDL; "persistent_t16384_w8_g2_s": see the module docstring
        base, *flags = mode.split("_")
        set_pdl("pdl" in flags)
        for knob, letter in zip(knobs, "twgd"):
            value = flag_number(flags, letter, defaults[knob])
            setattr(triton_block, knob, value)
        triton_decode.ITEMS_PER_SM = flag_number(flags, "a", items_per_sm)
        bk = flag_number(flags, "k")
        for name, kernel in gemv_kernels.items():
            kernel.configs = [c for c in gemv_configs[name] if bk is None or c.kwargs["BK"] == bk] or gemv_configs[name]
            if bk is not None or not keep_gemv_picks:
                kernel.cache.clear()
        triton_block.STAMPS = None
        if "s" in flags and base == "persistent":
            triton_block.STAMPS = torch.zeros(triton_block._programs(dev), 16, dtype=torch.int64, device=dev)
        set_fused_decode(base)
        gluon_step = None
        if base == "gluon":  # the step kernel (None: it does not take this model; logged why)
            gluon_step = LlamaStepKernel.for_model(model)
            LlamaStepKernel.KV_RING = "p" not in flags
            LlamaStepKernel.TAGGED = "tags" in flags
            LlamaStepKernel.LOAD = "noload" not in flags
            LlamaStepKernel.MATH = "nomath" not in flags
            n = flag_number(flags, "n")
            LlamaStepKernel.SPLIT_PROGRAMS = n and n * model.base_model.layers[0].attn.kvheads
            LlamaStepKernel.INFLIGHT = flag_number(flags, "f", step_knobs["INFLIGHT"])
            if gluon_step is not None and "s" in flags:
                gluon_step.stamps = torch.zeros(gluon_step.programs, 4096, 4, dtype=torch.int64, device=dev)
        cache = model.allocate_cache(1, context, dev, torch.bfloat16)
        cache.set_seq_len(context - 2 * steps - 8)
        tokens = torch.randint(0, spec.vocab_size, (1, 1), device=dev)
        step = DecodeStep(model, cache, cuda_graph=True, preserve_state=False)
        for _ in range(3):
            step(tokens)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            step(tokens)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) / steps * 1e3
        bytes_ = weight_bytes_per_step(model) + cache.nbytes()  # as the bench: the whole cache is read
        roof = bytes_ / (H200_BANDWIDTH_GBS * 1e9) * 1e3
        reps = 5
        prof = profile_step(lambda: [step(tokens) for _ in range(reps)], dev, OUT, f"{mode}_ctx{context}")
        row = {
            "mode": mode,
            "context": context,
            "step_ms": round(ms, 4),
            "roofline_ms": round(roof, 4),
            "x_roofline": round(ms / roof, 3),
            "kernel_ms_per_step": round(prof["kernel_ms"] / reps, 4),
            "launches_per_step": prof["kernel_launches"] // reps,
        }
        row["gemv_configs"] = {
            f"{name}{key[:2]}": gemv_tuning.describe(c)
            for name, kernel in gemv_kernels.items()
            for key, c in kernel.cache.items()
        }
        if triton_block.STAMPS is not None:
            row["phase_end_us"] = phase_ends(triton_block.STAMPS)
        if base == "gluon":
            row["gluon_step_kernel"] = gluon_step is not None
            if gluon_step is not None and gluon_step.stamps is not None:
                from gpu_gluon_chain_probe import phase_profile

                n = len(model.base_model.layers) * len(GLUON_PHASES)
                row["phases"] = phase_profile(gluon_step.stamps[:, :n].cpu().double() / 1e3, GLUON_PHASES)
                row["attention_detail"] = attention_detail(
                    gluon_step.stamps.cpu().double() / 1e3, n // len(GLUON_PHASES)
                )
                gluon_step.stamps = None
        rows.append(row)
        log(json.dumps(row))
        del step, cache
        torch.cuda.empty_cache()
    set_fused_decode("off")
    set_pdl(True)
    for name, value in step_knobs.items():
        setattr(LlamaStepKernel, name, value)
    for knob, value in defaults.items():
        setattr(triton_block, knob, value)
    triton_decode.ITEMS_PER_SM = items_per_sm
    for name, kernel in gemv_kernels.items():
        kernel.configs = gemv_configs[name]
    triton_block.STAMPS = None
    return rows


def flag_number(flags: list[str], letter: str, default=None):
    """n of a mode's flag `<letter><n>` (e.g. "t16384" for "t"), else default."""
    return next((int(f[1:]) for f in flags if f[:1] == letter and f[1:].isdigit()), default)


def attention_detail(t, layers: int) -> dict:
    from avengers.inference.gluon_chain import DETAIL_STAMPS

    """The Gluon step's attention phase in steps (us; medians over the programs with an item, then
    means over blocks; *_max: the slowest program): barrier passed -> q, k, v loaded -> keys done ->
    partials stored -> head counter returned -> phase left (the merging program: _max)."""
    names = ("qkv_loaded", "keys_done", "partials_stored", "atomic_returned", "merge_and_leave")
    rows = []
    for layer in range(layers):
        ph = layer * 5 + 1
        d = t[:, DETAIL_STAMPS + ph]
        ok = d[:, 0] > 0
        marks = torch.stack([t[:, ph, 2], d[:, 0], d[:, 1], d[:, 2], d[:, 3], t[:, ph, 3]], 1)[ok]
        steps = marks[:, 1:] - marks[:, :-1]
        rows.append(torch.cat([steps.median(0).values, steps.max(0).values]))
    m = torch.stack(rows).mean(0).tolist()
    return {**{n: round(v, 2) for n, v in zip(names, m[:5])}, **{n + "_max": round(v, 2) for n, v in zip(names, m[5:])}}


PHASES = ("qkv", "attn wait", "attn+merge", "wo", "gate/up", "w2")
GLUON_PHASES = ("qkv", "attention", "wo", "gate_up", "w2")  # a block's phases in the Gluon step kernel


def phase_ends(stamps: torch.Tensor) -> dict:
    """[min, median, max] over programs of each phase's end (us after the first program started) in
    the last persistent block kernel run: the max is the critical path, max - min the skew."""
    t = stamps[:, : len(PHASES) + 1].cpu().double()
    t = (t - t[:, 0].min()) / 1e3
    return {
        name: [
            round(t[:, i + 1].min().item(), 2),
            round(t[:, i + 1].median().item(), 2),
            round(t[:, i + 1].max().item(), 2),
        ]
        for i, name in enumerate(PHASES)
    }


def main() -> int:
    global OUT
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="decode_profile")
    p.add_argument("--variant", default="llama3_1.8b")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--modes", default="off,inductor,triton,triton_pdl,persistent")
    p.add_argument("--batches", default="1", help="batch sizes for the per-GEMV part ('' to skip it)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--keep_gemv_picks", action="store_true", help="autotune the GEMVs once, for the first mode")
    a = p.parse_args()
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU (the Triton kernels' CPU tests are `make test-triton`)")
    OUT = Path(a.out)
    OUT.mkdir(parents=True, exist_ok=True)
    spec = get_model_spec(a.variant)
    torch.manual_seed(0)
    model = spec.build(torch.device("cuda"))
    model.init_weights()
    model.to(torch.bfloat16).eval()
    results = {"device": torch.cuda.get_device_name(), "variant": a.variant, "gemv": [], "step": []}
    with torch.no_grad():
        for b in (int(x) for x in a.batches.split(",") if x):
            results["gemv"] += gemv_part(model, b)
    results["step"] = step_part(model, spec, a.context, a.modes.split(","), a.steps, a.keep_gemv_picks)
    (OUT / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
