"""Stage-1 models: the visual encoder (ResNet-18 + temporal block), Light-T, and the
translator that chains them (video -> loss or text ids). Stage 2's projector and language-model
backends live beside them (projector.py, llm.py, mbart.py, t5.py; registry: fla_ds/backends.py)."""
from __future__ import annotations

import torch
import torch.nn as nn

from fla_ds.model.light_t import LightT
from fla_ds.model.resnet import ResNet18, load_torchvision_checkpoint
from fla_ds.model.visual import MaskedBatchNorm1d, VisualEncoder, load_frozen_encoder

__all__ = ["LightT", "MaskedBatchNorm1d", "ResNet18", "SignTranslator", "VisualEncoder", "load_frozen_encoder", "load_torchvision_checkpoint"]


class SignTranslator(nn.Module):
    """Stage 1 end to end. ``video``: float (B, T, 3, S, S) from ``to_model_input``;
    ``mask``: (B, T) bool, True on real frames. Only ``encoder`` is kept for stage 2."""

    def __init__(self, encoder: VisualEncoder, light_t: LightT):
        super().__init__()
        self.encoder = encoder
        self.light_t = light_t

    @classmethod
    def from_config(cls, cfg, vocab, pretrained: bool = False) -> SignTranslator:
        """The stage-1 model the config describes (``visual`` and ``light_t`` sections), its
        output layer the size of ``vocab`` (a ``fla_ds.vocab.TrimmedVocab``). ``pretrained``:
        see ``VisualEncoder.from_config`` (True for training, False for a checkpoint being
        loaded)."""
        t = cfg.light_t
        encoder = VisualEncoder.from_config(cfg, pretrained)  # first: the random draws of the original order
        light_t = LightT(
            in_dim=cfg.visual.out_dim, vocab_size=vocab.size, pad_id=vocab.pad_id, bos_id=vocab.bos_id, eos_id=vocab.eos_id,
            d_model=t.d_model, heads=t.heads, encoder_layers=t.encoder_layers, decoder_layers=t.decoder_layers,
            ffn=t.ffn, dropout=t.dropout, adapter_hidden=t.adapter_hidden, max_len=t.max_target_tokens, label_smoothing=t.label_smoothing,
        )
        return cls(encoder, light_t)

    def forward(self, video: torch.Tensor, mask: torch.Tensor, target_ids: torch.Tensor,
                frame_index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss_sum, n_tokens): see ``LightT.forward`` for why the loss is a sum;
        ``frame_index``: see ``VisualEncoder.forward``."""
        features, feat_mask = self.encoder(video, mask, frame_index)
        return self.light_t(features, feat_mask, target_ids)

    @torch.no_grad()
    def generate(self, video: torch.Tensor, mask: torch.Tensor, beam_size: int = 5, max_len: int | None = None, length_penalty: float = 1.0) -> list[list[int]]:
        """Beam search: one row of trimmed-vocabulary ids per clip (decode with the vocabulary)."""
        features, feat_mask = self.encoder(video, mask)
        return self.light_t.generate(features, feat_mask, beam_size=beam_size, max_len=max_len, length_penalty=length_penalty)
