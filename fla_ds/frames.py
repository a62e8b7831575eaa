"""Frames in and out: a clip's frames -> the in-shard encoding, and back.

Every frame source (a folder of images: fla_ds.frame_folder; a video file or time cuts of
one: fla_ds.video) is read as a stream of RGB arrays already resized to the stored size, so
that a worker never holds more than a few decoded frames: memory is bounded by the stored
(JPEG) size of the clip, not by its source resolution times its length.

In a shard, a clip is one member holding every frame as its own JPEG (the "frame pack"), so
the loader decodes only the quarter of the frames it samples; docs/benchmarks.md has the
measurements behind that choice. The pack is a plain binary layout (no pickle):

    b"FLAJ" | u32 version | u32 count | (count + 1) x u64 offsets | JPEG bytes ...

Decoding failures raise ``SampleError`` with a short reason that ends up in rejects.jsonl.
"""
from __future__ import annotations

import io
import struct
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

PACK_MAGIC = b"FLAJ"
PACK_VERSION = 1
MAX_FRAME_SIDE = 8192
"""Largest stored frame side in pixels: what the loader accepts (stored frames are resized to
short side 256 by default; a larger side is a corrupt or hostile shard, or a source so
elongated that no crop of it makes sense)."""
MAX_NUM_FRAMES = 1 << 20
"""Most frames in one clip (11.6 hours at 25 fps)."""


class SampleError(Exception):
    """This sample cannot be used; ``str(exc)`` is the reject reason: a fixed phrase, then
    details in parentheses (the index counts rejects by the phrase)."""


# ---------------------------------------------------------------- sizes and JPEG


def resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) scaled so that the short side is ``short_side`` pixels (aspect kept,
    each side at least 1); ``short_side <= 0`` keeps the size."""
    if short_side <= 0:
        return width, height
    scale = short_side / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def encode_jpeg(frame: np.ndarray | Image.Image, quality: int) -> bytes:
    """One RGB frame (uint8 (H, W, 3) or a PIL image) as a baseline JPEG, 4:2:0."""
    image = Image.fromarray(frame) if isinstance(frame, np.ndarray) else frame
    buf = io.BytesIO()
    # No optimize/progressive: baseline JPEG decodes fastest, and the output is deterministic.
    image.save(buf, format="JPEG", quality=quality, subsampling="4:2:0")
    return buf.getvalue()


def decode_jpeg(data: bytes | memoryview) -> np.ndarray:
    """A JPEG -> uint8 (H, W, 3) RGB."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


# ---------------------------------------------------------------- the frame pack


def pack_frames(jpegs: Sequence[bytes]) -> bytes:
    """JPEG byte strings -> one frame pack (see the module docstring for the layout)."""
    offsets = [0]
    for j in jpegs:
        offsets.append(offsets[-1] + len(j))
    header = PACK_MAGIC + struct.pack("<II", PACK_VERSION, len(jpegs)) + struct.pack(f"<{len(offsets)}Q", *offsets)
    return b"".join([header, *jpegs])  # one copy: a clip can be tens of MB


class FramePack:
    """Random access to the JPEGs of one packed clip, validated before any byte is used.

    Raises ValueError (bad magic, unknown version, truncated header, offsets that do not
    account for the bytes)."""

    def __init__(self, data: bytes | memoryview):
        data = memoryview(data)
        if len(data) < 12 or bytes(data[:4]) != PACK_MAGIC:
            raise ValueError("not a frame pack (bad magic)")
        version, count = struct.unpack_from("<II", data, 4)
        if version != PACK_VERSION:
            raise ValueError(f"frame pack version {version} is not supported (expected {PACK_VERSION})")
        table_end = 12 + 8 * (count + 1)
        if count == 0 or len(data) < table_end:
            raise ValueError("frame pack header is truncated")
        offsets = struct.unpack_from(f"<{count + 1}Q", data, 12)
        if offsets[0] != 0 or any(b < a for a, b in zip(offsets, offsets[1:])) or table_end + offsets[-1] != len(data):
            raise ValueError("frame pack offsets do not match its size")
        self._data = data[table_end:]
        self._offsets = offsets
        self.count = count

    def __len__(self) -> int:
        return self.count

    def jpeg(self, i: int) -> memoryview:
        return self._data[self._offsets[i] : self._offsets[i + 1]]

    def decode(self, indices: Iterable[int]) -> np.ndarray:
        """Decode the given frames into a (T, H, W, 3) uint8 array."""
        return np.stack([decode_jpeg(self.jpeg(i)) for i in indices])


# ---------------------------------------------------------------- a clip, streamed


@dataclass
class EncodedClip:
    """One clip as stored: its frame pack, frame count and stored size (pixels), and the
    repairs made while reading it (counted into the shard index, e.g. ``end_clamped``)."""

    pack: bytes
    num_frames: int
    width: int
    height: int
    repaired: Counter = field(default_factory=Counter)


class ClipEncoder:
    """Builds one clip's frame pack as frames arrive: each RGB uint8 (H, W, 3) frame is
    JPEG-encoded at once and dropped, so memory is the clip's stored size. Raises
    SampleError from ``add`` for a frame of another size or one more than ``max_frames``
    (0: no limit), and from ``finish`` for zero frames."""

    def __init__(self, quality: int, max_frames: int = 0):
        self.quality, self.max_frames = quality, max_frames
        self.jpegs: list[bytes] = []
        self.size: tuple[int, int] | None = None  # (height, width)

    def add(self, frame: np.ndarray) -> None:
        if self.size is None:
            height, width = frame.shape[:2]
            if max(width, height) > MAX_FRAME_SIDE:
                raise SampleError(f"frames too large to store ({width}x{height}; the loader reads at most {MAX_FRAME_SIDE} pixels a side)")
            self.size = frame.shape[:2]
        elif frame.shape[:2] != self.size:
            raise SampleError(f"frames of different sizes ({self.size[1]}x{self.size[0]} and {frame.shape[1]}x{frame.shape[0]})")
        if self.max_frames and len(self.jpegs) >= self.max_frames:
            raise SampleError(f"too many frames (more than shards.max_frames={self.max_frames})")
        if len(self.jpegs) >= MAX_NUM_FRAMES:
            raise SampleError(f"too many frames (more than {MAX_NUM_FRAMES}, the most a clip may hold)")
        self.jpegs.append(encode_jpeg(frame, self.quality))

    def finish(self, repaired: Counter | None = None) -> EncodedClip:
        if self.size is None:
            raise SampleError("zero frames")
        pack, count = pack_frames(self.jpegs), len(self.jpegs)
        self.jpegs = []
        return EncodedClip(pack, count, self.size[1], self.size[0], Counter(repaired or {}))


def encode_source(source, short_side: int, quality: int, max_frames: int = 0) -> EncodedClip:
    """Read, resize and encode one corpus frame source (FrameFolder or VideoFile): what a
    shard stores and what ``translate`` feeds the model. Raises SampleError for an unusable
    source."""
    from fla_ds.corpus.base import FrameFolder, VideoFile

    if isinstance(source, VideoFile):
        from fla_ds.video import encode_video

        return encode_video(source, short_side, quality, max_frames)
    if not isinstance(source, FrameFolder):
        raise TypeError(f"unknown frame source {source!r}")
    from fla_ds.frame_folder import folder_frames

    repaired: Counter = Counter()
    encoder = ClipEncoder(quality, max_frames)
    for frame in folder_frames(source, short_side, repaired):
        encoder.add(frame)
    return encoder.finish(repaired)  # after the folder is read: its repairs are counted
