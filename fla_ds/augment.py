"""Per-clip sampling and augmentation: what turns a stored clip into the model's input.

``Augment`` (built from the config's ``augment`` section) is the one object that does it; the
loader calls its CPU half per clip, the stages call ``model_input`` on the device, and its
``fingerprint`` identifies the inputs a feature cache was computed from.

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
With ``stream.decode=gpu`` they do not even hold pixels: the loader ships the kept frames' JPEG
bytes, ``nvjpeg_decoder`` decodes them on the device (torchvision's batched nvJPEG) and
``video_from_frames`` cuts the same boxes into the same uint8 batch the CPU loader makes.
Untested on a GPU until ``fla-ds bench gpu`` runs on one: the CPU tests check everything but
the nvJPEG call (tests/test_frames_decode.py), and nvJPEG's pixels may differ from
libjpeg-turbo's by a few levels (its IDCT and chroma upsampling are its own).
"""
from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable, Sequence

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


def train_crop(width: int, height: int, crop_fraction: float, rng: random.Random, scale_min: float,
               max_rotation: float) -> tuple[tuple[int, int, int, int], list[list[float]]]:
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


def to_model_input(video: torch.Tensor, crop_size: int, affine: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
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
    mean, std = normalisation(video.device, dtype)
    return ((x - mean) / std).reshape(b, t, 3, crop_size, crop_size)


@functools.lru_cache(maxsize=16)
def normalisation(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std as (1, 3, 1, 1) tensors on ``device``, made once per device and
    dtype: a fresh ``torch.tensor(..., device="cuda")`` per micro-batch is a synchronous
    host-to-device copy, a stall in every step. Read-only: callers must not modify them."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=dtype).view(1, 3, 1, 1).to(device)
    std = torch.tensor(IMAGENET_STD, dtype=dtype).view(1, 3, 1, 1).to(device)
    return mean, std


def nvjpeg_decoder() -> Callable[[list[torch.Tensor]], list[torch.Tensor]] | None:
    """torchvision's batched nvJPEG decode on the current CUDA device: (list of uint8 (N,) CPU
    tensors, one JPEG each) -> list of uint8 (3, H, W) RGB tensors on the device. None where it
    cannot run: no CUDA device, or torchvision missing or not importable beside this torch (a
    torchvision built for another torch raises RuntimeError on import, not ImportError)."""
    if not torch.cuda.is_available():
        return None
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except Exception:  # any failure to import means: not available
        return None

    def decode(jpegs: list[torch.Tensor]) -> list[torch.Tensor]:
        device = torch.device("cuda", torch.cuda.current_device())  # the rank's, set after this was built
        return decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)

    return decode


def device_decoder(mode) -> Callable[[list[torch.Tensor]], list[torch.Tensor]] | None:
    """``stream.decode`` (auto, cpu, gpu; a string or fla_ds.schema.Decode) -> the decoder the
    training process runs, or None to decode in the loader workers on the CPU. auto takes
    ``nvjpeg_decoder`` where it can run; gpu without it raises ValueError."""
    mode = getattr(mode, "value", mode)
    if mode not in ("auto", "cpu", "gpu"):
        raise ValueError(f"stream.decode must be auto, cpu or gpu, not {mode!r}")
    decoder = nvjpeg_decoder() if mode != "cpu" else None
    if mode == "gpu" and decoder is None:
        raise ValueError("stream.decode=gpu needs a CUDA device and torchvision with nvJPEG (torchvision.io.decode_jpeg on cuda); "
                         "use stream.decode=auto or cpu")
    return decoder


def video_from_frames(frames: Sequence[torch.Tensor], lengths: Sequence[int], boxes: Sequence[Sequence[int]]) -> torch.Tensor:
    """Decoded whole frames -> the batch the CPU loader makes of them. ``frames``: uint8
    (3, H, W) RGB, clip after clip, all on one device; ``lengths``: frames per clip (B);
    ``boxes``: each clip's crop (left, top, right, bottom), all of one side S. Returns uint8
    (B, max(lengths), S, S, 3) on that device, zeros after each clip's last frame. Raises
    ValueError when the counts or the box sides disagree."""
    if len(frames) != sum(lengths) or len(lengths) != len(boxes):
        raise ValueError(f"{len(frames)} frames for clips of {list(lengths)} frames and {len(boxes)} boxes")
    sides = {(r - left, b - top) for left, top, r, b in boxes}
    if len(sides) != 1 or len({*sides.pop()}) != 1:
        raise ValueError(f"boxes {list(boxes)} are not squares of one side")
    side = boxes[0][2] - boxes[0][0]
    video = torch.empty((len(lengths), max(lengths), side, side, 3), dtype=torch.uint8, device=frames[0].device)
    start = 0
    for row, n, (left, top, right, bottom) in zip(video, lengths, boxes):
        clip = torch.stack(list(frames[start : start + n]))[:, :, top:bottom, left:right]
        row[:n] = clip.permute(0, 2, 3, 1)
        row[n:] = 0
        start += n
    return video


class Augment:
    """What turns a stored clip into model input, from an ``augment`` config section
    (fla_ds/schema.py: AugmentConfig): T/4 frame sampling, the crop, the training warp, the
    resize to ``crop_size`` and ImageNet normalisation. A new augmentation is a field there and
    a step here; the feature cache's fingerprint follows (``fingerprint``).

    The CPU half (``frame_indices``, ``crop``) runs in loader workers per clip with a random
    generator seeded per sample; the device half (``model_input``) runs batched on the training
    device (a PIL warp per frame would cost 3-4x the JPEG decode; docs/benchmarks.md)."""

    def __init__(self, section):
        from omegaconf import OmegaConf

        self.settings = dict(OmegaConf.to_container(section, resolve=True)) if OmegaConf.is_config(section) else dict(vars(section))
        for name, value in self.settings.items():
            setattr(self, name, value)

    def fingerprint(self) -> str:
        """sha256 of the settings: two inputs are the same iff this is."""
        import hashlib
        import json

        return hashlib.sha256(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()

    def frame_indices(self, num_frames: int, rng: random.Random, train: bool) -> list[int]:
        """The frames kept of a clip of ``num_frames``: sorted indices."""
        return sample_frame_indices(num_frames, rng, self.keep_ratio, self.stride_jitter, self.max_frames, train)

    def crop(self, width: int, height: int, rng: random.Random, train: bool) -> tuple[tuple[int, int, int, int], list | None]:
        """(exact-pixel box (left, top, right, bottom) to cut in the loader, the training warp's
        2x3 affine matrix or None in evaluation)."""
        if train:
            return train_crop(width, height, self.crop_fraction, rng, self.crop_scale_min, self.max_rotation)
        return eval_crop(width, height, self.crop_fraction), None

    def model_input(self, video: torch.Tensor, affine: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """uint8 (B, T, H, W, 3) on the device -> normalised (B, T, 3, crop_size, crop_size)."""
        return to_model_input(video, self.crop_size, affine, dtype)
