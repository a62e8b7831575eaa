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
    # ignore_index, not logits[labels != IGNORE_INDEX]: a boolean index has a data-dependent
    # shape, which makes the host wait for the device every micro-batch. Ignored positions
    # contribute nothing to either term of the smoothed loss (torch's definition).
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                           label_smoothing=label_smoothing, reduction="sum")
    return loss, (labels != IGNORE_INDEX).sum()
