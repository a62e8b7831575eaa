"""Inference without DeepSpeed: stage-2 checkpoints and bundles, ``fla-ds export`` and
``fla-ds translate``.

A bundle is a folder with everything needed to translate: the encoder (``encoder/``), the
projector, the LoRA adapter plus the base model's location (or, with ``--merge``, the merged
weights in ``model/``; for mBART the fine-tuned ``mbart/``), the tokenizer and the resolved
config. A stage-2 step folder has the same layout, so both load the same way. A bundle has its
own ``COMPLETE`` manifest, and both are verified before loading (``fla_ds.artifacts``).

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
from fla_ds.batch import Batch, VideoBatch, collate_clips, prepare_features
from fla_ds.config import load_config
from fla_ds.distributed import device

BUNDLE_FILE = "bundle.json"


def inference_dtype() -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


class Stage2Translator:
    """Translate batches (features or video) with a stage-2 step folder or bundle.

    The folder is untrusted: its COMPLETE manifest is verified and every weights file checked
    as it loads (``fla_ds.artifacts``). Raises ArtifactError (one line naming the file) or
    ConfigError."""

    def __init__(self, folder: str | Path, beam_size: int = 0):
        from fla_ds.artifacts import verify_folder
        from fla_ds.model.projector import Projector
        from fla_ds.stage2 import load_frozen_encoder

        self.folder = Path(folder)
        verify_folder(self.folder)
        self.cfg = load_config(str(self.folder / "config.yaml"))
        self.dtype = inference_dtype()
        self.beam = beam_size or self.cfg.eval.beam_size
        self.encoder, self.encoder_cfg = load_frozen_encoder(self.folder / "encoder", self.dtype)
        self.augment = Augment(self.encoder_cfg.augment)  # inputs as the encoder was trained
        projector = Projector.load(self.folder / "projector", dtype=self.dtype)
        self.model = self.load_backend(projector).to(device()).eval()

    def load_backend(self, projector) -> torch.nn.Module:
        from fla_ds.artifacts import hf_errors

        s = self.cfg.stage2
        if s.backend == "mbart":
            from fla_ds.model.mbart import IdMap, VisualMBart, load_encoder_decoder

            mbart, tokenizer = load_encoder_decoder(self.folder / "mbart", dtype=self.dtype, artifact=True)
            with hf_errors(self.folder / "mbart", "the vocabulary map"):
                vocab = IdMap.load(self.folder / "mbart")
            return VisualMBart(mbart, projector, tokenizer, vocab=vocab, tgt_lang=s.tgt_lang or None)
        from fla_ds.model.llm import VisualLLM, load_base, load_for_inference, load_generation_tokenizer

        bundle = self.bundle_info()
        if bundle.get("merged"):
            llm = load_base(self.folder / "model", qlora=False, dtype=self.dtype, artifact=True).eval()
            with hf_errors(self.folder / "model", "the tokenizer"):
                tokenizer = load_generation_tokenizer(self.folder / "model")
        else:
            llm, tokenizer = load_for_inference(bundle.get("base_model") or base_model(self.cfg), self.folder / "adapter", qlora=s.qlora, dtype=self.dtype)
        return VisualLLM(llm, tokenizer, projector, s.prompt, max_target_tokens=s.max_target_tokens)

    def bundle_info(self) -> dict:
        """``bundle.json`` of a bundle ({} for a step folder). Raises ArtifactError."""
        from fla_ds.artifacts import ArtifactError, read_json

        path = self.folder / BUNDLE_FILE
        if not path.is_file():
            return {}
        info = read_json(path)
        if not isinstance(info, dict) or not isinstance(info.get("base_model", ""), str) or not isinstance(info.get("merged", False), bool):
            raise ArtifactError(f"{path}: not a bundle description (base_model a path, merged true or false)")
        return info

    @torch.no_grad()
    def __call__(self, batch: Batch) -> list[str]:
        feats, mask = prepare_features(batch, self.encoder, self.augment, self.dtype, device())
        max_new = self.cfg.eval.max_new_tokens or self.cfg.stage2.max_target_tokens
        return self.model.generate(feats, mask, max_new_tokens=max_new, num_beams=self.beam)


def base_model(cfg) -> str:
    from fla_ds.stage2 import language_model_path

    return language_model_path(cfg)


def load_translator(folder: str | Path, beam_size: int = 0):
    """The right translator for a stage-1 or stage-2 step folder, or a bundle; each verifies
    the folder before loading (raises ArtifactError)."""
    folder = Path(folder)
    if (folder / "projector").is_dir():
        return Stage2Translator(folder, beam_size)
    from fla_ds.stage1 import Translator

    return Translator.from_checkpoint(folder, beam_size)


# ------------------------------------------------------------------ export

BUNDLE_PARTS = ("config.yaml", "encoder", "projector", "adapter", "mbart", "tokenizer")
"""What a bundle takes from a stage-2 step folder (not DeepSpeed's training state)."""


def export_bundle(step_dir: str | Path, out: str | Path, merge: bool = False) -> Path:
    """A standalone inference bundle in ``out`` from a stage-2 step folder.

    Before anything is copied, the step folder is verified (its COMPLETE manifest, sizes and
    sha256) and the weights the bundle takes are checked (intact safetensors fitting their
    configs, the adapter fitting the base model). Only files the manifest lists are copied, into
    a temporary folder beside ``out`` that gets its own COMPLETE manifest and then replaces
    ``out`` by a rename: the bundle appears whole or not at all, and a failure leaves nothing
    (what a killed export left is removed by the next).
    An existing ``out`` is replaced only if it is a bundle. Raises ArtifactError (one line
    naming the file) or ConfigError."""
    from fla_ds.artifacts import ArtifactError, verify_folder, write_manifest

    step_dir, out = Path(step_dir), Path(out)
    verified = verify_folder(step_dir)
    cfg = load_config(str(step_dir / "config.yaml"))
    check_stage2_weights(step_dir, cfg)
    if out.exists() and not (out / BUNDLE_FILE).is_file():
        raise ArtifactError(f"{out}: exists and is not an inference bundle; not replaced (choose another --out)")
    for stale in [*out.parent.glob(f".{out.name}.*.tmp"), *out.parent.glob(f".{out.name}.*.old")]:  # a killed export's
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        for name in (n for part in BUNDLE_PARTS for n in verified.listed_under(part)):
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(step_dir / name, tmp / name)
        info = {"format": "fla_ds.bundle", "backend": cfg.stage2.backend, "merged": False, "source": str(step_dir.resolve())}
        if cfg.stage2.backend == "decoder_only":
            info["base_model"] = str(Path(base_model(cfg)).resolve())
            if merge:
                merge_adapter(info["base_model"], tmp / "adapter", tmp / "model")
                info["merged"] = True
        atomic_write_json(tmp / BUNDLE_FILE, info)
        write_manifest(tmp)
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def check_stage2_weights(step_dir: Path, cfg) -> None:
    """The weights a bundle takes from a stage-2 step folder, checked without the language
    model: the encoder and projector load into the models their configs build, the adapter's
    tensors fit the base model (built on the meta device), mBART's files are intact
    safetensors. Raises ArtifactError."""
    from fla_ds.artifacts import ArtifactError, check_adapter, check_hf_folder
    from fla_ds.model.projector import Projector
    from fla_ds.stage2 import load_frozen_encoder

    if not (step_dir / "projector").is_dir():
        raise ArtifactError(f"{step_dir}: not a stage-2 checkpoint (no projector/): only stage-2 checkpoints are exported")
    load_frozen_encoder(step_dir / "encoder", torch.float32)
    Projector.load(step_dir / "projector")
    if cfg.stage2.backend == "decoder_only":
        check_adapter(step_dir / "adapter", base_model(cfg))
    else:
        check_hf_folder(step_dir / "mbart", "config.json", "model")


def replace_folder(new: Path, out: Path) -> None:
    """``new`` takes ``out``'s name by a rename; an old ``out`` is moved aside first and removed
    after."""
    old = out.with_name(f".{out.name}.{os.getpid()}.old")
    if out.exists():
        os.rename(out, old)
    os.rename(new, out)
    shutil.rmtree(old, ignore_errors=True)


def merge_adapter(base_path: str, adapter: Path, out: Path) -> None:
    """Base weights in full precision with the LoRA update folded in: no bitsandbytes and no
    peft needed to run the bundle. The adapter is checked first (raises ArtifactError)."""
    from fla_ds.artifacts import load_adapter
    from fla_ds.model.llm import load_base, load_generation_tokenizer

    merged = load_adapter(base_path, adapter, lambda: load_base(base_path, qlora=False, dtype=torch.float32)).merge_and_unload()
    merged.save_pretrained(str(out), safe_serialization=True)
    load_generation_tokenizer(base_path).save_pretrained(str(out))


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
    translator = load_translator(model_dir, beam_size)
    encoder_cfg = getattr(translator, "encoder_cfg", None) or translator.cfg
    return translator(clip_batch(paths, encoder_cfg))
