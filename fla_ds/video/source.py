"""One open video file (``VideoSource``): the stream ffmpeg would show, its frames with their
times and display intervals from any point, verified seeking (fla_ds/video/__init__.py has the
rules)."""
from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from fla_ds.frames import SampleError
from fla_ds.video.geometry import Geometry

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

    def __call__(self, pts: int | None, dts: int | None) -> int | None:
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

    def __init__(self, path: str | os.PathLike, short_side: int, stats: ReadStats | None = None, seek: bool = True):
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
        self.geometry: Geometry | None = None
        self.first_size: tuple[int, int] | None = None
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

    def __enter__(self) -> VideoSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- time

    def seconds(self, pts: int) -> float:
        if self.start_pts is None:  # first frame decoded defines the start
            self.start_pts = pts
        return float((pts - self.start_pts) * self.time_base)

    def _scan_index(self) -> tuple[float | None, int]:
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
