"""``fla-ds bench gpu``, the loader: clips/s of one loader worker for each decode path, with
``fla-ds bench data``'s own inputs and timing (fla_ds/bench/data.py: the package's synthetic
PHOENIX-like corpus built into shards, the training loader, alternatives timed interleaved over
rounds), and whether this node's CPU cores can feed the stage-1 rate measured on its GPU.

Measurements (keys of the JSON):
- ``loader.shards``: making the corpus (``bench.clips`` clips of ``bench.frames`` frames at
  ``bench.width`` x ``bench.height``) and building its shards, seconds;
- ``loader.decode``: for each path, ``<path>.clips_per_s_per_worker`` (the median round; one
  process is one worker's core) with ``<path>.min`` / ``.max``, and ``<path>.clips_per_cpu_s``:
  ``pil`` and ``simplejpeg`` (the loader in this process, PIL forced or libjpeg-turbo),
  ``worker`` (one persistent worker process, simplejpeg: its clips per worker CPU-second is the
  figure the workers-per-GPU rule takes), ``jpeg_bytes`` (the worker's share of
  ``stream.decode=gpu``: read, plan, ship bytes), ``gpu`` (the whole ``stream.decode=gpu`` path,
  nvJPEG on the device in this process; CUDA and torchvision only, else skipped with the reason);
- ``loader.verdict``: cores (``os.sched_getaffinity``), gpus, worker_cores_per_gpu (a core per
  GPU stays with its rank), the per-core rate used, workers_needed_per_gpu, capacity and demand
  per GPU (stage 1's best measured clips/s), the same for GPU decode, and
  ``notes["loader.verdict"]``: loader-bound or compute-bound, for CPU and for GPU decode.
"""
from __future__ import annotations

import math
import os
import statistics
from pathlib import Path

import torch

PATHS = ("pil", "simplejpeg", "worker", "jpeg_bytes", "gpu")
TINY_CORPUS = {"clips": 4, "frames": 32, "width": 40, "height": 48}
TINY_ROUNDS = 2


def loader_plan() -> list[str]:
    return ["loader.shards", "loader.decode", "loader.verdict"]


def build_corpus_shards(scratch: Path, cfg1, corpus: dict) -> Path:
    """The corpus of ``fla-ds bench data``, built into shards at the stage-1 config's short side."""
    from fla_ds.bench.data import make_png_corpus
    from fla_ds.config import load_config
    from fla_ds.shards.build import build_shards

    manifest = make_png_corpus(scratch / "corpus", corpus["clips"], corpus["frames"], corpus["width"], corpus["height"])
    build = load_config(None, [f"corpus.root={manifest}", f"shards.out={scratch / 'shards'}", "shards.workers=1", "shards.samples_per_shard=8",
                               f"shards.short_side={cfg1.shards.short_side}"])
    build_shards(build, progress_bar=False)
    return scratch / "shards"


def gpu_decoder():
    """nvJPEG on the device (``stream.decode=gpu``), or a str saying why not."""
    from fla_ds.augment import device_decoder

    try:
        return device_decoder("gpu")
    except ValueError as exc:
        return str(exc).split(";")[0]


def decode_rates(shards: Path, cfg1, rounds: int) -> dict:
    """Every path, timed interleaved over ``rounds`` (fla_ds.bench.data.interleaved)."""
    from fla_ds.bench.data import interleaved, jpeg_bytes_pass, loader_pass, stream_over

    streams: list = []

    def stream(workers: int, **kwargs):
        streams.append(stream_over(shards, cfg1, workers, **kwargs))
        return streams[-1]

    device = gpu_decoder()
    try:
        alternatives = {"pil": loader_pass(stream(0), "pil"), "simplejpeg": loader_pass(stream(0)), "worker": loader_pass(stream(1)),
                        "jpeg_bytes": jpeg_bytes_pass(stream(0, decoder=lambda jpegs: jpegs))}
        if not isinstance(device, str):
            alternatives["gpu"] = loader_pass(stream(0, decoder=device))
        # One untimed pass each: starts the persistent worker, and counts the clips a pass yields.
        counted = {name: fn(rounds) for name, fn in alternatives.items()}
        times = interleaved(alternatives, rounds)
    finally:
        for s in streams:
            s.close()
    values: dict = {}
    for name in PATHS:
        if name not in times:
            values[name] = device if isinstance(device, str) else "not measured"  # the reason, for the whole path
            continue
        rates = [counted[name] / wall for wall, _, _ in times[name]]
        cpu = [own + kids for _, own, kids in times[name]] if name != "worker" else [kids for _, _, kids in times[name]]
        values.update({f"{name}.clips_per_s_per_worker": statistics.median(rates), f"{name}.min": min(rates), f"{name}.max": max(rates),
                       f"{name}.clips_per_cpu_s": statistics.median(counted[name] / max(c, 1e-3) for c in cpu)})
    return values


def verdict(bench, rates: dict, demand: float | None) -> dict:
    """Loader- or compute-bound on this node: the workers a GPU needs to take stage 1's best
    measured clips/s (fla_ds.bench.data.workers_per_gpu's rule), against the cores it has."""
    from fla_ds.bench.gpu import Skip

    if not demand:
        raise Skip("no stage-1 training rate was measured")
    if not rates:
        raise Skip("no decode path was measured")
    cores, gpus = len(os.sched_getaffinity(0)), max(1, torch.cuda.device_count())
    spare = max(1, cores // gpus - 1)  # one core per GPU stays with its training process
    per_core = rates.get("worker.clips_per_cpu_s") or rates.get("simplejpeg.clips_per_s_per_worker")
    figures = {"cores": cores, "gpus": gpus, "worker_cores_per_gpu": spare, "demand_clips_per_s_per_gpu": demand, "cpu_clips_per_worker_core": per_core}
    lines = []
    for mode, rate in (("cpu", per_core), ("gpu", rates.get("jpeg_bytes.clips_per_cpu_s"))):
        if not rate:
            continue
        needed = math.ceil(demand / rate)
        figures.update({f"{mode}_decode.workers_needed_per_gpu": needed, f"{mode}_decode.capacity_clips_per_s_per_gpu": spare * rate})
        bound = "loader-bound" if needed > spare else "compute-bound"
        lines.append(f"{mode} decode {bound}: {needed} workers x {rate:.0f} clips/s needed for the {demand:.0f} clips/s stage 1 takes, "
                     f"{spare} cores per GPU free ({cores} cores, {gpus} GPU(s))")
    bench.notes["loader.verdict"] = "; ".join(lines)
    return figures


def run_loader(bench, cfg, cfg1, tiny: bool, scratch: Path, demand: float | None) -> None:
    from fla_ds.bench.data import ROUNDS

    b = cfg.bench
    corpus = TINY_CORPUS if tiny else {"clips": b.clips, "frames": b.frames, "width": b.width, "height": b.height}
    rounds = TINY_ROUNDS if tiny else ROUNDS
    bench.notes["loader.input"] = (f"{corpus['clips']} clips of {corpus['frames']} frames at {corpus['width']}x{corpus['height']}, shards at short "
                                   f"side {cfg1.shards.short_side}, training mode, crop {cfg1.augment.crop_size}, {rounds} interleaved rounds")
    shards = bench.prepare("loader.shards", lambda: build_corpus_shards(scratch / "loader", cfg1, corpus), need_s=5 if tiny else 40)
    rates = None
    if shards is None:
        bench.skip("loader.decode", f"needs loader.shards ({bench.skipped.get('loader.shards', '')})")
    else:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in a loader worker (the DataLoader sets it there)
        try:
            rates = bench.measure("loader.decode", lambda: decode_rates(shards, cfg1, rounds), need_s=5 if tiny else 30)
        finally:
            torch.set_num_threads(threads)
    bench.measure("loader.verdict", lambda: verdict(bench, {k: v for k, v in (rates or {}).items() if not isinstance(v, str)}, demand))
