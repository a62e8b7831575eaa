"""What the corpus readers share: finding a corpus's files and reading its annotation tables.

Annotation files are user data. One sentence that is not UTF-8 must neither make the whole
file unreadable nor be silently altered: it has to reach the shard builder as ``bytes`` so
that it is rejected and counted there. So a file is read as bytes and decoded with
``surrogateescape`` (lossless: each undecodable byte becomes one lone surrogate), split into
fields by the csv module, and a field is turned back into its original bytes only if it holds
such a surrogate (``text_or_bytes``). Ids and meta values must be JSON-serialisable, so there
the same bytes are shown as ``\\xNN`` escapes instead (``printable``).
"""
from __future__ import annotations

import codecs
import csv
import io
import math
from pathlib import Path
from typing import Iterator, Union

from fla_ds.corpus.base import CorpusError


def corpus_root(root: str, reader: str) -> Path:
    """The corpus root as an absolute path (worker processes must not depend on the cwd)."""
    if not str(root).strip():
        raise CorpusError(f"{reader}: corpus.root is not set")
    path = Path(root).expanduser().absolute()
    if not path.exists():
        raise CorpusError(f"{reader}: corpus root not found: {path}")
    return path


def require_file(path: Path, reader: str, what: str) -> Path:
    if not path.is_file():
        raise CorpusError(f"{reader}: {what} not found: {path}")
    return path


def require_dir(path: Path, reader: str, what: str) -> Path:
    if not path.is_dir():
        raise CorpusError(f"{reader}: {what} not found: {path}")
    return path


def decode_lossless(data: bytes) -> str:
    if data.startswith(codecs.BOM_UTF8):  # spreadsheet exports start with one
        data = data[len(codecs.BOM_UTF8):]
    return data.decode("utf-8", "surrogateescape")


def _original_bytes(value: str) -> bytes:
    try:
        return value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate written as a JSON \\udXXX escape
        return value.encode("utf-8", "surrogatepass")


def _is_clean(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def text_or_bytes(value: str) -> Union[str, bytes]:
    """The field as str, or as its original bytes when it was not valid UTF-8."""
    return value if _is_clean(value) else _original_bytes(value)


def printable(value: str) -> str:
    """The field as a JSON-safe str; bytes that were not UTF-8 appear as ``\\xNN``."""
    if _is_clean(value):
        return value
    return _original_bytes(value).decode("utf-8", "backslashreplace")


def json_safe(value):
    """``printable`` applied to every string inside a JSON-like value (meta must serialise)."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    if isinstance(value, dict):
        return {printable(str(k)): json_safe(v) for k, v in value.items()}
    return value


def read_table(
    path: Path, delimiter: str, quoting: int = csv.QUOTE_MINIMAL, required: tuple[str, ...] = ()
) -> Iterator[tuple[int, dict[str, str]]]:
    """Rows of a delimited file with a header, as (line number, {column: field}).

    Line endings may be LF or CRLF. Fully blank lines are skipped; a row with a different
    number of fields than the header, or a header without a ``required`` column, is a
    CorpusError naming the file and line, since no reader can guess what such a row means.
    """
    text = decode_lossless(path.read_bytes())
    # newline="" keeps the csv module in charge of line endings, including quoted newlines.
    rows = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    header = next(rows, None)
    if header is None:
        raise CorpusError(f"{path}: empty file (expected a header line)")
    header = [h.strip() for h in header]
    for column in required:
        if column not in header:
            raise CorpusError(f"{path} line 1: header has no column '{column}'")
    for fields in rows:
        if not fields or fields == [""]:
            continue
        if len(fields) != len(header):
            raise CorpusError(
                f"{path} line {rows.line_num}: {len(fields)} fields where the header has {len(header)}"
            )
        yield rows.line_num, dict(zip(header, fields))


def parse_seconds(value, path: Path, line: int, column: str) -> float:
    """A time in seconds; anything else (text, true/false, nan, inf) is a CorpusError, because
    the shard builder would cut the wrong part of a video with it."""
    try:
        if isinstance(value, bool):
            raise ValueError
        seconds = float(value)
        if not math.isfinite(seconds):
            raise ValueError
    except (TypeError, ValueError):
        raise CorpusError(f"{path} line {line}: column '{column}' is not a number of seconds: {value!r}") from None
    return seconds
