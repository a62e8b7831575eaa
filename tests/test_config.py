"""The one config schema: shipped files load, overrides apply, mistakes are one-line errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fla_ds.cli import main
from fla_ds.config import CONFIG_DIR, ConfigError, load_config

SHIPPED = sorted(CONFIG_DIR.glob("*.yaml"))


def test_there_are_shipped_configs():
    assert any(p.stem == "demo" for p in SHIPPED)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_config_loads(path):
    cfg = load_config(str(path))
    assert cfg.shards.samples_per_shard > 0


def test_overrides_take_precedence_over_the_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("shards:\n  short_side: 128\n  workers: 3\n")
    cfg = load_config(str(f), ["shards.short_side=96", "stream.train=false", "shards.order_seed=null"])
    assert (cfg.shards.short_side, cfg.shards.workers, cfg.stream.train, cfg.shards.order_seed) == (96, 3, False, None)


def test_an_unknown_key_names_the_closest_valid_one():
    with pytest.raises(ConfigError, match=r"unknown config key 'shards.sampels_per_shard' \(did you mean 'shards.samples_per_shard'\?\)"):
        load_config(None, ["shards.sampels_per_shard=3"])


def test_an_unknown_key_in_a_file_is_refused(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  microbatch: 4\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'train.microbatch' \(did you mean 'train.micro_batch'\?\)"):
        load_config(str(f))


def test_a_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match="shards.workers"):
        load_config(None, ["shards.workers=many"])


def test_values_are_never_evaluated(tmp_path):
    marker = tmp_path / "ran"
    with pytest.raises(ConfigError, match="bad value for config key 'demo.out'"):
        load_config(None, [f"demo.out=!!python/object/apply:os.system ['touch {marker}']"])
    f = tmp_path / "c.yaml"
    f.write_text(f"demo:\n  out: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(f))
    assert not marker.exists()


def test_cli_refuses_a_bad_key_with_exit_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["shards", "build", "--corpus", "manifest", "--root", str(tmp_path), "--out", str(out), "shards.bogus=1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "shards.bogus" in err
    assert not out.exists()


def test_the_resolved_config_is_a_yaml_that_loads_back(tmp_path):
    from fla_ds.config import save_resolved

    cfg = load_config("demo", ["shards.workers=1"])
    path = save_resolved(cfg, tmp_path)
    again = load_config(str(path))
    assert yaml.safe_load(path.read_text()) == yaml.safe_load(Path(save_resolved(again, tmp_path / "b")).read_text())


def test_overrides_may_stand_between_flags(tmp_path):
    from fla_ds.cli import parse

    args = parse(["shards", "build", "shards.short_side=32", "--corpus", "manifest", "shards.order_seed=1", "--root", "r", "--out", "o"])
    assert args.overrides == ["shards.short_side=32", "shards.order_seed=1"] and args.corpus == "manifest"
    with pytest.raises(SystemExit):
        parse(["shards", "build", "--bogus-flag"])


@pytest.mark.parametrize("override, message", [
    ("train.optimizer=adam", "train.optimizer"),
    ("train.precision=fp16", "train.precision"),
    ("eval.level=sentence", "eval.level"),
    ("stage2.backend=mbrat", "'mbrat' is not one of decoder_only, mbart"),
    ("corpus.name=phoenix", "'phoenix' is not one of"),
    ("train.loggers=[jsonl,wandbb]", "'wandbb' is not one of"),
    ("train.best_metric=bleu5", "(did you mean 'bleu4'?)"),
])
def test_closed_sets_are_refused_at_parse_time_in_one_line(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_run_folders_keep_no_tooling_sections(tmp_path):
    from fla_ds.config import TOOLING_SECTIONS, save_resolved

    saved = yaml.safe_load(save_resolved(load_config("demo"), tmp_path).read_text())
    assert not set(TOOLING_SECTIONS) & set(saved) and {"train", "augment", "eval"} <= set(saved)


def test_every_schema_key_is_read_somewhere():
    """A key nothing reads is a knob that does nothing (stream.shuffle_window was one)."""
    import re

    from fla_ds.config import all_keys

    package = Path(__file__).resolve().parent.parent / "fla_ds"
    source = "\n".join(p.read_text() for p in package.rglob("*.py") if p.name != "config.py")
    unread = []
    for key in all_keys():
        section, _, field = key.partition(".")
        if field and not re.search(rf"\.{field}\b|[\"']{field}[\"']", source):
            unread.append(key)
    assert unread == []


def test_an_empty_override_clears_a_text_key_and_is_refused_for_a_number():
    cfg = load_config(None, ["visual.pretrained=/x.safetensors", "visual.pretrained="])
    assert cfg.visual.pretrained == ""
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(None, ["train.epochs="])
