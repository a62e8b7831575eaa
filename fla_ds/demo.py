"""The main job on the embedded default: ``fla-ds demo`` (the README's first command).

Synthetic corpus -> shards (train and dev) -> stream epochs of batches, printing what each
step produced and the loader's throughput. Each step is the same code a user runs by hand, so
the demo doubles as a smoke test of the whole pipeline. Rerunning resumes: finished shards
are kept.
"""
from __future__ import annotations

import time
from pathlib import Path

from omegaconf import OmegaConf

from fla_ds.config import save_resolved
from fla_ds.corpus.synthetic import generate
from fla_ds.shards.build import build_shards
from fla_ds.stream import ShardStream


def stream_epochs(stream_cfg, epochs: int) -> None:
    stream = ShardStream(stream_cfg, rank=0, world_size=1)
    for epoch in range(epochs):
        stream.set_epoch(epoch)
        started, clips, frames = time.perf_counter(), 0, 0
        for batch in stream:
            clips += int(batch["valid"].sum())
            frames += int(batch["video_mask"].sum())
        seconds = time.perf_counter() - started
        print(f"epoch {epoch}: {clips} clips, {frames} frames in {seconds:.1f} s: {clips / seconds:.1f} clips/s, {frames / seconds:.0f} frames/s "
              f"({stream_cfg.num_workers} workers, batch {stream_cfg.batch_size}, video {tuple(batch['video'].shape[2:])})")


def run_demo(cfg) -> int:
    out = Path(cfg.demo.out)
    out.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, out)
    cfg.synth.out = str(out / "synth")
    print(f"[1/3] synthetic corpus -> {generate(cfg.synth)}")
    cfg.shards.out = str(out / "shards")
    for split in ("train", "dev"):
        split_cfg = OmegaConf.merge(cfg, {"corpus": {"name": "synthetic", "root": cfg.synth.out, "split": split}})
        summary = build_shards(split_cfg, progress_bar=False)
        print(f"[2/3] shards {split} -> {cfg.shards.out}: " + "; ".join(summary.lines()))
    cfg.stream.shards = cfg.shards.out
    cfg.stream.split = "train"
    print(f"[3/3] streaming {cfg.demo.epochs} epochs of train")
    stream_epochs(cfg.stream, cfg.demo.epochs)
    return 0
