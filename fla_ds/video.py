"""Video files as clips: the frames ffmpeg shows, upright, cut by presentation time.

One reader serves the shard builder, the feature path and ``fla-ds translate``, so that a clip
is the same wherever it is read. It is PyAV (FFmpeg's libraries) used fully: demuxing,
seeking, decoding, edit lists, and scaling with colour conversion in one swscale call from the
decoded YUV (3.4 ms per 720p frame, where PIL's resize of the converted RGB frame took 19.5 ms;
docs/benchmarks.md). Chosen by trying the alternatives on this project's machines: torchcodec
0.17.0 (PyPI) fails to load beside torch 2.13.0+cpu (``OSError: Could not load ...
libtorchcodec_image.so``) and ties the data path to torch's build; decord's last release is
from 2021. PyAV 18 exposes everything the
rules below need: stream dispositions, frame side data (the display matrix), index entries,
seeking, and a reusable swscale context.

What a clip is, rule by rule (README "Building shards" repeats them):

- **Stream.** The video stream ffmpeg picks (the largest picture, counting the default
  stream's as 5,000,000 pixels larger; ties to the first), never an attached picture (cover
  art) nor a still-image track: when
  a file has several video streams, those that deliver at most one packet in their first
  ``STILL_PROBE_PACKETS`` packets are stills. A file with no video stream is rejected.
- **Orientation.** The display matrix (phones store portrait video as landscape pixels plus a
  rotation) is applied as ffmpeg's autorotate does: rotations by multiples of 90 degrees and
  mirrorings, exactly (checked against the ffmpeg CLI for all eight). Other angles are
  rejected rather than guessed.
- **Geometry.** The sample aspect ratio is applied (anamorphic broadcast video is stored with
  non-square pixels), then every frame is resized as it is decoded so that its short side is
  ``short_side``; frames whose coded size changes mid-stream are scaled to the first frame's
  size (counted as ``frame_size_mixed``). Any pixel format FFmpeg decodes (4:2:0, 4:4:4,
  10-bit, full or limited range) is converted by swscale using the frame's colour metadata.
  Interlaced frames are kept as coded (ffmpeg does not deinterlace by default either).
- **Frames and time.** Every frame the decoder outputs, in presentation order, is one frame of
  the clip: edit lists are honoured by libavformat/libavcodec (the pre-roll of a ``-c copy``
  cut is discarded), variable-frame-rate video is not resampled. A frame's time is
  ``(pts - stream start) x time base`` in seconds, the stream start being the stream's
  ``start_time`` (MPEG-TS streams start near 1.4 s, edited MP4s at 0), so annotation times
  count from the first frame shown. A frame is displayed from its time until the next frame's
  time (the last frame: for its own duration, else one frame period).
- **Cuts.** A cut ``[start, end)`` (How2Sign raw videos, manifests' ``start``/``end``) is the
  frames whose display interval lies in ``[start, end)`` (1 microsecond of tolerance). An end
  past the end of the video is clamped and counted (``end_clamped``); a start at or past the
  end is rejected; a cut that holds no whole frame is rejected.
- **Seeking.** A cut that starts later than ``SEEK_AFTER_S`` seconds is reached by seeking to
  the keyframe before it, so at most the cut plus one keyframe interval is decoded. A seek is
  verified: after it, frames before the first keyframe decoded are not trusted (open-GOP
  leading frames reference data before the seek point), and if that keyframe lies after the
  cut's start (MPEG-TS seeks land imprecisely) the reader seeks earlier, and in the end
  decodes from the start. Several cuts of one video are read in one pass, seeking only across
  gaps longer than the keyframe interval seen so far.
- **Damage.** A file whose own index points past its end (a truncated MP4) is rejected as
  ``truncated video`` when the clip needs the missing part; a decoding error is rejected as
  ``undecodable video``; a file FFmpeg cannot open as ``unreadable video``.
"""
from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from fla_ds.corpus.base import VideoFile
from fla_ds.frames import ClipEncoder, EncodedClip, SampleError, resized_size

EPS_S = 1e-6
"""Tolerance of cut boundaries in seconds (annotation times are decimal, timestamps rational)."""
SEEK_AFTER_S = 1.0
"""Cuts starting later than this are reached by a seek instead of decoding from the start."""
SEEK_GAP_S = 2.0
"""Between two cuts of one video, seek across a gap longer than this while no keyframe
interval has been seen yet (afterwards: across gaps longer than the longest interval seen)."""
SEEK_RETRIES = 4
"""Seeks tried, each further back, before decoding from the start."""
TRUNCATION_MARGIN_S = 1.0
"""A truncated file's frames are trusted up to this long before its first missing packet
(frames shown earlier may be decoded from packets stored after it)."""
KEYFRAME_WAIT_S = 10.0
"""After a seek, how much video may pass without a keyframe before seeking is given up for
the file (at least twice the longest keyframe interval seen)."""
AVFMT_TS_DISCONT = 0x0200  # libavformat: the format allows timestamp discontinuities
STILL_PROBE_PACKETS = 256
"""Packets demuxed from the start of a file with several video streams to find still tracks."""


@dataclass(frozen=True)
class Cut:
    """A time cut of a video in seconds from the stream's start; ``None`` means open."""

    start: Optional[float] = None
    end: Optional[float] = None

    @property
    def begin(self) -> float:
        return 0.0 if self.start is None else max(0.0, float(self.start))

    def holds(self, t: float, d: float) -> bool:
        """Whether a frame shown during [t, t + d) lies in this cut."""
        return t >= self.begin - EPS_S and (self.end is None or t + d <= self.end + EPS_S)

    def ended_by(self, t: float) -> bool:
        """Whether no frame from time ``t`` on can belong to this cut."""
        return self.end is not None and t > self.end + EPS_S


# ------------------------------------------------------------------ orientation and geometry


@dataclass(frozen=True)
class Orientation:
    """How stored pixels become displayed pixels: transpose first, then mirror the columns
    (``flip_h``) and/or the rows (``flip_v``). Covers the eight rotations/mirrorings."""

    transpose: bool = False
    flip_h: bool = False
    flip_v: bool = False

    @classmethod
    def from_display_matrix(cls, matrix: Sequence[int]) -> "Orientation":
        """From FFmpeg's display matrix [a b u; c d v; x y w] (AV_PKT_DATA_DISPLAYMATRIX,
        16.16 fixed point), which maps a stored pixel (p, q) (column, row; rows grow
        downwards) to the displayed position (a*p + c*q, b*p + d*q) plus a translation
        (libavutil/display.h). Raises SampleError for angles that are not multiples of 90."""
        a, b, c, d = (matrix[0], matrix[1], matrix[3], matrix[4])
        tolerance = 1 << 10  # 16.16 fixed point: 1/64 of a unit
        if abs(b) <= tolerance and abs(c) <= tolerance and abs(a) > tolerance and abs(d) > tolerance:
            return cls(False, a < 0, d < 0)
        if abs(a) <= tolerance and abs(d) <= tolerance and abs(b) > tolerance and abs(c) > tolerance:
            # displayed (col, row) = (c*q, b*p): the transposed array, then the signs of c, b
            return cls(True, c < 0, b < 0)
        angle = math.degrees(math.atan2(b, a))
        raise SampleError(f"unsupported display rotation ({angle:.1f} degrees; only multiples of 90 are applied)")

    @property
    def is_identity(self) -> bool:
        return not (self.transpose or self.flip_h or self.flip_v)

    def displayed(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) as displayed."""
        return (height, width) if self.transpose else (width, height)

    def apply(self, image: np.ndarray) -> np.ndarray:
        """(H, W, C) stored -> displayed, a contiguous copy."""
        out = image.transpose(1, 0, 2) if self.transpose else image
        if self.flip_h:
            out = out[:, ::-1]
        if self.flip_v:
            out = out[::-1]
        return np.ascontiguousarray(out)


def frame_orientation(frame) -> Orientation:
    """The orientation a decoded PyAV frame asks for (its DISPLAYMATRIX side data, which the
    decoder copies from the container's stream side data)."""
    side = frame.side_data.get("DISPLAYMATRIX")
    if side is None:
        return Orientation()
    matrix = np.frombuffer(bytes(side), dtype="<i4")
    if matrix.size != 9:
        return Orientation()
    return Orientation.from_display_matrix(matrix.tolist())


@dataclass(frozen=True)
class Geometry:
    """Decided once per clip from its first frame: the swscale output size (stored
    orientation) and the orientation that turns it into the displayed frame."""

    scale_width: int
    scale_height: int
    orientation: Orientation

    @classmethod
    def of(cls, frame, sample_aspect_ratio: Optional[Fraction], short_side: int) -> "Geometry":
        orientation = frame_orientation(frame)
        sar = sample_aspect_ratio if sample_aspect_ratio and sample_aspect_ratio > 0 else Fraction(1)
        square_width = max(1, round(frame.width * sar))  # square pixels, stored orientation
        shown = orientation.displayed(square_width, frame.height)
        out_w, out_h = resized_size(shown[0], shown[1], short_side)
        scale = (out_h, out_w) if orientation.transpose else (out_w, out_h)
        return cls(scale[0], scale[1], orientation)

    def render(self, frame, reformatter) -> np.ndarray:
        """A decoded frame -> displayed RGB uint8 (H, W, 3) at the clip's stored size;
        ``reformatter`` (av.video.reformatter.VideoReformatter) is reused across frames (a new
        swscale context per frame costs more than the scaling)."""
        scaled = reformatter.reformat(frame, self.scale_width, self.scale_height, "rgb24", interpolation="BILINEAR")
        rgb = scaled.to_ndarray()
        return rgb if self.orientation.is_identity else self.orientation.apply(rgb)


# ------------------------------------------------------------------ streams


def av_errors() -> type:
    import av

    return av.error.FFmpegError


def is_attached_picture(stream) -> bool:
    import av

    return bool(stream.disposition & av.stream.Disposition.attached_pic)


def pick_video_stream(container):
    """The stream ffmpeg would show, minus cover art and still tracks (module docstring).
    Raises SampleError when there is none."""
    import av

    candidates = [s for s in container.streams.video if not is_attached_picture(s)]
    if not candidates:
        what = "only a cover picture" if container.streams.video else "no video stream"
        raise SampleError(f"unreadable video ({what})")
    if len(candidates) > 1:
        moving = moving_streams(container, candidates)
        candidates = moving or candidates
    default = av.stream.Disposition.default

    def score(s) -> tuple:  # ffmpeg's automatic choice (fftools, map_auto_video): ties to the first
        cc = s.codec_context
        return ((cc.width or 0) * (cc.height or 0) + 5_000_000 * bool(s.disposition & default), -s.index)

    return max(candidates, key=score)


def moving_streams(container, candidates: list) -> list:
    """The candidates that deliver more than one packet near the start of the file (a still
    image track delivers one); the container is rewound afterwards."""
    counts = Counter()
    wanted = {s.index for s in candidates}
    seen = 0
    try:
        for packet in container.demux(*candidates):
            if packet.stream.index in wanted and packet.size:
                counts[packet.stream.index] += 1
            seen += 1
            if seen >= STILL_PROBE_PACKETS or all(counts[i] > 1 for i in wanted):
                break
    finally:
        container.seek(0)
    return [s for s in candidates if counts[s.index] > 1]


# ------------------------------------------------------------------ timed frames


@dataclass
class ReadStats:
    """What reading cost: decoder output frames, seeks made."""

    frames_decoded: int = 0
    seeks: int = 0


class ClockRestart(Exception):
    """After a seek, timestamps jumped backwards: the file's clock restarts (a concatenated
    recording), so the seek may have aimed into the wrong part of it."""


class NoKeyframe(Exception):
    """No keyframe followed a seek within KEYFRAME_WAIT_S of video (intra-refresh streams
    mark only their first frame): seeking cannot help this file."""


class PtsGuess:
    """libavcodec's ``guess_correct_pts`` (what ffmpeg uses as a frame's best-effort
    timestamp): the presentation timestamp, unless this stream's presentation timestamps have
    gone backwards more often than its decoding timestamps (a raw stream muxed without proper
    timestamps), then the decoding timestamp."""

    def __init__(self):
        self.faulty_pts = self.faulty_dts = 0
        self.last_pts = self.last_dts = None

    def __call__(self, pts: Optional[int], dts: Optional[int]) -> Optional[int]:
        if dts is not None:
            self.faulty_dts += self.last_dts is not None and dts <= self.last_dts
            self.last_dts = dts
        if pts is not None:
            self.faulty_pts += self.last_pts is not None and pts <= self.last_pts
            self.last_pts = pts
        if pts is not None and (self.faulty_pts <= self.faulty_dts or dts is None):
            return pts
        return dts


class VideoSource:
    """One open video file: its chosen stream, time base and start, and frames with their
    display intervals from any point (seeking as the module docstring says).

    Raises SampleError on open: missing file, not a video, no video stream."""

    def __init__(self, path: str | os.PathLike, short_side: int, stats: Optional[ReadStats] = None, seek: bool = True):
        self.path = Path(path)
        if not self.path.is_file():
            raise SampleError("missing video file")
        self._open()
        self.short_side, self.seek = short_side, seek
        self.stats = stats if stats is not None else ReadStats()
        self.time_base = self.stream.time_base or Fraction(1, 1)
        self.start_pts = self.stream.start_time
        rate = self.stream.average_rate or self.stream.guessed_rate
        self.frame_period = float(1 / rate) if rate else 0.04
        # MPEG-TS/PS may restart their clocks (concatenated recordings): see frames_from.
        self.discontinuous_format = bool(self.container.format.flags & AVFMT_TS_DISCONT)
        self.missing_from, keyframes = self._scan_index()
        if keyframes == 1:
            self.seek = False  # one keyframe in the whole index: every seek lands on frame 0
        self.geometry: Optional[Geometry] = None
        self.first_size: Optional[tuple[int, int]] = None
        self.keyframe_interval = 0.0  # the longest seen between decoded keyframes
        self.moved = False  # whether anything was decoded or sought since opening
        self.sought = False  # whether the current pass began with a seek
        self.repaired: Counter = Counter()

    def _open(self) -> None:
        """Open the file and choose its stream (again, to rewind: seeking to the start is not
        exact in every format). Raises SampleError."""
        import av

        try:
            self.container = av.open(str(self.path))
        except av.error.FFmpegError as exc:
            raise SampleError(f"unreadable video ({type(exc).__name__})") from None
        try:
            self.stream = pick_video_stream(self.container)
        except av.error.FFmpegError as exc:
            self.container.close()
            raise SampleError(f"unreadable video ({type(exc).__name__})") from None
        except BaseException:
            self.container.close()
            raise
        for other in self.container.streams:
            if other.index != self.stream.index:
                other.discard = av.stream.Discard.all  # never demux what is not shown
        self.reformatter = av.video.reformatter.VideoReformatter()

    def close(self) -> None:
        self.container.close()

    def __enter__(self) -> "VideoSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- time

    def seconds(self, pts: int) -> float:
        if self.start_pts is None:  # first frame decoded defines the start
            self.start_pts = pts
        return float((pts - self.start_pts) * self.time_base)

    def _scan_index(self) -> tuple[Optional[float], int]:
        """(the time from which the file lacks the bytes its own index points to, or None;
        the number of keyframes the index lists, 0 without an index). A truncated MP4 keeps
        its full index in front."""
        entries = self.stream.index_entries
        if not entries:
            return None, 0
        size = self.path.stat().st_size
        missing, keyframes = None, 0
        for e in entries:
            keyframes += bool(e.is_keyframe)
            if e.pos + e.size > size and (missing is None or e.timestamp < missing):
                missing = e.timestamp
        if missing is None:
            return None, keyframes if len(entries) > 1 else 0
        return float((missing - (self.start_pts or 0)) * self.time_base), keyframes

    # ---- frames

    def render(self, frame) -> np.ndarray:
        if self.geometry is None:
            self.geometry = Geometry.of(frame, self.stream.sample_aspect_ratio, self.short_side)
            self.first_size = (frame.width, frame.height)
        elif (frame.width, frame.height) != self.first_size:
            self.repaired["frame_size_mixed"] = 1  # once per clip, like every repair
        try:
            return self.geometry.render(frame, self.reformatter)
        except av_errors() as exc:
            raise SampleError(f"undecodable video ({type(exc).__name__} converting a frame)") from None

    def _decoded(self, after_seek: bool) -> Iterator[tuple[float, object]]:
        """(time, frame) in the decoder's output (presentation) order from the current
        position. Times are best-effort timestamps (PtsGuess) made continuous: where they jump
        backwards (a recording whose clock restarts) the later frames continue after the
        earlier ones, as ffmpeg does for such formats. After a seek, frames before the first
        keyframe are not trusted, and a backwards jump raises ClockRestart (the seek aimed by a
        clock that is not unique)."""
        import av

        self.moved, self.sought = True, after_seek
        trusted, skipped = not after_seek, 0
        wait = max(KEYFRAME_WAIT_S / self.frame_period, 2 * self.keyframe_interval / self.frame_period)
        guess, offset = PtsGuess(), 0.0
        last_key = last_time = None
        try:
            for frame in self.container.decode(self.stream):
                self.stats.frames_decoded += 1
                ts = guess(frame.pts, frame.dts)
                if ts is None:  # no timestamp at all (raw elementary streams): one period on
                    t = (last_time + self.frame_period) if last_time is not None else 0.0
                else:
                    t = self.seconds(ts) + offset
                if last_time is not None and t < last_time - EPS_S:
                    if after_seek:
                        raise ClockRestart()
                    offset += last_time + self.frame_period - t
                    t = last_time + self.frame_period
                if frame.key_frame:
                    if last_key is not None:
                        self.keyframe_interval = max(self.keyframe_interval, t - last_key)
                    last_key, trusted = t, True
                if not trusted:
                    skipped += 1
                    if skipped > wait:
                        raise NoKeyframe()
                    continue  # open-GOP leading frames reference data before the seek
                last_time = t
                yield t, frame
        except av.error.FFmpegError as exc:
            at = f" at {last_time:.2f} s" if last_time is not None else ""
            raise SampleError(f"undecodable video ({type(exc).__name__}{at})") from None

    def timed_frames(self, frames: Iterator[tuple[float, object]]) -> Iterator[tuple[float, float, object]]:
        """(time, display duration, frame): one frame of look-ahead gives each duration."""
        previous = None
        for t, frame in frames:
            if previous is not None:
                yield previous[0], t - previous[0], previous[1]
            previous = (t, frame)
        if previous is not None:
            t, frame = previous
            own = float(frame.duration * self.time_base) if frame.duration else 0.0
            yield t, own if own > 0 else self.frame_period, frame

    def frames_from(self, start: float) -> Iterator[tuple[float, float, object]]:
        """Timed frames from the keyframe at or before ``start`` (seconds) on; from the first
        frame when ``start`` is early, seeking is off, or every seek misses."""
        if start <= SEEK_AFTER_S or not self.seek:
            return self.timed_frames(self._from_start())
        return self.timed_frames(self._seek_before(start))

    def _from_start(self) -> Iterator[tuple[float, object]]:
        if self.moved:  # rewind by reopening: a seek to the start lands late in some formats
            self.close()
            self._open()
        return self._decoded(after_seek=False)

    def _seek_to(self, seconds: float) -> None:
        if self.start_pts is None:  # the stream's start is needed to aim: learn it first
            next(self._decoded(after_seek=False), None)
        self.stats.seeks += 1
        self.moved = True
        target = int(round(seconds / self.time_base)) + (self.start_pts or 0)
        self.container.seek(target, stream=self.stream, backward=True, any_frame=False)

    def _seek_before(self, start: float) -> Iterator[tuple[float, object]]:
        """Seek, check that the first trusted frame is not after ``start``, else back off;
        in the end (or when the file cannot seek) decode from the start."""
        import av

        back = 0.0
        for _ in range(SEEK_RETRIES):
            target = start - back
            if target <= 0:
                break
            try:
                self._seek_to(target)
                frames = self._decoded(after_seek=True)
                first = next(frames, None)
            except av.error.FFmpegError:  # e.g. raw elementary streams cannot seek
                break
            except NoKeyframe:
                self.seek = False
                break
            if first is not None and first[0] <= start + EPS_S:
                yield first
                yield from frames
                return
            back = max(2 * back, self.keyframe_interval, SEEK_GAP_S)
        yield from self._from_start()


# ------------------------------------------------------------------ cuts


@dataclass
class CutEvent:
    """What ``read_cuts`` yields: a frame of cut ``index`` (``frame``: displayed RGB uint8
    (H, W, 3)); or ``restart``: forget the frames of cut ``index`` so far, they come again (a
    seek landed in the wrong part of a file whose clock restarts); or the end of cut ``index``
    (``done``), with ``error`` set when the cut is rejected and ``repaired`` counting what was
    adjusted."""

    index: int
    frame: Optional[np.ndarray] = None
    restart: bool = False
    done: bool = False
    error: Optional[SampleError] = None
    repaired: Counter = field(default_factory=Counter)


def read_cuts(path: str | os.PathLike, cuts: Sequence[Cut], short_side: int, stats: Optional[ReadStats] = None,
              seek: bool = True) -> Iterator[CutEvent]:
    """Read several cuts of one video in one pass (cuts may overlap; they are visited in
    start order). Yields each cut's frames in order, then its ``done`` event; every cut gets
    exactly one ``done``. An error that ends the pass (opening, decoding) ends every cut not
    yet done with that error. ``seek=False`` decodes from the start (the benchmark's baseline)."""
    try:
        source = VideoSource(path, short_side, stats, seek)
    except SampleError as exc:
        for i in range(len(cuts)):
            yield CutEvent(i, done=True, error=exc)
        return
    with source:
        yield from CutPass(source, cuts).events()


class CutPass:
    """The state of one pass over a video for a set of cuts: which are waiting, which are
    collecting frames, and the decoding position."""

    def __init__(self, source: VideoSource, cuts: Sequence[Cut]):
        self.source, self.cuts = source, cuts
        self.counts: Counter = Counter()  # frames yielded per cut
        self.pending = sorted(range(len(cuts)), key=lambda i: (cuts[i].begin, i))
        self.active: list[int] = []
        self.frames: Optional[Iterator] = None
        self.sought_for: Optional[int] = None  # the cut the current pass was started for
        self.position: Optional[float] = None  # end of the last frame seen
        self.video_end: Optional[float] = None

    def events(self) -> Iterator[CutEvent]:
        try:
            yield from self.refuse_missing()
            while self.pending or self.active:
                if not self.active and self.should_restart():
                    self.sought_for = self.pending[0]
                    self.frames = self.source.frames_from(self.cuts[self.sought_for].begin)
                try:
                    item = next(self.frames, None)
                except ClockRestart:
                    yield from self.restart_from_start()
                    continue
                if item is None and self.recheck_from_start():
                    continue
                if item is None:  # the video ended: close every cut still open
                    for i in self.active + self.pending:
                        yield self.finish(i, ran_out=True)
                    return
                yield from self.take(*item)
        except SampleError as exc:
            for i in self.active + self.pending:
                yield CutEvent(i, done=True, error=exc)

    def restart_from_start(self) -> Iterator[CutEvent]:
        """Read every open cut again from the start of the file, without seeking: the file's
        clock restarts, so only a pass from its start gives each frame its time."""
        for i in self.active:
            if self.counts[i]:
                self.counts[i] = 0
                yield CutEvent(i, restart=True)
        self.source.seek = False
        self.pending = sorted(self.active + self.pending, key=lambda i: (self.cuts[i].begin, i))
        self.active = []
        self.frames = self.source.frames_from(0.0)

    def recheck_from_start(self) -> bool:
        """A pass that began with a seek ran out before cuts that got no frame, in a format
        whose clock may restart (MPEG-TS): the end it saw may not be the file's. Read those
        cuts once more, decoding from the start (once: seeking is off afterwards)."""
        source = self.source
        if not (source.sought and source.discontinuous_format and source.seek):
            return False
        if any(self.counts[i] for i in self.active):
            return False
        source.seek = False
        self.pending = sorted(self.active + self.pending, key=lambda i: (self.cuts[i].begin, i))
        self.active = []
        self.frames = source.frames_from(0.0)
        return True

    def refuse_missing(self) -> Iterator[CutEvent]:
        """Cuts that need the part a truncated file lacks are rejected before decoding."""
        missing = self.source.missing_from
        if missing is None:
            return
        for i in list(self.pending):
            cut = self.cuts[i]
            if cut.end is None or cut.end > missing - TRUNCATION_MARGIN_S:
                self.pending.remove(i)
                yield CutEvent(i, done=True, error=SampleError(f"truncated video (the file lacks its frames from {missing:.2f} s on)"))

    def should_restart(self) -> bool:
        """Start a new pass (seek) for the next cut when there is no pass yet, or when the
        gap to it is longer than a keyframe interval; never twice for one cut."""
        if self.frames is None:
            return True
        if not self.source.seek:
            return False
        nxt = self.pending[0]
        if nxt == self.sought_for or self.position is None:
            return False
        gap = self.cuts[nxt].begin - self.position
        limit = self.source.keyframe_interval if self.source.keyframe_interval > 0 else SEEK_GAP_S
        return gap > limit and self.cuts[nxt].begin > SEEK_AFTER_S

    def take(self, t: float, d: float, frame) -> Iterator[CutEvent]:
        """Hand one timed frame to every cut it belongs to; close the cuts it ends."""
        self.position = self.video_end = t + d
        while self.pending and self.cuts[self.pending[0]].begin <= t + EPS_S:
            self.active.append(self.pending.pop(0))
        rendered = None
        for i in list(self.active):
            if self.cuts[i].holds(t, d):
                if rendered is None:
                    rendered = self.source.render(frame)
                self.counts[i] += 1
                yield CutEvent(i, frame=rendered)
            else:  # active means t >= start, so this frame runs past the cut's end
                self.active.remove(i)
                yield self.finish(i, ran_out=False)

    def finish(self, index: int, ran_out: bool) -> CutEvent:
        """The ``done`` event of a cut: rejected when it holds no frame, clamped when it runs
        past the end of the video."""
        cut, video_end = self.cuts[index], self.video_end
        if self.counts[index] == 0:
            if video_end is None:
                reason = "zero frames (the video has no frame)"
            elif cut.begin >= video_end - EPS_S:
                reason = f"clip start past end of video (start {cut.begin:.3f} s, video ends at {video_end:.3f} s)"
            else:
                reason = f"zero frames (the cut [{cut.begin:.3f}, {cut.end:.3f}) s holds no whole frame)"
            return CutEvent(index, done=True, error=SampleError(reason))
        repaired = Counter(self.source.repaired)
        if ran_out and cut.end is not None and video_end is not None and cut.end > video_end + EPS_S:
            repaired["end_clamped"] += 1
        return CutEvent(index, done=True, repaired=repaired)


def encode_cuts(path: str | os.PathLike, cuts: Sequence[Cut], short_side: int, quality: int, max_frames: int = 0,
                stats: Optional[ReadStats] = None) -> Iterator[tuple[int, EncodedClip | SampleError]]:
    """Each cut of one video, read in one pass, as (cut index, its EncodedClip or the reason
    it is rejected), in the order the cuts end (a function of the file and the cuts alone).
    Frames are JPEG-encoded as they are decoded (fla_ds.frames.ClipEncoder)."""
    encoders = {i: ClipEncoder(quality, max_frames) for i in range(len(cuts))}
    failed: dict[int, SampleError] = {}
    for event in read_cuts(path, cuts, short_side, stats):
        i = event.index
        if event.restart:
            encoders[i] = ClipEncoder(quality, max_frames)
            failed.pop(i, None)
        elif event.frame is not None:
            if i not in failed:
                try:
                    encoders[i].add(event.frame)
                except SampleError as exc:
                    failed[i] = exc
                    encoders[i] = None  # its frames are no longer needed
        else:
            error = event.error or failed.get(i)
            encoder = encoders.pop(i)
            if error is None:
                try:
                    yield i, encoder.finish(event.repaired)
                    continue
                except SampleError as exc:
                    error = exc
            yield i, error


def encode_video(video: VideoFile, short_side: int, quality: int, max_frames: int = 0) -> EncodedClip:
    """One video (or its [start, end) cut), displayed, resized so that the short side is
    ``short_side`` and encoded. Raises SampleError (missing, unreadable, truncated,
    undecodable, an empty cut, a start past the end)."""
    for _, clip in encode_cuts(video.path, [Cut(video.start, video.end)], short_side, quality, max_frames):
        if isinstance(clip, SampleError):
            raise clip
        return clip
    raise SampleError("zero frames")
