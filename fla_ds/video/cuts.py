"""Time cuts of one video, read in one pass (``read_cuts``), and encoded into frame packs as
they are read (``encode_cuts``, ``encode_video``): what the shard builder and ``fla-ds
translate`` call."""
from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from fla_ds.corpus.base import VideoFile
from fla_ds.frames import ClipEncoder, EncodedClip, SampleError
from fla_ds.video.source import EPS_S, SEEK_AFTER_S, SEEK_GAP_S, TRUNCATION_MARGIN_S, ClockRestart, ReadStats, VideoSource


@dataclass(frozen=True)
class Cut:
    """A time cut of a video in seconds from the stream's start; ``None`` means open."""

    start: float | None = None
    end: float | None = None

    @property
    def begin(self) -> float:
        return 0.0 if self.start is None else max(0.0, float(self.start))

    def holds(self, t: float, d: float) -> bool:
        """Whether a frame shown during [t, t + d) lies in this cut."""
        return t >= self.begin - EPS_S and (self.end is None or t + d <= self.end + EPS_S)

    def ended_by(self, t: float) -> bool:
        """Whether no frame from time ``t`` on can belong to this cut."""
        return self.end is not None and t > self.end + EPS_S


@dataclass
class CutEvent:
    """What ``read_cuts`` yields: a frame of cut ``index`` (``frame``: displayed RGB uint8
    (H, W, 3)); or ``restart``: forget the frames of cut ``index`` so far, they come again (a
    seek landed in the wrong part of a file whose clock restarts); or the end of cut ``index``
    (``done``), with ``error`` set when the cut is rejected and ``repaired`` counting what was
    adjusted."""

    index: int
    frame: np.ndarray | None = None
    restart: bool = False
    done: bool = False
    error: SampleError | None = None
    repaired: Counter = field(default_factory=Counter)


def read_cuts(path: str | os.PathLike, cuts: Sequence[Cut], short_side: int, stats: ReadStats | None = None,
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
        self.frames: Iterator | None = None
        self.sought_for: int | None = None  # the cut the current pass was started for
        self.position: float | None = None  # end of the last frame seen
        self.video_end: float | None = None

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
                stats: ReadStats | None = None) -> Iterator[tuple[int, EncodedClip | SampleError]]:
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
