"""What the corpus readers share: finding a corpus's files and reading its annotation tables.

Annotation files are user data. One sentence that is not UTF-8 must neither make the whole
file unreadable nor be silently altered: it has to reach the shard builder as ``bytes`` so
that it is rejected and counted there. So a file is read as bytes and decoded with
``surrogateescape`` (lossless: each undecodable byte becomes one lone surrogate), split into
fields by the csv module, and a field is turned back into its original bytes only if it holds
such a surrogate (``text_or_bytes``). Ids and meta values must be JSON-serialisable, so there
the same bytes are shown as ``\\xNN`` escapes instead (``printable``).

Delimited tables (PHOENIX, How2Sign, CSL-Daily's split file, CSV manifests) are parsed one line
at a time by the csv module in strict mode (``read_table`` lists the rules): one row is one
line, so a stray quote is an error naming its line instead of a field that silently swallows
the rows after it.
"""
from __future__ import annotations

import codecs
import csv
import io
import math
import re
from collections.abc import Iterator
from pathlib import Path

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


def decode_lossless(data: bytes, path: Path | None = None) -> str:
    """An annotation file's bytes as str, losslessly (module docstring). Raises CorpusError for
    UTF-16/32, which spreadsheet programs write as "Unicode text" (every other byte NUL)."""
    for bom, name in ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"), (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16")):
        if data.startswith(bom):
            raise CorpusError(f"{path or 'annotation file'}: is {name} text; save it as UTF-8")
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


def text_or_bytes(value: str) -> str | bytes:
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


class _OneLine:
    """The input of a csv reader that gets one line: it notes whether the reader asked for
    more, which it does only when the line ends inside a quoted field."""

    def __init__(self, line: str):
        self.line: str | None = line
        self.asked_for_more = False

    def __iter__(self):
        return self

    def __next__(self) -> str:
        if self.line is None:
            self.asked_for_more = True
            raise StopIteration
        line, self.line = self.line, None
        return line


def parse_line(
    line: str, path: Path, number: int, delimiter: str, quoting: int, header: list[str] | None = None
) -> list[str]:
    """The fields of one physical line (its line ending included or not).

    Raises CorpusError naming ``path`` and ``number``: for a quote that the line does not close
    (with the column it opened in, when ``header`` is given), and for anything else the csv
    module refuses in strict mode (text after a closing quote, a field over its size limit).
    """
    source = _OneLine(line)
    try:
        return next(csv.reader(source, delimiter=delimiter, quoting=quoting, strict=True), [])
    except csv.Error as exc:
        if not source.asked_for_more:
            raise CorpusError(f"{path} line {number}: not valid CSV ({exc})") from None
    opened = len(next(csv.reader([line], delimiter=delimiter, quoting=quoting), [""]))
    column = f" in column '{header[opened - 1]}'" if header and opened <= len(header) else ""
    raise CorpusError(
        f"{path} line {number}: unterminated quote{column}: the quoted field opened on line {number} is still "
        f"open at the end of that line, where parsing stops (annotation rows are one line each)"
    )


def read_table(
    path: Path, delimiter: str, quoting: int = csv.QUOTE_MINIMAL, required: tuple[str, ...] = ()
) -> Iterator[tuple[int, dict[str, str]]]:
    """Rows of a delimited file with a header, as (line number, {column: field}).

    The rules (README "Building shards"), the same for every annotation table:

    - A UTF-8 BOM is dropped; bytes that are not UTF-8 survive (``decode_lossless``).
    - A line ends at LF, CRLF or a lone CR (what the csv module, Python and spreadsheet programs
      take as a line break; old Mac exports end lines with CR). Line numbers count these.
    - One row is one line. Quoting is standard CSV (``"a ""b"" c"``), strict: a quote that the
      line does not close is a CorpusError naming the file, the line and the column, never a
      field that swallows the rows after it; so is text after a closing quote.
      A sentence that truly holds a line break cannot be written in these formats.
    - Lines holding only whitespace are skipped (they hold no data).
    - A trailing delimiter is ignored: an empty last header name is dropped, and so is an empty
      last field of a row that has one field more than the header. No value changes, so
      nothing is counted.
    - A row with another number of fields, a header naming a column twice, or a header without
      a ``required`` column is a CorpusError naming the file and line: no reader can guess what
      such a row means.

    Raises CorpusError (one line) as above, and for a file without a header line.
    """
    header: list[str] | None = None
    for number, line in enumerate(io.StringIO(decode_lossless(path.read_bytes(), path), newline=""), start=1):
        if not line.strip():
            continue
        fields = parse_line(line, path, number, delimiter, quoting, header)
        if header is None:
            header = [h.strip() for h in fields]
            if len(header) > 1 and header[-1] == "":
                header.pop()
            _check_header(header, path, number, required)
            continue
        if len(fields) == len(header) + 1 and fields[-1] == "":
            fields.pop()
        if len(fields) != len(header):
            raise CorpusError(f"{path} line {number}: {len(fields)} fields where the header has {len(header)}")
        yield number, dict(zip(header, fields))
    if header is None:
        raise CorpusError(f"{path}: empty file (expected a header line)")


def _check_header(header: list[str], path: Path, number: int, required: tuple[str, ...]) -> None:
    for column in required:
        if column not in header:
            raise CorpusError(f"{path} line {number}: header has no column '{column}'")
    for column in header:
        if header.count(column) > 1:
            raise CorpusError(f"{path} line {number}: header names column '{column}' twice")


_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def parse_seconds(value, path: Path, line: int, column: str) -> float:
    """A time in seconds: a number, or text that is a plain ASCII decimal (``2``, `` 2.50 ``,
    ``1e3``); anything else (``1,5``, ``1_0``, other scripts' digits, true/false, nan, inf) is a
    CorpusError, because the shard builder would cut the wrong part of a video with it."""
    try:
        if isinstance(value, bool) or (isinstance(value, str) and not _DECIMAL.fullmatch(value.strip())):
            raise ValueError
        seconds = float(value)
        if not math.isfinite(seconds):
            raise ValueError
    except (TypeError, ValueError):
        raise CorpusError(f"{path} line {line}: column '{column}' is not a number of seconds: {value!r}") from None
    return seconds
