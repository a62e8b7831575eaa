"""The corpus readers against their native layouts, built from real files (tests/fixtures)."""
from __future__ import annotations

import csv
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest

from fla_ds.config import load_config
from fla_ds.corpus import READERS, open_corpus
from fla_ds.corpus.base import CorpusError, FrameFolder, VideoFile, clean_text
from fla_ds.corpus.csl_daily import CSLDailyReader
from fla_ds.corpus.how2sign import How2SignReader
from fla_ds.corpus.manifest import ManifestReader
from fla_ds.corpus.phoenix14t import Phoenix14TReader
from fla_ds.frame_folder import list_frame_files

FIXTURES = Path(__file__).parent / "fixtures"
PHOENIX_INNER = Path("PHOENIX-2014-T-release-v3/PHOENIX-2014-T")
PHOENIX_SAMPLE = "25October_2010_Monday_tagesschau-17"
# The first rows of the real dev annotation (tests/fixtures/phoenix14t/PHOENIX-2014-T.dev.corpus.csv).
PHOENIX_DEV = [
    ("11August_2010_Wednesday_tagesschau-2", "Signer08", "tiefer luftdruck bestimmt in den nächsten tagen unser wetter"),
    ("11August_2010_Wednesday_tagesschau-3", "Signer08", "das bedeutet viele wolken und immer wieder zum teil kräftige schauer und gewitter"),
    ("11August_2010_Wednesday_tagesschau-8", "Signer08",
     "meist weht nur ein schwacher wind aus unterschiedlichen richtungen der bei schauern und gewittern stark böig sein kann"),
    ("25October_2010_Monday_tagesschau-22", "Signer01", "am mittwoch hier und da nieselregen in der nordwesthälfte an den küsten kräftiger wind"),
    ("05May_2011_Thursday_tagesschau-25", "Signer08", "und nun die wettervorhersage für morgen freitag den sechsten mai"),
    ("14August_2009_Friday_tagesschau-72", "Signer05", "morgen werte von zwanzig grad an der dänischen grenze bis dreißig grad am oberrhein"),
]


def use_real_dev_rows(phoenix_root: Path, line_ending: bytes = b"\n") -> Path:
    annotation = phoenix_root / PHOENIX_INNER / "annotations/manual/PHOENIX-2014-T.dev.corpus.csv"
    data = (FIXTURES / "phoenix14t/PHOENIX-2014-T.dev.corpus.csv").read_bytes()
    annotation.write_bytes(data.replace(b"\n", line_ending))
    return annotation


# ---------------------------------------------------------------- PHOENIX-2014-T


@pytest.mark.parametrize("level", [".", "PHOENIX-2014-T-release-v3", str(PHOENIX_INNER)])
@pytest.mark.parametrize("split", ["train", "dev", "test"])
def test_phoenix_release_sample_from_any_root_level(phoenix_root, level, split):
    reader = Phoenix14TReader(str(phoenix_root / level), split)
    [sample] = list(reader.samples())
    assert sample.id == PHOENIX_SAMPLE
    assert sample.text.startswith("regen und schnee lassen an den alpen")
    assert sample.meta == {"signer": "Signer01"}
    assert sample.frames == FrameFolder(str(phoenix_root / PHOENIX_INNER / "features/fullFrame-210x260px" / split / PHOENIX_SAMPLE), "*.png")
    assert [p.name for p in list_frame_files(sample.frames)] == ["images0001.png", "images0002.png"]
    assert reader.source_files() == [phoenix_root / PHOENIX_INNER / f"annotations/manual/PHOENIX-2014-T.{split}.corpus.csv"]


@pytest.mark.parametrize("line_ending", [b"\n", b"\r\n"], ids=["LF", "CRLF"])
def test_phoenix_real_rows_keep_umlauts_and_order(phoenix_root, line_ending):
    use_real_dev_rows(phoenix_root, line_ending)
    samples = list(Phoenix14TReader(str(phoenix_root), "val").samples())
    assert [(s.id, s.meta["signer"], s.text) for s in samples] == PHOENIX_DEV
    # Frames that the sample release lacks are reported as paths, not dropped.
    assert not Path(samples[0].frames.path).exists()


def test_phoenix_non_utf8_sentence_comes_out_as_bytes(phoenix_root):
    annotation = use_real_dev_rows(phoenix_root)
    annotation.write_bytes(annotation.read_bytes().replace("nächsten".encode(), "nächsten".encode("latin-1")))
    samples = list(Phoenix14TReader(str(phoenix_root), "dev").samples())
    assert samples[0].text == "tiefer luftdruck bestimmt in den nächsten tagen unser wetter".encode("latin-1")
    assert clean_text(samples[0].text) == (None, "non-UTF-8 text")
    assert [s.text for s in samples[1:]] == [row[2] for row in PHOENIX_DEV[1:]]


@pytest.mark.parametrize(
    "break_it, named",
    [
        (lambda root: shutil.rmtree(root / PHOENIX_INNER / "annotations"), "annotations/manual"),
        (lambda root: (root / PHOENIX_INNER / "annotations/manual/PHOENIX-2014-T.dev.corpus.csv").unlink(), "PHOENIX-2014-T.dev.corpus.csv"),
        (lambda root: shutil.rmtree(root / PHOENIX_INNER / "features/fullFrame-210x260px/dev"), "fullFrame-210x260px/dev"),
        (lambda root: shutil.rmtree(root), "corpus root not found"),
    ],
    ids=["no-annotations", "no-split-csv", "no-frames", "no-root"],
)
def test_phoenix_bad_root_names_what_is_missing(phoenix_root, break_it, named):
    break_it(phoenix_root)
    with pytest.raises(CorpusError, match=named) as caught:
        Phoenix14TReader(str(phoenix_root), "dev")
    assert "\n" not in str(caught.value)


def test_phoenix_header_without_translation_is_refused(phoenix_root):
    annotation = use_real_dev_rows(phoenix_root)
    annotation.write_text(annotation.read_text(encoding="utf-8").replace("|translation", "|text", 1), encoding="utf-8")
    with pytest.raises(CorpusError, match="no column 'translation'"):
        list(Phoenix14TReader(str(phoenix_root), "dev").samples())


# ---------------------------------------------------------------- CSL-Daily


def test_csl_daily_follows_split_file_and_joins_words(csl_daily_root):
    reader = CSLDailyReader(str(csl_daily_root), "train")
    samples = list(reader.samples())
    assert [s.id for s in samples] == ["S000001_P0001_T00", "S000000_P0000_T00", "S000005_P0004_T00"]
    assert [s.text for s in samples] == ["我喜欢手语", "今天天气很好", ""]
    assert samples[0].meta == {"signer": "P0001", "length": 3}
    assert samples[2].meta == {"signer": "P0004", "label_missing": True}
    assert [p.name for p in list_frame_files(samples[0].frames)] == ["000000.jpg", "000001.jpg", "000002.jpg"]
    assert samples[0].frames == FrameFolder(str(csl_daily_root / "sentence/frames_512x512/S000001_P0001_T00"), "*.jpg")
    assert reader.source_files() == [csl_daily_root / "sentence_label/split_1.txt", csl_daily_root / "sentence_label/csl2020ct_v2.pkl"]


@pytest.mark.parametrize("split, names", [("dev", ["S000002_P0002_T00"]), ("test", ["S000003_P0003_T00"])])
def test_csl_daily_other_splits(csl_daily_root, split, names):
    assert [s.id for s in CSLDailyReader(str(csl_daily_root), split).samples()] == names


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_csl_daily_nested_frames_and_old_pickle_protocols(make_csl_daily, protocol):
    root = make_csl_daily("sentence_frames-512x512/frames_512x512", protocol)
    [sample] = CSLDailyReader(str(root), "dev").samples()
    assert sample.text == "明天见"
    assert Path(sample.frames.path) == root / "sentence_frames-512x512/frames_512x512/S000002_P0002_T00"
    assert len(list_frame_files(sample.frames)) == 3


def test_csl_daily_label_pickle_may_hold_builtin_sets(csl_daily_root):
    labels = csl_daily_root / "sentence_label/csl2020ct_v2.pkl"
    info = [{"name": "S000002_P0002_T00", "length": 3, "label_gloss": {"G"}, "label_word": ["明天", "见"]}]
    labels.write_bytes(pickle.dumps({"info": info}, protocol=0))  # protocol 0 names __builtin__.set
    assert [s.text for s in CSLDailyReader(str(csl_daily_root), "dev").samples()] == ["明天见"]


class _RunsShellOnLoad:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalsOnLoad:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w')",))


@pytest.mark.parametrize(
    "payload, refused",
    [(_RunsShellOnLoad, f"{os.system.__module__}.system"), (_EvalsOnLoad, "builtins.eval")],
    ids=["os.system", "builtins.eval"],
)
def test_csl_daily_hostile_pickle_is_refused_without_running(csl_daily_root, tmp_path, payload, refused):
    marker = tmp_path / "pwned"
    labels = csl_daily_root / "sentence_label/csl2020ct_v2.pkl"
    labels.write_bytes(pickle.dumps({"info": [payload(marker)]}))
    with pytest.raises(CorpusError, match=refused.replace(".", r"\.")):
        list(CSLDailyReader(str(csl_daily_root), "train").samples())
    assert not marker.exists()


@pytest.mark.parametrize(
    "content, message",
    [(b"not a pickle", "not a readable label pickle"), (pickle.dumps([1, 2]), "key 'info'")],
    ids=["garbage", "wrong-shape"],
)
def test_csl_daily_unusable_label_file(csl_daily_root, content, message):
    (csl_daily_root / "sentence_label/csl2020ct_v2.pkl").write_bytes(content)
    with pytest.raises(CorpusError, match=message):
        list(CSLDailyReader(str(csl_daily_root), "train").samples())


@pytest.mark.parametrize(
    "missing, named", [("sentence_label/split_1.txt", "split_1.txt"), ("sentence", "no frame folder")], ids=["split", "frames"]
)
def test_csl_daily_bad_root(csl_daily_root, missing, named):
    target = csl_daily_root / missing
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(CorpusError, match=named):
        CSLDailyReader(str(csl_daily_root), "train")


# ---------------------------------------------------------------- How2Sign

MOJIBAKE = "Hi, you\u00e2\u0080\u0099re watching a how-to video."


def test_how2sign_clips_with_mojibake_and_missing_clip(how2sign_root):
    reader = How2SignReader(str(how2sign_root), "train")
    samples = list(reader.samples())
    assert [s.id for s in samples] == ["_15CDIexNDM_9-5-rgb_front", "_5keJZsmTh0_0-5-rgb_front", "_5keJZsmTh0_1-5-rgb_front"]
    assert samples[0].text == "Keep your wrist loose."
    assert samples[1].text == MOJIBAKE  # passed on as found; the builder repairs and counts it
    assert clean_text(samples[1].text) == ("Hi, you\u2019re watching a how-to video.", "repaired")
    assert [Path(s.frames.path).is_file() for s in samples] == [True, True, False]
    assert samples[0].frames == VideoFile(str(how2sign_root / "clips/_15CDIexNDM_9-5-rgb_front.mp4"))
    assert samples[0].meta == {
        "video_id": "_15CDIexNDM",
        "video_name": "_15CDIexNDM-5-rgb_front",
        "sentence_id": "_15CDIexNDM_9",
        "start": 61.3,
        "end": 62.01,
    }
    assert reader.source_files() == [how2sign_root / "how2sign_realigned_train.csv"]


@pytest.mark.parametrize("split", ["dev", "val"])
def test_how2sign_real_val_rows_with_quotes_and_mojibake(how2sign_root, split):
    samples = list(How2SignReader(str(how2sign_root), split).samples())
    assert len(samples) == 5
    by_id = {s.id: s.text for s in samples}
    assert by_id["1G8LIWgKLME_3-2-rgb_front"].startswith('For a very small intricate design like an "i" you\'re going')
    assert by_id["DfnHNkTE7mE_14-5-rgb_front"] == 'Let\'s put him in the suit", so to speak.'
    assert by_id["cS44xaCZy7A_1-8-rgb_front"] == "You'll notice that I still have the chain over my horse\u00e2\u0080\u0099s nose."


def test_how2sign_raw_videos_are_cut_by_realigned_times(how2sign_root):
    raw = how2sign_root / "raw_videos"
    raw.mkdir()
    shutil.copy(how2sign_root / "clips/_15CDIexNDM_9-5-rgb_front.mp4", raw / "_15CDIexNDM-5-rgb_front.mp4")
    samples = list(How2SignReader(str(how2sign_root), "train", raw_videos="raw_videos").samples())
    assert samples[0].frames == VideoFile(str(raw / "_15CDIexNDM-5-rgb_front.mp4"), 61.3, 62.01)
    assert samples[2].frames == VideoFile(str(raw / "_5keJZsmTh0-5-rgb_front.mp4"), 1.2, 4.87)


def test_how2sign_annotations_found_in_a_subfolder(how2sign_root):
    (how2sign_root / "annotations/realigned").mkdir(parents=True)
    for csv_file in how2sign_root.glob("*.csv"):
        csv_file.rename(how2sign_root / "annotations/realigned" / csv_file.name)
    reader = How2SignReader(str(how2sign_root), "train")
    assert reader.source_files() == [how2sign_root / "annotations/realigned/how2sign_realigned_train.csv"]
    assert len(list(reader.samples())) == 3


@pytest.mark.parametrize(
    "split, options, named",
    [
        ("test", {}, "how2sign_realigned_test.csv"),
        ("train", {"clips": "no_such_folder"}, "clip folder not found"),
        ("train", {"raw_videos": "no_such_folder"}, "raw video folder not found"),
    ],
)
def test_how2sign_bad_root(how2sign_root, split, options, named):
    with pytest.raises(CorpusError, match=named):
        How2SignReader(str(how2sign_root), split, **options)


def test_how2sign_bad_time_names_file_and_line(how2sign_root):
    annotation = how2sign_root / "how2sign_realigned_train.csv"
    annotation.write_text(annotation.read_text(encoding="utf-8").replace("\t0.42\t", "\tsoon\t"), encoding="utf-8")
    with pytest.raises(CorpusError, match=r"line 3: column 'START_REALIGNED'"):
        list(How2SignReader(str(how2sign_root), "train").samples())


# ---------------------------------------------------------------- manifest


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_manifest_folder_jsonl(manifest_root):
    reader = ManifestReader(str(manifest_root), "train")
    samples = list(reader.samples())
    assert [s.id for s in samples] == ["a", "b", "c"]
    assert samples[0].text == "Grüße aus Köln"
    assert samples[0].frames == VideoFile(str(manifest_root / "videos/_15CDIexNDM_9-5-rgb_front.mp4"))
    assert samples[0].meta == {"signer": "s1", "session": 4}
    assert samples[1].frames == FrameFolder(str(manifest_root / "frames/b"))
    assert len(list_frame_files(samples[1].frames)) == 2
    assert samples[2].frames == VideoFile(str(manifest_root / "videos/_5keJZsmTh0_0-5-rgb_front.mp4"), 0.1, 0.5)
    assert all(Path(s.frames.path).exists() for s in samples)
    assert reader.source_files() == [manifest_root / "train.jsonl"]


def test_manifest_folder_csv_for_dev(manifest_root):
    samples = list(ManifestReader(str(manifest_root), "dev").samples())
    assert [(s.id, s.text, s.meta) for s in samples] == [
        ("d1", "ein satz, mit komma", {"signer": "s2", "day": "monday"}),
        ("d2", "", {}),  # empty text is the builder's to reject
    ]
    assert samples[1].frames == FrameFolder("/abs/frames/d2")


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_manifest_single_file_with_split_column(tmp_path, fmt):
    rows = [("1", "train", "eins"), ("2", "val", "zwei"), ("3", "dev", "drei"), ("4", "", "vier")]
    path = tmp_path / f"all.{fmt}"
    if fmt == "jsonl":
        write_jsonl(path, [{"id": i, "video": f"v/{i}.mp4", "text": t, **({"split": s} if s else {})} for i, s, t in rows])
    else:
        write_csv(path, ["id", "split", "video", "text"], [[i, s, f"v/{i}.mp4", t] for i, s, t in rows])
    dev = list(ManifestReader(str(path), "dev").samples())
    assert [s.id for s in dev] == ["2", "3", "4"]  # a row without a split belongs to every split
    assert dev[0].frames == VideoFile(str(tmp_path / "v/2.mp4"))
    assert [s.id for s in ManifestReader(str(path), "train").samples()] == ["1", "4"]


def test_manifest_non_utf8_text_is_bytes_in_both_formats(tmp_path):
    (tmp_path / "train.csv").write_bytes(b"id,video,text\nx,x.mp4,caf\xe9\ny,y.mp4,caf\xc3\xa9\n")
    assert [s.text for s in ManifestReader(str(tmp_path), "train").samples()] == [b"caf\xe9", "café"]
    (tmp_path / "test.jsonl").write_bytes(b'{"id": "x", "video": "x.mp4", "text": "caf\xe9", "note": "\xff"}\n')
    [sample] = ManifestReader(str(tmp_path), "test").samples()
    assert sample.text == b"caf\xe9"
    assert sample.meta == {"note": "\\xff"}
    json.dumps(sample.meta)


def test_manifest_jsonl_line_separators_inside_text_and_numeric_ids(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"id": 17, "video": "v.mp4", "text": "eins\u2028zwei"}])
    [sample] = ManifestReader(str(path), "train").samples()
    assert (sample.id, sample.text) == ("17", "eins\u2028zwei")


@pytest.mark.parametrize(
    "row, message",
    [
        ({"video": "v.mp4", "text": "t"}, "line 2: missing column 'id'"),
        ({"id": "x", "video": "v.mp4"}, "line 2: missing column 'text'"),
        ({"id": "x", "text": "t"}, "line 2: missing column 'video' or 'frames'"),
        ({"id": "x", "video": "v.mp4", "frames": "f", "text": "t"}, "line 2: both 'video' and 'frames'"),
        ({"id": "x", "frames": "f", "start": 1, "text": "t"}, "line 2: 'start'/'end' apply only to 'video'"),
        ({"id": "x", "video": "v.mp4", "end": "later", "text": "t"}, "line 2: column 'end' is not a number"),
        ({"id": "x", "video": "v.mp4", "split": "holdout", "text": "t"}, "line 2: unknown split 'holdout'"),
        ({"id": "x", "video": "v.mp4", "text": 7}, "line 2: column 'text' is not a string"),
        ('{"id": "x", "video": ', "line 2: not valid JSON"),
        ('["x", "v.mp4", "t"]', "line 2: expected a JSON object"),
    ],
)
def test_manifest_bad_jsonl_row_names_file_line_and_column(tmp_path, row, message):
    path = write_jsonl(tmp_path / "train.jsonl", [{"id": "ok", "video": "v.mp4", "text": "t"}, row])
    with pytest.raises(CorpusError, match=f"train.jsonl {message}"):
        list(ManifestReader(str(path), "train").samples())


def test_manifest_bad_csv_row_names_file_line_and_column(tmp_path):
    path = write_csv(tmp_path / "train.csv", ["id", "video", "text"], [["a", "a.mp4", "eins"], ["", "b.mp4", "zwei"]])
    with pytest.raises(CorpusError, match="train.csv line 3: missing column 'id'"):
        list(ManifestReader(str(path), "train").samples())
    write_csv(path, ["id", "video"], [["a", "a.mp4"]])
    with pytest.raises(CorpusError, match="train.csv line 2: missing column 'text'"):
        list(ManifestReader(str(path), "train").samples())


def test_manifest_bad_roots(tmp_path):
    with pytest.raises(CorpusError, match=r"no test\.jsonl or test\.csv"):
        ManifestReader(str(tmp_path), "test")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(CorpusError, match="neither a .jsonl nor a .csv"):
        ManifestReader(str(tmp_path / "notes.txt"), "test")
    (tmp_path / "dev.csv").write_text("id,video,text\n")
    (tmp_path / "val.jsonl").write_text("")
    with pytest.raises(CorpusError, match="several manifests"):
        ManifestReader(str(tmp_path), "dev")
    with pytest.raises(CorpusError, match="unknown split 'holdout'"):
        ManifestReader(str(tmp_path), "holdout")
    with pytest.raises(CorpusError, match="corpus.root is not set"):
        ManifestReader("", "train")


# ---------------------------------------------------------------- registry


def test_registry_names():
    assert set(READERS) == {"phoenix14t", "csl-daily", "how2sign", "manifest", "synthetic"}
    assert issubclass(READERS["synthetic"], ManifestReader)


def test_open_corpus_from_the_config(how2sign_root, manifest_root):
    cfg = load_config(overrides=["corpus.name=how2sign", f"corpus.root={how2sign_root}", "corpus.split=val"])
    reader = open_corpus(cfg.corpus)
    assert reader.name == "how2sign" and len(list(reader.samples())) == 5
    raw = how2sign_root / "raw"
    raw.mkdir()
    cfg.corpus.how2sign_raw_videos = "raw"
    assert next(open_corpus(cfg.corpus).samples()).frames.start == 12.97
    cfg = load_config(overrides=["corpus.name=synthetic", f"corpus.root={manifest_root}"])
    assert open_corpus(cfg.corpus).name == "synthetic"


def test_open_corpus_unknown_name_lists_valid_names():
    from fla_ds.config import ConfigError

    with pytest.raises(ConfigError, match="'phoenix' is not one of phoenix14t, csl-daily, how2sign, manifest, synthetic"):
        load_config(overrides=["corpus.name=phoenix"])  # refused at parse time
    cfg = load_config()
    cfg.corpus.name = "phoenix"  # a config changed after parsing still cannot open a corpus
    with pytest.raises(CorpusError, match="unknown corpus 'phoenix' .*phoenix14t, csl-daily, how2sign, manifest, synthetic"):
        open_corpus(cfg.corpus)

