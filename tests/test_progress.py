"""progress(): tqdm on a terminal, plain log lines at most every `interval` seconds elsewhere."""

import logging

from tqdm import tqdm

from avengers import progress as progress_mod
from avengers.progress import LineProgress, progress


def test_plain_lines_off_a_terminal_and_a_bar_on_one(monkeypatch):
    monkeypatch.setattr(progress_mod.sys.stderr, "isatty", lambda: False)
    assert isinstance(progress(total=3), LineProgress)
    assert isinstance(progress(total=3, disable=True), tqdm)
    monkeypatch.setattr(progress_mod.sys.stderr, "isatty", lambda: True)
    assert isinstance(progress(total=3), tqdm)


def test_line_progress_rate_limits_and_always_ends_with_a_line(caplog, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: now[0])
    with caplog.at_level(logging.INFO, logger="avengers.progress"):
        bar = LineProgress(total=5, desc="score", unit="req", interval=30)
        for t in (10, 20, 31, 40, 45):
            now[0] = t
            bar.update()
            bar.set_postfix_str(f"at {t}")  # shown with the count it belongs to
        now[0] = 50
        bar.close()
        bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(" [")[0] for line in lines] == ["score: 60% 3/5", "score: 100% 5/5"]
    assert lines[0].endswith(", at 31]") and lines[1].endswith(", at 45]")


def test_closing_right_after_a_line_repeats_nothing(caplog):
    with caplog.at_level(logging.INFO, logger="avengers.progress"):
        for _ in LineProgress(range(3), desc="docs", interval=0):
            pass
    counts = [r.getMessage().split(" [")[0] for r in caplog.records]
    assert counts == ["docs: 33% 1/3", "docs: 67% 2/3", "docs: 100% 3/3"]
