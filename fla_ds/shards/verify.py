"""``fla-ds shards verify DIR``: re-read every shard against the index, by the loader's rules.

The index and every shard are checked with the same functions the loader uses
(fla_ds.shards.index, fla_ds.shards.format), so verify says OK exactly when the loader would
read the folder: the index's file, fields and counts; per shard, the file (inside the folder,
regular, the indexed size), its sha256, every member, every sample parsed, and sample and
frame counts equal to the index's. A split with no samples is a problem. With
``decode=True`` every JPEG is decoded as well, its size checked against its json (slow, but
proves the frames are readable). Every problem is one line naming the index or the shard
(and member); nothing outside the folder is read.
"""
from __future__ import annotations

import hashlib
import os

from fla_ds.shards.format import ShardFormatError, iter_raw_samples, open_shard, parse_feature_sample, parse_sample, read_frame
from fla_ds.shards.index import IndexFormatError, read_index, shard_path, split_entry


def shard_sha256(path: str) -> str:
    """The sha256 of a shard file, read only if it is a regular file. Raises ShardFormatError."""
    digest = hashlib.sha256()
    with open_shard(path) as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def read_shard(path: str, entry: dict, shard: dict, decode: bool) -> int:
    """Read one shard to its end as the loader does (the index's sample count enforced);
    returns its frame count. Raises ShardFormatError."""
    frames = 0
    payload = "features" if entry["kind"] == "features" else "frames"
    for raw in iter_raw_samples(path, payload=payload, samples=shard["samples"]):
        if entry["kind"] == "features":  # parsing checks the payload's size against its shape
            meta, _ = parse_feature_sample(path, raw)
        else:
            meta, pack = parse_sample(path, raw)
            for i in range(len(pack)) if decode else ():
                read_frame(pack, i, meta, f"{path}: member '{raw['__key__']}.frames'")
        frames += meta["num_frames"]
    return frames


def verify_shard(folder: str, entry: dict, shard: dict, decode: bool) -> list[str]:
    """Problems of one shard of a checked split entry (empty when intact), one line each."""
    try:
        path = shard_path(folder, shard)
    except IndexFormatError as exc:
        return [str(exc)]
    problems = []
    try:
        if shard_sha256(path) != shard["sha256"]:
            problems.append(f"{path}: sha256 differs from the index")
        frames = read_shard(path, entry, shard, decode)
    except (ShardFormatError, OSError) as exc:
        return problems + [str(exc)]
    if frames != shard["frames"]:
        problems.append(f"{path}: {frames} frames, the index says {shard['frames']}")
    return problems


def verify_folder(folder: str, decode: bool = False) -> tuple[int, list[str]]:
    """Returns (shards checked, problems); no problems means the loader can read every split.
    Never raises for what it finds in the folder: each problem is a line."""
    try:
        index = read_index(folder)
    except IndexFormatError as exc:
        return 0, [str(exc)]
    checked, problems = 0, []
    if not index["splits"]:  # e.g. what a build that kept no sample leaves
        return 0, [f"{os.fspath(folder)}/index.json: lists no split (nothing was built, or every build kept no sample)"]
    for split in sorted(index["splits"]):
        try:
            entry = split_entry(folder, index, split)
        except IndexFormatError as exc:
            problems.append(str(exc))
            continue
        for shard in entry["shards"]:
            problems.extend(verify_shard(os.fspath(folder), entry, shard, decode))
            checked += 1
    return checked, problems
