"""Video files as clips (How2Sign, manifests' ``video``, ``fla-ds translate``). Provisional."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from fla_ds.corpus.base import VideoFile
from fla_ds.frames import SampleError, resized_size


def video_frames(video: VideoFile, short_side: int, repaired: Counter) -> Iterator[np.ndarray]:
    import av

    path = Path(video.path)
    if not path.is_file():
        raise SampleError("missing video file")
    decoded = declared = kept = 0
    stopped_at_end = False
    last_time = None
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise SampleError("unreadable video (no video stream)")
            stream = container.streams.video[0]
            declared = stream.frames or 0
            for frame in container.decode(stream):
                decoded += 1
                t = float(frame.time) if frame.time is not None else None
                last_time = t
                if video.start is not None and t is not None and t < video.start:
                    continue
                if video.end is not None and t is not None and t >= video.end:
                    stopped_at_end = True
                    break
                image = frame.to_image()
                size = resized_size(image.width, image.height, short_side)
                kept += 1
                yield np.asarray(image.resize(size, Image.Resampling.BILINEAR) if size != image.size else image)
    except SampleError:
        raise
    except Exception as exc:
        if kept:
            raise SampleError(f"truncated video ({type(exc).__name__} after {decoded} frames)") from None
        raise SampleError(f"unreadable video ({type(exc).__name__})") from None
    if not stopped_at_end and declared and decoded < declared:
        raise SampleError(f"truncated video (decoded {decoded} of {declared} frames)")
    if video.start is not None and last_time is not None and video.start > last_time:
        raise SampleError("clip start past end of video")
    if video.end is not None and last_time is not None and video.end > last_time + 1e-6 and kept:
        repaired["end_clamped"] += 1
