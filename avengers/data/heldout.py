"""The held-out evaluation split: documents picked by a hash of their identity, never trained on.

A document is held out when hash(file key, index in its file) < eval_fraction * 2^64. The file key
is the file's path under data_path (`/<dataset>/sub/part-00000.arrow`, as in meta/combined_counts.csv),
so the split depends on the data and `eval_fraction` only: not on the seed, the world size, loader
workers, logical shards, weights or which other datasets are mixed in. Every dataset contributes
about `eval_fraction` of its documents.

The training stream (avengers/data/stream.py) skips held-out documents; avengers/data/eval_split.py
reads them.
"""

from __future__ import annotations

import hashlib
import os

from avengers.data.index import Plan


def file_key(data_path: str, path: str) -> str:
    return "/" + os.path.relpath(path, data_path).replace(os.sep, "/")


def is_heldout(key: str, index: int, fraction: float) -> bool:
    """Whether document `index` of the file with key `key` belongs to the eval split."""
    if fraction <= 0:
        return False
    digest = hashlib.blake2b(f"{key}\0{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < fraction * 2.0**64


class HeldOut:
    """`heldout(d, g)`: is global document g of the plan's dataset d in the eval split?"""

    def __init__(self, plan: Plan):
        spec = plan.spec
        self.fraction = spec.eval_fraction
        self.indexes = plan.indexes
        self.keys = [[file_key(spec.data_path, p) for p in ix.files] for ix in plan.indexes]

    def __call__(self, d: int, g: int) -> bool:
        f, i = self.indexes[d].locate(g)
        return is_heldout(self.keys[d][f], i, self.fraction)
