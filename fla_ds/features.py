"""Video shards -> feature cache for stage 2: ``fla-ds features extract``.

Stage 2 keeps the stage-1 encoder frozen, so its output for a clip can be computed once and
streamed instead of video (no JPEG decoding, no ResNet in the stage-2 step). The cache is a
shard folder the loader (fla_ds.stream) reads like video shards:

- ``<split>-v<view>-r<rank>-%06d.tar``: samples ``<key>.json`` (id, text, num_frames = T, dim =
  D, dtype, view, source plan fingerprint) and ``<key>.features``, the (T, D) array as raw
  little-endian float16 (fla_ds.shards.format; no pickle). Keys are the video shards' keys.
- ``index.json`` in the video index's layout (``splits.<split>.shards[]`` with name, samples,
  frames, bytes, sha256, plus view), with ``"kind": "features"``, the views, the checkpoint's
  path and hashes, and the source shards' fingerprint.

Views: view 0 is what evaluation sees (uniform frame sampling, centre crop); view v >= 1 is a
training augmentation, the one the loader draws at epoch v under ``seed`` (deterministic).
Each view reads the split in the evaluation plan (every clip once, in index order), so all
views are laid out alike; a training epoch then reads every clip from one seeded view.

Distributed (torchrun): each rank encodes the clips its evaluation plan gives it (padding
repeats skipped) into its own shards, and records them in ``.parts/``; after a barrier rank 0
writes the index. Every file is written under a temporary name and renamed, the index last; the
split's old index entry is removed first, so an interrupted extraction leaves no index that
points at half-rewritten shards.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from fla_ds.atomic import atomic_write_json, folder_lock, sha256_file, tmp_name
from fla_ds.augment import Augment
from fla_ds.batch import VideoBatch, prepare_features
from fla_ds.corpus.base import canonical_split
from fla_ds.distributed import barrier
from fla_ds.model import VisualEncoder
from fla_ds.shards.format import FEATURE_DTYPE, ShardWriter
from fla_ds.shards.index import load_index, read_index
from fla_ds.stream import ShardStream

log = logging.getLogger("fla_ds")

EXTRACTOR_VERSION = 2


class FeatureError(ValueError):
    """The cache cannot be written as asked; one line."""


# ------------------------------------------------------------------ the frozen encoder


def load_encoder(step_dir: Path) -> tuple[VisualEncoder, object]:
    """The stage-1 checkpoint's encoder (eval mode: BatchNorm running statistics, so a clip's
    features do not depend on its batch mates) and the checkpoint's config, in float32. The
    step folder is verified first (``fla_ds.artifacts``); raises ArtifactError naming the file."""
    from fla_ds.artifacts import verify_folder
    from fla_ds.model import load_frozen_encoder

    verify_folder(step_dir)
    return load_frozen_encoder(step_dir, torch.float32)


def checkpoint_record(step_dir: Path) -> dict:
    model = step_dir / "model.safetensors"
    return {
        "path": str(step_dir.resolve()),
        "encoder_sha256": sha256_file(step_dir / "encoder.safetensors"),
        "model_sha256": sha256_file(model) if model.is_file() else None,
    }


@torch.no_grad()
def encode_batch(encoder: VisualEncoder, batch: VideoBatch, augment: Augment) -> Iterator[tuple[int, np.ndarray]]:
    """(position in the batch, (T, D) float16 features) of every valid clip. Computed in
    float32; float16 is only the storage."""
    dev = next(encoder.parameters()).device
    features, mask = prepare_features(batch, encoder, augment, torch.float32, dev)
    features, lengths = features.float().cpu(), mask.sum(1).tolist()
    for i, valid in enumerate(batch.valid.tolist()):
        if not valid:  # evaluation padding repeats a clip another rank encodes
            continue
        half = features[i, : lengths[i]].to(torch.float16)
        if not torch.isfinite(half).all():
            raise FeatureError(f"clip '{batch.id[i]}': features overflow float16 (max |x| {features[i].abs().max():.3g})")
        yield i, half.numpy()


# ------------------------------------------------------------------ writing shards


class ShardSeries:
    """One rank's shards of one view: ``samples_per_shard`` samples each, each written under a
    temporary name and renamed when complete; ``records`` lists the completed ones."""

    def __init__(self, out: Path, split: str, view: int, rank: int, samples_per_shard: int):
        self.out, self.prefix, self.per = out, f"{split}-v{view}-r{rank:03d}", samples_per_shard
        self.view, self.rank = view, rank
        self.records: list[dict] = []
        self._file = self._writer = None
        self._samples = self._frames = 0

    def name(self, number: int) -> str:
        return f"{self.prefix}-{number:06d}.tar"

    def add(self, key: str, meta: dict, features: np.ndarray) -> None:
        if self._writer is None:
            self._file = open(tmp_name(self.out / self.name(len(self.records))), "wb")
            self._writer = ShardWriter(self._file)
        self._writer.write(key, meta, features.astype("<f2").tobytes(), suffix="features")
        self._samples += 1
        self._frames += features.shape[0]
        if self._samples == self.per:
            self.close()

    def close(self) -> list[dict]:
        if self._writer is None:
            return self.records
        self._writer.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        final = self.out / self.name(len(self.records))
        os.replace(self._file.name, final)
        self.records.append({"name": final.name, "samples": self._samples, "frames": self._frames, "bytes": final.stat().st_size,
                             "sha256": sha256_file(final), "view": self.view, "rank": self.rank})
        self._file = self._writer = None
        self._samples = self._frames = 0
        return self.records


def extract_view(encoder: VisualEncoder, stream: ShardStream, series: ShardSeries, view: int, source: str) -> list[dict]:
    for batch in stream:
        for i, features in encode_batch(encoder, batch, stream.augment):
            meta = {"id": batch.id[i], "text": batch.text[i], "num_frames": int(features.shape[0]), "dim": int(features.shape[1]),
                    "dtype": FEATURE_DTYPE, "view": view, "source": source}
            series.add(batch.key[i], meta, features)
    return series.close()


def view_stream(stage1_cfg, shards: Path, split: str, view: int, rank: int, world: int, batch_size: int, num_workers: int, seed: int) -> ShardStream:
    """The split in the evaluation plan (every clip once, same order for every view), read
    with the checkpoint's own ``augment`` section; views >= 1 augmented as training epoch
    ``view`` would be."""
    cfg = OmegaConf.merge(stage1_cfg.stream, {"shards": str(shards), "split": split, "num_workers": num_workers, "train": False, "seed": seed})
    stream = ShardStream(cfg, rank, world, batch_size, Augment(stage1_cfg.augment), random_augment=view > 0)
    stream.set_epoch(view)
    return stream


# ------------------------------------------------------------------ the index


def run_fingerprint(source_fp: str, checkpoint: dict, split: str, views: int, seed: int, world: int, per: int, settings: dict) -> str:
    """Everything that decides which clip lands where, and its features; the same on every rank."""
    return hashlib.sha256(json.dumps({"extractor": EXTRACTOR_VERSION, "source": source_fp, "encoder": checkpoint["encoder_sha256"], "split": split,
                                      "views": views, "seed": seed, "world": world, "samples_per_shard": per, "settings": settings},
                                     sort_keys=True).encode()).hexdigest()


def part_path(out: Path, split: str, rank: int) -> Path:
    return out / ".parts" / f"{split}-r{rank:03d}.json"


def gather_records(out: Path, split: str, world: int, run: str) -> list[dict]:
    """Every rank's shard records, in (view, rank, number) order: the order in which each
    view lists the clips, which is the video split's evaluation order."""
    records = []
    for rank in range(world):
        path = part_path(out, split, rank)
        part = json.loads(path.read_text("utf-8")) if path.is_file() else {}
        if part.get("run") != run:
            raise FeatureError(f"{path}: rank {rank} has not finished this extraction")
        records += part["records"]
    return sorted(records, key=lambda r: (r["view"], r["rank"], r["name"]))


def split_entry(records: list[dict], run: str, meta: dict) -> dict:
    views = meta["views"]
    return {
        **meta,
        "kind": "features",
        "plan_fingerprint": hashlib.sha256((run + "".join(f"\x00{r['name']}\x01{r['samples']}" for r in records)).encode()).hexdigest(),
        "shards": [{k: r[k] for k in ("name", "samples", "frames", "bytes", "sha256", "view")} for r in records],
        "clips": sum(r["samples"] for r in records) // views,
        "samples": sum(r["samples"] for r in records),
        "frames": sum(r["frames"] for r in records),
        "bytes": sum(r["bytes"] for r in records),
    }


def check_out_folder(out: Path, shards: Path) -> None:
    """Refuse to write over video shards; every rank checks before any collective, so that
    none is left waiting at a barrier for one that refused."""
    index = out / "index.json"
    if out.resolve() == shards.resolve() or (os.path.lexists(index) and read_index(out).get("kind") != "features"):
        raise FeatureError(f"{out} holds video shards; write the feature cache to its own folder")


def update_index(out: Path, split: str, entry: dict | None) -> None:
    """Set (or with None remove) one split's entry; other splits stay as they are."""
    with folder_lock(out):
        path = out / "index.json"
        index = read_index(out) if os.path.lexists(path) else {"format": "fla_ds.shards", "kind": "features", "splits": {}}
        if index.get("kind") != "features":
            raise FeatureError(f"{path} indexes video shards; write the feature cache to its own folder")
        if entry is None:
            index["splits"].pop(split, None)
        else:
            index["splits"][split] = entry
        atomic_write_json(path, index)


def remove_unlisted(out: Path, split: str, entry: dict) -> None:
    """Shards of an earlier extraction of this split (another world size, more views)."""
    listed = {s["name"] for s in entry["shards"]}
    for tar in out.glob(f"{split}-v*-r*-*.tar"):
        if tar.name not in listed:
            tar.unlink()


# ------------------------------------------------------------------ the extraction


def placement(rank: int | None, world: int | None) -> tuple[int, int]:
    """(rank, world size) given, else the process group's."""
    from fla_ds.distributed import rank as group_rank
    from fla_ds.distributed import world_size

    return (group_rank() if rank is None else rank), (world_size() if world is None else world)


def extract_features(step_dir, shards, out, split: str = "train", views: int = 1, rank: int | None = None, world: int | None = None,
                     batch_size: int = 8, num_workers: int = 2, seed: int = 0, samples_per_shard: int = 256) -> dict | None:
    """Encode every clip of ``split`` in the video shards ``shards`` with the stage-1 encoder
    of ``step_dir`` into a feature cache in ``out``, ``views`` times (view 0 centre crop,
    views >= 1 seeded augmentations). Under torchrun every rank calls it (rank and world come
    from torch.distributed); returns the index entry on rank 0, None on other ranks."""
    step_dir, shards, out = Path(step_dir), Path(shards), Path(out)
    split, (rank, world) = canonical_split(split), placement(rank, world)
    if views < 1 or samples_per_shard < 1:
        raise FeatureError(f"views and samples_per_shard must be >= 1, got {views} and {samples_per_shard}")
    check_out_folder(out, shards)
    encoder, stage1_cfg = load_encoder(step_dir)
    video_entry = load_index(shards, split)
    checkpoint, source_fp = checkpoint_record(step_dir), video_entry["plan_fingerprint"]
    settings = {"augment": Augment(stage1_cfg.augment).fingerprint()}  # what the encoder's inputs were
    run = run_fingerprint(source_fp, checkpoint, split, views, seed, world, samples_per_shard, settings)
    (out / ".parts").mkdir(parents=True, exist_ok=True)
    if rank == 0:
        update_index(out, split, None)
    for stale in out.glob(f".{split}-v*-r{rank:03d}-*.tmp"):  # left by a killed run of this rank
        stale.unlink(missing_ok=True)
    barrier()
    started, records = time.perf_counter(), []
    for view in range(views):
        stream = view_stream(stage1_cfg, shards, split, view, rank, world, batch_size, num_workers, seed)
        series = ShardSeries(out, split, view, rank, samples_per_shard)
        records += extract_view(encoder, stream, series, view, source_fp)
    atomic_write_json(part_path(out, split, rank), {"run": run, "records": records})
    clips = sum(r["samples"] for r in records)
    log.info("features %s rank %d: %d clip-views in %.1f s", split, rank, clips, time.perf_counter() - started)
    barrier()
    entry = None
    if rank == 0:
        meta = {"split": split, "language": video_entry.get("language", ""),  # stage 2's default prompt follows it
                "views": views, "dim": encoder.out_dim, "dtype": FEATURE_DTYPE, "seed": seed, "world_size": world,
                "settings": settings, "checkpoint": checkpoint, "source": {"shards": str(shards.resolve()), "plan_fingerprint": source_fp}}
        entry = split_entry(gather_records(out, split, world, run), run, meta)
        update_index(out, split, entry)
        remove_unlisted(out, split, entry)
    barrier()  # no rank goes on (to train from the cache) before the index exists
    return entry
