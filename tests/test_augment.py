"""Temporal sampling and the spatial crop/warp, against what they must guarantee."""
from __future__ import annotations

import math
import random

import pytest
import torch

from fla_ds.augment import eval_crop, sample_frame_indices, to_model_input, train_crop


@pytest.mark.parametrize("frames", [1, 3, 16, 116, 475])
def test_a_quarter_of_the_frames_in_order_within_range(frames):
    for train in (True, False):
        for seed in range(20):
            idx = sample_frame_indices(frames, random.Random(seed), 0.25, 0.5, 300, train)
            assert len(idx) == max(1, round(frames / 4))
            assert idx == sorted(idx) and 0 <= idx[0] and idx[-1] < frames


def test_evaluation_sampling_is_uniform_and_training_varies():
    assert sample_frame_indices(16, random.Random(0), 0.25, 0.5, 300, False) == [2, 6, 10, 14]
    draws = {tuple(sample_frame_indices(116, random.Random(s), 0.25, 0.5, 300, True)) for s in range(10)}
    assert len(draws) == 10


def test_the_frame_cap_holds():
    assert len(sample_frame_indices(1000, random.Random(0), 0.25, 0.5, 64, True)) == 64


def test_eval_crop_is_the_centre_224_of_256_frames():
    assert eval_crop(256, 317, 0.875) == (16, 46, 240, 270)


def test_train_crop_stays_inside_the_frame_and_rotates_a_little():
    for seed in range(200):
        box, theta = train_crop(256, 317, 0.875, random.Random(seed), 0.8, 5.0)
        left, top, right, bottom = box
        assert right - left == bottom - top == 256 and 0 <= top and bottom <= 317
        (a, b, tx), (c, d, ty) = theta
        angle = math.degrees(math.atan2(c, a))
        assert abs(angle) <= 5.0 + 1e-9
        # The crop's corners (before rotation) lie in the canvas: |t| + half extent <= 1.
        half_w, half_h = math.hypot(a, c), math.hypot(b, d)
        assert abs(tx) + half_w <= 1 + 1e-9 and abs(ty) + half_h <= 1 + 1e-9
        assert 0.75 < half_w / (224 / 256) < 1.25


def test_identity_warp_reproduces_the_frame():
    video = torch.randint(0, 256, (1, 2, 8, 8, 3), dtype=torch.uint8)
    identity = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    assert torch.allclose(to_model_input(video, 8, identity), to_model_input(video, 8, None), atol=1e-5)


def test_normalisation_constants_are_made_once_per_device_and_dtype():
    from fla_ds.augment import IMAGENET_MEAN, IMAGENET_STD, normalisation, to_model_input

    mean, std = normalisation(torch.device("cpu"), torch.float32)
    assert normalisation(torch.device("cpu"), torch.float32)[0] is mean  # no new host-to-device copy per micro-batch
    video = torch.randint(0, 256, (2, 3, 8, 8, 3), dtype=torch.uint8)
    expected = (video.permute(0, 1, 4, 2, 3).float() / 255.0 - torch.tensor(IMAGENET_MEAN).view(1, 1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 1, 3, 1, 1)
    assert torch.allclose(to_model_input(video, 8), expected, atol=1e-6)
    assert torch.equal(mean.flatten(), torch.tensor(IMAGENET_MEAN)) and torch.equal(std.flatten(), torch.tensor(IMAGENET_STD))
