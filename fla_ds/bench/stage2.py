"""``fla-ds bench stage2``: what the feature cache saves a stage-2 training step, each step
measured whole (forward, backward, AdamW step), never summed from parts, in one process, on the
demo's run (``make demo`` first: its stage-1 encoder, video shards and feature cache):

- cache: the step reading the feature cache (no encoder in the step);
- live: the same step on the same clips' video, the frozen encoder run in the step (the demo's
  input: 56x56 crops);
- paper: the same step with a frozen encoder at the paper's input (``train.micro_batch`` clips
  of 29 frames, T/4 of 116, warped to 224x224 on the device; ResNet-18 + temporal block with
  out_dim 1024, randomly initialised: its cost does not depend on its weights), and the model
  reading its 1024-d features; against a cache step of that model on features of that shape.

The steps are timed interleaved (``ROUNDS`` rounds of every kind in turn, after a warm-up step
each), so machine load hits them alike: each figure is min / median / max, each ratio the median
of the per-round ratios. One thread, so that two-core machines measure the same thing each run.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROUNDS = 3
PAPER_FRAMES, PAPER_CANVAS, PAPER_CROP, PAPER_DIM = 29, 256, 224, 1024


def trainer_for(cfg, feature_dim: int, encoder, augment) -> Callable:
    """step(batch): one whole training step of a fresh stage-2 model (the configured backend,
    reading ``feature_dim`` features) with AdamW, the batch's features read from it or made by
    the frozen ``encoder`` (``fla_ds.batch.prepare_features``, as ``Stage2.loss`` does)."""
    from fla_ds.backends import get_backend, language_model_path
    from fla_ds.batch import prepare_features
    from fla_ds.distributed import device
    from fla_ds.stage2 import host_mask

    model = get_backend(cfg.stage2.backend).build(cfg, language_model_path(cfg), feature_dim, torch.float32).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(batch) -> None:
        feats, _ = prepare_features(batch, encoder, augment, torch.float32, device())
        loss_sum, n_tokens = model(feats, host_mask(batch), batch.text)  # the loader's mask, as Stage2.loss passes it
        (loss_sum / n_tokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def first_batch(cfg, source: Path, augment):
    from fla_ds.stream import ShardStream

    stream = ShardStream(OmegaConf.merge(cfg.stream, {"shards": str(source), "split": "train", "train": True, "num_workers": 0}),
                         0, 1, cfg.train.micro_batch, augment)
    return next(iter(stream))


def step_kinds(cfg, step_dir: Path, shards: Path, features: Path) -> dict[str, Callable[[], None]]:
    """name -> one measured step: the demo's cache and live steps, the paper-input steps."""
    from fla_ds.augment import Augment
    from fla_ds.bench.gpu_inputs import feature_batch, long_texts, video_batch
    from fla_ds.bench.gpu_stage2 import frozen_encoder
    from fla_ds.model import load_frozen_encoder

    encoder, enc_cfg = load_frozen_encoder(step_dir, torch.float32)
    augment = Augment(enc_cfg.augment)
    demo = trainer_for(cfg, enc_cfg.visual.out_dim, encoder, augment)
    cache, live = first_batch(cfg, features, None), first_batch(cfg, shards, augment)
    paper_cfg = OmegaConf.merge(enc_cfg, {"visual": {"out_dim": PAPER_DIM}, "augment": {"crop_size": PAPER_CROP}})
    paper_encoder, paper_augment = frozen_encoder(paper_cfg, torch.float32), Augment(paper_cfg.augment)
    paper = trainer_for(cfg, PAPER_DIM, paper_encoder, paper_augment)
    clips, texts = cfg.train.micro_batch, long_texts(cfg.train.micro_batch, 12)
    paper_video = video_batch(clips, PAPER_FRAMES, PAPER_CANVAS, texts, True, paper_cfg)
    paper_cache = feature_batch(clips, PAPER_FRAMES, PAPER_DIM, texts)
    return {"cache": lambda: demo(cache), "live": lambda: demo(live), "paper cache": lambda: paper(paper_cache), "paper live": lambda: paper(paper_video)}


def interleaved_steps(kinds: dict[str, Callable[[], None]], rounds: int) -> dict[str, list[float]]:
    """Seconds per step of each kind, per round (every kind once per round, in turn), after one
    untimed warm-up step of each."""
    for step in kinds.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in kinds}
    for _ in range(rounds):
        for name, step in kinds.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return times


def run_stage2(cfg) -> int:
    from fla_ds.checkpoint import resolve_step_dir

    out = Path(cfg.demo.out)
    needed = [out / "stage1", out / "shards" / "index.json", out / "features" / "index.json"]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        print(f"bench stage2: run the demo first (make demo); missing: {', '.join(missing)}")
        return 2
    from fla_ds.bench.gpu import quiet_libraries

    quiet_libraries()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        kinds = step_kinds(cfg, resolve_step_dir(out / "stage1"), out / "shards", out / "features")
        print(f"bench stage2: demo configuration ({cfg.stage2.backend}, qlora={cfg.stage2.qlora}, batch {cfg.train.micro_batch}), "
              f"whole steps, {ROUNDS} interleaved rounds, 1 thread", flush=True)
        times = interleaved_steps(kinds, ROUNDS)
    finally:
        torch.set_num_threads(threads)
    print(f"  {'step (forward, backward, AdamW)':<52} seconds: min / median / max")
    labels = {"cache": "demo, from the feature cache", "live": "demo, frozen encoder on video (56x56)",
              "paper cache": f"paper input, from features ({PAPER_FRAMES} x {PAPER_DIM})",
              "paper live": f"paper input, encoder on video ({PAPER_FRAMES} x {PAPER_CROP}x{PAPER_CROP})"}
    for name, t in times.items():
        print(f"  {labels[name]:<52} {min(t):6.2f} / {statistics.median(t):6.2f} / {max(t):6.2f}")
    for live, cache, goal in (("live", "cache", "goal >= 2"), ("paper live", "paper cache", "")):
        ratio = statistics.median(a / b for a, b in zip(times[live], times[cache]))
        print(f"  ratio {live} / {cache} (median of the rounds): {ratio:.2f}{f'   ({goal})' if goal else ''}")
    return 0
