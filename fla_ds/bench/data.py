"""``fla-ds bench data``: how fast the data path is, against baselines measured in the same run.

Inputs are made by the package itself, so any clone or install reproduces them: ``bench.clips``
PHOENIX-like clips (``bench.frames`` frames of ``bench.width`` x ``bench.height``) of the
embedded synthetic corpus's signing (fla_ds.corpus.synthetic), textured so that the stored
JPEGs take as many bytes as real PHOENIX frames (``synthetic_frames``), written as PNG folders
(PHOENIX's release format) and built into shards by the project's builder.

Every alternative decodes exactly the frames the training loader decodes in that epoch (T/4:
about 29 of 116, the same crops), and the alternatives are timed interleaved, A B C ... A B C,
over ``ROUNDS`` rounds (round r = epoch r for all of them), so that machine load hits them
alike; each figure is printed as clips/s min / median / max and clips per CPU-second (this
process's and its children's: robust to other load), and each ratio is the median of the
per-round ratios against the baseline of the same round. The process runs one thread
(``torch.set_num_threads(1)``), as a loader worker does.
- loader: the streaming loader in training mode (micro batch 4), in this process with
  simplejpeg and with PIL forced, and with one persistent worker process: that figure is the
  clips/s one worker-core delivers, the input of the workers-per-GPU rule (``workers_per_gpu``);
- loader, JPEG bytes out: the worker's share of ``stream.decode=gpu`` (read, plan, check
  headers, ship bytes; the decode then runs on the GPU);
- bare decode: decoding the same frames from memory with each decoder, nothing else;
- PNG folder: the published code's way of reading PHOENIX, like for like: open, decode and
  resize the same kept frames from the PNG folder, then the same crop;
- h264: the clips as h264, decoded sequentially up to the last kept frame (a video codec
  cannot skip frames: the alternative to per-frame JPEG);
- shard build (one timed pass) and the device warp + normalise run on this CPU (once).
A timed assertion never belongs in a test: this prints figures and ratios only.
"""
from __future__ import annotations

import math
import os
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fla_ds.augment import Augment
from fla_ds.config import load_config
from fla_ds.frames import FramePack, cut_clip, force_jpeg_decoder, read_jpeg

ROUNDS = 5
"""Timed rounds; in each, every alternative runs once, in turn."""
TARGET_CLIPS_PER_GPU = 400
"""Stage-1 training clips/s one GPU takes, for the workers-per-GPU rule: ESTIMATED (an H100 at
the low end of the issue's 400-2,500 range, about twice docs/cluster.md's A100 estimate of
190); replace it with `fla-ds bench gpu`'s measurement."""
CLIPS_PER_WORKER_CORE = 50
"""Clips one loader worker process delivers per CPU-second (stage-1 training, PHOENIX-like
clips, stream.decode=cpu): `fla-ds bench data` on the 2-core CPU machine measured 50 (41-51
over five runs under varying load; docs/benchmarks.md). Re-measure on the cluster's CPUs."""


def workers_per_gpu(target_clips_s: float, clips_s_per_core: float, cpus_per_gpu: int) -> int:
    """The rule (docs/cluster.md, "Workers and CPUs per GPU"): enough worker processes to
    deliver ``target_clips_s`` at ``clips_s_per_core`` each, ceil(target / per core), but no
    more than the CPUs a GPU has besides its training process's own (``cpus_per_gpu - 1``),
    and at least 1. Raises ValueError for a non-positive rate or fewer than 2 CPUs."""
    if target_clips_s <= 0 or clips_s_per_core <= 0:
        raise ValueError("clips/s must be positive")
    if cpus_per_gpu < 2:
        raise ValueError(f"{cpus_per_gpu} CPU per GPU: a rank needs one and each worker one more")
    return max(1, min(math.ceil(target_clips_s / clips_s_per_core), cpus_per_gpu - 1))


# ---------------------------------------------------------------- inputs, made by the package


def synthetic_frames(count: int, width: int, height: int, seed: int = 0) -> list[np.ndarray]:
    """``count`` RGB uint8 (height, width, 3) frames of the embedded synthetic corpus's signing:
    its sentences, signers and renderer at up to 320 pixels square, plus a fixed texture per
    sentence (sigma 9, at that size: stored frames then take about as many JPEG bytes as real
    PHOENIX and How2Sign ones, 17-21 KB at q90, while h264 still finds each frame in the last),
    resized to width x height, with pixel noise (sigma 3) at that size."""
    from fla_ds.config import SynthConfig
    from fla_ds.corpus.synthetic import SIGNERS, config_pool, render_sentence

    base = min(320, max(width, height)) // 2 * 2
    cfg = SynthConfig(size=base, seed=seed)
    pool = config_pool(cfg)[1]
    rng = np.random.default_rng(seed)
    frames: list[np.ndarray] = []
    clip = 0
    while len(frames) < count:
        texture = rng.normal(0, 9.0, (base, base, 3))
        for frame in render_sentence(pool[clip % len(pool)].split(), SIGNERS[clip % len(SIGNERS)], rng, cfg)[: count - len(frames)]:
            textured = Image.fromarray(np.clip(frame + texture + 0.5, 0, 255).astype(np.uint8))
            resized = np.asarray(textured.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)
            frames.append(np.clip(resized + rng.normal(0, 3.0, resized.shape) + 0.5, 0, 255).astype(np.uint8))
        clip += 1
    return frames


def make_png_corpus(root: Path, clips: int, frames: int, width: int, height: int) -> Path:
    """PNG folders frames/clipNNNN/imagesNNNN.png and a manifest train.jsonl; returns its path."""
    pool = synthetic_frames(frames + clips, width, height)
    rows = []
    for c in range(clips):
        folder = root / "frames" / f"clip{c:04d}"
        folder.mkdir(parents=True)
        for i in range(frames):
            Image.fromarray(pool[(c * 7 + i) % len(pool)]).save(folder / f"images{i + 1:04d}.png")
        rows.append(f'{{"id": "clip{c:04d}", "frames": "frames/clip{c:04d}", "text": "bench"}}\n')
    manifest = root / "train.jsonl"
    manifest.write_text("".join(rows))
    return manifest


def shard_clips(shards: Path) -> list[tuple[tuple[int, int], dict, FramePack]]:
    """Every (ref (shard, position), json, frame pack) of the train split, in shard order."""
    from fla_ds.shards.format import iter_raw_samples, parse_sample

    clips = []
    for s, tar in enumerate(sorted(shards.glob("train-*.tar"))):
        for raw in iter_raw_samples(str(tar)):
            meta, pack = parse_sample(str(tar), raw)
            clips.append(((s, raw["__pos__"]), meta, pack))
    return clips


def epoch_cuts(clips: list, augment: Augment, seed: int, epoch: int) -> list:
    """What the training loader decodes of each clip in ``epoch``: the same generator seeds
    (fla_ds.stream), so the same frames and boxes."""
    return [cut_clip(meta, pack, augment, random.Random(f"fla_ds-sample:{seed}:{epoch}:{ref[0]}:{ref[1]}"), True)
            for ref, meta, pack in clips]


# ---------------------------------------------------------------- timing


def children_cpu_s() -> float:
    """CPU seconds (user + system) used so far by this process's live children, e.g. loader
    workers (Linux /proc; 0 elsewhere)."""
    me, ticks = os.getpid(), 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == me:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.0


def interleaved(alternatives: dict[str, Callable[[int], object]], rounds: int) -> dict[str, list[tuple[float, float, float]]]:
    """(wall seconds, CPU seconds of this process, CPU seconds of its children) of each
    alternative per round; round r calls every ``fn(r)`` in turn."""
    times: dict[str, list[tuple[float, float, float]]] = {name: [] for name in alternatives}
    for r in range(rounds):
        for name, fn in alternatives.items():
            wall, own, children = time.perf_counter(), time.process_time(), children_cpu_s()
            fn(r)
            times[name].append((time.perf_counter() - wall, time.process_time() - own, children_cpu_s() - children))
    return times


def spread(rates: list[float]) -> str:
    """min / median / max of rates."""
    return f"{min(rates):7.1f} / {statistics.median(rates):7.1f} / {max(rates):7.1f}"


def stream_over(shards: Path, cfg, workers: int, **kwargs):
    from omegaconf import OmegaConf

    from fla_ds.stream import ShardStream

    section = OmegaConf.merge(cfg.stream, {"shards": str(shards), "split": "train", "num_workers": workers, "train": True, "decode": "cpu"})
    return ShardStream(section, 0, 1, 4, Augment(cfg.augment), **kwargs)


def loader_pass(stream, decoder: str | None = None) -> Callable[[int], int]:
    def run(epoch: int) -> int:
        force_jpeg_decoder(decoder)
        try:
            stream.set_epoch(epoch)
            return sum(b.video.shape[0] for b in stream)
        finally:
            force_jpeg_decoder(None)
    return run


def jpeg_bytes_pass(stream) -> Callable[[int], int]:
    """The worker's share of stream.decode=gpu, run in this process (no decode)."""
    def run(epoch: int) -> int:
        stream.position.write(epoch, 0, [])
        return sum(len(fields["id"]) for fields in stream.dataset)
    return run


def bare_decode(clips: list, augment: Augment, seed: int, decoder: str | None) -> Callable[[int], None]:
    def run(epoch: int) -> None:
        force_jpeg_decoder(decoder)
        try:
            for cut in epoch_cuts(clips, augment, seed, epoch):
                for i in cut.indices:
                    read_jpeg(cut.pack.jpeg(i))
        finally:
            force_jpeg_decoder(None)
    return run


def png_folders(clips: list, folders: Path, augment: Augment, seed: int) -> Callable[[int], None]:
    """The published way, like for like: the kept PNGs opened, decoded, resized to the stored
    size, and cut as the loader cuts them."""
    def run(epoch: int) -> None:
        for cut in epoch_cuts(clips, augment, seed, epoch):
            files = sorted((folders / cut.meta["id"]).glob("*.png"))
            kept = []
            for i in cut.indices:
                with Image.open(files[i]) as im:
                    stored = im.convert("RGB").resize((cut.meta["width"], cut.meta["height"]), Image.Resampling.BILINEAR)
                    kept.append(np.asarray(stored.crop(cut.box)))
            np.stack(kept)
    return run


def encode_h264(frames: list[np.ndarray], path: Path) -> int:
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        stream.options = {"crf": "23", "preset": "medium"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path.stat().st_size


def h264_pass(clips: list, root: Path, augment: Augment, seed: int) -> tuple[Callable[[int], None], float]:
    """(the pass: the kept frames decoded from h264, sequentially up to the last one; mean bytes per clip)."""
    import av

    paths, sizes = [], []
    for c, (_, _, pack) in enumerate(clips):
        frames = [read_jpeg(pack.jpeg(i)) for i in range(len(pack))]
        frames = [f[: f.shape[0] // 2 * 2, : f.shape[1] // 2 * 2] for f in frames]
        paths.append(root / f"clip{c:04d}.mp4")
        sizes.append(encode_h264(frames, paths[-1]))

    def run(epoch: int) -> None:
        for path, cut in zip(paths, epoch_cuts(clips, augment, seed, epoch)):
            keep, last = set(cut.indices), max(cut.indices)
            with av.open(str(path)) as container:
                for i, frame in enumerate(container.decode(container.streams.video[0])):
                    if i in keep:
                        frame.to_ndarray(format="rgb24")
                    if i >= last:
                        break
    return run, float(np.mean(sizes))


def device_step_rate(shards: Path, cfg) -> float:
    """Clips/s of the warp + normalisation that runs on the training device, here on the CPU
    (an upper bound on its cost; on a GPU it is negligible)."""
    augment = Augment(cfg.augment)
    batch = next(iter(stream_over(shards, cfg, 0)))
    start = time.perf_counter()
    for _ in range(3):
        augment.model_input(batch.video, batch.affine)
    return 3 * batch.video.shape[0] / (time.perf_counter() - start)


# ---------------------------------------------------------------- the run


def print_ratios(rates: dict[str, list[float]]) -> None:
    """Each ratio as the median of the per-round ratios (and their range)."""
    pairs = [("loader simplejpeg / loader PIL, in process", "loader, in process, simplejpeg", "loader, in process, PIL", ""),
             ("loader / bare decode, simplejpeg", "loader, in process, simplejpeg", "bare decode, simplejpeg", "   (goal >= 0.7)"),
             ("loader 1 worker / loader in process", "loader, 1 worker process, simplejpeg", "loader, in process, simplejpeg", ""),
             ("loader / PNG folder, same frames", "loader, in process, simplejpeg", "PNG folder, same frames (published)", "   (goal >= 3)"),
             ("loader / h264", "loader, in process, simplejpeg", "h264, decode to last kept frame", "")]
    print("  ratios of clips/s, median of the per-round ratios (range):")
    for label, name, base, goal in pairs:
        per_round = [a / b for a, b in zip(rates[name], rates[base])]
        print(f"    {label:<45} {statistics.median(per_round):5.2f} ({min(per_round):.2f}-{max(per_round):.2f}){goal}")


def print_rule(per_core: float, gpu_share: float) -> None:
    """The workers-per-GPU rule's input (clips per worker CPU-second) and what it gives."""
    print(f"  workers per GPU (docs/cluster.md): ceil(GPU clips/s / {per_core:.0f} clips per worker-core-second) with stream.decode=cpu, "
          f"/ {gpu_share:.0f} with decode=gpu")
    for target in (190, TARGET_CLIPS_PER_GPU, 1000, 2500):
        print(f"    a GPU taking {target:5d} clips/s: {math.ceil(target / per_core):3d} workers (cpu decode), {math.ceil(target / gpu_share):3d} (gpu decode)")


def run_data(cfg) -> int:
    b = cfg.bench
    torch.set_num_threads(1)  # as in a loader worker (the DataLoader sets it there)
    scratch = Path(b.out) if b.out else Path(tempfile.mkdtemp(prefix="fla-ds-bench-"))
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        print(f"bench data: {b.clips} clips of {b.frames} frames at {b.width}x{b.height} (PHOENIX-like, synthetic signing), "
              f"{ROUNDS} interleaved rounds, 1 thread, in {scratch}", flush=True)
        manifest = make_png_corpus(scratch / "corpus", b.clips, b.frames, b.width, b.height)
        png_bytes = sum(p.stat().st_size for p in (scratch / "corpus" / "frames").rglob("*.png")) / b.clips

        from fla_ds.shards.build import build_shards

        build_cfg = load_config(None, [f"corpus.root={manifest}", f"shards.out={scratch / 'shards'}", "shards.workers=1", "shards.samples_per_shard=8"])
        start = time.perf_counter()
        summary = build_shards(build_cfg, progress_bar=False)
        build_rate = summary.index["frames"] / (time.perf_counter() - start)
        shard_bytes = summary.index["bytes"] / b.clips

        shards, augment, seed = scratch / "shards", Augment(cfg.augment), cfg.stream.seed
        clips = shard_clips(shards)
        h264, h264_bytes = h264_pass(clips, scratch, augment, seed)
        worker = stream_over(shards, cfg, 1)
        loader_pass(worker)(ROUNDS)  # starts the persistent worker, outside the timing
        alternatives = {
            "loader, in process, simplejpeg": loader_pass(stream_over(shards, cfg, 0)),
            "loader, in process, PIL": loader_pass(stream_over(shards, cfg, 0), "pil"),
            "loader, 1 worker process, simplejpeg": loader_pass(worker),
            "loader, JPEG bytes out (decode=gpu)": jpeg_bytes_pass(stream_over(shards, cfg, 0, decoder=lambda jpegs: jpegs)),
            "bare decode, simplejpeg": bare_decode(clips, augment, seed, None),
            "bare decode, PIL": bare_decode(clips, augment, seed, "pil"),
            "PNG folder, same frames (published)": png_folders(clips, scratch / "corpus" / "frames", augment, seed),
            "h264, decode to last kept frame": h264,
        }
        load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
        times = interleaved(alternatives, ROUNDS)
        worker.close()
        rates = {name: [len(clips) / wall for wall, _, _ in t] for name, t in times.items()}
        per_cpu = {name: statistics.median(len(clips) / (own + kids) for _, own, kids in t) for name, t in times.items()}
        worker_core = statistics.median(len(clips) / max(kids, 1e-3) for _, _, kids in times["loader, 1 worker process, simplejpeg"])
        print(f"  {'':<40} {'clips/s: min / median / max':>31}   clips per CPU-second (median)")
        for name, r in rates.items():
            print(f"  {name:<40} {spread(r)}   {per_cpu[name]:7.1f}")
        print(f"  {'shard build, 1 process (one pass)':<40} {build_rate:7.0f} frames/s")
        print(f"  {'device warp+normalise, run on CPU':<40} {device_step_rate(shards, cfg):7.1f} clips/s (on the training device in real runs)")
        print(f"  bytes per clip: shards {shard_bytes / 1e6:.2f} MB (JPEG q{build_cfg.shards.jpeg_quality}, short side {build_cfg.shards.short_side}), "
              f"PNG {png_bytes / 1e6:.2f} MB, h264 {h264_bytes / 1e6:.2f} MB (crf 23)")
        if load_before is not None:
            print(f"  machine load average (1 min) before / after the rounds: {load_before[0]:.1f} / {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        print_ratios(rates)
        print(f"  the worker process alone: {worker_core:.1f} clips per CPU-second (the rank's process: the rest of that line's CPU)")
        print_rule(worker_core, per_cpu["loader, JPEG bytes out (decode=gpu)"])
        return 0
    finally:
        if not b.out:
            shutil.rmtree(scratch, ignore_errors=True)
