"""Stage 2 builds on stage 1: it reads clips as its encoder was trained (the encoder's augment
section, an explicit contradiction refused), its default prompt is in the language the shards
record (corpus -> index -> stage 2), and a run folder given for a checkpoint says which one it
chose and why. Real shard builds; a stage-1 step folder reduced to what these read (its
config.yaml and COMPLETE): the real run is in tests/test_stage2.py."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from corpus_factory import frames_corpus

from fla_ds.checkpoint import describe_choice, resolve_step_dir
from fla_ds.config import explicit_keys, load_config, save_resolved
from fla_ds.corpus import READERS
from fla_ds.preflight import LaunchError
from fla_ds.shards import build_shards
from fla_ds.shards.plan import BuildError
from fla_ds.stage2 import PROMPTS, inherit_stage1

PUBLISHED_LANGUAGES = {"phoenix14t": "de", "csl-daily": "zh", "how2sign": "en", "synthetic": "de", "manifest": ""}


def shards(tmp_path: Path, *overrides: str) -> Path:
    manifest = frames_corpus(tmp_path / "corpus", 3)
    out = tmp_path / "shards"
    build_shards(load_config(None, [f"corpus.root={manifest}", "corpus.name=manifest", f"shards.out={out}", "shards.short_side=32", *overrides]),
                 progress_bar=False)
    return out


def stage1_step(folder: Path, *overrides: str) -> Path:
    folder.mkdir(parents=True)
    save_resolved(load_config(None, list(overrides)), folder)
    (folder / "COMPLETE").write_text("{}")
    return folder


def stage2_cfg(encoder: Path, shard_dir: Path, *overrides: str):
    args = [f"stage2.encoder={encoder}", f"stream.shards={shard_dir}", *overrides]
    return load_config(None, args), explicit_keys(None, args)


def test_every_reader_declares_the_language_of_its_texts():
    assert {name: reader.language for name, reader in READERS.items()} == PUBLISHED_LANGUAGES


@pytest.mark.parametrize("given, recorded", [("", ""), ("fr", "fr"), ("pt-BR", "pt-BR")])
def test_the_index_records_the_corpus_language(tmp_path, given, recorded):
    out = shards(tmp_path, f"corpus.language='{given}'")
    assert json.loads((out / "index.json").read_text())["splits"]["train"]["language"] == recorded


def test_a_language_that_is_no_code_is_refused_in_one_line(tmp_path):
    with pytest.raises(BuildError, match=r"^corpus\.language: 'French' is not an ISO 639 language code"):
        shards(tmp_path, "corpus.language=French")


def test_stage2_reads_clips_as_its_encoder_was_trained(tmp_path):
    encoder = stage1_step(tmp_path / "stage1" / "step-4", "augment.crop_size=56", "augment.keep_ratio=0.5", "augment.max_rotation=0")
    cfg, explicit = stage2_cfg(encoder, shards(tmp_path, "corpus.language=en"))
    assert cfg.augment.crop_size == 224  # stage 2's schema default, before it inherits
    notes = inherit_stage1(cfg, explicit)
    assert (cfg.augment.crop_size, cfg.augment.keep_ratio, cfg.augment.max_rotation) == (56, 0.5, 0.0)
    assert dict(cfg.augment) == dict(load_config(str(encoder / "config.yaml")).augment)
    assert cfg.stage2.prompt == PROMPTS["en"] == "Translate the sign language video into English."
    assert any("crop 56" in n for n in notes) and any("(the shards' language: en)" in n for n in notes)


def test_an_override_that_agrees_with_the_encoder_is_fine_one_that_contradicts_it_is_refused(tmp_path):
    encoder = stage1_step(tmp_path / "step-4", "augment.crop_size=56")
    shard_dir = shards(tmp_path, "corpus.language=de")
    cfg, explicit = stage2_cfg(encoder, shard_dir, "augment.crop_size=56")
    inherit_stage1(cfg, explicit)
    assert cfg.augment.crop_size == 56
    # 224 is stage 2's default: an explicit 224 is still a contradiction, not a default.
    cfg, explicit = stage2_cfg(encoder, shard_dir, "augment.crop_size=224")
    with pytest.raises(LaunchError, match=r"^augment\.crop_size=224 contradicts augment\.crop_size=56 that the model was trained with "
                                          r"\(the stage-1 encoder, .*step-4/config\.yaml\)"):
        inherit_stage1(cfg, explicit)


def test_a_config_file_setting_augment_counts_as_explicit(tmp_path):
    encoder = stage1_step(tmp_path / "step-4", "augment.keep_ratio=0.5")
    config = tmp_path / "stage2.yaml"
    config.write_text(f"stage2:\n  encoder: {encoder}\nstream:\n  shards: {shards(tmp_path, 'corpus.language=de')}\naugment:\n  keep_ratio: 0.25\n")
    with pytest.raises(LaunchError, match=r"augment\.keep_ratio=0\.25 contradicts augment\.keep_ratio=0\.5"):
        inherit_stage1(load_config(str(config)), explicit_keys(str(config)))


@pytest.mark.parametrize("language, prompt", [("de", "Übersetze das Gebärdensprachvideo ins Deutsche."), ("zh", "将手语视频翻译成中文。"),
                                              ("zh-Hans", "将手语视频翻译成中文。")])
def test_the_default_prompt_follows_the_shards_language(tmp_path, language, prompt):
    cfg, explicit = stage2_cfg(stage1_step(tmp_path / "step-1"), shards(tmp_path, f"corpus.language='{language}'"))
    inherit_stage1(cfg, explicit)
    assert cfg.stage2.prompt == prompt


def test_an_explicit_prompt_is_kept_and_an_unknown_language_needs_one(tmp_path):
    encoder = stage1_step(tmp_path / "step-1")
    for language in ("", "fr"):
        shard_dir = shards(tmp_path / f"lang-{language}", f"corpus.language='{language}'")
        cfg, explicit = stage2_cfg(encoder, shard_dir)
        with pytest.raises(LaunchError, match=r"^stage2\.prompt: the training shards record .* set stage2\.prompt"):
            inherit_stage1(cfg, explicit)
        cfg, explicit = stage2_cfg(encoder, shard_dir, "stage2.prompt=Traduis la vidéo en français.")
        inherit_stage1(cfg, explicit)
        assert cfg.stage2.prompt == "Traduis la vidéo en français."


def test_a_run_folder_says_which_checkpoint_it_chose_and_why(tmp_path):
    run = tmp_path / "run"
    for step, score in ((2, 0.0), (4, 0.0), (6, 0.0)):
        stage1_step(run / f"step-{step}")
        (run / "eval" / f"step-{step}").mkdir(parents=True)
        (run / "eval" / f"step-{step}" / "metrics.json").write_text(json.dumps({"bleu4": score}))
    (run / "latest").write_text("step-6")
    assert describe_choice(run, resolve_step_dir(run)) == f"{run}: a run folder; using its latest checkpoint step-6 (none was chosen as best by an evaluation)"
    (run / "best").write_text(json.dumps({"step": "step-6", "metric": "dev bleu4", "value": 0.0}))
    assert resolve_step_dir(run) == run / "step-6"
    assert describe_choice(run, run / "step-6") == (f"{run}: a run folder; using its best checkpoint step-6 "
                                                    "(dev bleu4 0.00; 3 evaluations share this score, the latest saved one is kept)")
    assert describe_choice(run / "step-4", resolve_step_dir(run / "step-4")) == ""
