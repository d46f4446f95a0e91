"""One PPO iteration's work on its models, after sampling: score the rollout (old and reference log-probs,
values, reward-model scores; KL-penalised rewards, GAE advantages and returns), then the clipped policy and
value updates over shuffled minibatches, each optimizer step with PPO-ptx's pretraining term added. The
models and the scored rollout travel as typed records (:class:`PPOModels`, :class:`Scored`)."""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch

from .. import distributed
from ..batches import pad_right
from ..config import PPOConfig
from ..forward import last_token_scores, lm_loss_sum, response_logprobs, token_values, trunk_states
from ..losses import gae, kl_penalized_rewards, masked_mean, masked_whiten, policy_loss, value_loss
from ..rollout import Rollout
from ..train import optimizer_step_by_group, stream_indices


@dataclass
class PPOModels:
    """The four models of PPO. From :func:`load_models` they are modules; from :func:`runners` they are
    runners (``distributed.wrap``): ``models.policy(fn, ...)`` is ``fn(policy, ...)``. The reference and the
    reward model run under their contexts: with LoRA they are the policy and the value model with adapters
    disabled (``disable_adapter``), so no model is held twice; without, the contexts do nothing."""

    policy: Any  # trained, from the SFT model
    value: Any  # trained, from the reward model
    reference: Any  # frozen: the SFT model, pi_SFT of the KL penalty
    reward: Any  # frozen: the reward model r_theta
    reference_ctx: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    reward_ctx: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    # layers below the adapters (LoRA on the top layers only): run once per rollout for both uses of a model
    # (``frozen_layers``); 0 = none cached
    frozen_policy: int = 0
    frozen_value: int = 0


class Scored(NamedTuple):
    """A rollout as :func:`score_rollout` scored it (cf. torchtune's ``Trajectory``). B: this rank's
    responses; T: response positions (``Rollout.response_mask``); L: query + response tokens
    (``Rollout.query_response``); H: the model's hidden size. (B, T) tensors are zero outside the mask."""

    logprobs: torch.Tensor  # (B, T) the policy's log-probs at the sampling temperature: the ratio's old log-probs
    ref_logprobs: torch.Tensor  # (B, T) the reference's, at the same temperature
    values: torch.Tensor  # (B, T) the value model's, before each response token
    scores: torch.Tensor  # (B,) the reward model's at the last real token, as it said them (objective/scores)
    rewards: torch.Tensor  # (B, T) -beta * kl at every token, plus at the last real one the score clipped to
    # +-reward_clip, less missing_eos_penalty where the response has no EOS
    kl: torch.Tensor  # (B, T) log pi - log pi_SFT per token
    advantages: torch.Tensor  # (B, T) GAE, whitened over all ranks' responses with whiten_advantages
    returns: torch.Tensor  # (B, T) GAE advantages (before whitening) + values: the value model's targets
    policy_trunk: torch.Tensor | None  # (B, L, H) the output of the policy's frozen layers; None when not cached
    value_trunk: torch.Tensor | None  # (B, L, H) the value model's
    seconds: dict[str, float]  # where scoring's time went: frozen (when cached), policy, ref, value, reward


def micro(indices: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [indices[i:i + size] for i in range(0, len(indices), size)]


def trunk(frozen: int, states: torch.Tensor | None, idx: torch.Tensor | None = None) -> tuple[int, torch.Tensor] | None:
    """The cached output of a model's ``frozen`` lowest layers as the forwards take it (rows ``idx``)."""
    if not frozen:
        return None
    return frozen, states if idx is None else states[idx]


class Laps:
    """Seconds per named part of a loop, each lap measured from the end of the previous one."""

    def __init__(self, parts: tuple[str, ...]):
        self.seconds = dict.fromkeys(parts, 0.0)
        self.t = time.perf_counter()

    def start(self) -> None:
        self.t = time.perf_counter()

    def lap(self, part: str) -> None:
        now = time.perf_counter()
        self.seconds[part] += now - self.t
        self.t = now


def score_rollout(models: PPOModels, ro: Rollout, cfg: PPOConfig, beta: float, batch: int) -> Scored:
    """Old log-probs, reference log-probs, values, scores; then rewards, advantages and returns (B, T).
    ``models`` are runners (:func:`runners`).

    Policy and value score in eval mode, as generation samples (``ppo_update`` puts them back in train
    mode): whatever dropout a model carries, the old log-probs are those of the policy that sampled.
    Under ``distributed.no_autograd`` (``inference_mode`` in one process), the results cloned out of it,
    since the PPO losses save some of them for their backward."""
    models.policy.eval(), models.value.eval()
    with distributed.no_autograd():
        sc = _score_rollout(models, ro, cfg, beta, batch)
    return Scored(*(v.clone() if torch.is_tensor(v) else v for v in sc))


def _score_rollout(models: PPOModels, ro: Rollout, cfg: PPOConfig, beta: float, batch: int) -> Scored:
    out, seconds = model_outputs(models, ro, cfg.temperature, batch)
    mask = ro.response_mask.float()
    scores = out["scores"].clone()
    if cfg.reward_clip > 0:
        scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
    scores = scores - cfg.missing_eos_penalty * (~ro.has_eos).float()  # a response must end
    rewards, kl = kl_penalized_rewards(scores, out["logprobs"], out["ref_logprobs"], mask, beta)
    advantages, returns = gae(out["values"], rewards, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:  # with the mean and variance of every rank's responses together
        advantages = masked_whiten(advantages, mask, total=distributed.total)
    return Scored(out["logprobs"], out["ref_logprobs"], out["values"], out["scores"], rewards, kl, advantages, returns,
                  out.get("policy_trunk"), out.get("value_trunk"), seconds)


def model_outputs(models: PPOModels, ro: Rollout, temperature: float,
                  batch: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Every model's outputs over the rollout, ``batch`` responses at a time (:func:`score_micro_batch`),
    concatenated, and the seconds each model took."""
    laps = Laps(("frozen", "policy", "ref", "value", "reward"))
    parts: dict[str, list[torch.Tensor]] = {}
    for idx in micro(torch.arange(len(ro.lengths)), batch):
        laps.start()
        for key, value in score_micro_batch(models, ro, idx, temperature, laps).items():
            parts.setdefault(key, []).append(value)
    if not (models.frozen_policy or models.frozen_value):
        del laps.seconds["frozen"]
    return {k: torch.cat(v) for k, v in parts.items()}, laps.seconds


def score_micro_batch(models: PPOModels, ro: Rollout, idx: torch.Tensor, temperature: float,
                      laps: Laps) -> dict[str, torch.Tensor]:
    """Rows ``idx`` of the rollout through the four models: the frozen layers' outputs first where they
    are cached (``policy_trunk``, ``value_trunk``: the reference reuses the policy's, the reward model the
    value model's), then ``logprobs``, ``ref_logprobs``, ``values`` (B, T) and ``scores`` (B,)."""
    qr, mask = ro.query_response[idx], ro.attention_mask[idx]
    out = {}
    if models.frozen_policy:
        out["policy_trunk"] = models.policy(trunk_states, models.frozen_policy, qr, mask)
    if models.frozen_value:
        out["value_trunk"] = models.value(trunk_states, models.frozen_value, qr, mask)
    policy_trunk = trunk(models.frozen_policy, out.get("policy_trunk"))
    value_trunk = trunk(models.frozen_value, out.get("value_trunk"))
    laps.lap("frozen")
    out["logprobs"] = models.policy(response_logprobs, qr, mask, ro.context_len, temperature, False, policy_trunk)[0]
    laps.lap("policy")
    with models.reference_ctx():
        out["ref_logprobs"] = models.reference(response_logprobs, qr, mask, ro.context_len, temperature, False,
                                               policy_trunk)[0]
    laps.lap("ref")
    out["values"] = models.value(token_values, qr, mask, ro.context_len, value_trunk)
    laps.lap("value")
    with models.reward_ctx():
        out["scores"] = models.reward(last_token_scores, qr, mask, ro.context_len, ro.lengths[idx], value_trunk)
    laps.lap("reward")
    return out


def non_finite(sc: Scored) -> tuple[str, float] | None:
    """(what, value) of the first rollout quantity with a NaN or inf on any rank (reward model scores, values,
    advantages), or None when all are finite; every rank gets the same answer."""
    for x, what in ((sc.scores, "reward model score"), (sc.values, "value"), (sc.advantages, "advantage")):
        bad = ~torch.isfinite(x)
        if distributed.agree(int(bad.sum())):
            return what, float(x[bad][0]) if bad.any() else float("nan")
    return None


class UpdateStats:
    """The metrics of one ``ppo_update``, each the mean of what it was given, by kind:

    - ``"minibatch"``: token-weighted micro-batch values; a minibatch's value is their sum, the metric the
      mean over all ``n_minibatches`` of the update;
    - ``"first"``: the same for the update's first minibatch alone (ratio 1 and approx-KL 0 there check
      that generation and training agree);
    - ``"step"``: one value per optimizer step, the metric their mean.

    Each value is a rank's part of a mean over ranks (summed over ranks) unless added ``same_on_ranks``."""

    def __init__(self, n_minibatches: int):
        self.divisors = {"minibatch": n_minibatches, "first": 1}
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.kinds: dict[str, str] = {}
        self.same_on_ranks: set[str] = set()

    def add(self, kind: str, values: dict[str, float], same_on_ranks: bool = False) -> None:
        for key, v in values.items():
            self.kinds[key] = kind
            self.sums[key] = self.sums.get(key, 0) + v
            self.counts[key] = self.counts.get(key, 0) + 1
            if same_on_ranks:
                self.same_on_ranks.add(key)

    def means(self) -> dict[str, float]:
        """Per-minibatch metrics, then per-step ones, each in the order first added; reduced over ranks."""
        out = {k: s / self.divisors[self.kinds[k]] for k, s in self.sums.items() if self.kinds[k] != "step"}
        out.update({k: s / self.counts[k] for k, s in self.sums.items() if self.kinds[k] == "step"})
        return distributed.reduce_metrics(out, sums=tuple(k for k in out if k not in self.same_on_ranks))


def ppo_update(models: PPOModels, trained: PolicyAndValue, optimizer, scheduler, ro: Rollout, sc: Scored,
               cfg: PPOConfig, ptx: list[list[int]], step: int, pad_id: int) -> tuple[dict, float]:
    """PPO epochs over shuffled minibatches; each optimizer step adds the ptx term. Returns stats (over
    all ranks) and the seconds spent on ptx. Each rank holds 1/world of the rollout and of every
    minibatch; a minibatch's loss is normalised by the response tokens of all ranks' shares.
    ``optimizer`` has two parameter groups, the policy's then the value model's, each clipped on its own."""
    mini = cfg.mini_batch_size // distributed.world_size()
    stats = UpdateStats(cfg.ppo_epochs * math.ceil(len(ro.lengths) / mini))
    ptx_seconds = 0.0
    models.policy.train(), models.value.train()
    for epoch in range(cfg.ppo_epochs):
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 1_009 + epoch)
        for mb_i, mb in enumerate(micro(torch.randperm(len(ro.lengths), generator=gen), mini)):
            minibatch_backward(models, ro, sc, mb, cfg, stats, first=epoch == 0 and mb_i == 0)
            if cfg.ptx_coef > 0:
                ptx_seconds += ptx_term(models.policy, ptx, scheduler.last_epoch, cfg, pad_id,
                                        ro.query_response.device, stats)
            # policy and value clipped each on its own norm: ptx's gradient (gamma 27.8) does not shrink the value's
            norm_policy, norm_value = optimizer_step_by_group(optimizer, scheduler, cfg.optim.grad_clip)
            stats.add("step", {"train/grad_norm": math.hypot(norm_policy, norm_value),
                               "train/grad_norm_policy": norm_policy, "train/grad_norm_value": norm_value},
                      same_on_ranks=True)  # taken after the gradients' all-reduce
    return stats.means(), ptx_seconds


def minibatch_backward(models: PPOModels, ro: Rollout, sc: Scored, mb: torch.Tensor, cfg: PPOConfig,
                       stats: UpdateStats, first: bool) -> None:
    """Backward of minibatch ``mb``'s PPO loss (pg + vf_coef * vf), micro-batch by micro-batch, each weighted by
    its share of the response tokens of all ranks' parts of the minibatch; its metrics into ``stats``."""
    mask_all = ro.response_mask.float()
    n_tokens = distributed.total(mask_all[mb].sum()).clamp(min=1)
    scale = distributed.world_size()  # DDP and FSDP average gradients over ranks; the losses want their sum
    micros = micro(mb, cfg.optim.batch_size)
    for j, idx in enumerate(micros):
        weight = mask_all[idx].sum() / n_tokens  # micro-batch share of the minibatch's tokens
        last = j == len(micros) - 1  # DDP reduces in the last backward of a model (ptx's, for the policy)
        with distributed.syncing(models.policy, last and cfg.ptx_coef == 0), distributed.syncing(models.value, last):
            loss, metrics = micro_loss(models, ro, sc, idx, cfg)
            (loss * weight * scale).backward()
        w = float(weight)
        stats.add("minibatch", {k: float(v.detach()) * w for k, v in metrics.items()})
        if first:  # generation and training must agree: ratio 1, approx-KL 0
            stats.add("first", {"val/ratio_first": float(metrics["val/ratio"]) * w,
                                "policy/approxkl_first": float(metrics["policy/approxkl"]) * w})


def micro_loss(models: PPOModels, ro: Rollout, sc: Scored, idx: torch.Tensor,
               cfg: PPOConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's loss on rows ``idx``: clipped policy loss + vf_coef * clipped value loss (token means), and
    its metrics."""
    qr, mask, rmask = ro.query_response[idx], ro.attention_mask[idx], ro.response_mask[idx].float()
    logprobs, entropy = models.policy(response_logprobs, qr, mask, ro.context_len, cfg.temperature, True,
                                      trunk(models.frozen_policy, sc.policy_trunk, idx))
    pg_loss, pg = policy_loss(logprobs, sc.logprobs[idx], sc.advantages[idx], rmask, cfg.cliprange)
    values = models.value(token_values, qr, mask, ro.context_len, trunk(models.frozen_value, sc.value_trunk, idx))
    vf_loss, vf = value_loss(values, sc.values[idx], sc.returns[idx], rmask, cfg.cliprange_value)
    metrics = {"loss/policy": pg_loss, "loss/value": vf_loss, "val/ratio": pg["ratio"],
               "policy/clipfrac": pg["clipfrac"], "policy/approxkl": pg["approxkl"], "val/clipfrac": vf["clipfrac"],
               "policy/entropy": masked_mean(entropy.detach(), rmask)}
    return pg_loss + cfg.vf_coef * vf_loss, metrics


def ptx_term(policy, ptx: list[list[int]], opt_step: int, cfg: PPOConfig, pad_id: int, device: torch.device,
             stats: UpdateStats) -> float:
    """The PPO-ptx term of optimizer step ``opt_step`` (:func:`ptx_backward`), its loss into ``stats``
    (``loss/ptx``, the mean over steps); returns the seconds it took."""
    t0 = time.perf_counter()
    stats.add("step", {"loss/ptx": ptx_backward(policy, ptx, opt_step, cfg, pad_id, device)})
    return time.perf_counter() - t0


def ptx_backward(policy, ptx: list[list[int]], opt_step: int, cfg: PPOConfig, pad_id: int,
                 device: torch.device) -> float:
    """The PPO-ptx term of optimizer step ``opt_step`` (0-based; the scheduler counts the steps taken, and
    resumes with the run): backward of ``ptx_coef`` x the mean next-token loss over every token of the step's
    ``ptx_batch_size`` pretraining blocks, into the gradients the step's PPO micro-batches left, for the
    same optimizer step (C.4: "we mix in pretraining gradients"). Returns this rank's part of that mean.

    The blocks are the next ones of the data's shuffled passes (``train.stream_indices``): exactly
    ``ptx_batch_size`` per step, each block once a pass. They run ``ptx_micro_batch_size`` at a time (memory
    only): each micro-batch's summed loss is divided by the tokens of the whole ptx batch, so any split
    gives the same gradient. Micro-batch j goes to rank j mod W; every rank runs as many (weight 0 where it
    has none left, ``distributed.rank_chunks``), and the policy's gradients are reduced in the last one."""
    blocks = [ptx[i] for i in stream_indices(len(ptx), opt_step, cfg.ptx_batch_size, cfg.seed)]
    n_tokens = sum(len(b) - 1 for b in blocks)  # predicted tokens of the whole ptx batch, all ranks
    scale = distributed.world_size()  # DDP and FSDP average gradients over ranks; the loss wants their sum
    mine = distributed.rank_chunks(micro(blocks, cfg.ptx_micro_batch_size or cfg.optim.batch_size))
    summed_loss = 0.0
    for j, (chunk, weight) in enumerate(mine):
        ids, mask = (x.to(device) for x in pad_right(chunk, pad_id))
        with distributed.syncing(policy, j == len(mine) - 1):
            summed, _ = policy(lm_loss_sum, ids, mask)
            (summed * (cfg.ptx_coef * weight * scale / n_tokens)).backward()
        summed_loss += float(summed.detach()) * weight
    return summed_loss / n_tokens


class PolicyAndValue(torch.nn.Module):
    """Policy and value trained together: one optimizer, one checkpoint (their parameters side by side)."""

    def __init__(self, policy: torch.nn.Module, value: torch.nn.Module):
        super().__init__()
        self.policy, self.value = policy, value
