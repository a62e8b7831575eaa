"""Training entry point, the same for every launcher:

    deepspeed --num_gpus 8 fla_ds/train.py --stage 1 --config phoenix14t_stage1 train.out=runs/p1
    deepspeed --hostfile hosts fla_ds/train.py --stage 2 --config phoenix14t_llama7b_qlora
    torchrun --nproc_per_node 2 fla_ds/train.py --stage 1 --config demo
    srun python fla_ds/train.py --stage 1 ...      (ranks from SLURM_PROCID/SLURM_NTASKS)
    python fla_ds/train.py --stage 1 ...           (one process)
    python fla_ds/train.py --check --world-size 16 --stage 1 ...   (the checks only, see below)

On CPU set OMP_NUM_THREADS (e.g. 1 per rank on 2 cores): ranks otherwise oversubscribe cores.
Before the process group starts, every rank checks the launch (fla_ds/preflight.py): a bad
config, DeepSpeed JSON, batch split, shard index, input folder or run folder is one
``error:`` line and exit code 2, with nothing written. A run continues from its newest
complete checkpoint (train.resume=auto), on any number of ranks; SIGTERM, SIGUSR1 or Ctrl-C
make every rank finish its step (or evaluation batch), save and exit 0. A checkpoint that
cannot be written is one line and exit code 3; the previous one stays latest.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time

from fla_ds.config import ConfigError, explicit_keys, load_config

LAUNCH_ERROR, SAVE_ERROR, PEER_ERROR = 2, 3, 4


PROG = "train.py"  # "fla-ds train" when entered through the fla-ds command (its errors say so)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fla_ds/train.py" if PROG == "train.py" else PROG, description="Train stage 1 or stage 2 of FLa-LLM")
    parser.add_argument("--stage", type=int, choices=[1, 2], required=True, help="1: visual encoder + Light-T; 2: frozen encoder + projector + language model")
    parser.add_argument("--config", help="a YAML file, or the name of a config shipped in fla_ds/configs")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help="set by the deepspeed launcher")
    parser.add_argument("--check", action="store_true", help="only check the launch (config, DeepSpeed JSON, batch split, "
                                                             "shards, inputs, run folder, disk) and exit")
    parser.add_argument("--world-size", type=int, default=0, help="with --check: the ranks the launch will have "
                                                                   "(default: from the launcher's environment, else 1)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of config keys, before, between or after the flags, e.g. train.epochs=5")
    return parser.parse_intermixed_args(argv)  # key=value before and after flags


def make_stage(stage: int, cfg, rank: int):
    if stage == 1:
        from fla_ds.stage1 import Stage1

        return Stage1(cfg, rank)
    from fla_ds.stage2 import Stage2

    return Stage2(cfg, rank)


def setup_logging(rank: int) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor loading bars flood Slurm logs
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format=f"[rank {rank}] %(levelname)s %(message)s", stream=sys.stderr)


LINGER_S = 10.0
"""Ranks other than 0 wait this long before exiting on a launch error: a launcher stops the
other ranks when one exits, and rank 0 must live to print the error."""


def error(rank: int, message: str) -> None:
    """One line on stderr, from rank 0 only (every rank finds the same problem)."""
    if rank == 0:
        print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    else:
        time.sleep(LINGER_S)


def preflight(args, cfg) -> tuple[int, int]:
    """(rank, world size) of this launch, after every check passed; raises LaunchError."""
    from fla_ds.distributed import detect_placement, prepare_op_builds
    from fla_ds.preflight import check_launch

    placement = detect_placement(args.local_rank, configure=False)
    world = args.world_size or placement.world_size
    facts = check_launch(cfg, args.stage, world)
    facts.append(prepare_op_builds())
    if args.check and placement.rank == 0:
        for fact in facts:
            print(f"ok: {fact}")
    return placement.rank, world


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    try:
        cfg = load_config(args.config, args.overrides)
        explicit = explicit_keys(args.config, args.overrides)
    except ConfigError as exc:  # before any process group exists: nothing to clean up
        error(rank, str(exc))
        return LAUNCH_ERROR
    from fla_ds.artifacts import ArtifactError
    from fla_ds.checkpoint import ResumeError, SaveError, enforce_weights_only
    from fla_ds.preflight import LaunchError
    from fla_ds.stage2 import inherit_stage1

    enforce_weights_only()  # nothing a checkpoint holds is ever unpickled
    try:
        notes = inherit_stage1(cfg, explicit) if args.stage == 2 else []
        rank, _ = preflight(args, cfg)
    except LaunchError as exc:
        error(rank, str(exc))
        return LAUNCH_ERROR
    if rank == 0:
        for note in notes:  # what stage 2 took from stage 1 and its shards, said once
            print(f"stage 2: {note}", flush=True)
    if args.check:
        return 0
    from fla_ds.distributed import init_distributed, shutdown
    from fla_ds.trainer import Trainer

    placement = init_distributed(args.local_rank)
    setup_logging(placement.rank)
    try:
        code = Trainer(cfg, make_stage(args.stage, cfg, placement.rank), placement).fit()
    except (SaveError, ResumeError, ArtifactError) as exc:
        # Other ranks may wait inside DeepSpeed's collectives: leave without the shutdown
        # barrier; they fail at once on the closed connection (or the launcher stops them).
        if placement.rank == 0 or linger_unstopped():
            print(f"train.py: error: {exc}", file=sys.stderr, flush=True)
        os._exit(LAUNCH_ERROR if isinstance(exc, ArtifactError) else SAVE_ERROR)
    except RuntimeError as exc:
        if peer_failed(exc):
            print(f"train.py: rank {placement.rank} stopped: another rank failed (its error is above)", file=sys.stderr, flush=True)
            os._exit(PEER_ERROR)
        raise
    shutdown()
    return code


def linger_unstopped() -> bool:
    """A rank other than 0 that failed: wait LINGER_S for the launcher to stop it (rank 0 met
    the same failure and reported it: one line for a failure every rank met, a full shared
    disk); True when nobody did, and this rank's own error must be printed."""
    import threading

    from fla_ds.trainer import StopFlag

    stopped = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, lambda *_: stopped.set())
    if StopFlag.received is None:
        stopped.wait(LINGER_S)
    return not stopped.is_set() and StopFlag.received is None


def peer_failed(exc: BaseException) -> bool:
    """A collective broke because another process died (gloo/NCCL connection errors)."""
    text = str(exc).lower()
    return any(s in text for s in ("connection closed by peer", "connection reset by peer", "broken pipe", "nccl communicator was aborted",
                                   "socket closed", "connection refused"))


if __name__ == "__main__":
    sys.exit(main())
