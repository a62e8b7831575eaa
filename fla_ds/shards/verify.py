"""``fla-ds shards verify DIR``: re-read every shard against the index.

Checks, per shard: the file exists with the indexed size and sha256, every member is one
fla_ds writes, every sample parses, and sample and frame counts match the index. With
``decode=True`` every JPEG is decoded as well (slow, but proves the frames are readable).
"""
from __future__ import annotations

import json
from pathlib import Path

from fla_ds.corpus.base import sha256_file
from fla_ds.shards.format import ShardFormatError, iter_raw_samples, parse_feature_sample, parse_sample


def verify_shard(folder: Path, entry: dict, decode: bool, kind: str = "video") -> list[str]:
    path = folder / entry["name"]
    if not path.is_file():
        return [f"{entry['name']}: missing"]
    problems = []
    size = path.stat().st_size
    if size != entry["bytes"]:
        problems.append(f"{entry['name']}: {size} bytes, index says {entry['bytes']}")
    if sha256_file(path) != entry["sha256"]:
        problems.append(f"{entry['name']}: sha256 differs from the index")
    samples = frames = 0
    try:
        payload = "features" if kind == "features" else "frames"
        for raw in iter_raw_samples(str(path), payload=payload):
            if kind == "features":  # parsing checks the payload's size against its shape
                meta, _ = parse_feature_sample(str(path), raw)
            else:
                meta, pack = parse_sample(str(path), raw)
                if decode:
                    pack.decode(range(len(pack)))
            samples += 1
            frames += meta["num_frames"]
    except (ShardFormatError, OSError, ValueError) as exc:
        return problems + [f"{entry['name']}: {exc}"]
    if samples != entry["samples"] or frames != entry["frames"]:
        problems.append(f"{entry['name']}: {samples} samples / {frames} frames, index says {entry['samples']} / {entry['frames']}")
    return problems


def verify_folder(folder: str, decode: bool = False) -> tuple[int, list[str]]:
    """Returns (shards checked, problems); no problems means the folder is intact."""
    folder_path = Path(folder)
    index_path = folder_path / "index.json"
    if not index_path.is_file():
        return 0, [f"{index_path}: missing"]
    index = json.loads(index_path.read_text("utf-8"))
    checked, problems = 0, []
    for split in sorted(index.get("splits", {})):
        kind = index["splits"][split].get("kind", index.get("kind", "video"))
        for entry in index["splits"][split]["shards"]:
            problems.extend(verify_shard(folder_path, entry, decode, kind))
            checked += 1
    return checked, problems
