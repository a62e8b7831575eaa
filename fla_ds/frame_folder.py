"""Folders of image files as clips (PHOENIX-2014T, CSL-Daily, manifests' ``frames``).

Frames are the image files of the folder, in natural name order (``img2`` before ``img10``),
read one at a time, converted to RGB and resized to the clip's stored size.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from fla_ds.corpus.base import FrameFolder
from fla_ds.frames import SampleError, resized_size

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def list_frame_files(folder: FrameFolder) -> list[Path]:
    """The frame files of a folder in natural name order. Raises SampleError when the folder
    does not exist."""
    path = Path(folder.path)
    if not path.is_dir():
        raise SampleError("missing frame folder")
    files = [p for p in path.glob(folder.pattern) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    return sorted(files, key=lambda p: natural_key(p.name))


def folder_frames(folder: FrameFolder, short_side: int, repaired: Counter) -> Iterator[np.ndarray]:
    """The folder's frames as RGB uint8 (H, W, 3) arrays with the short side ``short_side``.
    Raises SampleError (missing folder, zero frames, a corrupt image)."""
    files = list_frame_files(folder)
    if not files:
        raise SampleError("zero frames")
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                rgb = im.convert("RGB")
        except Exception:
            raise SampleError(f"corrupt image ({f.name})") from None
        size = resized_size(rgb.width, rgb.height, short_side)
        if size != rgb.size:
            rgb = rgb.resize(size, Image.Resampling.BILINEAR)
        yield np.asarray(rgb)
