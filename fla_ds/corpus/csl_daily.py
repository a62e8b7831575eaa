"""CSL-Daily (Chinese sign language -> Chinese), read as the release lays it out.

    sentence/frames_512x512/<name>/*.jpg        (some copies: sentence_frames-512x512/frames_512x512/)
    sentence_label/csl2020ct_v2.pkl             {"info": [{"name", "length", "label_gloss", "label_word", ...}]}
    sentence_label/split_1.txt                  "|"-separated, header name|split

The split file decides membership and order; the label pickle gives the sentence. The target
is ``label_word`` (the sentence segmented into words) joined with no separator: Chinese is
written without spaces and CSL-Daily is scored per character, so spaces between words would
only add tokens that no reference contains. A video listed in the split file without a label
(``S000005_P0004_T00`` in several releases) is still yielded, with empty text and
``meta["label_missing"] = True``, so that the shard builder rejects and counts it.

The pickle is the corpus's own format and is loaded only from the user's corpus root, with an
unpickler that refuses every global except a few plain builtins, so a hostile file cannot run
code.
"""
from __future__ import annotations

import builtins
import csv
import pickle
import re
from collections.abc import Iterator
from pathlib import Path

from fla_ds.corpus.base import CorpusError, CorpusSample, FrameFolder, canonical_split
from fla_ds.corpus.files import corpus_root, printable, read_table, require_file, text_or_bytes

LABEL_FILE = Path("sentence_label/csl2020ct_v2.pkl")
SPLIT_FILE = Path("sentence_label/split_1.txt")
FRAME_DIRS = (
    Path("sentence/frames_512x512"),
    Path("sentence_frames-512x512/frames_512x512"),
    Path("sentence/sentence_frames-512x512/frames_512x512"),
    Path("frames_512x512"),
)
# Names are S<sentence>_P<signer>_T<take>.
SIGNER_IN_NAME = re.compile(r"_(P\d+)_")


class RestrictedUnpickler(pickle.Unpickler):
    """Loads plain data only: every global (the way a pickle names a callable to run) is
    refused unless it is one of these inert builtin containers."""

    ALLOWED = frozenset({"set", "frozenset", "bytearray"})

    def __init__(self, file, path: Path):
        # surrogateescape: Python 2 str fields that are not UTF-8 survive as lone surrogates,
        # and come out as bytes via text_or_bytes, instead of failing the whole file.
        super().__init__(file, encoding="utf-8", errors="surrogateescape")
        self.path = path

    def find_class(self, module: str, name: str):
        # Protocols 0-1 name the builtins module as Python 2 did.
        if module in ("builtins", "__builtin__") and name in self.ALLOWED:
            return getattr(builtins, name)
        raise CorpusError(f"{self.path}: refusing to load '{module}.{name}' from a label pickle (plain data only)")


def load_label_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            data = RestrictedUnpickler(f, path).load()
    except CorpusError:
        raise
    except Exception as exc:  # truncated or not a pickle: any of a dozen exception types
        raise CorpusError(f"{path}: not a readable label pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("info"), list):
        raise CorpusError(f"{path}: expected a dict whose key 'info' is a list of label records")
    return data


def labels_by_name(path: Path) -> dict[str, dict]:
    labels = {}
    for i, record in enumerate(load_label_pickle(path)["info"]):
        if not isinstance(record, dict) or "name" not in record:
            raise CorpusError(f"{path}: info[{i}] is not a label record with a 'name'")
        labels[str(record["name"])] = record
    return labels


def sentence_text(words) -> str | bytes:
    """``label_word`` joined without spaces (see the module docstring)."""
    if words is None:
        return ""
    if isinstance(words, (bytes, bytearray)):
        return bytes(words)
    if isinstance(words, str):
        return text_or_bytes(words)
    parts = [w.decode("utf-8", "surrogateescape") if isinstance(w, (bytes, bytearray)) else str(w) for w in words]
    return text_or_bytes("".join(parts))


def find_frames_root(root: Path) -> Path:
    for relative in FRAME_DIRS:
        if (root / relative).is_dir():
            return root / relative
    tried = ", ".join(str(root / r) for r in FRAME_DIRS)
    raise CorpusError(f"csl-daily: no frame folder found (tried {tried})")


class CSLDailyReader:
    name = "csl-daily"
    language = "zh"  # spoken-language side: Chinese

    def __init__(self, root: str, split: str):
        self.split = canonical_split(split)
        root_path = corpus_root(root, self.name)
        self.label_file = require_file(root_path / LABEL_FILE, self.name, "label file")
        self.split_file = require_file(root_path / SPLIT_FILE, self.name, "split file")
        self.frames_root = find_frames_root(root_path)

    def split_names(self) -> Iterator[str]:
        for line, row in read_table(self.split_file, "|", csv.QUOTE_NONE, required=("name", "split")):
            try:
                split = canonical_split(row["split"].strip())
            except CorpusError as exc:
                raise CorpusError(f"{self.split_file} line {line}: {exc}") from None
            if split == self.split:
                yield row["name"].strip()

    def samples(self) -> Iterator[CorpusSample]:
        labels = labels_by_name(self.label_file)
        for name in self.split_names():
            record = labels.get(name)
            meta: dict = {}
            if signer := SIGNER_IN_NAME.search(name):
                meta["signer"] = signer.group(1)
            if record is None:
                meta["label_missing"] = True
            elif isinstance(record.get("length"), int):
                meta["length"] = record["length"]
            yield CorpusSample(
                id=printable(name),
                frames=FrameFolder(str(self.frames_root / name), "*.jpg"),
                text=sentence_text(record.get("label_word")) if record else "",
                meta=meta,
            )

    def source_files(self) -> list[Path]:
        return [self.split_file, self.label_file]
