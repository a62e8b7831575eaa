"""A gallery of small, awkward videos made at test time, each with its right answer.

Every frame shows :func:`frame_pattern`: its frame number as 12 binary cells and four coloured
corner squares, so that :func:`read_pattern` can tell from any decoded picture which frame it
is and whether it is shown upright. The writers make real files with PyAV (no binaries are
committed) and return a :class:`GalleryVideo` that says what a correct reader returns: the
frames the ffmpeg command-line tool shows, in order, upright, at the displayed size.

``GALLERY`` maps a case name to a factory: ``video = GALLERY[name](tmp_path / name)`` writes
the file (the factory adds its own extension) and returns its GalleryVideo. All cases
together take about 2 s on two cores, most of it the 240 s "long" video.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import VideoReformatter
from PIL import Image

# --- the frame pattern -------------------------------------------------------------------

BITS = 12
MAX_NUMBER = (1 << BITS) - 1
GRID_COLUMNS, GRID_ROWS = 4, 3  # bit 11 (the most significant) top-left, then row by row
CORNER = 1 / 6  # corner squares' side, as a fraction of the picture's width and height
GREY = 128
CORNER_COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}
UPRIGHT_CORNERS = (("red", "green"), ("blue", "yellow"))  # (top-left, top-right), (bottom-left, bottom-right)
PALETTE_NAMES = tuple(CORNER_COLOURS)
PALETTE = np.array([CORNER_COLOURS[name] for name in PALETTE_NAMES], np.float64)  # (4, 3)
# Saturated primaries lie >= 255 apart; 4:2:0 chroma and lossy codecs move a square's middle
# by well under half of that.
MAX_COLOUR_ERROR = 110
# A cell's middle is white or black; mid-levels mean a blend of frames or a damaged picture.
BLACK_BELOW, WHITE_ABOVE = 80, 176

ORIENTATIONS = ("upright", "rot90cw", "rot180", "rot90ccw", "hflip", "vflip", "transpose", "antitranspose")
INVERSE = {"rot90cw": "rot90ccw", "rot90ccw": "rot90cw"}  # every other orientation undoes itself
SWAPS_AXES = {"rot90cw", "rot90ccw", "transpose", "antitranspose"}


def transform(image: np.ndarray, orientation: str) -> np.ndarray:
    """``image`` (H, W, ...) with ``orientation`` done to it, as a viewer would then see it.

    "upright": unchanged; "rot90cw" / "rot90ccw": turned 90 degrees clockwise / counter-
    clockwise; "rot180": turned half a turn; "hflip": mirrored left-right; "vflip": mirrored
    top-bottom; "transpose": mirrored about the main diagonal (out[i, j] = in[j, i]: the
    top-left and bottom-right corners stay, top-right and bottom-left swap); "antitranspose":
    mirrored about the other diagonal (top-right and bottom-left stay, top-left and
    bottom-right swap). Returns a view, (W, H, ...) for the four in SWAPS_AXES.
    """
    if orientation == "upright":
        return image
    if orientation == "rot90cw":
        return np.rot90(image, -1)
    if orientation == "rot180":
        return image[::-1, ::-1]
    if orientation == "rot90ccw":
        return np.rot90(image, 1)
    if orientation == "hflip":
        return image[:, ::-1]
    if orientation == "vflip":
        return image[::-1]
    if orientation == "transpose":
        return np.swapaxes(image, 0, 1)
    if orientation == "antitranspose":
        return np.swapaxes(image[::-1, ::-1], 0, 1)
    raise ValueError(f"unknown orientation {orientation!r}; expected one of {ORIENTATIONS}")


def undo(image: np.ndarray, orientation: str) -> np.ndarray:
    """The upright picture that ``orientation`` turned into ``image`` (H, W, ...)."""
    return transform(image, INVERSE.get(orientation, orientation))


def _pixel_span(start: float, stop: float, length: int) -> tuple[int, int]:
    """(first, end) pixel indices covering the fractions [start, stop) of ``length`` pixels."""
    first = int(round(start * length))
    return first, max(int(round(stop * length)), first + 1)


def _shrink(start: float, stop: float, keep: float) -> tuple[float, float]:
    """The middle ``keep`` fraction of the interval [start, stop)."""
    margin = (stop - start) * (1 - keep) / 2
    return start + margin, stop - margin


def _bands(count: int) -> list[tuple[float, float]]:
    """``count`` equal bands across the centre box (CORNER .. 1 - CORNER), as fractions."""
    width = (1 - 2 * CORNER) / count
    return [(CORNER + i * width, CORNER + (i + 1) * width) for i in range(count)]


CORNER_BANDS = [(0.0, CORNER), (1 - CORNER, 1.0)]  # top/left, bottom/right


@lru_cache(maxsize=64)
def _drawn_layout(width: int, height: int) -> tuple[list, list]:
    """(cell slices by grid row then column, corner slices TL, TR, BL, BR) for drawing, each
    a (rows, columns) pair of slices. A grey rim (the slot's outer 10 % per side) keeps
    neighbouring cells' ringing apart."""
    def region(rows, columns, keep=1.0):
        top, bottom = _pixel_span(*_shrink(*rows, keep), height)
        left, right = _pixel_span(*_shrink(*columns, keep), width)
        return slice(top, bottom), slice(left, right)

    cells = [region(r, c, 0.8) for r in _bands(GRID_ROWS) for c in _bands(GRID_COLUMNS)]
    corners = [region(r, c) for r in CORNER_BANDS for c in CORNER_BANDS]
    return cells, corners


SAMPLES = 4  # sample points per axis in each square and cell read


@lru_cache(maxsize=256)
def _read_layout(width: int, height: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Where to sample a (width x height) picture: ((rows, columns) of the corner squares
    TL, TR, BL, BR, (rows, columns) of the cells, most significant bit first), int arrays of
    shape (4, 16) and (12, 16): a 4x4 grid of points in each.

    The points lie in the middle of each square (half its side) and of each cell (0.4 of
    it), clear of edges blurred by resizing and of chroma smeared by subsampling. Sampling
    points rather than averaging whole areas keeps reading fast (one gather per picture).
    """
    def points(row_bands, column_bands, keep):
        offsets = (np.arange(SAMPLES) + 0.5) / SAMPLES
        rows, columns = [], []
        for row_band in row_bands:
            top, bottom = _shrink(*row_band, keep)
            for column_band in column_bands:
                left, right = _shrink(*column_band, keep)
                r = np.floor((top + offsets * (bottom - top)) * height).astype(np.intp)
                c = np.floor((left + offsets * (right - left)) * width).astype(np.intp)
                rows.append(np.repeat(r, SAMPLES))
                columns.append(np.tile(c, SAMPLES))
        return np.array(rows), np.array(columns)

    return points(CORNER_BANDS, CORNER_BANDS, 0.5), points(_bands(GRID_ROWS), _bands(GRID_COLUMNS), 0.4)


def frame_pattern(number: int, width: int, height: int) -> np.ndarray:
    """The upright test picture of frame ``number`` (0..4095): RGB uint8, shape (height, width, 3).

    Mid-grey background; the number's 12 bits as white (1) or black (0) cells in a 4x3 grid
    filling the centre box (1/6 .. 5/6 of each side), the most significant bit top-left,
    then row by row; four saturated corner squares, 1/6 of the width and of the height each:
    red top-left, green top-right, blue bottom-left, yellow bottom-right (the corners tell
    the orientation; only read upright do the cells give the number). Everything scales with
    the picture: a 96x64 frame has 13x11-pixel cells and 16x11-pixel squares, enough to
    survive a resize to a short side of 32, non-square pixels, 4:2:0 chroma, JPEG q75 and
    moderate-quality h264 or MPEG-2. Pictures must be at least 12x12.
    """
    if not 0 <= number <= MAX_NUMBER:
        raise ValueError(f"frame number {number} does not fit in {BITS} bits (0..{MAX_NUMBER})")
    if width < 12 or height < 12:
        raise ValueError(f"a {width}x{height} picture is too small for the pattern (12x12 at least)")
    image = np.full((height, width, 3), GREY, np.uint8)
    cells, corners = _drawn_layout(width, height)
    for index, region in enumerate(cells):
        image[region] = 255 if number >> (BITS - 1 - index) & 1 else 0
    for region, name in zip(corners, (name for row in UPRIGHT_CORNERS for name in row)):
        image[region] = CORNER_COLOURS[name]
    return image


def _corner_names(means: np.ndarray) -> tuple[str, ...]:
    """Names of the corner colours nearest the mean RGBs (4, 3); ValueError if one is far from all."""
    distances = np.linalg.norm(means[:, None, :] - PALETTE[None], axis=2)  # (4 corners, 4 colours)
    worst = int(distances.min(axis=1).argmax())
    if distances[worst].min() > MAX_COLOUR_ERROR:
        corner = ("top-left", "top-right", "bottom-left", "bottom-right")[worst]
        raise ValueError(f"the {corner} corner's colour {tuple(int(c) for c in means[worst])} "
                         "is none of the pattern's red, green, blue and yellow")
    return tuple(PALETTE_NAMES[i] for i in distances.argmin(axis=1))


def _orientations_by_corners() -> dict[tuple[str, ...], str]:
    """Each orientation, keyed by the corner colours (TL, TR, BL, BR) it puts on screen."""
    upright = np.array(UPRIGHT_CORNERS)
    return {tuple(transform(upright, o).ravel().tolist()): o for o in ORIENTATIONS}


ORIENTATION_BY_CORNERS = _orientations_by_corners()


def read_pattern(image: np.ndarray) -> tuple[int, str]:
    """(frame number, orientation) of a picture of :func:`frame_pattern`: RGB uint8 (H, W, 3), any size.

    orientation: what was done to the upright pattern to give ``image``: "upright",
    "rot90cw" (turned 90 degrees clockwise), "rot180", "rot90ccw", "hflip" (mirrored
    left-right), "vflip" (mirrored top-bottom), "transpose" (mirrored about the top-left to
    bottom-right diagonal) or "antitranspose" (mirrored about the top-right to bottom-left
    diagonal); see :func:`transform`. The number is read after undoing it. Raises
    ValueError when the corners are not the pattern's (or an impossible arrangement of
    them) or a cell is neither white nor black (a blend of frames, a damaged picture).
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 (H, W, 3) array, got {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    if width < 12 or height < 12:
        raise ValueError(f"a {width}x{height} picture is too small to hold the pattern")
    (corner_rows, corner_columns), _ = _read_layout(width, height)
    corners = _corner_names(image[corner_rows, corner_columns].mean(axis=1))
    orientation = ORIENTATION_BY_CORNERS.get(corners)
    if orientation is None:
        raise ValueError(f"corner colours (top-left, top-right, bottom-left, bottom-right) {corners} "
                         "are no rotation or mirror image of the pattern's")
    upright = undo(image, orientation)
    _, (cell_rows, cell_columns) = _read_layout(upright.shape[1], upright.shape[0])
    levels = upright[cell_rows, cell_columns].mean(axis=(1, 2))  # (12,), most significant bit first
    unclear = np.flatnonzero((levels > BLACK_BELOW) & (levels < WHITE_ABOVE))
    if unclear.size:
        raise ValueError(f"cells {unclear.tolist()} (0 = top-left, row by row) are neither white nor black: "
                         f"mean levels {levels[unclear].round().tolist()}")
    return _bits_to_number(levels >= 128), orientation


def _bits_to_number(bits: np.ndarray) -> int:
    """The number whose bits, most significant first, are ``bits`` (bool, (12,))."""
    return int(bits.astype(np.int64) @ (1 << np.arange(BITS - 1, -1, -1)))


# --- what a correct reader returns -------------------------------------------------------


@dataclass
class GalleryVideo:
    """A generated file and what a correct reader returns for it (what the ffmpeg CLI shows).

    path: the file. frames: the frame numbers shown, in order (each frame once; a number
    repeats only where the source's numbers do, as in the long video). display_size:
    (width, height) in pixels as shown before any resizing, sample aspect ratio and display
    matrix applied; None without video. rate: nominal frames per second (None without video).
    notes: how the file is awkward, and where PyAV or the ffmpeg CLI behave unexpectedly.
    times: seconds, each expected frame's presentation time minus the first one's (so
    times[0] == 0). stored_size: (width, height) of the decoded pictures before the sample
    aspect ratio and display matrix. stored_orientation: what :func:`read_pattern` says of the
    decoded pixels before the display matrix is applied. stream_index: index in the
    container's streams of the video stream a reader should pick (None without video).
    start_time: seconds, the video stream's ``start_time`` as PyAV reports it.
    """

    path: Path
    frames: list[int]
    display_size: tuple[int, int] | None
    rate: Fraction | None
    notes: str = ""
    times: list[float] = field(default_factory=list)
    stored_size: tuple[int, int] | None = None
    stored_orientation: str = "upright"
    stream_index: int | None = 0
    start_time: float | None = 0.0


# --- writers -----------------------------------------------------------------------------

# libx264 at its default quality (crf 23) with B-frames, as phones and ffmpeg users make them;
# no scene-cut detection, so that keyframes fall exactly every ``keyint`` frames.
X264_OPTIONS = {"preset": "veryfast", "crf": "23", "sc_threshold": "0"}


def _rescale(value: int, source: Fraction, target: Fraction) -> int:
    """FFmpeg's av_rescale_q: ``value`` ticks of ``source`` seconds in ticks of ``target``, to nearest."""
    exact = Fraction(value) * source / target
    return int(exact + Fraction(1, 2)) if exact >= 0 else -int(-exact + Fraction(1, 2))


def _default_options(codec: str, keyint: int) -> dict[str, str]:
    """Encoder options for a small, fast, moderate-quality file with keyframes every ``keyint`` frames."""
    if codec == "libx264":
        return {**X264_OPTIONS, "g": str(keyint), "keyint_min": str(keyint)}
    if codec == "libx265":
        return {"preset": "ultrafast", "x265-params": f"keyint={keyint}:min-keyint={keyint}:scenecut=0:log-level=error"}
    if codec in ("mpeg2video", "mpeg4"):
        return {"g": str(keyint), "qscale": "4", "bf": "2"}
    return {"g": str(keyint)}


@lru_cache(maxsize=1)
def _reformatter():
    """One shared converter: a new one per frame (``VideoFrame.reformat``) costs 0.6 ms."""
    return VideoReformatter()


def _video_frame(picture: np.ndarray, pix_fmt: str):
    """A PyAV VideoFrame in ``pix_fmt`` of an RGB uint8 picture (H, W, 3) (FFmpeg's default
    BT.601 limited-range conversion, as the ffmpeg CLI makes)."""
    return _reformatter().reformat(av.VideoFrame.from_ndarray(picture, format="rgb24"), format=pix_fmt)


def reported_start_time(path, index: int = 0) -> float | None:
    """Seconds: the ``start_time`` PyAV reports for stream ``index`` of the file (None if unset).

    Muxers move timestamps (MPEG-TS adds its muxing delay and keeps B-frames' decode times
    non-negative), so the gallery measures this rather than predicting it.
    """
    with av.open(str(path)) as container:
        stream = container.streams[index]
        if stream.start_time is None:
            return None
        return float(stream.start_time * stream.time_base)


def write_video(
    path,
    numbers,
    size=(96, 64),
    rate=25,
    codec="libx264",
    pix_fmt="yuv420p",
    keyint=12,
    start_seconds=0.0,
    pts_seconds=None,
    sar=None,
    display_matrix=None,
    options=None,
    container_format=None,
    stored_orientation="upright",
    container_options=None,
) -> GalleryVideo:
    """Encode frames showing ``numbers`` into a one-stream video file; returns its GalleryVideo.

    path: the file; its extension picks the container unless ``container_format`` names
    it. numbers: the frame numbers (0..4095) drawn into consecutive frames. size: (width,
    height) of the stored pictures. rate: nominal frames per second (int, Fraction or float).
    codec, pix_fmt: PyAV encoder and its pixel format. keyint: frames between keyframes.
    start_seconds: added to every timestamp (a stream that starts late); without
    ``pts_seconds`` it is rounded to whole frames. pts_seconds: each frame's presentation time
    in seconds, rounded to milliseconds (variable frame rate); default ``i / rate``. sar:
    sample aspect ratio (Fraction; None = square pixels). display_matrix: 9 ints in FFmpeg's
    AV_PKT_DATA_DISPLAYMATRIX layout, stored as stream side data. options: encoder options
    replacing the defaults (see ``_default_options``). stored_orientation: the upright
    pattern is drawn at the size that, after this transform, gives ``size``, so that a
    display matrix can undo it. container_options: muxer options.

    The GalleryVideo expects every frame, in order; display_size is ``size`` with the sample
    aspect ratio applied to the width (rounded) and the axes swapped when the orientation
    swaps them (the caller's matrix must undo ``stored_orientation``).
    """
    path = Path(path)
    numbers = list(numbers)
    rate = Fraction(rate).limit_denominator(1001000)
    width, height = size
    if codec == "libx265" and (width < 64 or height < 48):
        # Seen with PyAV 18's bundled libx265: heap corruption and abort() at 48x32.
        raise ValueError(f"libx265 crashes the process on tiny pictures; use at least 64x48, not {width}x{height}")
    upright_size = (height, width) if stored_orientation in SWAPS_AXES else (width, height)
    if pts_seconds is None:
        # Whole frames in 1/rate ticks: MPEG-2 only takes standard frame rates as time bases.
        time_base = 1 / rate
        pts = [int(round(start_seconds * rate)) + i for i in range(len(numbers))]
    else:
        time_base = Fraction(1, 1000)
        pts = [int(round((start_seconds + t) * 1000)) for t in pts_seconds]
        if len(pts) != len(numbers) or any(b <= a for a, b in zip(pts, pts[1:])):
            raise ValueError("pts_seconds must give one strictly increasing time per frame (at 1 ms resolution)")
    with av.open(str(path), "w", format=container_format, container_options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.codec_context.time_base = time_base
        stream.options = dict(_default_options(codec, keyint) if options is None else options)
        if sar is not None:
            stream.codec_context.sample_aspect_ratio = Fraction(sar)
        if display_matrix is not None:
            stream.set_display_matrix(display_matrix)
        for number, stamp in zip(numbers, pts):
            picture = np.ascontiguousarray(transform(frame_pattern(number, *upright_size), stored_orientation))
            frame = _video_frame(picture, pix_fmt)
            frame.pts, frame.time_base = stamp, time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
        stream_time_base = stream.time_base
    display = (round(width * Fraction(sar)) if sar else width, height)
    if stored_orientation in SWAPS_AXES:
        display = display[::-1]
    stored = [_rescale(p, time_base, stream_time_base) for p in pts]
    return GalleryVideo(
        path=path,
        frames=numbers,
        display_size=display,
        rate=rate,
        times=[float((p - stored[0]) * stream_time_base) for p in stored],
        stored_size=(width, height),
        stored_orientation=stored_orientation,
        start_time=reported_start_time(path),
    )


ONE = 1 << 16  # 1.0 in the display matrix's 16.16 fixed point
# FFmpeg's display matrix [a b u; c d v; x y w] (a=m[0], b=m[1], c=m[3], d=m[4]) shows the
# stored pixel at column p, row q (y down) at column a*p + c*q, row b*p + d*q (then shifted
# back into view); checked against the ffmpeg CLI. Keyed by what the player does.
DISPLAY_MATRICES = {
    "upright": (ONE, 0, 0, 0, ONE, 0, 0, 0, 1 << 30),
    "rot90cw": (0, ONE, 0, -ONE, 0, 0, 0, 0, 1 << 30),
    "rot180": (-ONE, 0, 0, 0, -ONE, 0, 0, 0, 1 << 30),
    "rot90ccw": (0, -ONE, 0, ONE, 0, 0, 0, 0, 1 << 30),
    "hflip": (-ONE, 0, 0, 0, ONE, 0, 0, 0, 1 << 30),
    "vflip": (ONE, 0, 0, 0, -ONE, 0, 0, 0, 1 << 30),
    "transpose": (0, ONE, 0, ONE, 0, 0, 0, 0, 1 << 30),
    "antitranspose": (0, -ONE, 0, -ONE, 0, 0, 0, 0, 1 << 30),
}


def write_oriented(path, orientation, numbers=range(24), display_size=(64, 96), **kwargs) -> GalleryVideo:
    """A video whose display matrix tells the player to do ``orientation`` to the stored pictures.

    orientation: one of ORIENTATIONS, what a player that honours the display matrix does to
    each decoded picture (e.g. "rot90cw": it turns the picture 90 degrees clockwise). The
    stored pixels are the upright pattern with the inverse done to it, so the player shows
    the pattern upright at ``display_size`` (width, height); the stored pictures are
    ``display_size`` with the axes swapped for the four orientations that swap them, and
    ``read_pattern`` of a decoded, unturned picture returns the inverse orientation (the
    GalleryVideo's ``stored_orientation``). Other keywords go to :func:`write_video`.
    """
    stored_orientation = INVERSE.get(orientation, orientation)
    width, height = display_size
    stored_size = (height, width) if orientation in SWAPS_AXES else (width, height)
    video = write_video(
        path, numbers, size=stored_size, display_matrix=DISPLAY_MATRICES[orientation],
        stored_orientation=stored_orientation, **kwargs,
    )
    video.notes = (
        f"display matrix {orientation} {list(DISPLAY_MATRICES[orientation])}: the stored pictures read "
        f"{stored_orientation}, the ffmpeg CLI (autorotate) shows them upright. PyAV decodes the stored "
        "pictures unturned; its VideoFrame.rotation ignores mirroring (hflip reads -180, vflip 0, "
        "transpose -90, antitranspose 90), so a reader must take the whole matrix from the frame's "
        "DISPLAYMATRIX side data (9 int32)"
    )
    return video


def write_portrait_phone(path, numbers=range(30), stored_size=(240, 180), **kwargs) -> GalleryVideo:
    """A phone held upright: landscape pictures (a scaled-down 720x540 sensor, 240x180 by
    default) stored turned a quarter counter-clockwise, with the display matrix for a
    quarter turn clockwise (``rotate=90`` metadata in the ffmpeg CLI's terms); shown as a
    180x240 portrait picture. Other keywords go to :func:`write_video`."""
    video = write_oriented(path, "rot90cw", numbers, display_size=stored_size[::-1], **kwargs)
    video.notes = "portrait phone: " + video.notes
    return video


def _source_frames(src) -> tuple[Path, list[int]]:
    """(path, frame numbers in presentation order) of a GalleryVideo or of a plain path (then
    the numbers are the frames' positions, 0, 1, 2, ...)."""
    if isinstance(src, GalleryVideo):
        return Path(src.path), list(src.frames)
    with av.open(str(src)) as container:
        count = sum(1 for packet in container.demux(video=0) if packet.size)
    return Path(src), list(range(count))


def write_edit_list_cut(src, dst, start, duration) -> GalleryVideo:
    """What ``ffmpeg -ss START -i src -c copy -t DURATION dst`` makes of an mp4, done with PyAV.

    src: a one-video-stream file, as a GalleryVideo (its ``frames`` name the source's
    frames) or a path (frames are then numbered by position). dst: an ".mp4" or ".mov".
    start, duration: seconds (float or Fraction), ``start`` counted from the source's start
    time as the CLI does. Like the ffmpeg 5.1 CLI, packets are copied unchanged from the
    keyframe at or before ``start`` in decode order until the first packet whose decode time
    is at or past ``start + duration``, with every timestamp moved back by ``start``; the
    frames before ``start`` get negative times, so the mov muxer writes an edit list and
    demuxers mark them to be discarded.
    The file declares every copied packet (``stream.frames``, ffprobe's nb_frames) but shows
    only the frames at or after ``start`` (the demuxer then shifts the first shown one to 0).
    With B-frames a frame before the stop point in presentation order may lie past it in
    decode order: it is left out, and ``frames`` has a gap there, as the CLI's output has.
    Checked packet for packet against the CLI for the case in the module's self-tests.
    """
    src_path, numbers = _source_frames(src)
    start, duration = Fraction(start).limit_denominator(10**6), Fraction(duration).limit_denominator(10**6)
    with av.open(str(src_path)) as source:
        stream = source.streams.video[0]
        time_base, rate = stream.time_base, stream.average_rate
        stored_size = (stream.width, stream.height)
        all_pts = sorted(packet.pts for packet in source.demux(stream) if packet.size)
        origin = Fraction(source.start_time or 0, 1_000_000)  # the CLI's -ss counts from here
        shift = _rescale(1, origin + start, time_base)
        # ffmpeg seeks the way PyAV's seek does: to the keyframe at or before the time.
        source.seek(shift, backward=True, any_frame=False, stream=stream)
        with av.open(str(dst), "w") as target:
            copy = target.add_stream_from_template(stream)
            copied = []
            for packet in source.demux(stream):
                if not packet.size:
                    continue  # the demuxer's end-of-stream flush packet
                if packet.dts * time_base >= origin + start + duration:
                    break
                copied.append(packet.pts)
                packet.pts -= shift
                packet.dts -= shift
                packet.stream = copy
                target.mux(packet)
    shown = sorted(pts for pts in copied if pts >= shift)
    frame_of = {pts: numbers[rank] for rank, pts in enumerate(all_pts)}
    return GalleryVideo(
        path=Path(dst),
        frames=[frame_of[pts] for pts in shown],
        display_size=src.display_size if isinstance(src, GalleryVideo) else stored_size,
        rate=rate,
        notes=(f"edit-list cut -ss {float(start)} -t {float(duration)}: {len(copied)} packets declared "
               f"(stream.frames, ffprobe nb_frames), {len(shown)} frames shown by the CLI and decoded by PyAV; "
               f"copied from the keyframe at {float(min(copied) * time_base):.3f} s, the frames before "
               f"{float(start):.3f} s are decoded and discarded"),
        times=[float((pts - shown[0]) * time_base) for pts in shown],
        stored_size=stored_size,
        stored_orientation=src.stored_orientation if isinstance(src, GalleryVideo) else "upright",
        start_time=reported_start_time(dst),
    )


def _with_extension(path, extension: str) -> Path:
    """``path`` with its extension replaced by (or, without one, given) ``extension`` (".mp4")."""
    path = Path(path)
    return path.with_name(path.stem + extension) if path.suffix else path.with_name(path.name + extension)


def phone_times(count: int = 40) -> list[float]:
    """Presentation times in seconds, like a phone camera's variable frame rate.

    Mostly 30 fps with 33/34 ms jitter, a 150 ms hole where frames were dropped (after frame
    9), a burst of three frames 5 ms apart (frames 20..22) and a 1 s freeze (after frame 30);
    whole milliseconds, so Matroska and mp4 store them exactly.
    """
    times, now = [], 0
    for i in range(count):
        times.append(now / 1000)
        now += 150 if i == 9 else 5 if 20 <= i <= 21 else 1000 if i == 30 else (33, 34, 33)[i % 3]
    return times


def write_late_start(path, start_seconds=10.0, numbers=range(30), **kwargs) -> GalleryVideo:
    """A video whose first frame is shown at ``start_seconds`` (a cut from a broadcast or a
    recording that began late); other keywords go to :func:`write_video`. Every frame is
    expected. PyAV and ffprobe report ``start_time`` = ``start_seconds`` for Matroska and
    mp4 (the mov muxer writes an empty edit for the delay) and, for MPEG-TS, whatever the
    muxer adds on top (see ``start_time`` in the result; write_ts_muxdelay shows the CLI's)."""
    video = write_video(path, numbers, start_seconds=start_seconds, **kwargs)
    video.notes = f"video starts at {start_seconds} s; PyAV reports start_time {video.start_time} s"
    return video


def write_ts_muxdelay(path, numbers=range(30), **kwargs) -> GalleryVideo:
    """An MPEG-TS as the ffmpeg CLI writes it: its default ``-muxdelay 0.7`` (the muxer's
    max_delay) puts the first frame at 1.4 s plus the B-frame delay (1.48 s with the default
    libx264 options), though the frames were encoded from 0. Every frame is expected."""
    video = write_video(path, numbers, container_options={"max_delay": "700000"}, **kwargs)
    video.notes = f"MPEG-TS with the CLI's 0.7 s muxing delay: PyAV reports start_time {video.start_time} s"
    return video


def write_vfr(path, times=None, rate=30, **kwargs) -> GalleryVideo:
    """A variable-frame-rate video, frames at ``times`` (seconds; default :func:`phone_times`),
    numbered 0, 1, 2, ...; other keywords go to :func:`write_video`. Every frame is expected
    once, in order, with ``times`` as given (relative to the first): no frame is repeated or
    dropped to make the rate even, which is what ``-fps_mode passthrough`` shows."""
    times = phone_times() if times is None else list(times)
    video = write_video(path, range(len(times)), rate=rate, pts_seconds=times, **kwargs)
    video.notes = f"variable frame rate (nominal {rate} fps): frame times {times}"
    return video


def _encode_picture(stream, picture: np.ndarray) -> list:
    """The packets of one RGB picture (H, W, 3) encoded at pts 0 by ``stream`` (flushed)."""
    frame = _video_frame(picture, stream.pix_fmt)
    frame.pts = 0
    return stream.encode(frame) + stream.encode(None)


def _encode_into(container, stream, numbers, size, time_base) -> None:
    """Encode the upright patterns of ``numbers`` at ``size`` (w, h) into ``stream``, one per tick."""
    for pts, number in enumerate(numbers):
        frame = _video_frame(frame_pattern(number, *size), stream.pix_fmt)
        frame.pts, frame.time_base = pts, time_base
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


def _add_h264(container, size, rate, keyint=12):
    """A libx264 yuv420p stream of ``size`` (w, h) at ``rate`` fps with the gallery's options."""
    stream = container.add_stream("libx264", rate=rate)
    stream.width, stream.height, stream.pix_fmt = *size, "yuv420p"
    stream.codec_context.time_base = 1 / Fraction(rate)
    stream.options = _default_options("libx264", keyint)
    return stream


COVER_NUMBER = 4000  # the number on cover art and still images: no video frame shows it


def write_cover_art(path, numbers=range(24), size=(96, 64), rate=25, cover_size=(320, 240)) -> GalleryVideo:
    """A video with cover art: a second video stream with the attached_pic disposition that
    holds one larger picture (the pattern of frame 4000 at ``cover_size``), as music videos
    and downloaded clips carry. ".mp4" (and ".m4v", ".mov") store it as an mjpeg 'covr' atom,
    ".mkv" as a PNG attachment; either way PyAV and ffprobe list it after the real video, as a
    video stream with ``frames == 0``. Expected: the real video's frames only."""
    path = Path(path)
    matroska = path.suffix.lower() in (".mkv", ".mka", ".webm")
    cover = frame_pattern(COVER_NUMBER, *cover_size)
    with av.open(str(path), "w") as container:
        stream = _add_h264(container, size, rate)
        if matroska:
            png = io.BytesIO()
            Image.fromarray(cover).save(png, "PNG")
            container.add_attachment("cover.png", "image/png", png.getvalue())
        else:
            art = container.add_stream("mjpeg", rate=1)
            art.width, art.height, art.pix_fmt = *cover_size, "yuvj420p"
            art.disposition = av.stream.Disposition.attached_pic
            container.mux(_encode_picture(art, cover))
        _encode_into(container, stream, numbers, size, stream.codec_context.time_base)
    numbers = list(numbers)
    return GalleryVideo(
        path=path, frames=numbers, display_size=tuple(size), rate=Fraction(rate),
        notes=(f"cover art ({'PNG attachment' if matroska else 'mjpeg covr atom'}, {cover_size[0]}x{cover_size[1]}, "
               f"shows frame {COVER_NUMBER}) as stream 1, disposition attached_pic, stream.frames 0; the ffmpeg "
               "CLI's automatic selection skips it, a reader that picks the largest video would not"),
        times=[i / float(rate) for i in range(len(numbers))], stored_size=tuple(size),
        stream_index=0, start_time=reported_start_time(path),
    )


def write_still_first(path, numbers=range(24), size=(96, 64), rate=25, still_size=(320, 240)) -> GalleryVideo:
    """An mp4 whose FIRST video track is a still picture: one mjpeg frame of the pattern of
    frame 4000 at ``still_size`` (larger than the video), lasting the whole clip, followed
    by the real h264 video as stream 1. Expected: the real video's frames. Note that the
    ffmpeg CLI's automatic stream selection takes the video with the most pixels, so plain
    ``ffmpeg -i`` shows the still; ``-map 0:1`` shows the expected frames."""
    path = Path(path)
    numbers = list(numbers)
    with av.open(str(path), "w") as container:
        still = container.add_stream("mjpeg", rate=rate)
        still.width, still.height, still.pix_fmt = *still_size, "yuvj420p"
        still.codec_context.time_base = 1 / Fraction(rate)
        stream = _add_h264(container, size, rate)
        packets = _encode_picture(still, frame_pattern(COVER_NUMBER, *still_size))
        for packet in packets:
            packet.duration = len(numbers)  # in 1/rate ticks: the still covers the whole clip
        container.mux(packets)
        _encode_into(container, stream, numbers, size, stream.codec_context.time_base)
    return GalleryVideo(
        path=path, frames=numbers, display_size=tuple(size), rate=Fraction(rate),
        notes=(f"stream 0 is a one-frame mjpeg still ({still_size[0]}x{still_size[1]}, frame {COVER_NUMBER}) "
               "that the mov muxer marks as the default video track; the real video is stream 1 (no default "
               "disposition); plain ffmpeg -i picks the still (most pixels), -map 0:1 the video"),
        times=[i / float(rate) for i in range(len(numbers))], stored_size=tuple(size),
        stream_index=1, start_time=reported_start_time(path, 1),
    )


def write_audio_only(path, seconds=1.0, sample_rate=48000) -> GalleryVideo:
    """An audio-only file (AAC in ".m4a"/".mp4", or whatever the extension's muxer takes by
    default from PyAV's ``add_stream("aac")``): a 440 Hz tone, no video stream at all.
    Expected: no frames, no display size, no rate; a reader should say there is no video."""
    path = Path(path)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=sample_rate)
        samples = int(seconds * sample_rate)
        tone = (0.2 * np.sin(2 * np.pi * 440 * np.arange(samples) / sample_rate)).astype(np.float32)
        for start in range(0, samples, 1024):
            chunk = np.stack([tone[start:start + 1024]] * 2)
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="stereo")
            frame.sample_rate, frame.pts = sample_rate, start
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return GalleryVideo(
        path=path, frames=[], display_size=None, rate=None, notes=f"audio only: {seconds} s of AAC, no video stream",
        times=[], stored_size=None, stream_index=None, start_time=None,
    )


def write_interlaced_broadcast(path, numbers=range(25), size=(176, 144), sar=Fraction(16, 11), **kwargs) -> GalleryVideo:
    """Broadcast-style MPEG-2 in MPEG-TS: interlaced coding (interlaced DCT and motion
    estimation, so the stream is flagged interlaced), B-frames, anamorphic pixels. The
    default is PAL's 720x576 scaled down to 176x144 with its 16:9 sample aspect ratio
    scaled alike (16:11; 64:45 at 720x576): MPEG-2 stores a display aspect ratio code (16:9)
    from which decoders give back that sample aspect ratio. Expected display size: the
    width times the sample aspect ratio, rounded (256x144), height unchanged. Other
    keywords go to :func:`write_video`."""
    options = {"g": "12", "bf": "2", "qscale": "4", "flags": "+ilme+ildct", "alternate_scan": "1"}
    video = write_video(path, numbers, size=size, codec="mpeg2video", sar=sar, options=options, **kwargs)
    video.notes = (
        f"interlaced MPEG-2, stored {size[0]}x{size[1]}, sample aspect ratio {sar}, shown "
        f"{video.display_size[0]}x{video.display_size[1]}; decoded frames have interlaced_frame set and "
        "ffprobe reports field_order bb (PyAV's frames carry no top-field-first flag); the ffmpeg CLI "
        f"neither deinterlaces nor scales (its PNGs are {size[0]}x{size[1]} with the aspect in pHYs); "
        f"PyAV start_time {video.start_time} s"
    )
    return video


def write_long_video(path, seconds=240, rate=24, keyint_seconds=2, size=(64, 48)) -> GalleryVideo:
    """A long, quickly encoded h264 video (libx264 ultrafast: no B-frames) for cuts at the
    start, middle and end: ``seconds * rate`` frames, a keyframe every ``keyint_seconds``.
    Frame i shows i % 4096 (the pattern has 12 bits): with the defaults, 5760 frames, so
    frames 4096.. show 0.. again (at 170.67 s); ``frames`` holds these numbers, and a cut
    test that expects frames from a time t should expect round(t * rate) % 4096 onwards."""
    count = int(round(seconds * rate))
    keyint = int(round(keyint_seconds * rate))
    options = {"preset": "ultrafast", "crf": "28", "g": str(keyint), "keyint_min": str(keyint), "sc_threshold": "0"}
    video = write_video(path, [i % (MAX_NUMBER + 1) for i in range(count)], size=size, rate=rate, keyint=keyint, options=options)
    video.notes = f"long video: {count} frames at {rate} fps, keyframe every {keyint} frames, frame i shows i % 4096"
    return video


def write_cut_case(path, start=1.5, duration=1.5) -> GalleryVideo:
    """The edit-list cut of a 100-frame 25 fps h264 clip with keyframes every 50 frames
    (written next to ``path`` as ``<stem>_source.mp4``); see :func:`write_edit_list_cut`.
    The defaults give the documented case: 77 frames declared, 39 (38..76) shown."""
    path = Path(path)
    source = write_video(path.with_name(path.stem + "_source.mp4"), range(100), keyint=50)
    return write_edit_list_cut(source, path, start, duration)


def _gallery() -> dict:
    """GALLERY's factories: name -> callable(path) -> GalleryVideo (extension replaced)."""
    def make(extension, writer, *args, **kwargs):
        return lambda path: writer(_with_extension(path, extension), *args, **kwargs)

    def plain(extension, notes, **kwargs):
        def write(path):
            video = write_video(_with_extension(path, extension), range(40), **kwargs)
            video.notes = notes
            return video
        return write

    cases = {"plain_h264": plain(".mp4", "plain h264 yuv420p with B-frames, 96x64, 25 fps: the reference case")}
    for orientation in ORIENTATIONS:
        cases[f"oriented_{orientation}"] = make(".mp4", write_oriented, orientation)
    # Matroska keeps the matrix as a projection pose (roll for turns, yaw/pitch for mirrors).
    cases["oriented_rot90cw_mkv"] = make(".mkv", write_oriented, "rot90cw")
    cases["oriented_hflip_mkv"] = make(".mkv", write_oriented, "hflip")
    cases.update({
        "portrait_phone": make(".mp4", write_portrait_phone),
        "edit_list_cut": make(".mp4", write_cut_case),
        "edit_list_cut_gaps": make(".mp4", write_cut_case, start=1.52, duration=0.5),
        "late_start_ts": make(".ts", write_late_start),
        "late_start_mkv": make(".mkv", write_late_start),
        "late_start_mp4": make(".mp4", write_late_start),
        "ts_muxdelay": make(".ts", write_ts_muxdelay),
        "vfr_mkv": make(".mkv", write_vfr),
        "vfr_mp4": make(".mp4", write_vfr),
        "cover_art_mp4": make(".mp4", write_cover_art),
        "cover_art_mkv": make(".mkv", write_cover_art),
        "still_first": make(".mp4", write_still_first),
        "audio_only": make(".m4a", write_audio_only),
        "odd_yuv444p_h264": plain(".mp4", "97x55 h264 High 4:4:4 (libx264 refuses odd sizes in 4:2:0)",
                                  size=(97, 55), pix_fmt="yuv444p"),
        "odd_yuv420p_ffv1": plain(".mkv", "97x55 FFV1 4:2:0: chroma planes 49x28 (rounded up)", size=(97, 55), codec="ffv1"),
        "yuv420p10_h264": plain(".mp4", "h264 High 10, yuv420p10le (PyAV's libx264 builds 10-bit in)", pix_fmt="yuv420p10le"),
        "yuv420p10_hevc": plain(".mp4", "HEVC Main 10 (libx265), yuv420p10le", codec="libx265", pix_fmt="yuv420p10le"),
        "yuv420p10_ffv1": plain(".mkv", "FFV1 yuv420p10le, lossless", codec="ffv1", pix_fmt="yuv420p10le"),
        "yuv422p10_prores": plain(".mov", "ProRes 422 HQ (prores_ks), yuv422p10le, all intra", codec="prores_ks",
                                  pix_fmt="yuv422p10le", options={}),
        "anamorphic_h264": plain(".mp4", "h264 with sample aspect ratio 4:3: stored 96x64, shown 128x64 (ffprobe DAR 2:1)",
                                 sar=Fraction(4, 3)),
        "interlaced_mpeg2_ts": make(".ts", write_interlaced_broadcast),
        "long": make(".mp4", write_long_video),
    })
    return cases


# name -> factory(path) -> GalleryVideo; each factory replaces the path's extension with its
# own, so ``GALLERY[name](tmp_path / name)`` works. Together they take a few seconds.
GALLERY = _gallery()
