"""Stage-1 models: the visual encoder (ResNet-18 + temporal block), Light-T, and the
translator that chains them (video -> loss or text ids)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from fla_ds.model.light_t import LightT
from fla_ds.model.resnet import ResNet18, load_torchvision_checkpoint
from fla_ds.model.visual import MaskedBatchNorm1d, VisualEncoder

__all__ = ["LightT", "MaskedBatchNorm1d", "ResNet18", "SignTranslator", "VisualEncoder", "load_torchvision_checkpoint"]


class SignTranslator(nn.Module):
    """Stage 1 end to end. ``video``: float (B, T, 3, S, S) from ``to_model_input``;
    ``mask``: (B, T) bool, True on real frames. Only ``encoder`` is kept for stage 2."""

    def __init__(self, encoder: VisualEncoder, light_t: LightT):
        super().__init__()
        self.encoder = encoder
        self.light_t = light_t

    def forward(self, video: torch.Tensor, mask: torch.Tensor, target_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss_sum, n_tokens): see ``LightT.forward`` for why the loss is a sum."""
        features, feat_mask = self.encoder(video, mask)
        return self.light_t(features, feat_mask, target_ids)

    @torch.no_grad()
    def generate(self, video: torch.Tensor, mask: torch.Tensor, beam_size: int = 5, max_len: Optional[int] = None, length_penalty: float = 1.0) -> list[list[int]]:
        features, feat_mask = self.encoder(video, mask)
        return self.light_t.generate(features, feat_mask, beam_size=beam_size, max_len=max_len, length_penalty=length_penalty)
