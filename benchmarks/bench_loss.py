"""The training loss alone, forward + backward: ops/loss.py's chunked linear + cross-entropy at several
chunk sizes against cross-entropy over the full logits (torch.compile'd on CUDA, and eager).

    python benchmarks/bench_loss.py                       # llama3_1.8b_4k at batch 2 x 4096, on the GPU
    python benchmarks/bench_loss.py --tokens 64 --dim 32 --vocab 128 --reps 2   # CPU smoke

Prints ms per forward + backward and the peak memory above the inputs, and writes <out>/bench_loss.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from avengers.ops.loss import DEFAULT_CHUNK_TOKENS, linear_cross_entropy  # noqa: E402


def full_logits_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(hidden, weight).float(), labels)


def time_loss(fn, hidden, weight, labels, reps: int) -> dict:
    """ms per forward + backward (after 3 untimed calls), peak GiB allocated above the inputs, and the
    loss value (every path must agree)."""
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    cuda = h.is_cuda
    for _ in range(3):
        fn(h, w, labels).backward()
    h.grad = w.grad = None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    t0 = time.perf_counter()
    for _ in range(reps):
        fn(h, w, labels).backward()
    if cuda:
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / reps * 1e3
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else None
    with torch.no_grad():
        loss = float(fn(hidden, weight, labels))
    return {"ms": ms, "extra_peak_gib": peak, "loss": loss}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2 * 4096, help="batch x sequence length")
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument(
        "--chunk_tokens", default="2048,4096,8192", help=f"comma-separated (the default: {DEFAULT_CHUNK_TOKENS})"
    )
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    args = p.parse_args()
    chunks = [int(c) for c in args.chunk_tokens.split(",") if c]
    if min([args.tokens, args.dim, args.vocab, args.reps, *chunks]) < 1:
        raise SystemExit("--tokens, --dim, --vocab, --reps and every --chunk_tokens must be >= 1")
    name = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise SystemExit(f"--device={args.device!r}: expected auto, cpu or cuda")
    device = torch.device(name)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.backends.cuda.matmul.allow_tf32 = True
    gen = torch.Generator(device).manual_seed(0)
    hidden = torch.randn(args.tokens, args.dim, device=device, dtype=dtype, generator=gen)
    weight = 0.02 * torch.randn(args.vocab, args.dim, device=device, dtype=dtype, generator=gen)
    labels = torch.randint(0, args.vocab, (args.tokens,), device=device, generator=gen)

    paths = {f"chunked {c}": functools.partial(linear_cross_entropy, chunk_tokens=c) for c in chunks}
    if device.type == "cuda":  # inductor on CPU needs a C++ toolchain; the comparison that matters is on the GPU
        paths["full logits, compiled"] = torch.compile(full_logits_loss)
    paths["full logits, eager"] = full_logits_loss
    rows = {}
    for path, fn in paths.items():
        try:
            rows[path] = time_loss(fn, hidden, weight, labels, args.reps)
        except torch.OutOfMemoryError as e:
            rows[path] = {"error": f"out of memory: {str(e).splitlines()[0]}"}
            torch.cuda.empty_cache()
        r = rows[path]
        mem = f", {r['extra_peak_gib']:.2f} GiB above the inputs" if r.get("extra_peak_gib") is not None else ""
        print(f"{path:24s} {r['ms']:8.2f} ms{mem}" if "ms" in r else f"{path:24s} {r['error']}", flush=True)
    result = {
        "tokens": args.tokens,
        "dim": args.dim,
        "vocab": args.vocab,
        "dtype": str(dtype).removeprefix("torch."),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "paths": rows,
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_loss.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
