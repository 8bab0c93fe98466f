"""Stop early with a checkpoint when the scheduler asks: SIGUSR1 (time limit near) or SIGTERM (preempted, cancelled).

Slurm sends SIGTERM to every process of a job on preemption and scancel, and the SIGUSR1 of
`--signal=B:USR1@<seconds>` to the batch shell before the time limit (scripts/slurm/train.sbatch passes
it on to every rank). While `StopOnSignal` is active the handler only records the signal. The loop calls
`should_stop(step)` after each optimizer step; every `interval` steps the ranks all-reduce (MAX) what
they have recorded, so a signal that reached any one rank stops every rank after the same step, where
the trainer reports, checkpoints and returns normally (exit code 0).

Why every few steps and not every step or at reports: on GPU the loop has no host sync between reports
(clipping and the fused optimizer stay on the device), so a check on every step would add one to every
step; the report's all-reduce comes every report_interval steps (100 in the seed configs), too rarely
for a warning that comes minutes ahead. One one-element all-reduce every `interval` steps bounds both
its cost and the delay before stopping.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopOnSignal:
    """Context manager: while active, STOP_SIGNALS are recorded instead of ending the process."""

    def __init__(self, interval: int, signals: tuple[signal.Signals, ...] = STOP_SIGNALS):
        if interval < 1:
            raise ValueError(f"interval={interval}: expected an integer >= 1 (optimizer steps between checks)")
        self.interval = interval
        self.signals = signals
        self.received = 0  # the largest stop-signal number this process has received; 0 = none
        self.agreed: signal.Signals | None = None  # set on every rank once the ranks have agreed to stop
        self._previous: dict[signal.Signals, object] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is not threading.main_thread():
            names = ", ".join(s.name for s in self.signals)
            log.warning("training outside the main thread: %s will end it without a checkpoint", names)
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.received = max(self.received, signum)

    def should_stop(self, step: int, device: torch.device) -> bool:
        """True on every rank from the first check (every `interval` steps) after any rank got a stop signal."""
        if self.agreed is None and step % self.interval == 0:
            flag = torch.tensor(self.received, device=device)
            if dist.is_initialized():
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            got = int(flag.item())
            if got:
                self.agreed = signal.Signals(got)
        return self.agreed is not None
