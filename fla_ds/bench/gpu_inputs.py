"""What ``fla-ds bench gpu`` measures with, made on the spot and never downloaded: the two
stages' configs (the shipped ones, or tiny shapes for the CPU), a byte-level BPE tokenizer
trained on the package's own sentences, a randomly initialised LLaMA written as a Hugging Face
folder (so the project's loader quantises it to NF4 as it would the real model), synthetic
batches of the paper's size, and DeepSpeed engines set up as fla_ds/trainer.py sets them up.

Paper sizes (fla-llm notes): clips of ``bench.frames`` stored frames (PHOENIX-2014T's mean,
116), T/4 of them kept (``augment.keep_ratio``), stored at short side ``shards.short_side``
(256) so that training cuts a 256x256 canvas and warps it to 224x224 on the device, and
evaluation cuts the exact 224x224 centre crop.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch
from omegaconf import OmegaConf

TINY_STAGE1 = [
    "visual.out_dim=32", "light_t.d_model=32", "light_t.heads=2", "light_t.encoder_layers=1", "light_t.decoder_layers=1",
    "light_t.ffn=64", "light_t.adapter_hidden=32", "light_t.max_target_tokens=16", "augment.crop_size=32", "shards.short_side=36",
    "eval.max_new_tokens=8", "train.precision=fp32",
]
"""``bench.tiny=true``: a stage-1 model that trains in milliseconds on a CPU (ResNet-18 itself
is kept: it is the project's own encoder, at 32x32 it is cheap)."""
TINY_STAGE2 = ["stage2.max_target_tokens=8", "eval.max_new_tokens=8", "train.precision=fp32"]
TINY_FRAMES = 16
"""``bench.tiny=true``: stored frames per clip (4 kept at T/4)."""
TINY_DECODE_CLIPS = 2
"""``bench.tiny=true``: clips per decoded batch (else each stage's ``train.micro_batch``, the
evaluation's batch)."""

LLAMA2_7B = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
             "intermediate_size": 11008, "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}
"""LLaMA-2-7B's shapes (its config.json): 6.74 B parameters."""
TINY_LLAMA = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 128, "vocab_size": 1024, "max_position_embeddings": 512, "rms_norm_eps": 1e-5}
TOKENIZER_VOCAB = 1000
"""The bench tokenizer's size: every id fits both models' embedding tables."""


def bench_configs(cfg, overrides: list[str], tiny: bool):
    """(stage-1 config, stage-2 config): ``bench.stage1_config`` and ``bench.stage2_config``
    (shipped names or files), then the tiny shapes when ``tiny``, then the command line's
    ``overrides`` (so ``stage2.lora_dropout=0`` benches that setting)."""
    from fla_ds.config import load_config

    user = [o for o in overrides if not o.startswith("bench.")]
    stage1 = load_config(cfg.bench.stage1_config, (TINY_STAGE1 if tiny else []) + user)
    stage2 = load_config(cfg.bench.stage2_config, (TINY_STAGE2 if tiny else []) + user)
    return stage1, stage2


def stored_frames(cfg, tiny: bool) -> int:
    return TINY_FRAMES if tiny else cfg.bench.frames


def kept_frames(cfg1, frames: int) -> int:
    """Frames the model sees of a clip of ``frames`` (the loader's T/4 rule)."""
    from fla_ds.augment import sample_frame_indices

    a = cfg1.augment
    return len(sample_frame_indices(frames, random.Random(0), a.keep_ratio, a.stride_jitter, a.max_frames, False))


def sentences() -> list[str]:
    """The package's own PHOENIX-2014T sentences (fla_ds/corpus/synth_sentences.txt)."""
    from fla_ds.corpus.synthetic import SHIPPED_SENTENCES, read_sentence_file

    return read_sentence_file(SHIPPED_SENTENCES)


def long_texts(count: int, words: int) -> list[str]:
    """``count`` texts of at least ``words`` words, sentences joined: stage 2 cuts them at
    ``stage2.max_target_tokens``, so every row has the same target length."""
    pool, out = sentences(), []
    for i in range(count):
        text, j = [], i
        while len(text) < words:
            text += pool[j % len(pool)].split()
            j += 7
        out.append(" ".join(text))
    return out


def train_tokenizer(folder: Path) -> Path:
    """(Once per folder) a byte-level BPE (GPT-2 style) on the shipped sentences and the
    stage-2 prompts in lower case (so that the German prompt takes 17 tokens, about what
    LLaMA's tokenizer makes of it: 18 with SmolLM2's), with LLaMA's special ids (<unk> 0, <s> 1,
    </s> 2) and a BOS put in front of every text as LLaMA's tokenizer does; saved as a Hugging
    Face folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from fla_ds.stage2 import PROMPTS

    if (folder / "tokenizer.json").is_file():
        return folder
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(sentences() + [p.lower() for p in PROMPTS.values()], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(folder)
    return folder


def stage1_vocab(folder: Path):
    """Stage 1's trimmed vocabulary (fla_ds/vocab.py) of the bench tokenizer over the shipped sentences."""
    from fla_ds.vocab import TrimmedVocab, build_vocab, load_tokenizer

    tokenizer = load_tokenizer(folder)
    return TrimmedVocab(build_vocab(folder, sentences(), tokenizer=tokenizer), tokenizer)


def write_random_llama(folder: Path, tokenizer: Path, tiny: bool, dtype: torch.dtype) -> Path:
    """A randomly initialised LLaMA (``LLAMA2_7B``'s shapes, or ``TINY_LLAMA``) with the bench
    tokenizer, saved as safetensors: 13.5 GB for the 7B shapes in bf16, initialised on the
    GPU (seconds) and written once for every ZeRO stage. Returns ``folder``."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    from fla_ds.distributed import device

    shutil.copytree(train_tokenizer(tokenizer), folder)
    config = LlamaConfig(**(TINY_LLAMA if tiny else LLAMA2_7B), bos_token_id=1, eos_token_id=2, pad_token_id=None,
                         initializer_range=0.1 if tiny else 0.02)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.random.fork_rng(), device():
            torch.manual_seed(0)
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(folder)
    del model
    return folder


# ------------------------------------------------------------------ batches


def cycle(texts: list[str], count: int) -> list[str]:
    return [texts[i % len(texts)] for i in range(count)]


def video_batch(clips: int, frames: int, side: int, texts: list[str], train: bool, cfg1):
    """A ``VideoBatch`` of random uint8 pixels (B, frames, side, side, 3), every frame real;
    ``train``: each clip with its training warp (``Augment.crop`` of a side x side canvas),
    else none (the evaluation crop is cut to size already)."""
    from fla_ds.augment import Augment
    from fla_ds.batch import VideoBatch

    g = torch.Generator().manual_seed(clips)
    video = torch.randint(0, 256, (clips, frames, side, side, 3), dtype=torch.uint8, generator=g)
    augment, rng = Augment(cfg1.augment), random.Random(0)
    affine = torch.tensor([augment.crop(side, side, rng, True)[1] for _ in range(clips)], dtype=torch.float32) if train else None
    return pinned(VideoBatch(video=video, video_mask=torch.ones(clips, frames, dtype=torch.bool), affine=affine, text=cycle(texts, clips),
                      id=[f"c{i}" for i in range(clips)], key=[f"c{i}" for i in range(clips)], valid=torch.ones(clips, dtype=torch.bool),
                      step=0, epoch=0))


def feature_batch(clips: int, frames: int, dim: int, texts: list[str]):
    """A ``FeatureBatch`` as a feature cache yields it: float16 (B, frames, dim), all real."""
    from fla_ds.batch import FeatureBatch

    g = torch.Generator().manual_seed(clips)
    feats = torch.randn(clips, frames, dim, generator=g).to(torch.float16)
    return pinned(FeatureBatch(features=feats, features_mask=torch.ones(clips, frames, dtype=torch.bool), view=torch.zeros(clips, dtype=torch.long),
                        text=cycle(texts, clips), id=[f"c{i}" for i in range(clips)], key=[f"c{i}" for i in range(clips)],
                        valid=torch.ones(clips, dtype=torch.bool), step=0, epoch=0))


# ------------------------------------------------------------------ engines


def engine_for(stage, cfg, ds_config_path: str, dtype: torch.dtype):
    """(engine, resolved DeepSpeed config) as fla_ds/trainer.py builds them, for one process:
    the DeepSpeed JSON with its "auto" values filled for micro batch 1 (the step's batch is
    whatever it is given), the stage's model and parameter groups, the configured optimizer,
    ``train.compile`` as the trainer applies it."""
    import deepspeed

    from fla_ds.engine import build_optimizer, fill_ds_config, load_ds_config

    one = OmegaConf.merge(cfg, {"train": {"micro_batch": 1, "global_batch": 1}})
    ds_config = fill_ds_config(load_ds_config(ds_config_path), one, 1, stage.hidden_size, dtype)
    model = stage.build(ds_config, dtype)
    optimizer = build_optimizer(stage.param_groups(model), cfg)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    if cfg.train.get("compile", False):
        engine.compile(backend=cfg.train.compile_backend)
    return engine, ds_config


class StepHost:
    """What the trainer's step (``Trainer.train_micro_batch``) reads of its trainer: the stage,
    the engine, the world size and the device-side running sums. The bench runs that step itself,
    not a copy of it."""

    def __init__(self, stage, engine):
        from fla_ds.distributed import device
        from fla_ds.feed import RunningSums

        self.stage, self.engine, self.world, self.sums = stage, engine, 1, RunningSums(device())

    def step(self, batch) -> None:
        """One training step of a loader batch: the stage's device inputs (``Stage.inputs``;
        the trainer makes them one batch ahead on a side stream, here in line), then the
        trainer's forward, backward and optimizer step."""
        from fla_ds.trainer import Trainer

        Trainer.train_micro_batch(self, self.stage.inputs(batch), len(batch.text))

    def timed(self, batch, warmup: int, steps: int) -> dict:
        """``fla_ds.bench.gpu.time_steps`` of ``step(batch)``; a step that fails (out of memory
        at a large micro batch) leaves no half-accumulated gradients behind for the next."""
        from fla_ds.bench.gpu import time_steps

        try:
            return time_steps(lambda: self.step(batch), warmup, steps)
        except Exception:
            self.engine.zero_grad()
            raise


def pinned(batch):
    """The batch with its tensors in pinned memory on a CUDA machine, as the loader hands them
    to the trainer there (copies to the device are then asynchronous)."""
    import dataclasses

    if not torch.cuda.is_available():
        return batch
    return dataclasses.replace(batch, **{f.name: v.pin_memory() for f in dataclasses.fields(batch) if isinstance(v := getattr(batch, f.name), torch.Tensor)})
