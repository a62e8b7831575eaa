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

Workers live as long as the stream (``stream.persistent_workers``) and read each pass's
position from shared memory; each keeps its decode buffer. Video batches are decoded straight
into the batch (only the padded tail is zeroed) on the CPU (fla_ds.frames.read_jpeg), or with
``stream.decode=gpu`` on the training device: workers ship JPEG bytes and this process decodes
them (fla_ds.augment; untested on a GPU so far). With a CUDA device, batches come pinned.
"""
from __future__ import annotations

import atexit
import multiprocessing.util  # noqa: F401  (its exit handler must be registered before ours, which runs first)
import random
import signal
import threading
import weakref
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from fla_ds.augment import device_decoder, video_from_frames
from fla_ds.batch import Batch, FeatureBatch, VideoBatch, collate_features
from fla_ds.frames import batch_side, clip_from_pack, cut_clip, decode_cuts_into, jpeg_bytes  # noqa: F401  (clip_from_pack: re-exported)
from fla_ds.shards.format import iter_raw_samples, parse_feature_sample, parse_sample
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


@dataclass(frozen=True)
class EpochPlan:
    """Everything that decides a rank's batches besides the position: any process (a worker
    included) computes the same batches from it."""

    counts: tuple[int, ...]
    seed: int
    shuffle: bool
    train: bool
    limit: int
    layout: Layout
    rank: int

    def batches(self, epoch: int, history: list[tuple[Layout, int]]) -> list[list[tuple[Ref, bool]]]:
        """This rank's batches of ``epoch``, less what ``history``'s layouts consumed."""
        order = epoch_order(list(self.counts), self.seed, epoch, self.shuffle)
        if self.limit:
            order = order[: self.limit]
        return rank_batches(remaining_order(order, history, self.train), self.layout, self.rank, self.train)


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


class _Position:
    """Where the stream is: epoch, steps done and the earlier layouts of this epoch, as int64
    slots, in shared memory when there are workers (a persistent worker keeps the dataset
    object it started with and reads this at the start of every pass)."""

    MAX_HISTORY = 256  # layout changes within one epoch (one per resume): far beyond any real run

    def __init__(self, shared: bool):
        slots = torch.zeros(3 + 4 * self.MAX_HISTORY, dtype=torch.int64)
        self.slots = slots.share_memory_() if shared else slots

    def write(self, epoch: int, steps_done: int, history: list[tuple[Layout, int]]) -> None:
        if len(history) > self.MAX_HISTORY:
            raise ValueError(f"more than {self.MAX_HISTORY} layout changes within one epoch")
        values = [epoch, steps_done, len(history)] + [v for lay, n in history for v in (lay.world_size, lay.batch_size, lay.workers, n)]
        self.slots[: len(values)] = torch.tensor(values, dtype=torch.int64)

    def read(self) -> tuple[int, int, list[tuple[Layout, int]]]:
        epoch, steps_done, n = self.slots[:3].tolist()
        rows = self.slots[3 : 3 + 4 * n].view(-1, 4).tolist() if n else []
        return epoch, steps_done, [(Layout(*row[:3]), row[3]) for row in rows]


class _StreamDataset(IterableDataset):
    """One rank's batches of the pass the shared position describes, from its steps done on;
    each worker takes every ``workers``-th step, so that the DataLoader's round-robin yields
    them in step order. Yields each batch as a dict of VideoBatch's or FeatureBatch's fields
    (a dict, so that the DataLoader can pin it), plus "kind" and, when JPEGs are decoded on the
    device, the JPEG bytes instead of "video"."""

    def __init__(self, stream: ShardStream):
        self.shards, self.plan, self.position = stream.shards, stream.plan, stream.position
        self.workers, self.seed = max(1, stream.cfg.num_workers), stream.cfg.seed
        self.augment, self.random_augment = stream.augment, stream.random_augment
        self.ship_jpeg = stream.decoder is not None
        self.views = len(self.shards.views) if stream.cfg.train else 1  # evaluation reads view 0 only

    def __iter__(self) -> Iterator[dict]:
        epoch, start_step, history = self.position.read()
        batches = self.plan.batches(epoch, history)
        info = get_worker_info()
        worker = info.id if info is not None else 0
        # A pass restarts the round-robin at worker 0: rotate so that it serves start_step.
        steps = range(start_step + worker, len(batches), self.workers)
        chosen = [(k, batches[batch_of_step(k, len(batches), self.workers)]) for k in steps]
        view_of = lambda ref: pick_view(self.seed, epoch, ref, self.views)
        raw = _RunReader(self.shards, [ref for _, batch in chosen for ref, _ in batch], view_of)
        for k, batch in chosen:
            items = [(ref, raw.take(ref)) for ref, _ in batch]
            fields = self._features(items, view_of) if self.shards.kind == "features" else self._video(items, epoch)
            yield {**fields, "valid": torch.tensor([v for _, v in batch]), "step": k, "epoch": epoch}

    def _features(self, items: list[tuple[Ref, dict]], view_of) -> dict:
        views = [view_of(ref) for ref, _ in items]
        parsed = [parse_feature_sample(self.shards.views[v][ref[0]], raw) for (ref, raw), v in zip(items, views)]
        features, mask = collate_features([f for _, f in parsed])
        return {"kind": "features", "features": features, "features_mask": mask, "view": torch.tensor(views),
                **labels([meta for meta, _ in parsed], [raw for _, raw in items])}

    def _video(self, items: list[tuple[Ref, dict]], epoch: int) -> dict:
        cuts = []
        for ref, raw in items:
            shard = self.shards.views[0][ref[0]]
            meta, pack = parse_sample(shard, raw)
            rng = random.Random(f"fla_ds-sample:{self.seed}:{epoch}:{ref[0]}:{ref[1]}")
            cuts.append(cut_clip(meta, pack, self.augment, rng, self.random_augment, f"{shard}: member '{raw['__key__']}.frames'"))
        lengths = torch.tensor([len(c.indices) for c in cuts])
        fields = {"kind": "video", "video_mask": torch.arange(int(lengths.max()))[None, :] < lengths[:, None],
                  "affine": torch.tensor([c.affine for c in cuts]) if self.random_augment else None,
                  **labels([c.meta for c in cuts], [raw for _, raw in items])}
        if self.ship_jpeg:  # decoded by the training process, on its device
            flat, offsets = jpeg_bytes(cuts)
            return {**fields, "jpeg": torch.from_numpy(flat), "jpeg_offsets": torch.from_numpy(offsets), "boxes": torch.tensor([c.box for c in cuts])}
        side = batch_side(cuts)
        video = torch.empty((len(cuts), int(lengths.max()), side, side, 3), dtype=torch.uint8)  # no zero fill: only the tail is
        decode_cuts_into(cuts, video.numpy())
        return {**fields, "video": video}


def labels(metas: list[dict], raws: list[dict]) -> dict:
    """A batch's text, corpus ids and shard keys, from its samples' json and raw samples."""
    return {"text": [m["text"] for m in metas], "id": [m.get("id", r["__key__"]) for m, r in zip(metas, raws)], "key": [r["__key__"] for r in raws]}


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


_OPEN_STREAMS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_open_streams() -> None:
    """Runs at exit before multiprocessing's handler (registered later), which SIGTERMs and
    joins its children: our workers ignore SIGTERM, so live workers would hang the exit."""
    for stream in list(_OPEN_STREAMS):
        stream.close()


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
                 limit: int = 0, random_augment: bool | None = None, decoder=None):
        """``decoder``: decode the batches' JPEGs in this process with ``decoder(list of uint8
        (N,) CPU tensors) -> list of uint8 (3, H, W) tensors`` (workers then ship JPEG bytes);
        None: as ``cfg.decode`` says (``device_decoder``)."""
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
        self.plan = EpochPlan(tuple(self.counts), cfg.seed, self.shuffle, cfg.train, limit, self.layout, rank)
        self.epoch = 0
        self.history: list[tuple[Layout, int]] = []  # layouts of this epoch before a resume
        self.steps_done = 0
        self.decoder = (decoder or device_decoder(getattr(cfg, "decode", "auto"))) if self.kind == "video" else None
        self.persistent = bool(getattr(cfg, "persistent_workers", True))
        self.position = _Position(shared=cfg.num_workers > 0)
        self.dataset = _StreamDataset(self)
        self.loader: DataLoader | None = None
        self.batches_iter = None

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
            self.epoch, self.history, self.steps_done = epoch, [], 0

    def _batches(self) -> list:
        return self.plan.batches(self.epoch, self.history)

    def __len__(self) -> int:
        """Batches left in this epoch on this rank (the same on every rank)."""
        return len(self._batches()) - self.steps_done

    def _worker_batches(self) -> Iterator[dict]:
        if self.loader is None or not self.persistent:
            # Its own generator: a DataLoader otherwise draws its workers' base seed from the
            # global RNG, so starting one mid-epoch (after a resume) would shift every later
            # dropout mask. Our workers need no seed: each sample seeds its own draws.
            self.loader = DataLoader(self.dataset, batch_size=None, num_workers=self.cfg.num_workers, collate_fn=dict,  # batches made
                                     prefetch_factor=self.cfg.prefetch_factor, persistent_workers=self.persistent,
                                     pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(self.cfg.seed),
                                     worker_init_fn=ignore_stop_signals)
        with stop_signals_blocked():  # a worker inherits the mask: no signal before its init runs
            self.batches_iter = iter(self.loader)  # persistent workers: the same processes, told the new position
        _OPEN_STREAMS.add(self)
        return self.batches_iter

    def __iter__(self) -> Iterator[Batch]:
        if len(self._batches()) <= self.steps_done:
            return
        self.position.write(self.epoch, self.steps_done, self.history)
        for fields in self._worker_batches() if self.cfg.num_workers > 0 else iter(self.dataset):
            batch = self._batch(fields)
            if batch.step != self.steps_done:  # the resume guarantee rests on this order
                raise RuntimeError(f"loader yielded step {batch.step} where {self.steps_done} was due")
            self.steps_done += 1
            yield batch

    def _batch(self, fields: dict) -> Batch:
        """A worker's dict -> the Batch; JPEG bytes are decoded here (``self.decoder``)."""
        fields = dict(fields)
        if fields.pop("kind") == "features":
            return FeatureBatch(**fields)
        if "jpeg" in fields:
            jpeg, offsets = fields.pop("jpeg"), fields.pop("jpeg_offsets").tolist()
            frames = self.decoder([jpeg[a:b] for a, b in zip(offsets, offsets[1:])])
            fields["video"] = video_from_frames(frames, fields["video_mask"].sum(1).tolist(), fields.pop("boxes").tolist())
        return VideoBatch(**fields)

    def close(self) -> None:
        """Stop the workers now (also done when the stream is garbage-collected, and at exit)."""
        batches_iter, self.loader, self.batches_iter = self.batches_iter, None, None
        # Asked directly, not left to garbage collection: a suspended pass may still hold the
        # iterator. (A DataLoader iterator's own method; without it, collection does the same.)
        getattr(batches_iter, "_shutdown_workers", lambda: None)()

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
