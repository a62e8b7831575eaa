"""``index.json``: what a shard folder holds, read as untrusted input.

The index is written by the shard builder (fla_ds.shards.build) and by the feature cache
(fla_ds.features); the loader, ``shards verify``, the feature extractor and the vocabulary
builder read it through ``load_index`` only.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from fla_ds.corpus.base import canonical_split


def load_index(folder: str | os.PathLike, split: str) -> dict:
    """The index entry of one split, with a one-line error when it is missing."""
    from fla_ds.shards.build import BuildError

    path = Path(folder) / "index.json"
    if not path.is_file():
        raise BuildError(f"{path} does not exist: build the shards first (fla-ds shards build)")
    index = json.loads(path.read_text("utf-8"))
    splits = index.get("splits", {})
    split = canonical_split(split)
    if split not in splits:
        raise BuildError(f"{path} has no split '{split}' (it has: {', '.join(sorted(splits)) or 'none'})")
    return splits[split]
