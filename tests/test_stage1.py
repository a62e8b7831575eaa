"""Stage 1 for real: DeepSpeed ZeRO-2 and ZeRO-3 over gloo on 2 ranks, a tiny model on the
synthetic corpus; checkpoint fallback; evaluation (signals and requeues: tests/test_resilience.py)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, TRAIN, env, losses, run, synthetic_shards, train_cmd, train_tiny_tokenizer
from safetensors.torch import load_file

from fla_ds.checkpoint import check_complete, step_dirs
from fla_ds.hypotheses import read_tsv
from fla_ds.trainer import fill_ds_config, load_ds_config


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("stage1")
    return {"shards": synthetic_shards(root), "tokenizer": train_tiny_tokenizer(root / "tokenizer")}


def test_every_shipped_deepspeed_json_fills_its_auto_values():
    from fla_ds.config import load_config

    cfg = load_config(None, ["train.global_batch=8", "train.micro_batch=2"])
    for path in sorted((ROOT / "ds_configs").glob("*.json")):
        filled = fill_ds_config(load_ds_config(str(path)), cfg, world=2, hidden_size=512)
        text = json.dumps(filled)
        assert '"auto"' not in text, path.name
        assert filled["gradient_accumulation_steps"] == 2 and filled["train_batch_size"] == 8


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_two_ranks_train_and_the_loss_falls(assets, tmp_path, zero):
    out = tmp_path / "run"
    proc = run(train_cmd(assets, out, 2, f"train.ds_config=ds_configs/{zero}.json", "train.epochs=4", "train.max_steps=24",
                    "train.best_metric=rouge_l"))
    curve = losses(out)
    steps = sorted(curve)
    assert steps[-1] == 24
    first, last = sum(curve[s] for s in steps[:4]) / 4, sum(curve[s] for s in steps[-4:]) / 4
    assert last < first * 0.8, f"loss did not fall: {first:.3f} -> {last:.3f}"
    # Checkpoints: complete, self-contained, the encoder loads without DeepSpeed.
    final = out / "step-24"
    assert check_complete(final, hashes=True) is None
    assert (out / "latest").read_text().strip() == "step-24"
    for name in ("encoder.safetensors", "model.safetensors", "config.yaml", "vocab.json", "trainer.json", "tokenizer/tokenizer.json"):
        assert (final / name).is_file(), name
    from fla_ds.model import VisualEncoder

    encoder = VisualEncoder(out_dim=32)
    encoder.load_state_dict(load_file(str(final / "encoder.safetensors")))
    # Evaluation ran on dev, decoded on both ranks, scored with its convention written down.
    metrics = json.loads((out / "eval" / "step-24" / "metrics.json").read_text())
    assert metrics["n"] == 4 and "signjoey" in metrics["convention"]
    assert len((out / "eval" / "step-24" / "hypotheses.tsv").read_text().splitlines()) == 5
    # What the user watches: step/total with an ETA, each evaluation with translations beside
    # their references, and a closing summary naming the best checkpoint and where they are.
    out_lines = proc.stdout
    assert re.search(r"^step 24/24 epoch=\d+ loss=\S+ lr=\S+ .*grad_norm=\S+ .*eta=\S+$", out_lines, re.M), out_lines[-3000:]
    assert re.search(r"^eval: step=24 epoch=\d+ .*bleu4=", out_lines, re.M)
    rows = (out / "eval" / "step-24" / "hypotheses.tsv").read_text().splitlines()[1:]
    first_id, first_hyp, first_ref = rows[0].split("\t")
    assert f"  {first_id}\n    reference:  {first_ref}\n    hypothesis: {first_hyp}" in out_lines
    # RUN/best is the checkpoint with the highest dev score named by train.best_metric; of
    # several with that score (every epoch is saved here), the latest, the most trained.
    best = json.loads((out / "best").read_text())
    evals = {int(d.name.split("-")[1]): json.loads((d / "metrics.json").read_text())["rouge_l"] for d in (out / "eval").glob("step-*")}
    top = max(evals.values())
    assert best == {"step": f"step-{max(s for s, v in evals.items() if v == top)}", "metric": "dev rouge_l", "value": top}
    assert re.search(rf"^summary: finished at step 24 of 24 .* samples/s\n  best: {best['step']} by {best['metric']} ", out_lines, re.M), out_lines[-1500:]
    assert f"  checkpoints: {out} (latest step-24)" in out_lines


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(assets, tmp_path):
    out = tmp_path / "run"
    run(train_cmd(assets, out, 1, "train.epochs=1", "train.max_steps=4", "train.save_every=2", "eval.limit=2"))
    assert [p.name for p in step_dirs(out)] == ["step-4", "step-2"]
    damaged = out / "step-4" / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-100])  # truncated
    proc = run(train_cmd(assets, out, 1, "train.epochs=2", "train.max_steps=6", "train.save_every=2", "eval.limit=2"))
    assert "step-4 is not usable" in proc.stderr and "resumed from" in proc.stderr
    assert "step-2" in proc.stderr.split("resumed from")[1].splitlines()[0]
    assert check_complete(out / "step-6", hashes=True) is None


def test_evaluate_command_scores_a_checkpoint(assets, tmp_path):
    out = tmp_path / "run"
    run(train_cmd(assets, out, 1, "train.epochs=1", "train.max_steps=2", "eval.limit=2"))
    proc = run([sys.executable, "-m", "fla_ds", "evaluate", "--checkpoint", str(out), "--shards", str(assets["shards"]), "--split", "dev", "--beam", "1"])
    assert "bleu4" in proc.stdout and "signjoey" in proc.stdout
    assert f"fla-ds: {out}: a run folder; using its best checkpoint step-2 (dev bleu4 " in proc.stderr, proc.stderr[-2000:]
    # The clips are read as the model was trained: an override saying otherwise is refused.
    refused = subprocess.run([sys.executable, "-m", "fla_ds", "evaluate", "--checkpoint", str(out / "step-2"), "--shards", str(assets["shards"]),
                              "--split", "dev", "augment.crop_size=99"], env=env(), capture_output=True, text=True, timeout=400)
    assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0, refused.stderr[-2000:]
    assert "augment.crop_size=99 contradicts augment.crop_size=" in refused.stderr
    metrics = json.loads((out / "step-2" / "eval-dev" / "metrics.json").read_text())
    assert metrics["n"] == 8
    # Decoding overrides reach the decoder (eval.max_new_tokens caps every hypothesis).
    run([sys.executable, "-m", "fla_ds", "evaluate", "eval.max_new_tokens=1", "--checkpoint", str(out / "step-2"), "--shards", str(assets["shards"]),
         "--split", "dev", "--beam", "1", "--out", str(tmp_path / "capped")])
    capped = read_tsv(tmp_path / "capped" / "hypotheses.tsv")
    assert len(capped) == 8 and all(len(r["hypothesis"].split()) <= 1 for r in capped), capped
    evaluated = {r["id"]: r["hypothesis"] for r in read_tsv(out / "step-2" / "eval-dev" / "hypotheses.tsv")}
    # translate: the same hypotheses for the same clips, one record per clip in either format,
    # whatever the file names hold (a TAB, a newline, a backslash), whitespace-normalised.
    import shutil

    videos = assets["shards"].parent / "synth" / "videos"
    odd = tmp_path / "a\tb\nc\\d"
    odd.mkdir()
    inputs = [str(videos / "synth-dev-000001.mp4"), str(Path(shutil.copy(videos / "synth-dev-000002.mp4", odd / "clip 2.mp4")))]
    tsv = run([sys.executable, "-m", "fla_ds", "translate", "--model", str(out / "step-2"), "--beam", "1", "--header", *inputs]).stdout
    (tmp_path / "out.tsv").write_text(tsv)
    rows = read_tsv(tmp_path / "out.tsv")
    assert [r["input"] for r in rows] == inputs and len(tsv.splitlines()) == 3
    jsonl = run([sys.executable, "-m", "fla_ds", "translate", "--model", str(out / "step-2"), "--beam", "1", "--format", "jsonl", *inputs]).stdout
    records = [json.loads(line) for line in jsonl.splitlines()]
    assert [r["input"] for r in records] == inputs
    for hypotheses in ([r["hypothesis"] for r in rows], [r["hypothesis"] for r in records]):
        assert hypotheses == [evaluated["synth-dev-000001"], evaluated["synth-dev-000002"]]
    assert all(h == " ".join(h.split()) for h in evaluated.values()), evaluated
    # A split that kept no sample (as older builds wrote it) is an error, not nan scores.
    empty = Path(shutil.copytree(assets["shards"], tmp_path / "empty"))
    index = json.loads((empty / "index.json").read_text())
    index["splits"]["dev"].update(shards=[], samples=0, frames=0, bytes=0)
    (empty / "index.json").write_text(json.dumps(index))
    proc = subprocess.run([sys.executable, "-m", "fla_ds", "evaluate", "--checkpoint", str(out / "step-2"), "--shards", str(empty), "--split", "dev"],
                          env=env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr[-2000:]
    assert "split 'dev' has no samples" in proc.stderr


def test_a_bad_config_key_stops_before_training(assets, tmp_path):
    proc = subprocess.run([sys.executable, TRAIN, "--stage", "1", "train.lrr=1"], env=env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "did you mean 'train.lr'" in proc.stderr
