"""A real two-node Slurm cluster on this machine, for testing slurm/*.sh (not a mock).

Debian's Slurm and MUNGE are installed when missing, then started by hand under a private
folder: ``munged``, ``slurmctld`` and one ``slurmd`` per node ("n1", "n2", both on 127.0.0.1,
on free ports). The node names must resolve inside jobs (the scripts derive the master address
from the node list), so each daemon runs in its own mount namespace with a bind-mounted copy of
/etc/hosts that adds them: the machine's /etc/hosts is never touched, and job processes, being
children of slurmd, see the copy. Two fake GPUs per node (``/dev/null`` links) let
``--gpus-per-node`` be accounted as on a GPU cluster; no GPU is behind them.

Every wait is bounded; ``stop`` cancels the jobs by id, waits for them, then stops each daemon
by the PID it was started with. docs/cluster.md lists the traps met on the way.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun"]
NODES = ("n1", "n2")


class Unavailable(RuntimeError):
    """This machine cannot run the daemons (the reason is the message)."""


def _run(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def ensure_installed(timeout: float = 600) -> None:
    """Install Slurm and MUNGE from Debian when any binary is missing (root and apt needed)."""
    if all(shutil.which(b) for b in BINARIES):
        return
    if os.geteuid() != 0:
        raise Unavailable("Slurm is not installed and installing it needs root")
    if not shutil.which("apt-get"):
        raise Unavailable("Slurm is not installed and there is no apt-get to install it")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    proc = _run(install, timeout, env=env)
    if proc.returncode != 0:  # a stale or empty package list: refresh once and retry
        _run(["apt-get", "update"], timeout, env=env)
        proc = _run(install, timeout, env=env)
    if proc.returncode != 0 or not all(shutil.which(b) for b in BINARIES):
        raise Unavailable(f"installing {' '.join(PACKAGES)} failed: {(proc.stderr or proc.stdout)[-500:]}")


def free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SlurmCluster:
    def __init__(self, base: Path, cpus_per_node: int = 4, gpus_per_node: int = 2):
        self.base = base
        self.cpus, self.gpus = cpus_per_node, gpus_per_node
        self.conf = base / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.jobs: list[str] = []
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        for key in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF"]:
            del self.env[key]  # a pytest run inside a Slurm job must not leak its own job into ours

    # ------------------------------------------------------------------ set-up

    def write_config(self) -> None:
        b = self.base
        for sub in ("munge", "state", "spool", "log"):
            (b / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(b, 0o755)
        os.chmod(b / "munge", 0o755)  # munged's socket folder must be traversable
        key = b / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        hosts = b / "hosts"
        hosts.write_text(Path("/etc/hosts").read_text() + "\n127.0.0.1 " + " ".join(NODES) + "\n")
        ctld_port, *node_ports = free_ports(1 + len(NODES))
        node_lines, gres_lines = [], []
        for name, port in zip(NODES, node_ports):
            devices = b / "fakedev" / name
            devices.mkdir(parents=True, exist_ok=True)
            for i in range(self.gpus):
                link = devices / f"nvidia{i}"
                if not link.is_symlink():
                    link.symlink_to("/dev/null")  # gres files must be devices: plain files are refused
            node_lines.append(f"NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} CPUs={self.cpus} "
                              f"RealMemory=8000 Gres=gpu:{self.gpus} State=UNKNOWN")
            gres_lines.append(f"NodeName={name} Name=gpu File={devices}/nvidia[0-{self.gpus - 1}]")
        (b / "gres.conf").write_text("\n".join(gres_lines) + "\n")
        self.conf.write_text("\n".join([
            "ClusterName=flatest",
            "SlurmctldHost=localhost",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"SlurmctldPort={ctld_port}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={b}/munge/munge.sock,cred_expire=10",
            f"StateSaveLocation={b}/state",
            f"SlurmdSpoolDir={b}/spool/%n",
            f"SlurmctldPidFile={b}/slurmctld.pid",
            f"SlurmdPidFile={b}/slurmd.%n.pid",
            f"SlurmctldLogFile={b}/log/slurmctld.log",
            f"SlurmdLogFile={b}/log/slurmd.%n.log",
            "MailProg=/bin/true",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={b}/log/jobcomp.txt",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=2,bf_interval=2",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "ReturnToService=2",
            "JobRequeue=1",
            "MinJobAge=600",  # finished jobs stay visible to scontrol show job while tests read them
            "KillWait=30",
            "SlurmdParameters=config_overrides",  # nodes may claim more CPUs than the host has
            "CommunicationParameters=NoInAddrAny",
            "GresTypes=gpu",
            *node_lines,
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO",
        ]) + "\n")

    def _in_private_hosts(self, cmd: list[str]) -> list[str]:
        """cmd in a new mount namespace whose /etc/hosts is our copy (unshare execs in place,
        so the PID we keep is the daemon's)."""
        script = 'mount --bind "$0" /etc/hosts && exec "$@"'
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(self.base / "hosts"), *cmd]

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.base / "log" / f"{name}.out", "wb")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=self.env, start_new_session=True)
        log.close()

    def start(self, timeout: float = 30) -> None:
        if os.geteuid() != 0:
            raise Unavailable("the Slurm daemons need root")
        probe = _run(self._in_private_hosts(["true"]), 10) if (self.base / "hosts").exists() else None
        if probe is None or probe.returncode != 0:
            raise Unavailable(f"cannot give the daemons a private /etc/hosts (unshare --mount): {probe.stderr if probe else 'no hosts copy'}")
        b = self.base
        self._spawn("munged", ["munged", "-F", f"--socket={b}/munge/munge.sock", f"--key-file={b}/munge/munge.key",
                               f"--pid-file={b}/munge/munged.pid", f"--seed-file={b}/munge/munged.seed", f"--log-file={b}/log/munged.log"])
        self._wait_for(lambda: (b / "munge" / "munge.sock").exists(), timeout, "munged to open its socket")
        self._spawn("slurmctld", self._in_private_hosts(["slurmctld", "-D", "-f", str(self.conf)]))
        for node in NODES:
            self._spawn(f"slurmd.{node}", self._in_private_hosts(["slurmd", "-D", "-f", str(self.conf), "-N", node]))
        self._wait_for(lambda: len(self.idle_nodes()) >= len(NODES), timeout, "both nodes to be idle")

    def _wait_for(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [name for name, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited while waiting for {what}: {self.logs_tail()}")
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}: {self.logs_tail()}")

    def idle_nodes(self) -> set[str]:
        proc = self.cmd(["sinfo", "-h", "-N", "-t", "idle", "-o", "%N"], check=False)
        return set(proc.stdout.split()) if proc.returncode == 0 else set()

    def logs_tail(self, chars: int = 1500) -> str:
        text = ""
        for path in sorted((self.base / "log").glob("*")):
            if path.is_file():
                text += f"\n--- {path.name}\n" + path.read_text(errors="replace")[-chars:]
        return text

    # ------------------------------------------------------------------ jobs

    def cmd(self, args: list[str], check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
        proc = _run(args, timeout, env=kw.pop("env", self.env), **kw)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr or proc.stdout}")
        return proc

    def sbatch(self, args: list[str], cwd: Path, env: dict | None = None) -> str:
        """Submit; returns the job id (never --wait: it polls with growing sleeps)."""
        proc = self.cmd(["sbatch", "--parsable", *args], cwd=cwd, env=env or self.env)
        job = proc.stdout.strip().split(";")[0]
        self.track(job)
        return job

    def track(self, job: str) -> None:
        self.jobs.append(job)

    def show_job(self, job: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (for an array: its first task's record)."""
        out = self.cmd(["scontrol", "show", "job", "-o", job]).stdout.splitlines()[0]
        return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", out))

    def job_states(self, job: str) -> list[str]:
        """States of every task of a job (or array) still listed."""
        proc = self.cmd(["scontrol", "show", "job", "-o", job], check=False)
        return re.findall(r"JobState=(\S+)", proc.stdout) if proc.returncode == 0 else []

    def in_queue(self, job: str) -> bool:
        proc = self.cmd(["squeue", "-h", "-j", job, "-o", "%i %T"], check=False)
        return bool(proc.stdout.strip())

    def wait_done(self, job: str, timeout: float) -> dict[str, str]:
        """Poll until the job (and every array task) left the queue; its final record."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.in_queue(job):
                return self.show_job(job)
            time.sleep(0.5)
        raise TimeoutError(f"job {job} still queued after {timeout:.0f} s: {self.cmd(['scontrol', 'show', 'job', job], check=False).stdout}")

    def wait_state(self, job: str, state: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = self.job_states(job)
            if state in states:
                return
            if states and all(s in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY") for s in states):
                raise AssertionError(f"job {job} ended ({states}) before reaching {state}")
            time.sleep(0.3)
        raise TimeoutError(f"job {job} not {state} after {timeout:.0f} s")

    # ------------------------------------------------------------------ tear-down

    def cancel_all(self, timeout: float = 60) -> None:
        """Cancel every job of this (private) controller by id and wait until none is left:
        job processes would otherwise outlive slurmd."""
        if "slurmctld" not in self.procs or self.procs["slurmctld"].poll() is not None:
            return
        listed = self.cmd(["squeue", "-h", "-o", "%A"], check=False).stdout.split()
        ids = sorted(set(listed) | set(self.jobs))
        if ids:
            self.cmd(["scancel", *ids], check=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.cmd(["squeue", "-h", "-o", "%A"], check=False).stdout.strip():
            time.sleep(0.5)

    def stop(self) -> None:
        try:
            self.cancel_all()
        finally:
            # Nodes first, then the controller, munged last (the others authenticate through it).
            order = [f"slurmd.{n}" for n in NODES] + ["slurmctld", "munged"]
            for name in order:
                proc = self.procs.get(name)
                if proc is None or proc.poll() is not None:
                    continue
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)


def start_cluster(base: Path) -> SlurmCluster:
    """Install when needed, write the config under ``base`` and start; raises Unavailable with
    the reason when this machine cannot run the daemons."""
    if os.geteuid() != 0 and not all(shutil.which(b) for b in BINARIES):
        raise Unavailable("Slurm is not installed and installing it needs root")
    if os.geteuid() != 0:
        raise Unavailable("the Slurm daemons (slurmd runs jobs as any user) need root")
    if not shutil.which("unshare"):
        raise Unavailable("unshare (util-linux) is needed to give the daemons a private /etc/hosts")
    ensure_installed()
    cluster = SlurmCluster(base)
    cluster.write_config()
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    return cluster
