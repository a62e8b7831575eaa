"""Small manifest corpora made on the fly for the shard and loader tests.

Frame folders of tiny JPEGs (fast to build), real video clips from tests/fixtures, and each
kind of bad input the shard builder must reject or repair.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

FIXTURES = Path(__file__).parent / "fixtures"
REAL_CLIPS = sorted((FIXTURES / "how2sign" / "clips").glob("*.mp4"))


def write_frames(folder: Path, count: int, seed: int, size=(40, 32)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
    for i in range(count):
        frame = np.roll(base, i, axis=1)
        Image.fromarray(frame).save(folder / f"images{i + 1:04d}.jpg", quality=95)
    return folder


def frames_corpus(root: Path, n: int, min_frames: int = 6, max_frames: int = 14, split: str = "train", missing_every: int = 0) -> Path:
    """n good samples, each a frame folder with a different frame count; returns the manifest.
    With ``missing_every``, every so many rows name a missing folder (uneven shards)."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        if missing_every and i % missing_every == missing_every - 1:
            rows.append({"id": f"gone{i:03d}", "frames": f"frames/gone{i:03d}", "text": "fehlt"})
        count = min_frames + (i * 5) % (max_frames - min_frames + 1)
        write_frames(root / "frames" / f"s{i:03d}", count, seed=i)
        rows.append({"id": f"s{i:03d}", "frames": f"frames/s{i:03d}", "text": f"satz {i} über das wetter", "signer": f"p{i % 3}"})
    return write_manifest(root / f"{split}.jsonl", rows)


def write_manifest(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return path


def faststart_copy(src: Path, dst: Path) -> Path:
    import av

    with av.open(str(src)) as inp, av.open(str(dst), "w", format="mp4", options={"movflags": "faststart"}) as out:
        stream_in = inp.streams.video[0]
        stream_out = out.add_stream_from_template(stream_in)
        for packet in inp.demux(stream_in):
            if packet.dts is not None:
                packet.stream = stream_out
                out.mux(packet)
    return dst


def bad_inputs_corpus(root: Path) -> tuple[Path, dict]:
    """A corpus with good samples and one of each kind of bad input.

    Returns the manifest and the expected outcome per id: 'kept', 'repaired:<kind>' or the
    reject reason's leading phrase.
    """
    root.mkdir(parents=True, exist_ok=True)
    clip = REAL_CLIPS[0]
    shutil.copy(clip, root / "good.mp4")
    # Truncate a copy whose index sits in front (faststart): it opens, then breaks off.
    faststart_copy(clip, root / "faststart.mp4")
    data = (root / "faststart.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(data[: int(len(data) * 0.6)])
    (root / "garbage.mp4").write_bytes(b"this is not a video" * 100)
    write_frames(root / "frames" / "good", 5, seed=1)
    write_frames(root / "frames" / "corrupt", 5, seed=2)
    png = root / "frames" / "corrupt" / "images0003.jpg"
    png.write_bytes(png.read_bytes()[:40])
    (root / "frames" / "empty").mkdir(parents=True)
    rows = [
        ({"id": "good-video", "video": "good.mp4", "text": "hallo welt"}, "kept"),
        ({"id": "good-frames", "frames": "frames/good", "text": "grüße aus köln"}, "kept"),
        ({"id": "has.dots/and slash", "frames": "frames/good", "text": "punkte im namen"}, "kept"),
        ({"id": "truncated", "video": "truncated.mp4", "text": "abgeschnitten"}, "truncated video"),
        ({"id": "garbage", "video": "garbage.mp4", "text": "kein video"}, "unreadable video"),
        ({"id": "no-video", "video": "missing.mp4", "text": "fehlt"}, "missing video file"),
        ({"id": "no-folder", "frames": "frames/missing", "text": "fehlt auch"}, "missing frame folder"),
        ({"id": "corrupt-image", "frames": "frames/corrupt", "text": "kaputt"}, "corrupt image"),
        ({"id": "zero-frames", "frames": "frames/empty", "text": "leer"}, "zero frames"),
        ({"id": "empty-text", "frames": "frames/good", "text": "   "}, "empty text"),
        ({"id": "good-video", "frames": "frames/good", "text": "zweimal"}, "duplicate id"),
        ({"id": "start-past-end", "video": "good.mp4", "start": 50.0, "end": 52.0, "text": "zu spät"}, "clip start past end of video"),
        ({"id": "end-past-end", "video": "good.mp4", "start": 0.2, "end": 99.0, "text": "zu lang"}, "repaired:end_clamped"),
        ({"id": "mojibake", "frames": "frames/good", "text": "youâ\x80\x99re welcome"}, "repaired:mojibake"),
    ]
    manifest = write_manifest(root / "train.jsonl", [r for r, _ in rows])
    # Non-UTF-8 text cannot be written through json: append a raw latin-1 line.
    with open(manifest, "ab") as f:
        f.write(b'{"id": "latin1", "frames": "frames/good", "text": "gr\xfc\xdfe"}\n')
    expected = {r["id"]: outcome for r, outcome in rows if outcome != "duplicate id"}
    expected["latin1"] = "non-UTF-8 text"
    return manifest, expected
