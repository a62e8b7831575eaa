"""One translator per stage: batches in, texts out.

A translator holds a model, what turns a batch into the model's input (the ``Augment`` the
model was trained with, and for stage 2 the frozen encoder), how its output becomes text (the
trimmed vocabulary, or the language model's tokenizer) and the generation settings. The same
class decodes during training (the stage builds it around the live engine's module:
``Stage1.translate``, ``Stage2.translate``) and at inference (``load``, from a verified step
folder or bundle: ``fla-ds evaluate``, ``translate``, the demo). It depends on models and
artifacts only, never on the training stages.

Both are callables ``(batch) -> list[str]`` (whitespace-normalised: ``normalize_whitespace``) with ``cfg`` (the model's config: evaluation
settings), ``augment`` (the loader's per-clip settings) and ``encoder_cfg`` (the config of the
stage-1 model whose encoder reads the video: how clips are preprocessed).
"""
from __future__ import annotations

from pathlib import Path

import torch

from fla_ds.augment import Augment
from fla_ds.batch import Batch, VideoBatch, prepare_features
from fla_ds.config import load_config
from fla_ds.distributed import device

BUNDLE_FILE = "bundle.json"
"""What marks an inference bundle (``fla-ds export``) and describes it."""


def normalize_whitespace(text: str) -> str:
    """One hypothesis as it is written and scored: every run of whitespace (newlines, tabs,
    U+00A0, U+3000 ...: ``str.split``'s set) becomes one space, none at either end. A language
    model's output may hold newlines; a SentencePiece decode may start with a space."""
    return " ".join(text.split())


def inference_dtype() -> torch.dtype:
    """bf16 on a GPU, fp32 on a CPU."""
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


class Stage1Translator:
    """Video batches -> texts with a stage-1 model (``fla_ds.model.SignTranslator``): the
    evaluation input of ``cfg.augment`` in the model's dtype, beam search (``beam_size``, else
    ``eval.beam_size``; at most ``eval.max_new_tokens`` or ``light_t.max_target_tokens``), the
    trimmed vocabulary's decoding. The model is used as it is (device, mode): put it in eval
    mode on the device first; under ZeRO-3 gather its parameters around the call."""

    def __init__(self, model: torch.nn.Module, vocab, cfg, beam_size: int = 0):
        self.model, self.vocab, self.cfg = model, vocab, cfg
        self.augment = Augment(cfg.augment)
        self.use_decoding(cfg, beam_size)

    def use_decoding(self, cfg, beam_size: int = 0) -> None:
        """Beam size (``beam_size``, else ``cfg.eval.beam_size``) and the length cap in tokens
        (``cfg.eval.max_new_tokens``, else ``light_t.max_target_tokens``) of later calls:
        ``fla-ds evaluate``'s ``eval.*`` overrides come through here."""
        self.beam = beam_size or cfg.eval.beam_size
        self.max_decode = cfg.eval.max_new_tokens or cfg.light_t.max_target_tokens

    @property
    def encoder_cfg(self):
        return self.cfg

    @classmethod
    def load(cls, step_dir: str | Path, beam_size: int = 0) -> Stage1Translator:
        """A stage-1 step folder, verified first (``fla_ds.artifacts``: its COMPLETE manifest,
        ``model.safetensors`` intact and fitting the model its config builds), in eval mode on
        this process's device. Raises ArtifactError (one line naming the file) or ConfigError."""
        from fla_ds.artifacts import hf_errors, load_safetensors, load_state, verify_folder
        from fla_ds.model import SignTranslator
        from fla_ds.vocab import TrimmedVocab

        step_dir = Path(step_dir)
        verify_folder(step_dir)
        cfg = load_config(str(step_dir / "config.yaml"))
        with hf_errors(step_dir, "the vocabulary (vocab.json, tokenizer/)"):
            vocab = TrimmedVocab.load(step_dir / "vocab.json", tokenizer_path=step_dir / "tokenizer")
        model = SignTranslator.from_config(cfg, vocab, pretrained=False)
        weights = step_dir / "model.safetensors"
        load_state(model, load_safetensors(weights), weights)
        return cls(model.eval().to(device()), vocab, cfg, beam_size)

    @torch.no_grad()
    def __call__(self, batch: VideoBatch) -> list[str]:
        dev = device()
        dtype = next(self.model.parameters()).dtype  # a ZeRO-3 partitioned parameter keeps its dtype
        video = self.augment.model_input(batch.video.to(dev, non_blocking=True), batch.affine, dtype=dtype)
        ids = self.model.generate(video, batch.video_mask.to(dev), beam_size=self.beam, max_len=self.max_decode)
        return [normalize_whitespace(self.vocab.decode(row)) for row in ids]


class Stage2Translator:
    """Video or feature batches -> texts with a stage-2 model (a backend's module,
    ``fla_ds.backends.VisualLanguageModel``): features from the frozen ``encoder`` (video read
    with the encoder's own ``augment``) or straight from a feature cache, in ``dtype``; beam
    search (``beam_size``, else ``eval.beam_size``; at most ``eval.max_new_tokens`` or
    ``stage2.max_target_tokens`` new tokens). The model is used as it is (device, mode);
    ``synced_gpus`` on every rank when it is partitioned by ZeRO-3 over several ranks (training
    decodes a plain copy instead unless ``eval.zero3_copy`` is false: fla_ds.stage2)."""

    def __init__(self, model: torch.nn.Module, encoder: torch.nn.Module | None, augment: Augment, cfg, dtype: torch.dtype,
                 beam_size: int = 0, encoder_cfg=None, synced_gpus: bool = False):
        self.model, self.encoder, self.augment, self.cfg, self.dtype = model, encoder, augment, cfg, dtype
        self.encoder_cfg = encoder_cfg
        self.use_decoding(cfg, beam_size)
        self.synced_gpus = synced_gpus

    def use_decoding(self, cfg, beam_size: int = 0) -> None:
        """Beam size (``beam_size``, else ``cfg.eval.beam_size``) and the cap on new tokens
        (``cfg.eval.max_new_tokens``, else ``stage2.max_target_tokens``) of later calls."""
        self.beam = beam_size or cfg.eval.beam_size
        self.max_new_tokens = cfg.eval.max_new_tokens or cfg.stage2.max_target_tokens

    @classmethod
    def load(cls, folder: str | Path, beam_size: int = 0) -> Stage2Translator:
        """A stage-2 step folder or bundle, in eval mode on this process's device. The folder is
        untrusted: its COMPLETE manifest is verified and every weights file checked as it loads
        (``fla_ds.artifacts``; the language model through its backend's ``load``). Raises
        ArtifactError (one line naming the file) or ConfigError."""
        from fla_ds.artifacts import verify_folder
        from fla_ds.backends import get_backend
        from fla_ds.model import load_frozen_encoder
        from fla_ds.model.projector import Projector

        folder = Path(folder)
        verify_folder(folder)
        bundle = read_bundle_info(folder)  # before anything loads: refuses paths leading out of a bundle
        cfg = load_config(str(folder / "config.yaml"))
        dtype = inference_dtype()
        encoder, encoder_cfg = load_frozen_encoder(folder / "encoder", dtype)
        projector = Projector.load(folder / "projector", dtype=dtype)
        model = get_backend(cfg.stage2.backend).load(folder, cfg, projector, dtype, bundle)
        return cls(model.to(device()).eval(), encoder, Augment(encoder_cfg.augment), cfg, dtype, beam_size, encoder_cfg=encoder_cfg)

    @torch.no_grad()
    def __call__(self, batch: Batch) -> list[str]:
        feats, mask = prepare_features(batch, self.encoder, self.augment, self.dtype, device())
        texts = self.model.generate(feats, mask, max_new_tokens=self.max_new_tokens, num_beams=self.beam, synced_gpus=self.synced_gpus)
        return [normalize_whitespace(t) for t in texts]


BUNDLE_PATHS = ("base_model",)
"""bundle.json fields naming a path that loading reads: each must lie inside the bundle.
``source`` and ``base_model_source`` (where the step folder and the base model were when it
was exported) are provenance only and never read."""


def read_bundle_info(folder: Path) -> dict:
    """``bundle.json`` of a bundle ({} for a step folder), its path fields (``BUNDLE_PATHS``)
    turned into paths inside ``folder``. A bundle reads only its own files, which its COMPLETE
    manifest covers: a path field that is absolute, climbs out with ``..`` or leads out through
    a link is refused. So is a bundle exported before bundles held their base model (its
    ``base_model`` an absolute path into the exporting user's cache): reading it would trust
    files no manifest covers and that another machine does not have, and such a merged bundle
    was merged into the un-quantized weights, not the 4-bit ones it was trained on; exporting
    again fixes both. Raises ArtifactError (one line naming bundle.json)."""
    from fla_ds.artifacts import ArtifactError, read_json

    folder = Path(folder)
    path = folder / BUNDLE_FILE
    if not path.is_file():
        return {}
    info = read_json(path)
    if not isinstance(info, dict) or not isinstance(info.get("merged", False), bool):
        raise ArtifactError(f"{path}: not a bundle description (merged true or false)")
    for key in (k for k in BUNDLE_PATHS if k in info):
        info[key] = str(path_inside(folder, info[key], f"{path}: {key}"))
    return info


def path_inside(folder: Path, value, what: str) -> Path:
    """``folder / value`` where ``value`` is a relative path that stays inside ``folder`` once
    links are followed; ArtifactError starting with ``what`` otherwise."""
    from pathlib import PurePosixPath

    from fla_ds.artifacts import ArtifactError

    if not isinstance(value, str) or not value:
        raise ArtifactError(f"{what} {value!r} is not a path inside the bundle")
    parts = PurePosixPath(value).parts
    outside = value.startswith("/") or "\\" in value or "\0" in value or ".." in parts or Path(value).is_absolute()
    if not outside:
        try:
            (folder / value).resolve().relative_to(folder.resolve())
        except ValueError:
            outside = True
    if outside:
        raise ArtifactError(f"{what} {value!r} points outside the bundle (a bundle reads only its own files; "
                            "one exported before bundles held their base model: run fla-ds export again)")
    return folder / value
