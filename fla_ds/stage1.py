"""Stage 1 (visual initializing): video -> ResNet-18 + temporal block -> Light-T -> text.

Everything is trained; what stage 2 keeps is the encoder, exported at every checkpoint as
``encoder.safetensors`` (torch state dict names of ``VisualEncoder``), loadable without
DeepSpeed. The target vocabulary is the stage-2 language model's tokenizer trimmed to the
training corpus (fla_ds/vocab.py), so Light-T's output layer stays small.

A training step reads no device value: the target ids and the positions of the real frames are
computed on the host, from the loader's batch, and copied one batch ahead (``Stage1.inputs``).
Under ZeRO-3, dev decoding runs on a plain copy of the model refreshed once per evaluation
(``Stage1.translator``): beam search under ZeRO-3's hooks would gather every weight again at each
decoding step, a collective that ranks decoding different numbers of steps would not all join.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from fla_ds.augment import Augment
from fla_ds.batch import VideoBatch
from fla_ds.config import save_resolved
from fla_ds.distributed import device, gathered
from fla_ds.feed import to_device
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


@dataclass
class Stage1Inputs:
    """A video batch's model inputs on the device. video: uint8 (B, T, H, W, 3); mask: bool
    (B, T), True on real frames; affine: float32 (B, 2, 3) or None (evaluation); frame_index:
    long (N_real,), the flat positions b * T + t of the real frames, found on the host (so the
    encoder needs no device sync to gather them); targets: long (B, L), BOS ids EOS PAD..
    (``TrimmedVocab.encode_batch``)."""

    video: torch.Tensor
    mask: torch.Tensor
    affine: torch.Tensor | None
    frame_index: torch.Tensor
    targets: torch.Tensor


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
        self.zero3 = False
        self.replica_step: int | None = None  # the optimizer step the ZeRO-3 decoding copy holds

    def prepare(self) -> None:
        """The vocabulary: the configured one, or built by rank 0 from the training shards."""
        self.vocab_path = prepare_vocab(self.cfg, self.rank)
        local_tokenizer = self.vocab_path.parent / "tokenizer"
        self.vocab = TrimmedVocab.load(self.vocab_path, tokenizer_path=local_tokenizer if local_tokenizer.is_dir() else None)

    def source(self) -> Source:
        return Source(self.cfg.stream.shards, self.augment)

    def build(self, ds_config: dict, dtype: torch.dtype) -> torch.nn.Module:
        self.zero3 = ds_config.get("zero_optimization", {}).get("stage", 0) == 3
        model = SignTranslator.from_config(self.cfg, self.vocab, pretrained=True)
        model.encoder.gradient_checkpointing = self.cfg.train.gradient_checkpointing
        return model.to(dtype)  # ZeRO-3 + bf16 wants every parameter bf16 up front

    def param_groups(self, model: torch.nn.Module) -> list[dict]:
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    def inputs(self, batch: VideoBatch) -> Stage1Inputs:
        """``Stage1Inputs`` from a loader batch: target ids and real-frame positions computed
        on the host (the loader's tensors are host memory: numpy reads them without touching a
        device), everything copied with ``to_device``."""
        dev = device()
        index = torch.from_numpy(np.flatnonzero(batch.video_mask.numpy()))
        targets = self.vocab.encode_batch(batch.text, self.cfg.light_t.max_target_tokens)
        affine = None if batch.affine is None else to_device(batch.affine, dev)
        return Stage1Inputs(to_device(batch.video, dev), to_device(batch.video_mask, dev), affine, to_device(index, dev), to_device(targets, dev))

    def loss(self, engine, inputs: Stage1Inputs) -> tuple[torch.Tensor, torch.Tensor]:
        video = self.augment.model_input(inputs.video, inputs.affine, dtype=model_dtype(engine))
        return engine(video, inputs.mask, inputs.targets, frame_index=inputs.frame_index)

    def translator(self, engine) -> Stage1Translator:
        """The translator dev decoding uses: around the live model (made once), or under ZeRO-3
        around a plain copy of it, refreshed with one gather whenever the weights moved since
        the last evaluation (every rank calls this at the same evaluation batches)."""
        if not self.zero3:
            if self._translator is None:
                self._translator = Stage1Translator(engine.module, self.vocab, self.cfg)
            return self._translator
        if self._translator is None:
            with torch.random.fork_rng():  # the copy's initial weights are overwritten: leave training's random stream alone
                replica = SignTranslator.from_config(self.cfg, self.vocab, pretrained=False)
            self._translator = Stage1Translator(replica.to(device=device(), dtype=model_dtype(engine)).eval(), self.vocab, self.cfg)
        if self.replica_step != engine.global_steps:
            with gathered(engine.module.parameters()), torch.no_grad():
                self._translator.model.load_state_dict(engine.module.state_dict())
            self.replica_step = engine.global_steps
        return self._translator

    def translate(self, engine, batch: VideoBatch) -> list[str]:
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
