"""A small arrow corpus whose every token id is unique, so a token tells which document it came from."""

from __future__ import annotations

import numpy as np

from avengers.data import shards

FIRST_ID = 10  # ids below are free for bos/eos


def write_corpus(root, files: dict[str, list[int]], lengths: tuple[int, int] = (5, 60), seed: int = 0) -> dict:
    """files: dataset -> documents per file. Returns {(dataset, file key, index in file): tokens}."""
    rng = np.random.default_rng(seed)
    next_id = FIRST_ID
    docs = {}
    for name, per_file in files.items():
        rows = {}
        for f, n in enumerate(per_file):
            file_docs = []
            for i in range(n):
                k = int(rng.integers(*lengths))
                file_docs.append(np.arange(next_id, next_id + k, dtype=np.uint32))
                next_id += k
                docs[(name, f"/{name}/sub/part-{f:03d}.arrow", i)] = file_docs[-1]
            rel = f"sub/part-{f:03d}.arrow"
            rows[rel] = shards.write_shard(root / name / rel, file_docs)
        shards.update_meta(root, name, rows)
    return docs
