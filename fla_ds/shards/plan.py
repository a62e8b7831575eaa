"""Planning a shard build (phase one of ``fla-ds shards build``, fla_ds/shards/build.py): the
corpus's annotations only are read; texts are checked (empty, non-UTF-8, mojibake repaired),
time cuts checked, duplicate ids rejected; samples are grouped (the cuts of one raw video are
read together), put in a seeded order and cut into shards. The plan and its fingerprint
depend on the annotations and the byte settings alone, never on the worker count.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from fla_ds.atomic import sha256_file
from fla_ds.corpus import open_corpus
from fla_ds.corpus.base import LANGUAGE_CODE, CorpusSample, VideoFile, canonical_split, clean_text, safe_key

BUILDER_VERSION = 2
# Settings that change the bytes of a shard; anything else (workers, paths) must not.
BYTE_SETTINGS = ("samples_per_shard", "short_side", "jpeg_quality", "order_seed", "max_frames")


class BuildError(ValueError):
    """The build cannot go on (e.g. the folder holds another build); one line."""


@dataclass(frozen=True)
class PlannedSample:
    position: int
    """Index in the corpus's own order (reported in rejects)."""
    key: str
    sample: CorpusSample
    mojibake_repaired: bool = False


@dataclass
class Plan:
    corpus: str
    split: str
    shards: list[list[PlannedSample]]
    rejects: list[dict] = field(default_factory=list)
    repaired: Counter = field(default_factory=Counter)
    sources: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    fingerprint: str = ""
    language: str = ""
    """The texts' language (ISO 639-1; "" unknown): corpus.language, else the reader's."""

    def shard_name(self, index: int) -> str:
        return f"{self.split}-{index:06d}.tar"


def reject_record(split: str, sample: CorpusSample, position: int, reason: str) -> dict:
    return {"split": split, "id": sample.id, "position": position, "reason": reason, "source": str(getattr(sample.frames, "path", ""))}


def check_time_cut(frames):
    """A video time cut checked before any decoding: (frames, repair or None, reject reason or None).

    A negative start is clamped to 0 (repair ``start_clamped``; nothing lies before the first
    frame); a cut whose end is at or before its (clamped) start holds no frame and is rejected.
    An end past the video is the video reader's to clamp (``end_clamped``): only it knows the
    duration. Frame folders and uncut videos pass unchanged."""
    if not isinstance(frames, VideoFile):
        return frames, None, None
    start = 0.0 if frames.start is None else max(0.0, frames.start)
    if frames.end is not None and frames.end <= start:
        return frames, None, f"empty time cut (end {frames.end:g} s <= start {start:g} s)"
    if frames.start is not None and frames.start < 0:
        return replace(frames, start=0.0), "start_clamped", None
    return frames, None, None


def check_samples(samples: Iterator[CorpusSample], split: str) -> tuple[list[PlannedSample], list[dict], Counter]:
    """The cheap checks of planning: text, time cuts (``check_time_cut``), duplicate ids, and a
    distinct shard key for every sample (``safe_key``; on the rare clash of two different ids the
    later one gets ``<key>-1``, ``-2``... in corpus order, so keys are deterministic)."""
    kept, rejects, repaired = [], [], Counter()
    seen_ids: set[str] = set()
    seen_keys: set[str] = set()
    for position, sample in enumerate(samples):
        text, outcome = clean_text(sample.text)
        if sample.meta.get("label_missing"):  # listed in the split file, absent from the labels
            text, outcome = None, "missing label"
        frames, time_repair, time_reject = check_time_cut(sample.frames)
        if text is None or time_reject:
            rejects.append(reject_record(split, sample, position, time_reject if text is not None else outcome))
            continue
        if sample.id in seen_ids:
            rejects.append(reject_record(split, sample, position, "duplicate id"))
            continue
        key = safe_key(sample.id)
        clash = 0
        while key in seen_keys:
            clash += 1
            key = f"{safe_key(sample.id)}-{clash}"
        seen_ids.add(sample.id)
        seen_keys.add(key)
        if outcome == "repaired":
            repaired["mojibake"] += 1
        if time_repair:
            repaired[time_repair] += 1
        kept.append(PlannedSample(position, key, replace(sample, text=text, frames=frames), outcome == "repaired"))
    return kept, rejects, repaired


def cut_video(sample: CorpusSample) -> str | None:
    """The video file a sample is a time cut of, or None (frame folders, whole videos)."""
    frames = sample.frames
    if isinstance(frames, VideoFile) and (frames.start is not None or frames.end is not None):
        return frames.path
    return None


def group_cuts(samples: list[PlannedSample]) -> list[list[PlannedSample]]:
    """Samples in groups that are read together: all the cuts of one video (in time order;
    How2Sign's raw videos hold ~13 sentences each), every other sample alone. Groups keep
    the order of their first sample."""
    groups: list[list[PlannedSample]] = []
    by_video: dict[str, list[PlannedSample]] = {}
    for planned in samples:
        video = cut_video(planned.sample)
        if video is None:
            groups.append([planned])
        elif video in by_video:
            by_video[video].append(planned)
        else:
            by_video[video] = [planned]
            groups.append(by_video[video])
    for group in by_video.values():
        group.sort(key=lambda p: (p.sample.frames.start or 0.0, p.position))
    return groups


def seeded_order(groups: list, seed: int | None) -> list:
    """Mix the corpus so that one shard holds many signers and days (corpora list samples
    sorted by date or signer); the order depends on the seed alone."""
    if seed is None:
        return list(groups)
    order = list(groups)
    random.Random(seed).shuffle(order)
    return order


def fill_shards(groups: list[list[PlannedSample]], per: int) -> list[list[PlannedSample]]:
    """Shards of at most ``per`` samples that never split a group unless it alone is larger
    than a shard (then it fills whole shards in time order). With groups of one sample this
    is plain chunking."""
    shards: list[list[PlannedSample]] = []
    current: list[PlannedSample] = []
    for group in groups:
        if current and len(current) + len(group) > per:
            shards.append(current)
            current = []
        for i in range(0, len(group), per):
            chunk = group[i : i + per]
            if len(chunk) == per:
                shards.append(chunk)
            else:
                current.extend(chunk)
    if current:
        shards.append(current)
    return shards


def source_description(frames, root: Path) -> str:
    """What a sample's frames are read from, independent of where the corpus is mounted (a
    job array's nodes may see it under different paths)."""
    start, end = getattr(frames, "start", None), getattr(frames, "end", None)
    size = None
    if isinstance(frames, VideoFile):  # a replaced video changes the build (its size, cheaply)
        try:
            size = os.stat(frames.path).st_size
        except OSError:
            pass
    return json.dumps([type(frames).__name__, _relative(Path(frames.path), root), getattr(frames, "pattern", None), start, end, size])


def plan_fingerprint(corpus: str, split: str, settings: dict, shards: list[list[PlannedSample]], root: Path) -> str:
    """Identifies a build: builder version, settings, and every shard's samples (key, text,
    source and time cut), so that shards of another build are never mistaken for this one."""
    h = hashlib.sha256()
    h.update(json.dumps({"builder": BUILDER_VERSION, "corpus": corpus, "split": split, "settings": settings}, sort_keys=True).encode())
    for shard in shards:
        h.update(b"\x00shard")
        for s in shard:
            h.update(b"\x00" + s.key.encode() + b"\x01" + str(s.sample.text).encode() + b"\x01" + source_description(s.sample.frames, root).encode())
    return h.hexdigest()


def make_plan(cfg) -> Plan:
    reader = open_corpus(cfg.corpus)
    split = canonical_split(cfg.corpus.split)
    kept, rejects, repaired = check_samples(reader.samples(), split)
    per = cfg.shards.samples_per_shard
    if per < 1:
        raise BuildError(f"shards.samples_per_shard must be >= 1, got {per}")
    shards = fill_shards(seeded_order(group_cuts(kept), cfg.shards.order_seed), per)
    settings = {k: cfg.shards[k] for k in BYTE_SETTINGS}
    root = Path(cfg.corpus.root)
    sources = {_relative(p, root): sha256_file(p) for p in reader.source_files()}
    plan = Plan(cfg.corpus.name, split, shards, rejects, repaired, sources, settings, language=corpus_language(cfg.corpus, reader))
    plan.fingerprint = plan_fingerprint(plan.corpus, split, settings, shards, root)
    return plan


def corpus_language(corpus_cfg, reader) -> str:
    """``corpus.language`` when given, else the reader's own; raises BuildError for a value
    that is not a language code (2-3 lowercase letters, optionally a region: pt-BR)."""
    language = str(corpus_cfg.language).strip() or getattr(reader, "language", "")
    if language and not LANGUAGE_CODE.fullmatch(language):
        raise BuildError(f"corpus.language: '{language}' is not an ISO 639 language code such as de, en, zh or pt-BR")
    return language


def _relative(path: Path, root: Path) -> str:
    base = root.resolve()
    base = base.parent if base.is_file() else base
    try:
        return str(Path(path).resolve().relative_to(base))
    except ValueError:
        return str(path)
