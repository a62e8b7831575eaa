"""Shards and their index are untrusted input: hostile tars and indexes, made here with
tarfile and json from good shards, are refused with a one-line message by the loader
(ShardStream) and by ``fla-ds shards verify`` (exit 1), without reading outside the folder
(the files outside are FIFOs: opening one would block, and a deadline fails the test) and
without memory growing with what a header or an index claims."""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import tarfile
import tracemalloc
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from corpus_factory import frames_corpus

from fla_ds.atomic import sha256_file
from fla_ds.cli import main
from fla_ds.config import load_config
from fla_ds.frames import FramePack, pack_frames
from fla_ds.shards import ShardFormatError, build_shards, iter_raw_samples, load_index
from fla_ds.shards.format import MAX_JSON_BYTES, ShardWriter
from fla_ds.shards.index import IndexFormatError
from fla_ds.stream import ShardStream
from fla_ds.vocab import shard_texts

SHARD0 = "train-000000.tar"  # 2 samples, s-keys in the builder's seeded order


class Hung(BaseException):
    """Not an OSError: the code under test must not be able to swallow it."""


@contextmanager
def deadline(seconds: float = 30):
    """Fail (instead of hanging the suite) when something blocks, e.g. opens a FIFO."""

    def fire(signum, frame):
        raise Hung(f"still running after {seconds} s: something blocked (a FIFO opened?)")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """5 samples of 2-3 tiny frames in shards of 2, 2 and 1, built by the real builder."""
    root = tmp_path_factory.mktemp("untrusted")
    manifest = frames_corpus(root / "corpus", 5, min_frames=2, max_frames=3)
    cfg = load_config(None, [f"corpus.root={manifest}", "corpus.name=manifest", f"shards.out={root / 'shards'}", "shards.samples_per_shard=2",
                             "shards.short_side=16"])
    build_shards(cfg, progress_bar=False)
    return root / "shards"


@pytest.fixture
def folder(good, tmp_path) -> Path:
    """A copy of the good shards to tamper with, beside ``outside/`` holding FIFOs."""
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("x.tar", "index.json", "passwd"):
        os.mkfifo(outside / name)
    return Path(shutil.copytree(good, tmp_path / "shards"))


# ------------------------------------------------------------------ helpers


def stream_cfg(folder: Path, split: str = "train"):
    return load_config(None, [f"stream.shards={folder}", f"stream.split={split}", "stream.train=false", "stream.num_workers=0",
                              "train.micro_batch=1"])


def loader_error(folder: Path, split: str = "train") -> str:
    """The loader's error over the whole split (evaluation reads every shard to its end)."""
    with deadline(), pytest.raises(ShardFormatError) as info:
        for _ in ShardStream.from_config(stream_cfg(folder, split)):
            pass
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def verify_output(folder: Path, capsys, *flags: str) -> str:
    """``fla-ds shards verify``'s problem lines; asserts exit 1 and no traceback."""
    with deadline():
        code = main(["shards", "verify", str(folder), *flags])
    out, err = capsys.readouterr()
    assert code == 1, out + err
    assert "Traceback" not in out + err
    problems = [line for line in out.splitlines() if line.startswith("PROBLEM ")]
    assert problems and out.splitlines()[-1].endswith(f"{len(problems)} problems")
    return "\n".join(problems)


def refused_by_both(folder: Path, capsys, pattern: str, split: str = "train") -> None:
    assert re.search(pattern, loader_error(folder, split)), loader_error(folder, split)
    problems = verify_output(folder, capsys)
    assert re.search(pattern, problems), problems


def read_index(folder: Path) -> dict:
    return json.loads((folder / "index.json").read_text("utf-8"))


def write_index(folder: Path, index: dict) -> None:
    (folder / "index.json").write_text(json.dumps(index), "utf-8")


def replace_shard(folder: Path, data: bytes, name: str = SHARD0, samples: int | None = None, frames: int | None = None) -> None:
    """Write a crafted tar over a shard and make the index agree with its bytes (size and
    sha256, and the counts if given), so that only the tar's content is wrong."""
    (folder / name).write_bytes(data)
    index = read_index(folder)
    entry = index["splits"]["train"]
    shard = next(s for s in entry["shards"] if s["name"] == name)
    shard.update(bytes=len(data), sha256=sha256_file(folder / name))
    shard.update({k: v for k, v in (("samples", samples), ("frames", frames)) if v is not None})
    for field in ("samples", "frames", "bytes"):
        entry[field] = sum(s[field] for s in entry["shards"])
    write_index(folder, index)


def raw_samples(folder: Path, name: str = SHARD0) -> list[dict]:
    return list(iter_raw_samples(str(folder / name)))


def member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, size: int | None = None, **fields) -> bytes:
    """One raw tar member: a header (whatever it claims) and its data padded to blocks."""
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, len(data) if size is None else size
    for key, value in fields.items():
        setattr(info, key, value)
    return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape") + data + b"\0" * (-len(data) % 512)


def tar_bytes(members: list[bytes]) -> bytes:
    """Members, the zero end marker, and padding to a 10240-byte record, as tarfile writes."""
    body = b"".join(members) + b"\0" * 1024
    return body + b"\0" * (-len(body) % 10240)


def sample_members(raw: dict) -> list[bytes]:
    return [member(f"{raw['__key__']}.json", raw["json"]), member(f"{raw['__key__']}.frames", raw["frames"])]


def with_member_at(samples: list[dict], hostile: bytes, where: str) -> bytes:
    """The two samples with one hostile member first, inside the first sample (between its
    json and frames), between the samples, or after the last."""
    a, b = sample_members(samples[0]), sample_members(samples[1])
    layout = {"first": [hostile, *a, *b], "inside": [a[0], hostile, a[1], *b], "between": [*a, hostile, *b], "last": [*a, *b, hostile]}
    return tar_bytes(layout[where])


# ------------------------------------------------------------------ the good folder


def test_good_shards_load_verify_and_read_with_webdataset_public_api(good, capsys):
    """The reference: the loader and verify accept what the builder wrote, and the shards
    stay plain WebDataset shards (its public API gives the same keys and json)."""
    import webdataset as wds

    batches = list(ShardStream.from_config(stream_cfg(good)))
    assert sorted(i for b in batches for i in b.id) == [f"s{i:03d}" for i in range(5)]
    assert main(["shards", "verify", str(good), "--decode"]) == 0
    assert capsys.readouterr().out.strip().endswith("OK")
    for shard in load_index(good, "train")["shards"]:
        path = str(good / shard["name"])
        ours = [(raw["__key__"], raw["json"], raw["frames"]) for raw in iter_raw_samples(path, samples=shard["samples"])]
        theirs = [(s["__key__"], s["json"], s["frames"]) for s in wds.WebDataset(path, shardshuffle=False)]
        assert theirs == ours and len(ours) == shard["samples"]


def test_a_symlink_to_a_shard_inside_the_folder_is_followed(folder):
    (folder / SHARD0).rename(folder / "real.tar")
    (folder / SHARD0).symlink_to("real.tar")
    assert len(list(ShardStream.from_config(stream_cfg(folder)))) == 5


# ------------------------------------------------------------------ hostile members


HOSTILE_MEMBERS = {
    "symlink": (member("zz.json", kind=tarfile.SYMTYPE, linkname="/etc/passwd"), r"member 'zz\.json' is a symlink, not a regular file"),
    "hardlink": (member("zz.json", kind=tarfile.LNKTYPE, linkname="s000.json"), r"member 'zz\.json' is a hard link, not a regular file"),
    "directory": (member("zz", kind=tarfile.DIRTYPE), r"member 'zz/?' is a directory, not a regular file"),
    "char device": (member("zz.json", kind=tarfile.CHRTYPE, devmajor=1, devminor=3), r"member 'zz\.json' is a character device"),
    "fifo": (member("zz.json", kind=tarfile.FIFOTYPE), r"member 'zz\.json' is a FIFO, not a regular file"),
    "sparse": (member("zz.frames", kind=tarfile.GNUTYPE_SPARSE, size=4096), r"member 'zz\.frames' is a sparse file"),
    "webdataset key": (member("__key__.json", b"{}"), r"member '__key__\.json' has a key starting with '__', reserved by WebDataset"),
    "pickle": (member("a.pyd", b"cos\nsystem\n(S'echo owned'\ntR."), r"member 'a\.pyd' is not one fla_ds writes"),
    "parent path": (member("../x.json", b"{}"), r"member '\.\./x\.json' is not one fla_ds writes"),
    "absolute path": (member("/x.json", b"{}"), r"member '/x\.json' is not one fla_ds writes"),
    "newline in name": (member("zz.json\n", b"{}"), r"member 'zz\.json\\n' is not one fla_ds writes"),
    "huge payload": (member("zz.frames", size=10**11), r"member 'zz\.frames' claims 100000000000 bytes, past the end of the \d+-byte shard"),
    "huge json": (member("zz.json", size=MAX_JSON_BYTES + 1),
                  rf"member 'zz\.json' claims {MAX_JSON_BYTES + 1} bytes, more than the {MAX_JSON_BYTES} a \.json member may hold"),
    "pax bomb": (member("././@PaxHeader", kind=tarfile.XHDTYPE, size=10**9), r"the tar header at byte \d+ claims a 1000000000-byte extended header"),
}


@pytest.mark.parametrize("where", ["first", "inside", "between", "last"])
@pytest.mark.parametrize("kind", list(HOSTILE_MEMBERS))
def test_every_foreign_member_anywhere_is_refused_by_loader_and_verify(folder, capsys, kind, where):
    hostile, pattern = HOSTILE_MEMBERS[kind]
    replace_shard(folder, with_member_at(raw_samples(folder), hostile, where))
    tracemalloc.start()
    try:
        refused_by_both(folder, capsys, rf"{SHARD0}: {pattern}")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"{peak} bytes allocated for what a header claims"


def test_a_member_hidden_behind_a_zero_block_is_found(folder, capsys):
    """tarfile stops at the first zero block; the bytes after must all be zeros."""
    samples = raw_samples(folder)
    data = tar_bytes([*sample_members(samples[0]), *sample_members(samples[1]), b"\0" * 512, member("a.pyd", b"payload")])
    replace_shard(folder, data)
    refused_by_both(folder, capsys, rf"{SHARD0}: byte \d+, after the end of the tar's members, is not part of the zero end marker")


@pytest.mark.parametrize("layout, pattern", [("repeated", r"sample key '\w+' appears twice"), ("split apart", r"sample '\w+' lacks its \.frames member")])
def test_a_key_seen_twice_and_a_sample_split_apart_are_refused(folder, capsys, layout, pattern):
    a, b = (sample_members(raw) for raw in raw_samples(folder))
    replace_shard(folder, tar_bytes([*a, *b, *a] if layout == "repeated" else [a[0], *b, a[1]]))
    refused_by_both(folder, capsys, rf"{SHARD0}: {pattern}")


def test_vocab_reads_shards_through_the_same_reader(folder):
    hostile, pattern = HOSTILE_MEMBERS["symlink"]
    replace_shard(folder, with_member_at(raw_samples(folder), hostile, "last"))
    with pytest.raises(ShardFormatError, match=pattern):
        shard_texts(folder)


def test_a_partial_read_stops_after_its_last_position_unless_that_is_the_shards_last(folder):
    """The loader's runs: positions {0} of a 2-sample shard stop early (the member after the
    last sample is not reached); a run holding position 1 reads on and refuses it."""
    replace_shard(folder, with_member_at(raw_samples(folder), HOSTILE_MEMBERS["pickle"][0], "last"))
    shard = str(folder / SHARD0)
    assert [raw["__pos__"] for raw in iter_raw_samples(shard, [0], samples=2)] == [0]
    with pytest.raises(ShardFormatError, match=r"member 'a\.pyd' is not one fla_ds writes"):
        list(iter_raw_samples(shard, [1], samples=2))


# ------------------------------------------------------------------ forged frames


def forged_size(jpeg: bytes, width: int, height: int) -> bytes:
    """The JPEG with its baseline frame header (SOF0) claiming another size: the marker
    segments after SOI are walked to it (FF C0 may also occur inside a table)."""
    at = 2
    while jpeg[at + 1] != 0xC0:
        assert jpeg[at] == 0xFF, "not a baseline JPEG"
        at += 2 + int.from_bytes(jpeg[at + 2 : at + 4], "big")
    return jpeg[: at + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + jpeg[at + 9 :]


@pytest.mark.parametrize("side", [4000, 65535])
def test_a_jpeg_header_larger_than_its_json_is_refused_not_decoded(folder, capsys, side):
    first, second = raw_samples(folder)
    pack = FramePack(first["frames"])
    forged = pack_frames([forged_size(bytes(pack.jpeg(i)), side, side) for i in range(len(pack))])
    buf = io.BytesIO()
    writer = ShardWriter(buf)
    writer.write(first["__key__"], json.loads(first["json"]), forged)
    writer.write(second["__key__"], json.loads(second["json"]), second["frames"])
    writer.close()
    replace_shard(folder, buf.getvalue())
    pattern = rf"{SHARD0}: member '{first['__key__']}\.frames': frame \d+ (is {side}x{side} pixels, its json says \d+x\d+|is not a readable JPEG \(Image size)"
    assert re.search(pattern, loader_error(folder))
    assert re.search(pattern, verify_output(folder, capsys, "--decode"))


def test_a_json_claiming_a_huge_frame_size_is_refused(folder, capsys):
    first, second = raw_samples(folder)
    buf = io.BytesIO()
    writer = ShardWriter(buf)
    writer.write(first["__key__"], {**json.loads(first["json"]), "width": 65535, "height": 65535}, first["frames"])
    writer.write(second["__key__"], json.loads(second["json"]), second["frames"])
    writer.close()
    replace_shard(folder, buf.getvalue())
    refused_by_both(folder, capsys, rf"member '{first['__key__']}\.json' lacks a width and height in 1\.\.8192")


# ------------------------------------------------------------------ forged counts


def test_an_index_claiming_a_billion_samples_is_refused_before_planning(folder, capsys):
    index = read_index(folder)
    entry = index["splits"]["train"]
    entry["shards"][0]["samples"] = 10**9
    entry["samples"] = sum(s["samples"] for s in entry["shards"])
    write_index(folder, index)
    tracemalloc.start()
    try:
        refused_by_both(folder, capsys, r"index\.json: splits\.train\.shards\[0\]\.samples is 1000000000, more than a \d+-byte shard can hold")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20


@pytest.mark.parametrize("claimed, pattern", [(3, rf"{SHARD0}: ends after 2 samples, its index entry says 3"),
                                              (1, rf"{SHARD0}: holds more than the 1 samples its index entry says")])
def test_an_index_count_other_than_the_tars_is_refused(folder, capsys, claimed, pattern):
    replace_shard(folder, (folder / SHARD0).read_bytes(), samples=claimed)
    refused_by_both(folder, capsys, pattern)


def test_a_split_with_no_samples_is_refused_with_one_line(folder, capsys):
    """What a build that kept nothing would leave: the loader (so evaluation, feature
    extraction and training) and the vocabulary builder stop at once; verify reports it."""
    (folder / "dev-000000.tar").write_bytes(tar_bytes([]))
    index = read_index(folder)
    index["splits"]["dev"] = {"split": "dev", "plan_fingerprint": "ab" * 32, "samples": 0, "frames": 0, "bytes": 10240,
                              "shards": [{"name": "dev-000000.tar", "samples": 0, "frames": 0, "bytes": 10240,
                                          "sha256": sha256_file(folder / "dev-000000.tar")}]}
    write_index(folder, index)
    expected = rf"{re.escape(str(folder))}: split 'dev' has no samples"
    assert re.search(expected, loader_error(folder, "dev"))
    problems = verify_output(folder, capsys)
    assert re.search(expected, problems) and problems.count("\n") == 0  # train is intact
    code = main(["vocab", "--tokenizer", str(folder), "--shards", str(folder), "--out", str(folder.parent / "vocab"), "--split", "dev"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and re.search(expected, err)


# ------------------------------------------------------------------ escaping the folder


@pytest.mark.parametrize("name", ["../outside/x.tar", "/etc/passwd", "sub/x.tar", "..\\x.tar", "-rf.tar", ".hidden.tar", "x.tar\x00", "x.pyd",
                                  "a..tar"])
def test_a_shard_name_that_is_not_a_plain_file_name_is_refused_unopened(folder, capsys, name):
    index = read_index(folder)
    index["splits"]["train"]["shards"][0]["name"] = name
    write_index(folder, index)
    refused_by_both(folder, capsys, r"index\.json: splits\.train\.shards\[0\]\.name .* is not a plain shard file name")


@pytest.mark.parametrize("target", ["x.tar", "copy.tar"])
def test_a_shard_symlink_leading_outside_is_refused_unopened(folder, capsys, target):
    """x.tar is a FIFO (opening it would block); copy.tar a good shard, refused all the same."""
    shutil.copy(folder / SHARD0, folder.parent / "outside" / "copy.tar")
    (folder / SHARD0).unlink()
    (folder / SHARD0).symlink_to(folder.parent / "outside" / target)
    refused_by_both(folder, capsys, rf"{SHARD0}: is a symlink leading outside")


def test_a_fifo_as_shard_file_is_refused_without_hanging(folder, capsys):
    (folder / SHARD0).unlink()
    os.mkfifo(folder / SHARD0)
    refused_by_both(folder, capsys, rf"{SHARD0}: is a FIFO, not a regular file")
    with deadline(), pytest.raises(ShardFormatError, match="is a FIFO, not a regular file"):
        list(iter_raw_samples(str(folder / SHARD0)))


@pytest.mark.parametrize("how, pattern", [("fifo", r"index\.json: is a FIFO, not a regular file"),
                                          ("outside", r"index\.json: is a symlink leading outside"),
                                          ("missing", r"index\.json does not exist")])
def test_an_index_that_is_not_a_regular_file_inside_the_folder_is_refused(folder, capsys, how, pattern):
    (folder / "index.json").unlink()
    if how == "fifo":
        os.mkfifo(folder / "index.json")
    elif how == "outside":
        (folder / "index.json").symlink_to(folder.parent / "outside" / "index.json")
    refused_by_both(folder, capsys, pattern)


# ------------------------------------------------------------------ malformed indexes


def _nested(depth: int):
    return [] if depth == 0 else [_nested(depth - 1)]


def _set(path: tuple, value):
    def change(index: dict):
        target = index
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return change


def _shard0(field: str, value):
    return _set(("splits", "train", "shards", 0, field), value)


def _totals_off(index: dict):
    index["splits"]["train"]["samples"] += 1


def _bytes_off(index: dict):
    entry = index["splits"]["train"]
    entry["shards"][0]["bytes"] += 512
    entry["bytes"] += 512


def _name_twice(index: dict):
    shards = index["splits"]["train"]["shards"]
    shards[1]["name"] = shards[0]["name"]


def _no_name(index: dict):
    del index["splits"]["train"]["shards"][0]["name"]


MALFORMED = {
    "not JSON": ('{"splits": ', r"index\.json: is not UTF-8 JSON"),
    "not UTF-8": (b'{"splits": {"\xff": 1}}', r"index\.json: is not UTF-8 JSON"),
    "deep nesting": ("[" * 200_000, r"index\.json: is nested deeper than 32 levels"),
    "deep but valid": (lambda index: index.update(extra=_nested(40)), r"index\.json: is nested deeper than 32 levels"),
    "NaN": (lambda index: json.dumps({**index, "extra": 1}).replace('"extra": 1', '"extra": NaN'),
            r"index\.json: is not UTF-8 JSON \(NaN is not a JSON number"),
    "duplicate key": (lambda index: json.dumps(index)[:-1] + ', "splits": {}}', r"index\.json: key 'splits' appears twice"),
    "a list": ("[]", r"index\.json: is a list, not a JSON object"),
    "splits a list": (_set(("splits",), []), r"index\.json: splits is a list, not an object"),
    "unknown split": (_set(("splits", "holdout"), {}), r"index\.json: splits has 'holdout', not one of train, dev, test"),
    "format": (_set(("format",), "pickle"), r"index\.json: format is 'pickle', not 'fla_ds\.shards'"),
    "kind": (_set(("splits", "train", "kind"), "pickle"), r"index\.json: splits\.train\.kind is 'pickle', not one of video, features"),
    "views": (_set(("splits", "train", "views"), 2), r"index\.json: splits\.train\.views is 2, outside 1\.\.1"),
    "fingerprint": (_set(("splits", "train", "plan_fingerprint"), "../x"), r"splits\.train\.plan_fingerprint is '\.\./x', not a lowercase hex string"),
    "samples a string": (_shard0("samples", "2"), r"splits\.train\.shards\[0\]\.samples is '2', not an integer"),
    "samples a bool": (_shard0("samples", True), r"splits\.train\.shards\[0\]\.samples is true, not an integer"),
    "samples a float": (_shard0("samples", 2.0), r"splits\.train\.shards\[0\]\.samples is 2\.0, not an integer"),
    "negative frames": (_shard0("frames", -1), r"splits\.train\.shards\[0\]\.frames is -1, outside 0\.\."),
    "frames beyond bytes": (_shard0("frames", 10**9), r"splits\.train\.shards\[0\]\.frames is 1000000000, not between its 2 samples"),
    "name not a string": (_shard0("name", 7), r"splits\.train\.shards\[0\]\.name is 7, not a string"),
    "name missing": (_no_name, r"splits\.train\.shards\[0\]\.name is missing"),
    "name twice": (_name_twice, r"splits\.train\.shards\[1\]\.name 'train-000000\.tar' is listed twice"),
    "sha256": (_shard0("sha256", "abc"), r"splits\.train\.shards\[0\]\.sha256 is 'abc', not a sha256"),
    "bytes not blocks": (_shard0("bytes", 10241), r"splits\.train\.shards\[0\]\.bytes is 10241, not a whole number of 512-byte tar blocks"),
    "totals": (_totals_off, r"splits\.train\.samples is 6, its shards add up to 5"),
    "bytes vs disk": (_bytes_off, rf"{SHARD0}: \d+ bytes on disk, \S*index\.json says \d+"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_index_is_refused_naming_file_and_field(folder, capsys, case):
    change, pattern = MALFORMED[case]
    path = folder / "index.json"
    if isinstance(change, (str, bytes)):
        path.write_bytes(change.encode() if isinstance(change, str) else change)
    else:
        index = read_index(folder)
        text = change(index)
        path.write_text(text if isinstance(text, str) else json.dumps(index), "utf-8")
    refused_by_both(folder, capsys, pattern)


def test_a_huge_index_is_refused_unparsed(folder, capsys):
    with open(folder / "index.json", "r+b") as f:  # sparse: no disk used
        f.truncate((64 << 20) + 1)
    refused_by_both(folder, capsys, r"index\.json: is larger than 67108864 bytes; refusing to parse it")


def test_index_errors_are_index_format_errors_and_one_line_in_the_cli(folder, capsys):
    index = read_index(folder)
    _set(("splits", "train", "kind"), "pickle")(index)
    write_index(folder, index)
    with pytest.raises(IndexFormatError):
        load_index(folder, "train")
    code = main(["vocab", "--tokenizer", str(folder), "--shards", str(folder), "--out", str(folder.parent / "vocab")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "splits.train.kind is 'pickle'" in err


# ------------------------------------------------------------------ the feature-cache layout


def feature_cache(folder: Path, counts_per_view: list[list[int]]) -> None:
    """A hand-made feature cache: view v holds shards of counts_per_view[v] samples, each
    sample 2 x 4 float16 features."""
    shards = []
    for view, counts in enumerate(counts_per_view):
        for number, count in enumerate(counts):
            name = f"train-v{view}-r000-{number:06d}.tar"
            with open(folder / name, "wb") as f:
                writer = ShardWriter(f)
                for i in range(count):
                    meta = {"id": f"c{number}-{i}", "text": f"satz {i}", "num_frames": 2, "dim": 4, "dtype": "float16", "view": view}
                    writer.write(f"c{number}_{i}", meta, np.full((2, 4), view, dtype="<f2").tobytes(), suffix="features")
                writer.close()
            shards.append({"name": name, "samples": count, "frames": 2 * count, "bytes": (folder / name).stat().st_size,
                           "sha256": sha256_file(folder / name), "view": view})
    entry = {"split": "train", "kind": "features", "views": len(counts_per_view), "dim": 4, "dtype": "float16", "plan_fingerprint": "cd" * 32,
             "shards": shards, "clips": sum(counts_per_view[0]), "samples": sum(s["samples"] for s in shards),
             "frames": sum(s["frames"] for s in shards), "bytes": sum(s["bytes"] for s in shards)}
    write_index(folder, {"format": "fla_ds.shards", "kind": "features", "splits": {"train": entry}})


def test_a_feature_cache_with_views_loads_and_a_forged_layout_is_refused(tmp_path, capsys):
    good = tmp_path / "good"
    good.mkdir()
    feature_cache(good, [[2, 1], [2, 1]])
    cfg = load_config(None, [f"stream.shards={good}", "train.micro_batch=1", "stream.num_workers=0"])
    batches = list(ShardStream.from_config(cfg))
    assert len(batches) == 3 and {int(b.view) for b in batches} <= {0, 1}
    assert main(["shards", "verify", str(good)]) == 0
    capsys.readouterr()
    forged = tmp_path / "forged"
    forged.mkdir()
    feature_cache(forged, [[2, 1], [1, 2]])
    refused_by_both(forged, capsys, r"index\.json: splits\.train\.shards lay out the 2 views differently")
