"""A one-node Slurm cluster on localhost for tests: munged, slurmctld and slurmd from Debian's packages.

Everything lives in one temporary folder (slurm.conf, munge key and socket, state, spool, logs, pid
files) and the daemons listen on free ports, so nothing on the machine is touched or shared. `stop()`
cancels the jobs, ends the daemons by their pid files and then kills any process still carrying this
cluster's SLURM_CONF in its environment (job steps included), so nothing is left running.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time

from train_helpers import free_port

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")  # the parts of slurm-wlm used here
COMMANDS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "squeue", "sinfo")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "DEADLINE"}
POLICY_RC = "/usr/sbin/policy-rc.d"

SLURM_CONF = """\
ClusterName=avengers-test
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket={root}/run/munge.socket,cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=30
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def ensure_installed() -> None:
    """Installs Slurm and munge with apt when a command is missing (root on Debian/Ubuntu)."""
    missing = [c for c in COMMANDS if shutil.which(c) is None]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise RuntimeError(f"{', '.join(missing)} not found: install {' '.join(PACKAGES)} (apt, as root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    with _services_not_started():
        done = subprocess.run(install, env=env, capture_output=True, text=True)
        if done.returncode != 0:  # a fresh machine may have no package lists yet
            _run(["apt-get", "update", "-q"], env=env)
            _run(install, env=env)


@contextlib.contextmanager
def _services_not_started():
    """The packages' install scripts must not start the system's own munged / slurmd: Debian's policy-rc.d hook."""
    if os.path.exists(POLICY_RC):
        yield
        return
    with open(POLICY_RC, "w") as f:
        f.write("#!/bin/sh\nexit 101\n")  # 101: action forbidden by policy
    os.chmod(POLICY_RC, 0o755)
    try:
        yield
    finally:
        os.remove(POLICY_RC)


def _run(cmd: list[str], **kw) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {done.returncode}: {(done.stderr or done.stdout)[-2000:]}")
    return done.stdout


class LocalSlurm:
    def __init__(self, cpus: int | None = None):
        self.root = tempfile.mkdtemp(prefix="avengers-slurm-")
        os.chmod(self.root, 0o755)  # munged requires the socket's folders to be searchable by everyone
        for sub, mode in (("munge", 0o700), ("run", 0o755), ("state", 0o755), ("spool", 0o755), ("log", 0o755)):
            os.mkdir(os.path.join(self.root, sub), mode)
        self.conf = os.path.join(self.root, "slurm.conf")
        self.cpus = cpus or os.cpu_count() or 1
        self.env = {**os.environ, "SLURM_CONF": self.conf}

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    # ------------------------------------------------------------ daemons
    def start(self, timeout: float = 60) -> None:
        with open(self.conf, "w") as f:
            f.write(SLURM_CONF.format(root=self.root, ctld_port=free_port(), slurmd_port=free_port(), cpus=self.cpus))
        key = self.path("munge", "munge.key")
        with open(os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400), "wb") as f:
            f.write(os.urandom(1024))
        munge = [f"--key-file={key}", f"--socket={self.path('run', 'munge.socket')}"]
        munge += [f"--pid-file={self.path('run', 'munged.pid')}", f"--log-file={self.path('log', 'munged.log')}"]
        _run(["munged", *munge, f"--seed-file={self.path('munge', 'munged.seed')}"], env=self.env)
        _run(["slurmctld", "-f", self.conf], env=self.env)
        _run(["slurmd", "-f", self.conf, "-N", "localhost"], env=self.env)
        deadline = time.monotonic() + timeout
        while self.cmd("sinfo", "-h", "-n", "localhost", "-o", "%T", check=False).strip() != "idle":
            if time.monotonic() > deadline:
                raise RuntimeError(f"the node did not become idle in {timeout} s\n{self.logs()}")
            time.sleep(0.5)

    def stop(self) -> None:
        """Cancels every job, ends the daemons, kills whatever of this cluster still runs, removes the folder."""
        if os.path.exists(self.path("run", "slurmctld.pid")):
            jobs = self.cmd("squeue", "-h", "-o", "%i", check=False).split()
            if jobs:
                self.cmd("scancel", *jobs, check=False)
                deadline = time.monotonic() + 45  # KillWait (30 s), then SIGKILL
                while self.cmd("squeue", "-h", "-o", "%i", check=False).split() and time.monotonic() < deadline:
                    time.sleep(0.5)
        ours = f"SLURM_CONF={self.conf}"
        for name in ("slurmd", "slurmctld", "munged"):
            pid_file = self.path("run", f"{name}.pid")
            if os.path.exists(pid_file):
                with open(pid_file) as f:
                    pid = int(f.read().split()[0])
                if _environ_has(pid, ours):  # not a stale file naming someone else's process
                    _terminate(pid)
        leftovers = [pid for pid in _all_pids() if _environ_has(pid, ours)]
        for pid in leftovers:
            _terminate(pid, grace=0)
        shutil.rmtree(self.root, ignore_errors=True)
        if leftovers:
            raise RuntimeError(f"killed processes that outlived the local Slurm cluster: {leftovers}")

    def logs(self, tail: int = 3000) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd.log", "munged.log"):
            path = self.path("log", name)
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    out.append(f"--- {name}\n{f.read()[-tail:]}")
        return "\n".join(out)

    # ------------------------------------------------------------ jobs
    def cmd(self, *args: str, check: bool = True) -> str:
        """A Slurm command against this cluster; its stdout."""
        if check:
            return _run(list(args), env=self.env)
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True).stdout

    def sbatch(self, *args: str, env: dict[str, str] | None = None, cwd: str | None = None) -> int:
        out = _run(["sbatch", "--parsable", *args], env={**self.env, **(env or {})}, cwd=cwd)
        return int(out.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...)."""
        return dict(re.findall(r"(\w+)=(\S*)", self.cmd("scontrol", "-o", "show", "job", str(job_id))))

    def wait(self, job_id: int, timeout: float) -> dict[str, str]:
        """Waits for the job to end (through requeues); returns its final `job()`."""
        deadline = time.monotonic() + timeout
        while (info := self.job(job_id))["JobState"] not in FINAL_STATES:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {info['JobState']} after {timeout} s\n{self.logs()}")
            time.sleep(0.5)
        return info


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]


def _environ_has(pid: int, entry: str) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return entry.encode() in f.read().split(b"\0")
    except OSError:  # gone, or not ours to read
        return False


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _terminate(pid: int, grace: float = 15) -> None:
    """SIGTERM, up to `grace` seconds to exit, then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM if grace else signal.SIGKILL)
    deadline = time.monotonic() + grace
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
