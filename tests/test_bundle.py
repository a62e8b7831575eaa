"""Inference bundles that travel (``fla-ds export``: fla_ds/inference.py, the decoder_only
backend's ``export``, fla_ds/backends.py ``copy_pretrained``): the base model inside the bundle
under its COMPLETE manifest, nothing outside the bundle read (a path in bundle.json leading out
refused), and ``--merge`` folding LoRA into the dequantized NF4 weights the run trained on,
checked against the unmerged model on a fixed probe. On the session's tiny stage-2 QLoRA run
(conftest.py ``tiny_stage2``), with the real bitsandbytes, peft and transformers."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import env, save_tiny_llama

from fla_ds.artifacts import ArtifactError, check_hf_folder, verify_folder
from fla_ds.atomic import sha256_file
from fla_ds.cli import main

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def bundles(tiny_stage2, tmp_path_factory) -> dict:
    """An unmerged and a merged bundle of the session's stage-2 step (in-process exports)."""
    root = tmp_path_factory.mktemp("bundles")
    for name, extra in (("bundle", []), ("merged", ["--merge"])):
        assert main(["export", "--checkpoint", str(tiny_stage2["stage2"]), "--out", str(root / name), *extra]) == 0
    return {**tiny_stage2, "bundle": root / "bundle", "merged": root / "merged"}


def linked_copy(folder: Path, dest: Path) -> Path:
    """A hard-linked copy (cheap; files in it are replaced, never written through)."""
    return Path(shutil.copytree(folder, dest, copy_function=os.link))


def replace(path: Path, data: bytes) -> None:
    path.unlink()
    path.write_bytes(data)


def reseal(folder: Path, name: str) -> None:
    """COMPLETE made to agree with ``folder/name`` (as a tampered bundle would be)."""
    manifest = json.loads((folder / "COMPLETE").read_text())
    manifest["files"][name] = {"bytes": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)}
    replace(folder / "COMPLETE", json.dumps(manifest).encode())


def translate(model: Path, videos: list[Path], capsys) -> str:
    """``fla-ds translate --beam 1`` in this process, on one thread as the subprocesses run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        capsys.readouterr()
        assert main(["translate", "--model", str(model), "--beam", "1", *map(str, videos)]) == 0
        return capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------ the base model inside


def test_a_bundle_holds_its_base_model_under_its_manifest(bundles, tmp_path, capfd):
    bundle, llama = bundles["bundle"], bundles["llama"]
    info = json.loads((bundle / "bundle.json").read_text())
    assert info["base_model"] == "base" and info["base_model_source"] == str(llama.resolve()) and info["merged"] is False
    base = sorted(p.name for p in (bundle / "base").iterdir())
    assert base == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert all((bundle / "base" / n).read_bytes() == (llama / n).read_bytes() for n in base)
    assert {f"base/{n}" for n in base} <= verify_folder(bundle).files
    merged = json.loads((bundles["merged"] / "bundle.json").read_text())
    assert "base_model" not in merged and not (bundles["merged"] / "base").exists()  # one full-precision folder: model/
    # One changed byte of the copied base model: refused by the manifest, in one line.
    case = linked_copy(bundle, tmp_path / "case")
    weights = case / "base" / "model.safetensors"
    data = weights.read_bytes()
    replace(weights, data[:100] + bytes([data[100] ^ 1]) + data[101:])
    capfd.readouterr()
    assert main(["translate", "--model", str(case), str(bundles["video"])]) == 2
    assert capfd.readouterr().err.strip() == f"fla-ds: error: {weights}: content differs from its sha256 in COMPLETE (damaged or replaced)"


def test_a_bundle_translates_with_its_base_model_gone(bundles, tmp_path, capsys):
    """Exported, then the base model folder moved away and a fresh process with an empty
    Hugging Face home (offline) and an empty fla_ds cache: the same translation."""
    videos = sorted((bundles["shards"].parent / "synth" / "videos").glob("*.mp4"))[:2]
    before = translate(bundles["bundle"], videos, capsys)
    assert before.count("\n") == 2
    llama, away = bundles["llama"], bundles["llama"].with_name("llama.moved")
    empty = {name: tmp_path / name for name in ("hf-home", "fla-ds-cache", "xdg-cache")}
    for folder in empty.values():
        folder.mkdir()
    llama.rename(away)
    try:
        proc = subprocess.run([sys.executable, "-m", "fla_ds", "translate", "--model", str(bundles["bundle"]), "--beam", "1", *map(str, videos)],
                              env={**env(), "HF_HUB_OFFLINE": "1", "HF_HOME": str(empty["hf-home"]), "FLA_DS_CACHE": str(empty["fla-ds-cache"]),
                                   "XDG_CACHE_HOME": str(empty["xdg-cache"])},
                              capture_output=True, text=True, timeout=300)
        merged = translate(bundles["merged"], videos, capsys)
    finally:
        away.rename(llama)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == before
    assert merged == before  # greedy: merged and unmerged translate alike
    assert all(not any(folder.iterdir()) for folder in empty.values())  # nothing fetched or cached


@pytest.mark.parametrize("kind", ["absolute (an old bundle)", "climbing out", "a link leading out", "missing"])
def test_a_bundle_path_leading_out_is_refused_in_one_line(bundles, tmp_path, capfd, kind):
    folder = linked_copy(bundles["bundle"], tmp_path / "case")
    info = json.loads((folder / "bundle.json").read_text())
    if kind == "a link leading out":
        (folder / "base-link").symlink_to(bundles["llama"], target_is_directory=True)
    value = {"absolute (an old bundle)": str(bundles["llama"]), "climbing out": "base/../../llama", "a link leading out": "base-link",
             "missing": None}[kind]
    info.pop("base_model")
    if value is not None:
        info["base_model"] = value
    replace(folder / "bundle.json", json.dumps(info).encode())
    reseal(folder, "bundle.json")
    capfd.readouterr()
    assert main(["translate", "--model", str(folder), str(bundles["video"])]) == 2
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"fla-ds: error: {folder / 'bundle.json'}: "), lines[0]
    if value is None:
        assert "names no base_model inside the bundle (run fla-ds export again)" in lines[0]
    else:
        assert f"base_model {value!r} points outside the bundle" in lines[0] and "run fla-ds export again" in lines[0]


def test_copy_pretrained_takes_only_what_a_model_folder_needs(tmp_path):
    """No pickles, no code, links (the Hugging Face cache's) written as plain files, a sharded
    checkpoint with its index; a folder without safetensors weights is refused."""
    from transformers import LlamaForCausalLM

    from fla_ds.backends import copy_pretrained

    source = save_tiny_llama(tmp_path / "llama")
    LlamaForCausalLM.from_pretrained(source).save_pretrained(source, max_shard_size="100KB")
    (source / "model.safetensors").unlink()
    elsewhere = tmp_path / "blobs"
    elsewhere.mkdir()
    (source / "config.json").rename(elsewhere / "config")
    (source / "config.json").symlink_to(elsewhere / "config")
    for name in ("pytorch_model.bin", "optimizer.pt", "training_args.pkl", "modeling_evil.py", "README.md", "consolidated.safetensors"):
        (source / name).write_bytes(b"not for a bundle")
    copied = copy_pretrained(source, tmp_path / "out")
    shards = sorted(p.name for p in source.glob("model-*.safetensors"))
    assert len(shards) > 1 and copied[:len(shards) + 1] == ["model.safetensors.index.json", *shards]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(copied)
    assert set(copied) - set(shards) == {"model.safetensors.index.json", "config.json", "generation_config.json", "tokenizer.json",
                                         "tokenizer_config.json"}
    assert not (tmp_path / "out" / "config.json").is_symlink() and (tmp_path / "out" / "config.json").read_bytes() == (elsewhere / "config").read_bytes()
    assert len(check_hf_folder(tmp_path / "out", "config.json", "model")) == len(LlamaForCausalLM.from_pretrained(source).state_dict())
    only_pickles = tmp_path / "pickles"
    only_pickles.mkdir()
    (only_pickles / "config.json").write_text("{}")
    (only_pickles / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ArtifactError, match="has no model.safetensors"):
        copy_pretrained(only_pickles, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


# ------------------------------------------------------------------ --merge


def loaded(folder: Path):
    """(the bundle's VisualLLM in float32 on the CPU, its config), as translate loads it."""
    from fla_ds.backends import get_backend
    from fla_ds.config import load_config
    from fla_ds.model.projector import Projector
    from fla_ds.translator import read_bundle_info

    cfg = load_config(str(folder / "config.yaml"))
    projector = Projector.load(folder / "projector", dtype=torch.float32)
    return get_backend("decoder_only").load(folder, cfg, projector, torch.float32, read_bundle_info(folder)).eval(), cfg


def test_merge_folds_lora_into_the_dequantized_4bit_weights(bundles):
    from fla_ds.artifacts import load_adapter
    from fla_ds.model.llm import VisualLLM, load_base
    from fla_ds.model.merge import MERGE_RTOL, PROBE, merge_check, probe_clips

    unmerged, cfg = loaded(bundles["bundle"])
    merged, _ = loaded(bundles["merged"])
    recorded = json.loads((bundles["merged"] / "bundle.json").read_text())["merge_check"]
    assert recorded["probe"] == PROBE and recorded["max_abs_logit_diff"] <= recorded["tolerance"]
    check = merge_check(unmerged, merged)
    assert check["max_abs_logit_diff"] <= check["tolerance"] == pytest.approx(recorded["tolerance"])
    assert check["max_abs_logit_diff"] == pytest.approx(recorded["max_abs_logit_diff"], abs=1e-6)
    assert check["tolerance"] >= MERGE_RTOL
    # Every merged weight is the dequantized NF4 weight plus the LoRA delta.
    weights = merged.llm.state_dict()
    lora_layers = [(n, m) for n, m in unmerged.llm.named_modules() if isinstance(getattr(m, "base_layer", None), bnb.nn.Linear4bit)]
    assert len(lora_layers) == 2 * 7
    for name, module in lora_layers:
        base = module.base_layer.weight
        expected = bnb.functional.dequantize_4bit(base.data, base.quant_state) + module.get_delta_weight("default")
        key = name.removeprefix("base_model.model.") + ".weight"
        assert torch.allclose(weights[key], expected, atol=1e-6, rtol=0), key
    # The old merge, LoRA folded into the original un-quantized weights, fails the same check.
    llama, adapter = bundles["llama"], bundles["merged"] / "adapter"
    old = load_adapter(llama, adapter, lambda: load_base(llama, qlora=False, dtype=torch.float32)).merge_and_unload().eval()
    stray = merge_check(unmerged, VisualLLM(old, merged.tokenizer, merged.projector, cfg.stage2.prompt))
    assert stray["max_abs_logit_diff"] > 100 * stray["tolerance"], stray
    # Greedy translations of the probe: identical merged and unmerged.
    features, mask = probe_clips(merged.projector.config()["in_dim"])
    texts = merged.generate(features, mask, max_new_tokens=8, num_beams=1)
    assert texts == unmerged.generate(features, mask, max_new_tokens=8, num_beams=1) and any(texts)


def test_a_merge_past_the_tolerance_fails_the_export_and_leaves_nothing(bundles, tmp_path, capfd, monkeypatch):
    """The export with the old merge put back (LoRA folded into the un-quantized weights): one
    line, exit 2, no bundle and no temporary folder."""
    import fla_ds.model.merge as merge

    monkeypatch.setattr(merge, "dequantized_base", lambda path: merge.load_base(path, qlora=False, dtype=torch.float32))
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "merged"
    capfd.readouterr()
    assert main(["export", "--checkpoint", str(bundles["stage2"]), "--out", str(out), "--merge"]) == 2
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fla-ds: error: {out / 'model'}: merged logits differ from the unmerged model's"), lines
    assert "past the tolerance" in lines[0] and "no bundle written" in lines[0]
    assert list((tmp_path / "out").iterdir()) == []
