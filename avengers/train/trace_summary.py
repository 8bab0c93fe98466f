"""Is a profiled step bound by the GPU or by the host? Read from its Chrome trace.

Each GPU kernel (or copy, or memset) is matched to its launch, the CUDA runtime or driver call with the
same correlation id. A kernel that starts within `HOST_WAIT_US` of its launch found the GPU's queue
empty: the idle time before it was spent waiting for the host. Per launching thread (the main thread
runs the forward and the optimizer, autograd's thread the backward) this gives the kernels' time, the
GPU's idle time inside the thread's span, and how much of that idle time was waiting for the host.

    python -m avengers.train.trace_summary RUN/profile_traces/*.pt.trace.json
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import sys
from dataclasses import dataclass
from statistics import median

HOST_WAIT_US = 20.0
GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATS = ("cuda_runtime", "cuda_driver")


@dataclass(frozen=True)
class ThreadSummary:
    tid: int | str
    kernels: int
    span_ms: float
    kernel_ms: float
    idle_ms: float  # GPU idle just before this thread's kernels (the gap each of them ended)
    host_wait_ms: float  # the part of idle_ms that ended with a kernel launched < HOST_WAIT_US earlier
    median_delay_us: float  # launch end -> kernel start


@dataclass(frozen=True)
class StepSummary:
    steps: int
    step_ms: float  # host time per profiled step (ProfilerStep annotations); 0 when absent
    span_ms: float  # per step, from the first kernel's start to the last one's end
    idle_ms: float  # per step, time in the span with no GPU activity
    host_wait_ms: float  # per step, the part of idle_ms spent waiting for the host
    threads: tuple[ThreadSummary, ...]  # totals over the profiled steps

    def verdict(self) -> str:
        busy = 1 - self.idle_ms / max(self.span_ms, 1e-9)
        bound = "the host" if self.host_wait_ms > 0.1 * self.span_ms else "the GPU"
        return (
            f"GPU busy {busy:.0%} of {self.span_ms:.1f} ms a step ({self.idle_ms:.1f} ms idle, "
            f"{self.host_wait_ms:.1f} ms of it waiting for the host): {bound} sets the pace"
        )


def load(path: str) -> dict:
    with gzip.open(path, "rt") if path.endswith(".gz") else open(path) as f:
        return json.load(f)


def summarize(trace: dict) -> StepSummary | None:
    """None when the trace holds no GPU activity (a CPU run)."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    launches = {}
    for e in events:
        if e.get("cat") in LAUNCH_CATS and "correlation" in e.get("args", {}):
            launches[e["args"]["correlation"]] = e
    gpu = sorted((e for e in events if e.get("cat") in GPU_CATS), key=lambda e: e["ts"])
    if not gpu:
        return None
    steps = [e for e in events if e.get("cat") == "user_annotation" and e["name"].startswith("ProfilerStep")]
    n_steps = max(len(steps), 1)

    rows = []  # (kernel, idle before it, launch -> start delay or None, launching thread)
    busy_until = gpu[0]["ts"]
    for k in gpu:
        idle = max(0.0, k["ts"] - busy_until)
        launch = launches.get(k.get("args", {}).get("correlation"))
        delay = k["ts"] - (launch["ts"] + launch["dur"]) if launch else None
        rows.append((k, idle, delay, launch["tid"] if launch else "?"))
        busy_until = max(busy_until, k["ts"] + k["dur"])

    def waited(row) -> float:
        return row[1] if row[2] is not None and row[2] < HOST_WAIT_US else 0.0

    threads = []
    for tid in dict.fromkeys(r[3] for r in rows):
        mine = [r for r in rows if r[3] == tid]
        delays = [r[2] for r in mine if r[2] is not None]
        threads.append(
            ThreadSummary(
                tid=tid,
                kernels=len(mine),
                span_ms=(max(r[0]["ts"] + r[0]["dur"] for r in mine) - mine[0][0]["ts"]) / 1e3,
                kernel_ms=sum(r[0]["dur"] for r in mine) / 1e3,
                idle_ms=sum(r[1] for r in mine) / 1e3,
                host_wait_ms=sum(waited(r) for r in mine) / 1e3,
                median_delay_us=median(delays) if delays else float("nan"),
            )
        )
    return StepSummary(
        steps=len(steps),
        step_ms=sum(s["dur"] for s in steps) / 1e3 / n_steps,
        span_ms=(max(k["ts"] + k["dur"] for k in gpu) - gpu[0]["ts"]) / 1e3 / n_steps,
        idle_ms=sum(r[1] for r in rows) / 1e3 / n_steps,
        host_wait_ms=sum(waited(r) for r in rows) / 1e3 / n_steps,
        threads=tuple(threads),
    )


def format_summary(s: StepSummary) -> str:
    lines = [
        f"{s.steps} profiled step(s), host time {s.step_ms:.1f} ms per step",
        s.verdict(),
        "(the profiler slows the host: without it the host's share is smaller)",
        "by launching thread (totals over the profiled steps; the main thread runs forward and optimizer, "
        "autograd's thread the backward):",
    ]
    for t in sorted(s.threads, key=lambda t: -t.kernels):
        lines.append(
            f"  thread {t.tid}: {t.kernels} kernels over {t.span_ms:.1f} ms, kernels {t.kernel_ms:.1f} ms, "
            f"GPU idle {t.idle_ms:.1f} ms ({t.host_wait_ms:.1f} ms waiting for the host), "
            f"median launch -> start {t.median_delay_us:.0f} us"
        )
    return "\n".join(lines)


def write_for_newest_trace(folder: str, worker: str, out_path: str) -> StepSummary | None:
    """Summarise `worker`'s newest Chrome trace in `folder` into `out_path`; None (nothing written)
    without GPU activity."""
    traces = glob.glob(os.path.join(folder, f"{worker}.*.pt.trace.json*"))
    if not traces:
        return None
    summary = summarize(load(max(traces, key=os.path.getmtime)))
    if summary is not None:
        with open(out_path, "w") as f:
            f.write(format_summary(summary) + "\n")
    return summary


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    summary = summarize(load(argv[0]))
    print(format_summary(summary) if summary else f"{argv[0]}: no GPU kernels in this trace (a CPU run)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
