"""The command line's seams, as a new user meets them: clips on both sides of translate's
flags, the errors of a checkpoint path that does not hold one yet, a stage-2 checkpoint given
where a stage-1 encoder is needed, `fla-ds train` naming itself in its errors, and a shard
build that says where its rejects are and that it recorded no language."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import env

from fla_ds.cli import main, parse


def test_translate_takes_its_clips_before_and_after_the_flags():
    args = parse(["translate", "a.mp4", "--model", "m", "--beam", "2", "frames/b", "--format", "jsonl", "c d.mov"])
    assert args.inputs == ["a.mp4", "frames/b", "c d.mov"] and args.model == "m" and args.beam == 2 and args.format == "jsonl"
    with pytest.raises(SystemExit):
        parse(["translate", "a.mp4", "--model", "m", "--bogus"])


def test_a_checkpoint_path_without_a_checkpoint_says_what_it_is(tmp_path, capsys):
    (tmp_path / "early").mkdir()
    (tmp_path / "early" / "config.yaml").write_text("train: {}\n")
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"")
    assert main(["translate", "--model", str(tmp_path / "early"), str(clip)]) == 2
    expected = f"{tmp_path / 'early'}: a run folder with no complete checkpoint yet (the first is written at the end of the first epoch)"
    assert capsys.readouterr().err.strip() == f"fla-ds: error: {expected}"
    assert main(["evaluate", "--checkpoint", str(tmp_path / "nowhere"), "--shards", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"fla-ds: error: {tmp_path / 'nowhere'}: no such checkpoint or run folder"


def test_features_from_a_stage2_checkpoint_is_refused_before_any_work(tmp_path, capsys):
    step = tmp_path / "run" / "step-4"
    (step / "projector").mkdir(parents=True)
    (step / "COMPLETE").write_text("{}")
    assert main(["features", "extract", "--checkpoint", str(step), "--shards", str(tmp_path), "--out", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a stage-2 checkpoint; features come from the stage-1 encoder" in err
    assert not (tmp_path / "f").exists()


def test_fla_ds_train_names_itself_in_its_errors():
    proc = subprocess.run([sys.executable, "-m", "fla_ds", "train", "--stage", "1", "train.epoch=5"], env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "fla-ds train: error: unknown config key 'train.epoch' (did you mean 'train.epochs'?)"


def test_a_build_names_its_rejects_file_and_says_when_no_language_is_recorded(tmp_path, capsys):
    import shutil
    from pathlib import Path

    root = tmp_path / "corpus"
    (root / "videos").mkdir(parents=True)
    shutil.copy(Path(__file__).parent / "fixtures" / "how2sign" / "clips" / "_5keJZsmTh0_0-5-rgb_front.mp4", root / "videos" / "a.mp4")
    rows = [{"id": "a", "video": "videos/a.mp4", "text": "guten abend"}, {"id": "gone", "video": "videos/gone.mp4", "text": "x"}]
    (root / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "shards"
    assert main(["shards", "build", "--quiet", "--corpus", "manifest", "--root", str(root), "--split", "dev", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert f"rejected 1 (1 missing video file), repaired none; each reject named in {out / 'rejects.jsonl'}" in captured.out
    assert "these shards record no language" in captured.err
    assert main(["shards", "build", "corpus.language=de", "--quiet", "--corpus", "manifest", "--root", str(root), "--split", "dev",
                 "--out", str(tmp_path / "shards-de")]) == 0
    assert "record no language" not in capsys.readouterr().err
