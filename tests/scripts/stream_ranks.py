"""Run under torchrun: every rank streams its batches, with one collective per step (unequal
batch counts would hang here, and the process group's timeout turns a hang into a failure).

Epoch 0 runs whole; epoch 1 stops after STOP steps, saves the loader state, and a new loader
resumes from it. Each rank writes what it saw to OUT/rank-R.json.
"""
import json
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from fla_ds.config import load_config
from fla_ds.stream import ShardStream


def ids_of(stream, limit=None):
    seen = []
    for step, batch in enumerate(stream):
        flag = torch.ones(1)
        dist.all_reduce(flag)  # a step every rank must take
        seen.append([i for i, v in zip(batch.id, batch.valid.tolist()) if v])
        if limit is not None and step + 1 == limit:
            break
    return seen


def main():
    shards, out, stop, train = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "train"
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load_config(None, [f"stream.shards={shards}", "train.micro_batch=2", "stream.num_workers=2", f"stream.train={train}"])
    stream = ShardStream.from_config(cfg, rank, world)
    stream.set_epoch(0)
    epoch0 = ids_of(stream)
    stream.set_epoch(1)
    uninterrupted = ids_of(stream)
    stream = ShardStream.from_config(cfg, rank, world)
    stream.set_epoch(1)
    before = ids_of(stream, limit=stop)
    state = json.loads(json.dumps(stream.state_dict()))  # as a checkpoint would carry it
    resumed = ShardStream.from_config(cfg, rank, world)
    resumed.load_state_dict(state)
    after = ids_of(resumed)
    with open(f"{out}/rank-{rank}.json", "w") as f:
        json.dump({"epoch0": epoch0, "uninterrupted": uninterrupted, "before": before, "after": after}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
