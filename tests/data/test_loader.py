"""Loader: exact resume, rescaling, weighted mixing, the arrow format, validation (issue 2, points 3-5)."""

from __future__ import annotations

import collections
import io
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from avengers.data import shards
from avengers.data.loader import build_dataloader, validate_data_config

FIRST_ID = 10  # ids below are free for bos/eos/bol/eol


def make_corpus(root, spec: dict[str, list[int]], seed: int = 0, meta: bool = True) -> dict[str, list[np.ndarray]]:
    """spec: dataset -> documents per file; every token id in the corpus is unique."""
    rng = np.random.default_rng(seed)
    next_id = FIRST_ID
    out: dict[str, list[np.ndarray]] = {}
    for name, per_file in spec.items():
        out[name] = []
        rows = {}
        for f, n in enumerate(per_file):
            docs = []
            for _ in range(n):
                k = int(rng.integers(5, 60))
                docs.append(np.arange(next_id, next_id + k, dtype=np.uint32))
                next_id += k
            rel = f"sub/part-{f:03d}.arrow"
            rows[rel] = shards.write_shard(root / name / rel, docs)
            out[name] += docs
        if meta:
            shards.update_meta(root, name, rows)
    return out


def config(root, **kw) -> types.SimpleNamespace:
    base = dict(
        data_path=str(root),
        file_type="arrow",
        col_name="tokens",
        tokenizer_path=None,
        datasets="a,b",
        weights="1,1",
        seq_length=32,
        vocab_size=100_000,
        bos_token=None,
        eos_token=1,
        bol_token=None,
        eol_token=None,
        strip_tokens="",
        logical_shards=12,
        num_workers=0,
        seed=7,
        batch_size=3,
        shuffle_buffer=0,
        min_doc_length=3,
    )
    base.update(kw)
    return types.SimpleNamespace(**base)


def take(it, n):
    return [next(it) for _ in range(n)]


def lines_of(batches):
    """Full packed lines back from (inputs, labels)."""
    return [torch.cat([x[:, :1], y], dim=1) for x, y in batches]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    docs = make_corpus(root, {"a": [40, 25, 35], "b": [30, 30]})
    (root / "b" / "extra").mkdir()
    shards.write_shard(root / "b" / "extra" / "late.arrow", [np.arange(90_000, 90_020)])  # not in meta: opened
    docs["b"].append(np.arange(90_000, 90_020))
    return root, docs


@pytest.mark.parametrize("workers", [1, 2])
def test_resume_equals_uninterrupted_stream(corpus, workers):
    root, _ = corpus
    cfg = config(root, num_workers=workers, shuffle_buffer=8, bos_token=0, weights="3,1")
    full = take(iter(build_dataloader(cfg, 1, 2)), 30)
    first = build_dataloader(cfg, 1, 2)
    head = take(iter(first), 12)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)  # what a checkpoint does: plain tensors / ints / lists
    buf.seek(0)
    resumed = build_dataloader(cfg, 1, 2)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    tail = take(iter(resumed), 18)
    for (x, y), (u, v) in zip(full, head + tail, strict=True):
        assert x.shape == (3, 32) and x.dtype == torch.long
        assert torch.equal(x, u) and torch.equal(y, v)
    x, y = full[0]
    assert torch.equal(x[:, 1:], y[:, :-1])  # labels are inputs shifted by one, label[0] not masked
    assert (y >= 0).all()


def children_of(pid: int) -> set[int]:
    found = set()
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if ppid == pid:
            found.add(int(entry))
    return found


def test_workers_leave_a_schedulers_signals_to_their_rank(corpus):
    """Slurm signals every process of a job step: SIGTERM/SIGUSR1 from another process must not end a worker (its
    rank stops at a step of its choosing first); a process that exits with a worker still running ends it."""
    root, _ = corpus
    cfg = config(root, num_workers=1)
    want = take(iter(build_dataloader(cfg, 0, 1)), 40)
    before = children_of(os.getpid())
    it = iter(build_dataloader(cfg, 0, 1))
    got = take(it, 2)
    (worker,) = children_of(os.getpid()) - before
    for sig in ("TERM", "USR1"):
        subprocess.run(["kill", "-s", sig, str(worker)], check=True)  # sent by another process, like slurmstepd
    time.sleep(0.2)
    got += take(it, 38)
    assert worker in children_of(os.getpid())
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, want, strict=True))
    del it

    # Exiting with the iterator alive: multiprocessing ends the worker with SIGTERM from this process, then joins it.
    code = "import types; from avengers.data.loader import build_dataloader as build; "
    code += f"it = iter(build(types.SimpleNamespace(**{vars(cfg)!r}), 0, 1)); next(it)"
    start = time.monotonic()
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, capture_output=True)
    assert time.monotonic() - start < 30


def test_rescale_2_1_3_ranks_every_document_exactly_once(corpus):
    root, docs = corpus
    cfg = config(root, shuffle_buffer=5, bos_token=0, weights="2,1")
    got: list[torch.Tensor] = []
    two = [build_dataloader(cfg, r, 2, epochs=1) for r in range(2)]
    for ld in two:
        got += lines_of(take(iter(ld), 7))
    states = [ld.state_dict() for ld in two]

    cfg.num_workers = 2  # one rank with two workers
    one = build_dataloader(cfg, 0, 1, epochs=1)
    one.load_state_dict(states)
    got += lines_of(take(iter(one), 9))
    states = [one.state_dict()]

    cfg.num_workers = 0
    for r in range(3):
        ld = build_dataloader(cfg, r, 3, epochs=1)
        ld.load_state_dict(states)
        got += lines_of(list(ld))  # to the end of the epoch

    toks = torch.cat([g.flatten() for g in got])
    toks = toks[toks >= FIRST_ID]  # drop bos/eos and padding
    counts = collections.Counter(toks.tolist())
    expected = np.concatenate([d for ds in docs.values() for d in ds]).tolist()
    assert len(counts) == len(expected) and set(counts) == set(expected)
    assert max(counts.values()) == 1
    n_eos = int((torch.cat([g.flatten() for g in got]) == 1).sum())
    assert n_eos == sum(len(v) for v in docs.values())  # every document ended exactly once


def test_weights_3_to_1_realised_within_one_percent(corpus):
    root, docs = corpus
    cfg = config(root, weights="3,1", eos_token=None, seq_length=256, batch_size=8, logical_shards=4)
    a_max = int(max(d.max() for d in docs["a"]))
    n_a = n_b = 0
    for _x, y in iter(build_dataloader(cfg, 0, 1)):
        n_a += int((y <= a_max).sum())
        n_b += int((y > a_max).sum())
        if n_a + n_b >= 200_000:
            break
    assert abs(n_a / (n_a + n_b) - 0.75) < 0.01


def test_shard_from_independent_pyarrow_writer(tmp_path):
    # Written straight from the fms-fsdp spec: IPC file format, one record batch per document, column
    # `tokens` uint32; no meta CSV. Documents include a leading bos and trailing eos to be stripped.
    docs = [[5, 100, 101, 102, 6], [200, 201, 202, 203, 204, 205], [300, 301, 6]]
    schema = pa.schema([("tokens", pa.uint32())])
    (tmp_path / "ds").mkdir()
    with pa.OSFile(str(tmp_path / "ds" / "x.arrow"), "wb") as sink, pa.ipc.new_file(sink, schema) as w:
        for d in docs:
            w.write_batch(pa.record_batch([pa.array(d, type=pa.uint32())], schema=schema))
    r = shards.ShardReader(tmp_path / "ds" / "x.arrow")
    assert r.num_docs == 3 and [r.doc(i).tolist() for i in range(3)] == docs
    cfg = config(
        tmp_path,
        datasets="ds",
        weights=None,
        logical_shards=1,
        seq_length=7,
        batch_size=1,
        bos_token=5,
        eos_token=6,
        min_doc_length=3,
    )
    lines = torch.cat(lines_of(list(build_dataloader(cfg, 0, 1, epochs=1)))).flatten().tolist()
    lines = [t for t in lines if t >= 0]
    # each document: [bos] + body (stripped of its own bos/eos) + [eos]
    bodies = {100: [100, 101, 102], 200: [200, 201, 202, 203, 204, 205], 300: [300, 301]}
    seqs, cur = [], []
    for t in lines:
        cur.append(t)
        if t == 6:
            seqs.append(cur)
            cur = []
    assert sorted(s[1] for s in seqs) == [100, 200, 300]
    for s in seqs:
        assert s == [5] + bodies[s[1]] + [6]


def test_bol_eol_forced_at_line_edges(corpus):
    root, _ = corpus
    cfg = config(root, bol_token=2, eol_token=3, seq_length=16)
    x, y = next(iter(build_dataloader(cfg, 0, 1)))
    line = torch.cat([x[:, :1], y], 1)
    assert (line[:, 0] == 2).all() and (line[:, -1] == 3).all()


def test_validation_errors(corpus, tmp_path):
    root, _ = corpus
    validate_data_config(config(root), 2, 100_000)
    cases = [
        (dict(data_path=str(tmp_path / "nope")), 2, "data_path="),
        (dict(datasets="a,zz"), 2, "'zz'"),
        (dict(weights="1,2,3"), 2, "one weight per dataset"),
        (dict(weights="0,0"), 2, "at least one > 0"),
        (dict(weights="-1,2"), 2, ">= 0"),
        (dict(logical_shards=10), 3, "not divisible"),
    ]
    for kw, world, msg in cases:
        with pytest.raises(ValueError, match=msg):
            validate_data_config(config(root, **kw), world, 100_000)
    with pytest.raises(ValueError, match=r"token id \d+ >= vocab_size=5000"):  # recorded in meta
        validate_data_config(config(root), 1, 5000)
    with pytest.raises(ValueError, match=r"late.arrow: token id 90019 >= vocab_size=90010"):  # sampled
        validate_data_config(config(root), 1, 90_010)
    (tmp_path / "empty" / "e").mkdir(parents=True)
    with pytest.raises(ValueError, match="no arrow files"):
        validate_data_config(config(tmp_path / "empty", datasets="e", weights=None), 1, 100)
    (tmp_path / "z" / "d").mkdir(parents=True)
    shards.write_shard(tmp_path / "z" / "d" / "zero.arrow", [])
    with pytest.raises(ValueError, match="hold no documents"):
        validate_data_config(config(tmp_path / "z", datasets="d", weights=None), 1, 100)


def test_truncated_arrow_file_is_named(tmp_path):
    make_corpus(tmp_path, {"a": [10, 10]})
    bad = tmp_path / "a" / "sub" / "part-001.arrow"
    bad.write_bytes(bad.read_bytes()[:-40])
    with pytest.raises(ValueError, match="part-001.arrow"):
        validate_data_config(config(tmp_path, datasets="a", weights=None, logical_shards=2), 1, 100_000)


def test_hf_parquet_tokenized_on_the_fly_matches_arrow(tmp_path):
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer

    sample = Path(__file__).resolve().parents[2] / "data" / "sample"
    (tmp_path / "fw").mkdir()
    table = pq.read_table(sample / "fineweb-edu-sample.parquet").slice(0, 12)
    pq.write_table(table, tmp_path / "fw" / "x.parquet", row_group_size=5)
    cfg = config(
        tmp_path,
        datasets="fw",
        weights=None,
        file_type="hf_parquet",
        col_name="text",
        logical_shards=2,
        tokenizer_path=str(sample / "tokenizer"),
        seq_length=64,
        eos_token=1,
    )
    validate_data_config(cfg, 1, 4096)
    got = torch.cat(lines_of(list(build_dataloader(cfg, 0, 1, epochs=1)))).flatten()
    tok = Tokenizer.from_file(str(sample / "tokenizer" / "tokenizer.json"))
    ids = [e.ids for e in tok.encode_batch(table.column("text").to_pylist(), add_special_tokens=False)]
    got = got[got >= 0]
    assert int((got == 1).sum()) == 12
    assert sorted(got.tolist()) == sorted(sum(ids, []) + [1] * 12)
    with pytest.raises(ValueError, match="more than vocab_size=1000"):
        validate_data_config(cfg, 1, 1000)
