"""Display geometry of a decoded video frame: the display matrix (rotation, mirroring) and the
sample aspect ratio, and the one swscale call that resizes a frame to its stored size."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from fla_ds.frames import SampleError, resized_size


@dataclass(frozen=True)
class Orientation:
    """How stored pixels become displayed pixels: transpose first, then mirror the columns
    (``flip_h``) and/or the rows (``flip_v``). Covers the eight rotations/mirrorings."""

    transpose: bool = False
    flip_h: bool = False
    flip_v: bool = False

    @classmethod
    def from_display_matrix(cls, matrix: Sequence[int]) -> Orientation:
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
    def of(cls, frame, sample_aspect_ratio: Fraction | None, short_side: int) -> Geometry:
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
