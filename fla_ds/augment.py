"""Per-clip sampling and augmentation, and collation: what the loader does to each sample.

Temporal: keep ``keep_ratio`` of the frames (the paper's T/4). Training draws a random offset
and jitters each kept frame by up to ``stride_jitter`` of the stride; evaluation takes the
centres of equal segments. A cap bounds the frames per clip.

Spatial, split in two so the CPU loader stays as fast as JPEG decoding (a PIL warp per frame
costs 3-4x the decode itself; docs/benchmarks.md): the loader draws every random parameter
(one per clip, the same for all its frames) and cuts an exact-pixel square "canvas" at a
random place; ``to_model_input`` then applies the random resized crop and the small rotation
as one batched ``grid_sample`` on the training device, and normalises. Evaluation cuts the
exact centre crop in the loader and needs no warp. The crop side is ``crop_fraction`` (224/256)
of the frame's short side, so shards built with the default short side 256 give exact 224x224
centre crops, and training crops are scaled around them.

Batches stay uint8 and channels-last until the device (4x less to copy between processes).
"""
from __future__ import annotations

import math
import random
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def sample_frame_indices(num_frames: int, rng: random.Random, keep_ratio: float, jitter: float, max_frames: int, train: bool) -> list[int]:
    n = max(1, round(num_frames * keep_ratio))
    if max_frames > 0:
        n = min(n, max_frames)
    stride = num_frames / n
    if train:
        offset = rng.random()
        picks = [(i + offset + jitter * (rng.random() - 0.5)) * stride for i in range(n)]
    else:
        picks = [(i + 0.5) * stride for i in range(n)]
    return sorted(min(num_frames - 1, max(0, int(p))) for p in picks)


def eval_crop_side(width: int, height: int, crop_fraction: float) -> int:
    short = min(width, height)
    return max(1, min(short, round(short * crop_fraction)))


def center_box(width: int, height: int, side: int) -> tuple[int, int, int, int]:
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def eval_crop(width: int, height: int, crop_fraction: float) -> tuple[int, int, int, int]:
    """The exact-pixel centre crop of evaluation (resized to crop_size on the device only
    where its side differs)."""
    return center_box(width, height, eval_crop_side(width, height, crop_fraction))


def train_crop(width: int, height: int, crop_fraction: float, rng: random.Random, scale_min: float, max_rotation: float) -> tuple[tuple[int, int, int, int], list[list[float]]]:
    """A random canvas (the frame's largest square, at a random place along the long side) and
    the affine matrix, in grid_sample's normalised coordinates, of a random resized and
    rotated crop inside it: area scaled by [scale_min, 1/scale_min] around the evaluation
    crop, aspect within 0.9..1.1, anywhere it fits, rotated by up to max_rotation degrees."""
    canvas = min(width, height)
    left = rng.randint(0, width - canvas)
    top = rng.randint(0, height - canvas)
    side = eval_crop_side(width, height, crop_fraction)
    area = rng.uniform(scale_min, 1.0 / scale_min) if scale_min < 1 else 1.0
    aspect = math.exp(rng.uniform(math.log(0.9), math.log(1.1)))
    cw = min(canvas, side * math.sqrt(area * aspect))
    ch = min(canvas, side * math.sqrt(area / aspect))
    cx = rng.uniform(cw / 2, canvas - cw / 2)
    cy = rng.uniform(ch / 2, canvas - ch / 2)
    angle = math.radians(rng.uniform(-max_rotation, max_rotation))
    cos, sin = math.cos(angle), math.sin(angle)
    theta = [[cos * cw / canvas, -sin * ch / canvas, 2 * cx / canvas - 1], [sin * cw / canvas, cos * ch / canvas, 2 * cy / canvas - 1]]
    return (left, top, left + canvas, top + canvas), theta


def collate_clips(videos: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad (T, H, W, 3) uint8 clips to the longest: (B, T, H, W, 3) and a (B, T) mask, True on
    real frames."""
    lengths = torch.tensor([v.shape[0] for v in videos])
    t_max = int(lengths.max())
    out = torch.zeros((len(videos), t_max, *videos[0].shape[1:]), dtype=torch.uint8)
    for i, v in enumerate(videos):
        out[i, : v.shape[0]] = torch.from_numpy(v)
    mask = torch.arange(t_max)[None, :] < lengths[:, None]
    return out, mask


def to_model_input(video: torch.Tensor, crop_size: int, affine: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (B, T, H, W, 3) on the device -> normalised (B, T, 3, S, S) float: the training
    warp (``affine``: (B, 2, 3), one per clip), a resize where frames are not S x S, and
    ImageNet normalisation."""
    b, t, h, w, _ = video.shape
    x = video.permute(0, 1, 4, 2, 3).reshape(b * t, 3, h, w).to(dtype) / 255.0
    if affine is not None:
        theta = affine.to(device=video.device, dtype=dtype).repeat_interleave(t, dim=0)
        grid = F.affine_grid(theta, [b * t, 3, crop_size, crop_size], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    elif (h, w) != (crop_size, crop_size):
        x = F.interpolate(x, size=(crop_size, crop_size), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN, device=video.device, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=video.device, dtype=dtype).view(1, 3, 1, 1)
    return ((x - mean) / std).reshape(b, t, 3, crop_size, crop_size)
