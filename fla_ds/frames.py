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

Reading a JPEG back is one reader, ``read_jpeg``, with one decision function, ``jpeg_decoder``:
libjpeg-turbo through simplejpeg where its RGB pixels are PIL's exactly (YCbCr and grey JPEGs,
baseline or progressive, any chroma subsampling: every frame this module writes), PIL for the
rest (CMYK/YCCK, whose conversion differs, and anything simplejpeg refuses, so that a damaged
JPEG gets PIL's verdict). simplejpeg decoded our frames 1.25-2.7x faster than PIL, by
interleaved measurement (docs/benchmarks.md); tests/test_frames_decode.py asserts identical pixels.
"""
from __future__ import annotations

import io
import random
import struct
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

try:  # a pinned dependency (requirements/cpu.txt); without it PIL reads every frame, slower
    import simplejpeg
except ImportError:  # pragma: no cover
    simplejpeg = None

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


# ---------------------------------------------------------------- reading a JPEG back

EXACT_COLORSPACES = frozenset({"YCbCr", "Gray"})
"""JPEG colour spaces (as simplejpeg's header reader names them) that libjpeg-turbo turns into
exactly PIL's RGB pixels; CMYK and YCCK are converted differently and go to PIL."""
_forced_decoder: str | None = None
_scratch = threading.local()


class JpegError(ValueError):
    """A JPEG that cannot be used; ``detail`` is the decoder's one-line reason."""

    def __init__(self, detail: str):
        super().__init__(f"not a readable JPEG ({detail})")
        self.detail = detail


class JpegSizeError(JpegError):
    """A JPEG whose header gives another size than expected (or a side over MAX_FRAME_SIDE):
    refused before any pixel is decoded. ``width``, ``height``: the header's, in pixels."""

    def __init__(self, width: int, height: int):
        super().__init__(f"{width}x{height} pixels")
        self.width, self.height = width, height


def force_jpeg_decoder(name: str | None) -> None:
    """Benchmarks and tests only: "pil" sends every JPEG of this process through PIL, None
    restores ``jpeg_decoder``'s choice. (DataLoader workers forked afterwards inherit it.)"""
    global _forced_decoder
    if name not in (None, "pil"):
        raise ValueError(f"only PIL can be forced, not {name!r}")
    _forced_decoder = name


def jpeg_decoder(colorspace: str | None) -> str:
    """The decision: "simplejpeg" for a JPEG whose header names a colour space it decodes
    exactly as PIL does, else "pil" (also when simplejpeg is not installed, or its header
    reader failed: ``colorspace`` None)."""
    exact = simplejpeg is not None and colorspace in EXACT_COLORSPACES
    return "simplejpeg" if exact and _forced_decoder is None else "pil"


def _one_line(exc: BaseException) -> str:
    lines = str(exc).splitlines()
    return lines[0][:200] if lines else type(exc).__name__


def jpeg_header(data: bytes | memoryview) -> tuple[int, int, str]:
    """(width, height, decoder) from the JPEG's header alone, no pixel decoded. Raises
    JpegError when neither reader finds a JPEG header."""
    if simplejpeg is not None:
        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
            return width, height, jpeg_decoder(colorspace)
        except ValueError:
            pass  # PIL reads more kinds of header (and gives the verdict on the rest)
    try:
        with Image.open(io.BytesIO(data), formats=["JPEG"]) as im:
            return im.size[0], im.size[1], "pil"
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise JpegError(_one_line(exc)) from None


def _scratch_buffer(nbytes: int) -> np.ndarray:
    """This thread's decode buffer, grown as needed and reused (a loader worker keeps one for
    its whole life instead of allocating a frame per decode)."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.size < nbytes:
        buf = _scratch.buf = np.empty(nbytes, dtype=np.uint8)
    return buf


def read_jpeg(data: bytes | memoryview, size: tuple[int, int] | None = None, box: tuple[int, int, int, int] | None = None,
              out: np.ndarray | None = None) -> np.ndarray:
    """A JPEG -> RGB uint8 (H, W, 3), cropped to ``box`` (left, top, right, bottom; inside the
    frame) if given: (bottom - top, right - left, 3). ``size`` (width, height): the size the
    JPEG must have (e.g. the sample's json). ``out``: a writable uint8 array of the result's
    shape to write into (returned); else a new array.

    The header is read first: a size other than ``size``, or a side over MAX_FRAME_SIDE,
    raises JpegSizeError before anything is decoded (a forged 65535 x 65535 header costs
    nothing). Raises JpegError for data neither decoder reads."""
    width, height, decoder = jpeg_header(data)
    if (size is not None and (width, height) != tuple(size)) or max(width, height) > MAX_FRAME_SIDE:
        raise JpegSizeError(width, height)
    left, top, right, bottom = box if box is not None else (0, 0, width, height)
    if not (0 <= left < right <= width and 0 <= top < bottom <= height):
        raise ValueError(f"crop box {box} is not inside the {width}x{height} frame")
    frame = None
    if decoder == "simplejpeg":
        try:
            frame = simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=_scratch_buffer(width * height * 3))
        except ValueError:
            frame = None  # strict libjpeg-turbo refused it (e.g. stray bytes): PIL decides
    if frame is None:
        try:
            with Image.open(io.BytesIO(data), formats=["JPEG"]) as im:
                frame = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise JpegError(_one_line(exc)) from None
    crop = frame[top:bottom, left:right]
    if out is None:
        return crop.copy()
    np.copyto(out, crop)
    return out


def decode_jpeg(data: bytes | memoryview) -> np.ndarray:
    """A JPEG -> uint8 (H, W, 3) RGB (``read_jpeg`` without size check or crop)."""
    return read_jpeg(data)


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
        """Decode the given frames into a (T, H, W, 3) uint8 array (``read_jpeg``; raises
        JpegError)."""
        return np.stack([read_jpeg(self.jpeg(i)) for i in indices])


# ---------------------------------------------------------------- a clip's frames, sampled and decoded


@dataclass(frozen=True)
class ClipCut:
    """One clip's share of a batch, planned before any pixel is decoded: its json and frame
    pack, the frames kept (sorted indices), the exact-pixel box cut from each (left, top,
    right, bottom), the training warp (2x3 in grid_sample's normalised coordinates; None in
    evaluation), and ``where`` it is (for errors)."""

    meta: dict
    pack: FramePack
    indices: list[int]
    box: tuple[int, int, int, int]
    affine: list | None
    where: str

    @property
    def side(self) -> int:
        return self.box[2] - self.box[0]


def cut_clip(meta: dict, pack: FramePack, augment, rng: random.Random, train: bool, where: str = "clip") -> ClipCut:
    """``augment``'s frames (T/4) and crop of one clip (draws from ``rng`` in a fixed order)."""
    indices = augment.frame_indices(len(pack), rng, train)
    box, affine = augment.crop(meta["width"], meta["height"], rng, train)
    return ClipCut(meta, pack, indices, box, affine, where)


def frame_error(where: str, i: int, size: tuple[int, int], exc: JpegError):
    """The ShardFormatError for frame ``i`` of the clip ``where`` names, whose json gives
    ``size`` (width, height): the loader's and ``shards verify``'s one wording (the shard
    format's error; imported here, since fla_ds.shards.format itself imports this module)."""
    from fla_ds.shards.format import ShardFormatError

    if isinstance(exc, JpegSizeError):
        return ShardFormatError(f"{where}: frame {i} is {exc.width}x{exc.height} pixels, its json says {size[0]}x{size[1]}")
    return ShardFormatError(f"{where}: frame {i} is not a readable JPEG ({exc.detail})")


def read_clip_into(cut: ClipCut, out: np.ndarray) -> None:
    """Decode the cut's frames into ``out`` (uint8 (len(indices), side, side, 3)). Each JPEG's
    header is checked against the json before it is decoded; raises ShardFormatError naming
    ``cut.where`` and the frame."""
    size = (cut.meta["width"], cut.meta["height"])
    for t, i in enumerate(cut.indices):
        try:
            read_jpeg(cut.pack.jpeg(i), size, cut.box, out[t])
        except JpegError as exc:
            raise frame_error(cut.where, i, size, exc) from None


def clip_from_pack(meta: dict, pack, augment, rng: random.Random, train: bool, where: str = "clip") -> tuple[np.ndarray, list | None]:
    """One clip as the model's loader sees it: ``augment``'s frames (T/4) sampled, decoded and
    cropped (uint8 (T, S, S, 3)), and the training warp's matrix (None when ``train`` is
    False). Also used by ``fla-ds translate``, so that inference preprocesses exactly like
    evaluation. Raises ShardFormatError naming ``where`` and the frame."""
    cut = cut_clip(meta, pack, augment, rng, train, where)
    clip = np.empty((len(cut.indices), cut.side, cut.side, 3), dtype=np.uint8)
    read_clip_into(cut, clip)
    return clip, cut.affine


def batch_side(cuts: list[ClipCut]) -> int:
    """The crop side shared by every cut of a batch; raises ShardFormatError when they differ."""
    from fla_ds.shards.format import ShardFormatError

    sides = {c.side for c in cuts}
    if len(sides) != 1:  # the canvas is the short side: shards built with shards.short_side=0 can differ
        raise ShardFormatError(f"clips of different crop sizes {sorted(sides)} in one batch ({cuts[0].where}); build the shards with one shards.short_side")
    return sides.pop()


def decode_cuts_into(cuts: list[ClipCut], out: np.ndarray) -> np.ndarray:
    """Decode every cut straight into its row of ``out`` (uint8 (B, T, S, S, 3), T at least
    the longest cut) and zero only what follows each clip's last frame; returns ``out``."""
    for row, cut in zip(out, cuts):
        read_clip_into(cut, row[: len(cut.indices)])
        row[len(cut.indices) :] = 0
    return out


def jpeg_bytes(cuts: list[ClipCut]) -> tuple[np.ndarray, np.ndarray]:
    """The cuts' kept frames as JPEG bytes, for decoding elsewhere (on the training device):
    uint8 (N,), every kept frame's JPEG back to back, clip after clip, and int64 offsets
    (F + 1,), frame f being flat[offsets[f]:offsets[f + 1]]. Every header is checked against
    the json here, as ``read_clip_into`` does (ShardFormatError)."""
    batch_side(cuts)
    chunks = []
    for cut in cuts:
        size = (cut.meta["width"], cut.meta["height"])
        for i in cut.indices:
            data = cut.pack.jpeg(i)
            try:
                width, height, _ = jpeg_header(data)
                if (width, height) != size:
                    raise JpegSizeError(width, height)
            except JpegError as exc:
                raise frame_error(cut.where, i, size, exc) from None
            chunks.append(data)
    offsets = np.cumsum([0] + [len(c) for c in chunks], dtype=np.int64)
    flat = np.empty(int(offsets[-1]), dtype=np.uint8)
    for begin, chunk in zip(offsets.tolist(), chunks):
        flat[begin : begin + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
    return flat, offsets


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
