"""Corpus -> WebDataset shards: ``fla-ds shards build``.

The build has two phases. Planning (fla_ds/shards/plan.py) reads the annotations only: texts are checked (empty,
non-UTF-8, mojibake repaired), duplicate ids are rejected, samples are put in a seeded order
and cut into shards of ``samples_per_shard`` input samples. Encoding then turns each planned
shard into ``<split>-%06d.tar`` in a worker process; samples whose frames cannot be read are
rejected there. Because a shard's bytes depend only on its planned samples and the settings,
the output is byte-identical whatever the worker count, and a Slurm job array can build
disjoint shard ranges that a final run indexes.

Restartability: a shard is written to a temporary name and renamed, then its record
(``.parts/<split>-%06d.json``) is written; a rerun skips shards whose record and tar agree,
so a killed build resumes where it stopped. The index and rejects are written at the end.
"""
from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

from fla_ds.atomic import atomic_write_json, atomic_write_text, folder_lock, sha256_file, tmp_name
from fla_ds.config import save_resolved
from fla_ds.frames import EncodedClip, SampleError, encode_source
from fla_ds.shards.format import ShardWriter
from fla_ds.shards.index import read_index
from fla_ds.shards.plan import BUILDER_VERSION, BuildError, Plan, PlannedSample, cut_video, make_plan, reject_record
from fla_ds.video import Cut, encode_cuts

# ------------------------------------------------------------------------------ encoding


def part_path(out: Path, split: str, index: int) -> Path:
    return out / ".parts" / f"{split}-{index:06d}.json"


def shard_is_done(out: Path, plan: Plan, index: int) -> dict | None:
    """The shard's record when the shard was completed by this same plan, else None."""
    record_path = part_path(out, plan.split, index)
    if not record_path.is_file():
        return None
    try:
        record = json.loads(record_path.read_text("utf-8"))
        tar = out / record["name"]
    except (ValueError, KeyError, TypeError, OSError):  # a damaged record: build the shard again
        return None
    if record.get("fingerprint") != plan.fingerprint or not tar.is_file() or tar.stat().st_size != record["bytes"]:
        return None
    return record


def sample_meta(planned: PlannedSample, corpus: str, split: str, num_frames: int, width: int, height: int) -> dict:
    s = planned.sample
    return {
        "id": s.id,
        "text": s.text,
        "num_frames": num_frames,
        "width": width,
        "height": height,
        "corpus": corpus,
        "split": split,
        "meta": json.loads(json.dumps(s.meta, default=str)),
    }


def encode_one(planned: PlannedSample, settings: dict) -> EncodedClip | SampleError:
    try:
        return encode_source(planned.sample.frames, settings["short_side"], settings["jpeg_quality"], settings["max_frames"])
    except SampleError as exc:
        return exc


def encode_group(group: list[PlannedSample], settings: dict) -> Iterator[tuple[PlannedSample, EncodedClip | SampleError]]:
    """The cuts of one video, read in one pass (fla_ds.video.encode_cuts), each with its clip
    or reject, in the order the cuts end."""
    cuts = [Cut(p.sample.frames.start, p.sample.frames.end) for p in group]
    clips = encode_cuts(group[0].sample.frames.path, cuts, settings["short_side"], settings["jpeg_quality"], settings["max_frames"])
    for i, clip in clips:
        yield group[i], clip


def encoded_samples(samples: list[PlannedSample], settings: dict) -> Iterator[tuple[PlannedSample, EncodedClip | SampleError]]:
    """Every planned sample of a shard with its encoded clip or the reason it is rejected.
    Consecutive cuts of one video (the plan keeps them together) are read in one pass and
    come out in the order they end; the order depends on the plan alone, so the shard's bytes
    do not depend on the worker count."""
    i = 0
    while i < len(samples):
        video, j = cut_video(samples[i].sample), i + 1
        if video is None:
            yield samples[i], encode_one(samples[i], settings)
        else:
            while j < len(samples) and cut_video(samples[j].sample) == video:
                j += 1
            yield from encode_group(samples[i:j], settings)
        i = j


def build_shard(out: Path, plan_meta: dict, index: int, samples: list[PlannedSample]) -> dict:
    """Encode one planned shard; runs in a worker process. Returns (and saves) its record.
    The tar is written under a temporary name, removed if anything goes wrong."""
    split, settings = plan_meta["split"], plan_meta["settings"]
    name = f"{split}-{index:06d}.tar"
    final = out / name
    for stale in out.glob(f".{name}.*.tmp"):  # a killed earlier attempt at this shard
        stale.unlink(missing_ok=True)
    tmp = tmp_name(final)
    rejects, repaired = [], Counter()
    n_samples = n_frames = 0
    try:
        with open(tmp, "wb") as f:
            writer = ShardWriter(f)
            for planned, clip in encoded_samples(samples, settings):
                if isinstance(clip, SampleError):
                    rejects.append(reject_record(split, planned.sample, planned.position, str(clip)))
                    continue
                repaired.update(clip.repaired)
                writer.write(planned.key, sample_meta(planned, plan_meta["corpus"], split, clip.num_frames, clip.width, clip.height), clip.pack)
                n_samples += 1
                n_frames += clip.num_frames
            writer.close()
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, final)
    record = {
        "name": name,
        "index": index,
        "samples": n_samples,
        "frames": n_frames,
        "bytes": final.stat().st_size,
        "sha256": sha256_file(final),
        "rejects": rejects,
        "repaired": dict(repaired),
        "fingerprint": plan_meta["fingerprint"],
    }
    atomic_write_json(part_path(out, split, index), record)
    return record


# ------------------------------------------------------------------------------ the build


def is_partial(cfg) -> bool:
    return cfg.shards.first_shard != 0 or cfg.shards.num_shards != 0


def selected_shards(cfg, count: int) -> range:
    first, num = cfg.shards.first_shard, cfg.shards.num_shards
    if first < 0 or num < 0:
        raise BuildError(f"shards.first_shard and shards.num_shards must be >= 0, got {first} and {num}")
    return range(min(first, count), count if num == 0 else min(count, first + num))


def check_plan_matches(out: Path, plan: Plan) -> None:
    """Refuse to mix two different builds in one folder (never overwrite someone's shards)."""
    plan_file = out / ".parts" / f"{plan.split}.plan.json"
    if plan_file.is_file():
        previous = json.loads(plan_file.read_text("utf-8"))
        if previous.get("fingerprint") != plan.fingerprint:
            raise BuildError(
                f"{out} already holds {plan.split} shards of a different build (corpus or shard settings changed); "
                f"use another --out or delete {out}/{plan.split}-*.tar and {plan_file}"
            )
    else:
        atomic_write_json(plan_file, {"fingerprint": plan.fingerprint, "settings": plan.settings, "shards": len(plan.shards)})


def exit_with_parent(parent_pid: int, poll_s: float = 0.5) -> None:
    """Worker initializer: end this worker when the build's main process is gone (kill -9,
    OOM killer), instead of encoding on for nobody and holding its memory. A thread polls
    the parent pid: portable, and the GIL is released often enough by the decoders."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def run_jobs(out: Path, plan: Plan, todo: list[int], workers: int, progress) -> dict[int, dict]:
    plan_meta = {"split": plan.split, "settings": plan.settings, "corpus": plan.corpus, "fingerprint": plan.fingerprint}
    records: dict[int, dict] = {}
    if workers <= 1 or len(todo) <= 1:
        for i in todo:
            records[i] = build_shard(out, plan_meta, i, plan.shards[i])
            progress.update(len(plan.shards[i]))
        return records
    # spawn, not fork: the parent may hold threads (tqdm, decoders) that fork would copy locked.
    pool_args = {"mp_context": get_context("spawn"), "initializer": exit_with_parent, "initargs": (os.getpid(),)}
    with ProcessPoolExecutor(max_workers=workers, **pool_args) as pool:
        pending = {pool.submit(build_shard, out, plan_meta, i, plan.shards[i]): i for i in todo}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    i = pending.pop(fut)
                    records[i] = fut.result()
                    progress.update(len(plan.shards[i]))
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return records


def split_index(plan: Plan, records: list[dict]) -> dict:
    rejects = plan.rejects + [r for rec in records for r in rec["rejects"]]
    repaired = Counter(plan.repaired)
    for rec in records:
        repaired.update(rec["repaired"])
    return {
        "corpus": plan.corpus,
        "language": plan.language,
        "split": plan.split,
        "builder_version": BUILDER_VERSION,
        "settings": plan.settings,
        "sources": plan.sources,
        "plan_fingerprint": plan.fingerprint,
        "shards": [{k: rec[k] for k in ("name", "samples", "frames", "bytes", "sha256")} for rec in records],
        "samples": sum(rec["samples"] for rec in records),
        "frames": sum(rec["frames"] for rec in records),
        "bytes": sum(rec["bytes"] for rec in records),
        "rejected": len(rejects),
        "rejects_by_reason": dict(sorted(Counter(_reason_kind(r["reason"]) for r in rejects).items())),
        "repaired": dict(sorted(repaired.items())),
    }, sorted(rejects, key=lambda r: r["position"])


def _reason_kind(reason: str) -> str:
    """Reasons are a fixed phrase with details in parentheses: count by the phrase."""
    return reason.split(" (")[0]


def remove_leftovers(out: Path, split: str, shards: range | None) -> int:
    """Delete temporary files of killed writers: the tars of ``shards`` (all of the split's
    when None; never those of a concurrent job array task's range) and their records."""
    removed = 0
    for tmp in list(out.glob(f".{split}-*.tar.*.tmp")) + list((out / ".parts").glob(f".{split}-*.json.*.tmp")):
        number = tmp.name[len(split) + 2 :].split(".", 1)[0]
        if shards is None or (number.isdigit() and int(number) in shards):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


def _reject_line(line: str) -> dict | None:
    """One record of rejects.jsonl; a damaged line (a disk that filled up) is dropped: the
    file is rewritten from the builds' records."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def write_index(out: Path, split: str, entry: dict | None, rejects: list[dict]) -> None:
    """Record one split in ``index.json`` (``entry`` None removes it: a failed build) and its
    rejects in ``rejects.jsonl``, beside other splits' entries, under the folder lock."""
    with folder_lock(out):
        index_path = out / "index.json"
        index = read_index(out) if index_path.exists() else {}  # checked like any index
        index.setdefault("format", "fla_ds.shards")
        if entry is not None:
            index.setdefault("splits", {})[split] = entry
        else:
            index.setdefault("splits", {}).pop(split, None)
        atomic_write_json(index_path, index)
        for tmp in list(out.glob(".index.json.*.tmp")) + list(out.glob(".rejects.jsonl.*.tmp")):
            tmp.unlink(missing_ok=True)  # killed writers' leftovers; writers hold this lock
        rejects_path = out / "rejects.jsonl"
        others = []
        if rejects_path.is_file():
            others = [r for r in map(_reject_line, rejects_path.read_text("utf-8", "replace").splitlines()) if r]
            others = [r for r in others if r.get("split") != split]
        lines = [json.dumps(r, ensure_ascii=False, sort_keys=True) for r in others + rejects]
        atomic_write_text(rejects_path, "".join(line + "\n" for line in lines))


def _reasons(entry: dict) -> str:
    return ", ".join(f"{n} {r}" for r, n in entry["rejects_by_reason"].items()) or "none"


@dataclass
class BuildSummary:
    split: str
    shards_total: int
    shards_built: int
    shards_skipped: int
    index: dict | None
    seconds: float
    frames_built: int
    out: Path | None = None  # the shard folder (where rejects.jsonl is)

    def lines(self) -> list[str]:
        out = [f"split {self.split}: {self.shards_built} shards built, {self.shards_skipped} already complete, of {self.shards_total}"]
        if self.index is None:
            out.append("partial build (shards.first_shard/num_shards): run once more without a range to write the index")
        else:
            ix = self.index
            reasons = _reasons(ix)
            fixes = ", ".join(f"{n} {r}" for r, n in ix["repaired"].items()) or "none"
            out.append(f"kept {ix['samples']} samples ({ix['frames']} frames, {ix['bytes'] / 1e6:.1f} MB), "
                       f"rejected {ix['rejected']} ({reasons}), repaired {fixes}"
                       + (f"; each reject named in {self.out / 'rejects.jsonl'}" if ix["rejected"] and self.out else ""))
        rate = self.frames_built / self.seconds if self.seconds > 0 else 0.0
        out.append(f"encoded {self.frames_built} frames in {self.seconds:.1f} s ({rate:.0f} frames/s)")
        return out


def build_shards(cfg, progress_bar: bool = True) -> BuildSummary:
    """Plan, encode the shards that are not complete yet, and (for a full range) index."""
    from tqdm import tqdm

    started = time.perf_counter()
    out = Path(cfg.shards.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / ".parts").mkdir(exist_ok=True)
    plan = make_plan(cfg)
    check_plan_matches(out, plan)
    selected = selected_shards(cfg, len(plan.shards))
    remove_leftovers(out, plan.split, selected)
    records = {i: rec for i in selected if (rec := shard_is_done(out, plan, i)) is not None}
    todo = [i for i in selected if i not in records]
    total = sum(len(plan.shards[i]) for i in todo)
    with tqdm(total=total, unit="clip", desc=f"shards {plan.split}", disable=None if progress_bar else True) as progress:
        built = run_jobs(out, plan, todo, cfg.shards.workers, progress)
    frames_built = sum(rec["frames"] for rec in built.values())
    records.update(built)
    index = None
    if not is_partial(cfg):
        entry, rejects = split_index(plan, [records[i] for i in range(len(plan.shards))])
        remove_leftovers(out, plan.split, None)
        if entry["samples"] == 0:  # nothing to train on: the build failed, say why
            write_index(out, plan.split, None, rejects)
            raise BuildError(f"split {plan.split}: no sample kept of {entry['rejected']} ({_reasons(entry)}); see {out / 'rejects.jsonl'}")
        write_index(out, plan.split, entry, rejects)
        save_resolved(cfg, out, f"config.{plan.split}.yaml")
        index = entry
    return BuildSummary(plan.split, len(plan.shards), len(built), len(selected) - len(built), index, time.perf_counter() - started, frames_built,
                        out)
