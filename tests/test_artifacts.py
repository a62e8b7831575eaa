"""Trained artifacts are untrusted input (fla_ds/artifacts.py): every hostile-file kind at every
entry point that loads one, on small real checkpoints (a stage-1 run, a stage-2 QLoRA run on a
tiny LLaMA, a bundle and a merged bundle of it).

Each hostile folder is made consistent first (its COMPLETE manifest rewritten for the new
file), so that the loader's own checks must catch it, except in the sha256 case, which is
what the manifest catches. Every case: ``fla_ds.cli.main`` returns 2, stderr is one line
naming the file and the problem, no "weights_only", nothing unpickled (the pickles create a
marker file when unpickled), and export leaves no bundle and no temporary folder."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY_STAGE2, env
from safetensors.torch import save

from fla_ds.artifacts import ArtifactError, check_safetensors, hf_errors, load_safetensors, load_state, verify_folder, write_manifest
from fla_ds.atomic import sha256_file
from fla_ds.cli import main


@pytest.fixture(scope="module")
def assets(tiny_stage2, tmp_path_factory) -> dict:
    """The session's tiny stage-1 and stage-2 runs (conftest.py), a bundle and a merged bundle
    of the stage-2 step; and, per weights file, a real file of another model size."""
    root = tmp_path_factory.mktemp("artifacts")
    warm_up_deepspeed()
    assert main(["export", "--checkpoint", str(tiny_stage2["stage2"]), "--out", str(root / "bundle")]) == 0
    assert main(["export", "--checkpoint", str(tiny_stage2["stage2"]), "--out", str(root / "merged"), "--merge"]) == 0
    return {**tiny_stage2, "root": root, "bundle": root / "bundle", "merged": root / "merged",
            "other_size": other_size_files(root, tiny_stage2["stage1"], tiny_stage2["llama"])}


def warm_up_deepspeed() -> None:
    """DeepSpeed's first process group in a process reports on stderr (the CPU accelerator, op
    builds) before any checkpoint is read; done once here, so that a case's stderr is only
    what fla-ds says about the file."""
    from fla_ds.distributed import init_distributed, shutdown

    saved = dict(os.environ)
    init_distributed()
    shutdown()
    # init_distributed sets RANK, WORLD_SIZE, MASTER_PORT ... in this (pytest's) process: left
    # there, every later test's subprocesses would inherit one rendezvous port and collide.
    os.environ.clear()
    os.environ.update(saved)


def other_size_files(root: Path, stage1: Path, llama: Path) -> dict[str, bytes]:
    """Intact safetensors of real models of another size, per weights file name."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from fla_ds.config import load_config
    from fla_ds.model import SignTranslator, VisualEncoder
    from fla_ds.model.projector import Projector
    from fla_ds.stage1 import cpu_state_dict
    from fla_ds.vocab import TrimmedVocab

    small = load_config(str(stage1 / "config.yaml"), ["visual.out_dim=16", "light_t.d_model=16", "light_t.adapter_hidden=16"])
    vocab = TrimmedVocab.load(stage1 / "vocab.json", tokenizer_path=stage1 / "tokenizer")
    adapter = get_peft_model(LlamaForCausalLM.from_pretrained(llama), LoraConfig(task_type="CAUSAL_LM", r=8, target_modules="all-linear"))
    adapter.save_pretrained(root / "adapter-r8")
    config = LlamaConfig.from_pretrained(llama)
    config.hidden_size, config.head_dim = 32, 8
    LlamaForCausalLM(config).save_pretrained(root / "llama-32")
    encoder = save(cpu_state_dict(VisualEncoder(out_dim=16)))
    return {
        "model.safetensors": save(cpu_state_dict(SignTranslator.from_config(small, vocab))),
        "encoder.safetensors": encoder,
        "projector.safetensors": save(cpu_state_dict(Projector(32, 96))),
        "adapter_model.safetensors": (root / "adapter-r8" / "adapter_model.safetensors").read_bytes(),
        "model/model.safetensors": (root / "llama-32" / "model.safetensors").read_bytes(),
    }


# ------------------------------------------------------------------ hostile files


class Unpickled:
    """Unpickling this creates ``marker``: proof that a file was unpickled."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def hostile_pickle(marker: Path) -> bytes:
    return pickle.dumps({"weight": Unpickled(marker)})


def test_the_marker_pickle_runs_code_when_unpickled(tmp_path):
    """The marker works, so its absence below proves nothing was unpickled."""
    pickle.loads(hostile_pickle(tmp_path / "canary")).get("weight").close()
    assert (tmp_path / "canary").exists()


def header_and_data(data: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def with_header(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def lying_header(data: bytes) -> bytes:
    """The first tensor's first dimension doubled in the header, the data unchanged."""
    header, body = header_and_data(data)
    name = next(k for k in sorted(header) if k != "__metadata__" and header[k]["shape"] and header[k]["shape"][0] > 0)
    header[name]["shape"][0] *= 2
    return with_header(header, body)


def flipped(data: bytes) -> bytes:
    """One byte changed in the middle: same size, another sha256."""
    mid = len(data) // 2
    return data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1 :]


def replace(path: Path, data: bytes) -> None:
    """A new file (the case folders are hard-linked copies: never write through a link)."""
    path.unlink(missing_ok=True)
    path.write_bytes(data)


def reseal(folder: Path, *names: str) -> None:
    """Make COMPLETE agree with the files ``names`` (as a hostile folder would)."""
    manifest = json.loads((folder / "COMPLETE").read_text())
    for name in names:
        path = folder / name
        if path.exists():
            manifest["files"][name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
        else:
            manifest["files"].pop(name, None)
    replace(folder / "COMPLETE", json.dumps(manifest).encode())


PICKLE_INSTEAD = {
    "model.safetensors": "model.pt", "encoder.safetensors": "encoder.pt", "encoder/encoder.safetensors": "encoder/encoder.pt",
    "projector/projector.safetensors": "projector/projector.bin", "adapter/adapter_model.safetensors": "adapter/adapter_model.bin",
    "model/model.safetensors": "model/pytorch_model.bin",
}
KINDS = {  # kind -> words its message must hold
    "pickle": "pickle", "lying-header": "the header does not match the data", "other-size": "the model expects",
    "truncated": "truncated", "sha256": "differs from its sha256", "pickle-format-file": "only safetensors weights are read",
}


def make_hostile(folder: Path, target: str, kind: str, assets: dict, marker: Path) -> Path:
    """Damage ``folder/target`` as ``kind`` says; returns the file the error must name."""
    path = folder / target
    data = path.read_bytes()
    if kind == "sha256":
        replace(path, flipped(data))
        return path
    if kind == "pickle-format-file":
        path.unlink()
        instead = folder / PICKLE_INSTEAD[target]
        instead.write_bytes(hostile_pickle(marker))
        reseal(folder, target, PICKLE_INSTEAD[target])
        return instead if instead.parent.name in ("adapter", "model") else path
    other = assets["other_size"].get(target) or assets["other_size"][path.name]
    new = {"pickle": hostile_pickle(marker), "lying-header": lying_header(data), "other-size": other, "truncated": data[:-64]}[kind]
    replace(path, new)
    reseal(folder, target)
    return path


def case_folder(assets: dict, source: str, tmp_path: Path) -> Path:
    """A hard-linked copy of a real step folder or bundle (cheap; files are replaced, never written)."""
    return Path(shutil.copytree(assets[source], tmp_path / "case" / assets[source].name, copy_function=os.link))


# ------------------------------------------------------------------ every entry point


def cli(args: list[str]):
    def call(folder: Path, assets: dict, tmp_path: Path) -> int:
        fill = {"FOLDER": str(folder), "SHARDS": str(assets["shards"]), "VIDEO": str(assets["video"]), "OUT": str(tmp_path / "out" / "bundle")}
        return main([fill.get(a, a) for a in args])
    return call


def stage2_training(folder: Path, assets: dict, tmp_path: Path) -> int:
    """Stage 2's launch (train.py): the stage-1 encoder is verified and loaded by the launch
    checks, before any process group or file exists."""
    from fla_ds.train import main as train_main

    return train_main(["--stage", "2", f"stage2.encoder={folder}", f"stage2.model={assets['llama']}", f"train.out={tmp_path / 'out' / 'run'}",
                       f"stream.shards={assets['shards']}", *TINY_STAGE2])


EVALUATE = cli(["evaluate", "--checkpoint", "FOLDER", "--shards", "SHARDS", "--split", "dev", "--limit", "2", "--beam", "1"])
TRANSLATE = cli(["translate", "--model", "FOLDER", "--beam", "1", "VIDEO"])
EXPORT = cli(["export", "--checkpoint", "FOLDER", "--out", "OUT"])
FEATURES = cli(["features", "extract", "--checkpoint", "FOLDER", "--shards", "SHARDS", "--out", "OUT", "--split", "dev", "--workers", "0"])
STAGE2_PARTS = ["encoder/encoder.safetensors", "projector/projector.safetensors", "adapter/adapter_model.safetensors"]
ENTRY_POINTS = {  # name -> (command, folder it reads, weights files in it)
    "evaluate-stage1": (EVALUATE, "stage1", ["model.safetensors"]),
    "features-extract": (FEATURES, "stage1", ["encoder.safetensors"]),
    "stage2-training": (stage2_training, "stage1", ["encoder.safetensors"]),
    "evaluate-stage2": (EVALUATE, "stage2", STAGE2_PARTS),
    "translate-bundle": (TRANSLATE, "bundle", STAGE2_PARTS),
    "translate-merged-bundle": (TRANSLATE, "merged", ["model/model.safetensors"]),
    "export": (EXPORT, "stage2", STAGE2_PARTS),
}
CASES = [pytest.param(entry, target, kind, id=f"{entry}-{target.split('/')[0].split('.')[0]}-{kind}")
         for entry, (_, _, targets) in ENTRY_POINTS.items() for target in targets for kind in KINDS]


@pytest.mark.parametrize("entry,target,kind", CASES)
def test_a_hostile_file_is_one_line_exit_2_and_never_unpickled(assets, tmp_path, capfd, entry, target, kind):
    command, source, _ = ENTRY_POINTS[entry]
    folder = case_folder(assets, source, tmp_path)
    marker = tmp_path / "UNPICKLED"
    bad = make_hostile(folder, target, kind, assets, marker)
    (tmp_path / "out").mkdir()
    capfd.readouterr()
    code = command(folder, assets, tmp_path)
    err = capfd.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    prefix = "train.py" if entry == "stage2-training" else "fla-ds"
    assert lines[0].startswith(f"{prefix}: error: {bad}: "), lines[0]
    assert KINDS[kind] in lines[0], lines[0]
    assert "weights_only" not in err
    assert not marker.exists(), "a file was unpickled"
    assert list((tmp_path / "out").iterdir()) == [], "something was written"


def test_the_real_command_prints_one_line(assets, tmp_path):
    """The same through a real ``fla-ds`` process (nothing else on stderr, no traceback)."""
    folder = case_folder(assets, "stage1", tmp_path)
    bad = make_hostile(folder, "model.safetensors", "pickle", assets, tmp_path / "UNPICKLED")
    proc = subprocess.run([sys.executable, "-m", "fla_ds", "evaluate", "--checkpoint", str(folder), "--shards", str(assets["shards"])],
                          env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"fla-ds: error: {bad}: a Python pickle, not a safetensors file (only safetensors "
                                                "weights are read; it was not unpickled)"]
    assert not (tmp_path / "UNPICKLED").exists()


# ------------------------------------------------------------------ manifests and bundles


def test_export_writes_a_verified_manifest_and_translate_checks_it(assets, tmp_path, capfd):
    verified = verify_folder(assets["bundle"])
    assert {"bundle.json", "adapter/adapter_model.safetensors", "encoder/encoder.safetensors"} <= verified.files
    assert not any(name.startswith("engine/") for name in verified.files)
    assert "model/model.safetensors" in verify_folder(assets["merged"]).files
    # A bundle without a manifest (as exported before manifests) is refused, naming the folder.
    old = case_folder(assets, "bundle", tmp_path)
    (old / "COMPLETE").unlink()
    capfd.readouterr()
    assert main(["translate", "--model", str(old), str(assets["video"])]) == 2
    err = capfd.readouterr().err.strip()
    assert err.startswith(f"fla-ds: error: {old}: no COMPLETE manifest") and "run fla-ds export again" in err


def test_a_file_added_to_a_weights_folder_after_saving_is_refused(assets, tmp_path, capfd):
    folder = case_folder(assets, "bundle", tmp_path)
    extra = folder / "adapter" / "adapter_model.bin"
    extra.write_bytes(hostile_pickle(tmp_path / "UNPICKLED"))
    capfd.readouterr()
    assert main(["translate", "--model", str(folder), str(assets["video"])]) == 2
    assert capfd.readouterr().err.strip() == f"fla-ds: error: {extra}: not listed in {folder / 'COMPLETE'} (added after the folder was saved)"
    assert not (tmp_path / "UNPICKLED").exists()


def test_export_replaces_a_bundle_but_never_another_folder(assets, tmp_path, capfd):
    out = tmp_path / "bundle"
    assert main(["export", "--checkpoint", str(assets["stage2"]), "--out", str(out)]) == 0
    (out / "stale").write_text("from the previous export")
    assert main(["export", "--checkpoint", str(assets["stage2"]), "--out", str(out)]) == 0
    assert not (out / "stale").exists() and verify_folder(out)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    capfd.readouterr()
    assert main(["export", "--checkpoint", str(assets["stage2"]), "--out", str(mine)]) == 2
    assert "exists and is not an inference bundle" in capfd.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "mine"]


def test_a_stage1_checkpoint_is_not_exported(assets, tmp_path, capfd):
    assert main(["export", "--checkpoint", str(assets["stage1"]), "--out", str(tmp_path / "b")]) == 2
    assert "not a stage-2 checkpoint" in capfd.readouterr().err
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ the checks themselves (no model needed)


def tensors_file(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "w.safetensors"
    path.write_bytes(data)
    return path


GOOD = save({"a": torch.zeros(4, 8), "b": torch.ones(3)})
GOOD_HEADER, GOOD_BODY = header_and_data(GOOD)


def malformed() -> dict[str, tuple[bytes, str]]:
    raw_dup = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    gap = json.loads(json.dumps(GOOD_HEADER))
    gap["b"]["data_offsets"] = [x + 4 for x in gap["b"]["data_offsets"]]
    overlap = json.loads(json.dumps(GOOD_HEADER))
    overlap["b"]["data_offsets"] = [0, 12]
    bad_dtype = json.loads(json.dumps(GOOD_HEADER))
    bad_dtype["a"]["dtype"] = "Q99"
    return {
        "zip (torch.save)": (b"PK\x03\x04" + b"\0" * 60, "a zip archive"),
        "header too large": (struct.pack("<Q", 10**12) + b"{}", "too large"),
        "header past the end": (struct.pack("<Q", 1000) + b"{}", "truncated"),
        "not JSON": (struct.pack("<Q", 5) + b"{abc}", "not valid JSON"),
        "a key twice": (struct.pack("<Q", len(raw_dup)) + raw_dup + b"\0" * 4, "key 'a' given twice"),
        "a gap": (with_header(gap, GOOD_BODY + b"\0" * 4), "leaving a gap"),
        "an overlap": (with_header(overlap, GOOD_BODY), "overlaps"),
        "bytes after the data": (GOOD + b"\0" * 8, "bytes after the last tensor"),
        "unknown dtype": (with_header(bad_dtype, GOOD_BODY), "unknown dtype"),
        "empty": (b"", "truncated"),
    }


@pytest.mark.parametrize("name", list(malformed()))
def test_every_malformed_safetensors_file_is_one_line_naming_it(tmp_path, name):
    data, words = malformed()[name]
    path = tensors_file(tmp_path, data)
    with pytest.raises(ArtifactError) as caught:
        load_safetensors(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and words in message and "\n" not in message, message


def test_load_state_names_the_first_offending_key_with_both_shapes(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 2))
    path = tensors_file(tmp_path, save({"0.weight": torch.zeros(4, 16), "0.bias": torch.zeros(4), "1.weight": torch.zeros(2, 4), "1.bias": torch.zeros(2)}))
    with pytest.raises(ArtifactError, match=r"'0\.weight' has shape \[4, 16\] in the file, the model expects \[4, 8\]"):
        load_state(model, load_safetensors(path), path)
    state = dict(model.state_dict())
    del state["1.bias"]
    with pytest.raises(ArtifactError, match=r"'1\.bias' is missing \(the model expects \[2\]\)"):
        load_state(model, state, path)
    with pytest.raises(ArtifactError, match=r"unexpected tensor 'extra' \[1\]"):
        load_state(model, {**model.state_dict(), "extra": torch.zeros(1)}, path)
    assert check_safetensors(tensors_file(tmp_path, GOOD)) == {"a": ("F32", (4, 8)), "b": ("F32", (3,))}


def test_a_manifest_cannot_point_outside_its_folder(tmp_path):
    folder = tmp_path / "step"
    folder.mkdir()
    (tmp_path / "secret").write_text("x")
    (folder / "COMPLETE").write_text(json.dumps({"files": {"../secret": {"bytes": 1, "sha256": "0" * 64}}}))
    with pytest.raises(ArtifactError, match="not a plain path inside the folder"):
        verify_folder(folder)
    (folder / "link").symlink_to(tmp_path / "secret")
    (folder / "COMPLETE").write_text(json.dumps({"files": {"link": {"bytes": 1, "sha256": sha256_file(tmp_path / "secret")}}}))
    with pytest.raises(ArtifactError, match="a link pointing outside the folder"):
        verify_folder(folder)
    (folder / "link").unlink()
    (folder / "weights.safetensors").write_bytes(GOOD)
    write_manifest(folder)
    assert verify_folder(folder).files == {"weights.safetensors"}


def test_library_advice_to_load_unsafely_is_replaced():
    with pytest.raises(ArtifactError) as caught:
        with hf_errors("/some/adapter", "the adapter"):
            raise RuntimeError("Weights only load failed. Re-running `torch.load` with `weights_only` set to `False` will likely succeed\nmore")
    message = str(caught.value)
    assert message == "/some/adapter: the adapter cannot be loaded: not in a format this program reads (only safetensors weights are read)"
