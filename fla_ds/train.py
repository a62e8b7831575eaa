"""Training entry point, the same for every launcher:

    deepspeed --num_gpus 8 fla_ds/train.py --stage 1 --config phoenix14t_stage1 train.out=runs/p1
    deepspeed --hostfile hosts fla_ds/train.py --stage 2 --config phoenix14t_llama7b_qlora
    torchrun --nproc_per_node 2 fla_ds/train.py --stage 1 --config demo
    srun python fla_ds/train.py --stage 1 ...      (ranks from SLURM_PROCID/SLURM_NTASKS)
    python fla_ds/train.py --stage 1 ...           (one process)

On CPU set OMP_NUM_THREADS (e.g. 1 per rank on 2 cores): ranks otherwise oversubscribe cores.
A run continues from its newest complete checkpoint (train.resume=auto); SIGTERM or SIGUSR1
make every rank finish its step, save and exit 0.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from fla_ds.config import ConfigError, load_config


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fla_ds/train.py", description="Train stage 1 or stage 2 of FLa-LLM")
    parser.add_argument("--stage", type=int, choices=[1, 2], required=True)
    parser.add_argument("--config", help="a YAML file, or the name of a config shipped in fla_ds/configs")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help="set by the deepspeed launcher")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
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


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:  # before any process group exists: nothing to clean up
        print(f"train.py: error: {exc}", file=sys.stderr)
        return 2
    from fla_ds.distributed import init_distributed, shutdown
    from fla_ds.trainer import Trainer

    placement = init_distributed(args.local_rank)
    setup_logging(placement.rank)
    try:
        code = Trainer(cfg, make_stage(args.stage, cfg, placement.rank), placement).fit()
    finally:
        shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
