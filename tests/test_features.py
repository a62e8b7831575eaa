"""The stage-2 feature cache: a tiny stage-1 encoder over tiny synthetic shards, extracted for
real (in-process and under torchrun) and streamed back with the real loader."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import collect, free_port, synthetic_shards
from safetensors.torch import save_file

from fla_ds.artifacts import write_manifest
from fla_ds.atomic import sha256_file
from fla_ds.augment import to_model_input
from fla_ds.config import load_config, save_resolved
from fla_ds.features import FeatureError, extract_features, load_encoder
from fla_ds.model import VisualEncoder
from fla_ds.shards import ShardFormatError, iter_raw_samples, load_index
from fla_ds.shards.format import parse_feature_sample
from fla_ds.stream import ShardStream, pick_view

# fp16 keeps 11 significant bits: rounding moves a value by at most 2^-11 (4.9e-4) of itself,
# so cached features may differ from float32 ones by up to that much of the clip's largest
# feature. The test allows twice that: 1e-3 of the feature scale.
RTOL_OF_SCALE = 1e-3


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    """Video shards (24 train, 8 dev clips), a stage-1 checkpoint folder holding a seeded
    VisualEncoder(out_dim=16), and caches: dev with 1 view, train with 2."""
    root = tmp_path_factory.mktemp("features")
    shards = synthetic_shards(root)
    step = root / "step-1"
    step.mkdir()
    torch.manual_seed(0)
    encoder = VisualEncoder(out_dim=16)
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(step / "encoder.safetensors"))
    save_resolved(load_config(None, ["visual.out_dim=16", "augment.crop_size=28", "augment.keep_ratio=0.1", "augment.max_frames=6"]), step)
    write_manifest(step)  # a step folder is complete only with its manifest (fla_ds.artifacts)
    out = root / "cache"
    entries = {
        "dev": extract_features(step, shards, out, split="dev", batch_size=4, num_workers=0),
        "train": extract_features(step, shards, out, split="train", views=2, batch_size=4, num_workers=0, samples_per_shard=5),
    }
    return {"root": root, "shards": shards, "step": step, "out": out, "entries": entries}


def feature_cfg(folder: Path, *overrides: str):
    return load_config(None, [f"stream.shards={folder}", "train.micro_batch=2", *overrides])


def read_cache(folder: Path, split: str) -> dict[tuple[int, str], tuple[dict, np.ndarray]]:
    """{(view, key): (meta, features)} of a split, straight from its shards."""
    out = {}
    for shard in load_index(folder, split)["shards"]:
        path = str(folder / shard["name"])
        for raw in iter_raw_samples(path, payload="features"):
            meta, features = parse_feature_sample(path, raw)
            out[(shard["view"], raw["__key__"])] = (meta, features)
    return out


def test_cached_features_match_the_encoder_run_on_the_fly(assets):
    """Per clip, cache (fp16) vs the encoder in fp32 on the same evaluation-mode batch (of
    another batch size: eval BatchNorm makes a clip's features independent of its batch)."""
    encoder, _ = load_encoder(assets["step"])
    video_cfg = load_config(str(assets["step"] / "config.yaml"), [f"stream.shards={assets['shards']}", "stream.split=dev", "stream.train=false",
                                                                  "train.micro_batch=3", "stream.num_workers=0"])
    cached = {b_id: (f[m], text) for b in collect(ShardStream.from_config(feature_cfg(assets["out"], "stream.split=dev", "stream.train=false")))
              for b_id, f, m, text in zip(b.id, b.features, b.features_mask, b.text)}
    worst, seen = 0.0, 0
    dev = next(encoder.parameters()).device
    with torch.no_grad():
        for batch in ShardStream.from_config(video_cfg):
            features, mask = encoder(to_model_input(batch.video.to(dev), 28, None), batch.video_mask)
            for i, clip in enumerate(batch.id):
                reference = features[i, mask[i]].float().cpu()
                cache, text = cached[clip]
                assert cache.dtype == torch.float16 and cache.shape == reference.shape == (int(batch.video_mask[i].sum()), 16)
                assert text == batch.text[i]
                error = (cache.float() - reference).abs().max().item() / reference.abs().max().item()
                worst, seen = max(worst, error), seen + 1
    assert seen == len(cached) == 8
    assert worst <= RTOL_OF_SCALE, f"cache differs from float32 by {worst:.2e} of the feature scale"
    print(f"max |cache - fp32| / max |fp32| = {worst:.2e}")


def test_index_counts_and_provenance(assets):
    out = assets["out"]
    index = json.loads((out / "index.json").read_text("utf-8"))
    assert index["kind"] == "features" and set(index["splits"]) == {"dev", "train"}
    for split, views in (("dev", 1), ("train", 2)):
        entry, source = index["splits"][split], load_index(assets["shards"], split)
        assert entry == assets["entries"][split]
        assert entry["kind"] == "features" and entry["views"] == views and entry["dim"] == 16 and entry["dtype"] == "float16"
        assert entry["clips"] == source["samples"] and entry["samples"] == views * source["samples"]
        for view in range(views):
            assert sum(s["samples"] for s in entry["shards"] if s["view"] == view) == source["samples"]
        assert entry["source"]["plan_fingerprint"] == source["plan_fingerprint"]
        assert entry["checkpoint"]["encoder_sha256"] == sha256_file(assets["step"] / "encoder.safetensors")
        for s in entry["shards"]:
            assert sha256_file(out / s["name"]) == s["sha256"] and (out / s["name"]).stat().st_size == s["bytes"]
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(s["name"] for e in index["splits"].values() for s in e["shards"])
    assert not list(out.glob(".*.tmp"))


def test_two_views_differ_in_features_not_in_texts(assets):
    cache = read_cache(assets["out"], "train")
    keys = sorted(k for v, k in cache if v == 0)
    assert keys == sorted(k for v, k in cache if v == 1) and len(keys) == 24
    for key in keys:
        (meta0, f0), (meta1, f1) = cache[(0, key)], cache[(1, key)]
        assert (meta0["id"], meta0["text"]) == (meta1["id"], meta1["text"]) and (meta0["view"], meta1["view"]) == (0, 1)
        assert f0.shape[0] != f1.shape[0] or not np.array_equal(f0, f1)
    # Every view is laid out alike: shard s, position i is the same clip.
    entry = assets["entries"]["train"]
    for s0, s1 in zip(*([s for s in entry["shards"] if s["view"] == v] for v in (0, 1))):
        keys0 = [raw["__key__"] for raw in iter_raw_samples(str(assets["out"] / s0["name"]), payload="features")]
        assert keys0 == [raw["__key__"] for raw in iter_raw_samples(str(assets["out"] / s1["name"]), payload="features")]


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_feature_shards_refuse_foreign_and_misshapen_members(tmp_path):
    meta = json.dumps({"id": "a", "text": "x", "num_frames": 2, "dim": 3, "dtype": "float16"}).encode()
    good = np.zeros((2, 3), dtype="<f2").tobytes()
    evil = _tar(tmp_path / "evil.tar", {"a.json": meta, "a.features": good, "a.pyd": b"\x80\x04."})
    with pytest.raises(ShardFormatError, match=r"evil\.tar: member 'a\.pyd' is not one fla_ds writes"):
        list(iter_raw_samples(str(evil), payload="features"))
    short = _tar(tmp_path / "short.tar", {"a.json": meta, "a.features": good[:-2]})
    raw = next(iter_raw_samples(str(short), payload="features"))
    with pytest.raises(ShardFormatError, match=r"short\.tar: member 'a\.features' has 10 bytes, its json says 2 x 3 float16"):
        parse_feature_sample(str(short), raw)
    fp32 = _tar(tmp_path / "fp32.tar", {"a.json": meta.replace(b"float16", b"float32"), "a.features": good})
    with pytest.raises(ShardFormatError, match=r"fp32\.tar: member 'a\.json' says dtype 'float32'"):
        parse_feature_sample(str(fp32), next(iter_raw_samples(str(fp32), payload="features")))
    mixed = _tar(tmp_path / "mixed.tar", {"a.json": meta, "a.frames": b"FLAJ"})
    with pytest.raises(ShardFormatError, match=r"mixed\.tar: sample 'a' lacks its \.features member"):
        list(iter_raw_samples(str(mixed), payload="features"))


@pytest.mark.parametrize("world", [2, 3])
def test_feature_stream_gives_equal_batches_per_rank(assets, world):
    for train in (True, False):
        cfg = feature_cfg(assets["out"], f"stream.train={train}", "stream.num_workers=0")
        per_rank = [collect(ShardStream.from_config(cfg, r, world)) for r in range(world)]
        assert len({len(b) for b in per_rank}) == 1
        ids = [i for batches in per_rank for b in batches for i, ok in zip(b.id, b.valid.tolist()) if ok]
        assert len(ids) == len(set(ids)) and (24 - len(ids) < world * 2 if train else len(ids) == 24)
        for b in per_rank[0]:
            assert b.features.dtype == torch.float16 and b.features_mask.shape == b.features.shape[:2]
            lengths = b.features_mask.sum(1)
            assert all(b.features[i, n:].abs().sum() == 0 for i, n in enumerate(lengths.tolist()))  # padding is zeros
            if not train:
                assert b.view.eq(0).all()  # evaluation reads the centre-crop view


def test_training_reads_one_seeded_view_per_clip_and_resumes_exactly(assets):
    cfg = feature_cfg(assets["out"], "stream.num_workers=2")
    full = ShardStream.from_config(cfg, 0, 1)
    full.set_epoch(3)
    reference = collect(full)
    views = {(k, int(v)) for b in reference for k, v in zip(b.key, b.view)}
    assert {v for _, v in views} == {0, 1} and len(views) == 24  # each clip once, from either view
    cache = read_cache(assets["out"], "train")
    for b in reference:
        for i, (key, view) in enumerate(zip(b.key, b.view.tolist())):
            n = int(b.features_mask[i].sum())
            assert torch.equal(b.features[i, :n], torch.from_numpy(cache[(view, key)][1]))
    assert pick_view(0, 3, (1, 2), 2) == pick_view(0, 3, (1, 2), 2)
    first = ShardStream.from_config(cfg, 0, 1)
    first.set_epoch(3)
    head = collect(first, limit=5)
    resumed = ShardStream.from_config(cfg, 0, 1)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    tail = collect(resumed)
    assert [b.id for b in head + tail] == [b.id for b in reference]
    assert all(torch.equal(a.features, b.features) and torch.equal(a.view, b.view) for a, b in zip(head + tail, reference))


RANKS_SCRIPT = textwrap.dedent("""
    import sys
    from datetime import timedelta
    import torch.distributed as dist
    from fla_ds.features import extract_features

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    extract_features(sys.argv[1], sys.argv[2], sys.argv[3], split="train", batch_size=4, num_workers=0, samples_per_shard=5)
    dist.destroy_process_group()
""")


def test_two_ranks_under_torchrun_extract_the_same_clips_as_one(assets, tmp_path):
    script = tmp_path / "extract_ranks.py"
    script.write_text(RANKS_SCRIPT)
    out = tmp_path / "cache"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(script), str(assets["step"]), str(assets["shards"]), str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    entry = load_index(out, "train")
    assert entry["world_size"] == 2 and {s["name"].split("-")[2] for s in entry["shards"]} == {"r000", "r001"}
    two = {k: v for (view, k), v in read_cache(out, "train").items()}
    one = {k: v for (view, k), v in read_cache(assets["out"], "train").items() if view == 0}
    assert sorted(two) == sorted(one) and len(two) == 24
    for key, (meta, features) in two.items():
        assert meta["text"] == one[key][0]["text"]
        assert np.allclose(features, one[key][1], rtol=0, atol=RTOL_OF_SCALE * np.abs(one[key][1]).max())


def test_ranks_run_one_after_another_skip_the_padding(assets, tmp_path):
    """Without torch.distributed, ranks may run in turn (rank 0 last: it writes the index).
    8 dev clips over 3 ranks: the last rank's plan pads with a repeat, which is not stored."""
    out = tmp_path / "cache"
    for rank in (2, 1, 0):
        entry = extract_features(assets["step"], assets["shards"], out, split="dev", rank=rank, world=3, batch_size=2, num_workers=0)
    ids = [meta["id"] for meta, _ in read_cache(out, "dev").values()]
    assert entry["clips"] == 8 and sorted(ids) == sorted(set(ids)) and len(ids) == 8
    assert [s["samples"] for s in entry["shards"]] == [3, 3, 2]


def test_the_cache_never_overwrites_video_shards(assets):
    with pytest.raises(FeatureError, match="holds video shards"):
        extract_features(assets["step"], assets["shards"], assets["shards"], split="dev", num_workers=0)
