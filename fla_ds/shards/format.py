"""The shard format: what one sample is inside a WebDataset tar, and how it is read safely.

A sample is exactly two members, ``<key>.json`` (UTF-8 JSON: id, text, frame count and size,
metadata) and one payload: ``<key>.frames`` (the frame pack of fla_ds.frames) in video shards,
``<key>.features`` (raw little-endian float16 (T, D), shape in the json) in the feature cache
of fla_ds.features. Tar headers are fixed (mtime 0, root owner, mode 0444) so that the same
inputs give byte-identical shards, and the tars stay plain WebDataset shards
(``webdataset.WebDataset(url)`` reads them).

Shards come from elsewhere, so they are untrusted. They are read with the standard library's
``tarfile`` in stream mode (one forward pass, nothing extracted to disk) and every member is
checked wherever it sits in the tar (before, between or after samples), before its data is
read:

- the shard must be a regular file (opened non-blocking and checked with fstat, so a FIFO
  or device is refused instead of hanging the reader);
- only regular members: symlinks, hard links, directories, devices, FIFOs, sparse and
  contiguous files are refused (WebDataset skips them silently; we refuse the shard);
- names are ``<key>.json``, ``<key>.frames`` or ``<key>.features`` with an ASCII key of
  ``[A-Za-z0-9_-]`` not starting with ``__`` (WebDataset's reserved keys): no ``.pyd``, no
  ``.pickle``, no paths (``../x.json``, ``/x.json``); nothing is ever unpickled;
- sizes: a ``.json`` member above ``MAX_JSON_BYTES``, a member claiming bytes past the end
  of the shard, or an extended (pax/GNU long name) header above ``MAX_HEADER_EXTENSION`` is
  refused before anything is read;
- a sample's two members are adjacent, its key appears once per shard; when a read goes to
  the end of the tar, everything after the last member must be the zero end marker, and the
  sample count must equal the index's.

Every error is a ``ShardFormatError`` whose one-line message names shard and member.
"""
from __future__ import annotations

import io
import json
import os
import re
import stat
import tarfile
from collections.abc import Iterable, Iterator
from typing import BinaryIO

import numpy as np

from fla_ds.frames import MAX_FRAME_SIDE, MAX_NUM_FRAMES, FramePack, JpegError, frame_error, read_jpeg

MEMBER_SUFFIXES = ("json", "frames", "features")
PAYLOAD_SUFFIXES = ("frames", "features")  # a sample has json and exactly one of these
_MEMBER_RE = re.compile(r"([A-Za-z0-9_-]+)\.(json|frames|features)")  # always with fullmatch: '$' would let a trailing newline in
RESERVED_KEY_PREFIX = "__"  # WebDataset's own keys (__key__, __url__, ...)

TAR_BLOCK = 512
MIN_MEMBER_BYTES = 2 * TAR_BLOCK  # a header block and at least one data block (no member of ours is empty)
MIN_SAMPLE_BYTES = 2 * MIN_MEMBER_BYTES  # json + payload
MAX_JSON_BYTES = 1 << 20
MAX_HEADER_EXTENSION = 64 << 10  # a pax or GNU long-name header; tarfile reads it whole
MAX_EXTENSION_CHAIN = 8
MAX_FEATURE_DIM = 1 << 16
FEATURE_DTYPE = "float16"  # the only one the cache writes: half the bytes of fp32, exact enough

_EXTENSION_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
_MEMBER_KINDS = {
    tarfile.SYMTYPE: "a symlink", tarfile.LNKTYPE: "a hard link", tarfile.DIRTYPE: "a directory",
    tarfile.CHRTYPE: "a character device", tarfile.BLKTYPE: "a block device", tarfile.FIFOTYPE: "a FIFO",
    tarfile.CONTTYPE: "a contiguous file", tarfile.GNUTYPE_SPARSE: "a sparse file",
}


class ShardFormatError(ValueError):
    """A shard that fla_ds did not write, or that is damaged; the message names shard and member."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # one clean line, whatever is appended to args
        return self.message


def show(text: str, limit: int = 80) -> str:
    """An untrusted name quoted for a one-line message (newlines escaped, length capped)."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's message cut to its first line (messages here are one line)."""
    lines = str(exc).splitlines()
    return lines[0][:limit] if lines else type(exc).__name__


def file_kind(mode: int) -> str:
    """What a non-regular file is, in words, from its st_mode."""
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symlink")):
        if test(mode):
            return kind
    return "not a regular file"


def member_key(shard: str, name: str) -> tuple[str, str]:
    """(key, suffix) of a member name fla_ds writes. Raises ShardFormatError for anything else."""
    match = _MEMBER_RE.fullmatch(name)
    if not match:
        raise ShardFormatError(f"{shard}: member {show(name)} is not one fla_ds writes "
                               "(<key>.json|.frames|.features, key of A-Z a-z 0-9 _ -); refusing the shard")
    if name.startswith(RESERVED_KEY_PREFIX):
        raise ShardFormatError(f"{shard}: member {show(name)} has a key starting with '{RESERVED_KEY_PREFIX}', reserved by WebDataset; refusing the shard")
    return match.group(1), match.group(2)


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
        """Raises ValueError for a key the readers would refuse (not ASCII [A-Za-z0-9_-],
        or starting with '__') or an unknown payload suffix."""
        if not _MEMBER_RE.fullmatch(f"{key}.json") or key.startswith(RESERVED_KEY_PREFIX):
            raise ValueError(f"sample key {show(key)} is not ASCII [A-Za-z0-9_-] or starts with '__' (reserved by WebDataset)")
        if suffix not in PAYLOAD_SUFFIXES:
            raise ValueError(f"payload suffix '{suffix}' is not one of {PAYLOAD_SUFFIXES}")
        self._add(f"{key}.json", json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8"))
        self._add(f"{key}.{suffix}", payload)

    def close(self) -> None:
        self._tar.close()


# ------------------------------------------------------------------ reading


def open_shard(shard: str) -> BinaryIO:
    """The shard opened for reading. Opened non-blocking and checked with fstat, so that a
    FIFO (which would block forever) or a device is refused without a read. Raises
    ShardFormatError (missing, unreadable, not a regular file)."""
    try:
        fd = os.open(shard, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise ShardFormatError(f"{shard}: cannot be opened ({exc.strerror})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise ShardFormatError(f"{shard}: is {file_kind(mode)}, not a regular file; refusing it")
    return os.fdopen(fd, "rb")


def _blocks(size: int) -> int:
    return -(-size // TAR_BLOCK) * TAR_BLOCK


def _check_header_chain(shard: str, fd: int, offset: int) -> None:
    """Look at the raw header(s) at ``offset`` before tarfile parses them: tarfile reads an
    extended header's data whole and trusts a sparse map, so both are bounded or refused here."""
    for _ in range(MAX_EXTENSION_CHAIN):
        block = os.pread(fd, TAR_BLOCK, offset)
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.HeaderError:
            return  # the end marker, or damage that tarfile reports
        if info.type == tarfile.GNUTYPE_SPARSE:
            raise ShardFormatError(f"{shard}: member {show(info.name)} is a sparse file, not a regular file; refusing the shard")
        if info.type not in _EXTENSION_TYPES:
            return
        if info.size > MAX_HEADER_EXTENSION:
            raise ShardFormatError(f"{shard}: the tar header at byte {offset} claims a {info.size}-byte extended header "
                                   f"(at most {MAX_HEADER_EXTENSION}); refusing the shard")
        offset += TAR_BLOCK + _blocks(info.size)
    raise ShardFormatError(f"{shard}: more than {MAX_EXTENSION_CHAIN} extended tar headers in a row before byte {offset}; refusing the shard")


def _check_end(shard: str, fd: int, offset: int, size: int) -> None:
    """Everything after the last member is the tar end marker: zeros (tarfile stops at the
    first zero block or unreadable header, so members hidden behind one are found here)."""
    while offset < size:
        chunk = os.pread(fd, min(1 << 16, size - offset), offset)
        if not chunk:
            return
        if chunk.count(0) != len(chunk):
            at = offset + next(i for i, b in enumerate(chunk) if b)
            raise ShardFormatError(f"{shard}: byte {at}, after the end of the tar's members, is not part of the zero end marker "
                                   "(a hidden or damaged member); refusing the shard")
        offset += len(chunk)


def _members(shard: str, f: BinaryIO) -> Iterator[tuple[str, str, tarfile.TarInfo, tarfile.TarFile]]:
    """(key, suffix, member, tar) of every member in tar order, each checked before its data
    is touched: a regular file, named as fla_ds names members, its data inside the shard; at
    the end, the rest of the file is checked to be the zero end marker."""
    fd, size = f.fileno(), os.fstat(f.fileno()).st_size
    _check_header_chain(shard, fd, 0)
    try:
        tar = tarfile.open(fileobj=f, mode="r|")  # plain tar only: no decompression of untrusted bytes
    except (tarfile.TarError, ValueError, EOFError, IndexError, UnicodeError) as exc:
        raise ShardFormatError(f"{shard}: not a readable tar ({one_line(exc)})") from None
    end = 0  # where the bytes after the last member start
    while True:
        try:
            member = tar.next()
        except (tarfile.TarError, ValueError, EOFError, IndexError, UnicodeError) as exc:
            raise ShardFormatError(f"{shard}: damaged tar after byte {end} ({one_line(exc)})") from None
        tar.members = []  # stream mode keeps every header otherwise: memory would grow with the shard
        if member is None:
            _check_end(shard, fd, end, size)
            return
        name = member.name
        if member.issparse() or member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
            kind = "a sparse file" if member.issparse() else _MEMBER_KINDS.get(member.type, f"of tar type {member.type!r}")
            raise ShardFormatError(f"{shard}: member {show(name)} is {kind}, not a regular file; refusing the shard")
        key, suffix = member_key(shard, name)
        if suffix == "json" and member.size > MAX_JSON_BYTES:
            raise ShardFormatError(f"{shard}: member {show(name)} claims {member.size} bytes, "
                                   f"more than the {MAX_JSON_BYTES} a .json member may hold; refusing the shard")
        if member.offset_data + member.size > size:
            raise ShardFormatError(f"{shard}: member {show(name)} claims {member.size} bytes, past the end of the {size}-byte shard")
        end = member.offset_data + _blocks(member.size)
        yield key, suffix, member, tar
        _check_header_chain(shard, fd, end)


def _read(shard: str, tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    try:
        data = tar.extractfile(member).read()
    except (tarfile.TarError, OSError) as exc:
        raise ShardFormatError(f"{shard}: member {show(member.name)} cannot be read ({one_line(exc)})") from None
    if len(data) != member.size:
        raise ShardFormatError(f"{shard}: member {show(member.name)} is truncated ({len(data)} of {member.size} bytes)")
    return data


def iter_raw_samples(shard: str, positions: Iterable[int] | None = None, payload: str = "frames",
                     samples: int | None = None, read_payload: bool = True) -> Iterator[dict]:
    """Yield {"__key__", "__pos__", "json": bytes, <payload>: bytes} per sample, in tar order.

    ``positions`` selects samples by their index in the shard; members of other samples are
    checked (type, name, size) but their data is skipped unread, and reading stops after the
    last wanted one, unless that is the shard's last sample. ``samples`` is the count the
    index gives the shard: a read that includes position ``samples - 1`` (or reads every
    sample, ``positions=None``) goes on to the end of the tar, and a tar with more or fewer
    samples is refused. ``payload`` is what the shard's kind holds ("frames" or "features");
    with ``read_payload=False`` the payload is checked but not read (texts only).

    Raises ShardFormatError (one line naming shard and member) for: a shard that is not a
    regular file, any member that is not a regular ``<key>.json|.frames|.features`` of the
    right size, a sample missing a member or holding the other kind's payload, a member or
    key seen twice, bytes after the last member, a sample count other than the index's;
    ValueError for a wanted position at or past ``samples``.
    """
    if payload not in PAYLOAD_SUFFIXES:
        raise ValueError(f"payload '{payload}' is not one of {PAYLOAD_SUFFIXES}")
    wanted = None if positions is None else set(positions)
    if wanted is not None and not wanted:
        return
    last = None if wanted is None else max(wanted)
    if samples is not None and last is not None and last >= samples:
        raise ValueError(f"{shard}: position {last} wanted, its index entry says {samples} samples")
    to_end = last is None or (samples is not None and last == samples - 1)
    with open_shard(shard) as f:
        count = 0  # samples begun
        keys: set[str] = set()
        sample: dict = {}  # the sample being read: its key, position and the data kept
        present: set[str] = set()  # its member suffixes seen so far
        for key, suffix, member, tar in _members(shard, f):
            if not sample or key != sample["__key__"]:
                if sample:
                    done = _complete(shard, sample, present, payload)
                    if wanted is None or done["__pos__"] in wanted:
                        yield done
                if key in keys:
                    raise ShardFormatError(f"{shard}: sample key '{key}' appears twice (member {show(member.name)} is not next to its sample)")
                keys.add(key)
                sample, present = {"__key__": key, "__pos__": count}, set()
                count += 1
                if samples is not None and count > samples:
                    raise ShardFormatError(f"{shard}: holds more than the {samples} samples its index entry says (member {show(member.name)})")
            if suffix in present:
                raise ShardFormatError(f"{shard}: member {show(member.name)} appears twice")
            present.add(suffix)
            if (wanted is None or sample["__pos__"] in wanted) and (suffix == "json" or read_payload):
                sample[suffix] = _read(shard, tar, member)
            if not to_end and sample["__pos__"] == last and {"json", payload} <= present:
                yield _complete(shard, sample, present, payload)
                return
        if sample:
            done = _complete(shard, sample, present, payload)
            if wanted is None or done["__pos__"] in wanted:
                yield done
    if samples is not None and count != samples:
        raise ShardFormatError(f"{shard}: ends after {count} samples, its index entry says {samples}")
    if last is not None and count <= last:
        raise ShardFormatError(f"{shard}: ends after {count} samples, sample {last} was wanted")


def _complete(shard: str, sample: dict, present: set[str], payload: str) -> dict:
    key = sample["__key__"]
    missing = [s for s in ("json", payload) if s not in present]
    if missing:
        raise ShardFormatError(f"{shard}: sample '{key}' lacks its .{missing[0]} member")
    foreign = [s for s in PAYLOAD_SUFFIXES if s != payload and s in present]
    if foreign:
        raise ShardFormatError(f"{shard}: member '{key}.{foreign[0]}' does not belong in a shard of .{payload} samples")
    return sample


# ------------------------------------------------------------------ parsing


def _load_json(shard: str, key: str, data: bytes) -> dict:
    try:
        meta = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ShardFormatError(f"{shard}: member '{key}.json' is not UTF-8 JSON ({one_line(exc)})") from None
    if not isinstance(meta, dict):
        raise ShardFormatError(f"{shard}: member '{key}.json' is not a JSON object")
    return meta


def _bounded_int(meta: dict, field: str, high: int) -> bool:
    value = meta.get(field)
    return type(value) is int and 0 < value <= high  # bool is an int subclass: refused


def parse_sample(shard: str, raw: dict) -> tuple[dict, FramePack]:
    """Validate and parse one raw video sample into (meta, frame pack): the json must hold
    a string id and text, num_frames in 1..MAX_NUM_FRAMES, width and height in
    1..MAX_FRAME_SIDE, and the pack as many frames as num_frames. The JPEGs are not decoded
    here; ``read_frame`` checks each one's size against the json before decoding it.
    Raises ShardFormatError naming shard and member."""
    key = raw["__key__"]
    meta = _load_json(shard, key, raw["json"])
    if not isinstance(meta.get("id"), str) or not isinstance(meta.get("text"), str):
        raise ShardFormatError(f"{shard}: member '{key}.json' lacks a string id/text")
    if not _bounded_int(meta, "num_frames", MAX_NUM_FRAMES):
        raise ShardFormatError(f"{shard}: member '{key}.json' lacks a num_frames in 1..{MAX_NUM_FRAMES}")
    if not (_bounded_int(meta, "width", MAX_FRAME_SIDE) and _bounded_int(meta, "height", MAX_FRAME_SIDE)):
        raise ShardFormatError(f"{shard}: member '{key}.json' lacks a width and height in 1..{MAX_FRAME_SIDE}")
    try:
        pack = FramePack(raw["frames"])
    except ValueError as exc:
        raise ShardFormatError(f"{shard}: member '{key}.frames': {exc}") from None
    if len(pack) != meta["num_frames"]:
        raise ShardFormatError(f"{shard}: sample '{key}' has {len(pack)} frames, its json says {meta['num_frames']}")
    return meta, pack


def read_frame(pack: FramePack, i: int, meta: dict, where: str, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Frame ``i`` of a pack as RGB uint8 (H, W, 3), cropped to ``box`` if given, through the
    loader's own reader (``fla_ds.frames.read_jpeg``: the same decoder, the same pixels). The
    JPEG's header is read first and its size checked against the json's width x height, so a
    forged header (65535 x 65535) is refused, never decoded. ``where`` names the clip in errors
    (e.g. "SHARD: member 'KEY.frames'"). Raises ShardFormatError."""
    size = (meta["width"], meta["height"])
    try:
        return read_jpeg(pack.jpeg(i), size, box)
    except JpegError as exc:
        raise frame_error(where, i, size, exc) from None


def parse_feature_sample(shard: str, raw: dict) -> tuple[dict, np.ndarray]:
    """Validate and parse one raw feature sample into (meta, (T, D) float16 array); the
    json's num_frames (T, 1..MAX_NUM_FRAMES), dim (D, 1..MAX_FEATURE_DIM) and dtype must
    account for every byte of the payload. Raises ShardFormatError naming shard and member."""
    key = raw["__key__"]
    meta = _load_json(shard, key, raw["json"])
    if not isinstance(meta.get("text"), str) or not isinstance(meta.get("id", ""), str):
        raise ShardFormatError(f"{shard}: member '{key}.json' lacks text")
    if not (_bounded_int(meta, "num_frames", MAX_NUM_FRAMES) and _bounded_int(meta, "dim", MAX_FEATURE_DIM)):
        raise ShardFormatError(f"{shard}: member '{key}.json' lacks a positive num_frames/dim (at most {MAX_NUM_FRAMES}/{MAX_FEATURE_DIM})")
    t, d = meta["num_frames"], meta["dim"]
    if meta.get("dtype") != FEATURE_DTYPE:
        raise ShardFormatError(f"{shard}: member '{key}.json' says dtype {meta.get('dtype')!r}, only {FEATURE_DTYPE} is read")
    data = raw["features"]
    if len(data) != t * d * 2:
        raise ShardFormatError(f"{shard}: member '{key}.features' has {len(data)} bytes, its json says {t} x {d} float16 ({t * d * 2})")
    return meta, np.frombuffer(bytearray(data), dtype="<f2").reshape(t, d)  # writable: torch wants it
