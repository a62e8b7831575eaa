"""``fla-ds bench data``: how fast the data path is, against baselines measured in the same run.

On the same clips (PHOENIX-like: ``bench.frames`` frames of ``bench.width`` x ``bench.height``,
made from real signing video so that images compress like real ones):
- build: shard building, frames/s in one process (decode PNG, resize, JPEG-encode, write);
- loader: the streaming loader in training mode, clips/s for one worker (T/4, 224x224);
- bare decode: decoding exactly the frames the loader samples, with the same codec, from memory,
  nothing else: the limit the loader can approach;
- PNG folder: how the published code reads PHOENIX: decode every PNG of the folder, then keep
  T/4 and crop;
- h264: the same clips as one h264 video each, decoded up to the last sampled frame (video
  codecs decode sequentially): bytes and clips/s, the alternative to per-frame JPEG.
Prints the figures, bytes per clip and the ratios; a timed assertion never belongs in a test.
"""
from __future__ import annotations

import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from fla_ds.augment import Augment, sample_frame_indices, train_crop
from fla_ds.config import load_config
from fla_ds.corpus.base import FrameFolder
from fla_ds.frame_folder import list_frame_files
from fla_ds.frames import FramePack, decode_jpeg

REAL_VIDEO_GLOBS = ("clips/*.mp4", "how2sign/clips/*.mp4")


def real_frames(count: int, width: int, height: int) -> list[np.ndarray]:
    """Frames of real signing video (tests/fixtures or ../shared/data), resized; looped to ``count``."""
    import av

    here = Path(__file__).resolve().parents[2]  # the repository root
    candidates = [here / "tests" / "fixtures", here.parent / "shared" / "data"]
    videos = sorted(p for base in candidates for g in REAL_VIDEO_GLOBS for p in base.glob(g))
    if not videos:
        raise FileNotFoundError("no real video found for the benchmark (tests/fixtures/how2sign/clips)")
    frames: list[np.ndarray] = []
    for video in videos:
        with av.open(str(video)) as c:
            for f in c.decode(c.streams.video[0]):
                frames.append(np.asarray(f.to_image().resize((width, height), Image.Resampling.BILINEAR)))
    return [frames[i % len(frames)] for i in range(count)]


def make_png_corpus(root: Path, clips: int, frames: int, width: int, height: int) -> Path:
    pool = real_frames(frames + clips, width, height)
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


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def bench_png_folders(manifest: Path, clips: int, cfg) -> float:
    """The published way: every PNG of the folder decoded and resized, then T/4 kept, then the
    same crop as the loader's."""
    def run():
        for c in range(clips):
            files = list_frame_files(FrameFolder(str(manifest.parent / "frames" / f"clip{c:04d}")))
            frames = [Image.open(f).convert("RGB") for f in files]
            frames = [f.resize((256, round(256 * f.height / f.width)), Image.Resampling.BILINEAR) for f in frames]
            rng = random.Random(c)
            keep = sample_frame_indices(len(frames), rng, cfg.keep_ratio, cfg.stride_jitter, cfg.max_frames, True)
            box, _ = train_crop(frames[0].width, frames[0].height, cfg.crop_fraction, rng, cfg.crop_scale_min, cfg.max_rotation)
            np.stack([np.asarray(frames[i].crop(box)) for i in keep])
    return timed(run)[0]


def bench_device_step(shards: Path, cfg) -> float:
    """Seconds per clip of the warp + normalisation that runs on the training device (here on
    the CPU, so an upper bound; on a GPU it is negligible)."""
    from omegaconf import OmegaConf

    from fla_ds.stream import ShardStream

    augment = Augment(cfg.augment)
    stream = ShardStream(OmegaConf.merge(cfg.stream, {"shards": str(shards), "split": "train", "num_workers": 0, "train": True}), 0, 1, 4, augment)
    batch = next(iter(stream))
    seconds, _ = timed(lambda: [augment.model_input(batch.video, batch.affine) for _ in range(3)])
    return seconds / (3 * batch.video.shape[0])


def shard_packs(shards: Path) -> list[FramePack]:
    from fla_ds.shards.format import iter_raw_samples, parse_sample

    packs = []
    for tar in sorted(shards.glob("train-*.tar")):
        for raw in iter_raw_samples(str(tar)):
            packs.append(parse_sample(str(tar), raw)[1])
    return packs


def bench_bare_decode(packs: list[FramePack], cfg) -> float:
    def run():
        for c, pack in enumerate(packs):
            keep = sample_frame_indices(len(pack), random.Random(c), cfg.keep_ratio, cfg.stride_jitter, cfg.max_frames, True)
            for i in keep:
                decode_jpeg(pack.jpeg(i))
    return timed(run)[0]


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


def bench_h264(packs: list[FramePack], root: Path, cfg) -> tuple[float, float]:
    """Seconds to decode the sampled frames from h264 (sequential decode), and bytes per clip."""
    import av

    paths, sizes = [], []
    for c, pack in enumerate(packs):
        frames = [decode_jpeg(pack.jpeg(i)) for i in range(len(pack))]
        frames = [f[: f.shape[0] // 2 * 2, : f.shape[1] // 2 * 2] for f in frames]
        path = root / f"clip{c:04d}.mp4"
        sizes.append(encode_h264(frames, path))
        paths.append(path)

    def run():
        for c, path in enumerate(paths):
            keep = set(sample_frame_indices(len(packs[c]), random.Random(c), cfg.keep_ratio, cfg.stride_jitter, cfg.max_frames, True))
            last = max(keep)
            with av.open(str(path)) as container:
                for i, frame in enumerate(container.decode(container.streams.video[0])):
                    if i in keep:
                        frame.to_ndarray(format="rgb24")
                    if i >= last:
                        break
    return timed(run)[0], float(np.mean(sizes))


def bench_loader(shards: Path, cfg) -> tuple[float, int]:
    from omegaconf import OmegaConf

    from fla_ds.stream import ShardStream

    one_worker = {"shards": str(shards), "split": "train", "num_workers": 0, "train": True}
    stream = ShardStream(OmegaConf.merge(cfg.stream, one_worker), 0, 1, 1, Augment(cfg.augment))
    def run():
        return sum(1 for _ in stream)
    seconds, clips = timed(run)
    return seconds, clips


def run_data(cfg) -> int:
    b = cfg.bench
    scratch = Path(b.out) if b.out else Path(tempfile.mkdtemp(prefix="fla-ds-bench-"))
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        print(f"bench data: {b.clips} clips of {b.frames} frames at {b.width}x{b.height} (PHOENIX-like, from real signing video) in {scratch}")
        manifest = make_png_corpus(scratch / "corpus", b.clips, b.frames, b.width, b.height)
        png_bytes = sum(p.stat().st_size for p in (scratch / "corpus" / "frames").rglob("*.png")) / b.clips

        from fla_ds.shards.build import build_shards

        build_cfg = load_config(None, [f"corpus.root={manifest}", f"shards.out={scratch / 'shards'}", "shards.workers=1", "shards.samples_per_shard=8"])
        build_s, summary = timed(lambda: build_shards(build_cfg, progress_bar=False))
        frames_total = summary.index["frames"]
        shard_bytes = summary.index["bytes"] / b.clips

        s = cfg.augment
        packs = shard_packs(scratch / "shards")
        loader_s, loaded = bench_loader(scratch / "shards", cfg)
        bare_s = bench_bare_decode(packs, s)
        png_s = bench_png_folders(manifest, b.clips, s)
        h264_s, h264_bytes = bench_h264(packs, scratch, s)
        device_s = bench_device_step(scratch / "shards", cfg)

        rate = lambda seconds: b.clips / seconds
        rows = [
            ("shard build (1 process)", f"{frames_total / build_s:8.0f} frames/s", ""),
            ("loader, 1 worker (train, T/4, 224)", f"{loaded / loader_s:8.1f} clips/s",
             f"{shard_bytes / 1e6:6.2f} MB/clip (JPEG q{build_cfg.shards.jpeg_quality}, short side {build_cfg.shards.short_side})"),
            ("bare JPEG decode of the same frames", f"{rate(bare_s):8.1f} clips/s", ""),
            ("PNG folder, every frame (published)", f"{rate(png_s):8.1f} clips/s", f"{png_bytes / 1e6:6.2f} MB/clip (PNG {b.width}x{b.height})"),
            ("h264 sequential decode to last kept", f"{rate(h264_s):8.1f} clips/s", f"{h264_bytes / 1e6:6.2f} MB/clip (crf 23)"),
            ("device warp+normalise, run on CPU", f"{1 / device_s:8.1f} clips/s", "(on the training device in real runs)"),
        ]
        for name, figure, size in rows:
            print(f"  {name:<38} {figure}   {size}")
        loader_rate = loaded / loader_s
        print(f"  ratio loader / bare decode: {loader_rate / rate(bare_s):.2f}   (goal >= 0.7)")
        print(f"  ratio loader / PNG folder:  {loader_rate / rate(png_s):.2f}   (goal >= 3)")
        print(f"  ratio loader / h264:        {loader_rate / rate(h264_s):.2f};  bytes JPEG / h264: {shard_bytes / h264_bytes:.1f}")
        return 0
    finally:
        if not b.out:
            shutil.rmtree(scratch, ignore_errors=True)
