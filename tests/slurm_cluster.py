"""A real single-node Slurm cluster on localhost for the tests: Debian's slurm-wlm and munge.

Installs the packages when missing (as root), writes a slurm.conf into a temporary directory, starts
munged, slurmctld and slurmd, and stops exactly the daemons it started, by their pid files.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path


class SlurmUnavailable(RuntimeError):
    pass


def _run(*cmd: str, env=None, check=True, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), env=env, check=check, capture_output=True, text=True, timeout=timeout)


def ensure_installed() -> None:
    if shutil.which("slurmctld") and shutil.which("munged"):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("slurm-wlm and munge are not installed and this is not root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _run("apt-get", "update", "-qq", env=env, timeout=600)
    _run("apt-get", "install", "-y", "-qq", "slurm-wlm", "munge", env=env, timeout=900)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurm:
    def __init__(self, workdir: Path):
        self.dir = workdir
        self.host = socket.gethostname().split(".")[0]
        self.conf = workdir / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.started: list[Path] = []  # pid files of the daemons this object started
        self.munge_pid: int | None = None

    def write_conf(self) -> None:
        for d in ("state", "spool", "log"):
            (self.dir / d).mkdir(parents=True, exist_ok=True)
        cpus = os.cpu_count() or 2
        self.conf.write_text(f"""\
ClusterName=twotower-test
SlurmctldHost={self.host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire: also how long Slurm holds a requeued job back (default 120 s; the requeue tests wait it out)
AuthInfo=cred_expire=10
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
StateSaveLocation={self.dir}/state
SlurmdSpoolDir={self.dir}/spool
SlurmctldPidFile={self.dir}/slurmctld.pid
SlurmdPidFile={self.dir}/slurmd.pid
SlurmctldLogFile={self.dir}/log/slurmctld.log
SlurmdLogFile={self.dir}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SchedulerType=sched/backfill
# a pending job (a requeued one whose hold is over, a dependent one) starts within seconds, not at the next
# minute's scheduling pass
SchedulerParameters=sched_interval=2,bf_interval=2
MpiDefault=none
JobRequeue=1
KillWait=60
MinJobAge=3600
NodeName={self.host} CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
""")

    def start_munge(self) -> None:
        if _run("munge", "-n", check=False).returncode == 0:
            return  # a munged is already serving
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            _run("/usr/sbin/mungekey", "--create")
            shutil.chown(key, "munge", "munge")
        _run("runuser", "-u", "munge", "--", "/usr/sbin/munged")
        pid_file = Path("/run/munge/munged.pid")
        for _ in range(50):
            if pid_file.exists():
                self.munge_pid = int(pid_file.read_text().split()[0])
                return
            time.sleep(0.1)

    def start(self) -> None:
        ensure_installed()
        self.write_conf()
        self.start_munge()
        for daemon in ("slurmctld", "slurmd"):
            _run(f"/usr/sbin/{daemon}", "-f", str(self.conf), env=self.env)
            self.started.append(self.dir / f"{daemon}.pid")
        deadline = time.time() + 60
        while time.time() < deadline:
            out = _run("sinfo", "-h", "-o", "%t", env=self.env, check=False).stdout.strip()
            if out in ("idle", "mix", "alloc"):
                return
            time.sleep(0.5)
        raise SlurmUnavailable(f"node not idle after 60 s; logs in {self.dir / 'log'}")

    def stop(self) -> None:
        for pid_file in self.started:
            try:
                os.kill(int(pid_file.read_text().split()[0]), 15)
            except (OSError, ValueError):
                pass
        if self.munge_pid:
            try:
                os.kill(self.munge_pid, 15)
            except OSError:
                pass

    # ------------------------------------------------------------ helpers for tests

    def sbatch(self, *args: str, env: dict | None = None, cwd: str | None = None) -> int:
        out = _run("sbatch", "--parsable", *args, env={**self.env, **(env or {})}, timeout=60) if cwd is None else \
            subprocess.run(["sbatch", "--parsable", *args], env={**self.env, **(env or {})}, cwd=cwd, check=True,
                           capture_output=True, text=True, timeout=60)
        return int(out.stdout.strip().split(";")[0])

    def job_state(self, job: int) -> str:
        out = _run("scontrol", "show", "job", str(job), env=self.env, check=False).stdout
        for field in out.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return "UNKNOWN"

    def wait(self, job: int, timeout: float = 600) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.job_state(job)
            if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                return state
            time.sleep(1)
        raise TimeoutError(f"job {job} still {self.job_state(job)} after {timeout}s")

    def scontrol(self, *args: str) -> str:
        return _run("scontrol", *args, env=self.env).stdout
