"""Weighted, packed, stateful and rescalable streaming over token shards (fms-fsdp semantics, §4).

    loader = build_dataloader(cfg, rank, world_size)       # after validate_data_config(cfg, world, vocab)
    for inputs, labels in loader: ...                      # LongTensors [batch_size, seq_length]
    sd = loader.state_dict()                               # this rank's position (plain dict)
    loader.load_state_dict(sd)                             # same world and workers: exact resume
    loader.load_state_dict([sd_rank0, sd_rank1, ...])      # every rank's state: any new world/workers

Pipeline (one copy per loader worker; world W' = world_size x max(num_workers, 1) loader workers):
1. Each dataset's documents (files in sorted path order, documents in file order) are cut into
   `logical_shards` contiguous ranges holding about equal *tokens* (from meta/combined_counts.csv;
   file bytes when a file has no row there), so partitioning is fair to sizes and independent of
   the world. Global loader worker g = rank * max(num_workers,1) + worker owns shards
   [g*L/W', (g+1)*L/W').
2. Within a shard, documents are visited in a full-period LCG order (no index lists); the LCG's
   increment and start depend on (seed, dataset, shard, epoch). The next shard is drawn with
   probability proportional to its unvisited documents. A shard's state is one row:
   (shard, epoch, lcg_state, visited, current_doc, offset_in_current_doc).
3. Datasets are mixed greedily on realised tokens: the next document comes from the dataset whose
   share of tokens most trails its weight. A whole document is taken before switching.
4. Documents: a leading/trailing token in {bos, eos, bol, eol, strip_tokens} is removed, documents
   with len + 1 (+1 with bos) < min_doc_length are skipped, then [bos] + doc + [eos] is packed into
   lines of seq_length + 1 tokens, each line [bol] + content + [eol] when those are set.
5. In the main process, an optional shuffle buffer of `shuffle_buffer` lines; then batches
   (inputs = line[:-1], labels = line[1:]). label[0] is NOT masked (fms-fsdp masked it with -100,
   losing one target per line); nothing is ever -100 except padding in finite (`epochs=`) mode.

State: each worker sends, with every block of lines, its state after that block; the main process
keeps the last state it *received* from each worker plus the lines it has received but not yet
handed out, so `state_dict()` describes exactly what the consumer got, for any num_workers.
Rescaling (`load_state_dict(list_of_all_rank_states)` with another world size or num_workers):
shard rows (which carry the document in progress and its offset) are regrouped by the new
ownership, realised token counts are summed and split evenly, and lines received but not yet handed
out are dealt out round-robin to the new ranks, so within the epoch no document is repeated or
skipped and no token already read is lost. Worker states are taken only between lines, so there is
never a partial line to carry over.

Trainer contract: each rank saves `loader.state_dict()` under a rank-specific key (DCP dedups
identical keys across ranks) or file; on resume every rank loads ALL saved ranks' states and calls
`loader.load_state_dict(list_in_rank_order)`. A single dict is accepted only when world size and
num_workers are unchanged.
"""

from __future__ import annotations

import collections
import math
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from avengers.data import shards

STATE_VERSION = 1
FILE_TYPES = ("arrow", "hf_parquet", "auto")
_M64 = (1 << 64) - 1
_COLS = 6  # shard row: shard, epoch, lcg_state, visited, current_doc (-1 = none), offset
BLOCK_TOKENS = 1 << 16  # tokens per worker -> main-process message
VOCAB_SAMPLE_DOCS = 8  # documents checked per file when meta/token_stats.csv has no max id


def _mix(*xs: int) -> int:
    """splitmix64 over a tuple of ints: deterministic, stateless random numbers."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (x & _M64)) + 0x9E3779B97F4A7C15 & _M64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _M64
        h ^= h >> 31
    return h


def _csv(v: Any) -> list[str]:
    if v is None:
        return []
    if isinstance(v, (list, tuple)):
        return [str(x).strip() for x in v if str(x).strip()]
    return [t.strip() for t in str(v).split(",") if t.strip()]


# ---------------------------------------------------------------- config and dataset index

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

    @property
    def content_len(self) -> int:
        return self.seq_length + 1 - (self.bol is not None) - (self.eol is not None)


def parse_spec(cfg: Any) -> DataSpec:
    """Read the fms-fsdp data fields of any config object (CSV strings or lists)."""
    data_path = getattr(cfg, "data_path", None)
    if not data_path or not os.path.isdir(data_path):
        raise ValueError(f"data_path={data_path!r}: no such folder; expected the folder that holds the dataset "
                         f"sub-folders and meta/ (make one with `python -m avengers.data.prepare`)")
    names = _csv(getattr(cfg, "datasets", None))
    if not names:
        names = sorted(p.name for p in Path(data_path).iterdir() if p.is_dir() and "meta" not in p.name)
        if not names:
            raise ValueError(f"datasets=None and data_path={data_path!r} has no dataset sub-folders")
    raw_w = _csv(getattr(cfg, "weights", None))
    if not raw_w:
        raw_w = ["1"] * len(names)
    if len(raw_w) != len(names):
        raise ValueError(f"weights={getattr(cfg, 'weights', None)!r} has {len(raw_w)} values but datasets names "
                         f"{len(names)} ({', '.join(names)}): give one weight per dataset")
    try:
        weights = [float(w) for w in raw_w]
    except ValueError:
        raise ValueError(f"weights={getattr(cfg, 'weights', None)!r}: expected numbers >= 0") from None
    if any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights={getattr(cfg, 'weights', None)!r}: expected finite numbers >= 0 with at least one > 0")
    file_type = getattr(cfg, "file_type", "auto") or "auto"
    if file_type not in FILE_TYPES:
        raise ValueError(f"file_type={file_type!r}: expected one of {', '.join(FILE_TYPES)}")

    def tok(name: str) -> int | None:
        v = getattr(cfg, name, None)
        return None if v is None or v == "None" else int(v)

    strip = {int(t) for t in _csv(getattr(cfg, "strip_tokens", ""))}
    special = {t for t in (tok("bos_token"), tok("eos_token"), tok("bol_token"), tok("eol_token")) if t is not None}
    spec = DataSpec(
        data_path=str(data_path), datasets=names, weights=weights, file_type=file_type,
        col_name=getattr(cfg, "col_name", None) or shards.DEFAULT_COLUMN,
        tokenizer_path=getattr(cfg, "tokenizer_path", None), seq_length=int(cfg.seq_length),
        batch_size=int(cfg.batch_size), bos=tok("bos_token"), eos=tok("eos_token"), bol=tok("bol_token"),
        eol=tok("eol_token"), strip=frozenset(strip | special), logical_shards=int(cfg.logical_shards),
        num_workers=int(getattr(cfg, "num_workers", 0) or 0), seed=int(getattr(cfg, "seed", 0)),
        shuffle_buffer=int(getattr(cfg, "shuffle_buffer", 0) or 0),
        min_doc_length=int(getattr(cfg, "min_doc_length", 3) if getattr(cfg, "min_doc_length", None) is not None else 3))
    for name, low in (("seq_length", 1), ("batch_size", 1), ("logical_shards", 1), ("num_workers", 0),
                      ("shuffle_buffer", 0), ("min_doc_length", 0)):
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
        raise ValueError(f"dataset {name!r}: folder {root} does not exist (datasets are sub-folders of "
                         f"data_path={spec.data_path!r}; present: "
                         f"{', '.join(sorted(p.name for p in Path(spec.data_path).iterdir() if p.is_dir()))})")
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
        raise ValueError(f"dataset {name!r}: no {'arrow/parquet' if spec.file_type == 'auto' else spec.file_type} "
                         f"files under {Path(spec.data_path) / name} (file_type={spec.file_type!r})")
    root = Path(spec.data_path).resolve()
    docs, tokens, sizes, max_ids = [], [], [], []
    for path, kind in zip(files, kinds):
        key = "/" + os.path.relpath(os.path.abspath(path), root).replace(os.sep, "/")
        m = meta.get(key)
        n = None
        if open_all or m is None:
            n = _count_docs(path, kind, spec.col_name)
            if m is not None and m.documents != n:
                raise ValueError(f"{path}: holds {n} documents but meta/combined_counts.csv says {m.documents} "
                                 f"(truncated or replaced file; re-run prepare for dataset {name!r})")
        docs.append(m.documents if m is not None else n)
        tokens.append(m.tokens if m is not None else None)
        sizes.append(os.path.getsize(path))
        max_ids.append(m.max_token_id if m is not None else None)
    docs_a = np.asarray(docs, dtype=np.int64)
    if docs_a.sum() == 0:
        raise ValueError(f"dataset {name!r}: its {len(files)} files under {Path(spec.data_path) / name} hold no documents")
    weight = np.asarray(tokens if all(t is not None for t in tokens) else sizes, dtype=np.float64)
    return DatasetIndex(name, files, kinds, np.concatenate([[0], np.cumsum(docs_a)]),
                        partition(docs_a, weight, spec.logical_shards), max_ids)


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


def make_plan(cfg: Any, epochs: int | None = None, open_all: bool = False) -> Plan:
    spec = parse_spec(cfg)
    meta = shards.read_meta(spec.data_path)
    return Plan(spec, [index_dataset(spec, n, meta, open_all) for n in spec.datasets], epochs)


# ---------------------------------------------------------------- validation

def validate_data_config(cfg: Any, world_size: int, vocab_size: int) -> None:
    """Every data check before training starts; raises ValueError naming the value and what is accepted.

    Opens each shard's footer (corrupt/truncated files), checks document counts against the meta
    CSV and token ids against vocab_size (meta/token_stats.csv, else a sample of documents per file).
    """
    spec = parse_spec(cfg)
    loaders = world_size * max(spec.num_workers, 1)
    if spec.logical_shards % loaders:
        raise ValueError(f"logical_shards={spec.logical_shards} is not divisible by world_size x max(num_workers, 1)"
                         f" = {world_size} x {max(spec.num_workers, 1)} = {loaders}; use a multiple of {loaders}")
    for name in ("bos", "eos", "bol", "eol"):
        t = getattr(spec, name)
        if t is not None and not 0 <= t < vocab_size:
            raise ValueError(f"{name}_token={t}: expected None or a token id in [0, {vocab_size})")
    plan = make_plan(cfg, open_all=True)
    _check_coverage(plan, world_size)
    tokenizer = None
    for ix in plan.indexes:
        for f, (path, kind) in enumerate(zip(ix.files, ix.kinds)):
            n = int(ix.doc_start[f + 1] - ix.doc_start[f])
            if kind == "parquet":
                if tokenizer is None:
                    tokenizer = _load_tokenizer(spec)
                    tv = tokenizer.get_vocab_size(with_added_tokens=True)
                    if tv > vocab_size:
                        raise ValueError(f"tokenizer_path={spec.tokenizer_path!r} has {tv} tokens, more than "
                                         f"vocab_size={vocab_size}: use the model's tokenizer")
                continue
            mx = ix.max_token_ids[f]
            if mx is None and n:
                r = shards.ShardReader(path, spec.col_name)
                picks = sorted({int(i) for i in np.linspace(0, n - 1, min(n, VOCAB_SAMPLE_DOCS))})
                mx = max((int(d.max()) for d in (r.doc(i) for i in picks) if d.size), default=-1)
            if mx is not None and mx >= vocab_size:
                raise ValueError(f"{path}: token id {mx} >= vocab_size={vocab_size}; the shards were made with a "
                                 f"larger tokenizer than the model's vocabulary (re-tokenize or pick a model "
                                 f"with vocab >= {mx + 1})")


def _check_coverage(plan: Plan, world_size: int) -> None:
    spec = plan.spec
    loaders = world_size * max(spec.num_workers, 1)
    per = spec.logical_shards // loaders
    for ix, w in zip(plan.indexes, spec.weights):
        if w == 0:
            continue
        owned = ix.bounds[per::per] - ix.bounds[:-1:per] if per else np.array([])
        if len(owned) and owned.min() == 0:
            raise ValueError(f"dataset {ix.name!r} has {ix.num_docs} documents: too few for {loaders} loader workers "
                             f"(world_size x max(num_workers,1)) to each own one; use fewer workers or more data")


def _load_tokenizer(spec: DataSpec):
    if not spec.tokenizer_path:
        raise ValueError("file_type includes parquet files but tokenizer_path=None: set tokenizer_path to a "
                         "folder with tokenizer.json (parquet text is tokenized on the fly)")
    from avengers.data.prepare import load_tokenizer

    return load_tokenizer(spec.tokenizer_path)


# ---------------------------------------------------------------- documents

class _Docs:
    """Random access to one dataset's documents as token arrays (arrow: memory map; parquet: tokenize)."""

    def __init__(self, spec: DataSpec, ix: DatasetIndex):
        self.spec, self.ix = spec, ix
        self.readers: dict[int, shards.ShardReader] = {}
        self.pq: dict[int, Any] = {}
        self.rg_cache: collections.OrderedDict = collections.OrderedDict()
        self.tok = None

    def __call__(self, g: int) -> np.ndarray:
        f, i = self.ix.locate(g)
        if self.ix.kinds[f] == "arrow":
            r = self.readers.get(f)
            if r is None:
                r = self.readers[f] = shards.ShardReader(self.ix.files[f], self.spec.col_name)
            return r.doc(i)
        return self._parquet_doc(f, i)

    def _parquet_doc(self, f: int, i: int) -> np.ndarray:
        import pyarrow.parquet as pq

        if f not in self.pq:
            pf = pq.ParquetFile(self.ix.files[f])
            names = pf.schema_arrow.names
            cands = [c for c in _csv(self.spec.col_name) + ["text", "contents"] if c in names]
            if not cands:
                raise ValueError(f"{self.ix.files[f]}: no text column among col_name={self.spec.col_name!r}, "
                                 f"'text', 'contents' (columns: {names})")
            rows = [pf.metadata.row_group(k).num_rows for k in range(pf.num_row_groups)]
            self.pq[f] = (pf, cands[0], np.concatenate([[0], np.cumsum(rows)]))
        pf, col, starts = self.pq[f]
        rg = int(np.searchsorted(starts, i, side="right")) - 1
        texts = self.rg_cache.get((f, rg))
        if texts is None:
            texts = pf.read_row_group(rg, columns=[col]).column(0).to_pylist()
            self.rg_cache[(f, rg)] = texts
            if len(self.rg_cache) > 32:
                self.rg_cache.popitem(last=False)
        else:
            self.rg_cache.move_to_end((f, rg))
        if self.tok is None:
            self.tok = _load_tokenizer(self.spec)
        ids = self.tok.encode(texts[i - int(starts[rg])] or "", add_special_tokens=False).ids
        return np.asarray(ids, dtype=np.uint32)


# ---------------------------------------------------------------- one loader worker

def _lcg_params(seed: int, d: int, shard: int, epoch: int, n: int) -> tuple[int, int, int]:
    m = 1 << max(n - 1, 0).bit_length()
    return m, (2 * _mix(seed, d, shard, epoch, 1) + 1) % m, _mix(seed, d, shard, epoch, 2) % m


def initial_worker_state(plan: Plan, gid: int, n_loaders: int) -> dict:
    spec = plan.spec
    per = spec.logical_shards // n_loaders
    tables = []
    for d, ix in enumerate(plan.indexes):
        rows = np.zeros((per, _COLS), dtype=np.int64)
        for k, s in enumerate(range(gid * per, (gid + 1) * per)):
            n = int(ix.bounds[s + 1] - ix.bounds[s])
            rows[k] = (s, 0, _lcg_params(spec.seed, d, s, 0, n)[2], 0, -1, 0)
        tables.append(torch.from_numpy(rows))
    return {"gid": gid, "tables": tables, "seen": torch.zeros(len(plan.indexes), dtype=torch.int64),
            "draws": 0, "generation": 0}


class _Stream:
    """The document -> packed-line pipeline of one loader worker, resumable from its state."""

    def __init__(self, plan: Plan, state: dict):
        self.plan, self.spec = plan, plan.spec
        self.gid = int(state["gid"])
        self.gen = int(state.get("generation", 0))
        self.tables = [t.numpy().copy() for t in state["tables"]]
        self.seen = state["seen"].numpy().astype(np.int64).copy()
        self.draws = int(state["draws"])
        self.docs = [_Docs(self.spec, ix) for ix in plan.indexes]
        self.sizes = [ix.bounds[1:] - ix.bounds[:-1] for ix in plan.indexes]
        w = np.asarray(self.spec.weights, dtype=np.float64)
        owned = np.array([(self.sizes[d][t[:, 0]]).sum() if len(t) else 0 for d, t in enumerate(self.tables)])
        self.active = (w > 0) & (owned > 0)
        self.w = np.where(self.active, w, 0.0)
        self.w = self.w / self.w.sum() if self.w.sum() > 0 else self.w
        self.cur: tuple[int, int, np.ndarray, int] | None = None  # dataset, row, doc tokens, offset
        self.resume = [(d, r) for d, t in enumerate(self.tables) for r in np.flatnonzero(t[:, 4] >= 0)]

    def state(self) -> dict:
        """Taken only between lines, so no partial line is ever part of the state."""
        if self.cur is not None:
            d, r, _, off = self.cur
            self.tables[d][r, 5] = off
        return {"gid": self.gid, "tables": [t.copy() for t in self.tables], "seen": self.seen.copy(),
                "draws": self.draws,
                "generation": self.gen}

    def _doc_tokens(self, d: int, g: int) -> np.ndarray | None:
        doc = self.docs[d](g)
        a, b = 0, len(doc)
        strip = self.spec.strip
        if b and int(doc[0]) in strip:
            a = 1
        if b > a and int(doc[b - 1]) in strip:
            b -= 1
        n = b - a + (self.spec.eos is not None) + (self.spec.bos is not None)
        if b - a + 1 + (self.spec.bos is not None) < self.spec.min_doc_length or n == 0:
            return None
        out = np.empty(n, dtype=np.int64)
        k = 0
        if self.spec.bos is not None:
            out[0] = self.spec.bos
            k = 1
        out[k:k + b - a] = doc[a:b]
        if self.spec.eos is not None:
            out[-1] = self.spec.eos
        return out

    def _pick_dataset(self) -> int | None:
        if not self.active.any():
            return None
        total = self.seen.sum()
        gap = np.where(self.active, self.w * total - self.seen, -np.inf)
        return int(np.argmax(gap))

    def _pick_row(self, d: int) -> int | None:
        t, sizes = self.tables[d], self.sizes[d]
        remaining = sizes[t[:, 0]] - t[:, 3]
        tot = int(remaining.sum())
        if tot == 0:  # every owned shard of d is done: next epoch (or stop in finite mode)
            if self.plan.epochs is not None and t[0, 1] + 1 >= self.plan.epochs:
                self.active[d] = False
                return None
            for r in range(len(t)):
                s, e = int(t[r, 0]), int(t[r, 1]) + 1
                t[r, 1:4] = (e, _lcg_params(self.spec.seed, d, s, e, int(sizes[s]))[2], 0)
            remaining = sizes[t[:, 0]]
            tot = int(remaining.sum())
        u = _mix(self.spec.seed, self.gid, self.gen, d, self.draws) % tot
        self.draws += 1
        return int(np.searchsorted(np.cumsum(remaining), u, side="right"))

    def _start_doc(self) -> bool:
        while True:
            if self.resume:
                d, r = self.resume.pop(0)
                t = self.tables[d]
                toks = self._doc_tokens(d, int(t[r, 4]))
                self.cur = (d, r, toks, int(t[r, 5]))
                return True
            d = self._pick_dataset()
            if d is None:
                return False
            r = self._pick_row(d)
            if r is None:
                continue
            t = self.tables[d]
            s, epoch = int(t[r, 0]), int(t[r, 1])
            n = int(self.sizes[d][s])
            m, c, _ = _lcg_params(self.spec.seed, d, s, epoch, n)
            x = int(t[r, 2])
            while True:
                x = (5 * x + c) % m
                if x < n:
                    break
            t[r, 2], t[r, 3] = x, t[r, 3] + 1
            g = int(self.plan.indexes[d].bounds[s]) + x
            toks = self._doc_tokens(d, g)
            if toks is None:
                continue
            t[r, 4], t[r, 5] = g, 0
            self.cur = (d, r, toks, 0)
            return True

    def _piece(self, need: int) -> np.ndarray | None:
        if self.cur is None and not self._start_doc():
            return None
        d, r, toks, off = self.cur
        p = toks[off:off + need]
        off += len(p)
        self.seen[d] += len(p)
        if off >= len(toks):
            self.tables[d][r, 4:6] = (-1, 0)
            self.cur = None
        else:
            self.cur = (d, r, toks, off)
        return p

    def blocks(self, lines_per_block: int) -> Iterator[tuple[torch.Tensor, dict]]:
        spec = self.spec
        L, C = spec.seq_length + 1, spec.content_len
        lo = 1 if spec.bol is not None else 0
        out = np.empty((lines_per_block, L), dtype=np.int64)
        line = np.empty(L, dtype=np.int64)
        if spec.bol is not None:
            line[0] = spec.bol
        if spec.eol is not None:
            line[-1] = spec.eol
        content = line[lo:lo + C]
        fill = n = 0
        while True:
            p = self._piece(C - fill)
            if p is None:  # finite mode: pad the last line with -1 (labels become -100)
                if fill:
                    line[lo + fill:] = -1
                    out[n] = line
                    n += 1
                    fill = 0
                if n:
                    yield torch.from_numpy(out[:n].copy()), self.state()
                return
            content[fill:fill + len(p)] = p
            fill += len(p)
            if fill == C:
                out[n] = line
                n += 1
                fill = 0
                if n == lines_per_block:
                    yield torch.from_numpy(out.copy()), self.state()
                    n = 0


class _WorkerSet(torch.utils.data.IterableDataset):
    def __init__(self, plan: Plan, states: list[dict], lines_per_block: int):
        self.plan, self.states, self.k = plan, states, lines_per_block

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        j = 0 if info is None else info.id
        for lines, state in _Stream(self.plan, self.states[j]).blocks(self.k):
            # pickled: the DataLoader would otherwise move every small array through its own shared memory
            yield lines, pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)


# ---------------------------------------------------------------- the loader

class TokenLoader:
    """Iterable of (inputs, labels) with exact state; see the module docstring."""

    def __init__(self, plan: Plan, rank: int, world_size: int):
        spec = plan.spec
        self.plan, self.spec, self.rank, self.world_size = plan, spec, rank, world_size
        self.nw = max(spec.num_workers, 1)
        n = world_size * self.nw
        self.workers = {g: initial_worker_state(plan, g, n) for g in range(rank * self.nw, (rank + 1) * self.nw)}
        self.order = list(self.workers)
        self.buffer: list[np.ndarray] = []
        self.pending: collections.deque = collections.deque()
        self.draws = 0
        self._gen = 0

    # -- state
    def state_dict(self) -> dict:
        L = self.spec.seq_length + 1

        def stack(lines):
            return torch.from_numpy(np.stack(list(lines))) if lines else torch.zeros((0, L), dtype=torch.int64)

        return {"version": STATE_VERSION, "rank": self.rank, "world_size": self.world_size,
                "num_workers": self.spec.num_workers, "logical_shards": self.spec.logical_shards,
                "seq_length": self.spec.seq_length, "datasets": list(self.spec.datasets),
                "workers": [_clone(self.workers[g]) for g in self.order], "worker_order": list(self.order),
                "buffer": stack(self.buffer), "pending": stack(self.pending), "draws": self.draws}

    def load_state_dict(self, state: dict | Sequence[dict]) -> None:
        """A single dict: this rank's state (same world and workers). A list: all ranks' states (any)."""
        states = [state] if isinstance(state, dict) else list(state)
        for s in states:
            self._check_compatible(s)
        same = (isinstance(state, dict) or len(states) == self.world_size) and all(
            s["world_size"] == self.world_size and max(s["num_workers"], 1) == self.nw for s in states)
        if same:
            mine = state if isinstance(state, dict) else next((s for s in states if s["rank"] == self.rank), None)
            if mine is None or mine["rank"] != self.rank:
                raise ValueError(f"loader state for rank {self.rank} not found (got ranks "
                                 f"{[s['rank'] for s in states]}); pass every rank's state as a list")
            self._restore(mine)
        else:
            if isinstance(state, dict):
                raise ValueError(f"loader state was saved with world_size={state['world_size']} x num_workers="
                                 f"{state['num_workers']}, now {self.world_size} x {self.spec.num_workers}: pass "
                                 f"the list of all saved ranks' states to rescale")
            self._restore(rescale(states, self.plan, self.rank, self.world_size))
        self._gen += 1

    def _check_compatible(self, s: dict) -> None:
        if s.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {s.get('version')!r}: expected {STATE_VERSION}")
        for k, mine in (("logical_shards", self.spec.logical_shards), ("seq_length", self.spec.seq_length),
                        ("datasets", list(self.spec.datasets))):
            if s[k] != mine:
                raise ValueError(f"loader state has {k}={s[k]!r} but the config has {mine!r}; they must match "
                                 f"to resume (start a new data run to change them)")

    def _restore(self, s: dict) -> None:
        self.workers = {int(w["gid"]): _clone(w) for w in s["workers"]}
        self.order = [int(g) for g in s["worker_order"]]
        self.buffer = [r for r in s["buffer"].numpy().copy()]
        self.pending = collections.deque(r for r in s["pending"].numpy().copy())
        self.draws = int(s["draws"])

    # -- iteration
    def _blocks(self) -> Iterator[tuple[torch.Tensor, dict]]:
        states = [self.workers[g] for g in self.order]
        if self.spec.num_workers == 0:
            yield from _Stream(self.plan, states[0]).blocks(self._block_lines())
            return
        dl = torch.utils.data.DataLoader(_WorkerSet(self.plan, states, self._block_lines()), batch_size=None,
                                         num_workers=self.nw, prefetch_factor=4, persistent_workers=False)
        for lines, state in dl:
            yield lines, pickle.loads(state)

    def _block_lines(self) -> int:
        """Lines per worker message: up to 16 lines and at most BLOCK_TOKENS tokens, so that
        per-message overhead stays small without making workers run far ahead."""
        return max(1, min(16, BLOCK_TOKENS // (self.spec.seq_length + 1)))

    def _incoming(self, gen: int) -> Iterator[np.ndarray]:
        while self.pending:
            yield self.pending.popleft()
        for lines, wstate in self._blocks():
            if gen != self._gen:
                raise RuntimeError("the loader's state was loaded during iteration; call iter(loader) again")
            g = int(wstate["gid"])
            self.workers[g] = wstate
            k = self.order.index(g)
            self.order = self.order[k + 1:] + self.order[:k + 1]
            self.pending.extend(lines.numpy())
            while self.pending:
                yield self.pending.popleft()

    def _lines(self, gen: int) -> Iterator[np.ndarray]:
        S = self.spec.shuffle_buffer
        for x in self._incoming(gen):
            if S == 0:
                yield x
            elif len(self.buffer) < S:
                self.buffer.append(x)
            else:
                i = _mix(self.spec.seed, self.rank, self.draws, 0x5B) % S
                self.draws += 1
                out, self.buffer[i] = self.buffer[i], x
                yield out
        while self.buffer:  # finite mode only: drain in random order
            i = _mix(self.spec.seed, self.rank, self.draws, 0x5B) % len(self.buffer)
            self.draws += 1
            self.buffer[i], self.buffer[-1] = self.buffer[-1], self.buffer[i]
            yield self.buffer.pop()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._gen += 1
        gen = self._gen
        B = self.spec.batch_size
        batch: list[np.ndarray] = []
        finite = self.plan.epochs is not None
        for x in self._lines(gen):
            batch.append(x)
            if len(batch) == B:
                yield _split(np.stack(batch), finite)
                batch = []
        if batch:
            yield _split(np.stack(batch), finite)


def _split(lines: np.ndarray, finite: bool) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.from_numpy(lines)
    inputs, labels = t[:, :-1].contiguous(), t[:, 1:].contiguous()
    if finite:
        inputs.clamp_(min=0)
        labels[labels < 0] = -100
    return inputs, labels


def _clone(w: dict) -> dict:
    """A worker state with fresh torch tensors (workers send numpy arrays)."""

    def t(x):
        return torch.as_tensor(x).clone() if isinstance(x, (np.ndarray, torch.Tensor)) else x

    return {k: ([t(a) for a in v] if isinstance(v, list) else t(v)) for k, v in w.items()}


def rescale(states: Sequence[dict], plan: Plan, rank: int, world_size: int) -> dict:
    """Merge every old rank's state and cut out `rank`'s share for a new world (see module docstring)."""
    states = sorted(states, key=lambda s: s["rank"])
    old_world = states[0]["world_size"]
    if [s["rank"] for s in states] != list(range(old_world)):
        raise ValueError(f"rescaling needs the loader states of all {old_world} saved ranks; got ranks "
                         f"{[s['rank'] for s in states]}")
    spec = plan.spec
    nw = max(spec.num_workers, 1)
    n_new = world_size * nw
    per = spec.logical_shards // n_new
    old_workers = sorted((w for s in states for w in s["workers"]), key=lambda w: int(w["gid"]))
    rows = [torch.cat([w["tables"][d] for w in old_workers]).numpy() for d in range(len(plan.indexes))]
    for d, r in enumerate(rows):
        if sorted(r[:, 0].tolist()) != list(range(spec.logical_shards)):
            raise ValueError(f"loader states do not cover each logical shard of dataset {spec.datasets[d]!r} once")
        rows[d] = r[np.argsort(r[:, 0], kind="stable")]
    seen = sum(w["seen"] for w in old_workers) // n_new
    lines = [x for s in states for x in list(s["pending"]) + list(s["buffer"])]
    generation = 1 + max(int(w.get("generation", 0)) for w in old_workers)
    workers = []
    for g in range(rank * nw, (rank + 1) * nw):
        workers.append({"gid": g, "tables": [torch.from_numpy(r[g * per:(g + 1) * per].copy()) for r in rows],
                        "seen": seen.clone(), "draws": 0, "generation": generation})
    my_lines = [x for i, x in enumerate(lines) if i % world_size == rank]
    L = spec.seq_length + 1
    return {"workers": workers, "worker_order": [w["gid"] for w in workers], "buffer": torch.zeros((0, L), dtype=torch.int64),
            "pending": torch.stack(my_lines) if my_lines else torch.zeros((0, L), dtype=torch.int64), "draws": 0}


def build_dataloader(cfg: Any, rank: int, world_size: int, epochs: int | None = None) -> TokenLoader:
    """The loader of one rank. epochs=None streams forever; epochs=k stops after k passes (the last line
    is padded: inputs 0, labels -100) — for tests and evaluation."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}: expected 0 <= rank < world_size={world_size}")
    plan = make_plan(cfg, epochs)
    spec = plan.spec
    loaders = world_size * max(spec.num_workers, 1)
    if spec.logical_shards % loaders:
        raise ValueError(f"logical_shards={spec.logical_shards} is not divisible by world_size x max(num_workers, 1)"
                         f" = {loaders}; use a multiple of {loaders}")
    _check_coverage(plan, world_size)
    return TokenLoader(plan, rank, world_size)


class DummyDataset(torch.utils.data.IterableDataset):
    """fms-fsdp's dummy data: consecutive integers mod vocab_size; inputs == labels, [batch, seq]."""

    def __init__(self, batch_size: int, seq_length: int, vocab_size: int):
        self.shape, self.vocab = (batch_size, seq_length), vocab_size

    def __iter__(self):
        n = self.shape[0] * self.shape[1]
        start = 0
        while True:
            x = (torch.arange(start, start + n) % self.vocab).view(self.shape)
            start = (start + n) % self.vocab
            yield x, x.clone()
