"""The one evaluation path: decode a split on every rank, gather, score, save.

Decoding is spread over all ranks (the loader's evaluation mode gives every rank the same
number of batches and every sample to exactly one rank; padding repeats are marked invalid),
results are gathered to every rank so that no rank waits alone in a collective, and rank 0
scores and writes ``hypotheses.tsv`` (id, hypothesis, reference; escaped TSV, fla_ds/hypotheses.py)
beside ``metrics.json``.
Used by training (dev after each epoch), by ``fla-ds evaluate`` and by stage 2.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist
from omegaconf import OmegaConf

from fla_ds.atomic import atomic_write_json, atomic_write_text
from fla_ds.batch import Batch
from fla_ds.evaluate.metrics import score
from fla_ds.hypotheses import format_records
from fla_ds.stream import ShardStream


class EvaluationInterrupted(Exception):
    """Every rank agreed to stop (a preemption signal) in the middle of an evaluation."""


def decode_split(translate: Callable[[Batch], list[str]], stream: ShardStream,
                 should_stop: Callable[[], bool] | None = None) -> list[tuple[str, str, str]]:
    """(id, hypothesis, reference) of this rank's valid samples. ``should_stop`` (a collective:
    every rank has the same number of batches) is asked before each batch; raises
    EvaluationInterrupted when it says so."""
    rows = []
    for batch in stream:
        if should_stop is not None and should_stop():
            raise EvaluationInterrupted()
        hyps = translate(batch)
        for sample_id, hyp, ref, valid in zip(batch.id, hyps, batch.text, batch.valid.tolist()):
            if valid:
                rows.append((sample_id, hyp, ref))
    return rows


def gather_rows(rows: list) -> list:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return rows
    everything = [None] * dist.get_world_size()
    dist.all_gather_object(everything, rows)
    return [row for part in everything for row in part]


EXAMPLES = 3  # translations shown beside their references after each evaluation


def write_results(out_dir: Path, rows: list[tuple[str, str, str]], metrics: dict) -> None:
    lines = format_records(("id", "hypothesis", "reference"), rows, "tsv")
    atomic_write_text(out_dir / "hypotheses.tsv", "".join(line + "\n" for line in lines))
    atomic_write_json(out_dir / "metrics.json", metrics)


def evaluate_split(translate: Callable[[Batch], list[str]], cfg, rank: int, world: int, out_dir: Path, source, split: str = "",
                   should_stop: Callable[[], bool] | None = None) -> dict:
    """Decode ``split`` (default: eval.split) of ``source`` (fla_ds.trainer.Source: the shards
    and the Augment the model reads them with) and score it. Raises EvaluationInterrupted (see
    decode_split)."""
    stream_cfg = OmegaConf.merge(cfg.stream, {"shards": source.shards, "split": split or cfg.eval.split, "train": False})
    stream = ShardStream(stream_cfg, rank, world, cfg.train.micro_batch, source.augment, limit=cfg.eval.limit)
    rows = sorted(gather_rows(decode_split(translate, stream, should_stop)))
    e = cfg.eval
    metrics = score([h for _, h, _ in rows], [r for _, _, r in rows], level=e.level.value, phoenix_period=e.phoenix_period) if rows else {"n": 0}
    if rank == 0:
        write_results(out_dir, rows, metrics)
    # a few translations beside their references for the log (not written to metrics.json)
    return {**metrics, "examples": [{"id": i, "hypothesis": h, "reference": r} for i, h, r in rows[:EXAMPLES]]}
