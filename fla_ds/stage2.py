"""Stage 2 (LLM fine-tuning): frozen stage-1 encoder -> projector -> pre-trained language model.

What DeepSpeed wraps (and ZeRO partitions and optimises) is the projector plus the language
model; the frozen encoder stays outside it, in eval mode without gradients, on every rank,
or is skipped entirely when training reads a feature cache (``stage2.features``). Two
backends behind one config: ``decoder_only`` (a LLaMA-family model in 4-bit NF4 with LoRA,
QLoRA; the visual tokens go in front of a text prompt as ``inputs_embeds``) and ``mbart``
(the paper's: the projector output replaces mBART's encoder word embeddings; full fine-tuning).

Every checkpoint folder additionally holds ``projector/``, the LoRA ``adapter/`` in Hugging
Face format (``PeftModel.from_pretrained`` loads it without DeepSpeed) or the fine-tuned
``mbart/``, and the encoder it was trained on, so any step folder can be exported or resumed.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from fla_ds.augment import Augment
from fla_ds.batch import Batch, prepare_features
from fla_ds.checkpoint import resolve_step_dir
from fla_ds.config import load_config, save_resolved
from fla_ds.distributed import device, gathered
from fla_ds.model import VisualEncoder
from fla_ds.model.projector import Projector
from fla_ds.stream import Source

log = logging.getLogger("fla_ds")


def language_model_path(cfg) -> str:
    if cfg.stage2.model:
        return cfg.stage2.model
    from fla_ds.llm_assets import smollm2_path

    return str(smollm2_path())


def load_frozen_encoder(step_dir: Path, dtype: torch.dtype) -> tuple[VisualEncoder, object]:
    """The stage-1 encoder in eval mode (BatchNorm running statistics), without gradients, and
    the stage-1 config, from ``step_dir`` (a stage-1 step folder, or the ``encoder/`` of a
    stage-2 step folder or bundle); the caller verifies the folder's manifest
    (``fla_ds.artifacts.verify_folder``). Raises ArtifactError naming ``encoder.safetensors``
    when it is not intact safetensors or does not fit the encoder the config builds."""
    from fla_ds.artifacts import load_safetensors, load_state

    step_dir = Path(step_dir)
    enc_cfg = load_config(str(step_dir / "config.yaml"))
    encoder = VisualEncoder(out_dim=enc_cfg.visual.out_dim, kernel_size=enc_cfg.visual.temporal_kernel)
    weights = step_dir / "encoder.safetensors"
    load_state(encoder, load_safetensors(weights), weights)
    encoder.requires_grad_(False)
    return encoder.eval().to(device=device(), dtype=dtype), enc_cfg


def lm_hidden_size(path: str) -> int:
    """From the model's config alone (a local folder or a hub id), before any weight loads."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    return int(getattr(config, "hidden_size", None) or config.d_model)


def build_backend(cfg, lm_path: str, feature_dim: int, dtype: torch.dtype) -> torch.nn.Module:
    s = cfg.stage2
    hidden = lm_hidden_size(lm_path)
    projector = Projector(feature_dim, hidden, s.projector_hidden or None).to(dtype)
    if s.backend == "decoder_only":
        from fla_ds.model.llm import VisualLLM, load_decoder_only

        llm, tokenizer = load_decoder_only(lm_path, qlora=s.qlora, lora_r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout,
                                           target_modules=s.lora_targets, dtype=dtype, gradient_checkpointing=cfg.train.gradient_checkpointing)
        return VisualLLM(llm, tokenizer, projector, s.prompt, max_target_tokens=s.max_target_tokens)
    if s.backend == "mbart":
        from fla_ds.model.mbart import IdMap, VisualMBart, load_encoder_decoder

        mbart, tokenizer = load_encoder_decoder(lm_path, dtype=dtype)
        return VisualMBart(mbart, projector, tokenizer, vocab=IdMap.load(lm_path), tgt_lang=s.tgt_lang or None,
                           label_smoothing=s.label_smoothing, max_target_tokens=s.max_target_tokens)
    raise ValueError(f"stage2.backend must be decoder_only or mbart, got '{s.backend}'")


class Stage2:
    """Stage 2 for the training loop (fla_ds/trainer.py Stage protocol)."""

    name = "stage2"

    def __init__(self, cfg, rank: int):
        self.cfg, self.rank = cfg, rank
        self.encoder: Optional[VisualEncoder] = None
        self.zero3 = False
        self.dtype = torch.float32

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
        self.zero3 = ds_config.get("zero_optimization", {}).get("stage", 0) == 3
        self.dtype = dtype
        if self.zero3:
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds_config = HfDeepSpeedConfig(ds_config)  # must live while from_pretrained runs
        if not self.cfg.stage2.features:
            self.encoder, _ = load_frozen_encoder(self.encoder_dir, self.dtype)
        return build_backend(self.cfg, self.lm_path, self.feature_dim, self.dtype)

    def param_groups(self, model: torch.nn.Module) -> list[dict]:
        projector = [p for p in model.projector.parameters() if p.requires_grad]
        ids = {id(p) for p in projector}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        return [{"params": projector, "lr": self.cfg.stage2.projector_lr}, {"params": rest, "lr": self.cfg.train.lr}]

    def features(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return prepare_features(batch, self.encoder, self.augment, self.dtype, device())

    def loss(self, engine, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        feats, mask = self.features(batch)
        return engine(feats, mask, batch.text)

    def translate(self, engine, batch: Batch) -> list[str]:
        feats, mask = self.features(batch)
        synced = self.zero3 and dist.is_initialized() and dist.get_world_size() > 1
        with torch.no_grad():
            max_new = self.cfg.eval.max_new_tokens or self.cfg.stage2.max_target_tokens
            return engine.module.generate(feats, mask, max_new_tokens=max_new, num_beams=self.cfg.eval.beam_size, synced_gpus=synced)

    def export(self, engine, step_dir: Path) -> None:
        """projector/, adapter/ (or mbart/), the encoder and configs: a folder that
        ``fla-ds export`` turns into an inference bundle without DeepSpeed."""
        module = engine.module
        trainable = [p for p in module.parameters() if p.requires_grad]
        with gathered(trainable):
            if self.rank == 0:
                state = {k: v.detach().to("cpu").clone() for k, v in module.state_dict().items() if "projector." in k or self.cfg.stage2.backend == "mbart" or "lora_" in k}
                projector = {k[len("projector."):]: v for k, v in state.items() if k.startswith("projector.")}
                module.projector.save(step_dir / "projector", state_dict=projector)
                if self.cfg.stage2.backend == "decoder_only":
                    from fla_ds.model.llm import save_adapter

                    save_adapter(module, step_dir / "adapter", state_dict=state)
                else:
                    mbart = {k[len("mbart."):]: v for k, v in state.items() if k.startswith("mbart.")}
                    module.mbart.save_pretrained(str(step_dir / "mbart"), state_dict=mbart, safe_serialization=True)
                    module.tokenizer.save_pretrained(str(step_dir / "mbart"))
                    if module.vocab is not None:
                        module.vocab.save(step_dir / "mbart")
        if self.rank == 0:
            save_resolved(self.cfg, step_dir)
            copy_encoder(self.encoder_dir, step_dir / "encoder")
            if self.cfg.stage2.backend == "decoder_only":
                module.tokenizer.save_pretrained(str(step_dir / "tokenizer"))


def copy_encoder(stage1_step: Path, out: Path) -> None:
    """The encoder this stage was trained on, with the stage-1 config that built it."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("encoder.safetensors", "config.yaml"):
        shutil.copy(stage1_step / name, out / name)
