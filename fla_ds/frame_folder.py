"""Folders of image files as clips (PHOENIX-2014T, CSL-Daily, manifests' ``frames``).

What a clip is, rule by rule (README "Building shards" repeats them):

- **Which files.** The folder's files (not its subfolders) whose name matches the source's
  pattern, case-insensitively (``*.jpg`` finds ``IMG1.JPG``, as on the filesystems these
  corpora are copied from), and whose suffix is an image type (``IMAGE_SUFFIXES``). Hidden and
  system files are not frames: names starting with ``.`` (macOS's ``._images0001.png``
  AppleDouble companions and ``.DS_Store``, written on every non-Mac filesystem a Mac copies
  to), ``Thumbs.db`` and ``desktop.ini``; subfolders (``__MACOSX`` among them) are not read.
- **Order.** Natural name order: runs of ASCII digits compare as numbers (``img2`` before
  ``img10``, ``img007`` between them), the rest compares case-insensitively, and names equal
  under that rule (``img01``/``img1``, ``a.png``/``A.png``) keep a fixed order by their exact
  name, so the order never depends on the filesystem's listing.
- **Orientation.** The EXIF orientation is applied (``PIL.ImageOps.exif_transpose``), as image
  viewers and camera software do.
- **Colour.** Every mode becomes 8-bit RGB: transparent images (RGBA, LA, PA, P or L/RGB with
  a transparency key) are composited over white, the convention of the Hugging Face image
  processors (``transformers.image_transforms.convert_to_rgb``); 16-bit grey (``I;16*``, and
  ``I``, what 16-bit grey PNGs open as in older PIL) is divided by 256 (its high byte: 0x8000
  -> 128), never clipped at 255 as PIL's own conversion does; grey, 1-bit, palette, YCbCr and
  CMYK JPEGs (Adobe's inverted CMYK included: PIL's JPEG reader undoes the inversion; no ICC
  profile is applied, as in the Hugging Face processors) go through PIL's conversion. Any
  other mode (float ``F``, ``LAB``, ``HSV``: only other formats under an image name give
  them) is rejected.
- **Size.** The first frame fixes the clip's stored size (short side ``short_side``,
  ``fla_ds.frames.resized_size``); a later frame of another size is resized to that same size
  (bilinear, aspect not kept), and the clip is counted once as ``frame_size_mixed``.
- **Memory.** One frame is decoded at a time: it is converted, resized and handed on before
  the next file is opened.

Rejects (``SampleError``): ``missing frame folder``, ``zero frames``, ``corrupt image (name)``
(unreadable or truncated), ``image too large (name)`` (PIL's decompression-bomb limit),
``unsupported image mode (name: mode)``.
"""
from __future__ import annotations

import fnmatch
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from fla_ds.corpus.base import FrameFolder
from fla_ds.frames import SampleError, resized_size

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
SYSTEM_FILES = {"thumbs.db", "desktop.ini"}
"""Files Windows writes into image folders (compared case-insensitively)."""
SIXTEEN_BIT_GREY = {"I", "I;16", "I;16L", "I;16B", "I;16N"}
ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
CONVERTIBLE_MODES = ALPHA_MODES | {"RGB", "L", "1", "P", "CMYK", "YCbCr"}
"""Modes PIL converts to RGB by their meaning; others (float ``F``, ``LAB``, ``HSV``, which come
only from other formats misnamed) have no agreed RGB form and are rejected."""
WHITE = (255, 255, 255)


def natural_key(name: str) -> tuple[list, str]:
    """Sort key of a file name: ASCII digit runs as numbers, other text case-folded, then the
    exact name as the tie-break (see the module docstring)."""
    parts = re.split(r"([0-9]+)", name)
    return [int(p) if i % 2 else p.casefold() for i, p in enumerate(parts)], name


def is_frame_file(path: Path) -> bool:
    """Whether ``path`` is an image file that is not a hidden or system file."""
    if path.name.startswith(".") or path.name.lower() in SYSTEM_FILES:
        return False
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def list_frame_files(folder: FrameFolder) -> list[Path]:
    """The frame files of a folder (``folder.pattern`` matched case-insensitively against file
    names) in natural name order. Raises SampleError("missing frame folder") when the folder
    does not exist."""
    path = Path(folder.path)
    if not path.is_dir():
        raise SampleError("missing frame folder")
    pattern = folder.pattern.casefold()
    files = [p for p in path.iterdir() if fnmatch.fnmatchcase(p.name.casefold(), pattern) and is_frame_file(p)]
    return sorted(files, key=lambda p: natural_key(p.name))


def to_rgb(image: Image.Image, name: str) -> Image.Image:
    """Any PIL image -> mode RGB by the colour rules of the module docstring. Raises
    SampleError("unsupported image mode (name: mode)")."""
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in SIXTEEN_BIT_GREY:
        grey = np.asarray(image).astype(np.int64)
        return Image.fromarray((np.clip(grey, 0, 0xFFFF) >> 8).astype(np.uint8), "L").convert("RGB")
    if image.mode not in CONVERTIBLE_MODES:
        raise SampleError(f"unsupported image mode ({name}: {image.mode})")
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE + (255,)), rgba).convert("RGB")
    return image.convert("RGB")


def read_frame(path: Path) -> Image.Image:
    """One image file, upright (EXIF orientation applied) and in RGB. Raises SampleError
    (corrupt image, image too large, unsupported image mode)."""
    try:
        with Image.open(path) as im:
            im.load()
            upright = ImageOps.exif_transpose(im)
    except Image.DecompressionBombError:
        raise SampleError(f"image too large ({path.name})") from None
    except Exception:  # PIL raises a dozen types for unreadable and truncated files
        raise SampleError(f"corrupt image ({path.name})") from None
    return to_rgb(upright, path.name)


def folder_frames(folder: FrameFolder, short_side: int, repaired: Counter) -> Iterator[np.ndarray]:
    """The folder's frames, one at a time, as RGB uint8 (H, W, 3) arrays, all of the first
    frame's stored size (short side ``short_side`` pixels; ``<= 0`` keeps the size). Counts
    ``frame_size_mixed`` into ``repaired`` (once per clip) when frames of another size were
    resized to it. Raises SampleError (missing frame folder, zero frames, corrupt image, image
    too large, unsupported image mode)."""
    files = list_frame_files(folder)
    if not files:
        raise SampleError("zero frames")
    first_size = stored = None
    mixed = False
    for f in files:
        rgb = read_frame(f)
        if first_size is None:
            first_size, stored = rgb.size, resized_size(rgb.width, rgb.height, short_side)
        elif rgb.size != first_size and not mixed:
            mixed = True
            repaired["frame_size_mixed"] += 1
        if rgb.size != stored:
            rgb = rgb.resize(stored, Image.Resampling.BILINEAR)
        yield np.asarray(rgb)
