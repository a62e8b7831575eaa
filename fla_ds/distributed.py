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
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

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


def detect_placement(local_rank_arg: int = -1) -> Placement:
    env = os.environ
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


def init_distributed(local_rank_arg: int = -1, timeout_s: int = 1800) -> Placement:
    """Set the rank variables DeepSpeed reads, pick the device and start the process group."""
    import deepspeed

    placement = detect_placement(local_rank_arg)
    os.environ.update(RANK=str(placement.rank), LOCAL_RANK=str(placement.local_rank), WORLD_SIZE=str(placement.world_size))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(placement.local_rank)
    # The timeout bounds every collective: a rank that dies makes the others fail, not hang.
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timedelta(seconds=timeout_s))
    return placement


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
