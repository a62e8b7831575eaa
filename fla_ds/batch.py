"""What the loader yields: one typed batch per step, video or features.

Batches stay on the CPU, uint8 and channels-last until the device (4x less to copy between
processes than float); ``fla_ds.augment.Augment.model_input`` makes the model's input from a
video batch on the device, ``prepare_features`` the visual features from either kind.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class VideoBatch:
    """B clips of up to T frames, cut to the crop box in the loader (H = W = the box side).

    video: uint8 (B, T, H, W, 3), RGB, zero on padding frames; video_mask: bool (B, T), True on
    real frames; affine: float32 (B, 2, 3), the training warp per clip in grid_sample's
    normalised coordinates, None in evaluation; text: the B target sentences; id: the samples'
    corpus ids; key: their shard keys; valid: bool (B,), False on the padding repeats that make
    every rank's evaluation batches equal; step, epoch: the loader's position (the batch's
    index in this rank's epoch, and the epoch)."""

    video: torch.Tensor
    video_mask: torch.Tensor
    affine: torch.Tensor | None
    text: list[str]
    id: list[str]
    key: list[str]
    valid: torch.Tensor
    step: int
    epoch: int


@dataclass
class FeatureBatch:
    """B clips as the frozen stage-1 encoder's features, read from a feature cache.

    features: float16 (B, T, D), zero on padding; features_mask: bool (B, T), True on real
    positions; view: long (B,), which stored view of each clip (0 = the evaluation crop); the
    other fields as in VideoBatch."""

    features: torch.Tensor
    features_mask: torch.Tensor
    view: torch.Tensor
    text: list[str]
    id: list[str]
    key: list[str]
    valid: torch.Tensor
    step: int
    epoch: int


Batch = VideoBatch | FeatureBatch


def collate_clips(videos: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad (T, H, W, 3) uint8 clips to the longest: (B, T, H, W, 3) and a (B, T) mask, True on
    real frames."""
    lengths = torch.tensor([v.shape[0] for v in videos])
    t_max = int(lengths.max())
    out = torch.empty((len(videos), t_max, *videos[0].shape[1:]), dtype=torch.uint8)
    for i, v in enumerate(videos):
        out[i, : v.shape[0]] = torch.from_numpy(v)
        out[i, v.shape[0] :] = 0  # only the padded tail: a whole-batch fill costs as much as the copy
    mask = torch.arange(t_max)[None, :] < lengths[:, None]
    return out, mask


def collate_features(arrays: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad (T, D) float16 features to the longest: (B, T, D) with zeros on padding (as the
    encoder leaves them) and a (B, T) mask, True on real positions."""
    lengths = torch.tensor([a.shape[0] for a in arrays])
    out = torch.zeros((len(arrays), int(lengths.max()), arrays[0].shape[1]), dtype=torch.float16)
    for i, a in enumerate(arrays):
        out[i, : a.shape[0]] = torch.from_numpy(a)
    return out, torch.arange(out.shape[1])[None, :] < lengths[:, None]


def prepare_features(batch: Batch, encoder, augment, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The visual features of a batch on ``device``: (B, T, D) ``dtype`` and a (B, T) bool
    mask. A feature batch is read as is; a video batch goes through ``augment.model_input`` and
    the frozen ``encoder`` (no gradients). The one device-side entry point of stage 2, feature
    extraction and inference."""
    if isinstance(batch, FeatureBatch):
        return batch.features.to(device, dtype), batch.features_mask.to(device)
    video = augment.model_input(batch.video.to(device, non_blocking=True), batch.affine, dtype)
    with torch.no_grad():
        return encoder(video, batch.video_mask.to(device))
