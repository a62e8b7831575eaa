"""The synthetic corpus: its files, its videos, its determinism, and that it can be learned."""
from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import av
import numpy as np
import pytest

from fla_ds.config import SynthConfig
from fla_ds.corpus import synthetic as synth

KEYS = {"id", "video", "text", "signer"}


def tiny_config(out: Path, seed: int = 0) -> SynthConfig:
    return SynthConfig(out=str(out), vocab_size=72, train=6, dev=3, test=3, frames_per_sign=12, seed=seed)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[SynthConfig, Path]:
    cfg = tiny_config(tmp_path_factory.mktemp("synth"))
    return cfg, synth.generate(cfg)


def read_manifest(out: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


def folder_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_manifests_have_counts_keys_and_files(corpus):
    cfg, out = corpus
    for split in synth.SPLITS:
        records = read_manifest(out, split)
        assert len(records) == getattr(cfg, split)
        for i, record in enumerate(records):
            assert set(record) == KEYS
            assert record["id"] == f"synth-{split}-{i:06d}"
            assert record["video"] == f"videos/{record['id']}.mp4"
            assert (out / record["video"]).is_file()
            assert record["signer"] in {s.name for s in synth.SIGNERS}
    assert "CC BY-NC-SA 3.0" in (out / "README.md").read_text(encoding="utf-8")
    assert not list(out.rglob("*.tmp"))


def test_videos_decode_to_size_and_length_of_their_sentence(corpus):
    cfg, out = corpus
    for record in read_manifest(out, "train") + read_manifest(out, "dev"):
        with av.open(str(out / record["video"])) as container:
            stream = container.streams.video[0]
            assert stream.codec_context.name == "h264"
            assert stream.average_rate == cfg.fps
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert frames[0].shape == (cfg.size, cfg.size, 3)
        shortest, longest = synth.clip_length_range(len(record["text"].split()), cfg)
        assert shortest <= len(frames) <= longest


def blurred(clip: np.ndarray) -> np.ndarray:
    """8x8 block means: what h264 keeps of a noisy clip."""
    t, h, w, c = clip.shape
    return clip.astype(np.float32).reshape(t, h // 8, 8, w // 8, 8, c).mean(axis=(2, 4))


def test_decoded_video_is_the_rendered_clip(corpus):
    cfg, out = corpus
    _, pool = synth.config_pool(cfg)
    plan = synth.plan_split("dev", cfg.dev, pool, cfg.seed)[0]
    rendered = synth.render_clip(plan, cfg)
    with av.open(str(out / plan.video)) as container:
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert decoded.shape == rendered.shape
    # The same sentence by the same signer with other jitter is the closest wrong clip.
    other = synth.render_sentence(plan.text.split(), plan.signer, np.random.default_rng(99), cfg)
    n = min(len(other), len(decoded))
    own_error = np.abs(blurred(decoded) - blurred(rendered)).mean()
    other_error = np.abs(blurred(decoded[:n]) - blurred(other[:n])).mean()
    assert own_error < 0.75 * other_error


def test_same_seed_gives_same_bytes_other_seed_differs(corpus, tmp_path):
    cfg, out = corpus
    again = synth.generate(tiny_config(tmp_path / "again"))
    other = synth.generate(tiny_config(tmp_path / "other", seed=1))
    assert folder_digest(again) == folder_digest(out)
    assert folder_digest(other) != folder_digest(out)
    assert read_manifest(other, "train") != read_manifest(out, "train")


def test_sentences_are_real_and_use_only_the_vocabulary(corpus):
    cfg, out = corpus
    shipped = synth.read_sentence_file(synth.SHIPPED_SENTENCES)
    vocab = (out / "vocab.txt").read_text(encoding="utf-8").split()
    assert vocab == synth.choose_vocab(shipped, cfg.vocab_size)  # derivable from the shipped file
    for split in synth.SPLITS:
        for record in read_manifest(out, split):
            assert record["text"] in shipped
            assert set(record["text"].split()) <= set(vocab)


def test_shipped_file_names_its_source_and_gives_enough_sentences():
    header = synth.SHIPPED_SENTENCES.read_text(encoding="utf-8").splitlines()[0]
    assert "RWTH-PHOENIX-Weather 2014 T" in header and "CC BY-NC-SA 3.0" in header
    vocab, pool = synth.sentence_pool("", 72)
    assert len(vocab) == 72 and len(pool) >= 100


def test_a_phoenix_csv_overrides_the_shipped_sentences(tmp_path):
    csv = tmp_path / "mini.corpus.csv"
    rows = ["guten abend liebe zuschauer", "liebe zuschauer guten abend", "und nun die wettervorhersage", "x"]
    csv.write_text(
        "name|video|start|end|speaker|orth|translation\n"
        + "".join(f"n{i}|n{i}/1/*.png|-1|-1|Signer01|GLOSS|{t}\n" for i, t in enumerate(rows)),
        encoding="utf-8",
    )
    vocab, pool = synth.sentence_pool(str(csv), 4)
    assert vocab == ("abend", "guten", "liebe", "zuschauer")
    assert pool == ("guten abend liebe zuschauer", "liebe zuschauer guten abend")


def render_word(word: str, signer: synth.Signer, cfg, seed: int = 7) -> np.ndarray:
    return synth.render_sentence([word], signer, np.random.default_rng(seed), cfg)


def test_different_words_render_differently(tmp_path):
    cfg = tiny_config(tmp_path)
    vocab, _ = synth.config_pool(cfg)
    signer = synth.SIGNERS[0]
    # Same signer and rng: same jitter, timing and noise, so only the sign itself differs.
    clips = [render_word(w, signer, cfg).astype(np.float32) for w in vocab]
    assert len({c.shape for c in clips}) == 1
    closest = min(np.abs(a - b).mean() for a, b in itertools.combinations(clips, 2))
    assert closest > 0.5


def motion_feature(clip: np.ndarray, signer: synth.Signer, points: int = 5) -> np.ndarray:
    """Where the hands are over the course of a one-sign clip, relative to the signer.

    Hands are the pixels that differ from the opening rest frame; at `points` evenly spaced
    moments of the sign it takes their centroid (place, path) and horizontal spread (one or
    two hands, and how far apart). Colour and shape are left out on purpose: this checks that
    movement and place alone already identify a word across signers.
    """
    size = clip.shape[1]
    moving = np.abs(clip.astype(np.int16) - clip[0].astype(np.int16)).max(-1) > 60
    signing = np.flatnonzero(moving.any(axis=(1, 2)))
    feature = []
    for t in signing[np.linspace(0, len(signing) - 1, points).round().astype(int)]:
        ys, xs = np.nonzero(moving[t])
        x, y = (xs.mean() + 0.5) / size - signer.offset[0], (ys.mean() + 0.5) / size - signer.offset[1]
        feature += [x, y, xs.std() / size]
    return np.array(feature)


@pytest.mark.parametrize("a, b", [("s00", "s05"), ("s01", "s04"), ("s03", "s02")])
def test_a_word_stays_nearest_to_itself_across_signers(tmp_path, a, b):
    """The learnable property: a different signer, speed and jitter still leave each word's
    movement closer to the same word by another signer than to any other word."""
    cfg = tiny_config(tmp_path)
    vocab, _ = synth.config_pool(cfg)
    signers = {s.name: s for s in synth.SIGNERS}
    reference = np.stack([motion_feature(render_word(w, signers[a], cfg, seed=1), signers[a]) for w in vocab])
    probe = np.stack([motion_feature(render_word(w, signers[b], cfg, seed=2), signers[b]) for w in vocab])
    distances = np.linalg.norm(probe[:, None] - reference[None], axis=-1)
    wrong = [(vocab[i], vocab[j]) for i, j in enumerate(distances.argmin(axis=1)) if i != j]
    assert not wrong, f"signed by {b}, these words look most like another word by {a}: {wrong}"


def test_render_sentence_refuses_unknown_words(tmp_path):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        synth.render_sentence(["wettervorhersage"], synth.SIGNERS[0], np.random.default_rng(0), tiny_config(tmp_path))


def test_generate_accepts_the_omegaconf_node(tmp_path):
    from fla_ds.config import load_config

    cfg = load_config(None, [f"synth.out={tmp_path / 'o'}", "synth.train=1", "synth.dev=1", "synth.test=1"]).synth
    out = synth.generate(cfg)
    assert len(read_manifest(out, "test")) == 1
