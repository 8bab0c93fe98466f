"""The on-disk token format, read and written in one place (fms-fsdp layout, shared/specs/fms-fsdp.md §4).

    data_path/<dataset>/**/*.arrow     Arrow IPC *file* format, one record batch per document,
                                       one column (default `tokens`) of uint32 token ids
    data_path/meta/combined_counts.csv `dataset/filename,documents,tokens,size` with keys such as
                                       `/fineweb-edu/part-00000.arrow` (size in bytes)
    data_path/meta/token_stats.csv     `dataset/filename,max_token_id` (this project's addition, used by
                                       the loader's cheap vocabulary check; files without a row are
                                       scanned once at training start and recorded here)

Documents are stored without BOS/EOS: the loader adds the delimiters chosen in the training config.
"""

from __future__ import annotations

import csv
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

COUNTS_FILE = "combined_counts.csv"
STATS_FILE = "token_stats.csv"
COUNTS_HEADER = ("dataset/filename", "documents", "tokens", "size")
STATS_HEADER = ("dataset/filename", "max_token_id")
DEFAULT_COLUMN = "tokens"


def write_shard(path: str | os.PathLike, docs: Iterable[np.ndarray], col_name: str = DEFAULT_COLUMN) -> dict:
    """Write documents (1-D integer arrays) as one shard; atomic (temp file + rename).

    Returns {"documents", "tokens", "size", "max_token_id"} of the written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    schema = pa.schema([(col_name, pa.uint32())])
    n_docs = n_tok = 0
    max_id = -1
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for doc in docs:
            arr = np.asarray(doc)
            if arr.ndim != 1:
                raise ValueError(f"write_shard({path}): document {n_docs} has shape {arr.shape}, expected 1-D")
            if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(np.uint32).max):
                raise ValueError(f"write_shard({path}): document {n_docs} has ids outside uint32")
            arr = arr.astype(np.uint32, copy=False)
            writer.write_batch(pa.record_batch([pa.array(arr, type=pa.uint32())], schema=schema))
            n_docs += 1
            n_tok += arr.size
            if arr.size:
                max_id = max(max_id, int(arr.max()))
    os.replace(tmp, path)
    return {"documents": n_docs, "tokens": n_tok, "size": path.stat().st_size, "max_token_id": max_id}


class ShardReader:
    """Random access to the documents of one arrow shard through a memory map (zero copy)."""

    def __init__(self, path: str | os.PathLike, col_name: str = DEFAULT_COLUMN):
        self.path = str(path)
        try:
            self._reader = pa.ipc.open_file(pa.memory_map(self.path, "r"))
        except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
            raise ValueError(
                f"corrupt or truncated arrow shard {self.path}: {e} "
                "(expected an Arrow IPC file with one record batch per document; "
                "re-run `python -m avengers.data.prepare` for this dataset)"
            ) from None
        names = self._reader.schema.names
        candidates = [c.strip() for c in col_name.split(",") if c.strip()] or [DEFAULT_COLUMN]
        found = [c for c in candidates if c in names]
        if not found:
            raise ValueError(f"arrow shard {self.path} has columns {names}, none of col_name={col_name!r}")
        self.column = names.index(found[0])
        typ = self._reader.schema.field(self.column).type
        if not pa.types.is_integer(typ):
            raise ValueError(f"arrow shard {self.path}: column {found[0]!r} has type {typ}, expected uint32")

    @property
    def num_docs(self) -> int:
        return self._reader.num_record_batches

    def doc(self, i: int) -> np.ndarray:
        """Document i as a read-only numpy view (no copy for uint32 data)."""
        try:
            col = self._reader.get_batch(i).column(self.column)
            return col.to_numpy(zero_copy_only=col.null_count == 0)
        except pa.ArrowException as e:
            raise ValueError(
                f"{self.path}, document {i}: corrupt record batch ({e}); re-run `python -m avengers.data.prepare` "
                f"for this dataset"
            ) from None

    def max_token_id(self) -> int:
        """The largest id in the shard (-1 if it holds no tokens): every record batch read once, vectorised."""
        import pyarrow.compute as pc

        try:
            largest = pc.max(self._reader.read_all().column(self.column)).as_py()
        except pa.ArrowException as e:
            raise ValueError(f"{self.path}: corrupt record batches ({e}); re-run prepare for this dataset") from None
        return -1 if largest is None else int(largest)

    def doc_lengths(self) -> np.ndarray:
        return np.fromiter(
            (self._reader.get_batch(i).num_rows for i in range(self.num_docs)), dtype=np.int64, count=self.num_docs
        )


def shard_stats(path: str | os.PathLike, col_name: str = DEFAULT_COLUMN) -> dict:
    """Recount a finished shard (used when resuming a prepare run)."""
    r = ShardReader(path, col_name)
    n_tok, max_id = 0, -1
    for i in range(r.num_docs):
        d = r.doc(i)
        n_tok += d.size
        if d.size:
            max_id = max(max_id, int(d.max()))
    return {"documents": r.num_docs, "tokens": n_tok, "size": os.path.getsize(path), "max_token_id": max_id}


@dataclass
class FileMeta:
    documents: int
    tokens: int | None
    size: int
    max_token_id: int | None = None


def _read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_meta(data_path: str | os.PathLike) -> dict[str, FileMeta]:
    """Key `/dataset/relpath` -> FileMeta from every `meta/*counts*.csv` (plus token_stats.csv)."""
    meta_dir = Path(data_path) / "meta"
    out: dict[str, FileMeta] = {}
    for csv_path in sorted(meta_dir.glob("*counts*.csv")) if meta_dir.is_dir() else []:
        for row in _read_csv(csv_path):
            key = row.get("dataset/filename")
            if not key or row.get("documents") in (None, ""):
                raise ValueError(f"{csv_path}: expected header {','.join(COUNTS_HEADER)} (size optional)")
            tokens = row.get("tokens")
            size = row.get("size")
            out["/" + key.strip("/")] = FileMeta(
                int(row["documents"]), int(tokens) if tokens else None, int(size) if size else -1
            )
    for row in _read_csv(meta_dir / STATS_FILE):
        key = "/" + row["dataset/filename"].strip("/")
        if key in out and row.get("max_token_id") not in (None, ""):
            out[key].max_token_id = int(row["max_token_id"])
    return out


def meta_key(data_path: str | os.PathLike, path: str | os.PathLike) -> str:
    """The `/dataset/relpath` key of a shard file in the meta CSVs."""
    rel = os.path.relpath(os.path.abspath(path), Path(data_path).resolve())
    return "/" + rel.replace(os.sep, "/")


def record_max_token_ids(data_path: str | os.PathLike, max_ids: dict[str, int]) -> None:
    """Add or replace rows of meta/token_stats.csv (keys from meta_key); an atomic replace, safe to
    run from several processes at once (the last writer wins and all write the same values)."""
    path = Path(data_path) / "meta" / STATS_FILE
    rows = {"/" + r[STATS_HEADER[0]].strip("/"): r.get("max_token_id", "") for r in _read_csv(path)}
    rows.update({key: str(v) for key, v in max_ids.items()})
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=STATS_FILE + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(STATS_HEADER)
            w.writerows(sorted(rows.items()))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def update_meta(data_path: str | os.PathLike, dataset: str, rows: dict[str, dict]) -> None:
    """Replace this dataset's rows in meta/combined_counts.csv and meta/token_stats.csv (atomic writes).

    rows: relpath within the dataset -> stats from write_shard/shard_stats.
    """
    meta_dir = Path(data_path) / "meta"
    meta_dir.mkdir(parents=True, exist_ok=True)
    prefix = "/" + dataset.strip("/") + "/"
    new = {prefix + rel: st for rel, st in sorted(rows.items())}
    for name, header, fields in (
        (COUNTS_FILE, COUNTS_HEADER, ("documents", "tokens", "size")),
        (STATS_FILE, STATS_HEADER, ("max_token_id",)),
    ):
        path = meta_dir / name
        kept = [r for r in _read_csv(path) if not ("/" + r[header[0]].strip("/")).startswith(prefix)]
        tmp = path.with_name(name + ".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            for r in kept:
                w.writerow([r.get(h, "") for h in header])
            for key, st in new.items():
                w.writerow([key] + [st[k] for k in fields])
        os.replace(tmp, path)
