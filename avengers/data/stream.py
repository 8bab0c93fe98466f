"""One loader worker: documents -> packed lines, resumable from a small state (see loader.py)."""

from __future__ import annotations

import collections
import pickle
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from avengers.data import shards
from avengers.data.heldout import HeldOut
from avengers.data.index import DatasetIndex, DataSpec, Plan, csv_list, tokenizer_for

_M64 = (1 << 64) - 1
_COLS = 6  # shard row: shard, epoch, lcg_state, visited, current_doc (-1 = none), offset


def mix(*xs: int) -> int:
    """splitmix64 over a tuple of ints: deterministic, stateless random numbers."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = ((h ^ (x & _M64)) + 0x9E3779B97F4A7C15) & _M64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _M64
        h ^= h >> 31
    return h


class Documents:
    """Random access to one dataset's documents as token arrays (arrow: memory map; parquet: tokenize)."""

    def __init__(self, spec: DataSpec, ix: DatasetIndex):
        self.spec, self.ix = spec, ix
        self.readers: dict[int, shards.ShardReader] = {}
        self.pq: dict[int, Any] = {}
        self.rg_cache: collections.OrderedDict = collections.OrderedDict()
        self.tok = None

    def where(self, g: int) -> str:
        f, i = self.ix.locate(g)
        return f"{self.ix.files[f]}, document {i}"

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
            cands = [c for c in csv_list(self.spec.col_name) + ["text", "contents"] if c in names]
            if not cands:
                raise ValueError(
                    f"{self.ix.files[f]}: no text column among col_name={self.spec.col_name!r}, "
                    f"'text', 'contents' (columns: {names})"
                )
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
            self.tok = tokenizer_for(self.spec)
        ids = self.tok.encode(texts[i - int(starts[rg])] or "", add_special_tokens=False).ids
        return np.asarray(ids, dtype=np.uint32)


def frame_document(spec: DataSpec, doc: np.ndarray) -> np.ndarray | None:
    """[bos] + doc + [eos] with one leading/trailing special token stripped; None if too short."""
    a, b = 0, len(doc)
    if b and int(doc[0]) in spec.strip:
        a = 1
    if b > a and int(doc[b - 1]) in spec.strip:
        b -= 1
    n = b - a + (spec.eos is not None) + (spec.bos is not None)
    if b - a + 1 + (spec.bos is not None) < spec.min_doc_length or n == 0:
        return None
    out = np.empty(n, dtype=np.int64)
    k = 0
    if spec.bos is not None:
        out[0] = spec.bos
        k = 1
    out[k : k + b - a] = doc[a:b]
    if spec.eos is not None:
        out[-1] = spec.eos
    return out


def _lcg_params(seed: int, d: int, shard: int, epoch: int, n: int) -> tuple[int, int, int]:
    m = 1 << max(n - 1, 0).bit_length()
    return m, (2 * mix(seed, d, shard, epoch, 1) + 1) % m, mix(seed, d, shard, epoch, 2) % m


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
    return {
        "gid": gid,
        "tables": tables,
        "seen": torch.zeros(len(plan.indexes), dtype=torch.int64),
        "draws": 0,
        "generation": 0,
    }


class Stream:
    """The document -> packed-line pipeline of one loader worker, resumable from its state."""

    def __init__(self, plan: Plan, state: dict):
        self.plan, self.spec = plan, plan.spec
        self.gid = int(state["gid"])
        self.gen = int(state.get("generation", 0))
        self.tables = [t.numpy().copy() for t in state["tables"]]
        self.seen = state["seen"].numpy().astype(np.int64).copy()
        self.draws = int(state["draws"])
        self.docs = [Documents(self.spec, ix) for ix in plan.indexes]
        self.heldout = HeldOut(plan) if self.spec.eval_fraction > 0 else None  # the eval split: never trained on
        self.sizes = [ix.bounds[1:] - ix.bounds[:-1] for ix in plan.indexes]
        w = np.asarray(self.spec.weights, dtype=np.float64)
        owned = np.array([(self.sizes[d][t[:, 0]]).sum() if len(t) else 0 for d, t in enumerate(self.tables)])
        self.active = (w > 0) & (owned > 0)
        self.w = np.where(self.active, w, 0.0)
        self.w = self.w / self.w.sum() if self.w.sum() > 0 else self.w
        self.cur: tuple[int, int, np.ndarray, int] | None = None  # dataset, row, doc tokens, offset
        self.owned_docs = [int(self.sizes[d][t[:, 0]].sum()) if len(t) else 0 for d, t in enumerate(self.tables)]
        self.unusable_in_a_row = [0] * len(self.tables)
        self.resume = [(d, r) for d, t in enumerate(self.tables) for r in np.flatnonzero(t[:, 4] >= 0)]

    def state(self) -> dict:
        """Taken only between lines, so no partial line is ever part of the state."""
        if self.cur is not None:
            d, r, _, off = self.cur
            self.tables[d][r, 5] = off
        return {
            "gid": self.gid,
            "tables": [t.copy() for t in self.tables],
            "seen": self.seen.copy(),
            "draws": self.draws,
            "generation": self.gen,
        }

    def _doc_tokens(self, d: int, g: int) -> np.ndarray | None:
        doc = self.docs[d](g)
        vocab = self.plan.vocab_size
        if vocab is not None and doc.size and int(doc.max()) >= vocab:
            raise ValueError(
                f"{self.docs[d].where(g)} (dataset {self.spec.datasets[d]!r}) holds token id {int(doc.max())} >= "
                f"the model's vocabulary of {vocab}: a corrupt record batch or another tokenizer's data; "
                f"re-prepare this file or remove it (and its meta/combined_counts.csv row)"
            )
        return frame_document(self.spec, doc)

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
            if self.plan.epochs is not None and int(t[:, 1].max()) + 1 >= self.plan.epochs:
                self.active[d] = False
                return None
            for r in range(len(t)):
                s, e = int(t[r, 0]), int(t[r, 1]) + 1
                t[r, 1:4] = (e, _lcg_params(self.spec.seed, d, s, e, int(sizes[s]))[2], 0)
            remaining = sizes[t[:, 0]]
            tot = int(remaining.sum())
        u = mix(self.spec.seed, self.gid, self.gen, d, self.draws) % tot
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
            if self.heldout is not None and self.heldout(d, g):
                continue
            toks = self._doc_tokens(d, g)
            if toks is None:
                self._note_unusable(d)
                continue
            self.unusable_in_a_row[d] = 0
            t[r, 4], t[r, 5] = g, 0
            self.cur = (d, r, toks, 0)
            return True

    def _note_unusable(self, d: int) -> None:
        """Too-short documents are skipped; if they are all this worker has of dataset d, fail instead of
        looping forever (2 x its documents in a row hold at least one whole pass over them)."""
        self.unusable_in_a_row[d] += 1
        if self.unusable_in_a_row[d] >= 2 * self.owned_docs[d]:
            shards = self.tables[d][:, 0]
            raise ValueError(
                f"dataset {self.spec.datasets[d]!r}: none of the {self.owned_docs[d]} documents in logical shards "
                f"{int(shards.min())}-{int(shards.max())} (loader worker {self.gid}) is long enough to use "
                f"(min_doc_length={self.spec.min_doc_length}, counting the added bos/eos); lower min_doc_length, "
                f"give the dataset weight 0, or re-prepare it"
            )

    def _piece(self, need: int) -> np.ndarray | None:
        if self.cur is None and not self._start_doc():
            return None
        d, r, toks, off = self.cur
        p = toks[off : off + need]
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
        content = line[lo : lo + C]
        fill = n = 0
        while True:
            p = self._piece(C - fill)
            if p is None:  # finite mode: pad the last line with -1 (labels become -100)
                if fill:
                    line[lo + fill :] = -1
                    out[n] = line
                    n += 1
                    fill = 0
                if n:
                    yield torch.from_numpy(out[:n].copy()), self.state()
                return
            content[fill : fill + len(p)] = p
            fill += len(p)
            if fill == C:
                out[n] = line
                n += 1
                fill = 0
                if n == lines_per_block:
                    yield torch.from_numpy(out.copy()), self.state()
                    n = 0


class WorkerSet(torch.utils.data.IterableDataset):
    def __init__(self, plan: Plan, states: list[dict], lines_per_block: int):
        self.plan, self.states, self.k = plan, states, lines_per_block

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        j = 0 if info is None else info.id
        for lines, state in Stream(self.plan, self.states[j]).blocks(self.k):
            # pickled: the DataLoader would otherwise move every small array through its own shared memory
            yield lines, pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
