"""Corpus trees in each native layout, built under tmp_path from tests/fixtures (real files,
see tests/fixtures/README.md) so that tests may alter them."""
from __future__ import annotations

import json
import pickle
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from slurm_cluster import SlurmCluster, Unavailable, start_cluster

FIXTURES = Path(__file__).parent / "fixtures"

# CSL-Daily is licensed under a signed agreement, so its tree is made up: names follow the
# release's S<sentence>_P<signer>_T<take> pattern, S000005_P0004_T00 is listed but unlabelled
# as in several real releases, and S000009_P0009_T00 is labelled but in no split.
CSL_LABELS = {
    "S000000_P0000_T00": ["今天", "天气", "很", "好"],
    "S000001_P0001_T00": ["我", "喜欢", "手语"],
    "S000002_P0002_T00": ["明天", "见"],
    "S000003_P0003_T00": ["谢谢", "你"],
    "S000009_P0009_T00": ["没有", "划分"],
}
CSL_SPLITS = [
    ("S000001_P0001_T00", "train"),
    ("S000000_P0000_T00", "train"),
    ("S000005_P0004_T00", "train"),
    ("S000002_P0002_T00", "dev"),
    ("S000003_P0003_T00", "test"),
]


@pytest.fixture
def phoenix_root(tmp_path) -> Path:
    """The real PHOENIX-2014-T release sample: one video per split, two real frames each.
    Returns the folder that contains ``PHOENIX-2014-T-release-v3``."""
    return Path(shutil.copytree(FIXTURES / "phoenix14t" / "release-sample", tmp_path / "phoenix"))


@pytest.fixture
def how2sign_root(tmp_path) -> Path:
    """Two real How2Sign clips under ``clips/``, a train CSV written for them (one mojibake
    row, one row whose clip is missing) and a five-row subset of the real val CSV."""
    return Path(shutil.copytree(FIXTURES / "how2sign", tmp_path / "how2sign"))


def write_jpeg_frames(folder: Path, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (8, 8), (30 * i, 80, 160)).save(folder / f"{i:06d}.jpg", quality=90)


def write_csl_daily(root: Path, frames_dir: str = "sentence/frames_512x512", protocol: int = pickle.DEFAULT_PROTOCOL) -> Path:
    info = [
        {"name": name, "length": 3, "label_gloss": ["G"] * len(words), "label_char": list("".join(words)), "label_word": words}
        for name, words in CSL_LABELS.items()
    ]
    labels = root / "sentence_label"
    labels.mkdir(parents=True)
    with open(labels / "csl2020ct_v2.pkl", "wb") as f:
        pickle.dump({"info": info, "gloss_map": ["G"], "char_map": sorted({c for w in CSL_LABELS.values() for c in "".join(w)})}, f, protocol=protocol)
    (labels / "split_1.txt").write_text("name|split\n" + "".join(f"{n}|{s}\n" for n, s in CSL_SPLITS), encoding="utf-8")
    for name in CSL_LABELS:
        write_jpeg_frames(root / frames_dir / name, 3)
    return root


@pytest.fixture
def make_csl_daily(tmp_path):
    """Makes a CSL-Daily tree in the release layout (tiny JPEG frames, label pickle, split
    file); arguments: where the frames go, and the pickle protocol."""
    return lambda frames_dir="sentence/frames_512x512", protocol=pickle.DEFAULT_PROTOCOL: write_csl_daily(
        tmp_path / "csl-daily", frames_dir, protocol
    )


@pytest.fixture
def csl_daily_root(make_csl_daily) -> Path:
    return make_csl_daily()


@pytest.fixture
def manifest_root(tmp_path) -> Path:
    """A folder corpus: train.jsonl (a video, a cut video, a frame folder) and val.csv."""
    root = tmp_path / "mine"
    write_jpeg_frames(root / "frames/b", 2)
    shutil.copytree(FIXTURES / "how2sign/clips", root / "videos")
    (root / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [
        {"id": "a", "video": "videos/_15CDIexNDM_9-5-rgb_front.mp4", "text": "Grüße aus Köln", "signer": "s1", "session": 4},
        {"id": "b", "frames": "frames/b", "text": "zweiter satz"},
        {"id": "c", "video": "videos/_5keJZsmTh0_0-5-rgb_front.mp4", "start": 0.1, "end": 0.5, "text": "dritter"},
    ]), encoding="utf-8")
    (root / "val.csv").write_text(
        "id,video,frames,text,signer,day\n"
        'd1,videos/_15CDIexNDM_9-5-rgb_front.mp4,,"ein satz, mit komma",s2,monday\n'
        "d2,,/abs/frames/d2,,,\n",
        encoding="utf-8",
    )
    return root


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """The session's cluster; skips with the reason when this machine cannot run one, and is
    stopped (jobs cancelled, daemons terminated by PID) at the end, failures included. Its
    folder is not pytest's tmp_path: MUNGE wants every folder above its socket world-traversable."""
    base = Path(tempfile.mkdtemp(prefix="fla-ds-slurm-"))
    try:
        try:
            cluster = start_cluster(base)
        except Unavailable as exc:
            pytest.skip(f"no Slurm cluster on this machine: {exc}")
        try:
            yield cluster
        finally:
            cluster.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


VIDEO_STAGE2 = ["augment.crop_size=28", "augment.keep_ratio=0.1", "augment.max_frames=6", "train.epochs=1", "train.max_steps=1", "eval.limit=2"]


@pytest.fixture(scope="session")
def tiny_stage2(tmp_path_factory) -> dict:
    """A tiny stage-2 QLoRA run, trained once per session for every test that exports or loads
    one (about a minute): synthetic shards, a tiny LLaMA, a stage-1 run, and a stage-2 run
    trained from video on it, one step each. Tests copy what they alter, and put back what
    they move."""
    import sys

    from helpers import TINY_STAGE1, TINY_STAGE2, TRAIN, run, save_tiny_llama, synthetic_shards, train_tiny_tokenizer

    root = tmp_path_factory.mktemp("tiny-stage2")
    shards, tokenizer, llama = synthetic_shards(root), train_tiny_tokenizer(root / "tokenizer"), save_tiny_llama(root / "llama")
    run([sys.executable, TRAIN, "--stage", "1", f"stream.shards={shards}", f"train.tokenizer={tokenizer}", f"train.out={root / 'stage1'}",
         *TINY_STAGE1, "train.epochs=1", "train.max_steps=1", "eval.limit=2"])
    run([sys.executable, TRAIN, "--stage", "2", f"stage2.encoder={root / 'stage1'}", f"train.out={root / 'stage2'}", *TINY_STAGE2,
         f"stage2.model={llama}", f"stream.shards={shards}", *VIDEO_STAGE2])
    return {"shards": shards, "llama": llama, "video": sorted((root / "synth" / "videos").glob("*.mp4"))[0],
            "stage1": root / "stage1" / "step-1", "stage2": root / "stage2" / "step-1"}
