"""Shards -> batches on every rank: the streaming loader.

Who reads what is planned, not discovered. From the index (samples per shard), the seed and
the epoch, every process computes the same epoch order: shards in a seeded order, samples
permuted inside each shard. Ranks take equal contiguous slices of that order, so **every rank
gets the same number of batches** whatever the shard sizes (unequal counts deadlock collective
training): training drops the remainder (fewer than ranks x batch samples, different ones
each epoch), evaluation pads the last ranks with repeats marked ``valid=False`` so that every
sample is seen exactly once. A rank's batches are dealt to its DataLoader workers in
contiguous blocks (each worker reads each shard it needs once, start to finish) and the
DataLoader's round-robin interleaves them into the rank's batch order.

Mid-epoch resume (``state_dict``/``load_state_dict``, saved in every checkpoint): the state is
the epoch and how many batches were consumed. The guarantee:
- with the same ranks, batch size and workers, the resumed epoch continues with exactly the
  batches, in the order and with the augmentation, an uninterrupted run would have produced;
- with any of those changed, the samples not yet consumed are re-planned over the new layout:
  no sample is repeated and none is skipped (beyond the training remainder described above).
Augmentation draws from a random generator seeded by (seed, epoch, shard, position), so it does
not depend on which worker or rank decodes a sample.

The same planning serves the stage-2 feature cache (fla_ds.features; the index says
``"kind": "features"``): batches then carry ``features`` (B, T, D) float16 padded with zeros
and ``features_mask`` (B, T) instead of video. A cache may hold K views of every clip (view 0
the evaluation crop, views 1.. random augmentations), stored as K sets of shards laid out
alike: shard s, position i is the same clip in every view. The plan is made over clips, so
epochs, ranks and resume are exactly as for video; a training epoch reads each clip from one
view, ``pick_view(seed, epoch, clip)``, and evaluation always reads view 0.
"""
from __future__ import annotations

import random
import signal
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from fla_ds.batch import Batch, FeatureBatch, VideoBatch, collate_clips, collate_features
from fla_ds.shards.format import iter_raw_samples, parse_feature_sample, parse_sample, read_frame
from fla_ds.shards.index import load_index

Ref = tuple[int, int]  # (shard number in the index, sample position in that shard)


@dataclass(frozen=True)
class Layout:
    """How an epoch's samples are spread: it must match for an exact resume."""

    world_size: int
    batch_size: int
    workers: int


# ------------------------------------------------------------------ planning (pure functions)


def epoch_order(counts: list[int], seed: int, epoch: int, shuffle: bool) -> list[Ref]:
    """Every sample of the split once, in this epoch's order (the same on every process)."""
    if not shuffle:
        return [(s, i) for s, n in enumerate(counts) for i in range(n)]
    # str seeds are hashed with SHA-512 by random.Random: stable across processes and runs.
    rng = random.Random(f"fla_ds-epoch:{seed}:{epoch}")
    shards = list(range(len(counts)))
    rng.shuffle(shards)
    order = []
    for s in shards:
        positions = list(range(counts[s]))
        rng.shuffle(positions)
        order.extend((s, i) for i in positions)
    return order


def rank_batches(order: list[Ref], layout: Layout, rank: int, train: bool) -> list[list[tuple[Ref, bool]]]:
    """This rank's batches of (ref, valid); every rank gets the same count and shapes."""
    r, b = layout.world_size, layout.batch_size
    if train:
        per_rank = (len(order) // (r * b)) * b
        mine = [(ref, True) for ref in order[rank * per_rank : (rank + 1) * per_rank]]
    else:
        per_rank = -(-len(order) // r)
        mine = [(ref, True) for ref in order[rank * per_rank : (rank + 1) * per_rank]]
        if order:
            filler = mine[-1][0] if mine else order[-1]
            mine += [(filler, False)] * (per_rank - len(mine))
    return [mine[i : i + b] for i in range(0, len(mine), b)]


def worker_blocks(total: int, workers: int) -> list[range]:
    """Contiguous blocks of batch numbers, the first ``total % workers`` one longer."""
    q, rem = divmod(total, workers)
    blocks, start = [], 0
    for w in range(workers):
        size = q + (1 if w < rem else 0)
        blocks.append(range(start, start + size))
        start += size
    return blocks


def batch_of_step(step: int, total: int, workers: int) -> int:
    """The batch number yielded at ``step`` when the DataLoader round-robins over the blocks:
    step k comes from block k % workers, its (k // workers)-th batch."""
    return worker_blocks(total, workers)[step % workers][step // workers]


def consumed_refs(order: list[Ref], layout: Layout, steps: int, train: bool) -> set[Ref]:
    """Samples that all ranks together consumed in ``steps`` steps under ``layout``."""
    used: set[Ref] = set()
    for rank in range(layout.world_size):
        batches = rank_batches(order, layout, rank, train)
        for k in range(min(steps, len(batches))):
            used.update(ref for ref, valid in batches[batch_of_step(k, len(batches), layout.workers)] if valid)
    return used


def remaining_order(order: list[Ref], history: list[tuple[Layout, int]], train: bool) -> list[Ref]:
    """The epoch order minus what earlier layouts consumed (before a resume changed layout)."""
    for layout, steps in history:
        used = consumed_refs(order, layout, steps, train)
        order = [ref for ref in order if ref not in used]
    return order


def pick_view(seed: int, epoch: int, ref: Ref, views: int) -> int:
    """The view a training epoch reads a clip from: a function of (seed, epoch, clip) alone,
    so any rank, worker or resumed run reads the same one."""
    if views <= 1:
        return 0
    return random.Random(f"fla_ds-view:{seed}:{epoch}:{ref[0]}:{ref[1]}").randrange(views)


# ------------------------------------------------------------------ reading and decoding


@dataclass(frozen=True)
class ShardSet:
    """The shards of one split as its index lists them: ``views[v][s]`` is shard s of view v
    (video shards have one view), every view with the same ``counts``."""

    kind: str
    views: tuple[tuple[str, ...], ...]
    counts: tuple[int, ...]
    fingerprint: str

    @classmethod
    def from_index(cls, folder: str, split: str) -> ShardSet:
        """The split as ``load_index`` checked it: kind, views laid out alike (clips are found
        by (shard, position) in every view), shard files inside the folder, regular and of
        the indexed size. Raises IndexFormatError (one line; a split with no samples too)."""
        index = load_index(folder, split)
        entries = [[s for s in index["shards"] if s.get("view", 0) == view] for view in range(index["views"])]
        paths = tuple(tuple(str(Path(folder) / s["name"]) for s in view) for view in entries)
        return cls(index["kind"], paths, tuple(s["samples"] for s in entries[0]), index["plan_fingerprint"])

    @property
    def payload(self) -> str:
        return "features" if self.kind == "features" else "frames"


class _EpochDataset(IterableDataset):
    """One rank's batches of one epoch, from ``start_step`` on; each worker takes every
    ``workers``-th step, so that the DataLoader's round-robin yields them in step order."""

    def __init__(self, stream: ShardStream, batches: list, start_step: int):
        self.shards, self.batches, self.start_step = stream.shards, batches, start_step
        self.workers, self.epoch, self.seed = stream.cfg.num_workers, stream.epoch, stream.cfg.seed
        self.augment, self.random_augment = stream.augment, stream.random_augment
        self.views = len(self.shards.views) if stream.cfg.train else 1  # evaluation reads view 0 only

    def view_of(self, ref: Ref) -> int:
        return pick_view(self.seed, self.epoch, ref, self.views)

    def my_steps(self) -> list[int]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        total = len(self.batches)
        # A resumed loader restarts at worker 0: rotate so worker 0 serves step start_step.
        return [k for k in range(self.start_step + worker, total, max(1, self.workers))]

    def __iter__(self) -> Iterator[Batch]:
        total, workers = len(self.batches), max(1, self.workers)
        chosen = [(k, self.batches[batch_of_step(k, total, workers)]) for k in self.my_steps()]
        raw = _RunReader(self.shards, [ref for _, batch in chosen for ref, _ in batch], self.view_of)
        for k, batch in chosen:
            yield self._collate(k, [(self.decode_sample(ref, raw.take(ref)), valid) for ref, valid in batch])

    def decode_sample(self, ref: Ref, raw: dict) -> dict:
        if self.shards.kind == "features":
            return self.decode_features(ref, raw)
        return self.decode_video(ref, raw)

    def decode_features(self, ref: Ref, raw: dict) -> dict:
        view = self.view_of(ref)
        meta, features = parse_feature_sample(self.shards.views[view][ref[0]], raw)
        return {"features": features, "id": meta.get("id", raw["__key__"]), "text": meta["text"], "key": raw["__key__"], "view": view}

    def decode_video(self, ref: Ref, raw: dict) -> dict:
        shard = self.shards.views[0][ref[0]]
        meta, pack = parse_sample(shard, raw)
        rng = random.Random(f"fla_ds-sample:{self.seed}:{self.epoch}:{ref[0]}:{ref[1]}")
        clip, affine = clip_from_pack(meta, pack, self.augment, rng, self.random_augment, where=f"{shard}: member '{raw['__key__']}.frames'")
        return {"video": clip, "affine": affine, "id": meta["id"], "text": meta["text"], "key": raw["__key__"]}

    def _collate(self, step: int, items: list[tuple[dict, bool]]) -> Batch:
        common = {
            "text": [s["text"] for s, _ in items],
            "id": [s["id"] for s, _ in items],
            "key": [s["key"] for s, _ in items],
            "valid": torch.tensor([v for _, v in items]),
            "step": step,
            "epoch": self.epoch,
        }
        if self.shards.kind == "features":
            features, mask = collate_features([s["features"] for s, _ in items])
            return FeatureBatch(features, mask, torch.tensor([s["view"] for s, _ in items]), **common)
        video, mask = collate_clips([s["video"] for s, _ in items])
        affine = torch.tensor([s["affine"] for s, _ in items]) if self.random_augment else None
        return VideoBatch(video, mask, affine, **common)


def clip_from_pack(meta: dict, pack, augment, rng: random.Random, train: bool, where: str = "clip") -> tuple[np.ndarray, list | None]:
    """One clip as the model's loader sees it: ``augment``'s frames (T/4) sampled, decoded and
    cropped (uint8 (T, S, S, 3)), and the training warp's matrix (None when ``train`` is
    False). Also used by ``fla-ds translate``, so that inference preprocesses exactly like
    evaluation. Each JPEG's size is checked against ``meta`` (width, height) before it is
    decoded; raises ShardFormatError naming ``where`` and the frame otherwise."""
    indices = augment.frame_indices(len(pack), rng, train)
    box, affine = augment.crop(meta["width"], meta["height"], rng, train)
    side = box[2] - box[0]
    clip = np.empty((len(indices), side, side, 3), dtype=np.uint8)
    for t, i in enumerate(indices):
        clip[t] = read_frame(pack, i, meta, where, box)
    return clip, affine


class _RunReader:
    """Raw samples in the order a worker needs them: each run of consecutive samples from
    one shard is read in one pass over that shard (over each view's copy of it that the run
    reads from), keeping only those samples (raw bytes, at most one shard's worth in memory)."""

    def __init__(self, shards: ShardSet, refs: list[Ref], view_of):
        self.shards, self.pending, self.view_of = shards, refs, view_of
        self.cursor = 0
        self.cache: dict[Ref, dict] = {}
        self.uses = Counter(refs)  # evaluation padding repeats a sample

    def take(self, ref: Ref) -> dict:
        while ref not in self.cache:
            if self.cursor >= len(self.pending):
                raise KeyError(f"sample {ref} was not planned for this worker")
            self._read_next_run()
        self.uses[ref] -= 1
        return self.cache[ref] if self.uses[ref] > 0 else self.cache.pop(ref)

    def _read_next_run(self) -> None:
        shard = self.pending[self.cursor][0]
        end = self.cursor
        while end < len(self.pending) and self.pending[end][0] == shard:
            end += 1
        by_view: dict[int, set[int]] = {}
        for ref in self.pending[self.cursor : end]:
            by_view.setdefault(self.view_of(ref), set()).add(ref[1])
        for view, wanted in sorted(by_view.items()):
            # The index's count goes along: a run that reaches the shard's last sample reads to
            # the end of the tar, so extra or missing samples are refused, not ignored.
            for raw in iter_raw_samples(self.shards.views[view][shard], wanted, self.shards.payload, samples=self.shards.counts[shard]):
                self.cache[(shard, raw["__pos__"])] = raw
        self.cursor = end


# ------------------------------------------------------------------ the loader


@dataclass(frozen=True)
class Source:
    """What a stage trains and evaluates on: a shard folder (video shards, or a feature
    cache), and for video the Augment (fla_ds/augment.py) that turns a stored clip into model
    input (None for a feature cache)."""

    shards: str
    augment: object | None = None


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def ignore_stop_signals(_worker_id: int) -> None:
    """DataLoader worker init: the stop signals are the rank's to act on (fla_ds.trainer.StopFlag).
    Launchers (torchrun, the deepspeed launcher) and Slurm signal a rank's whole process group;
    a worker that died of it would crash the rank before it could save."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextmanager
def stop_signals_blocked():
    """Hold the stop signals back while workers start (a signal that arrives meanwhile is
    delivered to the rank afterwards, not to a half-started worker)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class ShardStream:
    """The batches of one split for one rank, epoch after epoch, resumable mid-epoch.

    Usage: ``stream = ShardStream(cfg.stream, rank, world_size, batch_size, Augment(cfg.augment))``;
    per epoch ``stream.set_epoch(e)`` then ``for batch in stream`` (VideoBatch or FeatureBatch,
    fla_ds/batch.py); checkpoint ``stream.state_dict()``. ``augment`` is what turns a stored clip
    into model input (video shards need it; feature caches do not). ``random_augment``
    (default ``cfg.train``) decouples the random augmentation from the training plan: the
    feature extractor plans as evaluation (every clip once) but augments.

    Index and shards are untrusted input: a missing, malformed or inconsistent index, or a
    split with no samples, raises IndexFormatError here (fla_ds.shards.index); a hostile or
    damaged shard raises ShardFormatError when read (fla_ds.shards.format). Both are one line.
    """

    def __init__(self, cfg, rank: int, world_size: int, batch_size: int, augment=None, shuffle: bool | None = None,
                 limit: int = 0, random_augment: bool | None = None):
        self.cfg = cfg
        self.limit = limit  # only the first ``limit`` samples of each epoch's order (quick evaluations)
        self.rank, self.world_size = rank, world_size
        self.shuffle = cfg.train if shuffle is None else shuffle
        self.augment = augment
        self.random_augment = cfg.train if random_augment is None else random_augment
        self.shards = ShardSet.from_index(cfg.shards, cfg.split)
        self.kind = self.shards.kind
        if self.kind == "video" and augment is None:
            raise ValueError("ShardStream over video shards needs an Augment (what turns a stored clip into model input)")
        self.counts = list(self.shards.counts)
        self.fingerprint = self.shards.fingerprint
        self.layout = Layout(world_size, batch_size, cfg.num_workers)
        self.epoch = 0
        self.history: list[tuple[Layout, int]] = []  # layouts of this epoch before a resume
        self.start_step = 0
        self.steps_done = 0

    @classmethod
    def from_config(cls, cfg, rank: int = 0, world_size: int = 1, **kwargs) -> ShardStream:
        """A stream as a whole config describes it: the ``stream`` section, ``train.micro_batch``
        and the ``augment`` section (keyword arguments as for the constructor)."""
        from fla_ds.augment import Augment

        return cls(cfg.stream, rank, world_size, cfg.train.micro_batch, Augment(cfg.augment), **kwargs)

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.history, self.start_step, self.steps_done = epoch, [], 0, 0

    def _batches(self) -> list:
        order = epoch_order(self.counts, self.cfg.seed, self.epoch, self.shuffle)
        if self.limit:
            order = order[: self.limit]
        order = remaining_order(order, self.history, self.cfg.train)
        return rank_batches(order, self.layout, self.rank, self.cfg.train)

    def __len__(self) -> int:
        """Batches left in this epoch on this rank (the same on every rank)."""
        return len(self._batches()) - self.steps_done

    def __iter__(self) -> Iterator[Batch]:
        batches = self._batches()
        workers = self.cfg.num_workers
        dataset = _EpochDataset(self, batches, self.steps_done)
        if workers > 0 and len(batches) > self.steps_done:
            # Its own generator: a DataLoader otherwise draws its workers' base seed from the
            # global RNG, so starting one mid-epoch (after a resume) would shift every later
            # dropout mask. Our workers need no seed: each sample seeds its own draws.
            loader = DataLoader(dataset, batch_size=None, num_workers=workers, prefetch_factor=self.cfg.prefetch_factor,
                                persistent_workers=False, generator=torch.Generator().manual_seed(self.cfg.seed),
                                worker_init_fn=ignore_stop_signals)
            with stop_signals_blocked():  # a worker inherits the mask: no signal before its init runs
                batches_iter = iter(loader)
        else:
            batches_iter = iter(dataset)
        for batch in batches_iter:
            if batch.step != self.steps_done:  # the resume guarantee rests on this order
                raise RuntimeError(f"loader yielded step {batch.step} where {self.steps_done} was due")
            self.steps_done += 1
            yield batch

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "steps_done": self.steps_done,
            "layout": [self.layout.world_size, self.layout.batch_size, self.layout.workers],
            "history": [[layout.world_size, layout.batch_size, layout.workers, n] for layout, n in self.history],
            "seed": self.cfg.seed,
            "fingerprint": self.fingerprint,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["fingerprint"] != self.fingerprint or state["seed"] != self.cfg.seed:
            raise ValueError("loader state belongs to other shards or another seed; cannot resume this epoch exactly")
        self.epoch = int(state["epoch"])
        self.history = [(Layout(*h[:3]), int(h[3])) for h in state["history"]]
        saved = Layout(*state["layout"])
        if saved == self.layout:
            self.steps_done = int(state["steps_done"])
        else:  # the layout changed: what was consumed under the old one is history now
            self.history.append((saved, int(state["steps_done"])))
            self.steps_done = 0
