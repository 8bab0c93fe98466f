"""prepare off a terminal (a cluster log): plain progress lines, periodically and at the end."""

import logging
import re
from pathlib import Path

from avengers.data.prepare import main

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample"


def test_prepare_logs_progress_lines_when_not_on_a_terminal(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("AVENGERS_PROGRESS_INTERVAL", "0")  # a line per finished shard
    argv = ["--source", "local", "--input", str(SAMPLE / "fineweb-edu-sample.parquet"), "--output", str(tmp_path)]
    argv += ["--tokenizer", str(SAMPLE / "tokenizer"), "--docs_per_shard", "100", "--workers", "1"]
    with caplog.at_level(logging.INFO, logger="avengers.progress"):
        assert main(argv) == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "avengers.progress"]
    counts = [int(re.match(r"prepare fineweb-edu-sample: (\d+) \[", line).group(1)) for line in lines]
    assert counts == [100, 200, 236]  # one line per shard
    assert all(re.search(r"doc/s, [\d,]+ docs/s [\d,]+ tok/s\]$", line) for line in lines)
