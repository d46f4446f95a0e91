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


def ranking_loss(rewards: torch.Tensor, better: torch.Tensor, worse: torch.Tensor, group: torch.Tensor,
                 n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """InstructGPT's K-wise reward-model loss, one value per prompt.

    rewards (N,): one scalar per sequence, every response of a prompt scored in the same forward pass;
    better, worse, group (P,): for each ordered pair, the indices of the better and worse response in
    ``rewards`` and the prompt it belongs to (0..n_groups-1).
    loss(prompt) = mean over its pairs of -log sigmoid(r_better - r_worse): the paper's 1/C(K,2)
    normalisation (with ties, which make no pair, the mean is over the pairs there are), so every prompt
    weighs the same in a batch whatever its K. Returns (per-prompt losses (n_groups,), per-pair
    correctness (P,) as floats).
    """
    margin = rewards[better] - rewards[worse]
    per_pair = -F.logsigmoid(margin.float())
    sums = torch.zeros(n_groups, dtype=per_pair.dtype, device=per_pair.device).index_add(0, group, per_pair)
    counts = torch.bincount(group, minlength=n_groups).clamp(min=1)
    return sums / counts, (margin > 0).float()
