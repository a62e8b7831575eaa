"""Stage 1 (visual initializing): video -> ResNet-18 + temporal block -> Light-T -> text.

Everything is trained; what stage 2 keeps is the encoder, exported at every checkpoint as
``encoder.safetensors`` (torch state dict names of ``VisualEncoder``), loadable without
DeepSpeed. The target vocabulary is the stage-2 language model's tokenizer trimmed to the
training corpus (fla_ds/vocab.py), so Light-T's output layer stays small.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from fla_ds.augment import Augment
from fla_ds.batch import VideoBatch
from fla_ds.config import save_resolved
from fla_ds.distributed import device, gathered
from fla_ds.model import SignTranslator
from fla_ds.stream import Source
from fla_ds.translator import Stage1Translator
from fla_ds.vocab import TrimmedVocab, build_vocab_files

log = logging.getLogger("fla_ds")


def default_tokenizer(cfg) -> str:
    if cfg.train.tokenizer:
        return cfg.train.tokenizer
    from fla_ds.llm_assets import tokenizer_path

    return str(tokenizer_path())


def prepare_vocab(cfg, rank: int) -> Path:
    """The configured vocabulary, or one built by rank 0 from the training shards."""
    if cfg.train.vocab:
        return Path(cfg.train.vocab)
    out = Path(cfg.train.out) / "vocab"
    if rank == 0 and not (out / "vocab.json").is_file():
        build_vocab_files(default_tokenizer(cfg), cfg.stream.shards, out, split="train")
        # A copy of the tokenizer beside it, so a moved run folder still resumes.
        TrimmedVocab.load(out / "vocab.json").tokenizer.save_pretrained(str(out / "tokenizer"))
    if dist.is_initialized():
        dist.barrier()
    return out / "vocab.json"


def cpu_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Own copies (tied weights would share storage, which safetensors refuses)."""
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in module.state_dict().items()}


def model_dtype(engine) -> torch.dtype:
    return torch.bfloat16 if engine.bfloat16_enabled() else torch.float32


class Stage1:
    """Stage 1 for the training loop (fla_ds/trainer.py Stage protocol)."""

    name = "stage1"

    def __init__(self, cfg, rank: int):
        self.cfg = cfg
        self.rank = rank
        self.augment = Augment(cfg.augment)
        self.hidden_size = cfg.light_t.d_model
        self.vocab_path: Path | None = None
        self.vocab: TrimmedVocab | None = None
        self._translator: Stage1Translator | None = None

    def prepare(self) -> None:
        """The vocabulary: the configured one, or built by rank 0 from the training shards."""
        self.vocab_path = prepare_vocab(self.cfg, self.rank)
        local_tokenizer = self.vocab_path.parent / "tokenizer"
        self.vocab = TrimmedVocab.load(self.vocab_path, tokenizer_path=local_tokenizer if local_tokenizer.is_dir() else None)

    def source(self) -> Source:
        return Source(self.cfg.stream.shards, self.augment)

    def build(self, ds_config: dict, dtype: torch.dtype) -> torch.nn.Module:
        model = SignTranslator.from_config(self.cfg, self.vocab, pretrained=True)
        model.encoder.gradient_checkpointing = self.cfg.train.gradient_checkpointing
        return model.to(dtype)  # ZeRO-3 + bf16 wants every parameter bf16 up front

    def param_groups(self, model: torch.nn.Module) -> list[dict]:
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    def model_input(self, engine, batch: VideoBatch) -> tuple[torch.Tensor, torch.Tensor]:
        dev = device()
        video = self.augment.model_input(batch.video.to(dev, non_blocking=True), batch.affine, dtype=model_dtype(engine))
        return video, batch.video_mask.to(dev)

    def loss(self, engine, batch: VideoBatch) -> tuple[torch.Tensor, torch.Tensor]:
        video, mask = self.model_input(engine, batch)
        targets = self.vocab.encode_batch(batch.text, self.cfg.light_t.max_target_tokens).to(device())
        return engine(video, mask, targets)

    def translator(self, engine) -> Stage1Translator:
        """The translator inference uses, around the live model (made once)."""
        if self._translator is None:
            self._translator = Stage1Translator(engine.module, self.vocab, self.cfg)
        return self._translator

    def translate(self, engine, batch: VideoBatch) -> list[str]:
        with gathered(engine.module.parameters()):  # beam search reads whole weights
            return self.translator(engine)(batch)

    def export(self, engine, step_dir: Path) -> None:
        with gathered(engine.module.parameters()):
            if self.rank == 0:
                module = engine.module
                save_file(cpu_state_dict(module.encoder), str(step_dir / "encoder.safetensors"), metadata={"format": "pt", "what": "fla_ds VisualEncoder"})
                save_file(cpu_state_dict(module), str(step_dir / "model.safetensors"), metadata={"format": "pt", "what": "fla_ds SignTranslator"})
        if self.rank == 0:
            save_resolved(self.cfg, step_dir)
            copy_vocab(self.vocab_path, self.vocab, step_dir)


def copy_vocab(vocab_path: Path, vocab: TrimmedVocab, step_dir: Path) -> None:
    """The vocabulary and the tokenizer it maps into, so the folder stands on its own."""
    shutil.copy(vocab_path, step_dir / "vocab.json")
    tokenizer_dir = step_dir / "tokenizer"
    tokenizer_dir.mkdir(exist_ok=True)
    vocab.tokenizer.save_pretrained(str(tokenizer_dir))
