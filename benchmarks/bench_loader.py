"""Loader throughput per rank (issue 2, point 6; target >= 1M tokens/s per rank with one worker).

    python benchmarks/bench_loader.py [--tokens 20000000] [--seconds 10] [--out bench_out]

Writes a synthetic corpus (two datasets, log-normal document lengths around 1k tokens, Llama-3-sized
ids) to a temp folder, then times `build_dataloader` at seq_length 4096, batch 2 (the fms-fsdp
setting) for num_workers 0/1/2 and shuffle buffer off/on. Prints a table and writes loader.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import types
from pathlib import Path

import numpy as np

from avengers.data import shards
from avengers.data.loader import build_dataloader, validate_data_config


def write_corpus(root: Path, tokens: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for name in ("web", "books"):
        per_file = tokens // 2 // 8
        rows = {}
        for f in range(8):
            lens = np.clip(rng.lognormal(6.5, 1.0, size=per_file // 600 + 1).astype(np.int64), 16, 32_768)
            lens = lens[: np.searchsorted(np.cumsum(lens), per_file) + 1]
            ids = rng.integers(0, 128_256, size=int(lens.sum()), dtype=np.uint32)
            docs = np.split(ids, np.cumsum(lens)[:-1])
            rows[f"part-{f:05d}.arrow"] = shards.write_shard(root / name / f"part-{f:05d}.arrow", docs)
        shards.update_meta(root, name, rows)


def measure(cfg, seconds: float) -> dict:
    t0 = time.perf_counter()
    it = iter(build_dataloader(cfg, 0, 1))
    x, _ = next(it)
    first = time.perf_counter() - t0
    n = 0
    t1 = time.perf_counter()
    while time.perf_counter() - t1 < seconds:
        x, y = next(it)
        n += x.numel()
    dt = time.perf_counter() - t1
    return {
        "num_workers": cfg.num_workers,
        "shuffle_buffer": cfg.shuffle_buffer,
        "first_batch_s": round(first, 3),
        "tokens_per_s": round(n / dt),
        "batches": n // x.numel(),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=20_000_000)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        write_corpus(root, a.tokens)
        print(f"corpus: {a.tokens / 1e6:.0f}M tokens written in {time.perf_counter() - t:.1f} s")
        base = dict(
            data_path=str(root),
            file_type="arrow",
            col_name="tokens",
            tokenizer_path=None,
            datasets="web,books",
            weights="3,1",
            seq_length=4096,
            vocab_size=128_256,
            bos_token=None,
            eos_token=128_000,
            bol_token=None,
            eol_token=None,
            strip_tokens="",
            logical_shards=64,
            seed=2023,
            batch_size=2,
            min_doc_length=3,
        )
        results = []
        for nw in (int(w) for w in a.workers.split(",")):
            for buf in (0, 1000):
                cfg = types.SimpleNamespace(**base, num_workers=nw, shuffle_buffer=buf)
                validate_data_config(cfg, 1, 128_256)
                r = measure(cfg, a.seconds)
                results.append(r)
                print(
                    f"num_workers={nw} shuffle_buffer={buf:5d}: {r['tokens_per_s'] / 1e6:6.2f} M tokens/s per rank "
                    f"(first batch {r['first_batch_s']:.2f} s)"
                )
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "loader.json"), "w") as f:
        json.dump({"seq_length": 4096, "batch_size": 2, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
