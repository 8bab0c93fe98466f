"""Loader worker processes end when the trainer that started them dies.

torch's DataLoader worker notices a dead parent only between batches, and on its way out it waits
for its queue to flush into the pipe to the parent. Once the parent is gone nothing reads that pipe,
so a worker with a full pipe (large states, e.g. logical_shards=960) blocks forever, still holding
the trainer's stdout: `bash train_llama.sh ... | tee log` never returns.

`exit_with_parent` runs first in each worker (DataLoader's worker_init_fn). In a direct child on
Linux it asks the kernel for SIGKILL when the parent dies (prctl PR_SET_PDEATHSIG; the parent is the
thread that iterates the loader), then checks that the parent did not die before that took effect.
Elsewhere (other systems, forkserver workers) a daemon thread polls the parent every POLL_S seconds.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
POLL_S = 1.0


def exit_with_parent(parent_pid: int, worker_id: int | None = None) -> None:
    """Make this process die with `parent_pid` (worker_id: DataLoader passes it; unused)."""
    if sys.platform.startswith("linux") and os.getppid() == parent_pid:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(err)}")
        if os.getppid() != parent_pid:  # the parent died before the request took effect
            os._exit(1)
        return
    threading.Thread(target=_watch, args=(parent_pid,), name="exit-with-parent", daemon=True).start()


def _watch(parent_pid: int) -> None:
    while True:
        try:
            os.kill(parent_pid, 0)
        except ProcessLookupError:
            os._exit(1)
        time.sleep(POLL_S)
