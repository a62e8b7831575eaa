"""Inference without DeepSpeed: stage-2 checkpoints and bundles, ``fla-ds export`` and
``fla-ds translate``.

A bundle is a folder with everything needed to translate, on another machine with no cache
and no network: the encoder (``encoder/``), the projector, what the stage-2 backend trained
(``fla_ds.backends``: the LoRA adapter plus a copy of the base model in ``base/``, or with
``--merge`` the merged weights in ``model/``; the fine-tuned ``mbart/`` or ``t5/``), the
tokenizer and the resolved config. Loading a bundle reads only files inside it (a bundle.json
path leading out is refused: ``fla_ds.translator.read_bundle_info``). A stage-2 step folder
has the same layout, so both load the same way (``fla_ds.translator``). A bundle has its own
``COMPLETE`` manifest over every file, the base model's included, and both are verified
before loading (``fla_ds.artifacts``).

This module depends on models, artifacts and translators, never on the training stages.

Videos and frame folders given to ``translate`` go through the shard builder's preprocessing
(resize to the short side, per-frame JPEG at the same quality) and the loader's evaluation
sampling and crop, so a clip is translated exactly as it would be evaluated from shards.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import torch

from fla_ds.atomic import atomic_write_json
from fla_ds.augment import Augment
from fla_ds.batch import VideoBatch, collate_clips
from fla_ds.config import load_config
from fla_ds.translator import BUNDLE_FILE, Stage1Translator, Stage2Translator


def load_translator(folder: str | Path, beam_size: int = 0):
    """The translator for a stage-1 or stage-2 step folder, or a bundle (``fla_ds.translator``);
    each verifies the folder before loading (raises ArtifactError)."""
    folder = Path(folder)
    if (folder / "projector").is_dir():
        return Stage2Translator.load(folder, beam_size)
    return Stage1Translator.load(folder, beam_size)


# ------------------------------------------------------------------ export

BUNDLE_PARTS = ("config.yaml", "encoder", "projector")
"""What every bundle takes from a stage-2 step folder (not DeepSpeed's training state); the
backend adds its own (``Backend.bundle_parts``)."""


def export_bundle(step_dir: str | Path, out: str | Path, merge: bool = False) -> Path:
    """A standalone inference bundle in ``out`` from a stage-2 step folder.

    Before anything is copied, the step folder is verified (its COMPLETE manifest, sizes and
    sha256) and the weights the bundle takes are checked (intact safetensors fitting their
    configs, the adapter fitting the base model). Only files the manifest lists are copied, into
    a temporary folder beside ``out`` that gets its own COMPLETE manifest and then replaces
    ``out`` by a rename: the bundle appears whole or not at all, and a failure leaves nothing
    (what a killed export left is removed by the next). The backend adds what its model needs
    (decoder_only: the base model's files; mBART and T5 are whole already); ``merge``: it folds
    what it can into the weights (decoder_only: the adapter into the dequantized 4-bit weights,
    refused when the merged model's logits stray past the tolerance it records in bundle.json).
    An existing ``out`` is replaced only if it is a bundle. Raises ArtifactError (one line
    naming the file, as it would be in ``out``) or ConfigError."""
    from fla_ds.artifacts import ArtifactError, quiet_hf, verify_folder, write_manifest
    from fla_ds.backends import get_backend

    step_dir, out = Path(step_dir), Path(out)
    verified = verify_folder(step_dir)
    cfg = load_config(str(step_dir / "config.yaml"))
    check_stage2_weights(step_dir, cfg)
    backend = get_backend(cfg.stage2.backend)
    if out.exists() and not (out / BUNDLE_FILE).is_file():
        raise ArtifactError(f"{out}: exists and is not an inference bundle; not replaced (choose another --out)")
    for stale in [*out.parent.glob(f".{out.name}.*.tmp"), *out.parent.glob(f".{out.name}.*.old")]:  # a killed export's
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        for name in (n for part in (*BUNDLE_PARTS, *backend.bundle_parts) for n in verified.listed_under(part)):
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(step_dir / name, tmp / name)
        # source (and a backend's *_source): where things were, as provenance; never read.
        info = {"format": "fla_ds.bundle", "backend": cfg.stage2.backend, "merged": False, "source": str(step_dir.resolve())}
        with quiet_hf():  # the checks say what is wrong, in one line
            info.update(backend.export(tmp, cfg, merge))
        atomic_write_json(tmp / BUNDLE_FILE, info)
        write_manifest(tmp)
        replace_folder(tmp, out)
    except ArtifactError as exc:  # named as the file would be in the bundle, which is not written
        shutil.rmtree(tmp, ignore_errors=True)
        raise ArtifactError(str(exc).replace(str(tmp), str(out))) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def check_stage2_weights(step_dir: Path, cfg) -> None:
    """The weights a bundle takes from a stage-2 step folder, checked without the language
    model: the encoder and projector load into the models their configs build, and the backend
    checks its own (the adapter's tensors against the base model built on the meta device;
    mBART's or T5's files intact safetensors). Raises ArtifactError."""
    from fla_ds.artifacts import ArtifactError
    from fla_ds.backends import get_backend
    from fla_ds.model import load_frozen_encoder
    from fla_ds.model.projector import Projector

    if not (step_dir / "projector").is_dir():
        raise ArtifactError(f"{step_dir}: not a stage-2 checkpoint (no projector/): only stage-2 checkpoints are exported")
    load_frozen_encoder(step_dir / "encoder", torch.float32)
    Projector.load(step_dir / "projector")
    get_backend(cfg.stage2.backend).check(step_dir, cfg)


def replace_folder(new: Path, out: Path) -> None:
    """``new`` takes ``out``'s name by a rename; an old ``out`` is moved aside first and removed
    after."""
    old = out.with_name(f".{out.name}.{os.getpid()}.old")
    if out.exists():
        os.rename(out, old)
    os.rename(new, out)
    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------ translate


def clip_batch(paths: list[str], cfg) -> VideoBatch:
    """Videos or frame folders -> one evaluation batch, preprocessed as shards + loader do with
    ``cfg`` (the config of the stage-1 model whose encoder reads them: its shard settings and
    its ``augment`` section). Raises SampleError naming the path that cannot be read."""
    from fla_ds.corpus.base import FrameFolder, VideoFile
    from fla_ds.frames import FramePack, SampleError, encode_source
    from fla_ds.stream import clip_from_pack

    augment = Augment(cfg.augment)
    clips = []
    for i, path in enumerate(paths):
        source = FrameFolder(path) if Path(path).is_dir() else VideoFile(path)
        try:
            encoded = encode_source(source, cfg.shards.short_side, cfg.shards.jpeg_quality)
        except SampleError as exc:
            raise SampleError(f"{path}: {exc}") from None
        pack_bytes, meta = encoded.pack, {"width": encoded.width, "height": encoded.height}
        rng = random.Random(f"fla_ds-sample:{cfg.stream.seed}:0:0:{i}")
        clip, _ = clip_from_pack(meta, FramePack(pack_bytes), augment, rng, train=False)
        clips.append(clip)
    video, mask = collate_clips(clips)
    n = len(paths)
    return VideoBatch(video, mask, None, text=[""] * n, id=list(paths), key=[str(i) for i in range(n)],
                      valid=torch.ones(n, dtype=torch.bool), step=0, epoch=0)


def translate_paths(model_dir: str | Path, paths: list[str], beam_size: int = 0) -> list[str]:
    """``fla-ds translate``: video files or frame folders -> one text each, with a step folder
    or bundle of either stage, read as its encoder's training data was."""
    translator = load_translator(model_dir, beam_size)
    return translator(clip_batch(paths, translator.encoder_cfg))
