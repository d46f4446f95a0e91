"""Pure tensor functions, shapes in comments. No models, no I/O."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX


def sft_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over response tokens and their count.

    logits (B, T, V), labels (B, T) with IGNORE_INDEX on prompt and padding. Token t predicts
    labels[t+1]. The caller divides by the token count of the whole optimizer step (all micro-batches),
    so batch 8 x accumulation 1 and batch 1 x accumulation 8 take the same step.
    """
    targets = labels[:, 1:]
    flat = logits[:, :-1].reshape(-1, logits.size(-1)).float()
    loss_sum = F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, (targets != IGNORE_INDEX).sum()
