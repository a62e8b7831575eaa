"""A synthetic sign-language corpus that a small model can learn, for offline runs and tests.

Every word of a small vocabulary is a "sign": one or two coloured shapes ("hands") moving
along a word-specific path. A clip is a real German sentence from PHOENIX-2014T signed
word by word, with per-clip signer variation (background, body, offset, speed) and per-sign
jitter. The output is the manifest layout:

    OUT/{train,dev,test}.jsonl   {"id", "video", "text", "signer"}, video relative to OUT
    OUT/videos/<id>.mp4          h264, yuv420p, size x size, fps
    OUT/vocab.txt, OUT/README.md

Usage: ``generate(cfg)`` with a ``SynthConfig`` (dataclass or omegaconf node).
"""
from __future__ import annotations

import csv
import functools
import json
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fla_ds.atomic import atomic_write_text, remove_stale_tmp, tmp_name

SHIPPED_SENTENCES = Path(__file__).with_name("synth_sentences.txt")
SPLITS = ("train", "dev", "test")
MIN_WORDS, MAX_WORDS = 2, 10
"""Sentence lengths kept: long enough to be a sequence, short enough for short clips."""

# ---------------------------------------------------------------- sentences and vocabulary


def read_sentence_file(path: str | Path) -> list[str]:
    """The shipped format: one sentence a line, '#' lines are comments."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [" ".join(line.split()) for line in lines if line.strip() and not line.startswith("#")]


def read_phoenix_translations(path: str | Path) -> list[str]:
    """The `translation` column of a PHOENIX-format corpus CSV ('|'-separated, with header)."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = csv.DictReader(f, delimiter="|", quoting=csv.QUOTE_NONE)
        if not rows.fieldnames or "translation" not in rows.fieldnames:
            raise ValueError(f"{path}: no 'translation' column in the header (PHOENIX format expected)")
        return [" ".join((row["translation"] or "").split()) for row in rows]


def candidate_sentences(sentences: Iterable[str]) -> list[str]:
    """Distinct sentences of MIN_WORDS..MAX_WORDS words, sorted (order-independent input)."""
    return sorted({s for s in sentences if MIN_WORDS <= len(s.split()) <= MAX_WORDS})


def choose_vocab(sentences: Sequence[str], size: int) -> list[str]:
    """At most `size` words under which as many whole sentences as possible are kept.

    The most frequent PHOENIX words cover no whole sentence at all (24 of them cover none),
    so the vocabulary is grown greedily instead: each step adds the missing words of the
    sentence that brings in the most newly covered sentences per added word. Ties are broken
    by the words themselves, so the result depends only on the set of sentences.
    """
    chosen: set[str] = set()
    missing = [frozenset(s.split()) for s in candidate_sentences(sentences)]
    while True:
        groups = Counter(m for m in missing if m)
        best_key, best = None, None
        for need in groups:
            if len(chosen) + len(need) > size:
                continue
            gain = sum(n for other, n in groups.items() if other <= need)
            key = (gain / len(need), -len(need), sorted(need))
            if best_key is None or key > best_key:
                best_key, best = key, need
        if best is None:
            return sorted(chosen)
        chosen |= best
        missing = [m - best for m in missing]


def covered_sentences(sentences: Iterable[str], vocab: Iterable[str]) -> list[str]:
    words = set(vocab)
    return [s for s in candidate_sentences(sentences) if set(s.split()) <= words]


@functools.lru_cache(maxsize=8)
def sentence_pool(sentences_csv: str, vocab_size: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(vocab, sentences) for a config: from the shipped file, or from a PHOENIX CSV."""
    source = read_phoenix_translations(sentences_csv) if sentences_csv else read_sentence_file(SHIPPED_SENTENCES)
    vocab = choose_vocab(source, vocab_size)
    pool = covered_sentences(source, vocab)
    if not pool:
        raise ValueError(f"no sentence of {MIN_WORDS}-{MAX_WORDS} words fits a vocabulary of {vocab_size} words")
    return tuple(vocab), tuple(pool)


def config_pool(cfg) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return sentence_pool(str(cfg.sentences or ""), int(cfg.vocab_size))


# ---------------------------------------------------------------- what each word looks like

SHAPES = ("circle", "square", "triangle", "cross", "bar")
COLOURS = ((235, 50, 45), (45, 205, 70), (60, 95, 250), (245, 225, 40), (225, 60, 225), (40, 215, 225), (250, 250, 250))
PATHS = ("line", "arc", "circle", "corner", "tap", "hold", "two-line", "two-circle")
GRID = (0.3, 0.5, 0.7)
"""Start positions, a 3x3 grid in the signing space (fractions of width/height)."""
TWO_HAND_SEPARATION = (0.12, 0.22, 0.32)
"""For two-handed signs the grid column sets how far the hands are from the body's middle."""
TWO_HAND_AMPLITUDE = 0.6
"""Two-handed movements are smaller, so that the hands never cross or leave the frame."""
AMPLITUDE = 0.18
"""Extent of a sign's movement as a fraction of the frame; just below the grid spacing."""
HAND_RADIUS = 0.085


@dataclass(frozen=True)
class SignPattern:
    shape: str
    colour: tuple[int, int, int]
    path: str
    start: tuple[float, float]
    angle: float


def pattern_for(index: int) -> SignPattern:
    """The sign of the index-th vocabulary word.

    Shape, colour, path and start position cycle with pairwise coprime periods (5, 7, 8, 9),
    so no two of the first 2520 words look alike; among the first 72 the (path, position)
    pair alone is unique, so movement and place alone tell any two words apart.
    """
    position = index % 9
    direction = (index // 8) % 4  # words that share a path move in different directions
    return SignPattern(
        shape=SHAPES[index % 5],
        colour=COLOURS[index % 7],
        path=PATHS[index % 8],
        start=(GRID[position % 3], GRID[position // 3]),
        angle=direction * math.pi / 4,
    )


def word_patterns(vocab: Sequence[str]) -> dict[str, SignPattern]:
    return {word: pattern_for(i) for i, word in enumerate(vocab)}


# ---------------------------------------------------------------- signers


@dataclass(frozen=True)
class Signer:
    name: str
    background: tuple[int, int, int]
    body: tuple[int, int, int]
    offset: tuple[float, float]
    speed: float
    """Signing speed; a sign lasts frames_per_sign / speed frames."""
    hand_scale: float


def make_signers(count: int = 6) -> list[Signer]:
    """A fixed cast (independent of the seed, so that 's03' always looks the same)."""
    rng = np.random.default_rng(20140)
    signers = []
    for i in range(count):
        background = tuple(int(v) for v in rng.integers(15, 75, 3))
        body = tuple(int(v) for v in rng.integers(85, 150, 3))
        offset = tuple(float(v) for v in rng.uniform(-0.03, 0.03, 2))
        speed = float(np.exp(np.linspace(math.log(0.8), math.log(1.25), count)[i]))
        signers.append(Signer(f"s{i:02d}", background, body, offset, speed, float(rng.uniform(0.9, 1.1))))
    return signers


SIGNERS = make_signers()


def signer_backdrop(signer: Signer, size: int) -> np.ndarray:
    """Background with a head and torso in the signer's colours, float32 (H, W, 3)."""
    y, x = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / size
    cx, cy = 0.5 + signer.offset[0], signer.offset[1]
    head = np.hypot(x - cx, y - (0.2 + cy)) < 0.1
    torso = (np.abs(x - cx) < 0.24) & (y > 0.4 + cy)
    image = np.empty((size, size, 3), np.float32)
    image[:] = signer.background
    image[head | torso] = signer.body
    return image


# ---------------------------------------------------------------- drawing


def shape_distance(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Signed distance in pixels from the shape's outline (negative inside)."""
    def box(hx: float, hy: float) -> np.ndarray:
        qx, qy = np.abs(dx) - hx, np.abs(dy) - hy
        return np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0)

    if shape == "circle":
        return np.hypot(dx, dy) - r
    if shape == "square":
        return box(0.85 * r, 0.85 * r)
    if shape == "cross":
        return np.minimum(box(1.1 * r, 0.38 * r), box(0.38 * r, 1.1 * r))
    if shape == "bar":
        return box(1.25 * r, 0.42 * r)
    if shape == "triangle":  # equilateral, apex up; the intersection of three half-planes
        r = 1.25 * r
        k = math.sqrt(3) / 2
        edges = (dy - r / 2, -0.5 * dy + k * dx - r / 2, -0.5 * dy - k * dx - r / 2)
        return np.maximum.reduce(edges)
    raise ValueError(f"unknown shape {shape!r}")


def draw_hand(canvas: np.ndarray, shape: str, colour: Sequence[int], centre: tuple[float, float], radius: float) -> None:
    """Paint one anti-aliased shape in place; only its bounding box is computed."""
    size = canvas.shape[0]
    px, py = centre[0] * size, centre[1] * size
    reach = 1.6 * radius + 1
    x0, x1 = max(0, int(px - reach)), min(size, int(px + reach) + 1)
    y0, y1 = max(0, int(py - reach)), min(size, int(py + reach) + 1)
    if x0 >= x1 or y0 >= y1:
        return
    y, x = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
    alpha = np.clip(0.5 - shape_distance(shape, x - px, y - py, radius), 0, 1)[..., None]
    patch = canvas[y0:y1, x0:x1]
    patch += alpha * (np.asarray(colour, np.float32) - patch)


DURATION_JITTER = (0.85, 1.15)


@dataclass(frozen=True)
class SignJitter:
    """How one performance of a sign differs from the next."""

    shift: tuple[float, float]
    scale: float
    turn: float
    duration: float


def draw_jitter(rng: np.random.Generator) -> SignJitter:
    return SignJitter(
        shift=(float(rng.normal(0, 0.01)), float(rng.normal(0, 0.01))),
        scale=float(rng.uniform(0.9, 1.1)),
        turn=float(rng.normal(0, 0.1)),
        duration=float(rng.uniform(*DURATION_JITTER)),
    )


def hand_positions(pattern: SignPattern, phase: float, signer: Signer, jitter: SignJitter) -> list[tuple[float, float]]:
    """Where the hand(s) are at `phase` in [0, 1] of the sign, in fractions of the frame."""
    two_handed = pattern.path.startswith("two-")
    centre_x = 0.5 + signer.offset[0]
    sx, sy = pattern.start
    if two_handed:
        sx = 0.5 + TWO_HAND_SEPARATION[GRID.index(sx)]
    sx, sy = sx + signer.offset[0] + jitter.shift[0], sy + signer.offset[1] + jitter.shift[1]
    a = AMPLITUDE * jitter.scale * (TWO_HAND_AMPLITUDE if two_handed else 1.0)
    theta = pattern.angle + jitter.turn
    d = (math.cos(theta), math.sin(theta))
    n = (-d[1], d[0])
    along, across = path_offsets(pattern.path.removeprefix("two-"), phase)
    x = sx + a * (along * d[0] + across * n[0])
    y = sy + a * (along * d[1] + across * n[1])
    if two_handed:
        return [(x, y), (2 * centre_x - x, y)]
    return [(x, y)]


def path_offsets(path: str, p: float) -> tuple[float, float]:
    """(along, across) the sign's direction, in units of AMPLITUDE.

    The model sees about three frames of a sign (T/4 sampling), so the paths are chosen to
    differ at the start, middle and end, not in fine detail.
    """
    if path == "line":
        return p - 0.5, 0.0
    if path == "arc":  # bulges sideways: ends and middle lie off the straight line
        return p - 0.5, 0.9 * math.sin(math.pi * p) - 0.45
    if path == "circle":  # a loop that returns to where it began
        return 0.45 * math.cos(2 * math.pi * p), 0.45 * math.sin(2 * math.pi * p)
    if path == "corner":  # along, then turning sideways
        return (2 * p - 0.5, 0.0) if p < 0.5 else (0.5, 1.4 * (p - 0.5))
    if path == "tap":  # out and back
        return 0.8 * math.sin(math.pi * p) - 0.3, 0.0
    if path == "hold":  # held in place
        return 0.0, 0.0
    raise ValueError(f"unknown path {path!r}")


# ---------------------------------------------------------------- timing and rendering


def sign_frames(cfg, speed: float, duration: float) -> int:
    return max(2, round(cfg.frames_per_sign * duration / speed))


def rest_frames(cfg, speed: float) -> int:
    """Hands down between signs for a quarter sign, so that signs are apart in time."""
    return max(1, round(cfg.frames_per_sign / 4 / speed))


def clip_length_range(n_words: int, cfg) -> tuple[int, int]:
    """Fewest and most frames a clip of n_words can have (for checks on decoded videos)."""
    fast, slow = max(s.speed for s in SIGNERS), min(s.speed for s in SIGNERS)
    shortest = n_words * sign_frames(cfg, fast, DURATION_JITTER[0]) + (n_words + 1) * rest_frames(cfg, fast)
    longest = n_words * sign_frames(cfg, slow, DURATION_JITTER[1]) + (n_words + 1) * rest_frames(cfg, slow)
    return shortest, longest


def render_sentence(words: Sequence[str], signer: Signer, rng: np.random.Generator, cfg) -> np.ndarray:
    """Sign `words` (all in the config's vocabulary): a (T, size, size, 3) uint8 clip.

    A clip opens and closes with rest frames, and rests between signs; `rng` draws the
    per-sign jitter and the pixel noise, so the same rng state gives the same clip.
    """
    patterns = word_patterns(config_pool(cfg)[0])
    unknown = [w for w in words if w not in patterns]
    if unknown:
        raise ValueError(f"words outside the vocabulary: {unknown}")
    size = int(cfg.size)
    backdrop = signer_backdrop(signer, size)
    radius = HAND_RADIUS * size * signer.hand_scale
    rest = rest_frames(cfg, signer.speed)
    frames = [backdrop] * rest
    for word in words:
        pattern, jitter = patterns[word], draw_jitter(rng)
        n = sign_frames(cfg, signer.speed, jitter.duration)
        for t in range(n):
            canvas = backdrop.copy()
            for centre in hand_positions(pattern, t / (n - 1), signer, jitter):
                draw_hand(canvas, pattern.shape, pattern.colour, centre, radius)
            frames.append(canvas)
        frames.extend([backdrop] * rest)
    clip = np.stack(frames)
    clip += rng.normal(0, 3.0, clip.shape).astype(np.float32)  # sensor noise, so no two clips match exactly
    return np.clip(clip + 0.5, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- writing the corpus


def write_mp4(path: Path, frames: np.ndarray, fps: int) -> None:
    """h264/yuv420p, atomically, and byte-reproducible: with x264's macroblock-tree rate
    control on, the same frames encoded to different bytes from run to run (measured on
    these small clips, even with one thread); with it off and one thread they do not."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    with av.open(str(tmp), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        stream.codec_context.options = {"crf": "23", "preset": "fast", "x264-params": "mbtree=0"}
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode(None))
    tmp.replace(path)


@dataclass(frozen=True)
class ClipPlan:
    id: str
    split: str
    index: int
    text: str
    signer: Signer

    @property
    def video(self) -> str:
        return f"videos/{self.id}.mp4"

    def record(self) -> dict:
        return {"id": self.id, "video": self.video, "text": self.text, "signer": self.signer.name}


def plan_split(split: str, count: int, pool: Sequence[str], seed: int) -> list[ClipPlan]:
    """Sentences drawn uniformly from the one pool for every split (with repeats), each
    with a random signer; seeded by (seed, split) so a split does not depend on the others."""
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    picks = rng.integers(len(pool), size=count)
    signers = rng.integers(len(SIGNERS), size=count)
    return [
        ClipPlan(f"synth-{split}-{i:06d}", split, i, pool[p], SIGNERS[s])
        for i, (p, s) in enumerate(zip(picks, signers))
    ]


def render_clip(plan: ClipPlan, cfg) -> np.ndarray:
    rng = np.random.default_rng([int(cfg.seed), SPLITS.index(plan.split), plan.index, 1])
    return render_sentence(plan.text.split(), plan.signer, rng, cfg)


def seen_fraction(clips: Sequence[ClipPlan], train: Sequence[ClipPlan]) -> float:
    seen = {c.text for c in train}
    return sum(c.text in seen for c in clips) / len(clips) if clips else 0.0


def readme_text(cfg, vocab: Sequence[str], pool: Sequence[str], plans: dict[str, list[ClipPlan]]) -> str:
    source = cfg.sentences or "fla_ds/corpus/synth_sentences.txt (shipped)"
    counts = ", ".join(f"{s} {len(plans[s])}" for s in SPLITS)
    return f"""# Synthetic sign-language corpus (fla_ds)

Generated by `fla_ds.corpus.synthetic.generate`. Each word is a sign: one or two coloured
shapes moving along a word-specific path; clips vary by signer (background, body, position,
speed) and per sign (position, size, direction, duration), with pixel noise. It exists to run
and test the pipeline offline; it says nothing about real sign language.

- clips: {counts}; videos h264 {cfg.size}x{cfg.size} at {cfg.fps} fps, ~{cfg.frames_per_sign} frames per sign
- seed {cfg.seed}; signers {", ".join(s.name for s in SIGNERS)}
- sentences: {len(pool)} distinct, {MIN_WORDS}-{MAX_WORDS} words, from {source}
- vocabulary: {len(vocab)} words (vocab.txt; line order = sign pattern index)
- dev clips whose sentence also occurs in train: {seen_fraction(plans["dev"], plans["train"]):.0%};
  test: {seen_fraction(plans["test"], plans["train"]):.0%}

## Licence of the sentences

The target sentences are translations from the RWTH-PHOENIX-Weather 2014 T corpus
(training split annotations), (c) RWTH Aachen University, licensed CC BY-NC-SA 3.0
(https://creativecommons.org/licenses/by-nc-sa/3.0/). Non-commercial use only; derived
data must be shared under the same licence. The videos are generated and contain no
recording of any person.

## Vocabulary

{" ".join(vocab)}
"""


def generate(cfg) -> Path:
    """Write the corpus to cfg.out and return that folder.

    Old manifests are removed first and new ones written last (each atomically), so a run
    killed half-way leaves no manifest that names missing or stale videos.
    """
    out = Path(cfg.out)
    if int(cfg.size) % 2:
        raise ValueError(f"synth.size must be even for yuv420p video, got {cfg.size}")
    vocab, pool = config_pool(cfg)
    plans = {split: plan_split(split, int(getattr(cfg, split)), pool, int(cfg.seed)) for split in SPLITS}
    for split in SPLITS:
        (out / f"{split}.jsonl").unlink(missing_ok=True)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(out)
    remove_stale_tmp(out / "videos")
    for split in SPLITS:
        for plan in plans[split]:
            write_mp4(out / plan.video, render_clip(plan, cfg), int(cfg.fps))
    atomic_write_text(out / "vocab.txt", "".join(f"{w}\n" for w in vocab))
    atomic_write_text(out / "README.md", readme_text(cfg, vocab, pool, plans))
    for split in SPLITS:
        lines = [json.dumps(p.record(), ensure_ascii=False) + "\n" for p in plans[split]]
        atomic_write_text(out / f"{split}.jsonl", "".join(lines))
    return out
