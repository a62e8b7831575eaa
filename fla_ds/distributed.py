"""Who am I in the job: ranks from whichever launcher started us, and the process group.

The same script runs under the deepspeed launcher (RANK/LOCAL_RANK/WORLD_SIZE in the
environment, ``--local_rank`` on the command line), torchrun (the same variables), srun (one
task per rank: SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS, master from the job's node list, port
from the job id) and as a plain single process. GPUs use NCCL, CPUs gloo.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch


@dataclass(frozen=True)
class Placement:
    rank: int
    local_rank: int
    world_size: int
    launcher: str


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list ('gpu[03-05,07]' -> 'gpu03'), via scontrol when
    present (it knows every syntax), else by expanding the common bracket form."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return first_host_of(nodelist)


def first_host_of(nodelist: str) -> str:
    """The first host of a Slurm node list in its common forms, without scontrol: 'n1,n2',
    'gpu[03-05,07]', 'gpu[03-05,07],cpu01' (zero padding kept)."""
    head = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist[: nodelist.index("]") + 1]
    if "[" not in head:
        return head
    prefix, ranges = head.split("[", 1)
    first = ranges.rstrip("]").split(",")[0].split("-")[0]
    return prefix + first


def slurm_port(job_id: str) -> int:
    """A port that two jobs sharing a node are unlikely to both pick."""
    return 20000 + int(job_id) % 20000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def detect_placement(local_rank_arg: int = -1, configure: bool = True) -> Placement:
    """This process's place in the job, from the launcher's environment. ``configure`` also
    sets MASTER_ADDR/MASTER_PORT where the launcher left them unset (srun, one process)."""
    env = dict(os.environ) if not configure else os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        local = int(env.get("LOCAL_RANK", local_rank_arg if local_rank_arg >= 0 else 0))
        launcher = "deepspeed" if local_rank_arg >= 0 else "torchrun"
        return Placement(int(env["RANK"]), local, int(env["WORLD_SIZE"]), launcher)
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        env.setdefault("MASTER_ADDR", first_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1"))))
        env.setdefault("MASTER_PORT", str(slurm_port(env.get("SLURM_JOB_ID", "0"))))
        return Placement(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", "0")), int(env["SLURM_NTASKS"]), "srun")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(_free_port()))
    return Placement(0, 0, 1, "single")


PORT_TRIES = 5
"""How many free ports a single-process launch tries when another process takes the one it picked."""

OP_BUILD_WAIT_S = 600
"""How long a launch waits for another process's build of a DeepSpeed op before calling its
lock stale (a build takes about a minute)."""


def extension_dir() -> Path:
    """Where DeepSpeed's JIT-built ops live: ``TORCH_EXTENSIONS_DIR``, by default a folder of
    this Python environment (so environments never rebuild or lock each other's ops)."""
    if not os.environ.get("TORCH_EXTENSIONS_DIR"):
        os.environ["TORCH_EXTENSIONS_DIR"] = str(Path(sys.prefix) / "torch_extensions")
    return Path(os.environ["TORCH_EXTENSIONS_DIR"])


def op_build_locks(root: Path) -> list[Path]:
    """Lock files of op builds in progress, or left by a killed build (torch's FileBaton)."""
    # <root>/<op>/lock with TORCH_EXTENSIONS_DIR set, <root>/py311_cpu/<op>/lock by default
    return sorted([*root.glob("*/lock"), *root.glob("*/*/lock")]) if root.is_dir() else []


def age(path: Path) -> float:
    """Seconds since ``path`` was last modified (0 when it is gone)."""
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def building(folder: Path) -> bool:
    """Whether a live process is compiling in ``folder`` (ninja or a compiler started there)."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if os.readlink(proc / "cwd") == str(folder) or str(folder) in (proc / "cmdline").read_bytes().decode(errors="replace"):
                return True
        except OSError:
            continue
    return False


def prepare_op_builds(wait_s: float = OP_BUILD_WAIT_S, poll_s: float = 2.0) -> str:
    """Before DeepSpeed builds its CPU ops (the shared-memory communication op on a CPU
    machine's first launch, about 30 s; ``cpu_adam`` with optimizer offload): use this
    environment's extension folder, announce a first build, and wait a bounded time for
    another process's build. A lock that no live process is building behind (a killed build
    leaves one, and every later launch would wait forever) is a LaunchError saying what to
    remove. Returns a line for ``--check``."""
    from fla_ds.preflight import LaunchError

    root = extension_dir()
    deadline = time.monotonic() + wait_s
    idle: dict[Path, int] = {}  # polls in a row that saw no process building behind a lock
    while locks := op_build_locks(root):
        for lock in locks:
            idle[lock] = 0 if building(lock.parent) else idle.get(lock, 0) + 1
        stale = [lock for lock in locks if idle[lock] >= 3 and age(lock) > 10]
        if stale or time.monotonic() > deadline:
            lock = (stale or locks)[0]
            raise LaunchError(f"DeepSpeed op build lock {lock} was left by a killed build (no process is building there): "
                              f"remove {lock.parent} and launch again")
        print(f"fla_ds: waiting for another process's DeepSpeed op build ({locks[0].parent})", file=sys.stderr, flush=True)
        time.sleep(poll_s)
    if not torch.cuda.is_available() and not list(root.glob("**/deepspeed_shm_comm*.so")):
        print(f"fla_ds: DeepSpeed builds its CPU communication op once into {root} (about 30 s)", file=sys.stderr, flush=True)
    return f"DeepSpeed ops: {root}"


def init_distributed(local_rank_arg: int = -1, timeout_s: int = 1800) -> Placement:
    """Set the rank variables DeepSpeed reads, pick the device and start the process group."""
    import deepspeed

    prepare_op_builds()  # DeepSpeed builds its CPU op inside init_distributed: never wait forever on it
    port_is_ours = "MASTER_PORT" not in os.environ
    placement = detect_placement(local_rank_arg)
    os.environ.update(RANK=str(placement.rank), LOCAL_RANK=str(placement.local_rank), WORLD_SIZE=str(placement.world_size))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(placement.local_rank)
    # The timeout bounds every collective: a rank that dies makes the others fail, not hang.
    for attempt in range(PORT_TRIES):
        try:
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timedelta(seconds=timeout_s))
            return placement
        except torch.distributed.DistNetworkError as exc:
            # One process picked a free port, and another process on the machine bound it before
            # the store did: pick again (only a port we chose ourselves, a bounded number of times).
            if not (port_is_ours and placement.launcher == "single" and "EADDRINUSE" in str(exc)) or attempt == PORT_TRIES - 1:
                raise
            os.environ["MASTER_PORT"] = str(_free_port())
    return placement


def rank() -> int:
    """This process's rank in the process group (0 without one)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The process group's size (1 without one)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    """Wait for every rank (nothing without a process group); bounded by the group's timeout."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextmanager
def gathered(params):
    """These parameters whole on every rank for the duration: one collective under ZeRO-3
    (every rank must enter), a no-op for parameters ZeRO-3 does not partition."""
    import deepspeed

    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


def shutdown() -> None:
    """barrier + destroy: without it a finished run occasionally aborted at exit."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
