"""Per-clip sampling and augmentation, and collation: what the loader does to each sample.

Temporal: keep ``keep_ratio`` of the frames (the paper's T/4). Training draws a random offset
and jitters each kept frame by up to ``stride_jitter`` of the stride; evaluation takes the
centres of equal segments. A cap bounds the frames per clip.

Spatial: training takes one random crop (scale jittered around the evaluation crop, small
aspect change, position anywhere it fits) and one small rotation per clip, the same for all
its frames, as a single PIL affine warp per frame (one pass over uint8 pixels; much cheaper
than float tensors on CPU). Evaluation takes the centre crop. The crop side is
``crop_size / 256`` of the frame's short side, so shards built with the default short side 256
give exact 224x224 centre crops.

Normalisation is not done here: batches stay uint8 (4x less to copy between processes) and
``normalize`` runs on the training device.
"""
from __future__ import annotations

import math
import random
from typing import Sequence

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
REFERENCE_SHORT_SIDE = 256


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


def eval_crop_side(width: int, height: int, crop_size: int) -> float:
    short = min(width, height)
    return min(short, short * crop_size / REFERENCE_SHORT_SIDE)


def crop_affine(width: int, height: int, crop_size: int, rng: random.Random, scale_min: float, max_rotation: float, train: bool) -> tuple:
    """PIL AFFINE coefficients mapping output pixels to input pixels for this clip's crop."""
    side = eval_crop_side(width, height, crop_size)
    cw = ch = side
    cx, cy = width / 2, height / 2
    angle = 0.0
    if train:
        area = rng.uniform(scale_min, 1.0 / scale_min) if scale_min < 1 else 1.0
        aspect = math.exp(rng.uniform(math.log(0.9), math.log(1.1)))
        cw = min(width, side * math.sqrt(area * aspect))
        ch = min(height, side * math.sqrt(area / aspect))
        cx = rng.uniform(cw / 2, width - cw / 2)
        cy = rng.uniform(ch / 2, height - ch / 2)
        angle = math.radians(rng.uniform(-max_rotation, max_rotation))
    s = crop_size
    a, b = math.cos(angle) * cw / s, -math.sin(angle) * ch / s
    d, e = math.sin(angle) * cw / s, math.cos(angle) * ch / s
    return (a, b, cx - (a + b) * s / 2, d, e, cy - (d + e) * s / 2)


def warp_frame(image: Image.Image, coeffs: tuple, size: int) -> np.ndarray:
    warped = image.transform((size, size), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR)
    return np.asarray(warped)


def center_crop(image: Image.Image, size: int) -> np.ndarray | None:
    """Exact pixels when the frame allows a centre crop of this side; None otherwise."""
    side = eval_crop_side(image.width, image.height, size)
    if abs(side - size) > 1e-6:
        return None
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)))


def clip_to_tensor(frames: Sequence[np.ndarray]) -> torch.Tensor:
    """(T, H, W, 3) uint8 frames -> (T, 3, H, W) uint8 tensor."""
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()


def collate_clips(videos: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad clips to the longest: (B, T, 3, H, W) uint8 and a (B, T) mask, True on real frames."""
    lengths = torch.tensor([v.shape[0] for v in videos])
    t_max = int(lengths.max())
    out = videos[0].new_zeros((len(videos), t_max, *videos[0].shape[1:]))
    for i, v in enumerate(videos):
        out[i, : v.shape[0]] = v
    mask = torch.arange(t_max)[None, :] < lengths[:, None]
    return out, mask


def normalize(video: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> ImageNet-normalised float, on whatever device video is on."""
    mean = torch.tensor(IMAGENET_MEAN, device=video.device, dtype=dtype).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=video.device, dtype=dtype).view(3, 1, 1)
    return (video.to(dtype) / 255.0 - mean) / std
