"""The visual encoder: ResNet-18 on every real frame, then one temporal block
(Conv1d + BatchNorm + ReLU), as in FLa-LLM's stage 1. This is the part stage 2 keeps
(``load_frozen_encoder``: from a stage-1 step folder, or the ``encoder/`` of a stage-2 step
folder or bundle)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from fla_ds.model.resnet import FEATURE_DIM, ResNet18, load_torchvision_checkpoint

log = logging.getLogger("fla_ds")


class MaskedBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d over (B, C, T) whose statistics come from real positions only.

    Padding is a large, variable share of a video batch (clips differ in length several
    times over); counting its zeros would pull the batch mean towards 0 and shrink the
    variance, so the same clip would be normalised differently depending on its batch
    mates, and the running statistics used at evaluation would not describe real frames.
    Parameter and buffer names are BatchNorm1d's, so its state dict is a plain BN's."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # In float32: under bf16 autocast a sum over thousands of positions loses too many
        # digits.
        xf = x.float()
        weights = mask.unsqueeze(1).float()  # (B, 1, T)
        if self.training or not self.track_running_stats:
            mean, var = self.masked_moments(xf, weights)
        else:
            mean, var = self.running_mean.float(), self.running_var.float()
        out = (xf - mean[None, :, None]) * torch.rsqrt(var[None, :, None] + self.eps)
        if self.affine:
            out = out * self.weight.float()[None, :, None] + self.bias.float()[None, :, None]
        return (out * weights).to(x.dtype)

    def masked_moments(self, x: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and biased variance per channel over real positions; updates the running
        statistics (with the unbiased variance, as nn.BatchNorm does) when training."""
        count = weights.sum().clamp(min=1)
        mean = (x * weights).sum(dim=(0, 2)) / count
        var = (((x - mean[None, :, None]) ** 2) * weights).sum(dim=(0, 2)) / count
        if self.training and self.track_running_stats:
            self.update_running_stats(mean.detach(), var.detach() * count / (count - 1).clamp(min=1))
        return mean, var

    @torch.no_grad()
    def update_running_stats(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        self.num_batches_tracked += 1
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased_var.to(self.running_var.dtype), factor)


class TemporalBlock(nn.Module):
    """The paper's one temporal block: Conv1d + BatchNorm + ReLU, padding kept at zero
    before the convolution (so a clip's last frames see the same zeros whether or not it is
    padded) and after the block."""

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd to keep the length, got {kernel_size}")
        self.conv = nn.Conv1d(in_dim, out_dim, kernel_size, padding=kernel_size // 2)
        self.bn = MaskedBatchNorm1d(out_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T, in_dim), (B, T) -> (B, T, out_dim)."""
        x = x.masked_fill(~mask.unsqueeze(-1), 0.0).transpose(1, 2)
        x = F.relu(self.bn(self.conv(x), mask))
        return x.transpose(1, 2)


class VisualEncoder(nn.Module):
    """Normalised video (B, T, 3, S, S) and its (B, T) mask (True on real frames, from
    ``fla_ds.augment.to_model_input`` and ``collate_clips``) -> (features (B, T, out_dim),
    mask): zeros on padded positions.

    ``pretrained``: a torchvision ResNet-18 checkpoint (.safetensors/.pth) for the CNN, or
    None for torchvision's random initialisation. Set ``gradient_checkpointing = True`` to
    recompute the CNN stages in the backward pass (activation memory of ~frames x 224^2
    ResNet-18 dominates stage 1). ``channels_last``: the frames enter the CNN in channels-last
    memory layout (cuDNN's fast layout on tensor cores; the weights keep theirs, which ZeRO's
    flat buffers would undo anyway); the same outputs within float rounding."""

    def __init__(self, out_dim: int = 1024, kernel_size: int = 5, pretrained: str | None = None, channels_last: bool = False):
        super().__init__()
        self.cnn = ResNet18(num_classes=None)
        self.temporal = TemporalBlock(FEATURE_DIM, out_dim, kernel_size)
        self.out_dim = out_dim
        self.gradient_checkpointing = False
        self.channels_last = channels_last
        if pretrained:
            ignored = load_torchvision_checkpoint(self.cnn, pretrained)
            log.info("visual encoder: ImageNet ResNet-18 weights loaded from %s (ignored: %s)", pretrained, ", ".join(ignored) or "nothing")

    @classmethod
    def from_config(cls, cfg, pretrained: bool = False) -> VisualEncoder:
        """The encoder the config's ``visual`` section describes. ``pretrained``: the CNN starts
        from the ImageNet checkpoint ``visual.pretrained`` names (stage-1 training); otherwise
        the weights are about to be replaced by a checkpoint's, and that file need not exist
        (nor be read) where the checkpoint is loaded."""
        v = cfg.visual
        if pretrained and not v.pretrained:  # said only where it is true: stage 1 starting from scratch
            log.info("visual encoder: ResNet-18 randomly initialised (no visual.pretrained checkpoint given)")
        channels_last = getattr(v, "channels_last", None)
        channels_last = torch.cuda.is_available() if channels_last is None else bool(channels_last)
        return cls(out_dim=v.out_dim, kernel_size=v.temporal_kernel, pretrained=(v.pretrained or None) if pretrained else None,
                   channels_last=channels_last)

    def frame_features(self, video: torch.Tensor, frame_index: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """ResNet-18 on the real frames only (padding can be a third of a batch: no compute
        spent on it, and no padding in the CNN's BatchNorm statistics); (B, T, 512) with
        zeros on padding. ``frame_index``: long (N_real,), flat positions b * T + t of the real
        frames; ``shape``: (B, T). Gathering and scattering by index has a shape known in
        advance: no host sync (a boolean mask would need one, for its count)."""
        frames = video.flatten(0, 1).index_select(0, frame_index)  # (N_real, 3, S, S)
        if self.channels_last:
            frames = frames.contiguous(memory_format=torch.channels_last)
        feats = self.cnn.forward_features(frames, gradient_checkpointing=self.gradient_checkpointing and self.training)
        out = feats.new_zeros(shape.numel(), feats.shape[-1]).index_copy(0, frame_index, feats)
        return out.view(*shape, feats.shape[-1])

    def forward(self, video: torch.Tensor, mask: torch.Tensor, frame_index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``frame_index``: long (N_real,) on the device, ``real_frame_index`` of ``mask``
        computed on the host (training: fla_ds/stage1.py); None finds it from ``mask`` (one
        host sync: evaluation and inference)."""
        mask = mask.to(device=video.device, dtype=torch.bool)
        if frame_index is None:
            frame_index = real_frame_index(mask)
        return self.temporal(self.frame_features(video, frame_index, mask.shape), mask), mask


def real_frame_index(mask: torch.Tensor) -> torch.Tensor:
    """long (N_real,): the flat positions b * T + t where the (B, T) ``mask`` is True, in order
    (a host sync when ``mask`` is on a GPU)."""
    return mask.reshape(-1).nonzero().squeeze(1)


def load_frozen_encoder(step_dir: str | os.PathLike, dtype: torch.dtype) -> tuple[VisualEncoder, object]:
    """The stage-1 encoder in eval mode (BatchNorm running statistics, so a clip's features do
    not depend on its batch mates), without gradients, on this process's device in ``dtype``,
    and the stage-1 config that built it, from ``step_dir``: a stage-1 step folder, or the
    ``encoder/`` of a stage-2 step folder or bundle (``config.yaml`` + ``encoder.safetensors``).
    The caller verifies the folder's manifest (``fla_ds.artifacts.verify_folder``). Raises
    ArtifactError naming ``encoder.safetensors`` when it is not intact safetensors or does not
    fit the encoder the config builds, ConfigError for a config outside the schema."""
    from fla_ds.artifacts import load_safetensors, load_state
    from fla_ds.config import load_config
    from fla_ds.distributed import device

    step_dir = Path(step_dir)
    enc_cfg = load_config(str(step_dir / "config.yaml"))
    encoder = VisualEncoder.from_config(enc_cfg)
    weights = step_dir / "encoder.safetensors"
    load_state(encoder, load_safetensors(weights), weights)
    log.info("visual encoder: the trained stage-1 encoder from %s (frozen)", weights)
    encoder.requires_grad_(False)
    return encoder.eval().to(device=device(), dtype=dtype), enc_cfg
