"""One profiled training step, summarised by kernel class (shared by the GPU benchmarks)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path

import torch

KERNEL_CLASSES = [  # first match wins
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("ssd (triton)", r"chunk_scan|chunk_state|state_passing|bmm_chunk|chunk_cumsum|ssd|selective"),
    ("attention", r"flash|fmha|sdpa|attention|triton_tem_fused_flex|triton_tem_fused_.*(bwd|fwd)"),
    ("inductor template", r"triton_tem_"),
    ("inductor reduction", r"triton_red_|triton_per_"),
    ("inductor pointwise", r"triton_poi_"),
    ("norm (triton)", r"layer_norm|layernorm|rms|_norm_"),
    ("gemm", r"gemm|cutlass|xmma|nvjet|matmul|cublas|sm90_|sm80_"),
    ("conv", r"conv|cudnn|depthwise|winograd|implicit"),
    ("softmax / loss", r"softmax|cross_entropy|nll"),
    ("embedding / index", r"embedding|index_select|indexing|index_put|scatter|gather"),
    ("cast / copy", r"copy|cast|convert|to_copy|fill|catarray"),
    ("reduce", r"reduce"),
    ("elementwise", r"elementwise|vectorized|unrolled|pointwise|triton_"),
]


def classify(name: str) -> str:
    low = name.lower()
    for cls, pattern in KERNEL_CLASSES:
        if re.search(pattern, low):
            return cls
    return "other"


def kernel_table(prof, device: torch.device) -> list[dict]:
    """Per-kernel self time (CUDA kernels on GPU, ops on CPU), largest first."""
    rows = []
    for e in prof.key_averages():
        if device.type == "cuda":
            if e.device_type != torch.autograd.DeviceType.CUDA:
                continue
            t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        else:
            t = e.self_cpu_time_total
        if t > 0:
            rows.append({"name": e.key, "class": classify(e.key), "ms": t / 1e3, "calls": e.count})
    return sorted(rows, key=lambda r: -r["ms"])


def profile_step(step: Callable[[], object], device: torch.device, out_dir: Path, tag: str) -> dict:
    """Profile one call of `step`; write profile_<tag>.{json,txt} under out_dir; return the summary
    (wall ms, kernel ms, launches, ms by class) with the full rows under "_rows"."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    wall = (time.perf_counter() - t0) * 1e3
    rows = kernel_table(prof, device)
    by_class: dict[str, float] = {}
    for r in rows:
        by_class[r["class"]] = by_class.get(r["class"], 0.0) + r["ms"]
    total = sum(r["ms"] for r in rows)
    summary = {
        "profiled_step_wall_ms": round(wall, 1),
        "kernel_ms": round(total, 1),
        "kernel_launches": sum(r["calls"] for r in rows),
        "by_class_ms": {k: round(v, 1) for k, v in sorted(by_class.items(), key=lambda kv: -kv[1])},
    }
    (out_dir / f"profile_{tag}.json").write_text(json.dumps({"summary": summary, "kernels": rows[:60]}, indent=1))
    lines = [
        f"{tag}: profiled step {wall:.1f} ms wall, {total:.1f} ms in kernels, {summary['kernel_launches']} launches",
        "time by class (ms): " + json.dumps(summary["by_class_ms"]),
        "",
    ]
    lines += [f"{r['ms']:9.2f} ms {r['calls']:6d}x  [{r['class']}] {r['name'][:150]}" for r in rows[:40]]
    (out_dir / f"profile_{tag}.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:25]), flush=True)
    summary["_rows"] = rows
    return summary
