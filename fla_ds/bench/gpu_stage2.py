"""``fla-ds bench gpu``, stage 2: the project's stage (``Stage2``: backend build, parameter
groups, ``loss``) and engine set-up (the DeepSpeed JSONs of ``ds_configs/``, "auto" values filled
by ``fill_ds_config``) around a LLaMA-2-7B-shaped model with random weights, which the project's
loader quantises to NF4 as it would the real one (``stage2.qlora``, LoRA as ``stage2.lora_*``
of the stage-2 config; ``bench.tiny``: a 2-layer LLaMA on the CPU).

Measurements (keys of the JSON):
- ``stage2.model``: initialising the random model and writing it as safetensors, seconds;
- ``stage2.zero<Z>.build`` for Z in 2, 3: loading it (NF4 on load), LoRA, the engine, seconds;
- ``stage2.zero<Z>.ckpt_<on|off>.mb<N>.<cache|video>``: measured training steps, with gradient
  checkpointing on or off, at each ``bench.stage2_micro_batches``, reading the feature cache
  (``cache``: float16 features, no encoder in the step) or running the frozen stage-1 encoder on
  video in the step (``video``: uint8 clips warped to 224x224 on the device, ResNet-18 without
  gradients): samples_per_s, tokens_per_s (every real position of the sequence: BOS, visual
  tokens, prompt, target, EOS: ``seq_len``), target_tokens_per_s, step_s (median, min, max),
  peak_mem_gib;
- ``stage2.zero2.activations``: what autograd keeps for the backward of one micro-batch-1
  forward without checkpointing (``torch.autograd.graph.saved_tensors_hooks``, each storage
  counted once, parameters left out): bytes_per_token, and bytes_per_token_layer (that over
  the layers): the figure docs/memory.md derives from the shapes;
- ``stage2.zero<Z>.decode``: beam-5 generation (``Stage2Translator``, the evaluation's path)
  of ``train.micro_batch`` feature clips, clips_per_s. Random weights rarely emit EOS, so
  every beam runs to ``eval.max_new_tokens``: the slowest case.

Rows are all alike (same number of frames, prompt, ``bench.target_tokens`` target tokens): no
padding, so ``seq_len`` is the padded length too; set ``bench.frames`` or ``bench.target_tokens``
to bench the padded length of a real batch (docs/memory.md).
"""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

BEAM = 5
SOURCES = ("cache", "video")
ZERO_STAGES = (2, 3)
TINY_TARGET_TOKENS = 8


def micro_batches(cfg) -> list[int]:
    return sorted({int(m) for m in cfg.bench.stage2_micro_batches})


def step_keys(cfg, zero: int) -> list[str]:
    return [f"stage2.zero{zero}.ckpt_{ckpt}.mb{mb}.{source}" for ckpt in ("on", "off") for mb in micro_batches(cfg) for source in SOURCES]


def stage2_plan(cfg) -> list[str]:
    keys = ["stage2.model"]
    for zero in ZERO_STAGES:
        keys += [f"stage2.zero{zero}.build", *(["stage2.zero2.activations"] if zero == 2 else []), *step_keys(cfg, zero), f"stage2.zero{zero}.decode"]
    return keys


def bench_stage2_config(cfg2, folder: Path, target_tokens: int):
    """The stage-2 config as the bench runs it: the random model, a prompt (the German default
    when the config has none: PHOENIX-2014T), targets cut at ``target_tokens``; ``features``
    set, so that ``Stage2.build`` loads no stage-1 checkpoint (the bench gives it a random
    frozen encoder for the video steps)."""
    from fla_ds.stage2 import PROMPTS

    return OmegaConf.merge(cfg2, {"stage2": {"model": str(folder), "features": "(bench gpu: synthetic features)", "encoder": "",
                                             "prompt": cfg2.stage2.prompt or PROMPTS["de"], "max_target_tokens": target_tokens}})


def frozen_encoder(cfg1, dtype: torch.dtype):
    """The stage-1 encoder as stage 2 holds it (eval mode, no gradients), randomly initialised."""
    from fla_ds.distributed import device
    from fla_ds.model import VisualEncoder

    encoder = VisualEncoder.from_config(cfg1)
    encoder.requires_grad_(False)
    return encoder.eval().to(device=device(), dtype=dtype)


def set_checkpointing(model, on: bool) -> None:
    """Gradient checkpointing of the language model on or off, with the reentrant kind the
    backend uses (``fla_ds.model.llm.freeze_base`` says why)."""
    if on:
        model.llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    else:
        model.llm.activation_checkpointing_disable()


def run_stage2(bench, cfg, cfg1, cfg2, tiny: bool, scratch: Path) -> None:
    from fla_ds.bench.gpu import free_memory
    from fla_ds.bench.gpu_inputs import write_random_llama
    from fla_ds.engine import resolve_dtype

    dtype = resolve_dtype(cfg2.train.precision)
    folder = bench.prepare("stage2.model", lambda: write_random_llama(scratch / "llama", scratch / "tokenizer", tiny, dtype), need_s=5 if tiny else 90)
    if folder is None:
        bench.skip_all(stage2_plan(cfg)[1:], f"needs stage2.model ({bench.skipped.get('stage2.model', '')})")
        return
    target = TINY_TARGET_TOKENS if tiny else int(cfg.bench.target_tokens)
    cfgx = bench_stage2_config(cfg2, folder, target)
    bench.notes["stage2.setup"] = (f"{'tiny LLaMA' if tiny else 'LLaMA-2-7B shapes'}, random weights, qlora={cfgx.stage2.qlora} "
                                   f"(NF4 on load), LoRA r={cfgx.stage2.lora_r} alpha={cfgx.stage2.lora_alpha} dropout={cfgx.stage2.lora_dropout} "
                                   f"on {cfgx.stage2.lora_targets}, {dtype}, optimizer {cfgx.train.optimizer.name}; {target} target tokens")
    for zero in ZERO_STAGES:
        run_zero(bench, cfg, cfg1, cfgx, zero, folder, dtype, tiny)
        free_memory()  # the engine is gone with run_zero's frame


def run_zero(bench, cfg, cfg1, cfgx, zero: int, folder: Path, dtype: torch.dtype, tiny: bool) -> None:
    """One ZeRO stage: build the engine once, then every step measurement and the decode."""
    from fla_ds.augment import Augment
    from fla_ds.backends import lm_hidden_size
    from fla_ds.bench.gpu_inputs import engine_for
    from fla_ds.stage2 import Stage2

    key = f"stage2.zero{zero}"
    stage = Stage2(cfgx, rank=0)

    def build():
        stage.lm_path, stage.hidden_size, stage.feature_dim = str(folder), lm_hidden_size(str(folder)), int(cfg1.visual.out_dim)
        stage.augment, stage.encoder_cfg = Augment(cfg1.augment), cfg1  # what the encoder reads, as Stage2.prepare takes them from the stage-1 checkpoint
        engine = engine_for(stage, cfgx, f"ds_configs/zero{zero}.json", dtype)[0]
        stage.encoder = frozen_encoder(cfg1, dtype)
        return engine

    engine = bench.prepare(f"{key}.build", build, need_s=5 if tiny else 60)
    if engine is None:
        dependents = [k for k in stage2_plan(cfg) if k.startswith(key + ".") and k != f"{key}.build"]
        bench.skip_all(dependents, f"needs {key}.build ({bench.skipped.get(f'{key}.build', '')})")
        return
    from fla_ds.bench.gpu_inputs import kept_frames, stored_frames

    frames = kept_frames(cfg1, stored_frames(cfg, tiny))
    steps(bench, cfg, cfg1, cfgx, stage, engine, zero, frames)
    decode(bench, cfg1, cfgx, stage, engine, zero, frames, tiny)


def steps(bench, cfg, cfg1, cfgx, stage, engine, zero: int, frames: int) -> None:
    from fla_ds.bench.gpu import peak_memory_gib, reset_peak_memory
    from fla_ds.bench.gpu_inputs import StepHost, feature_batch, long_texts, video_batch

    b = cfg.bench
    dim, canvas = int(cfg1.visual.out_dim), int(cfg1.shards.short_side)
    model, host = engine.module, StepHost(stage, engine)
    texts = long_texts(64, cfgx.stage2.max_target_tokens)
    target = len(model.target_ids(texts[:1])[0])  # target tokens + EOS
    seq_len = len(model.head_ids) + frames + len(model.prompt_ids) + target
    bench.notes[f"stage2.zero{zero}.rows"] = (f"{seq_len} tokens per sample: {len(model.head_ids)} BOS + {frames} visual + {len(model.prompt_ids)} "
                                              f"prompt + {target} target incl. EOS; video steps: {frames} frames of {canvas}x{canvas} "
                                              f"warped to {cfg1.augment.crop_size}")

    def measure(mb: int, source: str) -> dict:
        batch = feature_batch(mb, frames, dim, texts) if source == "cache" else video_batch(mb, frames, canvas, texts, True, cfg1)
        reset_peak_memory()
        times = host.timed(batch, b.warmup_steps, b.timed_steps)
        step = times["step_s"]
        return {"samples_per_s": mb / step, "tokens_per_s": mb * seq_len / step, "target_tokens_per_s": mb * target / step,
                **times, "peak_mem_gib": peak_memory_gib(), "seq_len": seq_len}

    if zero == 2:
        bench.measure("stage2.zero2.activations", lambda: saved_activations(stage, engine, feature_batch(1, frames, dim, texts), seq_len), need_s=3)
    for ckpt in ("on", "off"):
        set_checkpointing(model, ckpt == "on")
        for mb in micro_batches(cfg):
            for source in SOURCES:
                bench.measure(f"stage2.zero{zero}.ckpt_{ckpt}.mb{mb}.{source}", lambda mb=mb, source=source: measure(mb, source),
                              need_s=3, kind=f"stage2.mb{mb}.{source}.ckpt_{ckpt}")
    set_checkpointing(model, bool(cfgx.train.gradient_checkpointing))


def saved_activations(stage, engine, batch, seq_len: int) -> dict:
    """Bytes autograd saves for the backward of one forward of ``batch`` (one sample) with
    checkpointing off: every saved tensor's storage once, the model's parameters excepted (they
    are resident anyway); per token, and per token and layer."""
    model = engine.module
    set_checkpointing(model, False)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        try:
            where, size = tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):  # a tensor without a plain storage: its own bytes
            where, size = id(tensor), tensor.numel() * tensor.element_size()
        if where not in params:
            seen[where] = max(seen.get(where, 0), size)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss_sum, _ = stage.loss(engine, stage.inputs(batch))
    del loss_sum  # the graph goes with it, never backpropagated
    per_token = sum(seen.values()) / seq_len
    return {"bytes_per_token": per_token, "bytes_per_token_layer": per_token / model.llm.config.num_hidden_layers}


def decode(bench, cfg1, cfgx, stage, engine, zero: int, frames: int, tiny: bool) -> None:
    """Beam-5 generation of one batch of feature clips with the stage's translator (the one the
    trainer's evaluation uses: under ZeRO-3 a plain copy, built and filled before the timing),
    after a one-token warm-up."""
    from fla_ds.bench.gpu import time_steps
    from fla_ds.bench.gpu_inputs import TINY_DECODE_CLIPS, feature_batch, long_texts

    clips = TINY_DECODE_CLIPS if tiny else int(cfgx.train.micro_batch)

    def run() -> dict:
        batch = feature_batch(clips, frames, int(cfg1.visual.out_dim), long_texts(clips, 4))
        translator = stage.translator(engine)  # the evaluation's own: under ZeRO-3 a plain copy of the model
        translator.use_decoding(cfgx, beam_size=BEAM)
        new_tokens = translator.max_new_tokens
        engine.eval()
        try:
            translator.max_new_tokens = 1
            translator(batch)  # the warm-up: one token
            translator.max_new_tokens = new_tokens
            seconds = time_steps(lambda: translator(batch), warmup=0, steps=1)["step_s"]
        finally:
            engine.train()
        return {"clips_per_s": clips / seconds, "seconds": seconds}

    most = cfgx.eval.max_new_tokens or cfgx.stage2.max_target_tokens
    bench.notes[f"stage2.zero{zero}.decode"] = f"beam {BEAM}, {clips} clips of {frames} feature steps, at most {most} new tokens"
    bench.measure(f"stage2.zero{zero}.decode", run, need_s=5, kind=f"stage2.decode.zero{zero}")

