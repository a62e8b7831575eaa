"""``fla-ds bench gpu``, stage 1: the project's own model (``SignTranslator``: ResNet-18 +
temporal block + Light-T) and step (``Stage1.inputs``, then the trainer's own
``Trainer.train_micro_batch``: ``Stage1.loss``, backward and optimizer step under the stage-1
config's DeepSpeed engine), on synthetic clips of the paper's size (pinned on a GPU machine, as
the loader hands them over).

Measurements (keys of the JSON):
- ``stage1.build``: the engine's set-up, seconds;
- ``stage1.flops``: model FLOPs of one training clip, forward + backward, counted by
  ``torch.utils.flop_counter.FlopCounterMode`` over one real step of one clip (convolutions,
  matmuls, attention; the device-side warp and the optimizer update are not model FLOPs);
- ``stage1.train.mb<N>`` for each ``bench.stage1_micro_batches``, then doubling (each its own
  key) until one runs out of memory or passes ``bench.max_micro_batch``: clips_per_s, step_s
  (median, min, max), mfu (clips/s x FLOPs per clip / the device's peak), peak_mem_gib (weights,
  SGD state and activations: everything allocated during the steps);
- ``stage1.train.largest``: the largest micro batch that ran, with its figures;
- ``stage1.decode``: beam-5 decoding (``Stage1Translator``) of an evaluation batch
  (``train.micro_batch`` clips, 224x224 centre crops), clips_per_s. Random weights rarely end a
  hypothesis early: decoding mostly runs to ``eval.max_new_tokens`` / ``light_t.max_target_tokens``.
"""
from __future__ import annotations

from pathlib import Path

BEAM = 5


def micro_batches(cfg) -> list[int]:
    return sorted({int(m) for m in cfg.bench.stage1_micro_batches})


def stage1_plan(cfg) -> list[str]:
    return ["stage1.build", "stage1.flops", *[f"stage1.train.mb{m}" for m in micro_batches(cfg)], "stage1.train.largest", "stage1.decode"]


def flops_per_clip(host, batch) -> float:
    """Model FLOPs of one training clip: one training step of a one-clip batch under
    ``FlopCounterMode``, which counts convolutions, matmuls and attention, forward and backward
    (the optimizer's element-wise update and the device-side warp are not model FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        host.step(batch)
    return float(counter.get_total_flops())


def run_stage1(bench, cfg, cfg1, tiny: bool, scratch: Path) -> float | None:
    """Every stage-1 measurement; returns the best training clips/s measured (None: none ran)."""
    from fla_ds.bench.gpu import device_name, peak_tflops
    from fla_ds.bench.gpu_inputs import StepHost, engine_for, kept_frames, sentences, stage1_vocab, stored_frames, train_tokenizer, video_batch
    from fla_ds.engine import resolve_dtype
    from fla_ds.stage1 import Stage1

    b = cfg.bench
    dtype = resolve_dtype(cfg1.train.precision)
    frames, canvas = kept_frames(cfg1, stored_frames(cfg, tiny)), cfg1.shards.short_side
    bench.notes["stage1.input"] = (f"{frames} frames (T/{1 / cfg1.augment.keep_ratio:g} of {stored_frames(cfg, tiny)}) of a {canvas}x{canvas} canvas "
                                   f"warped to {cfg1.augment.crop_size}x{cfg1.augment.crop_size}, {dtype}, {cfg1.train.ds_config}, "
                                   f"optimizer {cfg1.train.optimizer.name}")
    stage = Stage1(cfg1, rank=0)

    def build():
        stage.vocab = stage1_vocab(train_tokenizer(scratch / "tokenizer"))
        return engine_for(stage, cfg1, cfg1.train.ds_config, dtype)[0]

    engine = bench.prepare("stage1.build", build, need_s=5 if tiny else 30)
    if engine is None:
        bench.skip_all(stage1_plan(cfg)[1:], f"needs stage1.build ({bench.skipped.get('stage1.build', '')})")
        return None
    texts, host = sentences(), StepHost(stage, engine)
    one_clip = video_batch(1, frames, canvas, texts, True, cfg1)
    flops = bench.measure("stage1.flops", lambda: {"flops_per_clip": flops_per_clip(host, one_clip)}, need_s=5 if tiny else 20)
    peak = peak_tflops(device_name(), float(b.peak_tflops))

    def train(mb: int) -> dict:
        from fla_ds.bench.gpu import peak_memory_gib, reset_peak_memory

        batch = video_batch(mb, frames, canvas, texts, True, cfg1)
        reset_peak_memory()
        times = host.timed(batch, b.warmup_steps, b.timed_steps)
        rate = mb / times["step_s"]
        mfu: float | str = "no FLOP count (stage1.flops skipped)"
        if flops and peak:
            mfu = rate * flops["flops_per_clip"] / (peak * 1e12)
        elif flops:
            mfu = f"no peak FLOP/s known for '{device_name()}': set bench.peak_tflops"
        return {"clips_per_s": rate, **times, "mfu": mfu, "peak_mem_gib": peak_memory_gib()}

    best: dict = {}
    for mb in micro_batches(cfg):
        if (values := bench.measure(f"stage1.train.mb{mb}", lambda mb=mb: train(mb), need_s=2, kind=f"stage1.train.mb{mb}")) is not None:
            best[mb] = values
    largest(bench, cfg, best, train, min(16, int(b.max_micro_batch)) if tiny else int(b.max_micro_batch))
    decode(bench, cfg1, stage, engine, frames, texts, tiny)
    return max((v["clips_per_s"] for v in best.values()), default=None)


def largest(bench, cfg, done: dict, train, cap: int) -> None:
    """Double the micro batch past the configured ones until it runs out of memory, passes
    ``cap``, or the budget ends; ``stage1.train.largest`` is the last that ran."""
    mb, stop = max(micro_batches(cfg)) * 2, ""
    while not stop:
        if mb > cap:
            stop = f"bench.max_micro_batch={cap} reached without running out of memory"
            break
        key = f"stage1.train.mb{mb}"
        bench.promised.insert(bench.promised.index("stage1.train.largest"), key)
        values = bench.measure(key, lambda mb=mb: train(mb), need_s=2 * bench.took.get(f"stage1.train.mb{mb // 2}", 1.0), kind=key)
        if values is None:
            stop = f"micro batch {mb}: {bench.skipped.get(key, 'failed')}"
            break
        done[mb] = values
        mb *= 2
    if not done:
        bench.skip("stage1.train.largest", "no micro batch ran")
        return
    top = max(done)
    bench.notes["stage1.train.largest"] = f"micro batch {top} is the largest that ran (powers of two past the list); then {stop}"
    figures = {k: v for k, v in done[top].items() if k in ("clips_per_s", "mfu", "peak_mem_gib", "step_s")}
    bench.record("stage1.train.largest", {"micro_batch": top, **figures})


def decode(bench, cfg1, stage, engine, frames: int, texts: list[str], tiny: bool) -> None:
    """Beam-5 decoding of one evaluation batch, as the trainer's evaluation runs it (the engine's
    module in eval mode, the translator the stage builds), timed after one warm-up batch."""
    from fla_ds.augment import eval_crop_side
    from fla_ds.bench.gpu import time_steps
    from fla_ds.bench.gpu_inputs import TINY_DECODE_CLIPS, video_batch
    from fla_ds.distributed import gathered
    from fla_ds.translator import Stage1Translator

    side = eval_crop_side(cfg1.shards.short_side, cfg1.shards.short_side, cfg1.augment.crop_fraction)
    clips = TINY_DECODE_CLIPS if tiny else int(cfg1.train.micro_batch)

    def run() -> dict:
        batch = video_batch(clips, frames, side, texts, False, cfg1)
        translator = Stage1Translator(engine.module, stage.vocab, cfg1, beam_size=BEAM)
        engine.eval()
        try:
            with gathered(engine.module.parameters()):
                seconds = time_steps(lambda: translator(batch), warmup=1, steps=1)["step_s"]
        finally:
            engine.train()
        return {"clips_per_s": clips / seconds, "seconds": seconds}

    most = cfg1.eval.max_new_tokens or cfg1.light_t.max_target_tokens
    bench.notes["stage1.decode"] = f"beam {BEAM}, {clips} clips of {frames} frames at {side}x{side}, at most {most} tokens"
    bench.measure("stage1.decode", run, need_s=3, kind="stage1.decode")
