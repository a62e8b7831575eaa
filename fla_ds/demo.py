"""The main job on the embedded default: ``fla-ds demo`` (the README's first command).

Synthetic corpus -> shards (train, dev) -> the loader's throughput -> stage 1 under DeepSpeed
(``fla_ds/train.py --stage 1``, one process) -> its dev scores beside the untrained model's ->
the feature cache -> stage 2 (the embedded SmolLM2-135M in 4-bit QLoRA, ``--stage 2``) -> dev
scores of both stages and example translations. Each step is the code a user runs by hand, so the demo doubles as a smoke test
of the pipeline. Rerunning resumes: finished shards and checkpoints are kept.
"""
from __future__ import annotations

import time
from pathlib import Path

from omegaconf import OmegaConf

from fla_ds.augment import Augment
from fla_ds.config import save_resolved
from fla_ds.corpus.synthetic import generate
from fla_ds.shards.build import build_shards
from fla_ds.stream import ShardStream, Source


def stream_epochs(stream_cfg, augment, batch_size: int, epochs: int) -> None:
    stream = ShardStream(stream_cfg, 0, 1, batch_size, augment)
    for epoch in range(epochs):
        stream.set_epoch(epoch)
        started, clips, frames = time.perf_counter(), 0, 0
        for batch in stream:
            clips += int(batch.valid.sum())
            frames += int(batch.video_mask.sum())
        seconds = time.perf_counter() - started
        print(f"      epoch {epoch}: {clips} clips, {frames} frames in {seconds:.1f} s: {clips / seconds:.1f} clips/s, {frames / seconds:.0f} frames/s "
              f"({stream_cfg.num_workers} workers, batch {batch_size})")


def build_demo_shards(cfg) -> None:
    for split in ("train", "dev"):
        split_cfg = OmegaConf.merge(cfg, {"corpus": {"name": "synthetic", "root": cfg.synth.out, "split": split}})
        summary = build_shards(split_cfg, progress_bar=False)
        print(f"      {split}: " + "; ".join(summary.lines()))


def train_stage(stage: int, config_file: Path, *overrides: str) -> float:
    """Run fla_ds/train.py as a user would (its own process: one process group each)."""
    import os
    import subprocess
    import sys

    started = time.perf_counter()
    script = Path(__file__).with_name("train.py")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1)))
    code = subprocess.run([sys.executable, str(script), "--stage", str(stage), "--config", str(config_file), *overrides], env=env).returncode
    if code != 0:
        raise SystemExit(code)
    return time.perf_counter() - started


def untrained_scores(cfg) -> dict:
    """The same model before any training: the floor the trained scores are read against."""
    import torch

    from fla_ds.distributed import device
    from fla_ds.evaluate.run import evaluate_split
    from fla_ds.model import SignTranslator
    from fla_ds.translator import Stage1Translator
    from fla_ds.vocab import TrimmedVocab

    vocab = TrimmedVocab.load(Path(cfg.train.out) / "vocab" / "vocab.json")
    torch.manual_seed(cfg.train.seed)
    model = SignTranslator.from_config(cfg, vocab, pretrained=True).eval().to(device())
    translator = Stage1Translator(model, vocab, cfg)
    return evaluate_split(translator, cfg, 0, 1, Path(cfg.train.out) / "eval" / "untrained", Source(cfg.stream.shards, translator.augment))


def final_scores(run_dir: str, beam: int, shards: str) -> tuple[dict, Path]:
    """Dev scores of a run's best checkpoint, decoded with ``beam``."""
    from omegaconf import OmegaConf

    from fla_ds.checkpoint import resolve_step_dir
    from fla_ds.evaluate.run import evaluate_split
    from fla_ds.inference import load_translator

    best = resolve_step_dir(run_dir)
    translator = load_translator(best, beam_size=beam)
    cfg = OmegaConf.merge(translator.cfg, {"eval": {"limit": 0}})
    return evaluate_split(translator, cfg, 0, 1, best / "eval-dev", Source(shards, translator.augment)), best


def show_examples(best: Path, count: int = 4) -> None:
    from fla_ds.hypotheses import read_tsv

    for row in read_tsv(best / "eval-dev" / "hypotheses.tsv")[:count]:
        print(f"      {row['id']}\n        reference:  {row['reference']}\n        hypothesis: {row['hypothesis']}")


def run_demo(cfg) -> int:
    from transformers.utils import logging as hf_logging

    from fla_ds.features import extract_features

    hf_logging.disable_progress_bar()

    out = Path(cfg.demo.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg.synth.out = str(out / "synth")
    cfg.shards.out = cfg.stream.shards = str(out / "shards")
    cfg.train.out = str(out / "stage1")
    config_file = save_resolved(cfg, out)
    beam = cfg.demo.final_beam
    print(f"[1/7] synthetic corpus -> {generate(cfg.synth)}")
    print(f"[2/7] shards -> {cfg.shards.out}")
    build_demo_shards(cfg)
    print(f"[3/7] streaming {cfg.demo.epochs} epoch(s) of train")
    stream_epochs(OmegaConf.merge(cfg.stream, {"split": "train", "train": True}), Augment(cfg.augment), cfg.train.micro_batch, cfg.demo.epochs)
    print(f"[4/7] stage 1 -> {cfg.train.out}")
    seconds1 = train_stage(1, config_file)
    scores1, best1 = final_scores(cfg.train.out, beam, cfg.shards.out)
    floor = untrained_scores(cfg)
    print(f"      stage 1: {seconds1 / 60:.1f} min; best {best1}: dev BLEU-4 {scores1['bleu4']:.2f}, ROUGE-L {scores1['rouge_l']:.2f} (beam {beam}); "
          f"untrained: BLEU-4 {floor['bleu4']:.2f}, ROUGE-L {floor['rouge_l']:.2f}")
    features = out / "features"
    print(f"[5/7] feature cache -> {features}")
    started = time.perf_counter()
    for split in ("train", "dev"):
        entry = extract_features(best1, cfg.shards.out, features, split=split, rank=0, world=1, num_workers=1)
        print(f"      {split}: {entry['clips']} clips, dim {entry['dim']}")
    print(f"      {time.perf_counter() - started:.0f} s")
    stage2_out = out / "stage2"
    print(f"[6/7] stage 2 (SmolLM2-135M, 4-bit QLoRA, from the cache) -> {stage2_out}")
    seconds2 = train_stage(2, config_file, f"train.out={stage2_out}", f"stage2.encoder={best1}", f"stage2.features={features}",
                           f"train.epochs={cfg.demo.stage2_epochs}", f"train.lr={cfg.demo.stage2_lr}", "train.warmup_steps=10")
    scores2, best2 = final_scores(str(stage2_out), beam, str(features))
    print(f"[7/7] dev scores (beam {beam}); {scores2['convention']}")
    print(f"      stage 1 ({seconds1 / 60:.1f} min): BLEU-4 {scores1['bleu4']:.2f}  ROUGE-L {scores1['rouge_l']:.2f}   [{best1}]")
    print(f"      stage 2 ({seconds2 / 60:.1f} min): BLEU-4 {scores2['bleu4']:.2f}  ROUGE-L {scores2['rouge_l']:.2f}   [{best2}]")
    print(f"      untrained:        BLEU-4 {floor['bleu4']:.2f}  ROUGE-L {floor['rouge_l']:.2f}")
    print("      stage 2 examples:")
    show_examples(best2)
    return 0
