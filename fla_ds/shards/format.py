"""The shard format: what one sample is inside a WebDataset tar, and how it is read safely.

A sample is exactly two members, ``<key>.json`` (UTF-8 JSON: id, text, frame count and size,
metadata) and one payload: ``<key>.frames`` (the frame pack of fla_ds.frames) in video shards,
``<key>.features`` (raw little-endian float16 (T, D), shape in the json) in the feature cache
of fla_ds.features. Shards come from elsewhere, so they are untrusted: members are parsed as
JSON, frame pack or raw float16 only, and any other member (``.pyd``, ``.pickle``, anything)
is refused with an error naming shard and member; nothing is ever unpickled. Tar headers are fixed (mtime 0, root owner, mode 0444) so that the
same inputs give byte-identical shards.
"""
from __future__ import annotations

import io
import json
import re
import tarfile
from typing import Iterable, Iterator, Optional

import numpy as np
from webdataset import gopen
from webdataset.tariterators import tar_file_iterator

from fla_ds.frames import FramePack

MEMBER_SUFFIXES = ("json", "frames", "features")
PAYLOAD_SUFFIXES = ("frames", "features")  # a sample has json and exactly one of these
_MEMBER_RE = re.compile(r"^([A-Za-z0-9_-]+)\.(json|frames|features)$")


class ShardFormatError(ValueError):
    """A shard that fla_ds did not write, or that is damaged; the message names shard and member."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # webdataset appends the file object to args; keep one clean line
        return self.message


class ShardWriter:
    """Writes samples into one tar with deterministic headers."""

    def __init__(self, fileobj):
        self._tar = tarfile.open(fileobj=fileobj, mode="w", format=tarfile.PAX_FORMAT)

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o444
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        self._tar.addfile(info, io.BytesIO(data))

    def write(self, key: str, meta: dict, payload: bytes, suffix: str = "frames") -> None:
        if not _MEMBER_RE.match(f"{key}.json"):
            raise ValueError(f"sample key '{key}' has characters WebDataset cannot keep (dots, slashes)")
        if suffix not in PAYLOAD_SUFFIXES:
            raise ValueError(f"payload suffix '{suffix}' is not one of {PAYLOAD_SUFFIXES}")
        self._add(f"{key}.json", json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8"))
        self._add(f"{key}.{suffix}", payload)

    def close(self) -> None:
        self._tar.close()


class _PositionSelector:
    """select_files callback for webdataset: refuses foreign members, counts sample positions,
    and selects the wanted ones so that skipped members are never read into memory."""

    def __init__(self, shard: str, positions: Optional[set[int]]):
        self.shard, self.positions = shard, positions
        self.key: Optional[str] = None
        self.position = -1

    def __call__(self, fname: str) -> bool:
        match = _MEMBER_RE.match(fname)
        if not match:
            raise ShardFormatError(f"{self.shard}: member '{fname}' is not one fla_ds writes; refusing the shard")
        if match.group(1) != self.key:
            self.key = match.group(1)
            self.position += 1
        return self.positions is None or self.position in self.positions


def iter_raw_samples(shard: str, positions: Optional[Iterable[int]] = None, payload: str = "frames") -> Iterator[dict]:
    """Yield {"__key__", "__pos__", "json": bytes, <payload>: bytes} per sample, in tar order.

    ``positions`` selects samples by their index in the shard; members of other samples are
    skipped without being kept, and reading stops after the last wanted one. ``payload`` is
    what the shard's kind holds ("frames" or "features"). A sample missing one of its two
    members, holding the other kind's payload, or a member seen twice, is an error.
    """
    wanted = None if positions is None else set(positions)
    if wanted is not None and not wanted:
        return
    last = None if wanted is None else max(wanted)
    selector = _PositionSelector(shard, wanted)
    stream = gopen(shard, "rb")
    try:
        current: dict = {}
        for member in tar_file_iterator(stream, select_files=selector):
            key, suffix = member["fname"].split(".", 1)
            if current and current["__key__"] != key:
                yield _complete(shard, current, payload)
                current = {}
            if suffix in current:
                raise ShardFormatError(f"{shard}: member '{member['fname']}' appears twice")
            current.setdefault("__key__", key)
            current.setdefault("__pos__", selector.position)
            current[suffix] = member["data"]
            if last is not None and selector.position == last and len(current) == 4:  # key, pos, json, payload
                break
        if current:
            yield _complete(shard, current, payload)
    except tarfile.TarError as exc:
        raise ShardFormatError(f"{shard}: damaged tar ({exc})") from None
    finally:
        stream.close()


def _complete(shard: str, sample: dict, payload: str) -> dict:
    key = sample["__key__"]
    missing = [s for s in ("json", payload) if s not in sample]
    if missing:
        raise ShardFormatError(f"{shard}: sample '{key}' lacks its .{missing[0]} member")
    foreign = [s for s in PAYLOAD_SUFFIXES if s != payload and s in sample]
    if foreign:
        raise ShardFormatError(f"{shard}: member '{key}.{foreign[0]}' does not belong in a shard of .{payload} samples")
    return sample


def parse_sample(shard: str, raw: dict) -> tuple[dict, FramePack]:
    """Validate and parse one raw sample into (meta, frame pack)."""
    key = raw["__key__"]
    try:
        meta = json.loads(raw["json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShardFormatError(f"{shard}: member '{key}.json' is not UTF-8 JSON ({exc})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("text"), str) or not isinstance(meta.get("num_frames"), int):
        raise ShardFormatError(f"{shard}: member '{key}.json' lacks text/num_frames")
    try:
        pack = FramePack(raw["frames"])
    except ValueError as exc:
        raise ShardFormatError(f"{shard}: member '{key}.frames': {exc}") from None
    if len(pack) != meta["num_frames"]:
        raise ShardFormatError(f"{shard}: sample '{key}' has {len(pack)} frames, its json says {meta['num_frames']}")
    return meta, pack


FEATURE_DTYPE = "float16"  # the only one the cache writes: half the bytes of fp32, exact enough


def parse_feature_sample(shard: str, raw: dict) -> tuple[dict, np.ndarray]:
    """Validate and parse one raw feature sample into (meta, (T, D) float16 array); the
    json's num_frames (T), dim (D) and dtype must account for every byte of the payload."""
    key = raw["__key__"]
    try:
        meta = json.loads(raw["json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShardFormatError(f"{shard}: member '{key}.json' is not UTF-8 JSON ({exc})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("text"), str):
        raise ShardFormatError(f"{shard}: member '{key}.json' lacks text")
    t, d = meta.get("num_frames"), meta.get("dim")
    if not (isinstance(t, int) and isinstance(d, int) and t > 0 and d > 0):
        raise ShardFormatError(f"{shard}: member '{key}.json' lacks a positive num_frames/dim")
    if meta.get("dtype") != FEATURE_DTYPE:
        raise ShardFormatError(f"{shard}: member '{key}.json' says dtype {meta.get('dtype')!r}, only {FEATURE_DTYPE} is read")
    data = raw["features"]
    if len(data) != t * d * 2:
        raise ShardFormatError(f"{shard}: member '{key}.features' has {len(data)} bytes, its json says {t} x {d} float16 ({t * d * 2})")
    return meta, np.frombuffer(bytearray(data), dtype="<f2").reshape(t, d)  # writable: torch wants it
