"""Data config parsing, dataset discovery and logical-shard partitioning (used by the loader).

Shard boundaries depend only on the data and `logical_shards`, never on the world size, which is
what lets a run change its number of ranks and workers (avengers/data/loader.py).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from avengers.data import shards

FILE_TYPES = ("arrow", "hf_parquet", "auto")


def csv_list(v: Any) -> list[str]:
    if v is None:
        return []
    if isinstance(v, (list, tuple)):
        return [str(x).strip() for x in v if str(x).strip()]
    return [t.strip() for t in str(v).split(",") if t.strip()]


@dataclass
class DataSpec:
    data_path: str
    datasets: list[str]
    weights: list[float]
    file_type: str
    col_name: str
    tokenizer_path: str | None
    seq_length: int
    batch_size: int
    bos: int | None
    eos: int | None
    bol: int | None
    eol: int | None
    strip: frozenset
    logical_shards: int
    num_workers: int
    seed: int
    shuffle_buffer: int
    min_doc_length: int
    eval_fraction: float = 0.0  # share of documents held out for evaluation (avengers/data/heldout.py)

    @property
    def content_len(self) -> int:
        return self.seq_length + 1 - (self.bol is not None) - (self.eol is not None)


def parse_spec(cfg: Any) -> DataSpec:
    """Read the fms-fsdp data fields of any config object (CSV strings or lists)."""
    data_path = getattr(cfg, "data_path", None)
    if not data_path or not os.path.isdir(data_path):
        raise ValueError(
            f"data_path={data_path!r}: no such folder; expected the folder that holds the dataset "
            f"sub-folders and meta/ (make one with `python -m avengers.data.prepare`)"
        )
    names = csv_list(getattr(cfg, "datasets", None))
    if not names:
        names = sorted(p.name for p in Path(data_path).iterdir() if p.is_dir() and "meta" not in p.name)
        if not names:
            raise ValueError(f"datasets=None and data_path={data_path!r} has no dataset sub-folders")
    raw_w = csv_list(getattr(cfg, "weights", None))
    if not raw_w:
        raw_w = ["1"] * len(names)
    if len(raw_w) != len(names):
        raise ValueError(
            f"weights={getattr(cfg, 'weights', None)!r} has {len(raw_w)} values but datasets names "
            f"{len(names)} ({', '.join(names)}): give one weight per dataset"
        )
    try:
        weights = [float(w) for w in raw_w]
    except ValueError:
        raise ValueError(f"weights={getattr(cfg, 'weights', None)!r}: expected numbers >= 0") from None
    if any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
        raise ValueError(
            f"weights={getattr(cfg, 'weights', None)!r}: expected finite numbers >= 0 with at least one > 0"
        )
    file_type = getattr(cfg, "file_type", "auto") or "auto"
    if file_type not in FILE_TYPES:
        raise ValueError(f"file_type={file_type!r}: expected one of {', '.join(FILE_TYPES)}")

    def tok(name: str) -> int | None:
        v = getattr(cfg, name, None)
        return None if v is None or v == "None" else int(v)

    strip = {int(t) for t in csv_list(getattr(cfg, "strip_tokens", ""))}
    special = {t for t in (tok("bos_token"), tok("eos_token"), tok("bol_token"), tok("eol_token")) if t is not None}
    spec = DataSpec(
        data_path=str(data_path),
        datasets=names,
        weights=weights,
        file_type=file_type,
        col_name=getattr(cfg, "col_name", None) or shards.DEFAULT_COLUMN,
        tokenizer_path=getattr(cfg, "tokenizer_path", None),
        seq_length=int(cfg.seq_length),
        batch_size=int(cfg.batch_size),
        bos=tok("bos_token"),
        eos=tok("eos_token"),
        bol=tok("bol_token"),
        eol=tok("eol_token"),
        strip=frozenset(strip | special),
        logical_shards=int(cfg.logical_shards),
        num_workers=int(getattr(cfg, "num_workers", 0) or 0),
        seed=int(getattr(cfg, "seed", 0)),
        shuffle_buffer=int(getattr(cfg, "shuffle_buffer", 0) or 0),
        min_doc_length=int(
            getattr(cfg, "min_doc_length", 3) if getattr(cfg, "min_doc_length", None) is not None else 3
        ),
        eval_fraction=float(getattr(cfg, "eval_fraction", 0.0) or 0.0),
    )
    if not 0 <= spec.eval_fraction < 1:
        raise ValueError(f"eval_fraction={spec.eval_fraction}: expected a number in [0, 1) (0 = no eval split)")
    for name, low in (
        ("seq_length", 1),
        ("batch_size", 1),
        ("logical_shards", 1),
        ("num_workers", 0),
        ("shuffle_buffer", 0),
        ("min_doc_length", 0),
    ):
        if getattr(spec, name) < low:
            raise ValueError(f"{name}={getattr(spec, name)}: expected an integer >= {low}")
    if spec.content_len < 1:
        raise ValueError(f"seq_length={spec.seq_length}: too short to hold bol/eol plus one token")
    return spec


@dataclass
class DatasetIndex:
    """One dataset's files, document offsets and logical-shard boundaries (global document ids)."""

    name: str
    files: list[str]
    kinds: list[str]  # "arrow" | "parquet"
    doc_start: np.ndarray  # [F + 1]
    bounds: np.ndarray  # [L + 1]
    max_token_ids: list[int | None] = field(default_factory=list)

    @property
    def num_docs(self) -> int:
        return int(self.doc_start[-1])

    def locate(self, g: int) -> tuple[int, int]:
        f = int(np.searchsorted(self.doc_start, g, side="right")) - 1
        return f, g - int(self.doc_start[f])


def _list_files(spec: DataSpec, name: str) -> tuple[list[str], list[str]]:
    root = Path(spec.data_path) / name
    if not root.is_dir():
        raise ValueError(
            f"dataset {name!r}: folder {root} does not exist (datasets are sub-folders of "
            f"data_path={spec.data_path!r}; present: "
            f"{', '.join(sorted(p.name for p in Path(spec.data_path).iterdir() if p.is_dir()))})"
        )
    files, kinds = [], []
    for p in sorted(str(q) for q in root.rglob("*") if q.is_file() or q.is_symlink()):
        base = os.path.basename(p)
        if base.endswith(".tmp"):
            continue
        if "arrow" in base and spec.file_type in ("arrow", "auto"):
            files.append(p)
            kinds.append("arrow")
        elif "parquet" in base and spec.file_type in ("hf_parquet", "auto"):
            files.append(p)
            kinds.append("parquet")
    return files, kinds


def partition(docs: np.ndarray, sizes: np.ndarray, logical_shards: int) -> np.ndarray:
    """Shard boundaries over global document ids so each shard holds ~equal size (tokens or bytes)."""
    doc_start = np.concatenate([[0], np.cumsum(docs)]).astype(np.int64)
    wcum = np.concatenate([[0.0], np.cumsum(sizes.astype(np.float64))])
    x = np.arange(logical_shards + 1) * (wcum[-1] / logical_shards)
    f = np.clip(np.searchsorted(wcum, x, side="right") - 1, 0, len(docs) - 1)
    frac = np.where(sizes[f] > 0, (x - wcum[f]) / np.maximum(sizes[f], 1e-30), 0.0)
    b = doc_start[f] + np.floor(np.clip(frac, 0, 1) * docs[f] + 0.5).astype(np.int64)
    b[0], b[-1] = 0, doc_start[-1]
    return np.maximum.accumulate(b)


def index_dataset(spec: DataSpec, name: str, meta: dict[str, shards.FileMeta], open_all: bool) -> DatasetIndex:
    """Files and counts of one dataset; with open_all every file is opened (corruption check)."""
    files, kinds = _list_files(spec, name)
    if not files:
        raise ValueError(
            f"dataset {name!r}: no {'arrow/parquet' if spec.file_type == 'auto' else spec.file_type} "
            f"files under {Path(spec.data_path) / name} (file_type={spec.file_type!r})"
        )
    docs, tokens, sizes, max_ids = [], [], [], []
    for path, kind in zip(files, kinds):
        m = meta.get(shards.meta_key(spec.data_path, path))
        n = None
        if open_all or m is None:
            n = _count_docs(path, kind, spec.col_name)
            if m is not None and m.documents != n:
                raise ValueError(
                    f"{path}: holds {n} documents but meta/combined_counts.csv says {m.documents} "
                    f"(truncated or replaced file; re-run prepare for dataset {name!r})"
                )
        docs.append(m.documents if m is not None else n)
        tokens.append(m.tokens if m is not None else None)
        sizes.append(os.path.getsize(path))
        max_ids.append(m.max_token_id if m is not None else None)
    docs_a = np.asarray(docs, dtype=np.int64)
    if docs_a.sum() == 0:
        raise ValueError(
            f"dataset {name!r}: its {len(files)} files under {Path(spec.data_path) / name} hold no documents"
        )
    if all(t is not None for t in tokens) and sum(tokens) == 0:
        raise ValueError(
            f"dataset {name!r}: its {docs_a.sum()} documents under {Path(spec.data_path) / name} are all empty "
            f"(0 tokens in meta/combined_counts.csv); re-prepare it, or give it weight 0 or leave it out of datasets"
        )
    weight = np.asarray(tokens if all(t is not None for t in tokens) else sizes, dtype=np.float64)
    return DatasetIndex(
        name,
        files,
        kinds,
        np.concatenate([[0], np.cumsum(docs_a)]),
        partition(docs_a, weight, spec.logical_shards),
        max_ids,
    )


def _count_docs(path: str, kind: str, col_name: str) -> int:
    if kind == "arrow":
        return shards.ShardReader(path, col_name).num_docs
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise ValueError(f"corrupt or truncated parquet file {path}: {e}") from None


@dataclass
class Plan:
    spec: DataSpec
    indexes: list[DatasetIndex]
    epochs: int | None = None  # None = endless; k = stop after k passes (tests, evaluation)
    vocab_size: int | None = None  # documents with an id >= this are reported with file and index


def make_plan(cfg: Any, epochs: int | None = None, open_all: bool = False, vocab_size: int | None = None) -> Plan:
    spec = parse_spec(cfg)
    meta = shards.read_meta(spec.data_path)
    return Plan(spec, [index_dataset(spec, n, meta, open_all) for n in spec.datasets], epochs, vocab_size)


def check_coverage(plan: Plan, world_size: int) -> None:
    spec = plan.spec
    loaders = world_size * max(spec.num_workers, 1)
    per = spec.logical_shards // loaders
    for ix, w in zip(plan.indexes, spec.weights):
        if w == 0:
            continue
        owned = ix.bounds[per::per] - ix.bounds[:-1:per] if per else np.array([])
        if len(owned) and owned.min() == 0:
            raise ValueError(
                f"dataset {ix.name!r} has {ix.num_docs} documents: too few for {loaders} loader workers "
                f"(world_size x max(num_workers,1)) to each own one; use fewer workers or more data"
            )


def tokenizer_for(spec: DataSpec):
    if not spec.tokenizer_path:
        raise ValueError(
            "file_type includes parquet files but tokenizer_path=None: set tokenizer_path to a "
            "folder with tokenizer.json (parquet text is tokenized on the fly)"
        )
    from avengers.data.prepare import load_tokenizer

    return load_tokenizer(spec.tokenizer_path)
