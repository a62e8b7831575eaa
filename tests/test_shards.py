"""The shard builder and verifier, run for real on small corpora (frame folders, real clips)."""
from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from corpus_factory import bad_inputs_corpus, frames_corpus, write_manifest

from fla_ds.cli import main
from fla_ds.config import load_config
from fla_ds.shards import ShardFormatError, build_shards, iter_raw_samples, parse_sample
from fla_ds.shards.verify import verify_folder


def build(manifest: Path, out: Path, *overrides: str, workers: int = 1):
    cfg = load_config(None, [f"corpus.root={manifest}", "corpus.name=manifest", f"shards.out={out}", f"shards.workers={workers}", *overrides])
    return build_shards(cfg, progress_bar=False)


def tar_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}


def read_index(folder: Path) -> dict:
    return json.loads((folder / "index.json").read_text("utf-8"))


def test_build_writes_shards_index_and_config(tmp_path):
    manifest = frames_corpus(tmp_path / "corpus", 7)
    summary = build(manifest, tmp_path / "out", "shards.samples_per_shard=3", "shards.short_side=48")
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    entry = read_index(out)["splits"]["train"]
    assert [s["samples"] for s in entry["shards"]] == [3, 3, 1]
    assert entry["samples"] == 7 and entry["rejected"] == 0
    assert entry["settings"]["short_side"] == 48
    assert list(entry["sources"]) == ["train.jsonl"]
    assert (out / "config.train.yaml").read_text().count("short_side: 48") == 1
    assert summary.index["frames"] == entry["frames"] == sum(s["frames"] for s in entry["shards"])
    # Every sample: two members, frames resized to short side 48, text intact.
    texts = []
    for shard in entry["shards"]:
        for raw in iter_raw_samples(str(out / shard["name"])):
            meta, pack = parse_sample(shard["name"], raw)
            assert min(meta["width"], meta["height"]) == 48
            assert pack.decode([0]).shape == (1, meta["height"], meta["width"], 3)
            texts.append(meta["text"])
    assert sorted(texts) == sorted(f"satz {i} über das wetter" for i in range(7))


def test_output_is_byte_identical_whatever_the_worker_count(tmp_path):
    manifest = frames_corpus(tmp_path / "corpus", 9)
    build(manifest, tmp_path / "one", "shards.samples_per_shard=2", workers=1)
    build(manifest, tmp_path / "two", "shards.samples_per_shard=2", workers=2)
    assert tar_bytes(tmp_path / "one") == tar_bytes(tmp_path / "two")
    assert (tmp_path / "one" / "index.json").read_bytes() == (tmp_path / "two" / "index.json").read_bytes()


def test_shard_ranges_then_index_equal_a_single_build(tmp_path):
    """What a Slurm job array does: disjoint ranges, then one run that writes the index."""
    manifest = frames_corpus(tmp_path / "corpus", 8)
    build(manifest, tmp_path / "whole", "shards.samples_per_shard=2")
    part = build(manifest, tmp_path / "parts", "shards.samples_per_shard=2", "shards.num_shards=2")
    assert part.index is None and not (tmp_path / "parts" / "index.json").exists()
    build(manifest, tmp_path / "parts", "shards.samples_per_shard=2", "shards.first_shard=2")
    final = build(manifest, tmp_path / "parts", "shards.samples_per_shard=2")
    assert final.shards_built == 0 and final.shards_skipped == 4
    assert tar_bytes(tmp_path / "whole") == tar_bytes(tmp_path / "parts")
    assert (tmp_path / "whole" / "index.json").read_bytes() == (tmp_path / "parts" / "index.json").read_bytes()


def test_killed_build_resumes_and_finishes_identically(tmp_path):
    manifest = frames_corpus(tmp_path / "corpus", 24, min_frames=20, max_frames=30)
    args = ["shards", "build", "--corpus", "manifest", "--root", str(manifest), "--split", "train", "--quiet"]
    settings = ["shards.samples_per_shard=2", "shards.short_side=128"]
    reference = tmp_path / "reference"
    assert main(args + ["--out", str(reference)] + settings) == 0

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "fla_ds"] + args + ["--out", str(out)] + settings
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while len(list((out / ".parts").glob("train-*.json"))) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    done_before = len(list((out / ".parts").glob("train-*.json")))
    assert 2 <= done_before < 12, "the kill should land mid-build"
    assert not (out / "index.json").exists()
    # No partly written shard under a final name: every tar there reads to its end.
    for shard in out.glob("*.tar"):
        assert len(list(iter_raw_samples(str(shard)))) == 2

    summary = build(manifest, out, *settings)
    assert summary.shards_skipped == done_before and summary.shards_built == 12 - done_before
    assert not list(out.glob(".*.tmp"))
    assert tar_bytes(out) == tar_bytes(reference)
    assert (out / "index.json").read_bytes() == (reference / "index.json").read_bytes()


def test_bad_inputs_are_rejected_or_repaired_and_every_good_sample_kept(tmp_path):
    manifest, expected = bad_inputs_corpus(tmp_path / "corpus")
    summary = build(manifest, tmp_path / "out", "shards.samples_per_shard=4", workers=2)
    out = tmp_path / "out"
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text("utf-8").splitlines()]
    reasons = {r["id"]: r["reason"] for r in rejects if r["reason"] != "duplicate id"}
    for sample_id, outcome in expected.items():
        if outcome == "kept" or outcome.startswith("repaired"):
            assert sample_id not in reasons, f"{sample_id} was rejected: {reasons.get(sample_id)}"
        else:
            assert reasons.get(sample_id, "").startswith(outcome), f"{sample_id}: {reasons.get(sample_id)!r}, expected {outcome!r}"
    assert [r["id"] for r in rejects if r["reason"] == "duplicate id"] == ["good-video"]
    kept = {}
    for shard in read_index(out)["splits"]["train"]["shards"]:
        for raw in iter_raw_samples(str(out / shard["name"])):
            meta, _ = parse_sample(shard["name"], raw)
            kept[meta["id"]] = meta["text"]
    assert set(kept) == {i for i, o in expected.items() if o == "kept" or o.startswith("repaired")}
    assert kept["mojibake"] == "you\u2019re welcome"
    assert kept["good-video"] == "hallo welt"  # the first of two samples with one id wins
    entry = summary.index
    assert entry["repaired"] == {"end_clamped": 1, "mojibake": 1}
    assert entry["rejected"] == len(rejects) == 10
    assert entry["samples"] == len(kept)
    assert sum(entry["rejects_by_reason"].values()) == entry["rejected"]


def test_a_different_build_into_the_same_folder_is_refused(tmp_path, capsys):
    manifest = frames_corpus(tmp_path / "corpus", 4)
    build(manifest, tmp_path / "out", "shards.samples_per_shard=2")
    before = tar_bytes(tmp_path / "out")
    code = main(["shards", "build", "--corpus", "manifest", "--root", str(manifest), "--split", "train", "--out", str(tmp_path / "out"),
                 "shards.short_side=32"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "different build" in err
    assert tar_bytes(tmp_path / "out") == before


def test_two_splits_share_one_folder(tmp_path):
    frames_corpus(tmp_path / "corpus", 4, split="train")
    frames_corpus(tmp_path / "corpus", 3, split="dev")
    for split in ("train", "dev"):
        build(tmp_path / "corpus", tmp_path / "out", f"corpus.split={split}")
    splits = read_index(tmp_path / "out")["splits"]
    assert {k: v["samples"] for k, v in splits.items()} == {"train": 4, "dev": 3}
    assert verify_folder(str(tmp_path / "out"), decode=True) == (2, [])


def test_verify_finds_a_damaged_shard(tmp_path):
    manifest = frames_corpus(tmp_path / "corpus", 4)
    build(manifest, tmp_path / "out", "shards.samples_per_shard=2")
    assert verify_folder(str(tmp_path / "out")) == (2, [])
    shard = tmp_path / "out" / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    checked, problems = verify_folder(str(tmp_path / "out"))
    assert checked == 2 and any("train-000001.tar" in p and "sha256" in p for p in problems)
    assert main(["shards", "verify", str(tmp_path / "out")]) == 1


def _tar_with(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_a_shard_with_a_pickle_member_is_refused_unread(tmp_path):
    import pickle

    marker = tmp_path / "pwned"
    payload = pickle.dumps(eval)  # any pickle; it must never be loaded
    shard = tmp_path / "evil.tar"
    shard.write_bytes(_tar_with({"a.json": b'{"text": "x", "num_frames": 1}', "a.pyd": payload}))
    with pytest.raises(ShardFormatError, match=r"evil\.tar: member 'a\.pyd' is not one fla_ds writes"):
        list(iter_raw_samples(str(shard)))
    assert not marker.exists()


def test_a_sample_missing_a_member_is_an_error_naming_it(tmp_path):
    shard = tmp_path / "half.tar"
    shard.write_bytes(_tar_with({"a.json": b'{"text": "x", "num_frames": 1}'}))
    with pytest.raises(ShardFormatError, match=r"half\.tar: sample 'a' lacks its \.frames member"):
        list(iter_raw_samples(str(shard)))


def test_sample_keys_have_no_dots(tmp_path):
    manifest, _ = bad_inputs_corpus(tmp_path / "corpus")
    build(manifest, tmp_path / "out")
    keys = [m.name for shard in (tmp_path / "out").glob("*.tar") for m in tarfile.open(shard)]
    assert keys and all(name.count(".") == 1 for name in keys)
    assert any(name.startswith("has_dots_and_slash_") for name in keys)


def _children(pid: int) -> set[int]:
    """Pids whose parent is ``pid`` (from /proc)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to find the workers")
def test_workers_exit_when_the_main_process_is_killed_and_no_temporary_file_survives_a_rerun(tmp_path):
    manifest = frames_corpus(tmp_path / "corpus", 24, min_frames=24, max_frames=30)
    settings = ["shards.samples_per_shard=2", "shards.short_side=160"]
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "fla_ds", "shards", "build", "--corpus", "manifest", "--root", str(manifest),
           "--split", "train", "--quiet", "--out", str(out), "--workers", "2", *settings]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    workers: set[int] = set()
    while time.monotonic() < deadline and proc.poll() is None:
        workers = {p for p in _children(proc.pid) if "spawn" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")}
        if len(workers) == 2 and list(out.glob(".train-*.tar.*.tmp")):
            break
        time.sleep(0.02)
    assert len(workers) == 2 and proc.poll() is None, "the build should be mid-way with two workers"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_alive(p) for p in workers):
        time.sleep(0.1)
    assert not [p for p in workers if _alive(p)], "workers outlived the killed build"

    summary = build(manifest, out, *settings)
    assert summary.index["samples"] == 24
    assert not list(out.rglob("*.tmp")), "a temporary file survived the rerun"


def test_a_build_that_keeps_no_sample_fails_with_one_line_and_keeps_its_rejects(tmp_path, capsys):
    rows = [{"id": f"gone{i}", "frames": f"frames/gone{i}", "text": "fehlt"} for i in range(5)]
    manifest = tmp_path / "corpus" / "train.jsonl"
    manifest.parent.mkdir(parents=True)
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
    out = tmp_path / "out"
    code = main(["shards", "build", "--corpus", "manifest", "--root", str(manifest), "--split", "train", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "no sample kept of 5 (5 missing frame folder)" in err and "rejects.jsonl" in err
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text("utf-8").splitlines()]
    assert [r["id"] for r in rejects] == [f"gone{i}" for i in range(5)]
    index = read_index(out)
    assert "train" not in index["splits"], "a failed build must not leave a split to train on"
    assert main(["shards", "verify", str(out)]) == 1
    assert "lists no split" in capsys.readouterr().out


def test_the_cuts_of_one_video_are_planned_together_and_shards_stay_identical_across_workers(tmp_path):
    """Rows of one raw video spread over the manifest land in one shard, in time order, and
    are read in one pass; frame folders around them keep the plain seeded order."""
    from corpus_factory import REAL_CLIPS, write_frames

    from fla_ds.config import load_config
    from fla_ds.shards.plan import make_plan

    root = tmp_path / "corpus"
    root.mkdir()
    (root / "raw.mp4").write_bytes(REAL_CLIPS[0].read_bytes())  # 17 frames at 24 fps
    rows = []
    for i in range(6):
        write_frames(root / "frames" / f"f{i}", 4, seed=i)
        rows.append({"id": f"f{i}", "frames": f"frames/f{i}", "text": f"folder {i}"})
        rows.append({"id": f"cut{i}", "video": "raw.mp4", "start": 0.1 * (5 - i), "end": 0.1 * (5 - i) + 0.2, "text": f"cut {i}"})
    manifest = write_manifest(root / "train.jsonl", rows)
    cfg = load_config(None, [f"corpus.root={manifest}", "shards.samples_per_shard=8"])
    plan = make_plan(cfg)
    holding = [s for s in plan.shards if any(p.sample.id.startswith("cut") for p in s)]
    assert len(holding) == 1, "all cuts of one video belong in one shard"
    cuts = [p for p in holding[0] if p.sample.id.startswith("cut")]
    assert [p.sample.id for p in cuts] == [f"cut{i}" for i in range(5, -1, -1)]  # by start time
    assert sum(len(s) for s in plan.shards) == 12 and all(len(s) <= 8 for s in plan.shards)
    build(manifest, tmp_path / "one", "shards.samples_per_shard=8", "shards.short_side=64", workers=1)
    build(manifest, tmp_path / "two", "shards.samples_per_shard=8", "shards.short_side=64", workers=2)
    assert tar_bytes(tmp_path / "one") == tar_bytes(tmp_path / "two")
    assert read_index(tmp_path / "one")["splits"]["train"]["samples"] == 12
