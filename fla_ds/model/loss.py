"""The token loss every stage-2 language model returns: summed over target tokens, with their
count, so that the training loop can divide by the count of all ranks (fla_ds/trainer.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
"""Label of a position that is not a target token (the loss skips it)."""


def target_token_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss_sum, n_tokens)``: cross-entropy SUMMED over the positions whose label is not
    IGNORE_INDEX, and how many there are.

    logits: float (..., V) aligned with labels: long (...). Computed in float32 whatever the
    logits' dtype. With ``label_smoothing`` eps, torch's definition: (1 - eps) NLL + eps x the
    mean over the vocabulary of -log p; ignored positions contribute nothing. Hugging Face's
    own loss is a per-batch mean, which would weigh tokens unequally across batches and ranks."""
    counted = labels != IGNORE_INDEX
    loss = F.cross_entropy(logits[counted].float(), labels[counted], label_smoothing=label_smoothing, reduction="sum")
    return loss, counted.sum()
