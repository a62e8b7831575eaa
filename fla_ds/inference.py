"""Inference without DeepSpeed: stage-2 checkpoints and bundles, ``fla-ds export`` and
``fla-ds translate``.

A bundle is a folder with everything needed to translate: the encoder (``encoder/``), the
projector, the LoRA adapter plus the base model's location (or, with ``--merge``, the merged
weights in ``model/``; for mBART the fine-tuned ``mbart/``), the tokenizer and the resolved
config. A stage-2 step folder has the same layout, so both load the same way.

Videos and frame folders given to ``translate`` go through the shard builder's preprocessing
(resize to the short side, per-frame JPEG at the same quality) and the loader's evaluation
sampling and crop, so a clip is translated exactly as it would be evaluated from shards.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Optional

import torch

from fla_ds.atomic import atomic_write_json
from fla_ds.augment import collate_clips
from fla_ds.config import load_config
from fla_ds.distributed import device

BUNDLE_FILE = "bundle.json"


def inference_dtype() -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


class Stage2Translator:
    """Translate batches (features or video) with a stage-2 step folder or bundle."""

    def __init__(self, folder: str | Path, beam_size: int = 0):
        from fla_ds.model.projector import Projector
        from fla_ds.stage2 import load_frozen_encoder

        self.folder = Path(folder)
        self.cfg = load_config(str(self.folder / "config.yaml"))
        self.dtype = inference_dtype()
        self.beam = beam_size or self.cfg.train.beam_size
        self.encoder, self.encoder_cfg = load_frozen_encoder(self.folder / "encoder", self.dtype)
        projector = Projector.load(self.folder / "projector", dtype=self.dtype)
        self.model = self.load_backend(projector).to(device()).eval()

    def load_backend(self, projector) -> torch.nn.Module:
        s = self.cfg.stage2
        if s.backend == "mbart":
            from fla_ds.model.mbart import IdMap, VisualMBart, load_encoder_decoder

            mbart, tokenizer = load_encoder_decoder(self.folder / "mbart", dtype=self.dtype)
            return VisualMBart(mbart, projector, tokenizer, vocab=IdMap.load(self.folder / "mbart"), tgt_lang=s.tgt_lang or None)
        from fla_ds.model.llm import VisualLLM, load_base, load_for_inference, load_generation_tokenizer

        bundle = self.bundle_info()
        if bundle.get("merged"):
            llm = load_base(self.folder / "model", qlora=False, dtype=self.dtype).eval()
            tokenizer = load_generation_tokenizer(self.folder / "model")
        else:
            llm, tokenizer = load_for_inference(bundle.get("base_model") or base_model(self.cfg), self.folder / "adapter", qlora=s.qlora, dtype=self.dtype)
        return VisualLLM(llm, tokenizer, projector, s.prompt, max_target_tokens=s.max_target_tokens)

    def bundle_info(self) -> dict:
        path = self.folder / BUNDLE_FILE
        return json.loads(path.read_text("utf-8")) if path.is_file() else {}

    @torch.no_grad()
    def __call__(self, batch: dict) -> list[str]:
        from fla_ds.stage2 import batch_features

        feats, mask = batch_features(batch, self.encoder, self.encoder_cfg.stream.crop_size, self.dtype)
        return self.model.generate(feats, mask, max_new_tokens=self.cfg.stage2.max_new_tokens, num_beams=self.beam)


def base_model(cfg) -> str:
    from fla_ds.stage2 import language_model_path

    return language_model_path(cfg)


def load_translator(folder: str | Path, beam_size: int = 0):
    """The right translator for a stage-1 or stage-2 step folder, or a bundle."""
    folder = Path(folder)
    if (folder / "projector").is_dir():
        return Stage2Translator(folder, beam_size)
    from fla_ds.stage1 import Translator

    return Translator.from_checkpoint(folder, beam_size)


# ------------------------------------------------------------------ export


def export_bundle(step_dir: str | Path, out: str | Path, merge: bool = False) -> Path:
    """A standalone inference bundle from a stage-2 step folder."""
    step_dir, out = Path(step_dir), Path(out)
    cfg = load_config(str(step_dir / "config.yaml"))
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("config.yaml", "encoder", "projector", "adapter", "mbart", "tokenizer"):
        src = step_dir / name
        if src.is_dir():
            shutil.copytree(src, tmp / name)
        elif src.is_file():
            shutil.copy(src, tmp / name)
    info = {"format": "fla_ds.bundle", "backend": cfg.stage2.backend, "merged": False, "source": str(step_dir.resolve())}
    if cfg.stage2.backend == "decoder_only":
        info["base_model"] = str(Path(base_model(cfg)).resolve())
        if merge:
            merge_adapter(info["base_model"], step_dir / "adapter", tmp / "model")
            info["merged"] = True
    atomic_write_json(tmp / BUNDLE_FILE, info)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def merge_adapter(base_path: str, adapter: Path, out: Path) -> None:
    """Base weights in full precision with the LoRA update folded in: no bitsandbytes and no
    peft needed to run the bundle."""
    from peft import PeftModel

    from fla_ds.model.llm import load_base, load_generation_tokenizer

    base = load_base(base_path, qlora=False, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    merged.save_pretrained(str(out), safe_serialization=True)
    load_generation_tokenizer(base_path).save_pretrained(str(out))


# ------------------------------------------------------------------ translate


def clip_batch(paths: list[str], cfg) -> dict:
    """Videos or frame folders -> one evaluation batch, preprocessed as shards + loader do."""
    from fla_ds.corpus.base import FrameFolder, VideoFile
    from fla_ds.frames import FramePack, SampleError, encode_source
    from fla_ds.stream import clip_from_pack

    clips = []
    for i, path in enumerate(paths):
        source = FrameFolder(path) if Path(path).is_dir() else VideoFile(path)
        try:
            encoded = encode_source(source, cfg.shards.short_side, cfg.shards.jpeg_quality)
        except SampleError as exc:
            raise SampleError(f"{path}: {exc}") from None
        pack_bytes, meta = encoded.pack, {"width": encoded.width, "height": encoded.height}
        rng = random.Random(f"fla_ds-sample:{cfg.stream.seed}:0:0:{i}")
        clip, _ = clip_from_pack(meta, FramePack(pack_bytes), cfg.stream, rng, augment=False)
        clips.append(clip)
    video, mask = collate_clips(clips)
    return {"video": video, "video_mask": mask, "affine": None}


def translate_paths(model_dir: str | Path, paths: list[str], beam_size: int = 0) -> list[str]:
    translator = load_translator(model_dir, beam_size)
    encoder_cfg = getattr(translator, "encoder_cfg", None) or translator.cfg
    return translator(clip_batch(paths, encoder_cfg))
