"""Stage 2 (LLM fine-tuning): frozen stage-1 encoder -> projector -> pre-trained language model.

What DeepSpeed wraps (and ZeRO partitions and optimises) is the projector plus the language
model; the frozen encoder stays outside it, in eval mode without gradients, on every rank,
or is skipped entirely when training reads a feature cache (``stage2.features``). The
language model is the backend ``stage2.backend`` names (a registry: fla_ds/backends.py;
``decoder_only`` QLoRA LLaMA, ``mbart``, ``t5``): it builds the model, says what of it is
trained, saves that and loads it back; this module never names one.

Every checkpoint folder additionally holds ``projector/``, what the backend trained (the LoRA
``adapter/`` in Hugging Face format, which ``PeftModel.from_pretrained`` loads without
DeepSpeed, or the fine-tuned ``mbart/`` or ``t5/``), and the encoder it was trained on, so any
step folder can be exported or resumed.
"""
from __future__ import annotations

import logging
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from fla_ds.augment import Augment
from fla_ds.backends import get_backend, language_model_path, lm_hidden_size
from fla_ds.batch import Batch, FeatureBatch, prepare_features
from fla_ds.checkpoint import describe_choice, resolve_step_dir
from fla_ds.config import load_config, save_resolved
from fla_ds.distributed import device, gathered
from fla_ds.feed import batch_to_device
from fla_ds.model import VisualEncoder, load_frozen_encoder
from fla_ds.stream import Source
from fla_ds.translator import Stage2Translator

log = logging.getLogger("fla_ds")

PROMPTS = {
    "de": "Übersetze das Gebärdensprachvideo ins Deutsche.",
    "en": "Translate the sign language video into English.",
    "zh": "将手语视频翻译成中文。",
}
"""decoder_only's default text prompt per language of the training shards (``stage2.prompt``
empty). FLa-LLM gives no prompt text; these say the task in the target language."""

INHERITED_SECTIONS = ("augment",)
"""What stage 2 takes from its stage-1 encoder's config: how a clip becomes the encoder's input."""


def inherit_stage1(cfg, explicit: set[str]) -> list[str]:
    """Stage 2's config completed from what it builds on, in place, before anything else reads
    it (every rank does the same): the ``augment`` section becomes the stage-1 encoder's own
    (crop size, frame sampling, normalisation: read on the fly, in ``features extract`` and in
    ``translate`` alike), and an empty ``stage2.prompt`` becomes ``PROMPTS`` of the language the
    training shards record. ``explicit``: the keys the user set (``config.explicit_keys``); one
    that contradicts the encoder is refused. Returns what was decided, one line each. Raises
    LaunchError (one line); a missing encoder is left to the launch checks to report."""

    from fla_ds.config import ConfigError, refuse_contradictions
    from fla_ds.preflight import LaunchError

    if not cfg.stage2.encoder:
        return []
    try:
        encoder_dir = resolve_step_dir(cfg.stage2.encoder)
        encoder_cfg = load_config(str(encoder_dir / "config.yaml"))
    except (FileNotFoundError, ConfigError) as exc:
        raise LaunchError(f"stage2.encoder: {exc}") from None
    for section in INHERITED_SECTIONS:
        try:
            refuse_contradictions(section, cfg[section], encoder_cfg[section], explicit, f"the stage-1 encoder, {encoder_dir / 'config.yaml'}")
        except ConfigError as exc:
            raise LaunchError(str(exc)) from None
        for key, value in encoder_cfg[section].items():  # key by key: the schema keeps its types
            cfg[section][key] = value
    notes = [note for note in [describe_choice(cfg.stage2.encoder, encoder_dir)] if note]
    notes.append(f"input: the encoder's augment section ({encoder_dir}): crop {encoder_cfg.augment.crop_size}, "
             f"keep {encoder_cfg.augment.keep_ratio:g} of the frames")
    if not cfg.stage2.prompt:
        language = training_language(cfg)
        if language.split("-")[0] not in PROMPTS:
            raise LaunchError(f"stage2.prompt: the training shards record {f'language {language!r}' if language else 'no language'}, "
                              f"which has no default prompt (known: {', '.join(PROMPTS)}): set stage2.prompt, or corpus.language when building")
        cfg.stage2.prompt = PROMPTS[language.split("-")[0]]
        notes.append(f"prompt: {cfg.stage2.prompt!r} (the shards' language: {language})")
    return notes


def training_language(cfg) -> str:
    """The language the training shards (the feature cache, else the video shards) record; ""
    when they record none. Raises LaunchError for an unreadable index."""
    from fla_ds.preflight import LaunchError
    from fla_ds.shards.index import IndexFormatError, load_index

    folder = cfg.stage2.features or cfg.stream.shards
    try:
        return load_index(folder, "train").get("language", "")
    except IndexFormatError as exc:
        raise LaunchError(str(exc)) from None


@dataclass
class Stage2Inputs:
    """A stage-2 micro-batch: ``batch`` on the device, ``host_mask`` bool (B, T) its video or
    feature mask in host memory."""

    batch: Batch
    host_mask: torch.Tensor


def host_mask(batch: Batch) -> torch.Tensor:
    """The loader's (B, T) bool mask of a video or feature batch (host memory)."""
    return batch.features_mask if isinstance(batch, FeatureBatch) else batch.video_mask


class Stage2:
    """Stage 2 for the training loop (fla_ds/trainer.py Stage protocol)."""

    name = "stage2"

    def __init__(self, cfg, rank: int):
        self.cfg, self.rank = cfg, rank
        self.backend = get_backend(cfg.stage2.backend)
        self.encoder: VisualEncoder | None = None
        self.zero3 = False
        self.dtype = torch.float32
        self._translator: Stage2Translator | None = None
        self.replica_step: int | None = None  # the optimizer step the ZeRO-3 decoding copy holds

    def prepare(self) -> None:
        """The stage-1 checkpoint (verified: untrusted input, fla_ds.artifacts) and the language
        model's size; the input settings (crop, frame sampling) are the encoder's own."""
        from fla_ds.artifacts import verify_folder

        s = self.cfg.stage2
        if not s.encoder:
            raise ValueError("stage2.encoder is required: the stage-1 checkpoint (step folder or run folder)")
        self.encoder_dir = resolve_step_dir(s.encoder)
        verify_folder(self.encoder_dir)
        self.lm_path = language_model_path(self.cfg)
        self.hidden_size = lm_hidden_size(self.lm_path)
        self.encoder_cfg = load_config(str(self.encoder_dir / "config.yaml"))
        self.feature_dim = self.encoder_cfg.visual.out_dim
        self.augment = Augment(self.encoder_cfg.augment)  # what the encoder was trained on

    def source(self) -> Source:
        """The feature cache when one is given (the encoder is frozen: its output can be
        computed once), else the video shards, read as the encoder was trained."""
        if self.cfg.stage2.features:
            return Source(self.cfg.stage2.features, None)
        return Source(self.cfg.stream.shards, self.augment)

    def build(self, ds_config: dict, dtype: torch.dtype) -> torch.nn.Module:
        """The backend's model (under ZeRO-3 it loads partitioned: ``ds_config``), and the frozen
        encoder unless training reads a feature cache."""
        self.zero3 = ds_config.get("zero_optimization", {}).get("stage", 0) == 3
        self.dtype = dtype
        if not self.cfg.stage2.features:
            self.encoder, _ = load_frozen_encoder(self.encoder_dir, self.dtype)
        return self.backend.build(self.cfg, self.lm_path, self.feature_dim, self.dtype, ds_config)

    def param_groups(self, model: torch.nn.Module) -> list[dict]:
        projector = [p for p in model.projector.parameters() if p.requires_grad]
        ids = {id(p) for p in projector}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        return [{"params": projector, "lr": self.cfg.stage2.projector_lr}, {"params": rest, "lr": self.cfg.train.lr}]

    def inputs(self, batch: Batch) -> Stage2Inputs:
        """The loader batch with its tensors on the device (``fla_ds.feed.batch_to_device``),
        and its mask as the loader made it, on the host: the backends lay out their inputs from
        it without reading the device."""
        return Stage2Inputs(batch_to_device(batch, device()), host_mask(batch))

    def loss(self, engine, inputs: Stage2Inputs) -> tuple[torch.Tensor, torch.Tensor]:
        feats, _ = prepare_features(inputs.batch, self.encoder, self.augment, self.dtype, device())
        return engine(feats, inputs.host_mask, inputs.batch.text)  # the encoder keeps its input mask: the loader's is the features'

    def translator(self, engine) -> Stage2Translator:
        """The translator dev decoding uses: around the live model (made once), or under ZeRO-3
        around a plain copy. Generating with the partitioned model would gather every layer's
        weights from all ranks for every new token, with every rank stepping until the slowest
        has finished (``synced_gpus``); the copy is the backend's model built once more without
        partitioning (for QLoRA the 4-bit base, ~4 GB for 7B), and what training changes (the
        projector, LoRA or the fine-tuned weights) is copied into it with one gather whenever
        the weights moved since the last evaluation. Each rank then decodes alone. With
        ``eval.zero3_copy`` false the partitioned model generates, with ``synced_gpus`` when
        there are several ranks (a rank that finished keeps stepping: its gathers are
        collectives). Every rank calls this at the same evaluation batches."""
        copy = self.zero3 and self.cfg.eval.zero3_copy
        if self._translator is None:
            model = engine.module
            if copy:
                with torch.random.fork_rng(), unpartitioned_loading(engine.module):  # its initial weights are overwritten
                    model = self.backend.build(self.cfg, self.lm_path, self.feature_dim, self.dtype, ds_config=None).to(device()).eval()
                log.info("evaluation decodes on an unpartitioned copy of the ZeRO-3 model (no weight gathers per token)")
            synced = self.zero3 and not copy and dist.is_initialized() and dist.get_world_size() > 1
            self._translator = Stage2Translator(model, self.encoder, self.augment, self.cfg, self.dtype, encoder_cfg=self.encoder_cfg, synced_gpus=synced)
        if copy and self.replica_step != engine.global_steps:
            self.refresh_replica(engine)
        return self._translator

    def refresh_replica(self, engine) -> None:
        """What training changed, copied from the partitioned model into the decoding copy."""
        trainable = [p for p in engine.module.parameters() if p.requires_grad]
        with gathered(trainable), torch.no_grad():
            state = self.backend.trainable_state(engine.module)
            unexpected = self._translator.model.load_state_dict(state, strict=False).unexpected_keys  # missing: the frozen base
        if unexpected:
            raise RuntimeError(f"the ZeRO-3 decoding copy lacks what training changed: {list(unexpected)[:3]}")
        self.replica_step = engine.global_steps

    def translate(self, engine, batch: Batch) -> list[str]:
        return self.translator(engine)(batch)

    def export(self, engine, step_dir: Path) -> None:
        """projector/, the backend's folder (adapter/, mbart/, t5/), the encoder and configs: a
        folder that ``fla-ds export`` turns into an inference bundle without DeepSpeed."""
        module = engine.module
        trainable = [p for p in module.parameters() if p.requires_grad]
        with gathered(trainable):
            if self.rank == 0:
                state = self.backend.trainable_state(module)
                projector = {k[len("projector."):]: v for k, v in state.items() if k.startswith("projector.")}
                module.projector.save(step_dir / "projector", state_dict=projector)
                self.backend.save(module, state, step_dir)
        if self.rank == 0:
            save_resolved(self.cfg, step_dir)
            copy_encoder(self.encoder_dir, step_dir / "encoder")


@contextmanager
def unpartitioned_loading(model: torch.nn.Module):
    """``from_pretrained`` loads whole weights inside, although a ZeRO-3 model is alive: its
    ``HfDeepSpeedConfig`` (held by ``model.hf_deepspeed_config``, fla_ds.backends.zero3_loading)
    would otherwise make transformers partition every model it loads. Restored on exit."""
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    keep = getattr(model, "hf_deepspeed_config", None)
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if keep is not None:
            set_hf_deepspeed_config(keep)


def copy_encoder(stage1_step: Path, out: Path) -> None:
    """The encoder this stage was trained on, with the stage-1 config that built it."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("encoder.safetensors", "config.yaml"):
        shutil.copy(stage1_step / name, out / name)
