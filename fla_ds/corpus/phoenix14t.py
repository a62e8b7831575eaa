"""RWTH-PHOENIX-Weather 2014 T (German sign language -> German), read as the release lays it out.

    PHOENIX-2014-T-release-v3/PHOENIX-2014-T/
        annotations/manual/PHOENIX-2014-T.{train,dev,test}.corpus.csv
        features/fullFrame-210x260px/{train,dev,test}/<name>/images0001.png ...

The CSV is ``|``-separated with header ``name|video|start|end|speaker|orth|translation``.
``translation`` is the target; ``orth`` (glosses) is ignored: this is gloss-free translation.
``video`` is a legacy pattern (``<name>/1/*.png``) that does not match the release, whose
frames lie directly in ``<name>/``, so the folder is built from ``name`` instead.
"""
from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

from fla_ds.corpus.base import CorpusError, CorpusSample, FrameFolder, canonical_split
from fla_ds.corpus.files import corpus_root, printable, read_table, require_dir, require_file, text_or_bytes

RELEASE_DIR = "PHOENIX-2014-T-release-v3"
INNER_DIR = "PHOENIX-2014-T"
ANNOTATION_DIR = Path("annotations/manual")
FRAMES_DIR = Path("features/fullFrame-210x260px")


def find_inner_folder(root: Path) -> Path:
    """Users point at the folder holding the release, the release folder, or the inner
    ``PHOENIX-2014-T`` folder; all three are accepted."""
    candidates = [root / RELEASE_DIR / INNER_DIR, root / INNER_DIR, root]
    for folder in candidates:
        if (folder / ANNOTATION_DIR).is_dir():
            return folder
    tried = ", ".join(str(c / ANNOTATION_DIR) for c in candidates)
    raise CorpusError(f"phoenix14t: no annotation folder found (tried {tried})")


class Phoenix14TReader:
    name = "phoenix14t"
    language = "de"

    def __init__(self, root: str, split: str):
        self.split = canonical_split(split)
        inner = find_inner_folder(corpus_root(root, self.name))
        self.annotation = require_file(
            inner / ANNOTATION_DIR / f"PHOENIX-2014-T.{self.split}.corpus.csv", self.name, "annotation file"
        )
        self.frames_root = require_dir(inner / FRAMES_DIR / self.split, self.name, "frame folder")

    def samples(self) -> Iterator[CorpusSample]:
        # QUOTE_NONE: the release never quotes, so a '"' in a sentence is a literal character.
        rows = read_table(self.annotation, "|", csv.QUOTE_NONE, required=("name", "speaker", "translation"))
        for _, row in rows:
            yield CorpusSample(
                id=printable(row["name"]),
                frames=FrameFolder(str(self.frames_root / row["name"]), "*.png"),
                text=text_or_bytes(row["translation"]),
                meta={"signer": printable(row["speaker"])},
            )

    def source_files(self) -> list[Path]:
        return [self.annotation]
