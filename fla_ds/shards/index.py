"""``index.json``: what a shard folder holds, read as untrusted input.

The index is written by the shard builder (fla_ds.shards.build) and by the feature cache
(fla_ds.features); the loader, ``shards verify``, the feature extractor and the vocabulary
builder read it through this module only (``load_index``, or its three steps for verify).

The rules, each a one-line ``IndexFormatError`` naming the file and the field:

- the file: a regular file inside the folder (a FIFO or a symlink leading out is refused
  unread), at most ``MAX_INDEX_BYTES``, UTF-8 JSON without NaN/Infinity, duplicate keys or
  nesting deeper than ``MAX_DEPTH``;
- top level: ``splits`` an object whose keys are train, dev or test; ``format`` (if given)
  "fla_ds.shards"; ``kind`` (if given) video or features;
- a split: ``kind`` video or features; ``views`` 1 for video, 1..``MAX_VIEWS`` for features;
  ``plan_fingerprint`` a lowercase hex string; ``language`` (if given and not empty) a language
  code (``fla_ds.corpus.base.LANGUAGE_CODE``); ``samples``, ``frames`` and ``bytes`` equal the
  sums over its shards; features also ``dim`` in 1..65536, ``dtype`` float16, ``clips`` =
  samples / views and every view laid out alike (same shard count, same samples per shard);
  at least one sample (a split every sample of which was rejected is refused: nothing to
  train, evaluate or extract from);
- a shard: ``name`` a plain file name (``[A-Za-z0-9_]`` then ``[A-Za-z0-9_.-]``, ending in
  ``.tar``, no ``..``; so no ``/``, ``\\``, absolute path, NUL, leading ``-`` or ``.``), unique in
  its split; ``sha256`` 64 hex digits; ``bytes`` a whole number of 512-byte tar blocks;
  ``samples`` at most bytes // 2048 (two members, each at least a header and a data block);
  ``frames`` at least samples and at most bytes // 8 (video: 8 bytes of pack offset per
  frame) or bytes // (2 x dim) (features: float16); ``view`` in 0..views-1;
- the shard file (``shard_path``): inside the folder once symlinks are resolved, a regular
  file (never a FIFO or device), exactly ``bytes`` long.
"""
from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

from fla_ds.corpus.base import LANGUAGE_CODE, canonical_split
from fla_ds.shards.format import FEATURE_DTYPE, MAX_FEATURE_DIM, MIN_SAMPLE_BYTES, TAR_BLOCK, ShardFormatError, file_kind, one_line, show

MAX_INDEX_BYTES = 64 << 20
MAX_DEPTH = 32  # the layout needs 5; anything deeper is not an index
MAX_VIEWS = 64
MAX_SHARD_BYTES = 1 << 50
PACK_BYTES_PER_FRAME = 8  # a frame pack's offset table entry (fla_ds.frames)
SPLITS = ("train", "dev", "test")
KINDS = ("video", "features")
INDEX_FORMAT = "fla_ds.shards"
_SHARD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,250}\.tar")
_HEX = re.compile(r"[0-9a-f]{16,128}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# Fields written for provenance and read by no loader: only their type is checked.
_INFO_FIELDS = {"corpus": str, "builder_version": int, "settings": dict, "sources": dict, "rejected": int, "rejects_by_reason": dict,
                "repaired": dict, "seed": int, "world_size": int, "checkpoint": dict, "source": dict}


class IndexFormatError(ShardFormatError):
    """``index.json`` missing, malformed, or not matching the shard files beside it; the
    message is one line naming the file (or shard) and the field."""


def index_file(folder: str | os.PathLike) -> Path:
    return Path(folder) / "index.json"


def _describe(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, str):
        return show(value, 40)
    if isinstance(value, (int, float)):
        text = str(value)
        return text if len(text) <= 40 else text[:40] + "..."
    return "a list" if isinstance(value, list) else "an object"


def _inside(folder: Path, path: Path) -> Path:
    """``path`` with symlinks resolved; raises IndexFormatError when that leads outside
    ``folder`` (resolving reads links only, never opens the target)."""
    real_folder, real = Path(os.path.realpath(folder)), Path(os.path.realpath(path))
    if real_folder not in real.parents:
        raise IndexFormatError(f"{path}: is a symlink leading outside {folder} (to {show(str(real))}); refusing it")
    return real


def _regular_size(path: Path, real: Path, what: str) -> int:
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise IndexFormatError(f"{path} does not exist: {what}") from None
    except OSError as exc:
        raise IndexFormatError(f"{path}: cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise IndexFormatError(f"{path}: is {file_kind(st.st_mode)}, not a regular file; refusing it")
    return st.st_size


# ------------------------------------------------------------------ the file


class _DuplicateKey(ValueError):
    pass


def _object(pairs: list) -> dict:
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(key)
        obj[key] = value
    return obj


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _depth_ok(document: Any) -> bool:
    stack = [(document, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_DEPTH:
                return False
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return True


def read_index(folder: str | os.PathLike) -> dict:
    """The parsed ``index.json`` of ``folder``, its file and top level checked (not yet its
    splits: ``split_entry``). Raises IndexFormatError: missing, not a regular file inside the
    folder, too large, not UTF-8 JSON, duplicate keys, too deep, wrong top-level types."""
    path = index_file(folder)
    if not os.path.lexists(path):
        raise IndexFormatError(f"{path} does not exist: build the shards first (fla-ds shards build)")
    real = _inside(Path(folder), path)
    if _regular_size(path, real, "build the shards first (fla-ds shards build)") > MAX_INDEX_BYTES:
        raise IndexFormatError(f"{path}: is larger than {MAX_INDEX_BYTES} bytes; refusing to parse it")
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise IndexFormatError(f"{path}: cannot be read ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # replaced since the check above
            raise IndexFormatError(f"{path}: is not a regular file; refusing it")
        data = f.read(min(st.st_size, MAX_INDEX_BYTES) + 1)  # read(n) allocates n bytes up front
    if len(data) > MAX_INDEX_BYTES:
        raise IndexFormatError(f"{path}: is larger than {MAX_INDEX_BYTES} bytes; refusing to parse it")
    try:
        index = json.loads(data.decode("utf-8"), object_pairs_hook=_object, parse_constant=_no_constant)
    except _DuplicateKey as exc:
        raise IndexFormatError(f"{path}: key {show(str(exc.args[0]), 40)} appears twice in one object") from None
    except RecursionError:
        raise IndexFormatError(f"{path}: is nested deeper than {MAX_DEPTH} levels; refusing it") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise IndexFormatError(f"{path}: is not UTF-8 JSON ({one_line(exc, 120)})") from None
    if not _depth_ok(index):
        raise IndexFormatError(f"{path}: is nested deeper than {MAX_DEPTH} levels; refusing it")
    if not isinstance(index, dict):
        raise IndexFormatError(f"{path}: is {_describe(index)}, not a JSON object")
    if "format" in index and index["format"] != INDEX_FORMAT:
        raise IndexFormatError(f"{path}: format is {_describe(index['format'])}, not '{INDEX_FORMAT}'")
    if "kind" in index and index["kind"] not in KINDS:
        raise IndexFormatError(f"{path}: kind is {_describe(index['kind'])}, not one of {', '.join(KINDS)}")
    splits = index.get("splits")
    if not isinstance(splits, dict):
        raise IndexFormatError(f"{path}: splits is {_describe(splits) if 'splits' in index else 'missing'}, not an object")
    for name, entry in splits.items():
        if name not in SPLITS:
            raise IndexFormatError(f"{path}: splits has {show(name, 40)}, not one of {', '.join(SPLITS)}")
        if not isinstance(entry, dict):
            raise IndexFormatError(f"{path}: splits.{name} is {_describe(entry)}, not an object")
    return index


# ------------------------------------------------------------------ one split


class _Fields:
    """Checks of one object's fields, errors naming the file and the field's path."""

    def __init__(self, path: Path, where: str, obj: dict):
        self.path, self.where, self.obj = path, where, obj

    def fail(self, field: str, problem: str):
        raise IndexFormatError(f"{self.path}: {self.where}.{field} {problem}")

    def int(self, field: str, low: int, high: int, default: Any = None) -> int:
        if field not in self.obj:
            if default is None:
                self.fail(field, "is missing")
            return default
        value = self.obj[field]
        if type(value) is not int:  # bool is an int subclass: refused
            self.fail(field, f"is {_describe(value)}, not an integer")
        if not low <= value <= high:
            self.fail(field, f"is {value}, outside {low}..{high}")
        return value

    def str(self, field: str, pattern: re.Pattern | None = None, expected: str = "", default: Any = None) -> str:
        if field not in self.obj:
            if default is None:
                self.fail(field, "is missing")
            return default
        value = self.obj[field]
        if not isinstance(value, str):
            self.fail(field, f"is {_describe(value)}, not a string")
        if pattern is not None and not pattern.fullmatch(value):
            self.fail(field, f"is {_describe(value)}, not {expected}")
        return value

    def list(self, field: str) -> list:
        value = self.obj.get(field)
        if not isinstance(value, list):
            self.fail(field, f"is {_describe(value) if field in self.obj else 'missing'}, not a list")
        return value


def split_entry(folder: str | os.PathLike, index: dict, split: str) -> dict:
    """The entry of ``split`` (a key of ``index["splits"]``, from ``read_index``), every field
    checked against the rules of the module docstring, without touching the shard files;
    returned as a copy with ``split``, ``kind`` and ``views`` filled in. Raises
    IndexFormatError (naming the file and field), also for a split with no samples."""
    path, entry = index_file(folder), index["splits"][split]
    f = _Fields(path, f"splits.{split}", entry)
    if f.str("split", default=split) != split:
        f.fail("split", f"is {_describe(entry['split'])}, not '{split}' (the key it is filed under)")
    kind = f.str("kind", default=index.get("kind", "video"))
    if kind not in KINDS:
        f.fail("kind", f"is {_describe(kind)}, not one of {', '.join(KINDS)}")
    if kind != index.get("kind", kind):
        f.fail("kind", f"is '{kind}', the index's kind is '{index['kind']}'")
    views = f.int("views", 1, MAX_VIEWS if kind == "features" else 1, default=1)
    f.str("plan_fingerprint", _HEX, "a lowercase hex string (16 to 128 digits)")
    if f.str("language", default=""):
        f.str("language", LANGUAGE_CODE, "a language code such as de, en, zh or pt-BR")
    dim = 0
    if kind == "features":
        dim = f.int("dim", 1, MAX_FEATURE_DIM)
        if f.str("dtype") != FEATURE_DTYPE:
            f.fail("dtype", f"is {_describe(entry['dtype'])}, only '{FEATURE_DTYPE}' is read")
    for field, kind_of in _INFO_FIELDS.items():
        if field in entry and not (isinstance(entry[field], kind_of) and not isinstance(entry[field], bool)):
            f.fail(field, f"is {_describe(entry[field])}, not {'an object' if kind_of is dict else 'a string' if kind_of is str else 'an integer'}")
    shards = f.list("shards")
    names: set[str] = set()
    by_view: list[list[int]] = [[] for _ in range(views)]
    for i, shard in enumerate(shards):
        if not isinstance(shard, dict):
            f.fail(f"shards[{i}]", f"is {_describe(shard)}, not an object")
        check_shard_entry(_Fields(path, f"splits.{split}.shards[{i}]", shard), kind, views, dim)
        if shard["name"] in names:
            f.fail(f"shards[{i}].name", f"{show(shard['name'])} is listed twice")
        names.add(shard["name"])
        by_view[shard.get("view", 0)].append(shard["samples"])
    for field in ("samples", "frames", "bytes"):
        total = sum(s[field] for s in shards)
        if f.int(field, 0, MAX_SHARD_BYTES * max(1, len(shards))) != total:
            f.fail(field, f"is {entry[field]}, its shards add up to {total}")
    if any(counts != by_view[0] for counts in by_view):
        f.fail("shards", f"lay out the {views} views differently (every view needs the same samples per shard)")
    if kind == "features" and (clips := f.int("clips", 0, entry["samples"], default=entry["samples"] // views)) * views != entry["samples"]:
        f.fail("clips", f"is {clips}, the shards hold {entry['samples']} samples in {views} views")
    if entry["samples"] == 0:
        raise IndexFormatError(f"{folder}: split '{split}' has no samples (every sample was rejected, or none was built); nothing to read")
    return {**entry, "split": split, "kind": kind, "views": views}


def check_shard_entry(f: _Fields, kind: str, views: int, dim: int) -> None:
    """One ``shards[i]`` object: the name is a plain shard file name and the counts fit its
    bytes. Raises IndexFormatError."""
    name = f.str("name")
    if not _SHARD_NAME.fullmatch(name) or ".." in name:
        f.fail("name", f"{show(name)} is not a plain shard file name in the folder ([A-Za-z0-9_] then [A-Za-z0-9_.-], ending in .tar, no '..')")
    size = f.int("bytes", 0, MAX_SHARD_BYTES)
    if size % TAR_BLOCK:
        f.fail("bytes", f"is {size}, not a whole number of {TAR_BLOCK}-byte tar blocks")
    samples = f.int("samples", 0, MAX_SHARD_BYTES)
    if samples > size // MIN_SAMPLE_BYTES:
        f.fail("samples", f"is {samples}, more than a {size}-byte shard can hold ({size // MIN_SAMPLE_BYTES} samples of at least {MIN_SAMPLE_BYTES} bytes)")
    frames = f.int("frames", 0, MAX_SHARD_BYTES)
    per_frame = 2 * dim if kind == "features" else PACK_BYTES_PER_FRAME
    if not samples <= frames <= size // per_frame:
        f.fail("frames", f"is {frames}, not between its {samples} samples (one frame each) and the {size // per_frame} a {size}-byte shard can hold")
    f.str("sha256", _SHA256, "a sha256 (64 lowercase hex digits)")
    f.int("view", 0, views - 1, default=0)


def shard_path(folder: str | os.PathLike, shard: dict) -> str:
    """The path of a checked shard entry's file, after checking the file itself: inside the
    folder once symlinks are resolved (a link leading out is never opened), a regular file
    (a FIFO would block its reader forever) of exactly the indexed bytes. Raises
    IndexFormatError naming the shard."""
    path = Path(folder) / shard["name"]
    real = _inside(Path(folder), path)
    size = _regular_size(path, real, f"listed in {index_file(folder)}")
    if size != shard["bytes"]:
        raise IndexFormatError(f"{path}: {size} bytes on disk, {index_file(folder)} says {shard['bytes']}")
    return str(path)


# ------------------------------------------------------------------ the entry point


def load_index(folder: str | os.PathLike, split: str) -> dict:
    """The checked index entry of one split (``read_index``, ``split_entry``, and
    ``shard_path`` for every shard): what the loader, the feature extractor and the
    vocabulary builder read. Raises IndexFormatError (one line naming the file, shard and
    field; a split with no samples included), CorpusError for an unknown split name."""
    split = canonical_split(split)
    index = read_index(folder)
    if split not in index["splits"]:
        raise IndexFormatError(f"{index_file(folder)} has no split '{split}' (it has: {', '.join(sorted(index['splits'])) or 'none'})")
    entry = split_entry(folder, index, split)
    for shard in entry["shards"]:
        shard_path(folder, shard)
    return entry
