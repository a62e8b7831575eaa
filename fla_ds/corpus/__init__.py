"""Corpus readers: each lists one split of a corpus, as its release lays it out on disk.

``open_corpus(cfg.corpus)`` picks the reader named by ``corpus.name``. Every reader has
``name``, ``samples()`` (``CorpusSample`` records in the corpus's own order) and
``source_files()`` (the annotation files read, checksummed into the shard index). Readers read
annotation files only and never reject a sample; see ``fla_ds.corpus.base``.
"""
from __future__ import annotations

from collections.abc import Callable

from fla_ds.corpus.base import CorpusError, CorpusReader, CorpusSample, FrameFolder, VideoFile
from fla_ds.corpus.csl_daily import CSLDailyReader
from fla_ds.corpus.how2sign import How2SignReader
from fla_ds.corpus.manifest import ManifestReader, SyntheticReader
from fla_ds.corpus.phoenix14t import Phoenix14TReader

READERS: dict[str, type] = {
    "phoenix14t": Phoenix14TReader,
    "csl-daily": CSLDailyReader,
    "how2sign": How2SignReader,
    "manifest": ManifestReader,
    "synthetic": SyntheticReader,
}

# Options that only one corpus has live in the shared CorpusConfig under a prefixed name.
_OPTIONS: dict[str, Callable] = {
    "how2sign": lambda cfg: {"clips": cfg.how2sign_clips, "raw_videos": cfg.how2sign_raw_videos},
}


def open_corpus(cfg) -> CorpusReader:
    """The reader for a CorpusConfig (name, root, split and the corpus-specific options)."""
    name = str(cfg.name).strip().lower()
    if name not in READERS:
        raise CorpusError(f"unknown corpus '{cfg.name}' (valid: {', '.join(READERS)})")
    options = _OPTIONS[name](cfg) if name in _OPTIONS else {}
    return READERS[name](cfg.root, cfg.split, **options)


__all__ = ["READERS", "open_corpus", "CorpusError", "CorpusSample", "FrameFolder", "VideoFile"]
