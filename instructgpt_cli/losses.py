"""Pure tensor functions, shapes in comments. No models, no I/O."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .batches import IGNORE_INDEX


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


def kwise_dpo_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, better: torch.Tensor, worse: torch.Tensor,
                   group: torch.Tensor, n_groups: int, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO's loss (Rafailov et al. 2023, eq. 7) over a ranking's pairs, one value per prompt, as
    :func:`ranking_loss` takes the reward model's: the implicit reward of a response is
    r = beta * (log pi(y) - log pi_ref(y)), and loss(prompt) = mean over its pairs of
    -log sigmoid(r_better - r_worse).

    policy_logps, ref_logps (N,): each sequence's summed response-token log-prob under the policy and the
    frozen reference, every response of a prompt computed once; better, worse, group (P,): as in
    :func:`ranking_loss`. Returns (per-prompt losses (n_groups,), implicit rewards of the better (P,) and of
    the worse response (P,)), all fp32; K=2 is TRL's sigmoid DPO loss of the one pair."""
    rewards = beta * (policy_logps.float() - ref_logps.float())  # (N,)
    chosen, rejected = rewards[better], rewards[worse]
    per_pair = -F.logsigmoid(chosen - rejected)
    sums = torch.zeros(n_groups, dtype=per_pair.dtype, device=per_pair.device).index_add(0, group, per_pair)
    counts = torch.bincount(group, minlength=n_groups).clamp(min=1)
    return sums / counts, chosen, rejected


# ---------------------------------------------------------------- PPO (shapes: B responses, T response tokens)


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def masked_mean(x: torch.Tensor, mask: torch.Tensor, sum_over_ranks=_same) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1. x, mask (B, T). ``sum_over_ranks`` sums a scalar over
    processes (``distributed.sum_over_ranks``; the identity for one), which makes the mean global."""
    return sum_over_ranks((x * mask).sum()) / sum_over_ranks(mask.sum()).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, sum_over_ranks=_same) -> torch.Tensor:
    """Unbiased variance over masked positions (Bessel-corrected, as lm-human-preferences does)."""
    mean = masked_mean(x, mask, sum_over_ranks)
    n = sum_over_ranks(mask.sum())
    var = masked_mean((x - mean) ** 2, mask, sum_over_ranks)
    return var * n / (n - 1).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, sum_over_ranks=_same) -> torch.Tensor:
    """Normalise ``x`` to mean 0, variance 1 over masked positions (B, T); masked-out entries become 0.
    With ``sum_over_ranks`` the moments are those of every process's batch together, so a rollout split over ranks
    whitens as one batch."""
    mean, var = masked_mean(x, mask, sum_over_ranks), masked_var(x, mask, sum_over_ranks)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def kl_penalized_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                         mask: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: -beta * (log pi - log pi_SFT) at every response token, plus the reward-model
    score at the last real token (Ziegler et al. 2019; InstructGPT eq. 2).

    scores (B,), logprobs, ref_logprobs, mask (B, T). Returns (rewards (B, T), kl (B, T)), both zero
    outside the mask.
    """
    kl = (logprobs - ref_logprobs) * mask
    rewards = -beta * kl
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rewards = rewards.clone()
    rewards[torch.arange(len(scores), device=scores.device), last] += scores
    return rewards * mask, kl


def gae(values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens (B, T) each.

    delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}; values after the last
    real token count as 0 (the episode ended). Returns (advantages, returns = advantages + values), zero
    outside the mask. InstructGPT uses gamma = 1, lam = 0.95.
    """
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    T = rewards.size(1)
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        advantages[:, t] = last
    return advantages, (advantages + values) * mask


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate, a masked mean over response tokens (B, T) each (Schulman et al. 2017).

    Returns (loss, stats): ratio mean, clip fraction and approx-KL 0.5 * E[(log pi - log pi_old)^2].
    """
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"ratio": masked_mean(ratio, mask), "clipfrac": masked_mean((clipped > unclipped).float(), mask),
                 "approxkl": 0.5 * masked_mean(log_ratio ** 2, mask)}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float) -> tuple[torch.Tensor, dict]:
    """Clipped value loss 0.5 * max((V - R)^2, (clip(V, V_old +- clip) - R)^2), masked mean (B, T) each."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped_sq = (values - returns) ** 2
    clipped_sq = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_sq, clipped_sq), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped_sq > unclipped_sq).float(), mask)}
    return loss, stats


def lm_targets(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Next-token targets (B, L-1) of right-padded text ``input_ids``, ``attention_mask`` (B, L): position t
    predicts token t+1, IGNORE_INDEX where that token is padding."""
    return input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, IGNORE_INDEX)


def adaptive_kl_beta(beta: float, kl: float, target: float, horizon: int, n_steps: int) -> float:
    """Ziegler et al. (2019)'s proportional controller: move beta so the KL approaches ``target``. A KL that
    is not finite says nothing about the distance to the target: beta stays (``min(0.2, nan)`` is 0.2, so
    the clip alone would raise it by the largest step)."""
    if not math.isfinite(kl):
        return beta
    error = max(-0.2, min(0.2, kl / target - 1.0))
    return beta * (1.0 + error * n_steps / horizon)


# ---------------------------------------------------------------- LM head and cross-entropy, chunked

CHUNK_BYTES = 2**25  # fp32 logits of one chunk of rows: 32 MiB (170 rows of a 49K vocabulary)


def chunk_rows(vocab: int) -> int:
    """Rows per chunk of :func:`linear_cross_entropy_sum`: fp32 logits of about ``CHUNK_BYTES``."""
    return max(1, CHUNK_BYTES // (4 * vocab))


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             rows: int | None = None) -> torch.Tensor:
    """Summed cross-entropy of fp32 logits ``hidden @ weight.T`` against ``targets``, rows with IGNORE_INDEX
    skipped: what ``F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")`` gives,
    computed ``rows`` rows at a time (default :func:`chunk_rows`).

    hidden (N, H), weight (V, H) (an LM head), targets (N,). Full-vocabulary logits are the largest tensor of
    an LM loss (2048 tokens x 49K vocabulary are 400 MB in fp32, and autograd keeps them and their softmax
    for the backward); here only one chunk's exist at a time. The gradients are computed chunk by chunk in
    the forward (the softmax minus the one-hot target, times the head), so the backward keeps no logits
    and recomputes none (Liger-Kernel's fused linear cross-entropy does the same, Hsu et al. 2024)."""
    rows = rows or chunk_rows(weight.size(0))
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropySum.apply(hidden, weight, targets, rows)
    return _chunked_cross_entropy(hidden, weight, targets, rows, False, False)[0]


def _chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: int,
                           need_hidden: bool, need_weight: bool) -> tuple:
    """(summed loss, its gradient for ``hidden`` or None, for ``weight`` or None), ``rows`` rows at a time."""
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.zeros_like(hidden) if need_hidden else None
    # accumulated over chunks in fp32 whatever the weight's dtype (one matmul would accumulate in fp32 too)
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
    in_place = hidden.dtype == torch.float32 and not torch.is_autocast_enabled(hidden.device.type)
    for start in range(0, hidden.size(0), rows):
        h, t = hidden[start:start + rows], targets[start:start + rows]
        keep = t != IGNORE_INDEX
        safe = t.masked_fill(~keep, 0)
        logits = F.linear(h, weight)
        head_dtype = logits.dtype  # the dtype F.linear's backward gets its gradient in (bf16 under autocast)
        logits = logits.float()
        lse = torch.logsumexp(logits, -1)
        total += ((lse - logits.gather(1, safe[:, None])[:, 0]) * keep).sum()
        if need_hidden or need_weight:
            # d(summed CE)/d(logits) = softmax - one_hot(target), 0 on ignored rows; in place of the logits
            d = logits.sub_(lse[:, None]).exp_()
            d[torch.arange(len(t), device=d.device), safe] -= 1.0
            d = d.mul_(keep[:, None]).to(head_dtype)
            if need_hidden:
                grad_hidden[start:start + rows] = d @ weight
            if need_weight:
                if in_place:
                    grad_weight.addmm_(d.t(), h)
                else:
                    grad_weight += (d.t() @ h).float()
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    return total, grad_hidden, grad_weight


class _LinearCrossEntropySum(torch.autograd.Function):
    """:func:`linear_cross_entropy_sum` with its gradients computed in the forward, chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, rows):
        total, *ctx.grads = _chunked_cross_entropy(hidden, weight, targets, rows, *ctx.needs_input_grad[:2])
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.grads
        del ctx.grads  # a second backward through this graph would need them: autograd forbids one anyway
        # scaled in place: no second copy of a vocabulary-sized gradient
        return (None if grad_hidden is None else grad_hidden.mul_(grad_total.to(grad_hidden.dtype)),
                None if grad_weight is None else grad_weight.mul_(grad_total.to(grad_weight.dtype)), None, None)
