"""A corpus described by a manifest: a user's own data, and the synthetic corpus.

``corpus.root`` is either a folder holding ``{split}.jsonl`` or ``{split}.csv`` (``val`` and
``valid`` name the dev split too), or one ``.jsonl``/``.csv`` file for all splits. Each row:

    id       required
    video    a video file  } exactly one of the two
    frames   a folder of images (PNG/JPEG), read in natural name order  }
    text     required; the target sentence
    signer   optional
    start, end   optional, seconds, only with video: the clip is cut to [start, end)
    split    optional: a row whose split is another one is skipped; without it, every row
             belongs to the split asked for
    anything else goes to the sample's meta

Relative paths are relative to the manifest file's folder, so a corpus folder can be moved.
CSV files have a header row and standard quoting, one row per line (the rules of
``fla_ds.corpus.files.read_table``: an unterminated quote is an error naming its line); an
empty cell counts as absent (except ``text``, where it is an empty sentence for the builder to
reject). Ids are kept as written (any Unicode; surrounding spaces trimmed); the shard key is the
builder's business (``fla_ds.corpus.base.safe_key``). Times are passed on as written: the
builder clamps a negative start and rejects an empty cut. JSON lines are parsed with
``json.loads`` and nothing else. A row that lacks a required column is a CorpusError naming the
file, the line and the column: the manifest is wrong, not the sample.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from fla_ds.corpus.base import SPLIT_ALIASES, CorpusError, CorpusSample, FrameFolder, FrameSource, VideoFile, canonical_split
from fla_ds.corpus.files import corpus_root, decode_lossless, json_safe, parse_seconds, printable, read_table, text_or_bytes

FORMATS = (".jsonl", ".csv")
KNOWN_COLUMNS = {"id", "video", "frames", "text", "signer", "start", "end", "split"}


def find_manifest(root: Path, split: str) -> Path:
    """The manifest file of ``split``: root itself, or the one ``<alias>.<format>`` in root."""
    if root.is_file():
        if root.suffix.lower() not in FORMATS:
            raise CorpusError(f"manifest: {root} is neither a .jsonl nor a .csv file")
        return root
    aliases = [alias for alias, canonical in SPLIT_ALIASES.items() if canonical == split]
    found = [root / f"{a}{ext}" for a in aliases for ext in FORMATS if (root / f"{a}{ext}").is_file()]
    if len(found) > 1:
        raise CorpusError(f"manifest: several manifests for split '{split}' in {root}: {', '.join(p.name for p in found)}")
    if not found:
        raise CorpusError(f"manifest: no {split}.jsonl or {split}.csv in {root}")
    return found[0]


def jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    # Split on "\n" only: str.splitlines would also cut at U+2028 and friends, which JSON
    # allows unescaped inside strings.
    for number, line in enumerate(decode_lossless(path.read_bytes(), path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"{path} line {number}: not valid JSON ({exc.msg})") from None
        except ValueError as exc:  # from the hooks: a repeated key, NaN or Infinity
            raise CorpusError(f"{path} line {number}: {exc}") from None
        except RecursionError:
            raise CorpusError(f"{path} line {number}: JSON nested too deeply") from None
        if not isinstance(row, dict):
            raise CorpusError(f"{path} line {number}: expected a JSON object")
        yield number, row


def _unique_keys(pairs: list) -> dict:
    """json object hook: a key given twice in one row is an error (json keeps the last one
    silently, which would give one sample another row's value)."""
    row = {}
    for key, value in pairs:
        if key in row:
            raise ValueError(f"key {key!r} appears twice in one row")
        row[key] = value
    return row


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def csv_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """CSV rows with empty cells dropped, so that both formats mean 'absent' the same way."""
    for number, row in read_table(path, ","):
        yield number, {k: v for k, v in row.items() if v != "" or k == "text"}


def present(row: dict, key: str) -> bool:
    return row.get(key) not in (None, "")


class ManifestReader:
    name = "manifest"
    language = ""  # an own corpus names its language in corpus.language

    def __init__(self, root: str, split: str):
        self.split = canonical_split(split)
        self.manifest = find_manifest(corpus_root(root, self.name), self.split)
        self.base = self.manifest.parent

    def rows(self) -> Iterator[tuple[int, dict]]:
        if self.manifest.suffix.lower() == ".jsonl":
            return jsonl_rows(self.manifest)
        return csv_rows(self.manifest)

    def error(self, line: int, message: str) -> CorpusError:
        return CorpusError(f"{self.manifest} line {line}: {message}")

    def belongs_to_split(self, row: dict, line: int) -> bool:
        if not present(row, "split"):
            return True
        try:
            return canonical_split(str(row["split"]).strip()) == self.split
        except CorpusError as exc:
            raise self.error(line, str(exc)) from None

    def media_path(self, value: str) -> str:
        path = Path(value)
        return str(path if path.is_absolute() else self.base / path)

    def frame_source(self, row: dict, line: int) -> FrameSource:
        has_video, has_frames = present(row, "video"), present(row, "frames")
        if has_video == has_frames:
            problem = "both 'video' and 'frames'" if has_video else "missing column 'video' or 'frames'"
            raise self.error(line, f"{problem} (give exactly one)")
        if has_frames and (present(row, "start") or present(row, "end")):
            raise self.error(line, "'start'/'end' apply only to 'video', not to 'frames'")
        key = "video" if has_video else "frames"
        if not isinstance(row[key], str):
            raise self.error(line, f"column '{key}' is not a path")
        path = self.media_path(row[key])
        if has_frames:
            return FrameFolder(path)
        return VideoFile(path, self.seconds(row, line, "start"), self.seconds(row, line, "end"))

    def seconds(self, row: dict, line: int, column: str) -> float | None:
        return parse_seconds(row[column], self.manifest, line, column) if present(row, column) else None

    def sample_id(self, row: dict, line: int) -> str:
        value = row.get("id")
        if value is None or (isinstance(value, str) and not value.strip()):
            raise self.error(line, "missing column 'id'")
        if isinstance(value, bool) or not isinstance(value, (str, int)):  # ints: ids like 17
            raise self.error(line, "column 'id' is not a string")
        return printable(str(value).strip())

    def text(self, row: dict, line: int):
        value = row.get("text")
        if value is None:
            raise self.error(line, "missing column 'text'")
        if not isinstance(value, str):
            raise self.error(line, "column 'text' is not a string")
        return text_or_bytes(value)

    def meta(self, row: dict, line: int) -> dict:
        """Extra columns, the signer, and the cut's times as the manifest gives them (the
        builder may clamp the cut it reads; the annotation's own times stay here)."""
        meta = {printable(str(k)): json_safe(v) for k, v in row.items() if k not in KNOWN_COLUMNS}
        if present(row, "signer"):
            meta["signer"] = json_safe(str(row["signer"]))
        for column in ("start", "end"):
            if present(row, column):
                meta[column] = self.seconds(row, line, column)
        return meta

    def samples(self) -> Iterator[CorpusSample]:
        for line, row in self.rows():
            if not self.belongs_to_split(row, line):
                continue
            yield CorpusSample(
                id=self.sample_id(row, line),
                frames=self.frame_source(row, line),
                text=self.text(row, line),
                meta=self.meta(row, line),
            )

    def source_files(self) -> list[Path]:
        return [self.manifest]


class SyntheticReader(ManifestReader):
    """The synthetic corpus (``fla-ds synth``) is written in manifest layout; only the name
    recorded in the shard index differs."""

    name = "synthetic"
    language = "de"  # PHOENIX-2014T's sentences
