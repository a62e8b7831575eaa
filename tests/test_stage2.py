"""Stage 2 for real: a tiny random LLaMA in 4-bit QLoRA under DeepSpeed ZeRO-3 on 2 ranks
(gloo), from a feature cache; generation, the adapter reloaded in a fresh process, resume,
export and translate; the mBART backend; the T5 backend under ZeRO-2, exported and translating;
training straight from video. Inference never imports the training stages."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import TINY_STAGE1, TRAIN, env, losses, run, save_tiny_llama, save_tiny_mbart, save_tiny_t5, stage2_cmd, synthetic_shards, train_tiny_tokenizer

from fla_ds.checkpoint import check_complete


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("stage2")
    shards = synthetic_shards(root)
    tokenizer = train_tiny_tokenizer(root / "tokenizer")
    stage1 = root / "stage1"
    run([sys.executable, TRAIN, "--stage", "1", f"stream.shards={shards}", f"train.tokenizer={tokenizer}", f"train.out={stage1}",
         *TINY_STAGE1, "train.epochs=1", "train.max_steps=2", "eval.limit=2"])
    features = root / "features"
    run([sys.executable, "-m", "fla_ds", "features", "extract", "--checkpoint", str(stage1), "--shards", str(shards), "--out", str(features), "--workers", "1"])
    return {"shards": shards, "stage1": stage1, "features": features, "llama": save_tiny_llama(root / "llama"), "mbart": save_tiny_mbart(root / "mbart"),
            "t5": save_tiny_t5(root / "t5")}


def falls(curve: dict[int, float]) -> bool:
    steps = sorted(curve)
    first, last = sum(curve[s] for s in steps[:3]) / 3, sum(curve[s] for s in steps[-3:]) / 3
    return last < first * 0.8


RELOAD = r"""
import json, sys, torch
from omegaconf import OmegaConf
from fla_ds.inference import load_translator
from fla_ds.stream import ShardStream
step, features = sys.argv[1], sys.argv[2]
t = load_translator(step)
stream_cfg = OmegaConf.merge(t.cfg.stream, {"shards": features, "split": "dev", "train": False, "num_workers": 0})
out = {}
for batch in ShardStream(stream_cfg, 0, 1, 2, t.augment, limit=4):
    for i, text, ok in zip(batch.id, t(batch), batch.valid.tolist()):
        if ok:
            out[i] = text
training = sorted(m for m in sys.modules if m in ("fla_ds.stage1", "fla_ds.stage2", "fla_ds.trainer"))
print(json.dumps({"hypotheses": out, "training_modules": training}))
"""


def reload_hypotheses(folder, features) -> dict:
    """What ``load_translator(folder)`` decodes of the dev cache's first 4 clips, in a fresh
    process, which must import no training stage to do it."""
    proc = subprocess.run([sys.executable, "-c", RELOAD, str(folder), str(features)], env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["training_modules"] == [], result["training_modules"]
    return result["hypotheses"]


def eval_hypotheses(run_dir, step: int) -> dict:
    return {row.split("\t")[0]: row.split("\t")[1] for row in (run_dir / "eval" / f"step-{step}" / "hypotheses.tsv").read_text().splitlines()[1:]}


def test_qlora_zero3_two_ranks_trains_generates_saves_and_resumes(assets, tmp_path):
    out = tmp_path / "run"
    common = [f"stage2.model={assets['llama']}", f"stage2.features={assets['features']}", "train.ds_config=ds_configs/zero3.json", "train.epochs=3",
              "train.lr=1e-2", "stage2.projector_lr=1e-2"]
    proc = run(stage2_cmd(assets, out, 2, *common, "train.max_steps=12"))
    assert falls(losses(out)), losses(out)
    assert "evaluation decodes on an unpartitioned copy of the ZeRO-3 model" in proc.stderr
    final = out / "step-12"
    assert check_complete(final, hashes=True) is None
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "projector/projector.safetensors",
                 "encoder/encoder.safetensors", "tokenizer/tokenizer.json"):
        assert (final / name).is_file(), name
    # The adapter saved after generating (the evaluation) reloads in a fresh process and
    # translates exactly as the training process's decoding copy did (LoRA and projector
    # copied into it at each evaluation: a stale or missed copy would translate otherwise).
    expected = eval_hypotheses(out, 12)
    assert reload_hypotheses(final, assets["features"]) == expected
    # A longer budget continues from the checkpoint, on one rank (a requeue on fewer nodes):
    # the ZeRO-3 QLoRA state goes through DeepSpeed's universal checkpoint conversion.
    before = losses(out)
    # Decoding on the partitioned model this time (eval.zero3_copy=false: for a model that does
    # not fit a GPU twice): the same translations as the saved adapter's too.
    proc = run(stage2_cmd(assets, out, 1, *common, "train.max_steps=14", "eval.zero3_copy=false"))
    assert "written by 2 ranks with ZeRO-3" in proc.stderr and "resumed from" in proc.stderr
    assert (out / "step-14" / "COMPLETE").is_file() and "unpartitioned copy" not in proc.stderr
    assert reload_hypotheses(out / "step-14", assets["features"]) == eval_hypotheses(out, 14)
    after = losses(out)
    assert sorted(after) == list(range(1, 15))
    assert max(after[13], after[14]) < 0.8 * (before[1] + before[2]) / 2, after  # the curve continues, not restarts


def test_export_and_translate_a_video(assets, tmp_path):
    out = tmp_path / "run"
    run(stage2_cmd(assets, out, 1, f"stage2.model={assets['llama']}", f"stage2.features={assets['features']}", "train.epochs=1", "train.max_steps=2"))
    bundle = tmp_path / "bundle"
    run([sys.executable, "-m", "fla_ds", "export", "--checkpoint", str(out), "--out", str(bundle)])
    assert json.loads((bundle / "bundle.json").read_text())["backend"] == "decoder_only"
    video = sorted((assets["shards"].parent / "synth" / "videos").glob("*.mp4"))[0]
    proc = run([sys.executable, "-m", "fla_ds", "translate", "--model", str(bundle), "--beam", "1", str(video)])
    assert proc.stdout.startswith(str(video) + "\t")


def test_mbart_backend_trains_under_zero3_and_decodes_on_its_copy(assets, tmp_path):
    """Full fine-tuning partitioned by ZeRO-3: the dev decoding copy (every weight trained, so
    all of it is copied in) translates as the saved model reloaded in a fresh process."""
    out = tmp_path / "run"
    proc = run(stage2_cmd(assets, out, 1, "stage2.backend=mbart", f"stage2.model={assets['mbart']}", f"stage2.features={assets['features']}",
                          "train.ds_config=ds_configs/zero3.json", "train.epochs=5", "train.max_steps=20", "train.lr=1e-2", "stage2.projector_lr=1e-2"))
    assert falls(losses(out)), losses(out)
    assert (out / "step-20" / "mbart" / "model.safetensors").is_file()
    assert "evaluation decodes on an unpartitioned copy of the ZeRO-3 model" in proc.stderr
    assert reload_hypotheses(out / "step-20", assets["features"]) == eval_hypotheses(out, 20)


def test_t5_backend_under_zero2_trains_evaluates_exports_and_translates(assets, tmp_path):
    out = tmp_path / "run"
    run(stage2_cmd(assets, out, 1, "stage2.backend=t5", f"stage2.model={assets['t5']}", f"stage2.features={assets['features']}",
                   "train.ds_config=ds_configs/zero2.json", "train.epochs=5", "train.max_steps=20", "train.lr=1e-2", "stage2.projector_lr=1e-2"))
    assert falls(losses(out)), losses(out)
    final = out / "step-20"
    assert check_complete(final, hashes=True) is None
    for name in ("t5/model.safetensors", "t5/config.json", "t5/tokenizer.json", "projector/projector.safetensors", "encoder/encoder.safetensors"):
        assert (final / name).is_file(), name
    assert not (final / "adapter").exists() and not (final / "mbart").exists()
    metrics = json.loads((out / "eval" / "step-20" / "metrics.json").read_text())
    assert metrics["n"] == 4 and "signjoey" in metrics["convention"]
    bundle = tmp_path / "bundle"
    run([sys.executable, "-m", "fla_ds", "export", "--checkpoint", str(out), "--out", str(bundle)])
    assert json.loads((bundle / "bundle.json").read_text())["backend"] == "t5"
    assert sorted(p.name for p in bundle.iterdir()) == ["COMPLETE", "bundle.json", "config.yaml", "encoder", "projector", "t5"]
    # The bundle, in a fresh process, translates the dev clips exactly as training evaluated them.
    assert reload_hypotheses(bundle, assets["features"]) == eval_hypotheses(out, 20)
    video = sorted((assets["shards"].parent / "synth" / "videos").glob("*.mp4"))[0]
    proc = run([sys.executable, "-m", "fla_ds", "translate", "--model", str(bundle), "--beam", "1", str(video)])
    assert proc.stdout.startswith(str(video) + "\t")


def test_training_from_video_without_a_cache(assets, tmp_path):
    out = tmp_path / "run"
    run(stage2_cmd(assets, out, 1, f"stage2.model={assets['llama']}", f"stream.shards={assets['shards']}", "augment.crop_size=28",
                   "augment.keep_ratio=0.1", "augment.max_frames=6", "train.epochs=1", "train.max_steps=3"))
    assert sorted(losses(out)) == [1, 2, 3]


def test_a_feature_cache_verifies_like_video_shards(assets):
    from fla_ds.shards.verify import verify_folder

    checked, problems = verify_folder(str(assets["features"]))
    assert checked >= 2 and problems == []
