"""Progress of long work: a tqdm bar on a terminal, a plain log line every `interval` seconds elsewhere.

Cluster jobs write stderr to a file, where a tqdm bar is either suppressed or a stream of carriage
returns; there the same counts (done/total, elapsed, rate, ETA, postfix) go to the log as lines.
The environment variable AVENGERS_PROGRESS_INTERVAL sets their period in seconds (default 30).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm import tqdm

log = logging.getLogger(__name__)

INTERVAL_ENV = "AVENGERS_PROGRESS_INTERVAL"
DEFAULT_INTERVAL_S = 30.0


class LineProgress:
    """tqdm's counting interface (update, set_postfix_str, n, close, iteration) logging plain lines:
    at most one every `interval` seconds, and a last one at close.

    A line due after an update is written at the next call, so a postfix set right after the update
    (`bar.update(k); bar.set_postfix_str(rates)`) appears on the same line as the count it describes."""

    def __init__(
        self,
        iterable: Iterable | None = None,
        total: float | None = None,
        desc: str = "",
        unit: str = "it",
        interval: float = DEFAULT_INTERVAL_S,
    ):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.total, self.desc, self.unit, self.interval = iterable, total, desc, unit, interval
        self.n = 0
        self.postfix = ""
        self.start = self.last = time.monotonic()
        self.due = self.closed = False
        self.written: tuple | None = None

    def line(self) -> str:
        fmt = "{desc}: {percentage:.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
        if not self.total:
            fmt = "{desc}: {n_fmt} [{elapsed}, {rate_fmt}{postfix}]"
        elapsed = time.monotonic() - self.start
        return tqdm.format_meter(
            self.n, self.total, elapsed, prefix=self.desc, unit=self.unit, bar_format=fmt, postfix=self.postfix or None
        )

    def _write(self) -> None:
        log.info("%s", self.line())
        self.last, self.due, self.written = time.monotonic(), False, (self.n, self.postfix)

    def update(self, n: float = 1) -> None:
        if self.due:
            self._write()
        self.n += n
        self.due = time.monotonic() - self.last >= self.interval

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s
        if self.due:
            self._write()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.written != (self.n, self.postfix):
                self._write()

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress(
    iterable: Iterable | None = None,
    *,
    total: float | None = None,
    desc: str = "",
    unit: str = "it",
    disable: bool = False,
    interval: float | None = None,
) -> tqdm | LineProgress:
    """A tqdm bar when stderr is a terminal, else a LineProgress logging a line every `interval` s
    (default: $AVENGERS_PROGRESS_INTERVAL or 30). `disable` silences both (e.g. a --quiet flag)."""
    if disable or sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True, disable=disable)
    if interval is None:
        interval = float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL_S))
    return LineProgress(iterable, total=total, desc=desc, unit=unit, interval=interval)
