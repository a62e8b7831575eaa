"""fla_ds/hypotheses.py and the translators' whitespace rule: what evaluate and translate write
reads back as the same fields, whatever a field holds."""
from __future__ import annotations

import json

import pytest

from fla_ds.hypotheses import escape_field, format_records, read_tsv, unescape_field
from fla_ds.translator import normalize_whitespace

AWKWARD = ["plain", "a\tb", "two\nlines", "cr\r\nlf", "back\\slash", "\\t literally", "ends with \\", "", "ü 手语 \u00a0nbsp"]


@pytest.mark.parametrize("text", AWKWARD)
def test_a_field_reads_back_as_written(text):
    escaped = escape_field(text)
    assert "\t" not in escaped and "\n" not in escaped and "\r" not in escaped
    assert unescape_field(escaped) == text


def test_escapes_are_the_linear_tsv_ones():
    assert escape_field("a\tb\nc\\d\re") == "a\\tb\\nc\\\\d\\re"


def test_an_escape_it_never_writes_is_refused():
    with pytest.raises(ValueError, match=r"unknown escape '\\x'"):
        unescape_field("a\\xb")


def test_tsv_and_jsonl_records_read_back(tmp_path):
    rows = [(text, f"hyp {i}", text[::-1]) for i, text in enumerate(AWKWARD)]
    path = tmp_path / "h.tsv"
    path.write_text("".join(line + "\n" for line in format_records(("id", "hypothesis", "reference"), rows)), "utf-8")
    assert len(path.read_text("utf-8").split("\n")) == len(rows) + 2  # header, rows, final newline
    assert [(r["id"], r["hypothesis"], r["reference"]) for r in read_tsv(path)] == rows
    lines = list(format_records(("input", "hypothesis"), [(r[0], r[1]) for r in rows], "jsonl"))
    assert [tuple(json.loads(line).values()) for line in lines] == [(r[0], r[1]) for r in rows]


def test_a_row_with_the_wrong_number_of_fields_names_its_line(tmp_path):
    path = tmp_path / "h.tsv"
    path.write_text("id\thypothesis\nx\ty\nbroken\n", "utf-8")
    with pytest.raises(ValueError, match=r"h\.tsv: line 3 has 1 fields, the header 2"):
        read_tsv(path)


@pytest.mark.parametrize("raw, clean", [
    (" leading space from a SentencePiece decode", "leading space from a SentencePiece decode"),
    ("guten abend\n\nund nun das wetter\n", "guten abend und nun das wetter"),
    ("tab\tinside  and   runs", "tab inside and runs"),
    ("\u3000全角\u3000空格\u00a0", "全角 空格"),
    ("", ""),
])
def test_hypotheses_are_whitespace_normalised(raw, clean):
    assert normalize_whitespace(raw) == clean
