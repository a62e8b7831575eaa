"""Runs fla_ds/train.py's ``main`` in this process (one rank) and records every host sync the
training loop makes, for tests/test_hot_paths.py. Usage: count_syncs.py [--no-count] OUT.json
[train.py args]; --no-count records the losses only (torch.compile runs eagerly under an active
dispatch mode, so a compiled run is not counted).

A host sync is an operation whose result the host must wait for on a GPU: reading a value
(``item``, ``float``, ``int``, ``bool``: aten._local_scalar_dense), ``tolist``, and a result
whose shape depends on the data (nonzero, masked_select, boolean-mask indexing). On this CPU
nothing waits, but the same operations run, so counting them here is what a GPU would stall
on. Only ``Trainer.run_epoch`` is watched (training; epoch-end evaluation and saves are not).
Each sync is attributed by its Python stack: ``loader`` (inside the loader's own iteration:
host tensors, never the device), ``log`` (``Trainer.log_progress``), ``stop`` (``StopFlag.
agreed``), ``deepspeed`` (inside DeepSpeed), ``fla_ds`` (anywhere else in our code).

Also counts the graphs torch.compile captured (``compiled_graphs``), and records each
micro-batch's (loss_sum, n_tokens) as the stage returned them (cloned on the
device, read after the run), so the logged losses can be recomputed the way the loop logged them
before its sums moved to the device.
"""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import torch

from fla_ds import trainer as trainer_module
from fla_ds.stage1 import Stage1
from fla_ds.train import main

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: its helpers
from helpers import sync_counter  # noqa: E402

records: list[dict] = []
micro_losses: list[tuple[torch.Tensor, torch.Tensor]] = []
COUNT = sys.argv[1] != "--no-count"
ARGS = sys.argv[1:] if COUNT else sys.argv[2:]
state = {"trainer": None, "micro_batch": 0, "recording": False}


def category() -> tuple[str, str]:
    """(category, innermost fla_ds or deepspeed frame) of the current Python stack."""
    frame, names, where = sys._getframe(2), [], ""
    while frame is not None:
        path, name = frame.f_code.co_filename, frame.f_code.co_name
        names.append((path, name))
        if not where and ("/fla_ds/" in path or "/deepspeed/" in path):
            where = f"{'deepspeed' if '/deepspeed/' in path else 'fla_ds'}:{path.split('/')[-1]}:{frame.f_lineno}:{name}"
        frame = frame.f_back
    if any(p.endswith("fla_ds/stream.py") for p, _ in names):
        return "loader", where
    if any(p.endswith("fla_ds/trainer.py") and n == "log_progress" for p, n in names):
        return "log", where
    if any(p.endswith("fla_ds/trainer.py") and n == "agreed" for p, n in names):
        return "stop", where
    return where.split(":")[0] or "other", where


def record(op: str) -> None:
    trainer = state["trainer"]
    kind, where = category()
    records.append({"op": op, "kind": kind, "where": where, "micro_batch": state["micro_batch"], "step": trainer.progress.step})


original_tolist = torch.Tensor.tolist


def counted_tolist(self):
    if state["recording"] and COUNT:
        record("tolist")
    return original_tolist(self)


torch.Tensor.tolist = counted_tolist
original_run_epoch = trainer_module.Trainer.run_epoch
original_micro_batch = trainer_module.Trainer.train_micro_batch
original_loss = Stage1.loss


def run_epoch(self):
    state["trainer"], state["recording"], state["gas"] = self, True, self.gas
    try:
        with sync_counter(record) if COUNT else contextlib.nullcontext():
            return original_run_epoch(self)
    finally:
        # Not kept past the epoch: a trainer alive at exit keeps its loader's workers alive, and
        # they ignore the SIGTERM that Python's exit sends them.
        state["trainer"], state["recording"] = None, False


def train_micro_batch(self, inputs, samples):
    state["micro_batch"] += 1  # syncs from here to the next call belong to this micro-batch (or its step's end)
    return original_micro_batch(self, inputs, samples)


def loss(self, engine, inputs):
    loss_sum, n_tokens = original_loss(self, engine, inputs)
    micro_losses.append((loss_sum.detach().clone(), n_tokens.detach().clone()))
    return loss_sum, n_tokens


trainer_module.Trainer.run_epoch = run_epoch
trainer_module.Trainer.train_micro_batch = train_micro_batch
Stage1.loss = loss

if __name__ == "__main__":
    code = main(ARGS[1:])
    from torch._dynamo.utils import counters

    result = {"code": code, "gas": state["gas"], "records": records, "compiled_graphs": counters["stats"]["unique_graphs"],
              "micro_losses": [[float(a), int(b)] for a, b in micro_losses]}
    with open(ARGS[0], "w") as f:
        json.dump(result, f)
