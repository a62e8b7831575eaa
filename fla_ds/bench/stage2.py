"""``fla-ds bench stage2``: a stage-2 training step from the feature cache vs with the frozen
encoder run on the fly, on the demo's run (``make demo`` first), in one process."""
from __future__ import annotations

import time
from pathlib import Path

from fla_ds.bench.data import timed


def stage2_step_times(cfg, step_dir: Path, shards: Path, features: Path, steps: int) -> tuple[float, float]:
    """Seconds per stage-2 training step (forward, backward, optimizer) on the same model,
    reading the feature cache vs running the frozen encoder on video, in one process."""
    import torch
    from omegaconf import OmegaConf

    from fla_ds.backends import get_backend, language_model_path
    from fla_ds.model import load_frozen_encoder
    from fla_ds.stream import ShardStream

    encoder, enc_cfg = load_frozen_encoder(step_dir, torch.float32)
    model = get_backend(cfg.stage2.backend).build(cfg, language_model_path(cfg), enc_cfg.visual.out_dim, torch.float32).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    base = {"split": "train", "train": True, "num_workers": 1}

    def timed_steps(source: Path) -> float:
        from fla_ds.augment import Augment

        stream = ShardStream(OmegaConf.merge(cfg.stream, base, {"shards": str(source)}), 0, 1, cfg.train.micro_batch, Augment(enc_cfg.augment))
        batches = iter(stream)
        next_batch = lambda: next(batches)
        run_step(model, optimizer, encoder, enc_cfg, next_batch())  # warm-up
        start = time.perf_counter()
        for _ in range(steps):
            run_step(model, optimizer, encoder, enc_cfg, next_batch())
        return (time.perf_counter() - start) / steps

    return timed_steps(features), timed_steps(shards)


def run_step(model, optimizer, encoder, enc_cfg, batch) -> None:
    """One training step; the batch's kind (features or video) decides whether the encoder runs."""
    import torch

    from fla_ds.augment import Augment
    from fla_ds.batch import prepare_features
    from fla_ds.distributed import device

    feats, mask = prepare_features(batch, encoder, Augment(enc_cfg.augment), torch.float32, device())
    loss_sum, n_tokens = model(feats, mask, batch.text)
    (loss_sum / n_tokens).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def run_stage2(cfg) -> int:
    from fla_ds.checkpoint import resolve_step_dir

    out = Path(cfg.demo.out)
    needed = [out / "stage1", out / "shards" / "index.json", out / "features" / "index.json"]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        print(f"bench stage2: run the demo first (make demo); missing: {', '.join(missing)}")
        return 2
    step_dir = resolve_step_dir(out / "stage1")
    steps = cfg.bench.clips // cfg.train.micro_batch or 3
    print(f"bench stage2: demo configuration (batch {cfg.train.micro_batch}, SmolLM2-135M QLoRA={cfg.stage2.qlora}), {steps} steps each, one process")
    cached, live = stage2_step_times(cfg, step_dir, out / "shards", out / "features", steps)
    print(f"  step from the feature cache:        {cached:7.2f} s")
    print(f"  step with the frozen encoder live:  {live:7.2f} s")
    print(f"  ratio on-the-fly / cache: {live / cached:.2f}   (goal >= 2)")
    paper = paper_encoder_seconds(cfg.train.micro_batch)
    print(f"  frozen encoder alone at the paper's input (ResNet-18 out_dim 1024, {cfg.train.micro_batch} clips x 29 frames x 224x224): {paper:.2f} s")
    print(f"  ratio at that input, (cache step + encoder) / cache step: {(cached + paper) / cached:.2f}")
    return 0


def paper_encoder_seconds(batch: int, frames: int = 29, repeats: int = 2) -> float:
    """No-grad forward of a (randomly initialised) stage-1 encoder at 224x224: what a step
    without the cache pays on top at the paper's resolution."""
    import torch

    from fla_ds.model import VisualEncoder

    encoder = VisualEncoder(out_dim=1024).eval()
    video = torch.randn(batch, frames, 3, 224, 224)
    mask = torch.ones(batch, frames, dtype=torch.bool)
    with torch.no_grad():
        encoder(video[:1], mask[:1])
        seconds, _ = timed(lambda: [encoder(video, mask) for _ in range(repeats)])
    return seconds / repeats
