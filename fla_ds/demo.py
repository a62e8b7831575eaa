"""The main job on the embedded default: ``fla-ds demo`` (the README's first command).

Synthetic corpus -> shards (train, dev) -> the loader's throughput -> stage 1 trained under
DeepSpeed (one process here; the same code as ``deepspeed fla_ds/train.py --stage 1``) ->
dev scores of the best checkpoint beside those of the same model untrained, with example
translations. Each step is the code a user runs by hand, so the demo doubles as a smoke test
of the pipeline. Rerunning resumes: finished shards and checkpoints are kept.
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
        print(f"      epoch {epoch}: {clips} clips, {frames} frames in {seconds:.1f} s: {clips / seconds:.1f} clips/s, {frames / seconds:.0f} frames/s "
              f"({stream_cfg.num_workers} workers, batch {stream_cfg.batch_size})")


def build_demo_shards(cfg) -> None:
    for split in ("train", "dev"):
        split_cfg = OmegaConf.merge(cfg, {"corpus": {"name": "synthetic", "root": cfg.synth.out, "split": split}})
        summary = build_shards(split_cfg, progress_bar=False)
        print(f"      {split}: " + "; ".join(summary.lines()))


def train_stage1(cfg, config_file: Path) -> float:
    from fla_ds.train import main as train_main

    started = time.perf_counter()
    code = train_main(["--stage", "1", "--config", str(config_file)])
    if code != 0:
        raise SystemExit(code)
    return time.perf_counter() - started


def untrained_scores(cfg) -> dict:
    """The same model before any training: the floor the trained scores are read against."""
    import torch

    from fla_ds.augment import to_model_input
    from fla_ds.evaluate.run import evaluate_split
    from fla_ds.stage1 import build_translator
    from fla_ds.vocab import TrimmedVocab

    vocab = TrimmedVocab.load(Path(cfg.train.out) / "vocab" / "vocab.json")
    torch.manual_seed(cfg.train.seed)
    model = build_translator(cfg, vocab).eval()

    @torch.no_grad()
    def translate(batch):
        video = to_model_input(batch["video"], cfg.stream.crop_size, batch["affine"])
        return [vocab.decode(r) for r in model.generate(video, batch["video_mask"], beam_size=cfg.train.beam_size, max_len=cfg.light_t.max_target_len)]

    return evaluate_split(translate, cfg, 0, 1, Path(cfg.train.out) / "eval" / "untrained")


def report(cfg, seconds: float) -> None:
    from fla_ds.cli import resolve_checkpoint
    from fla_ds.evaluate.run import evaluate_split
    from fla_ds.stage1 import Translator

    best = resolve_checkpoint(cfg.train.out)
    final_beam = cfg.demo.final_beam
    translator = Translator(best, beam_size=final_beam)
    trained = evaluate_split(translator, translator.cfg, 0, 1, best / "eval-dev")
    floor = untrained_scores(cfg)
    print(f"      stage 1 trained in {seconds / 60:.1f} min; best checkpoint {best}")
    print(f"      dev BLEU-4 {trained['bleu4']:.2f}, ROUGE-L {trained['rouge_l']:.2f} (beam {final_beam})  |  untrained model: BLEU-4 {floor['bleu4']:.2f}, ROUGE-L {floor['rouge_l']:.2f}")
    print(f"      scored as: {trained['convention']}")
    rows = (best / "eval-dev" / "hypotheses.tsv").read_text("utf-8").splitlines()[1:6]
    for row in rows:
        sample_id, hyp, ref = row.split("\t")
        print(f"      {sample_id}\n        reference:  {ref}\n        hypothesis: {hyp}")


def run_demo(cfg) -> int:
    out = Path(cfg.demo.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg.synth.out = str(out / "synth")
    cfg.shards.out = cfg.stream.shards = str(out / "shards")
    cfg.train.out = str(out / "stage1")
    config_file = save_resolved(cfg, out)
    print(f"[1/4] synthetic corpus -> {generate(cfg.synth)}")
    print(f"[2/4] shards -> {cfg.shards.out}")
    build_demo_shards(cfg)
    print(f"[3/4] streaming {cfg.demo.epochs} epoch(s) of train")
    stream_epochs(OmegaConf.merge(cfg.stream, {"split": "train", "train": True}), cfg.demo.epochs)
    print(f"[4/4] stage 1 -> {cfg.train.out}")
    seconds = train_stage1(cfg, config_file)
    report(cfg, seconds)
    return 0
