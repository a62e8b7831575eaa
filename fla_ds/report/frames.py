"""Frame strips for the clip table: a few evenly spaced frames of each clip, read from the
video shards the run was trained on, as ``data:`` URIs the page embeds.

Which shards: ``--shards`` when given, else the folder the run's ``stream.shards`` names; a
stage-2 run trained from a feature cache (``stage2.features``) has no frames in it, so the
video shards are the ones its stage-1 encoder's ``config.yaml`` names (the only file read
from the encoder's folder). Shards are untrusted and read only through the project's readers
(fla_ds/shards/index.py, fla_ds/shards/format.py): the index checked, every member checked
before it is read, each sample parsed. A JPEG goes into the page as stored when its header
gives the size its json says and it is small; a large frame is decoded (its size checked
first, fla_ds.shards.format.read_frame) and re-encoded small. When no frames can be had, the
reason is one line on the page; the report itself never fails for it.
"""
from __future__ import annotations

import base64
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from fla_ds.config import ConfigError, load_config
from fla_ds.frames import encode_jpeg
from fla_ds.shards.format import ShardFormatError, iter_raw_samples, parse_sample, read_frame
from fla_ds.shards.index import IndexFormatError, load_index, read_index

FRAMES_PER_CLIP = 6
THUMB_HEIGHT = 72  # pixels on the page
MAX_EMBEDDED_BYTES = 48 << 10  # a stored JPEG above this is re-encoded small
MAX_EMBEDDED_SIDE = 320
READ_ERRORS = (IndexFormatError, ShardFormatError, ValueError, OSError)


@dataclass
class Thumb:
    """One frame as the page shows it."""

    uri: str
    width: int
    height: int


@dataclass
class Strips:
    """Frames found for the wanted clips, and why any are missing."""

    folder: str | None = None
    """The shard folder read (None: none could be found)."""
    by_id: dict[str, list[Thumb]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    """One line each: why there are no frames, or why some clips have none."""
    corpus: str | None = None
    """The corpus the index names for the split."""


def video_shard_folder(cfg, override: str | None) -> tuple[str | None, str]:
    """(the video shard folder, where it was named) for a run's config ``cfg``; (None, why)
    when there is none. ``override`` (``--shards``) wins."""
    if override:
        return override, "--shards"
    features = cfg.stage2.features
    if features and cfg.stage2.encoder:
        path = Path(cfg.stage2.encoder) / "config.yaml"
        if not path.is_file():
            return None, f"the run trained from the feature cache {features}, and its encoder's {path} cannot be read"
        try:
            shards = load_config(str(path)).stream.shards
        except ConfigError as exc:
            return None, f"the run trained from the feature cache {features}, and its encoder's config is damaged ({exc})"
        return (shards, f"stream.shards of {path}") if shards else (None, f"{path} names no stream.shards")
    if features:
        return None, f"the run trained from the feature cache {features}, which holds no frames, and names no stage-1 encoder"
    if cfg.stream.shards:
        return cfg.stream.shards, "stream.shards of the run's config.yaml"
    return None, "the run's config.yaml names no stream.shards (give --shards DIR)"


def spaced(count: int, k: int = FRAMES_PER_CLIP) -> list[int]:
    """``k`` frame indices spread evenly over ``count`` frames, first and last included."""
    if count <= k:
        return list(range(count))
    return sorted({round(i * (count - 1) / (k - 1)) for i in range(k)})


def thumb(pack, i: int, meta: dict, where: str) -> Thumb:
    """Frame ``i`` as a data URI: the stored JPEG as it is when its header gives the json's
    size and it is small, else decoded (size checked first) and re-encoded at THUMB_HEIGHT x 2.
    Raises ShardFormatError."""
    data = bytes(pack.jpeg(i))
    width, height = meta["width"], meta["height"]
    try:
        with Image.open(io.BytesIO(data), formats=["JPEG"]) as im:  # reads the header only
            size = im.size
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ShardFormatError(f"{where}: frame {i} is not a readable JPEG ({str(exc).splitlines()[0][:120]})") from None
    if size != (width, height):
        raise ShardFormatError(f"{where}: frame {i} is {size[0]}x{size[1]} pixels, its json says {width}x{height}")
    if len(data) > MAX_EMBEDDED_BYTES or max(size) > MAX_EMBEDDED_SIDE:
        image = Image.fromarray(read_frame(pack, i, meta, where))
        image.thumbnail((MAX_EMBEDDED_SIDE, THUMB_HEIGHT * 2))
        data, (width, height) = encode_jpeg(image, quality=80), image.size
    shown_width = max(1, round(width * THUMB_HEIGHT / height))
    return Thumb("data:image/jpeg;base64," + base64.b64encode(data).decode("ascii"), shown_width, THUMB_HEIGHT)


def positions_of(path: str, samples: int, wanted: set[str]) -> dict[int, str]:
    """Position in the shard -> clip id, for the wanted ids among its samples (json members
    only: the frames are checked but not read). Raises ShardFormatError."""
    found = {}
    for raw in iter_raw_samples(path, samples=samples, read_payload=False):
        try:
            clip_id = parse_record_id(raw["json"])
        except ValueError:
            raise ShardFormatError(f"{path}: member '{raw['__key__']}.json' lacks a string id") from None
        if clip_id in wanted:
            found[raw["__pos__"]] = clip_id
    return found


def parse_record_id(data: bytes) -> str:
    """The ``id`` of a sample's json member. Raises ValueError when it has none."""
    meta = json.loads(data.decode("utf-8"))
    if not isinstance(meta, dict) or not isinstance(meta.get("id"), str):
        raise ValueError("no string id")
    return meta["id"]


def read_shard_strips(path: str, samples: int, wanted: set[str], strips: Strips) -> None:
    """Add the strips of the wanted clips one shard holds to ``strips.by_id``. Raises
    ShardFormatError (naming shard and member)."""
    positions = positions_of(path, samples, wanted - set(strips.by_id))
    if not positions:
        return
    for raw in iter_raw_samples(path, positions=positions, samples=samples):
        meta, pack = parse_sample(path, raw)
        where = f"{path}: member '{raw['__key__']}.frames'"
        strips.by_id[meta["id"]] = [thumb(pack, i, meta, where) for i in spaced(len(pack))]


def read_strips(folder: str | None, split: str, wanted: set[str], why: str = "") -> Strips:
    """The frame strips of the ``wanted`` clip ids in ``split`` of the shard ``folder``.
    Never raises for what it finds: a folder that is missing, not video, or damaged becomes a
    line in ``problems`` (a damaged shard loses only its own clips)."""
    strips = Strips(folder)
    if folder is None:
        strips.problems.append(f"no frames: {why}")
        return strips
    try:
        index = read_index(folder)
        entry = load_index(folder, split)
    except READ_ERRORS as exc:
        strips.problems.append(f"no frames: the shards ({why}) cannot be read: {exc}")
        return strips
    corpus = index["splits"].get(entry["split"], {}).get("corpus")
    strips.corpus = corpus if isinstance(corpus, str) else None
    if not wanted:
        return strips
    if entry["kind"] != "video":
        strips.problems.append(f"no frames: {folder} holds {entry['kind']}, not video (give --shards DIR)")
        return strips
    for shard in entry["shards"]:
        path = os.path.join(folder, shard["name"])
        try:
            read_shard_strips(path, shard["samples"], wanted, strips)
        except READ_ERRORS as exc:
            strips.problems.append(f"some frames missing: {exc}")
    missing = len(wanted - set(strips.by_id))
    if missing:
        strips.problems.append(f"{missing} of {len(wanted)} clips are not in split '{entry['split']}' of {folder}")
    return strips
