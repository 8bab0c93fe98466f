"""Mamba-2 on one GPU: kernel-path correctness, training throughput vs mamba_ssm, profile, compile.

    python benchmarks/gpu_mamba.py --out DIR [--parts check,train,compile] [--budget_s 330]
    python benchmarks/gpu_mamba.py --smoke --out /tmp/m   # CPU, tiny shapes: checks the wiring only

Parts (each time-boxed; whatever does not fit in --budget_s is skipped and says so):
  check    small hybrid, same weights: reference path vs mamba_ssm-kernel path (fp32 and bf16 autocast
           logits, loss, gradients), kernel-path prefill + decode vs full forward, and our model vs
           mamba_ssm's own MambaLMHeadModel (rotary off: its MHA needs flash-attn for RoPE).
  train    1.5B pure Mamba-2 shape (mamba2_1.3b: d 2048, 48 layers, vocab 128256), batch 4 x 4096 (--batch):
           tokens/s + peak memory for our model and mamba_ssm's MambaLMHeadModel (use_mem_eff_path=False)
           with fp32 params + bf16 autocast, all-bf16, and bf16 params + fp32 master weights in the
           optimizer; one profiled step of each (top kernels, time by kernel class, the kernels whose
           time differs most between fp32+autocast and all-bf16).
  attn     why the hybrid holds more memory than the pure model: one attention block and one Mamba-2
           block of mamba_1.5b alone (bf16, batch 4 x 4096), forward + backward peak memory and
           time, the SDPA kernels that ran, and the same with each SDPA backend forced.
  compile  torch.compile per block (bf16): break reasons from torch._dynamo.explain, then tokens/s of
           eager vs compiled with our mamba_ssm ops as a custom op (one graph per block), opaque to
           dynamo (graph breaks) or traced into, and mamba_ssm's own blocks compiled.
Writes results.json, log.txt, profile_<config>.{txt,json} and gap_<model>.txt under --out.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avengers.models import get_model_spec  # noqa: E402
from avengers.models.mamba import MambaConfig  # noqa: E402
from avengers.models.mamba import kernels as mamba_kernels  # noqa: E402
from benchmarks.profiling import profile_step  # noqa: E402

OUT: Path = Path(".")
RESULTS: dict = {}


def log(msg: str) -> None:
    print(msg, flush=True)
    with open(OUT / "log.txt", "a") as f:
        f.write(msg + "\n")


def save() -> None:
    (OUT / "results.json").write_text(json.dumps(RESULTS, indent=2, default=str))


class Budget:
    def __init__(self, seconds: float):
        self.t0, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def mamba_ssm_available() -> bool:
    try:
        import mamba_ssm  # noqa: F401

        return torch.cuda.is_available()
    except ImportError:
        return False


def ssm_model(cfg: MambaConfig, device, dtype=None):
    """mamba_ssm's own MambaLMHeadModel for our config (use_mem_eff_path=False: causal-conv1d is absent)."""
    from mamba_ssm.models.config_mamba import MambaConfig as SsmConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    d = cfg.to_mamba_ssm()
    d["ssm_cfg"] = {**d["ssm_cfg"], "use_mem_eff_path": False}
    return MambaLMHeadModel(SsmConfig(**d), device=device, dtype=dtype)


def logits_of(model, ids):
    out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def build_ours(spec, device, dtype=None):
    model = spec.build("meta")
    model.to_empty(device=device)
    model.init_weights()
    return model.to(dtype) if dtype is not None else model


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


# ---- part 1: kernel path vs reference path -------------------------------------------------


def part_check(device, smoke: bool) -> dict:
    torch.manual_seed(0)
    base = get_model_spec("hybrid_tiny")
    if not smoke:  # Mamba-2 defaults (d_state 128, headdim 64, chunk 256): Triton compiles are reused in `train`
        base = base.replace(
            d_model=512,
            n_layer=6,
            attn_layer_idx=(2, 5),
            attn_num_heads=8,
            attn_num_heads_kv=4,
            attn_head_dim=64,
            attn_rotary_emb_dim=32,
            d_intermediate=1024,
            d_state=128,
            headdim=64,
            chunk_size=256,
        )
    fast_mode = "mamba_ssm" if mamba_ssm_available() else "reference"
    B, S = (2, 1024) if not smoke else (2, 40)
    ref = build_ours(base.replace(kernels="reference"), device)
    fast = build_ours(base.replace(kernels=fast_mode), device)
    fast.load_state_dict(ref.state_dict())
    ids = torch.randint(0, base.vocab_size, (B, S + 1), device=device)
    x, y = ids[:, :-1], ids[:, 1:]
    res = {"kernels": fast_mode, "config": str(base.config), "batch": B, "seq": S}
    with torch.no_grad():
        res["fp32_logits_rel_err"] = rel(fast(x), ref(x))
    losses, grads = {}, {}
    for name, m in (("ref", ref), ("fast", fast)):
        m.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = m(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        losses[name] = (loss.item(), logits.detach())
        grads[name] = {k: p.grad.detach().clone() for k, p in m.named_parameters()}
    res["bf16_loss_ref"], res["bf16_loss_fast"] = losses["ref"][0], losses["fast"][0]
    res["bf16_loss_abs_diff"] = abs(losses["ref"][0] - losses["fast"][0])
    res["bf16_logits_rel_err"] = rel(losses["fast"][1], losses["ref"][1])
    diff = (losses["fast"][1].float() - losses["ref"][1].float()).abs().mean()
    res["bf16_logits_mean_rel_err"] = float(diff / losses["ref"][1].float().abs().mean())
    grad_err = {k: float((grads["fast"][k] - g).norm() / g.norm().clamp_min(1e-12)) for k, g in grads["ref"].items()}
    worst = sorted(grad_err.items(), key=lambda kv: -kv[1])[:5]
    res["bf16_grad_rel_err_worst"] = worst
    # kernel path: prefill (initial/final states) + selective_state_update decode vs full forward, fp32
    with torch.no_grad():
        full = fast(x[:, : S // 2 + 16])
        cache = fast.allocate_cache(B, S // 2 + 16)
        parts = [fast(x[:, : S // 2], cache=cache)] + [
            fast(x[:, t : t + 1], cache=cache) for t in range(S // 2, S // 2 + 16)
        ]
        res["decode_vs_full_rel_err"] = rel(torch.cat(parts, 1), full)
    if device.type == "cuda":  # the decode step replayed from a CUDA graph (state updated in place)
        from avengers.inference.check import check_graph_decode

        try:
            res["cuda_graph_decode_rel_err"] = check_graph_decode(fast.eval(), base.vocab_size, device)
        except Exception as e:
            res["cuda_graph_decode_rel_err"] = f"failed: {type(e).__name__}: {e}"
    # our model vs mamba_ssm's MambaLMHeadModel on the same weights (RoPE off on both sides)
    if fast_mode == "mamba_ssm":
        norope = base.replace(attn_rotary_emb_dim=0, kernels="mamba_ssm")
        ours = build_ours(norope, device)
        theirs = ssm_model(norope.config, device)
        theirs.load_state_dict(ours.state_dict(), strict=True)
        with torch.no_grad():
            res["vs_mamba_ssm_fp32_logits_rel_err"] = rel(ours(x), logits_of(theirs, x))
            with torch.autocast("cuda", dtype=torch.bfloat16):
                lo, lt = ours(x), logits_of(theirs, x)
            res["vs_mamba_ssm_bf16_logits_rel_err"] = rel(lo, lt)
            res["vs_mamba_ssm_bf16_loss_abs_diff"] = abs(
                F.cross_entropy(lo.float().flatten(0, 1), y.flatten()).item()
                - F.cross_entropy(lt.float().flatten(0, 1), y.flatten()).item()
            )
        del ours, theirs
    # bf16 tolerance: 3e-2 of the largest |logit| is about 4 bf16 ulps there. The "fp32" kernel path
    # still runs TF32 dots inside the Triton SSD kernels, hence the 1e-2 bound on fp32 comparisons.
    res["criteria"] = "bf16 logits rel <= 3e-2, |loss diff| <= 1e-2, fp32 logits and decode rel <= 1e-2"
    res["pass"] = bool(
        res["bf16_logits_rel_err"] <= 3e-2
        and res["bf16_loss_abs_diff"] <= 1e-2
        and res["fp32_logits_rel_err"] <= 1e-2
        and res["decode_vs_full_rel_err"] <= 1e-2
    )
    del ref, fast, grads
    free()
    return res


# ---- part 2: training throughput and profiles ----------------------------------------------


def gap_report(tag: str, slow: dict, fast: dict) -> dict:
    """Kernels whose total time differs most between two profiles of the same model."""
    a = {r["name"]: r for r in slow["_rows"]}
    b = {r["name"]: r for r in fast["_rows"]}
    names = set(a) | set(b)
    diffs = sorted(((a.get(n, {}).get("ms", 0.0) - b.get(n, {}).get("ms", 0.0), n) for n in names), reverse=True)
    cls = {
        k: round(slow["by_class_ms"].get(k, 0) - fast["by_class_ms"].get(k, 0), 1)
        for k in set(slow["by_class_ms"]) | set(fast["by_class_ms"])
    }
    lines = [
        f"{tag}: one training step, minus the all-bf16 one",
        f"wall {slow['profiled_step_wall_ms'] - fast['profiled_step_wall_ms']:+.1f} ms, "
        f"kernels {slow['kernel_ms'] - fast['kernel_ms']:+.1f} ms",
        "by class (ms): " + json.dumps(dict(sorted(cls.items(), key=lambda kv: -abs(kv[1])))),
        "",
        "largest per-kernel differences (ms, calls slow/fast):",
    ]
    for d, n in diffs[:15] + diffs[-5:]:
        lines.append(f"{d:+9.2f}  {a.get(n, {}).get('calls', 0):5d}/{b.get(n, {}).get('calls', 0):<5d} {n[:140]}")
    (OUT / f"gap_{tag}.txt").write_text("\n".join(lines) + "\n")
    return {"by_class_delta_ms": cls, "top_kernel_deltas_ms": [(round(d, 2), n[:140]) for d, n in diffs[:10]]}


def make_step(model, mode: str, device, vocab: int, B: int, S: int):
    """One optimizer step of a plain loop. mode: fp32_autocast | bf16 | bf16_fp32_master | fsdp2_mp.

    bf16_fp32_master: the model (forward/backward) in bf16, fp32 copies of the weights in the
    optimizer; grads are upcast before and weights copied back after each step.
    fsdp2_mp: the model already wrapped by avengers.train.parallel (FSDP2 bf16 compute, fp32 master).
    """
    gen = torch.Generator(device=device).manual_seed(0)
    batch = torch.randint(0, vocab, (B, S + 1), device=device, generator=gen)
    x, y = batch[:, :-1], batch[:, 1:]
    fused = True if device.type == "cuda" else None
    params = [p for p in model.parameters()]
    if mode == "bf16_fp32_master":
        masters = [p.detach().float().requires_grad_(True) for p in params]
        opt = torch.optim.AdamW(masters, lr=1e-4, fused=fused)
    else:
        opt = torch.optim.AdamW(params, lr=1e-4, fused=fused)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "fp32_autocast"):
            logits = logits_of(model, x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        if mode == "bf16_fp32_master":
            for m, p in zip(masters, params):
                m.grad = p.grad.float()
                p.grad = None
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                torch._foreach_copy_(params, masters)
        else:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss

    return step


def fsdp2_wrap(model, device):
    """The trainer's wrapping on a 1-process group: fully_shard per block + root, bf16 compute, fp32 reduce."""
    from avengers.models.mamba import MambaBlock
    from avengers.train.parallel import build_mesh, init_distributed, parallelize

    info = init_distributed(device.type)
    mesh = build_mesh("fsdp", info.world_size, device.type, None)
    return parallelize(model, (MambaBlock,), mesh, mixed_precision=device.type == "cuda")


def time_steps(step, device, warmup: int, steps: int, tokens_per_step: int) -> dict:
    t0 = time.perf_counter()
    first = None
    for i in range(warmup):
        loss = step()
        sync(device)
        if i == 0:
            first = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync(device)
    dt = (time.perf_counter() - t1) / steps
    out = {
        "tokens_per_s": round(tokens_per_step / dt),
        "step_ms": round(dt * 1e3, 1),
        "first_step_s": round(first or 0.0, 1),
        "loss": round(float(loss.detach()), 4),
    }
    if device.type == "cuda":  # allocator retries (free + re-malloc under pressure) stall the GPU
        stats = torch.cuda.memory_stats()
        out.update(
            peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1),
            peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 1),
            alloc_retries=stats.get("num_alloc_retries", 0),
            cuda_mallocs=stats.get("num_device_alloc", 0),
        )
    return out


def part_train(
    device, smoke: bool, budget: Budget, profile: bool = True, batch: int | None = None, only: str | None = None
) -> dict:
    spec = get_model_spec("mamba2_tiny" if smoke else "mamba2_1.3b")
    B, S = (2, 64) if smoke else (4, 4096)
    B = batch or B
    warmup, steps = (1, 2) if smoke else (3, 6)
    res: dict = {
        "variant": spec.name,
        "params": spec.num_params(),
        "batch": B,
        "seq": S,
        "flops_per_token": spec.flops_per_token(S),
    }
    configs = [
        ("ours", "fp32_autocast"),
        ("mamba_ssm", "fp32_autocast"),
        ("ours", "bf16"),
        ("mamba_ssm", "bf16"),
        ("ours", "bf16_fp32_master"),
        ("ours", "fsdp2_mp"),
    ]
    if only:
        wanted = only.split(",")
        unknown = set(wanted) - {f"{i}_{m}" for i, m in configs}
        if unknown:
            raise ValueError(
                f"--train_configs: unknown {sorted(unknown)}; choose from {[f'{i}_{m}' for i, m in configs]}"
            )
        configs = [(i, m) for i, m in configs if f"{i}_{m}" in wanted]
    profiles: dict = {}
    for impl, mode in configs:
        tag = f"{impl}_{mode}"
        if impl == "mamba_ssm" and not mamba_ssm_available():
            res[tag] = "skipped: mamba_ssm not importable on this device"
            continue
        if budget.left() < (5 if smoke else 45):
            res[tag] = "skipped: out of time budget"
            continue
        try:
            torch.manual_seed(0)
            dtype = torch.bfloat16 if mode in ("bf16", "bf16_fp32_master") else None
            model = build_ours(spec, device, dtype) if impl == "ours" else ssm_model(spec.config, device, dtype)
            if mode == "fsdp2_mp":
                model = fsdp2_wrap(model, device)
            step = make_step(model, mode, device, spec.vocab_size, B, S)
            res[tag] = time_steps(step, device, warmup, steps, B * S)
            if profile:
                profiles[tag] = profile_step(step, device, OUT, tag)
                res[tag]["profile"] = {k: v for k, v in profiles[tag].items() if k != "_rows"}
            log(
                f"train {tag}: {res[tag] if not isinstance(res[tag], dict) else {k: v for k, v in res[tag].items() if k != 'profile'}}"
            )
        except Exception as e:  # one failing configuration must not hide the others' numbers
            res[tag] = f"failed: {type(e).__name__}: {e}"
            log(traceback.format_exc())
        finally:
            model = step = None
            free()
        save()
    for slow_tag, fast_tag in (
        ("ours_fp32_autocast", "ours_bf16"),
        ("mamba_ssm_fp32_autocast", "mamba_ssm_bf16"),
        ("ours_bf16_fp32_master", "ours_bf16"),
        ("ours_fsdp2_mp", "ours_bf16"),
    ):
        slow, fast = profiles.get(slow_tag), profiles.get(fast_tag)
        if slow and fast:
            res[f"gap_{slow_tag}"] = gap_report(slow_tag, slow, fast)
    a, b = res.get("ours_fp32_autocast"), res.get("mamba_ssm_fp32_autocast")
    if isinstance(a, dict) and isinstance(b, dict):
        res["ours_vs_mamba_ssm_fp32_autocast"] = round(a["tokens_per_s"] / b["tokens_per_s"], 3)
    return res


# ---- part: one hybrid attention block vs one Mamba-2 block -------------------------------------


def part_attn(device, smoke: bool) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from avengers.models.mamba import Mamba2Mixer, MambaBlock

    spec = get_model_spec("hybrid_tiny" if smoke else "mamba_1.5b")
    cfg = spec.config
    B, S = (2, 64) if smoke else (4, 4096)
    kernels = mamba_kernels.select_kernels(device, cfg.kernels)
    backends = {
        "default": None,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }
    res: dict = {"variant": spec.name, "batch": B, "seq": S}
    idx = cfg.attn_layer_idx[0]
    for kind, layer_idx in (("mamba", idx + 1), ("attention", idx)):
        torch.manual_seed(0)
        block = MambaBlock(cfg, layer_idx).to(device)
        if isinstance(block.mixer, Mamba2Mixer):
            block.mixer.init_ssm_parameters()
        block.to(torch.bfloat16)
        x = torch.randn(B, S, cfg.d_model, device=device, dtype=torch.bfloat16, requires_grad=True)

        def step():
            hidden, residual = block(x, None, kernels=kernels)
            (hidden.float().square().mean() + residual.float().mean()).backward()

        for name, backend in backends.items() if kind == "attention" else [("default", None)]:
            try:
                free()
                base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
                with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
                    step()
                    sync(device)
                    t0 = time.perf_counter()
                    step()
                    sync(device)
                    ms = (time.perf_counter() - t0) * 1e3
                    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if device.type == "cuda" else None
                    prof = profile_step(step, device, OUT, f"attn_{kind}_{name}")
                attn_kernels = [r["name"][:120] for r in prof["_rows"] if r["class"] == "attention"][:4]
                res[f"{kind}_{name}"] = {
                    "fwd_bwd_ms": round(ms, 2),
                    "peak_gib_above_inputs": peak,
                    "attention_kernels": attn_kernels,
                }
            except Exception as e:  # a backend that does not support the shape says so
                res[f"{kind}_{name}"] = f"failed: {type(e).__name__}: {str(e)[:300]}"
            log(f"attn {kind}_{name}: {res[f'{kind}_{name}']}")
        block = x = None
        free()
    return res


# ---- part 3: torch.compile per block ---------------------------------------------------------


def explain_block(block, d_model: int, device, dtype, ours: bool) -> dict:
    torch._dynamo.reset()
    h = torch.randn(1, 256, d_model, device=device, dtype=dtype)
    # ours: pass the kernels in, as MambaLM.forward does, so the trace sees what training runs
    args = (h, None, None, None, mamba_kernels.select_kernels(device)) if ours else (h, None)
    ex = torch._dynamo.explain(block)(*args)
    reasons = []
    for r in ex.break_reasons[:6]:
        where = r.user_stack[-1] if getattr(r, "user_stack", None) else None
        reasons.append(f"{r.reason} @ {where.filename.split('/')[-1]}:{where.lineno}" if where else str(r.reason))
    return {
        "graphs": ex.graph_count,
        "graph_breaks": ex.graph_break_count,
        "ops": ex.op_count,
        "first_break_reasons": reasons,
    }


def part_compile(device, smoke: bool, budget: Budget) -> dict:
    spec = get_model_spec("mamba2_tiny" if smoke else "mamba2_1.3b")
    B, S = (2, 64) if smoke else (4, 4096)
    warmup, steps = (2, 2) if smoke else (2, 5)
    backend = "eager" if smoke else "inductor"  # CPU smoke: dynamo wiring only, no C++ compile
    res: dict = {"backend": backend, "batch": B, "seq": S}
    have_ssm = mamba_ssm_available()
    # (impl, how, compile mode of our mamba_ssm ops, params): most telling first, as the budget may cut the tail
    configs = [("ours", "eager", None, "bf16"), ("ours", "compiled", "custom_op", "bf16")]
    if have_ssm:
        configs += [("mamba_ssm", "compiled", None, "bf16")]
    configs += [
        ("ours", "compiled", "opaque", "bf16"),
        ("ours", "compiled", "traced", "bf16"),
        ("ours", "compiled", "custom_op", "fp32_autocast"),
    ]
    if have_ssm:
        configs += [("mamba_ssm", "eager", None, "bf16")]
    default_mode = mamba_kernels.COMPILE_MODE
    for impl, how, cmode, mode in configs:
        tag = f"{impl}_{how}" + (f"_{cmode}" if cmode else "") + ("" if mode == "bf16" else f"_{mode}")
        if budget.left() < (5 if smoke else 60):
            res[tag] = "skipped: out of time budget"
            continue
        try:
            torch._dynamo.reset()
            mamba_kernels.COMPILE_MODE = cmode or default_mode
            torch.manual_seed(0)
            dtype = torch.bfloat16 if mode == "bf16" else None
            model = build_ours(spec, device, dtype) if impl == "ours" else ssm_model(spec.config, device, dtype)
            if how == "compiled" and mode == "bf16":
                try:
                    res[f"{tag}_explain"] = explain_block(
                        model.backbone.layers[0], spec.config.d_model, device, torch.bfloat16, impl == "ours"
                    )
                except Exception as e:  # the timing below is still worth having
                    res[f"{tag}_explain"] = f"failed: {type(e).__name__}: {e}"
                torch._dynamo.reset()
                for block in model.backbone.layers:
                    block.compile(backend=backend)
            step = make_step(model, mode, device, spec.vocab_size, B, S)
            res[tag] = time_steps(step, device, warmup, steps, B * S)
            log(f"compile {tag}: {res[tag]} {res.get(f'{tag}_explain', '')}")
        except Exception as e:
            res[tag] = f"failed: {type(e).__name__}: {e}"
            log(traceback.format_exc())
        finally:
            model = step = None
            mamba_kernels.COMPILE_MODE = default_mode
            free()
        save()
    return res


def main() -> None:
    global OUT
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    p.add_argument("--parts", default="check,train,compile")
    p.add_argument("--budget_s", type=float, default=330.0, help="skip what would not fit (default 5.5 min)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: exercise every code path quickly")
    p.add_argument("--no_profile", action="store_true")
    p.add_argument(
        "--batch", type=int, default=None, help="train part: sequences per step (default 4; 2 fits an 80 GB GPU)"
    )
    p.add_argument(
        "--train_configs",
        default=None,
        help="train part: comma-separated subset, e.g. ours_bf16,ours_fsdp2_mp (default: all six)",
    )
    p.add_argument(
        "--expandable_segments",
        action="store_true",
        help="PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (compare alloc_retries with and without)",
    )
    args = p.parse_args()
    if args.expandable_segments:  # read when the CUDA allocator starts, i.e. at the first CUDA call below
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    parts = args.parts.split(",")
    unknown = set(parts) - {"check", "train", "attn", "compile"}
    if unknown:
        p.error(f"--parts: unknown {sorted(unknown)}; choose from check,train,attn,compile")
    if not args.smoke and not torch.cuda.is_available():
        p.error("no CUDA device: run with --smoke on CPU")
    OUT = Path(args.out)
    OUT.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu" if args.smoke else "cuda")
    budget = Budget(args.budget_s)
    RESULTS.update(
        torch=torch.__version__,
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        mamba_ssm=mamba_ssm_available(),
        smoke=args.smoke,
        alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    )
    if mamba_ssm_available():
        import mamba_ssm

        RESULTS["mamba_ssm_version"] = mamba_ssm.__version__
    for part, fn in (
        ("check", lambda: part_check(device, args.smoke)),
        ("train", lambda: part_train(device, args.smoke, budget, not args.no_profile, args.batch, args.train_configs)),
        ("attn", lambda: part_attn(device, args.smoke)),
        ("compile", lambda: part_compile(device, args.smoke, budget)),
    ):
        if part not in parts:
            continue
        t0 = time.perf_counter()
        try:
            RESULTS[part] = fn()
        except Exception as e:
            RESULTS[part] = f"failed: {type(e).__name__}: {e}"
            log(traceback.format_exc())
        log(f"== {part} ({time.perf_counter() - t0:.0f} s): {json.dumps(RESULTS[part], default=str)[:3000]}")
        save()
    log(f"done in {time.perf_counter() - budget.t0:.0f} s; results in {OUT / 'results.json'}")


if __name__ == "__main__":
    main()
