"""Loader workers under a scheduler: only their own rank may end them.

Slurm signals every process of a job step on preemption, scancel or a time-limit warning, so SIGTERM
and SIGUSR1 reach the ranks' DataLoader workers too. A worker killed by one would crash its rank before
the rank could stop with a checkpoint (avengers/train/preemption.py). So workers ignore SIGUSR1 and act
on SIGTERM only when their rank sends it: DataLoader and multiprocessing end workers that way (at
interpreter exit, for one), and plain ignoring would make those exits hang.
"""

from __future__ import annotations

import os
import signal
import threading


def init_worker_signals(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: ignore SIGUSR1; obey SIGTERM only from the parent rank."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    # Blocked now, while this is the worker's only thread, SIGTERM stays blocked in every thread started
    # later, so it can only be taken by the waiting thread, which sees who sent it.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_obey_sigterm_from, args=(os.getppid(),), name="sigterm", daemon=True).start()


def _obey_sigterm_from(rank_pid: int) -> None:
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != rank_pid:
        pass  # the scheduler's: the rank stops at a step of its choosing, then ends this worker itself
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    os.kill(os.getpid(), signal.SIGTERM)  # delivered to this thread now: the worker ends as it always did
