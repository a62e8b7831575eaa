"""The streaming loader: planning, equal batches per rank, exact resume, and 2 ranks x 2
workers under torchrun on real shards."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from corpus_factory import frames_corpus
from helpers import collect, free_port

from fla_ds.augment import to_model_input
from fla_ds.config import load_config
from fla_ds.shards import build_shards
from fla_ds.stream import Layout, ShardStream, batch_of_step, epoch_order, rank_batches, remaining_order

SCRIPTS = Path(__file__).parent / "scripts"


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory) -> Path:
    """23 samples in shards of 3, 2 and 1 (rejected rows leave shards short)."""
    root = tmp_path_factory.mktemp("stream")
    manifest = frames_corpus(root / "corpus", 23, missing_every=4)
    cfg = load_config(None, [f"corpus.root={manifest}", f"shards.out={root / 'shards'}", "shards.samples_per_shard=3", "shards.short_side=32"])
    summary = build_shards(cfg, progress_bar=False)
    counts = [s["samples"] for s in summary.index["shards"]]
    assert sum(counts) == 23 and len(set(counts)) > 1
    return root / "shards"


def stream_cfg(shards: Path, *overrides: str):
    return load_config(None, [f"stream.shards={shards}", "train.micro_batch=2", "augment.crop_size=28", *overrides])


@pytest.mark.parametrize("world", [1, 2, 3, 8, 40])
@pytest.mark.parametrize("train", [True, False])
def test_every_rank_gets_the_same_batches_and_no_sample_twice(world, train):
    rng = random.Random(world)
    counts = [rng.randint(0, 9) for _ in range(13)]
    order = epoch_order(counts, seed=1, epoch=3, shuffle=True)
    layout = Layout(world, 4, 2)
    per_rank = [rank_batches(order, layout, r, train) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1
    assert len({tuple(len(batch) for batch in b) for b in per_rank}) == 1  # same shapes too
    valid = [ref for b in per_rank for batch in b for ref, ok in batch if ok]
    assert len(valid) == len(set(valid))
    if train:
        assert len(order) - len(valid) < world * 4 and all(ok for b in per_rank for batch in b for _, ok in batch)
    else:
        assert sorted(valid) == sorted(order)


def test_epoch_order_depends_on_seed_and_epoch_only():
    counts = [5, 3, 7, 2]
    assert epoch_order(counts, 0, 1, True) == epoch_order(counts, 0, 1, True)
    assert epoch_order(counts, 0, 1, True) != epoch_order(counts, 0, 2, True)
    assert epoch_order(counts, 0, 1, True) != epoch_order(counts, 1, 1, True)
    assert sorted(epoch_order(counts, 0, 1, True)) == epoch_order(counts, 0, 1, False)


def test_round_robin_steps_visit_each_batch_once():
    for total in range(0, 12):
        for workers in range(1, 5):
            assert sorted(batch_of_step(k, total, workers) for k in range(total)) == list(range(total))


def test_changed_layout_replans_only_what_was_not_consumed():
    order = epoch_order([6, 6, 6, 5], 0, 0, True)
    history = [(Layout(2, 2, 2), 3)]
    rest = remaining_order(order, history, train=True)
    assert len(rest) == len(order) - 2 * 3 * 2 and set(rest) <= set(order)


@pytest.mark.parametrize("train", [True, False])
def test_stream_yields_uint8_batches_with_masks_that_become_model_input(uneven_shards, train):
    cfg = stream_cfg(uneven_shards, "stream.num_workers=0", f"stream.train={train}")
    batch = next(iter(ShardStream.from_config(cfg, 0, 1)))
    video, mask = batch.video, batch.video_mask
    # Frames are 40x32 (short side 32): training keeps the 32x32 canvas for the device-side
    # warp, evaluation the exact 28x28 centre crop (0.875 of 32).
    side = 32 if train else 28
    assert video.dtype == torch.uint8 and video.shape[0] == 2 and video.shape[2:] == (side, side, 3)
    assert mask.shape == video.shape[:2] and mask.dtype == torch.bool
    assert (batch.affine is not None) == train
    lengths = mask.sum(1)
    assert lengths.max() == video.shape[1]
    for i, n in enumerate(lengths.tolist()):
        assert video[i, n:].abs().sum() == 0  # padding is zeros
    assert all(isinstance(t, str) and t for t in batch.text)
    x = to_model_input(video, 28, batch.affine)
    assert x.shape == (2, video.shape[1], 3, 28, 28) and x.dtype == torch.float32
    if not train:  # no warp: exactly the normalised pixels
        mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
        assert torch.allclose(x[0, 0], (video[0, 0].permute(2, 0, 1) / 255.0 - mean) / std)


def test_training_draws_quarter_of_frames_with_augmentation(uneven_shards):
    train = ShardStream.from_config(stream_cfg(uneven_shards, "stream.num_workers=0"), 0, 1)
    evaluation_cfg = stream_cfg(uneven_shards, "stream.num_workers=0", "stream.train=false")
    evaluation = ShardStream.from_config(evaluation_cfg, 0, 1)
    t_batches, e_batches = collect(train), collect(evaluation)
    # Clips have 6..14 frames: a quarter is 2..4 (rounded), never more.
    assert all(2 <= n <= 4 for b in t_batches + e_batches for n in b.video_mask.sum(1).tolist())
    # Evaluation is deterministic; training differs from epoch to epoch.
    assert all(torch.equal(a.video, b.video) for a, b in zip(e_batches, collect(ShardStream.from_config(evaluation_cfg, 0, 1))))
    train.set_epoch(1)
    again = collect(train)
    assert [b.id for b in again] != [b.id for b in t_batches]


def test_resume_mid_epoch_continues_exactly(uneven_shards):
    cfg = stream_cfg(uneven_shards, "stream.num_workers=2")
    full = ShardStream.from_config(cfg, 0, 1)
    full.set_epoch(2)
    reference = collect(full)
    first = ShardStream.from_config(cfg, 0, 1)
    first.set_epoch(2)
    head = collect(first, limit=4)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = ShardStream.from_config(cfg, 0, 1)
    resumed.load_state_dict(state)
    assert len(resumed) == len(reference) - 4
    tail = collect(resumed)
    assert [b.id for b in head + tail] == [b.id for b in reference]
    assert all(torch.equal(a.video, b.video) for a, b in zip(head + tail, reference))


def test_resume_with_other_workers_and_ranks_repeats_nothing(uneven_shards):
    cfg = stream_cfg(uneven_shards, "stream.num_workers=2")
    first = ShardStream.from_config(cfg, 0, 2)
    first.set_epoch(0)
    consumed = [i for b in collect(first, limit=2) for i in b.id]
    other = ShardStream.from_config(cfg, 1, 2)
    other.set_epoch(0)
    consumed += [i for b in collect(other, limit=2) for i in b.id]
    state = first.state_dict()
    new_cfg = stream_cfg(uneven_shards, "stream.num_workers=1")
    rest = []
    for rank in range(3):
        s = ShardStream.from_config(new_cfg, rank, 3)
        s.load_state_dict(state)
        rest += [i for b in collect(s) for i in b.id]
    assert not set(consumed) & set(rest) and len(rest) == len(set(rest))
    assert 23 - len(consumed) - len(rest) < 3 * 2  # only the training remainder is left out


def test_state_of_other_shards_is_refused(uneven_shards):
    stream = ShardStream.from_config(stream_cfg(uneven_shards), 0, 1)
    state = stream.state_dict() | {"fingerprint": "0" * 64}
    with pytest.raises(ValueError, match="other shards"):
        stream.load_state_dict(state)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_two_ranks_two_workers_under_torchrun(uneven_shards, tmp_path, mode):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(SCRIPTS / "stream_ranks.py"), str(uneven_shards), str(tmp_path), "3", mode]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    for key in ("epoch0", "uninterrupted"):
        assert len(ranks[0][key]) == len(ranks[1][key])  # equal batches: no deadlock
        seen = [i for r in ranks for batch in r[key] for i in batch]
        assert len(seen) == len(set(seen))
        if mode == "eval":
            assert len(seen) == 23
        else:
            assert 23 - len(seen) < 2 * 2
    for r in ranks:
        assert len(r["before"]) == 3
        assert r["before"] + r["after"] == r["uninterrupted"]
    assert Counter(len(r["after"]) for r in ranks).most_common(1)[0][1] == 2


def test_inference_collation_pads_with_zeros_after_each_clip():
    """fla_ds.batch.collate_clips (translate, features): each clip's frames, then zeros (only the
    tail is filled: the buffer starts uninitialised), and the mask True on real frames."""
    import numpy as np

    from fla_ds.batch import collate_clips

    rng = np.random.default_rng(0)
    clips = [rng.integers(1, 256, (n, 4, 4, 3), dtype=np.uint8) for n in (3, 5, 1)]
    for _ in range(3):  # fresh buffers may reuse freed memory holding the previous batch
        video, mask = collate_clips(clips)
        assert video.shape == (3, 5, 4, 4, 3) and mask.tolist() == [[True] * 3 + [False] * 2, [True] * 5, [True] + [False] * 4]
        for i, clip in enumerate(clips):
            assert np.array_equal(video[i, : len(clip)].numpy(), clip) and not video[i, len(clip) :].any()
