"""Telescoping cache on one GPU: flex path == gather reference, training cost vs Llama, decode cache size.

    python benchmarks/gpu_telescoping.py --out bench_out/telescoping      # one H200, ~4-5 minutes
    python benchmarks/gpu_telescoping.py --smoke                          # CPU, tiny shapes, ~1 minute

1. equivalence: the flex_attention block-mask path against the gather reference on random inputs
   (fp32 forward + gradients; bf16 forward against an fp64 reference), and whole-model logits of
   a 2-layer Tele@128 1.8B-shape model with each path, n beyond the first eviction.
2. training: tele128_llama3_1.8b vs llama3_1.8b_4k, seq 4096, batch 4, fp32 parameters,
   bf16 autocast, fused AdamW, every block compiled (as the trainer does), same process:
   step time and peak memory (targets: <= 1.25x time, <= 1.1x memory).
3. decode: cache bytes per sequence at several context lengths (measured from allocated
   tensors), prefill + decode == full forward, and decode step latency.

Writes <out>/telescoping.json and prints every number.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avengers.decode.options import DecodeOptions  # noqa: E402
from avengers.models import get_model_spec  # noqa: E402
from avengers.models.telescoping import (  # noqa: E402
    FMAP_PRESETS,
    TeleOptions,
    get_plan,
    telescoping_parallel,
    window,
)
from avengers.ops.telescoping import rope  # noqa: E402
from benchmarks.profiling import profile_step  # noqa: E402


def log(msg: str) -> None:
    print(msg, flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _random(B, n, H, Hkv, d, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, n, h, d, generator=g, dtype=torch.float64) for h in (H, Hkv, Hkv))
    w = 2 * torch.randn(B, n, Hkv, generator=g, dtype=torch.float64)
    pos = torch.arange(n)
    return rope(q, pos, 5e5), rope(k, pos, 5e5), v, w


def equivalence(device: torch.device, smoke: bool) -> dict:
    """Flex vs gather on random tensors, then whole-model logits with each path."""
    results = {}
    # (preset, C, n, d, mask_empty, dtypes): fp32 checks forward + gradients against the gather
    # path, bf16 checks the forward against an fp64 reference; every case compiles a flex kernel
    if smoke:
        cases = [("c8", 8, 150, 16, False, (torch.float32, torch.bfloat16)), ("c8", 8, 150, 16, True, (torch.float32,))]
    else:
        cases = [
            ("c64", 64, 700, 64, False, (torch.float32,)),
            ("c64", 64, 700, 64, True, (torch.bfloat16,)),
            ("c128", 128, 2100, 64, False, (torch.bfloat16,)),
        ]
    for name, C, n, d, mask_empty, dtypes in cases:
        t0 = time.perf_counter()
        fmap = FMAP_PRESETS[name]
        q, k, v, w = _random(2, n, 4, 2, d, seed=C)
        gains = (1 + 0.2 * torch.randn(d, dtype=torch.float64), 1 + 0.2 * torch.randn(d, dtype=torch.float64))
        opts = TeleOptions(C, fmap, mask_empty=mask_empty)
        ref_plan = get_plan(n, C, fmap, device)
        flex_plan = get_plan(n, C, fmap, device, flex=True)
        ref64, _ = telescoping_parallel(
            *(x.to(device) for x in (q, k, v, w)), ref_plan, opts, *(g.to(device) for g in gains), impl="gather"
        )
        row = {}
        for dtype in dtypes:
            grad = dtype == torch.float32 and device.type == "cuda"  # no flex backward on CPU
            ins_g = [x.to(device, torch.float32).requires_grad_(grad) for x in (q, k, v, w)]
            ins_f = [x.to(device, torch.float32).requires_grad_(grad) for x in (q, k, v, w)]
            gs = [g.to(device, torch.float32) for g in gains]
            # q (and hence the attention) in `dtype`; merges stay fp32 as in the model
            out_g, _ = telescoping_parallel(ins_g[0].to(dtype), *ins_g[1:], ref_plan, opts, *gs, impl="gather")
            out_f, _ = telescoping_parallel(ins_f[0].to(dtype), *ins_f[1:], flex_plan, opts, *gs, impl="flex")
            err = (out_f.double() - ref64).abs()
            entry = {
                "flex_vs_fp64_max": err.max().item(),
                "flex_vs_fp64_mean": err.mean().item(),
                "flex_vs_gather_max": (out_f.double() - out_g.double()).abs().max().item(),
            }
            if grad:
                go = torch.randn_like(out_g)
                (out_g * go).sum().backward()
                (out_f * go).sum().backward()
                entry["grad_max_rel_err"] = max(
                    ((a.grad - b.grad).abs().max() / a.grad.abs().max().clamp_min(1e-30)).item()
                    for a, b in zip(ins_g, ins_f)
                )
            if dtype == torch.float32:
                entry["ok"] = entry["flex_vs_gather_max"] < 1e-3 and entry.get("grad_max_rel_err", 0) < 1e-3
            else:
                entry["ok"] = entry["flex_vs_fp64_max"] < 5e-2 or entry["flex_vs_fp64_mean"] < 2e-3
            row[str(dtype).split(".")[-1]] = entry
        key = f"{name}_n{n}_{'masked' if mask_empty else 'unmasked'}"
        results[key] = row
        log(f"[equiv] {key} ({time.perf_counter() - t0:.0f} s): {json.dumps(row)}")
    # whole model: 2 layers of the Tele@128 1.8B shape (fp32), logits with each path
    spec = get_model_spec("tele_tiny" if smoke else "tele128_llama3_1.8b_4k").replace(nlayers=2)
    n = 300 if smoke else 2100
    torch.manual_seed(0)
    model = spec.build(device)
    model.init_weights()
    model.eval()
    x = torch.randint(0, spec.vocab_size, (1, n), device=device)
    logits = {}
    with torch.no_grad():
        for impl in ("gather", "flex"):
            for layer in model.base_model.layers:
                layer.attn.impl = impl
            logits[impl] = model(x).double()
    diff = (logits["flex"] - logits["gather"]).abs().max().item()
    results["model_logits_flex_vs_gather_max"] = diff
    results["model_logits_ok"] = diff < 1e-3 * max(1.0, logits["gather"].abs().max().item())
    results["all_ok"] = results["model_logits_ok"] and all(
        e["ok"] for r in results.values() if isinstance(r, dict) for e in r.values()
    )
    log(f"[equiv] 2-layer {spec.name} n={n} fp32 logits flex vs gather: max |diff| {diff:.3g}")
    del model, logits
    return results


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch._dynamo.reset()


def variant_spec(entry: str):
    """'name' or 'name:field=value,...' (config overrides, e.g. tele128_llama3_1.8b:tele_impl=gather)."""
    name, _, overrides = entry.partition(":")
    spec = get_model_spec(name)
    if not overrides:
        return spec
    changes = {}
    for item in overrides.split(";"):
        key, _, value = item.partition("=")
        if not hasattr(spec.config, key):
            raise SystemExit(f"{name} has no config field {key!r} (in --train_variants entry {entry!r})")
        changes[key] = yaml.safe_load(value)
    return dataclasses.replace(spec, config=dataclasses.replace(spec.config, **changes))


def train_cost(
    name: str,
    device: torch.device,
    seq: int,
    batch: int,
    steps: int,
    warmup: int,
    compile_blocks: bool,
    profile_dir: Path | None = None,
) -> dict:
    spec = variant_spec(name)
    _free(device)
    torch.manual_seed(0)
    model = spec.build(device)
    model.init_weights()
    model.train()
    if compile_blocks:
        for block in model.modules():
            if isinstance(block, spec.block_types):
                block.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    x = torch.randint(0, spec.vocab_size, (batch, seq + 1), device=device)
    inputs, labels = x[:, :-1], x[:, 1:]

    def step() -> float:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            logits = model(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    t0 = time.perf_counter()
    for _ in range(warmup):
        loss = step()
    _sync(device)
    warm_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        _sync(device)
        t = time.perf_counter()
        loss = step()
        _sync(device)
        times.append(time.perf_counter() - t)
    times.sort()
    median = times[len(times) // 2]
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    prof = None
    if profile_dir is not None:
        prof = profile_step(step, device, profile_dir, name.replace(":", "_").replace("=", "-").replace(";", "_"))
        prof.pop("_rows")
    out = {
        "variant": name,
        "params": sum(p.numel() for p in model.parameters()),
        "seq": seq,
        "batch": batch,
        "compile": compile_blocks,
        "warmup_s": warm_s,
        "step_s_median": median,
        "step_s_all": times,
        "tokens_per_s": batch * seq / median,
        "peak_mem_gib": peak / 2**30,
        "loss": loss,
        "flops_per_token": spec.flops_per_token(seq),
        "profile": prof,
    }
    log(
        f"[train] {name}: {median * 1e3:.1f} ms/step, {out['tokens_per_s'] / 1e3:.1f}k tok/s, "
        f"peak {out['peak_mem_gib']:.1f} GiB, warmup {warm_s:.0f} s, loss {loss:.3f}"
    )
    del model, opt
    _free(device)
    return out


def decode(device: torch.device, smoke: bool) -> dict:
    tele_name, llama_name = ("tele_tiny", "llama3_tiny") if smoke else ("tele128_llama3_1.8b", "llama3_1.8b")
    results: dict = {"cache_bytes_per_sequence": {}}
    contexts = [256, 1024, 4096] if smoke else [1024, 4096, 16384, 65536]
    for name in (tele_name, llama_name):
        spec = get_model_spec(name)
        model = spec.build("meta")  # allocate_cache only needs the config and a parameter dtype
        sizes = {}
        for L in contexts:
            cache = model.allocate_cache(1, L, device=device, dtype=torch.bfloat16)
            sizes[L] = cache.nbytes_per_sequence()
            del cache
        results["cache_bytes_per_sequence"][name] = sizes
        log(
            f"[decode] {name} bf16 cache bytes/sequence: "
            + ", ".join(f"{L}: {b / 2**20:.2f} MiB" for L, b in sizes.items())
        )
    # prefill + decode == full forward, then decode latency (bf16 weights)
    spec = get_model_spec(tele_name)
    if smoke:
        spec = spec.replace(nlayers=2)
    torch.manual_seed(0)
    model = spec.build(device)
    model.init_weights()
    model = model.to(torch.bfloat16).eval()
    C = spec.config.tele_cache_size
    prompt, extra = (60, 20) if smoke else (2000, 32)  # beyond the first eviction (t = 1920 for C=128)
    x = torch.randint(0, spec.vocab_size, (1, prompt + extra), device=device)
    with torch.no_grad():
        full = model(x).float()
        cache = model.allocate_cache(1, prompt + extra, device=device, dtype=torch.bfloat16)
        parts = [model(x[:, :prompt], cache=cache)] + [
            model(x[:, i : i + 1], cache=cache) for i in range(prompt, prompt + extra)
        ]
        stepped = torch.cat(parts, 1).float()
        err = (stepped - full).abs()
        agree = (stepped.argmax(-1) == full.argmax(-1)).float().mean().item()
        results["decode_check"] = {
            "prompt": prompt,
            "steps": extra,
            "max_abs": err.max().item(),
            "mean_abs": err.mean().item(),
            "argmax_agreement": agree,
            "window": window(C, spec.config.tele_options().fmap),
        }
        log(
            f"[decode] prefill {prompt} + {extra} steps vs full forward (bf16): max {err.max():.3g}, "
            f"mean {err.mean():.3g}, argmax agreement {agree:.3f}"
        )
        latency = {}
        for batch in (1, 4) if smoke else (1, 16):
            cache = model.allocate_cache(batch, prompt + 64, device, torch.bfloat16, DecodeOptions("reference"))
            model(x[:1, :prompt].expand(batch, -1), cache=cache)
            tok = x[:1, prompt : prompt + 1].expand(batch, -1)
            for _ in range(3):
                model(tok, cache=cache)
            _sync(device)
            t = time.perf_counter()
            n_steps = 8 if smoke else 48
            for _ in range(n_steps):
                model(tok, cache=cache)
            _sync(device)
            latency[batch] = (time.perf_counter() - t) / n_steps
            log(f"[decode] {spec.name} batch {batch}: {latency[batch] * 1e3:.2f} ms/step (eager, bf16)")
        results["step_latency_s"] = latency
        if device.type == "cuda":  # the same step replayed from a CUDA graph
            from avengers.inference.graphs import DecodeStep

            graph, compiled = {}, {}
            for batch in (1, 16):
                steps = []
                for use_graph, path in ((False, "reference"), (True, "reference"), (True, "compile")):
                    # compile: each layer's step_core torch.compile'd, then captured
                    options = DecodeOptions(path)
                    cache = model.allocate_cache(batch, prompt + 64, device, torch.bfloat16, options)
                    model(x[:1, :prompt].expand(batch, -1), cache=cache)
                    steps.append(DecodeStep(model, cache, cuda_graph=use_graph))
                toks = [x[:1, prompt + i : prompt + i + 1].expand(batch, -1) for i in range(16)]
                eager = torch.stack([steps[0](t).float() for t in toks])
                for step, out in ((steps[1], graph), (steps[2], compiled)):
                    replay = torch.stack([step(t).float() for t in toks])
                    rel = ((replay - eager).abs().max() / eager.abs().max()).item()
                    _sync(device)
                    t = time.perf_counter()
                    for _ in range(32):
                        step(toks[0])
                    _sync(device)
                    out[batch] = {"graph_vs_eager_rel_err": rel, "step_s": (time.perf_counter() - t) / 32}
                    log(
                        f"[decode] {spec.name} batch {batch} CUDA graph{' + compiled step' if out is compiled else ''}: "
                        f"{out[batch]['step_s'] * 1e3:.2f} ms/step, vs eager rel err {rel:.2g}"
                    )
                del steps
            results["cuda_graph"], results["cuda_graph_compiled"] = graph, compiled
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (checks the script, not the numbers)")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: equiv,train,decode")
    ap.add_argument(
        "--train_variants",
        default="llama3_1.8b_4k,tele128_llama3_1.8b",
        help="baseline first, then telescoping variants; 'name:field=value;field=value' overrides config",
    )
    ap.add_argument("--profile", action="store_true", help="profile one training step of each variant")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.smoke:
        raise SystemExit("no CUDA device: run with --smoke for the CPU check")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "argv": sys.argv[1:],
    }
    log(f"[info] {json.dumps(info)}")
    result: dict = {"info": info}
    # each flex shape/dtype compiles once; keep dynamo from falling back to the dense eager path
    for knob in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 64))
    t0 = time.perf_counter()
    if "equiv" not in skip:
        result["equivalence"] = equivalence(device, args.smoke)
    if "train" not in skip:
        if args.smoke:
            pairs, seq, batch, comp = ("llama3_tiny", "tele_tiny"), 128, 2, False
        else:
            pairs, seq, batch, comp = args.train_variants.split(","), args.seq, args.batch, args.compile
        runs = [
            train_cost(
                n,
                device,
                seq,
                batch,
                args.steps if not args.smoke else 2,
                args.warmup if not args.smoke else 1,
                comp,
                out_dir if args.profile else None,
            )
            for n in pairs
        ]
        base, tele = runs[:2]
        for extra in runs[2:]:
            log(
                f"[train] {extra['variant']} / {base['variant']}: step time "
                f"{extra['step_s_median'] / base['step_s_median']:.3f}x"
            )
        ratio = {
            "step_time": tele["step_s_median"] / base["step_s_median"],
            "peak_mem": tele["peak_mem_gib"] / base["peak_mem_gib"] if base["peak_mem_gib"] else None,
        }
        ratio["meets_targets"] = (
            None if ratio["peak_mem"] is None else ratio["step_time"] <= 1.25 and ratio["peak_mem"] <= 1.1
        )
        result["train"] = {"llama": base, "tele": tele, "ratio": ratio, "more": runs[2:]}
        log(
            f"[train] tele / llama: step time {ratio['step_time']:.3f}x (target <= 1.25), peak memory "
            f"{ratio['peak_mem'] if ratio['peak_mem'] is None else round(ratio['peak_mem'], 3)}x (target <= 1.1)"
        )
    if "decode" not in skip:
        t1 = time.perf_counter()
        result["decode"] = decode(device, args.smoke)
        log(f"[decode] part took {time.perf_counter() - t1:.0f} s")
    result["total_s"] = time.perf_counter() - t0
    path = out_dir / "telescoping.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    (out_dir / "telescoping.md").write_text(markdown(result))
    log(markdown(result))
    log(f"[done] {result['total_s']:.0f} s, wrote {path} and telescoping.md")


def markdown(result: dict) -> str:
    """The result as a markdown section (the source of docs/results.md's telescoping rows)."""
    info = result["info"]
    lines = [f"{info['device']}, torch {info['torch']}, {info['date']}, `{' '.join(info['argv']) or '(defaults)'}`", ""]
    eq = result.get("equivalence")
    if eq:
        lines += [
            "| flex vs reference | dtype | max abs err | mean abs err vs fp64 | grad max rel err | ok |",
            "|---|---|---|---|---|---|",
        ]
        for key, row in eq.items():
            if isinstance(row, dict):
                for dt, e in row.items():
                    err = e["flex_vs_gather_max"] if dt == "float32" else e["flex_vs_fp64_max"]
                    lines.append(
                        f"| {key} | {dt} | {err:.2e} | {e['flex_vs_fp64_mean']:.2e} | "
                        f"{e.get('grad_max_rel_err', float('nan')):.2e} | {e['ok']} |"
                    )
        lines += [
            f"| 2-layer model logits, flex vs gather | float32 | {eq['model_logits_flex_vs_gather_max']:.2e} "
            f"| | | {eq['model_logits_ok']} |",
            "",
        ]
    tr = result.get("train")
    if tr:
        lines += [
            "| training step | params | ms/step (median) | tokens/s | peak GiB | warm-up s |",
            "|---|---|---|---|---|---|",
        ]
        for run in (tr["llama"], tr["tele"], *tr.get("more", [])):
            lines.append(
                f"| {run['variant']} (seq {run['seq']}, batch {run['batch']}, compile {run['compile']}) | "
                f"{run['params'] / 1e9:.3f}B | {run['step_s_median'] * 1e3:.1f} | {run['tokens_per_s']:.0f} | "
                f"{run['peak_mem_gib']:.1f} | {run['warmup_s']:.0f} |"
            )
        r = tr["ratio"]
        mem = "n/a" if r["peak_mem"] is None else f"{r['peak_mem']:.3f}x"
        lines += [
            "",
            f"Telescoping / Llama: step time {r['step_time']:.3f}x (target <= 1.25), peak memory {mem} "
            f"(target <= 1.1); targets met: {r['meets_targets']}.",
            "",
        ]
    dec = result.get("decode")
    if dec:
        sizes = dec["cache_bytes_per_sequence"]
        contexts = list(next(iter(sizes.values())))
        lines += [
            "| bf16 cache MiB per sequence | " + " | ".join(f"{c} tokens" for c in contexts) + " |",
            "|---" * (len(contexts) + 1) + "|",
        ]
        for name, row in sizes.items():
            lines.append(f"| {name} | " + " | ".join(f"{row[c] / 2**20:.2f}" for c in contexts) + " |")
        chk = dec["decode_check"]
        lines += [
            "",
            f"Prefill {chk['prompt']} + {chk['steps']} decode steps vs full forward (bf16, window "
            f"{chk['window']}): max abs {chk['max_abs']:.3g}, mean abs {chk['mean_abs']:.3g}, argmax "
            f"agreement {chk['argmax_agreement']:.3f}. Eager decode: "
            + ", ".join(f"batch {b} {s * 1e3:.2f} ms/step" for b, s in dec["step_latency_s"].items())
            + ".",
        ]
        for key, label in (("cuda_graph", "CUDA-graph decode"), ("cuda_graph_compiled", "with the compiled step")):
            if key in dec:
                lines.append(
                    f"{label}: "
                    + ", ".join(
                        f"batch {b} {g['step_s'] * 1e3:.2f} ms/step (rel err vs eager {g['graph_vs_eager_rel_err']:.1e})"
                        for b, g in dec[key].items()
                    )
                    + "."
                )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
