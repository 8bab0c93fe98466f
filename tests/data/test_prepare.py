"""prepare: the bundled sample in both schemas -> expected counts; resume; clear errors (issue 2, points 1, 2, 5)."""

from __future__ import annotations

import csv
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from avengers.data import shards
from avengers.data.prepare import PrepareError, build_parser, main, prepare

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample"
PARQUET = SAMPLE / "fineweb-edu-sample.parquet"
DOLMA = SAMPLE / "dolma-sample.json.gz"
TOKENIZER = SAMPLE / "tokenizer"
EXPECTED = {"fineweb-edu-sample": (236, 247_666), "dolma-sample": (260, 235_918)}  # data/sample/README.md


def args(out, *extra):
    a = build_parser().parse_args(["--output", str(out), "--tokenizer", str(TOKENIZER), "--quiet", *extra])
    return a


def independent_counts(texts):
    tok = Tokenizer.from_file(str(TOKENIZER / "tokenizer.json"))
    return len(texts), sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))


def read_counts(out):
    with open(out / "meta" / "combined_counts.csv", newline="") as f:
        return {r["dataset/filename"]: r for r in csv.DictReader(f)}


def test_sample_files_follow_the_source_schemas():
    cols = pq.read_schema(PARQUET).names
    assert cols == [
        "text",
        "id",
        "dump",
        "url",
        "file_path",
        "language",
        "language_score",
        "token_count",
        "score",
        "int_score",
    ]
    with gzip.open(DOLMA, "rt") as f:
        row = json.loads(f.readline())
    assert {"id", "text", "source", "added", "created"} <= set(row)


def test_prepare_sample_parquet_and_jsongz_counts_and_resume(tmp_path):
    out = tmp_path / "prep"
    texts = {"fineweb-edu-sample": pq.read_table(PARQUET, columns=["text"]).column(0).to_pylist()}
    with gzip.open(DOLMA, "rt") as f:
        texts["dolma-sample"] = [json.loads(line)["text"] for line in f]
    prepare(
        args(
            out,
            "--source",
            "local",
            "--input",
            str(PARQUET),
            "--dataset",
            "fineweb-edu-sample",
            "--docs_per_shard",
            "100",
            "--workers",
            "2",
        )
    )
    prepare(args(out, "--source", "local", "--input", str(DOLMA), "--dataset", "dolma-sample", "--workers", "1"))
    rows = read_counts(out)
    for name, (docs, tokens) in EXPECTED.items():
        assert independent_counts(texts[name]) == (docs, tokens)
        mine = [r for k, r in rows.items() if k.startswith(f"/{name}/")]
        assert sum(int(r["documents"]) for r in mine) == docs
        assert sum(int(r["tokens"]) for r in mine) == tokens
        for k, r in rows.items():
            assert int(r["size"]) == (out / k.lstrip("/")).stat().st_size
    assert len([k for k in rows if k.startswith("/fineweb-edu-sample/")]) == 3
    # the first document round-trips exactly
    tok = Tokenizer.from_file(str(TOKENIZER / "tokenizer.json"))
    first = shards.ShardReader(out / "fineweb-edu-sample" / "part-00000.arrow").doc(0)
    assert first.dtype == np.uint32
    assert first.tolist() == tok.encode(texts["fineweb-edu-sample"][0], add_special_tokens=False).ids

    # resume: a missing shard and a partial (.tmp) one are redone, byte for byte; finished ones kept
    ds = out / "fineweb-edu-sample"
    before = {p.name: p.read_bytes() for p in ds.glob("*.arrow")}
    kept_mtime = (ds / "part-00000.arrow").stat().st_mtime_ns
    (ds / "part-00001.arrow").unlink()
    (ds / "part-00002.arrow").rename(ds / "part-00002.arrow.tmp")
    prepare(
        args(
            out,
            "--source",
            "local",
            "--input",
            str(PARQUET),
            "--dataset",
            "fineweb-edu-sample",
            "--docs_per_shard",
            "100",
            "--workers",
            "1",
        )
    )
    assert {p.name: p.read_bytes() for p in ds.glob("*.arrow")} == before
    assert not list(ds.glob("*.tmp"))
    assert (ds / "part-00000.arrow").stat().st_mtime_ns == kept_mtime
    assert read_counts(out) == rows
    with pytest.raises(PrepareError, match="other settings"):
        prepare(
            args(
                out,
                "--source",
                "local",
                "--input",
                str(PARQUET),
                "--dataset",
                "fineweb-edu-sample",
                "--docs_per_shard",
                "50",
            )
        )


def test_clear_errors(tmp_path, capsys):
    assert main(["--source", "wikipedia", "--output", str(tmp_path)]) == 2
    assert "--source 'wikipedia': expected one of fineweb-edu, dolma, local" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(PrepareError, match="no documents"):
        prepare(args(tmp_path / "o", "--source", "local", "--input", str(empty), "--dataset", "e"))
    with pytest.raises(PrepareError, match="no such file"):
        prepare(args(tmp_path / "o", "--source", "local", "--input", str(tmp_path / "missing.parquet")))


@pytest.mark.parametrize(
    "source, flags, message",
    [
        (
            "local",
            ["--input", str(DOLMA), "--tokenizer", "meta-llama/Meta-Llama-3-8B"],
            "could not be loaded from the Hugging Face Hub or its cache",
        ),
        (
            "fineweb-edu",
            ["--config", "sample-10BT", "--tokenizer", str(TOKENIZER)],
            "cannot stream HuggingFaceFW/fineweb-edu config 'sample-10BT'",
        ),
        ("dolma", ["--dolma_sources", "wiki", "--tokenizer", str(TOKENIZER)], "cannot stream allenai/dolma"),
    ],
)
def test_hub_unreachable_errors(tmp_path, source, flags, message):
    # a fresh process, so HF_HUB_OFFLINE is read by huggingface_hub at import (no network retries)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "avengers.data.prepare", "--source", source, "--output", str(tmp_path), *flags],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]
