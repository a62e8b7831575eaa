"""How2Sign (American sign language -> English), read as the release lays it out.

Annotations: ``how2sign_realigned_{train,val,test}.csv``, TAB-separated, with standard CSV
quoting (sentences holding quotes are quoted, inner quotes doubled), times in seconds:

    VIDEO_ID  VIDEO_NAME  SENTENCE_ID  SENTENCE_NAME  START_REALIGNED  END_REALIGNED  SENTENCE

Two kinds of users, two ways to the frames: pre-cut clips ``<clips>/<SENTENCE_NAME>.mp4``
(``corpus.how2sign_clips``), or raw videos ``<raw>/<VIDEO_NAME>.mp4`` cut by the re-aligned
times (``corpus.how2sign_raw_videos``, the official advice). Rows whose video is missing are
still yielded, mojibake (``youâ\\x80\\x99re``) is passed on unrepaired, and times are passed on
as written (also in ``meta``): the shard builder rejects, repairs and counts all of them in
one place (a negative start clamped, an empty cut rejected, an end past the video clamped).
The file is read by ``fla_ds.corpus.files.read_table`` (one row per line, strict quoting).
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from fla_ds.corpus.base import CorpusError, CorpusSample, VideoFile, canonical_split
from fla_ds.corpus.files import (
    corpus_root,
    parse_seconds,
    printable,
    read_table,
    require_dir,
    text_or_bytes,
)

COLUMNS = ("VIDEO_ID", "VIDEO_NAME", "SENTENCE_ID", "SENTENCE_NAME", "START_REALIGNED", "END_REALIGNED", "SENTENCE")
FILE_SPLIT = {"train": "train", "dev": "val", "test": "test"}
SEARCH_DEPTH = 3
"""Annotation files are looked for in root and up to two folder levels below it, since
releases unpack them into differently named subfolders."""


def find_annotation(root: Path, split: str) -> Path:
    filename = f"how2sign_realigned_{FILE_SPLIT[split]}.csv"
    for depth in range(SEARCH_DEPTH):
        matches = sorted(p for p in root.glob("*/" * depth + filename) if p.is_file())
        if matches:
            return matches[0]
    raise CorpusError(f"how2sign: annotation file {filename} not found in {root} or {SEARCH_DEPTH - 1} levels below")


class How2SignReader:
    name = "how2sign"
    language = "en"

    def __init__(self, root: str, split: str, clips: str = "clips", raw_videos: str = ""):
        self.split = canonical_split(split)
        root_path = corpus_root(root, self.name)
        self.annotation = find_annotation(root_path, self.split)
        self.raw_videos = bool(raw_videos)
        folder, what = (raw_videos, "raw video folder") if raw_videos else (clips, "clip folder")
        self.video_root = require_dir(root_path / folder, self.name, what)

    def video(self, row: dict, start: float, end: float) -> VideoFile:
        if self.raw_videos:
            return VideoFile(str(self.video_root / f"{row['VIDEO_NAME']}.mp4"), start, end)
        return VideoFile(str(self.video_root / f"{row['SENTENCE_NAME']}.mp4"))

    def samples(self) -> Iterator[CorpusSample]:
        for line, row in read_table(self.annotation, "\t", required=COLUMNS):
            start = parse_seconds(row["START_REALIGNED"], self.annotation, line, "START_REALIGNED")
            end = parse_seconds(row["END_REALIGNED"], self.annotation, line, "END_REALIGNED")
            yield CorpusSample(
                id=printable(row["SENTENCE_NAME"]),
                frames=self.video(row, start, end),
                text=text_or_bytes(row["SENTENCE"]),
                meta={
                    "video_id": printable(row["VIDEO_ID"]),
                    "video_name": printable(row["VIDEO_NAME"]),
                    "sentence_id": printable(row["SENTENCE_ID"]),
                    "start": start,
                    "end": end,
                },
            )

    def source_files(self) -> list[Path]:
        return [self.annotation]
