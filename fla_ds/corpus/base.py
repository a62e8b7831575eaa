"""What every corpus reader yields, and the text checks shared by all of them.

A reader lists the samples of one split as ``CorpusSample`` records; it reads only annotation
files (cheap). Frames are decoded later, in the shard builder's worker processes, from the
``FrameSource`` each record names. Readers never reject: they report what they found (raw
bytes for text that is not UTF-8, a missing path as a path) and the builder decides, so that
every outcome is counted in one place.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Protocol, Union


@dataclass(frozen=True)
class FrameFolder:
    """A folder of image files (PNG/JPEG), read in natural (numeric-aware) name order."""

    path: str
    pattern: str = "*"


@dataclass(frozen=True)
class VideoFile:
    """A video file, whole, or cut to [start, end) seconds (How2Sign raw videos)."""

    path: str
    start: Optional[float] = None
    end: Optional[float] = None


FrameSource = Union[FrameFolder, VideoFile]


@dataclass(frozen=True)
class CorpusSample:
    id: str
    frames: FrameSource
    text: Union[str, bytes]
    """The target sentence; bytes when the annotation was not valid UTF-8 (rejected later)."""
    meta: dict = field(default_factory=dict)
    """Signer, original times, corpus-specific fields; JSON-serialisable."""


class CorpusReader(Protocol):
    name: str

    def samples(self) -> Iterator[CorpusSample]:
        """The samples of the configured split, in the corpus's own order."""

    def source_files(self) -> list[Path]:
        """Annotation files the samples were read from (checksummed into the index)."""


class CorpusError(ValueError):
    """The corpus root is not laid out as this reader expects; the message is one line."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# Bytes that UTF-8 text shows when it was decoded once as cp1252/latin-1 ("youâ\x80\x99re").
_MOJIBAKE_MARKERS = ("Ã", "â\x80", "Â", "â€")


def repair_mojibake(text: str) -> tuple[str, bool]:
    """Undo one round of UTF-8-read-as-latin-1/cp1252; returns (text, repaired?)."""
    if not any(m in text for m in _MOJIBAKE_MARKERS):
        return text, False
    for codec in ("cp1252", "latin-1"):
        try:
            fixed = text.encode(codec).decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            continue
        if fixed != text:
            return fixed, True
    return text, False


def clean_text(raw: Union[str, bytes]) -> tuple[Optional[str], str]:
    """Validate a target sentence.

    Returns (text, outcome): outcome is 'ok', 'repaired' (mojibake undone), or a reject reason
    ('non-UTF-8 text', 'empty text') with text None.
    """
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None, "non-UTF-8 text"
    text = " ".join(raw.split())
    if not text:
        return None, "empty text"
    text, repaired = repair_mojibake(text)
    return text, "repaired" if repaired else "ok"


def safe_key(sample_id: str) -> str:
    """A WebDataset key for an id: WebDataset cuts keys at the first dot, and '/' would make
    a member path, so both are replaced; a short hash keeps distinct ids distinct."""
    cleaned = "".join(c if (c.isalnum() or c in "-_") else "_" for c in sample_id)
    if cleaned == sample_id:
        return cleaned
    return f"{cleaned}_{hashlib.sha1(sample_id.encode('utf-8')).hexdigest()[:8]}"


SPLIT_ALIASES = {"train": "train", "dev": "dev", "val": "dev", "valid": "dev", "validation": "dev", "test": "test"}


def canonical_split(split: str) -> str:
    try:
        return SPLIT_ALIASES[split.lower()]
    except KeyError:
        raise CorpusError(f"unknown split '{split}' (expected train, dev or test)") from None
