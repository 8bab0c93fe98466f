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
import functools
import logging
import os
import pickle
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from avengers.data import shards
from avengers.data.index import Plan, check_coverage, make_plan, parse_spec, tokenizer_for
from avengers.data.orphans import exit_with_parent
from avengers.data.stream import Stream, WorkerSet, initial_worker_state, mix
from avengers.data.worker_signals import init_worker_signals

log = logging.getLogger(__name__)


def _init_worker(trainer_pid: int, worker_id: int) -> None:
    """Each DataLoader worker dies with its trainer (orphans.py) and leaves a scheduler's
    SIGTERM/SIGUSR1 to its rank (worker_signals.py)."""
    exit_with_parent(trainer_pid)
    init_worker_signals(worker_id)


STATE_VERSION = 1
BLOCK_TOKENS = 1 << 16  # tokens per worker -> main-process message
PROGRESS_EVERY_S = 10.0  # seconds between progress lines of the start-up token-id scan


def validate_data_config(cfg: Any, world_size: int, vocab_size: int) -> None:
    """Every data check before training starts; raises ValueError naming the value and what is accepted.

    Opens each shard's footer (corrupt/truncated files), checks document counts against the meta
    CSV and token ids against vocab_size: the max id of meta/token_stats.csv, or, for a shard without
    one, a scan of the whole shard whose result is recorded there for the next start.
    """
    spec = parse_spec(cfg)
    loaders = world_size * max(spec.num_workers, 1)
    if spec.logical_shards % loaders:
        raise ValueError(
            f"logical_shards={spec.logical_shards} is not divisible by world_size x max(num_workers, 1)"
            f" = {world_size} x {max(spec.num_workers, 1)} = {loaders}; use a multiple of {loaders}"
        )
    for name in ("bos", "eos", "bol", "eol"):
        t = getattr(spec, name)
        if t is not None and not 0 <= t < vocab_size:
            raise ValueError(f"{name}_token={t}: expected None or a token id in [0, {vocab_size})")
    plan = make_plan(cfg, open_all=True)
    check_coverage(plan, world_size)
    unscanned = []
    for ix in plan.indexes:
        for f, (path, kind) in enumerate(zip(ix.files, ix.kinds)):
            if kind == "parquet":
                continue
            if ix.max_token_ids[f] is not None:
                _check_max_id(path, ix.max_token_ids[f], vocab_size)
            elif ix.doc_start[f + 1] > ix.doc_start[f]:
                unscanned.append(path)
    if any(kind == "parquet" for ix in plan.indexes for kind in ix.kinds):
        _check_tokenizer(spec, vocab_size)
    if unscanned:
        scanned = _scan_max_ids(unscanned, spec.col_name)
        for path, largest in scanned.items():
            _check_max_id(path, largest, vocab_size)
        try:
            keys = {shards.meta_key(spec.data_path, p): m for p, m in scanned.items()}
            shards.record_max_token_ids(spec.data_path, keys)
        except OSError as e:
            log.info("could not record max token ids under %s/meta (%s); the next start scans again", spec.data_path, e)


def _check_tokenizer(spec: Any, vocab_size: int) -> None:
    tv = tokenizer_for(spec).get_vocab_size(with_added_tokens=True)
    if tv > vocab_size:
        raise ValueError(
            f"tokenizer_path={spec.tokenizer_path!r} has {tv} tokens, more than vocab_size={vocab_size}: use the "
            f"model's tokenizer"
        )


def _check_max_id(path: str, largest: int, vocab_size: int) -> None:
    if largest >= vocab_size:
        raise ValueError(
            f"{path}: token id {largest} >= vocab_size={vocab_size}; the shards were made with a larger "
            f"tokenizer than the model's vocabulary (re-tokenize or pick a model with vocab >= {largest + 1})"
        )


def _scan_max_ids(paths: list[str], col_name: str) -> dict[str, int]:
    """Max token id of each shard, read in full, with a progress line every PROGRESS_EVERY_S seconds."""
    total = sum(os.path.getsize(p) for p in paths)
    log.info(
        "checking the token ids of %d shard(s) (%.2f GB) that meta/token_stats.csv has no max_token_id for",
        len(paths),
        total / 1e9,
    )
    out, done, t0 = {}, 0, time.monotonic()
    last = t0
    for k, path in enumerate(paths):
        out[path] = shards.ShardReader(path, col_name).max_token_id()
        done += os.path.getsize(path)
        if time.monotonic() - last >= PROGRESS_EVERY_S or k == len(paths) - 1:
            last = time.monotonic()
            log.info("  %d/%d shards, %.2f/%.2f GB, %.0f s", k + 1, len(paths), done / 1e9, total / 1e9, last - t0)
    return out


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

        def stack(lines):  # int32 halves the checkpoint; ids < 2**31 (shards are uint32, vocabularies smaller)
            return (
                torch.from_numpy(np.stack(list(lines)).astype(np.int32))
                if lines
                else torch.zeros((0, L), dtype=torch.int32)
            )

        return {
            "version": STATE_VERSION,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.spec.num_workers,
            "logical_shards": self.spec.logical_shards,
            "seq_length": self.spec.seq_length,
            "datasets": list(self.spec.datasets),
            "eval_fraction": self.spec.eval_fraction,
            "workers": [_clone(self.workers[g]) for g in self.order],
            "worker_order": list(self.order),
            "buffer": stack(self.buffer),
            "pending": stack(self.pending),
            "draws": self.draws,
        }

    def load_state_dict(self, state: dict | Sequence[dict]) -> None:
        """A single dict: this rank's state (same world and workers). A list: all ranks' states (any)."""
        states = [state] if isinstance(state, dict) else list(state)
        for s in states:
            self._check_compatible(s)
        same = (isinstance(state, dict) or len(states) == self.world_size) and all(
            s["world_size"] == self.world_size and max(s["num_workers"], 1) == self.nw for s in states
        )
        if same:
            mine = state if isinstance(state, dict) else next((s for s in states if s["rank"] == self.rank), None)
            if mine is None or mine["rank"] != self.rank:
                raise ValueError(
                    f"loader state for rank {self.rank} not found (got ranks "
                    f"{[s['rank'] for s in states]}); pass every rank's state as a list"
                )
            self._restore(mine)
        else:
            if isinstance(state, dict):
                raise ValueError(
                    f"loader state was saved with world_size={state['world_size']} x num_workers="
                    f"{state['num_workers']}, now {self.world_size} x {self.spec.num_workers}: pass "
                    f"the list of all saved ranks' states to rescale"
                )
            self._restore(rescale(states, self.plan, self.rank, self.world_size))
        self._gen += 1

    def _check_compatible(self, s: dict) -> None:
        if s.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {s.get('version')!r}: expected {STATE_VERSION}")
        for k, mine in (
            ("logical_shards", self.spec.logical_shards),
            ("seq_length", self.spec.seq_length),
            ("datasets", list(self.spec.datasets)),
            ("eval_fraction", self.spec.eval_fraction),  # another split would train on held-out documents
        ):
            saved = s.get(k, 0.0)  # states saved before eval_fraction existed held nothing out
            if saved != mine:
                raise ValueError(
                    f"loader state has {k}={saved!r} but the config has {mine!r}; they must match "
                    f"to resume (start a new data run to change them)"
                )

    def _restore(self, s: dict) -> None:
        self.workers = {int(w["gid"]): _clone(w) for w in s["workers"]}
        self.order = [int(g) for g in s["worker_order"]]
        self.buffer = list(s["buffer"].numpy().astype(np.int64))
        self.pending = collections.deque(s["pending"].numpy().astype(np.int64))
        self.draws = int(s["draws"])

    # -- iteration
    def _blocks(self) -> Iterator[tuple[torch.Tensor, dict]]:
        states = [self.workers[g] for g in self.order]
        if self.spec.num_workers == 0:
            yield from Stream(self.plan, states[0]).blocks(self._block_lines())
            return
        dl = torch.utils.data.DataLoader(
            WorkerSet(self.plan, states, self._block_lines()),
            batch_size=None,
            num_workers=self.nw,
            prefetch_factor=4,
            persistent_workers=False,
            worker_init_fn=functools.partial(_init_worker, os.getpid()),
        )
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
            self.order = self.order[k + 1 :] + self.order[: k + 1]
            self.pending.extend(lines.numpy())
            while self.pending:
                yield self.pending.popleft()

    def _lines(self, gen: int) -> Iterator[np.ndarray]:
        S = self.spec.shuffle_buffer
        for x in self._incoming(gen):
            if S == 0:
                yield x
            elif len(self.buffer) < S:
                self.buffer.append(x.copy())  # a view would keep its whole worker block alive
            else:
                i = mix(self.spec.seed, self.rank, self.draws, 0x5B) % S
                self.draws += 1
                out, self.buffer[i] = self.buffer[i], x.copy()
                yield out
        while self.buffer:  # finite mode only: drain in random order
            i = mix(self.spec.seed, self.rank, self.draws, 0x5B) % len(self.buffer)
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
        raise ValueError(
            f"rescaling needs the loader states of all {old_world} saved ranks; got ranks {[s['rank'] for s in states]}"
        )
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
        workers.append(
            {
                "gid": g,
                "tables": [torch.from_numpy(r[g * per : (g + 1) * per].copy()) for r in rows],
                "seen": seen.clone(),
                "draws": 0,
                "generation": generation,
            }
        )
    my_lines = [x for i, x in enumerate(lines) if i % world_size == rank]
    L = spec.seq_length + 1
    return {
        "workers": workers,
        "worker_order": [w["gid"] for w in workers],
        "buffer": torch.zeros((0, L), dtype=torch.int32),
        "pending": torch.stack(my_lines) if my_lines else torch.zeros((0, L), dtype=torch.int32),
        "draws": 0,
    }


def build_dataloader(
    cfg: Any, rank: int, world_size: int, epochs: int | None = None, vocab_size: int | None = None
) -> TokenLoader:
    """The loader of one rank. epochs=None streams forever; epochs=k stops after k passes (the last line
    is padded: inputs 0, labels -100) — for tests and evaluation. With vocab_size, a document holding
    an id >= vocab_size (a corrupt record batch) raises ValueError naming its file and index."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}: expected 0 <= rank < world_size={world_size}")
    plan = make_plan(cfg, epochs, vocab_size=vocab_size)
    spec = plan.spec
    loaders = world_size * max(spec.num_workers, 1)
    if spec.logical_shards % loaders:
        raise ValueError(
            f"logical_shards={spec.logical_shards} is not divisible by world_size x max(num_workers, 1)"
            f" = {loaders}; use a multiple of {loaders}"
        )
    check_coverage(plan, world_size)
    return TokenLoader(plan, rank, world_size)
