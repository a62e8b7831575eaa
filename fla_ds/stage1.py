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
from typing import Optional

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from fla_ds.augment import Augment
from fla_ds.batch import VideoBatch
from fla_ds.config import load_config, save_resolved
from fla_ds.distributed import device, gathered
from fla_ds.model import LightT, SignTranslator, VisualEncoder
from fla_ds.stream import Source
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


def build_translator(cfg, vocab: TrimmedVocab, pretrained: bool = True) -> SignTranslator:
    """The stage-1 model the config describes; ``pretrained``: the CNN starts from the ImageNet
    checkpoint ``visual.pretrained`` names (training). A checkpoint being loaded passes False:
    its own weights replace these, and the file its config names need not exist (nor be read)
    where it is loaded."""
    v, t = cfg.visual, cfg.light_t
    encoder = VisualEncoder(out_dim=v.out_dim, kernel_size=v.temporal_kernel, pretrained=(v.pretrained or None) if pretrained else None)
    light_t = LightT(
        in_dim=v.out_dim, vocab_size=vocab.size, pad_id=vocab.pad_id, bos_id=vocab.bos_id, eos_id=vocab.eos_id,
        d_model=t.d_model, heads=t.heads, encoder_layers=t.encoder_layers, decoder_layers=t.decoder_layers,
        ffn=t.ffn, dropout=t.dropout, adapter_hidden=t.adapter_hidden, max_len=t.max_target_tokens, label_smoothing=t.label_smoothing,
    )
    return SignTranslator(encoder, light_t)


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
        self.max_decode = cfg.eval.max_new_tokens or cfg.light_t.max_target_tokens
        self.vocab_path: Optional[Path] = None
        self.vocab: Optional[TrimmedVocab] = None

    def prepare(self) -> None:
        """The vocabulary: the configured one, or built by rank 0 from the training shards."""
        self.vocab_path = prepare_vocab(self.cfg, self.rank)
        local_tokenizer = self.vocab_path.parent / "tokenizer"
        self.vocab = TrimmedVocab.load(self.vocab_path, tokenizer_path=local_tokenizer if local_tokenizer.is_dir() else None)

    def source(self) -> Source:
        return Source(self.cfg.stream.shards, self.augment)

    def build(self, ds_config: dict, dtype: torch.dtype) -> torch.nn.Module:
        model = build_translator(self.cfg, self.vocab)
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

    def translate(self, engine, batch: VideoBatch) -> list[str]:
        video, mask = self.model_input(engine, batch)
        with torch.no_grad(), gathered(engine.module.parameters()):
            ids = engine.module.generate(video, mask, beam_size=self.cfg.eval.beam_size, max_len=self.max_decode)
        return [self.vocab.decode(row) for row in ids]

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


class Translator:
    """A stage-1 checkpoint for inference, without DeepSpeed: ``fla-ds evaluate``."""

    def __init__(self, model: SignTranslator, vocab: TrimmedVocab, cfg, beam_size: int = 0):
        self.cfg, self.vocab = cfg, vocab
        self.model = model.eval().to(device())
        self.beam = beam_size or self.cfg.eval.beam_size
        self.max_decode = self.cfg.eval.max_new_tokens or self.cfg.light_t.max_target_tokens
        self.augment = Augment(cfg.augment)

    @classmethod
    def from_checkpoint(cls, step_dir: Path, beam_size: int = 0) -> "Translator":
        """A stage-1 step folder, verified first (``fla_ds.artifacts``: its COMPLETE manifest,
        ``model.safetensors`` intact and fitting the model its config builds). Raises
        ArtifactError (one line naming the file) or ConfigError."""
        from fla_ds.artifacts import hf_errors, load_safetensors, load_state, verify_folder

        step_dir = Path(step_dir)
        verify_folder(step_dir)
        cfg = load_config(str(step_dir / "config.yaml"))
        with hf_errors(step_dir, "the vocabulary (vocab.json, tokenizer/)"):
            vocab = TrimmedVocab.load(step_dir / "vocab.json", tokenizer_path=step_dir / "tokenizer")
        model = build_translator(cfg, vocab, pretrained=False)
        weights = step_dir / "model.safetensors"
        load_state(model, load_safetensors(weights), weights)
        return cls(model, vocab, cfg, beam_size)

    @torch.no_grad()
    def __call__(self, batch: VideoBatch) -> list[str]:
        video = self.augment.model_input(batch.video.to(device()), batch.affine)
        ids = self.model.generate(video, batch.video_mask.to(device()), beam_size=self.beam, max_len=self.max_decode)
        return [self.vocab.decode(row) for row in ids]
