"""Frames in and out: decoding a corpus's frame source, resizing, and the in-shard encoding.

In a shard, a clip is one member holding every frame as its own JPEG (the "frame pack"), so
the loader decodes only the quarter of the frames it samples; docs/benchmarks.md has the
measurements behind that choice. The pack is a plain binary layout (no pickle):

    b"FLAJ" | u32 version | u32 count | (count + 1) x u64 offsets | JPEG bytes ...

Decoding failures raise ``SampleError`` with a short reason that ends up in rejects.jsonl.
"""
from __future__ import annotations

import io
import re
import struct
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from fla_ds.corpus.base import FrameFolder, FrameSource, VideoFile

PACK_MAGIC = b"FLAJ"
PACK_VERSION = 1
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


class SampleError(Exception):
    """This sample cannot be used; ``str(exc)`` is the reject reason."""


def natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


# ---------------------------------------------------------------- decoding a corpus source


def list_frame_files(folder: FrameFolder) -> list[Path]:
    path = Path(folder.path)
    if not path.is_dir():
        raise SampleError("missing frame folder")
    files = [p for p in path.glob(folder.pattern) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    return sorted(files, key=lambda p: natural_key(p.name))


def read_frame_folder(folder: FrameFolder) -> list[Image.Image]:
    files = list_frame_files(folder)
    if not files:
        raise SampleError("zero frames")
    frames = []
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                frames.append(im.convert("RGB"))
        except Exception:
            raise SampleError(f"corrupt image ({f.name})") from None
    return frames


def read_video(video: VideoFile) -> tuple[list[Image.Image], dict]:
    """Decode a video (or its [start, end) cut). Returns frames and facts about the cut
    (``end_clamped`` when the annotated end lies past the end of the video)."""
    import av

    path = Path(video.path)
    if not path.is_file():
        raise SampleError("missing video file")
    facts: dict = {}
    frames: list[Image.Image] = []
    decoded = declared = 0
    stopped_at_end = False
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise SampleError("unreadable video (no video stream)")
            stream = container.streams.video[0]
            declared = stream.frames or 0
            last_time = None
            for frame in container.decode(stream):
                decoded += 1
                t = float(frame.time) if frame.time is not None else None
                last_time = t
                if video.start is not None and t is not None and t < video.start:
                    continue
                if video.end is not None and t is not None and t >= video.end:
                    stopped_at_end = True
                    break
                frames.append(frame.to_image())
    except SampleError:
        raise
    except Exception as exc:  # FFmpeg raises many types for broken input
        if frames:
            raise SampleError(f"truncated video ({type(exc).__name__} after {decoded} frames)") from None
        raise SampleError(f"unreadable video ({type(exc).__name__})") from None
    if not stopped_at_end and declared and decoded < declared:
        raise SampleError(f"truncated video (decoded {decoded} of {declared} frames)")
    if video.start is not None and last_time is not None and video.start > last_time:
        raise SampleError("clip start past end of video")
    if video.end is not None and last_time is not None and video.end > last_time + 1e-6 and frames:
        facts["end_clamped"] = True
    if not frames:
        raise SampleError("zero frames")
    return frames, facts


def decode_source(source: FrameSource) -> tuple[list[Image.Image], dict]:
    if isinstance(source, FrameFolder):
        return read_frame_folder(source), {}
    if isinstance(source, VideoFile):
        return read_video(source)
    raise TypeError(f"unknown frame source {source!r}")


# ---------------------------------------------------------------- resize and encode


def resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    if short_side <= 0:
        return width, height
    scale = short_side / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def resize_short_side(image: Image.Image, short_side: int) -> Image.Image:
    size = resized_size(image.width, image.height, short_side)
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.BILINEAR)


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    # No optimize/progressive: baseline JPEG decodes fastest, and the output is deterministic.
    image.save(buf, format="JPEG", quality=quality, subsampling="4:2:0")
    return buf.getvalue()


def pack_frames(jpegs: Sequence[bytes]) -> bytes:
    offsets = [0]
    for j in jpegs:
        offsets.append(offsets[-1] + len(j))
    header = PACK_MAGIC + struct.pack("<II", PACK_VERSION, len(jpegs)) + struct.pack(f"<{len(offsets)}Q", *offsets)
    return header + b"".join(jpegs)


class FramePack:
    """Random access to the JPEGs of one packed clip, validated before any byte is used."""

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
        arrays = [decode_jpeg(self.jpeg(i)) for i in indices]
        return np.stack(arrays)


def decode_jpeg(data: bytes | memoryview) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def encode_clip(frames: Sequence[Image.Image], short_side: int, quality: int) -> tuple[bytes, int, int]:
    """Resize and encode every frame; returns (pack, width, height)."""
    resized = [resize_short_side(f, short_side) for f in frames]
    sizes = {im.size for im in resized}
    if len(sizes) != 1:
        raise SampleError(f"frames of different sizes ({sorted(sizes)})")
    width, height = resized[0].size
    return pack_frames([encode_jpeg(im, quality) for im in resized]), width, height
