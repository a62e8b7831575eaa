"""What every corpus reader yields, and the text checks shared by all of them.

A reader lists the samples of one split as ``CorpusSample`` records; it reads only annotation
files (cheap). Frames are decoded later, in the shard builder's worker processes, from the
``FrameSource`` each record names. Readers never reject: they report what they found (raw
bytes for text that is not UTF-8, a missing path as a path) and the builder decides, so that
every outcome is counted in one place.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

LANGUAGE_CODE = re.compile(r"[a-z]{2,3}(-[A-Za-z0-9]{2,8})?")
"""An ISO 639 language code, optionally with a region or script (de, zh, pt-BR, zh-Hans)."""


@dataclass(frozen=True)
class FrameFolder:
    """A folder of image files (PNG/JPEG), read in natural (numeric-aware) name order;
    ``pattern`` is matched against file names case-insensitively (fla_ds.frame_folder)."""

    path: str
    pattern: str = "*"


@dataclass(frozen=True)
class VideoFile:
    """A video file, whole, or cut to [start, end) seconds (How2Sign raw videos)."""

    path: str
    start: float | None = None
    end: float | None = None


FrameSource = FrameFolder | VideoFile


@dataclass(frozen=True)
class CorpusSample:
    id: str
    frames: FrameSource
    text: str | bytes
    """The target sentence; bytes when the annotation was not valid UTF-8 (rejected later)."""
    meta: dict = field(default_factory=dict)
    """Signer, original times, corpus-specific fields; JSON-serialisable."""


class CorpusReader(Protocol):
    name: str
    language: str
    """ISO 639-1 code of the texts' language (de, zh, en), or "" when the layout does not say
    (a manifest: ``corpus.language`` names it). Recorded in the shard index; stage 2's default
    prompt follows it."""

    def samples(self) -> Iterator[CorpusSample]:
        """The samples of the configured split, in the corpus's own order."""

    def source_files(self) -> list[Path]:
        """Annotation files the samples were read from (checksummed into the index)."""


class CorpusError(ValueError):
    """The corpus root is not laid out as this reader expects; the message is one line."""


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


def clean_text(raw: str | bytes) -> tuple[str | None, str]:
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


KEY_PREFIX_MAX = 100
"""Characters of an id kept in its shard key before the hash (tar member names stay short)."""
_KEY_CHARS = re.compile(r"[A-Za-z0-9_-]+")


def _ascii_form(sample_id: str) -> str:
    """The id's ASCII look-alike: accents stripped (NFKD without combining marks), other
    ASCII punctuation as '_', letters without an ASCII form (ß, 手) dropped."""
    out = []
    for c in unicodedata.normalize("NFKD", sample_id):
        if c.isascii():
            out.append(c if _KEY_CHARS.fullmatch(c) else "_")
        # non-ASCII: a combining mark or a letter with no ASCII decomposition; dropped
    return "".join(out)


def safe_key(sample_id: str) -> str:
    """The WebDataset key (tar member name stem) of a sample id; the id itself travels unchanged
    in the sample's json.

    An id that is already ``[A-Za-z0-9_-]{1,100}`` and does not start with ``__`` is its own key
    (every PHOENIX, CSL-Daily and How2Sign id). Any other id (dots, slashes, spaces, non-ASCII
    letters, NFC or NFD alike) becomes its ASCII form (``_ascii_form``, leading underscores cut to
    one, at most ``KEY_PREFIX_MAX`` characters) plus ``_`` and 8 hex digits of the SHA-1 of its
    UTF-8 bytes: ``über-straße`` -> ``uber-strae_<hash>``, ``手语句子`` -> ``<hash>``. WebDataset
    cuts keys at the first dot, '/' would make a member path, and it reserves keys starting with
    ``__``. The result is never empty and matches ``[A-Za-z0-9_-]+``. Two ids can still share a
    key (a hash collision, or an id that spells another's hashed key); the shard builder's
    planning (``check_samples``) gives the later one a distinct key, so the keys of one build are
    always distinct.
    """
    if _KEY_CHARS.fullmatch(sample_id) and not sample_id.startswith("__") and len(sample_id) <= KEY_PREFIX_MAX:
        return sample_id
    digest = hashlib.sha1(sample_id.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    prefix = re.sub(r"^_+", "_", _ascii_form(sample_id))[:KEY_PREFIX_MAX]
    return f"{prefix}_{digest}" if prefix.strip("_") else digest


SPLIT_ALIASES = {"train": "train", "dev": "dev", "val": "dev", "valid": "dev", "validation": "dev", "test": "test"}


def canonical_split(split: str) -> str:
    try:
        return SPLIT_ALIASES[split.lower()]
    except KeyError:
        raise CorpusError(f"unknown split '{split}' (expected train, dev or test)") from None
