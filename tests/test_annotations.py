"""Annotation files read exactly (fla_ds.corpus.files.read_table and the readers on it), ids
kept under their own name in shards (safe_key), and every row adjustment counted in a build.

Files are written as bytes so that BOMs, line endings and broken quotes are exactly what a user
has; builds are real builds (frame folders, real How2Sign clips)."""
from __future__ import annotations

import json
import re
import shutil
import tarfile
import unicodedata
from pathlib import Path

import pytest
from corpus_factory import REAL_CLIPS, write_frames, write_manifest

from fla_ds.cli import main
from fla_ds.config import load_config
from fla_ds.corpus.base import CorpusError, safe_key
from fla_ds.corpus.how2sign import How2SignReader
from fla_ds.corpus.manifest import ManifestReader
from fla_ds.corpus.phoenix14t import Phoenix14TReader
from fla_ds.shards import build_shards, iter_raw_samples, parse_sample

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
H2S_HEADER = "VIDEO_ID\tVIDEO_NAME\tSENTENCE_ID\tSENTENCE_NAME\tSTART_REALIGNED\tEND_REALIGNED\tSENTENCE"
KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")


def h2s_row(name: str, start, end, text: str, video: str = "rawclip") -> str:
    return f"{video}\t{video}\t{name}\t{name}\t{start}\t{end}\t{text}"


def h2s_root(tmp_path: Path, lines: list[str], *, raw=False, ending="\n", prefix=b"") -> Path:
    """A How2Sign root whose test annotation is ``lines`` joined by ``ending`` (written as bytes)."""
    root = tmp_path / "how2sign"
    (root / "clips").mkdir(parents=True, exist_ok=True)
    if raw:
        (root / "raw_videos").mkdir(exist_ok=True)
        shutil.copy(REAL_CLIPS[0], root / "raw_videos" / "rawclip.mp4")
    (root / "how2sign_realigned_test.csv").write_bytes(prefix + ending.join(lines).encode("utf-8") + ending.encode())
    return root


def h2s_samples(root: Path) -> list:
    return list(How2SignReader(str(root), "test").samples())


def index_entry(out: Path, split: str = "train") -> dict:
    return json.loads((out / "index.json").read_text("utf-8"))["splits"][split]


def shard_samples(out: Path) -> dict[str, dict]:
    """{json id: json} of every sample in the folder's shards, and their tar member keys."""
    found = {}
    for shard in sorted(out.glob("*.tar")):
        for raw in iter_raw_samples(str(shard)):
            meta, _ = parse_sample(shard.name, raw)
            found[meta["id"]] = meta
    return found


def no_temporary_files(out: Path) -> bool:
    return not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


# ---------------------------------------------------------------- ids and shard keys

NFC = unicodedata.normalize("NFC", "über-straße")
NFD = unicodedata.normalize("NFD", "über-straße")
AWKWARD_IDS = [
    NFC,
    NFD,  # looks the same, is another id: both kept, each as given
    "手语句子",
    "手语句子-2",
    "__key__",  # WebDataset reserves keys starting with __
    "a.b/c d",
    "x" * 150,
    "x" * 150 + "y",  # same first 100 characters
    "plain_id-1",
    "uber-strae_" + safe_key(NFC)[-8:],  # an ASCII id that spells the NFC id's hashed key
]


@pytest.mark.parametrize(
    "sample_id, key",
    [
        ("_15CDIexNDM_9-5-rgb_front", "_15CDIexNDM_9-5-rgb_front"),
        ("11August_2010_Wednesday_tagesschau-2", "11August_2010_Wednesday_tagesschau-2"),
        ("S000005_P0004_T00", "S000005_P0004_T00"),
        (NFC, "uber-strae_" + __import__("hashlib").sha1(NFC.encode()).hexdigest()[:8]),
        ("手语句子", __import__("hashlib").sha1("手语句子".encode()).hexdigest()[:8]),
        ("has.dots/and slash", "has_dots_and_slash_" + __import__("hashlib").sha1(b"has.dots/and slash").hexdigest()[:8]),
    ],
)
def test_safe_key_keeps_ascii_ids_and_hashes_the_rest(sample_id, key):
    assert safe_key(sample_id) == key


def test_safe_keys_are_valid_bounded_and_distinct():
    keys = [safe_key(i) for i in AWKWARD_IDS[:-1]] + [safe_key(""), safe_key("__"), safe_key("_.")]
    assert all(KEY_RE.match(k) and not k.startswith("__") and len(k) <= 100 + 9 for k in keys), keys
    assert len(set(keys)) == len(keys)
    assert safe_key(NFC) != safe_key(NFD) and safe_key(NFC)[:-8] == safe_key(NFD)[:-8] == "uber-strae_"
    assert safe_key(AWKWARD_IDS[-1]) == safe_key(NFC)  # the clash the builder resolves


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_unicode_and_awkward_ids_are_kept_under_their_own_id(tmp_path, fmt):
    corpus = tmp_path / "corpus"
    write_frames(corpus / "frames" / "f", 3, seed=0)
    rows = [{"id": i, "frames": "frames/f", "text": f"satz {n}"} for n, i in enumerate(AWKWARD_IDS)]
    if fmt == "jsonl":
        manifest = write_manifest(corpus / "train.jsonl", rows)
    else:
        manifest = corpus / "train.csv"
        manifest.write_bytes(("id,frames,text\n" + "".join(f"{r['id']},{r['frames']},{r['text']}\n" for r in rows)).encode())
    out = tmp_path / "out"
    cfg = load_config(None, [f"corpus.root={manifest}", f"shards.out={out}", "shards.samples_per_shard=4"])
    summary = build_shards(cfg, progress_bar=False)
    assert (summary.index["samples"], summary.index["rejected"]) == (len(AWKWARD_IDS), 0)
    kept = shard_samples(out)
    assert sorted(kept) == sorted(AWKWARD_IDS)  # exact strings: NFC and NFD both, as given
    assert {i: kept[i]["text"] for i in AWKWARD_IDS} == {i: f"satz {n}" for n, i in enumerate(AWKWARD_IDS)}
    names = [m.name for shard in out.glob("*.tar") for m in tarfile.open(shard)]
    keys = {n.rsplit(".", 1)[0] for n in names}
    assert len(keys) == len(AWKWARD_IDS) and all(KEY_RE.match(k) and not k.startswith("__") for k in keys)
    assert safe_key(NFC) + "-1" in keys  # the ASCII id that spelled it comes later in the corpus
    assert no_temporary_files(out)


# ---------------------------------------------------------------- quotes


def csv_manifest(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "train.csv"
    path.write_bytes(("\n".join(lines) + "\n").encode("utf-8"))
    return path


@pytest.mark.parametrize("rows_after", [1, 2000])
def test_an_unterminated_quote_names_file_line_and_column(tmp_path, rows_after):
    lines = ["id,frames,text", "k1,f1,hallo", 'k2,f2,"Er sagte hallo'] + [f"k{i},f{i},satz {i}" for i in range(3, 3 + rows_after)]
    manifest = csv_manifest(tmp_path, lines)
    with pytest.raises(CorpusError) as err:
        list(ManifestReader(str(manifest), "train").samples())
    message = str(err.value)
    assert message.startswith(f"{manifest} line 3: unterminated quote in column 'text': the quoted field opened on line 3")
    assert "\n" not in message


def test_an_unterminated_quote_stops_the_build_with_one_line_and_writes_nothing(tmp_path, capsys):
    manifest = csv_manifest(tmp_path, ["id,frames,text", "k1,f1,hallo", 'k2,f2,"Er sagte hallo', "k3,f3,tschüss"])
    out = tmp_path / "out"
    code = main(["shards", "build", "--corpus", "manifest", "--root", str(manifest), "--split", "train", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"{manifest} line 3: unterminated quote in column 'text'" in err
    assert not list(out.glob("*.tar")) and no_temporary_files(out)


def test_an_unterminated_quote_in_how2sign_names_its_line(tmp_path):
    root = h2s_root(tmp_path, [H2S_HEADER, h2s_row("a", 1, 2, "gut"), h2s_row("b", 1, 2, '"He said hi'), h2s_row("c", 1, 2, "also gut")])
    with pytest.raises(CorpusError, match=r"how2sign_realigned_test\.csv line 3: unterminated quote in column 'SENTENCE'"):
        h2s_samples(root)


def test_a_quoted_field_over_a_line_break_is_refused_with_its_line(tmp_path):
    """One row is one line: a real two-line sentence is refused like an unterminated quote."""
    manifest = csv_manifest(tmp_path, ["id,frames,text", 'k1,f1,"zwei', 'zeilen"', "k2,f2,gut"])
    with pytest.raises(CorpusError, match=r"line 2: unterminated quote in column 'text'"):
        list(ManifestReader(str(manifest), "train").samples())


def test_text_after_a_closing_quote_names_its_line(tmp_path):
    manifest = csv_manifest(tmp_path, ["id,frames,text", "k1,f1,gut", 'k2,f2,"Hallo" sagte er'])
    with pytest.raises(CorpusError, match=r"train\.csv line 3: not valid CSV \(',' expected after '\"'\)$"):
        list(ManifestReader(str(manifest), "train").samples())


def test_quotes_that_are_text_or_proper_quoting_are_kept(tmp_path):
    manifest = csv_manifest(
        tmp_path,
        ["id,frames,text", 'k1,f1,Er sagte "hallo', 'k2,f2,"a ""b"" c"', 'k3,f3,"mit, komma"', "k4,f4,'einfach'"],
    )
    texts = [s.text for s in ManifestReader(str(manifest), "train").samples()]
    assert texts == ['Er sagte "hallo', 'a "b" c', "mit, komma", "'einfach'"]


# ---------------------------------------------------------------- file-format quirks

ROWS = [
    h2s_row("über-straße_0-1-rgb_front", 1.5, 2.25, "Grüße aus Köln."),
    h2s_row("手语句子_1-1-rgb_front", 0, 3, '"""Quoted"", he said."'),  # standard quoting
    h2s_row("plain_2-1-rgb_front", 4, 5.5, "Plain."),
]
EXPECTED = [
    ("über-straße_0-1-rgb_front", "Grüße aus Köln.", 1.5, 2.25),
    ("手语句子_1-1-rgb_front", '"Quoted", he said.', 0.0, 3.0),
    ("plain_2-1-rgb_front", "Plain.", 4.0, 5.5),
]


@pytest.mark.parametrize(
    "lines, ending, prefix",
    [
        ([H2S_HEADER] + ROWS, "\n", b""),
        ([H2S_HEADER] + ROWS, "\r\n", b""),
        ([H2S_HEADER] + ROWS, "\r", b""),  # classic Mac: every line ends with a lone CR
        ([H2S_HEADER] + ROWS, "\r\n", b"\xef\xbb\xbf"),  # a spreadsheet's UTF-8 export
        (["", H2S_HEADER, "", ROWS[0], "   ", "\t", ROWS[1], ROWS[2], "", ""], "\n", b""),  # blank lines
        ([H2S_HEADER + "\t"] + [r + "\t" for r in ROWS], "\n", b""),  # trailing delimiter everywhere
        ([H2S_HEADER] + [r + "\t" for r in ROWS], "\r\n", b""),  # ... on the rows only
        ([H2S_HEADER + "\t"] + ROWS, "\n", b""),  # ... on the header only
    ],
    ids=["LF", "CRLF", "CR", "BOM+CRLF", "blank-lines", "trailing-tab", "trailing-tab-rows", "trailing-tab-header"],
)
def test_line_endings_bom_blank_lines_and_trailing_delimiters_give_the_same_rows(tmp_path, lines, ending, prefix):
    samples = h2s_samples(h2s_root(tmp_path, lines, ending=ending, prefix=prefix))
    assert [(s.id, s.text, s.meta["start"], s.meta["end"]) for s in samples] == EXPECTED
    assert [s.meta["video_name"] for s in samples] == ["rawclip"] * 3


@pytest.mark.parametrize("ending", ["\n", "\r\n", "\r"], ids=["LF", "CRLF", "CR"])
def test_line_numbers_count_every_kind_of_line_break(tmp_path, ending):
    lines = [H2S_HEADER, ROWS[0], "", ROWS[1], h2s_row("bad", "soon", 2, "x")]
    with pytest.raises(CorpusError, match=r"line 5: column 'START_REALIGNED' is not a number of seconds: 'soon'"):
        h2s_samples(h2s_root(tmp_path, lines, ending=ending))


def test_a_lone_cr_inside_a_row_is_a_line_break_so_the_row_is_refused(tmp_path):
    """A stray CR in an LF file cuts its row in two, as in the csv module and spreadsheets; the
    pieces have too few fields, so the build stops at that line instead of guessing."""
    broken = ROWS[2].replace("Plain.", "Pla\rin.")
    with pytest.raises(CorpusError, match=r"line 5: 1 fields where the header has 7"):
        h2s_samples(h2s_root(tmp_path, [H2S_HEADER, ROWS[0], ROWS[1], broken]))


def test_a_trailing_delimiter_with_a_value_after_it_is_a_field_count_error(tmp_path):
    with pytest.raises(CorpusError, match=r"line 3: 8 fields where the header has 7"):
        h2s_samples(h2s_root(tmp_path, [H2S_HEADER, ROWS[0], ROWS[1] + "\textra"]))


def test_a_header_naming_a_column_twice_is_refused(tmp_path):
    manifest = csv_manifest(tmp_path, ["id,frames,text,text", "k1,f1,eins,zwei"])
    with pytest.raises(CorpusError, match=r"line 1: header names column 'text' twice"):
        list(ManifestReader(str(manifest), "train").samples())


@pytest.mark.parametrize("value", ["soon", "", "nan", "inf", "1,5", "0x10"])
def test_non_numeric_times_name_file_line_and_column(tmp_path, value):
    root = h2s_root(tmp_path, [H2S_HEADER, ROWS[0], h2s_row("t", 1, value, "x")])
    with pytest.raises(CorpusError, match=rf"how2sign_realigned_test\.csv line 3: column 'END_REALIGNED' is not a number of seconds: '{re.escape(value)}'"):
        h2s_samples(root)


def test_time_cuts_at_and_past_their_boundaries_are_kept_clamped_or_rejected_and_counted(tmp_path):
    """The real clip is 0.71 s (17 frames at 24 fps)."""
    rows = [
        h2s_row("neg-start", -0.5, 0.3, "Start before the video."),  # start clamped to 0
        h2s_row("zero-start", 0, 0.3, "Start at zero."),
        h2s_row("end-is-start", 0.3, 0.3, "Nothing."),
        h2s_row("end-before-start", 0.4, 0.2, "Backwards."),
        h2s_row("all-negative", -1, -0.5, "Before the video."),  # empty once the start is clamped
        h2s_row("end-past-video", 0.2, 99, "Ends after the video."),  # clamped by the video reader
        h2s_row("mojibake", 0.1, 0.5, "Hi, you\u00e2\u0080\u0099re here."),
    ]
    root = h2s_root(tmp_path, [H2S_HEADER] + rows, raw=True)
    out = tmp_path / "out"
    cfg = load_config(
        None,
        [f"corpus.root={root}", "corpus.name=how2sign", "corpus.split=test", "corpus.how2sign_raw_videos=raw_videos", f"shards.out={out}"],
    )
    summary = build_shards(cfg, progress_bar=False)
    entry = summary.index
    assert entry["repaired"] == {"end_clamped": 1, "mojibake": 1, "start_clamped": 1}
    assert entry["rejects_by_reason"] == {"empty time cut": 3}
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text("utf-8").splitlines()]
    assert [(r["id"], r["reason"]) for r in rejects] == [
        ("end-is-start", "empty time cut (end 0.3 s <= start 0.3 s)"),
        ("end-before-start", "empty time cut (end 0.2 s <= start 0.4 s)"),
        ("all-negative", "empty time cut (end -0.5 s <= start 0 s)"),
    ]
    kept = shard_samples(out)
    assert sorted(kept) == ["end-past-video", "mojibake", "neg-start", "zero-start"]
    assert kept["neg-start"]["num_frames"] == kept["zero-start"]["num_frames"] > 0
    assert kept["neg-start"]["meta"]["start"] == -0.5  # the annotation's own time stays in meta
    assert kept["mojibake"]["text"] == "Hi, you\u2019re here."


# ---------------------------------------------------------------- the real annotation files


@pytest.mark.skipif(not (SHARED_DATA / "how2sign").is_dir(), reason="needs the shared real data (../shared/data)")
@pytest.mark.parametrize("split, file_split, rows", [("dev", "val", 1741), ("test", "test", 2356)])
def test_real_how2sign_annotations_read_completely(tmp_path, split, file_split, rows):
    source = SHARED_DATA / "how2sign" / f"how2sign_realigned_{file_split}.csv"
    (tmp_path / "clips").mkdir()
    (tmp_path / source.name).symlink_to(source)
    samples = list(How2SignReader(str(tmp_path), split).samples())
    assert len(samples) == rows == source.read_bytes().count(b"\n") - 1
    assert len({s.id for s in samples}) == rows
    assert all(re.fullmatch(r"[-\w]+-\d+-rgb_front", s.id) for s in samples)
    assert all("\t" not in s.text and "\n" not in s.text and s.meta["start"] < s.meta["end"] for s in samples)
    by_id = {s.id: s.text for s in samples}
    if split == "test":
        assert by_id["G2dND014Ps4_4-5-rgb_front"] == 'This is what we have called the "handle bar".'


@pytest.mark.skipif(not (SHARED_DATA / "phoenix14t").is_dir(), reason="needs the shared real data (../shared/data)")
@pytest.mark.parametrize("split, rows", [("train", 7096), ("dev", 519), ("test", 642)])
def test_real_phoenix_annotations_read_completely(tmp_path, split, rows):
    inner = tmp_path / "PHOENIX-2014-T"
    (inner / "annotations/manual").mkdir(parents=True)
    (inner / "features/fullFrame-210x260px" / split).mkdir(parents=True)
    source = SHARED_DATA / "phoenix14t" / f"PHOENIX-2014-T.{split}.corpus.csv"
    (inner / "annotations/manual" / source.name).symlink_to(source)
    samples = list(Phoenix14TReader(str(tmp_path), split).samples())
    assert len(samples) == rows == source.read_bytes().count(b"\n") - 1
    assert len({s.id for s in samples}) == rows and all(s.text for s in samples)
    frame_counts = SHARED_DATA / "phoenix14t" / f"phoenix14t.{split}.frames.tsv"
    listed = [line.split("\t")[0] for line in frame_counts.read_text("utf-8").splitlines()[1:]]
    assert sorted(s.id for s in samples) == sorted(listed)


@pytest.mark.parametrize("value", ["1_0", "\u0663", "１", "1.5.2", "--1", "1e", "0b1"])
def test_times_are_plain_ascii_decimals(tmp_path, value):
    """float() also takes '1_0' (10), Arabic-Indic and full-width digits; a manifest time that
    only Python would read is refused, naming file, line and column."""
    path = csv_manifest(tmp_path, ["id,video,start,end,text", f"a,v.mp4,{value},3,text"])
    with pytest.raises(CorpusError, match=rf"{re.escape(str(path))} line 2: column 'start' is not a number of seconds"):
        list(ManifestReader(str(path), "train").samples())


@pytest.mark.parametrize("value, seconds", [(" 2.50 ", 2.5), ("1e1", 10.0), ("+3", 3.0), (".5", 0.5), ("7.", 7.0)])
def test_decimal_times_in_any_plain_spelling_are_read(tmp_path, value, seconds):
    path = csv_manifest(tmp_path, ["id,video,start,end,text", f'a,v.mp4,"{value}",30,text'])
    (sample,) = ManifestReader(str(path), "train").samples()
    assert sample.frames.start == seconds and sample.meta["start"] == seconds and sample.meta["end"] == 30.0


@pytest.mark.parametrize("line, problem", [
    ('{"id": "a", "text": "eins", "id": "b", "frames": "f"}', "key 'id' appears twice in one row"),
    ('{"id": "a", "text": "eins", "frames": "f", "score": NaN}', "NaN is not a JSON number"),
    ('{"id": "a", "text": "eins", "frames": "f", "score": -Infinity}', "-Infinity is not a JSON number"),
    ('{"id": "a", "x": ' + "[" * 5000 + "]" * 5000 + "}", "JSON nested too deeply"),
])
def test_a_jsonl_manifest_is_read_strictly(tmp_path, line, problem):
    path = tmp_path / "train.jsonl"
    path.write_text('{"id": "ok", "frames": "f", "text": "gut"}\n' + line + "\n", "utf-8")
    with pytest.raises(CorpusError, match=rf"{re.escape(str(path))} line 2: {re.escape(problem)}"):
        list(ManifestReader(str(path), "train").samples())


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32"])
def test_a_utf16_or_utf32_annotation_file_is_named_as_such(tmp_path, encoding):
    path = tmp_path / "train.csv"
    path.write_bytes("id,frames,text\na,f,gut\n".encode(encoding))  # with its BOM, as spreadsheets save it
    with pytest.raises(CorpusError, match=rf"{re.escape(str(path))}: is {encoding.upper()} text; save it as UTF-8"):
        list(ManifestReader(str(path), "train").samples())


def test_a_damaged_build_record_is_rebuilt_not_a_traceback(tmp_path):
    frames = write_frames(tmp_path / "corpus" / "frames" / "a", 3, seed=0)
    manifest = write_manifest(tmp_path / "corpus" / "train.jsonl", [{"id": "a", "frames": "frames/a", "text": "eins"}])
    cfg = load_config(None, [f"corpus.root={manifest}", f"shards.out={tmp_path / 'out'}"])
    build_shards(cfg, progress_bar=False)
    reference = (tmp_path / "out" / "train-000000.tar").read_bytes()
    (tmp_path / "out" / ".parts" / "train-000000.json").write_text('{"name": "train-0', "utf-8")  # a full disk's leftover
    with open(tmp_path / "out" / "rejects.jsonl", "a", encoding="utf-8") as f:
        f.write('{"split": "dev", "id": "x", "reas')
    summary = build_shards(cfg, progress_bar=False)
    assert summary.shards_built == 1 and summary.index["samples"] == 1 and frames.is_dir()
    assert (tmp_path / "out" / "train-000000.tar").read_bytes() == reference
    assert all(json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text("utf-8").splitlines())
