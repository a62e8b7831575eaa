"""How translations are written: ``hypotheses.tsv`` (``fla-ds evaluate``, training-time
evaluation) and ``fla-ds translate``'s output, as TSV or JSON Lines.

TSV follows the "linear TSV" convention (as PostgreSQL's COPY text format and
https://paulfitz.github.io/dataprotocols/linear-tsv/ write it): one record per line, fields
separated by one TAB, and inside a field ``\\`` ``TAB`` ``LF`` ``CR`` written as ``\\\\``
``\\t`` ``\\n`` ``\\r``, so that a file name or a reference holding any of them still
reads back as the same fields. Hypotheses themselves never hold them (the translators
normalise whitespace, fla_ds/translator.py), so for them the escaping never shows. JSON Lines
(``--format jsonl``): one JSON object per line, UTF-8, nothing escaped beyond JSON's rules.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

FORMATS = ("tsv", "jsonl")
_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_UNESCAPES = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}


def escape_field(text: str) -> str:
    """One TSV field: backslash, TAB, LF and CR escaped (``"a\\tb"`` -> ``"a\\\\tb"``)."""
    return "".join(_ESCAPES.get(ch, ch) for ch in text)


def unescape_field(field: str) -> str:
    """The inverse of ``escape_field``. Raises ValueError on a backslash escape it never writes."""
    out, chars = [], iter(field)
    for ch in chars:
        if ch != "\\":
            out.append(ch)
            continue
        nxt = next(chars, "")
        if nxt not in _UNESCAPES:
            raise ValueError(f"unknown escape '\\{nxt}' in TSV field {field[:60]!r}")
        out.append(_UNESCAPES[nxt])
    return "".join(out)


def format_records(columns: Sequence[str], rows: Iterable[Sequence[str]], fmt: str = "tsv", header: bool = True) -> Iterable[str]:
    """Lines (without line ends) for ``rows`` in ``fmt``: a TSV header line (when ``header``)
    then one escaped line per row, or one JSON object per row keyed by ``columns``."""
    if fmt not in FORMATS:
        raise ValueError(f"output format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if fmt == "tsv":
        if header:
            yield "\t".join(columns)
        for row in rows:
            yield "\t".join(escape_field(str(v)) for v in row)
    else:
        for row in rows:
            yield json.dumps(dict(zip(columns, row)), ensure_ascii=False)


def read_tsv(path: str | Path) -> list[dict[str, str]]:
    """A TSV written by ``format_records`` (with its header) as one dict per row. Raises
    ValueError naming the file and line where a row has the wrong number of fields."""
    lines = Path(path).read_text("utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise ValueError(f"{path}: empty (no header line)")
    columns = lines[0].split("\t")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != len(columns):
            raise ValueError(f"{path}: line {number} has {len(fields)} fields, the header {len(columns)}")
        rows.append({c: unescape_field(f) for c, f in zip(columns, fields)})
    return rows
