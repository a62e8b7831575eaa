"""``fla-ds bench ingest``: what reading real-world video (long raw videos, 720p) costs the shard builder.

1. Seeking on a long raw video (How2Sign's layout: minutes of video, sentences cut out by
   time). A ``bench.raw_seconds`` h264 video at 1280x720, 24 fps, a keyframe every
   ``bench.raw_keyint_s`` seconds, made from the embedded synthetic corpus's signing
   (fla_ds.bench.data.synthetic_frames: any clone reproduces it); 3-second cuts at its start,
   middle and end. For each cut: frames decoded per frame kept (exact), and seconds reached by
   seeking (the reader's way) vs decoding from the start (the baseline), timed interleaved
   over ``ROUNDS`` rounds (min / median / max); the goal: at most 2x the frames kept plus
   one keyframe interval.
2. Memory of a build. One ``bench.hd_seconds`` 1280x720 clip built into a shard by one
   process: the peak resident memory above the interpreter's (a process that loads the same
   libraries and builds a one-frame clip) vs the stored bytes of the sample; the previous
   reader (every frame decoded at full size, then resized) measured the same way. Goal:
   under 4x the stored sample plus the interpreter.
Each measurement of memory runs in a child process that reports its own peak (VmHWM).
"""
from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fla_ds.bench.data import interleaved, synthetic_frames

RAW_SIZE = (1280, 720)
CUT_SECONDS = 3.0
ROUNDS = 3
"""Timed rounds of the seeking comparison: seek, from the start, seek, from the start, ..."""


def write_h264(path: Path, frames: list[np.ndarray], count: int, rate: int, keyint: int) -> Path:
    """``count`` frames (the pool looped) as h264 with a keyframe every ``keyint`` frames."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        stream.options = {"crf": "23", "preset": "ultrafast", "g": str(keyint), "keyint_min": str(keyint), "sc_threshold": "0"}
        for i in range(count):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frames[i % len(frames)], format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def measure_cut(path: Path, start: float, seek: bool) -> tuple[int, int, float]:
    """(frames kept, frames decoded, seconds) for one cut at the stored size short side 256."""
    from fla_ds.video import Cut, ReadStats, read_cuts

    stats = ReadStats()
    began = time.perf_counter()
    kept = sum(1 for e in read_cuts(path, [Cut(start, start + CUT_SECONDS)], 256, stats, seek=seek) if e.frame is not None)
    return kept, stats.frames_decoded, time.perf_counter() - began


def bench_seeking(root: Path, cfg) -> bool:
    b = cfg.bench
    rate = 24
    keyint = max(1, round(b.raw_keyint_s * rate))
    pool = synthetic_frames(48, *RAW_SIZE)
    print(f"  making a {b.raw_seconds:.0f} s raw video (1280x720, {rate} fps, keyframe every {b.raw_keyint_s:g} s) ...", flush=True)
    raw = write_h264(root / "raw.mp4", pool, int(b.raw_seconds * rate), rate, keyint)
    starts = [1.0, b.raw_seconds / 2, b.raw_seconds - CUT_SECONDS - 1.0]
    measure_cut(raw, starts[0], seek=True)  # warm-up: codec and scaler set-up, page cache
    met = True
    print(f"  {'cut':>16}  {'kept':>5}  {'decoded (seek)':>14}  {'decoded/kept':>12}  {'seek s, min/median/max':>22}  "
          f"{'from start s, min/median/max':>28}  {'ratio':>6}  goal")
    for start in starts:
        counts: dict[bool, tuple[int, int]] = {}
        times = interleaved({"seek": cut_pass(raw, start, True, counts), "start": cut_pass(raw, start, False, counts)}, ROUNDS)
        (kept, decoded), (kept_b, decoded_b) = counts[True], counts[False]
        if kept != kept_b:
            print(f"  MISMATCH: {kept} frames kept with seeking, {kept_b} from the start")
            met = False
        ok = decoded <= 2 * kept + keyint
        met &= ok
        seek_s, start_s = ([wall for wall, _, _ in times[k]] for k in ("seek", "start"))
        ratio = statistics.median(b_ / a_ for a_, b_ in zip(seek_s, start_s))
        label = f"[{start:.0f}, {start + CUT_SECONDS:.0f}) s"
        print(f"  {label:>16}  {kept:>5}  {decoded:>14}  {decoded / kept:>12.2f}  {spread_s(seek_s):>22}  {spread_s(start_s):>28}  {ratio:>6.1f}  "
              f"{'met' if ok else 'NOT met'} (<= 2 x {kept} + {keyint})")
        print(f"  {'':>16}  baseline decoded {decoded_b} frames from the start")
    return met


def cut_pass(raw: Path, start: float, seek: bool, counts: dict) -> Callable[[int], None]:
    """One read of the cut at ``start``; its (kept, decoded) frame counts go to counts[seek]."""
    def run(_round: int) -> None:
        counts[seek] = measure_cut(raw, start, seek=seek)[:2]
    return run


def spread_s(seconds: list[float]) -> str:
    return f"{min(seconds):.2f} / {statistics.median(seconds):.2f} / {max(seconds):.2f}"


CHILD = r"""
import json, os, resource, sys
from collections import Counter
mode, path, short_side = sys.argv[1], sys.argv[2], int(sys.argv[3])
from fla_ds.corpus.base import VideoFile
from fla_ds.frames import encode_source, encode_jpeg, pack_frames, resized_size
stored = 0
if mode == "reader":
    clip = encode_source(VideoFile(path), short_side, 90)
    stored = len(clip.pack)
elif mode == "previous":  # every frame decoded at full size first, then resized
    import av
    from PIL import Image
    with av.open(path) as c:
        images = [f.to_image() for f in c.decode(c.streams.video[0])]
    size = resized_size(images[0].width, images[0].height, short_side)
    stored = len(pack_frames([encode_jpeg(im.resize(size, Image.Resampling.BILINEAR), 90) for im in images]))
else:  # the interpreter with the same libraries, one tiny clip
    import av, PIL.Image, numpy
    clip = encode_source(VideoFile(path), short_side, 90)
def peak_mb():  # VmHWM: this process image's own peak (ru_maxrss would include the parent's at fork)
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"stored": stored, "peak_mb": peak_mb()}))
"""


def child_peak(mode: str, path: Path, short_side: int) -> tuple[float, int]:
    """(peak resident MB, stored bytes) of one child process, as the child reports them."""
    done = subprocess.run([sys.executable, "-c", CHILD, mode, str(path), str(short_side)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"bench child '{mode}' failed: {done.stderr.strip().splitlines()[-1:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["peak_mb"], result["stored"]


def bench_memory(root: Path, cfg) -> bool:
    b = cfg.bench
    pool = synthetic_frames(48, *RAW_SIZE)
    clip = write_h264(root / "hd.mp4", pool, int(b.hd_seconds * 24), 24, 48)
    tiny = write_h264(root / "tiny.mp4", pool[:1], 1, 24, 48)
    base_mb, _ = child_peak("interpreter", tiny, 256)
    peak_mb, stored = child_peak("reader", clip, 256)
    old_mb, old_stored = child_peak("previous", clip, 256)
    stored_mb = stored / 2**20
    above = peak_mb - base_mb
    met = above < 4 * stored_mb
    print(f"  720p clip of {b.hd_seconds:.0f} s ({int(b.hd_seconds * 24)} frames), stored {stored_mb:.2f} MB (short side 256, JPEG q90)")
    print(f"  interpreter with the libraries: {base_mb:8.1f} MB peak")
    print(f"  build with the reader:          {peak_mb:8.1f} MB peak, {above:7.1f} MB above the interpreter = {above / stored_mb:5.2f}x the stored sample "
          f"({'met' if met else 'NOT met'}: goal < 4x)")
    ratio = (old_mb - base_mb) / (old_stored / 2**20)
    print(f"  previous reader (decode all, then resize): {old_mb:8.1f} MB peak, {old_mb - base_mb:7.1f} MB above = {ratio:5.1f}x")
    return met


def run_ingest(cfg) -> int:
    """Prints the figures; exit code 0 when both goals are met, 1 otherwise."""
    scratch = Path(cfg.bench.out) if cfg.bench.out else Path(tempfile.mkdtemp(prefix="fla-ds-ingest-"))
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        print("bench ingest: seeking on a long raw video")
        seeking = bench_seeking(scratch, cfg)
        print("bench ingest: memory of a 720p build")
        memory = bench_memory(scratch, cfg)
        return 0 if seeking and memory else 1
    finally:
        if not cfg.bench.out:
            shutil.rmtree(scratch, ignore_errors=True)
