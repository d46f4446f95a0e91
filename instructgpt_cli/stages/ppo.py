"""Step 3 of InstructGPT: PPO against the reward model with a per-token KL penalty to the SFT model,
and PPO-ptx, which adds gamma * (LM loss on pretraining text) to every optimizer step:

    objective(phi) = E_{x, y ~ pi_phi} [ r_theta(x, y) - beta * log(pi_phi(y|x) / pi_SFT(y|x)) ]
                     + gamma * E_{x ~ D_pretrain} [ log pi_phi(x) ]          (Ouyang et al. 2022, eq. 2)

Each iteration: sample one response per prompt at temperature T, score it (policy and reference
log-probs at the same T, per-token values, the RM score at the last real token), turn scores into
per-token KL-penalised rewards, GAE (gamma 1, lambda 0.95), whitened advantages, then PPO epochs over
shuffled minibatches with clipped policy and value losses. Implementation details follow
lm-human-preferences / "The N implementation details of RLHF with PPO" (Huang et al. 2024).

Under a launcher each rank samples its share of the iteration's prompts with its own seed; advantages
are whitened, losses normalised and metrics reported over all ranks' responses, so beta (the KL
controller's) and every update are those of one batch of ``rollout_batch_size`` episodes.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import torch

from .. import distributed
from ..config import LoraConfig, ModelConfig, PPOConfig
from ..console import banner, say
from ..batches import pad_right, pretrain_blocks, render_queries
from ..data import read_pretrain, read_prompts
from ..distributed import resolve_device
from ..errors import BadInput
from ..families import frozen_layers
from ..forward import forward_name, last_token_scores, lm_loss_sum, response_logprobs, token_values, trunk_states
from ..losses import adaptive_kl_beta, gae, kl_penalized_rewards, masked_mean, masked_whiten, policy_loss, value_loss
from ..models import apply_lora, load_model, load_tokenizer, position_limit, same_tokenizer, save_final
from ..rewards import reward_stats
from ..rollout import Rollout, build_rollout, decode_response, generate
from ..rundir import Stage, file_input, find_model, model_input
from ..stats import describe_rm_accuracy
from ..storage import building
from ..lifecycle import begin_stage, finish_stage, open_stage
from ..train import (build_optimizer, build_scheduler, fit, model_rows, optimizer_step_by_group, processes_note,
                     restore, skip_step, stream_indices)

STAGE = "ppo"


class PolicyAndValue(torch.nn.Module):
    """Policy and value trained together: one optimizer, one checkpoint (their parameters side by side)."""

    def __init__(self, policy: torch.nn.Module, value: torch.nn.Module):
        super().__init__()
        self.policy, self.value = policy, value


def micro(indices: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [indices[i:i + size] for i in range(0, len(indices), size)]


def score_rollout(models: dict, ro: Rollout, cfg: PPOConfig, beta: float, batch: int) -> dict:
    """Old log-probs, reference log-probs, values, scores; then rewards, advantages and returns (B, T).
    ``models`` are runners (``distributed.wrap``): ``models["policy"](fn, ...)`` is ``fn(policy, ...)``.

    Policy and value score in eval mode, as generation samples (``ppo_update`` puts them back in train
    mode): whatever dropout a model carries, the old log-probs are those of the policy that sampled.
    Under ``distributed.no_autograd`` (``inference_mode`` in one process), the results cloned out of it,
    since the PPO losses save some of them for their backward."""
    models["policy"].eval(), models["value"].eval()
    with distributed.no_autograd():
        sc = _score_rollout(models, ro, cfg, beta, batch)
    return {k: v.clone() if torch.is_tensor(v) else v for k, v in sc.items()}


def _score_rollout(models: dict, ro: Rollout, cfg: PPOConfig, beta: float, batch: int) -> dict:
    parts: dict[str, list] = {"logprobs": [], "ref_logprobs": [], "values": [], "scores": []}
    frozen = models["frozen"]  # LoRA on the top layers: the layers below run once, for both uses of a model
    parts.update({f"{m}_trunk": [] for m in frozen if frozen[m]})
    seconds = dict.fromkeys(("frozen", "policy", "ref", "value", "reward"), 0.0)  # where scoring's time goes
    for idx in micro(torch.arange(len(ro.lengths)), batch):
        qr, mask = ro.query_response[idx], ro.attention_mask[idx]
        marks = [time.perf_counter()]
        trunk = {m: (k, models[m](trunk_states, k, qr, mask)) if k else None for m, k in frozen.items()}
        for m, cached in trunk.items():
            if cached:
                parts[f"{m}_trunk"].append(cached[1])
        marks.append(time.perf_counter())
        parts["logprobs"].append(
            models["policy"](response_logprobs, qr, mask, ro.context_len, cfg.temperature, False, trunk["policy"])[0])
        marks.append(time.perf_counter())
        with models["ref_ctx"]():
            parts["ref_logprobs"].append(
                models["ref"](response_logprobs, qr, mask, ro.context_len, cfg.temperature, False, trunk["policy"])[0])
        marks.append(time.perf_counter())
        parts["values"].append(models["value"](token_values, qr, mask, ro.context_len, trunk["value"]))
        marks.append(time.perf_counter())
        with models["rm_ctx"]():
            parts["scores"].append(models["rm"](last_token_scores, qr, mask, ro.context_len, ro.lengths[idx],
                                                trunk["value"]))
        marks.append(time.perf_counter())
        for part, t0, t1 in zip(seconds, marks, marks[1:]):
            seconds[part] += t1 - t0
    if not any(frozen.values()):
        del seconds["frozen"]
    out = {k: torch.cat(v) for k, v in parts.items()}
    mask = ro.response_mask.float()
    scores = out["scores"].clone()
    if cfg.reward_clip > 0:
        scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
    scores = scores - cfg.missing_eos_penalty * (~ro.has_eos).float()  # a response must end
    rewards, kl = kl_penalized_rewards(scores, out["logprobs"], out["ref_logprobs"], mask, beta)
    advantages, returns = gae(out["values"], rewards, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:  # with the mean and variance of every rank's responses together
        advantages = masked_whiten(advantages, mask, total=distributed.total)
    return {**out, "penalised_scores": scores, "rewards": rewards, "kl": kl, "advantages": advantages,
            "returns": returns, "seconds": seconds}


def non_finite(sc: dict) -> tuple[str, float] | None:
    """(what, value) of the first rollout quantity with a NaN or inf on any rank (reward model scores, values,
    advantages), or None when all are finite; every rank gets the same answer."""
    for key, what in (("scores", "reward model score"), ("values", "value"), ("advantages", "advantage")):
        bad = ~torch.isfinite(sc[key])
        if distributed.agree(int(bad.sum())):
            return what, float(sc[key][bad][0]) if bad.any() else float("nan")
    return None


def ppo_update(models: dict, trained: PolicyAndValue, optimizer, scheduler, ro: Rollout, sc: dict, cfg: PPOConfig,
               ptx: list[list[int]], step: int, pad_id: int) -> tuple[dict, float]:
    """PPO epochs over shuffled minibatches; each optimizer step adds the ptx term. Returns stats (over
    all ranks) and the seconds spent on ptx. Each rank holds 1/world of the rollout and of every
    minibatch; a minibatch's loss is normalised by the response tokens of all ranks' shares.
    ``optimizer`` has two parameter groups, the policy's then the value model's, each clipped on its own."""
    policy, value = models["policy"], models["value"]
    mask_all = ro.response_mask.float()
    stats: dict[str, list[float]] = {}
    ptx_seconds = 0.0
    world = distributed.world_size()
    scale = world  # DDP and FSDP average gradients over ranks; the losses want their sum
    mini = cfg.mini_batch_size // world
    n_minibatches = math.ceil(len(ro.lengths) / mini)
    policy.train(), value.train()
    for epoch in range(cfg.ppo_epochs):
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 1_009 + epoch)
        for mb_i, mb in enumerate(micro(torch.randperm(len(ro.lengths), generator=gen), mini)):
            n_tokens = distributed.total(mask_all[mb].sum()).clamp(min=1)
            micros = micro(mb, cfg.optim.batch_size)
            for j, idx in enumerate(micros):
                qr, mask, rmask = ro.query_response[idx], ro.attention_mask[idx], mask_all[idx]
                trunk = {m: (k, sc[f"{m}_trunk"][idx]) if k else None for m, k in models["frozen"].items()}
                weight = rmask.sum() / n_tokens  # micro-batch share of the minibatch's tokens
                last = j == len(micros) - 1  # DDP reduces in the last backward of a model (ptx's, for the policy)
                with distributed.syncing(policy, last and cfg.ptx_coef == 0), distributed.syncing(value, last):
                    logprobs, entropy = policy(response_logprobs, qr, mask, ro.context_len, cfg.temperature, True,
                                               trunk["policy"])
                    pg_loss, pg = policy_loss(logprobs, sc["logprobs"][idx], sc["advantages"][idx], rmask,
                                              cfg.cliprange)
                    values = value(token_values, qr, mask, ro.context_len, trunk["value"])
                    vf_loss, vf = value_loss(values, sc["values"][idx], sc["returns"][idx], rmask, cfg.cliprange_value)
                    ((pg_loss + cfg.vf_coef * vf_loss) * weight * scale).backward()
                w = float(weight)
                for key, v in (("loss/policy", pg_loss), ("loss/value", vf_loss), ("val/ratio", pg["ratio"]),
                               ("policy/clipfrac", pg["clipfrac"]), ("policy/approxkl", pg["approxkl"]),
                               ("val/clipfrac", vf["clipfrac"]), ("policy/entropy", masked_mean(entropy, rmask))):
                    stats.setdefault(key, []).append(float(v.detach()) * w)
                if epoch == 0 and mb_i == 0:  # generation and training must agree: ratio 1, approx-KL 0
                    stats.setdefault("val/ratio_first", []).append(float(pg["ratio"]) * w)
                    stats.setdefault("policy/approxkl_first", []).append(float(pg["approxkl"]) * w)
            if cfg.ptx_coef > 0:
                t0 = time.perf_counter()
                stats.setdefault("loss/ptx", []).append(ptx_backward(policy, ptx, scheduler.last_epoch, cfg, pad_id,
                                                                     ro.query_response.device))
                ptx_seconds += time.perf_counter() - t0
            # policy and value clipped each on its own norm: ptx's gradient (gamma 27.8) does not shrink the value's
            norm_policy, norm_value = optimizer_step_by_group(optimizer, scheduler, cfg.optim.grad_clip)
            for key, v in (("train/grad_norm_policy", norm_policy), ("train/grad_norm_value", norm_value),
                           ("train/grad_norm", math.hypot(norm_policy, norm_value))):
                stats.setdefault(key, []).append(v)
    # per-minibatch sums of token-weighted micro values -> means over minibatches
    n_mb = cfg.ppo_epochs * n_minibatches
    means = ("loss/ptx", "train/grad_norm", "train/grad_norm_policy", "train/grad_norm_value")
    out = {k: sum(v) / (1 if k.endswith("_first") else n_mb) for k, v in stats.items() if k not in means}
    for k in means:
        if k in stats:
            out[k] = sum(stats[k]) / len(stats[k])
    # every value but the gradient norms (the same on all ranks) is a rank's part of a global mean
    return distributed.reduce_metrics(out, sums=tuple(k for k in out if not k.startswith("train/grad_norm"))), \
        ptx_seconds


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


def load_models(cfg: PPOConfig, tokenizer, sft_path: Path, rm_path: Path, device: torch.device) -> dict:
    """Policy (from SFT) and value (from the RM) train; reference and RM are frozen. With LoRA the
    reference is the policy with adapters disabled and the RM is the value model with adapters
    disabled, so no model is held twice."""
    base = ModelConfig(**{**vars(cfg.model), "dropout": 0.0})  # dropout off everywhere (PPO needs ratio 1)
    lora = no_dropout(cfg.lora)
    policy = load_model(ModelConfig(**{**vars(base), "name": str(sft_path)}), tokenizer, sft_path, device, cfg.seed)
    value = load_model(ModelConfig(**{**vars(base), "name": str(rm_path)}), tokenizer, rm_path, device, cfg.seed,
                       kind="reward")
    if cfg.lora.enabled:
        torch.manual_seed(cfg.seed)
        policy = apply_lora(policy, lora)
        value = apply_lora(value, lora, task_type="SEQ_CLS")
        models = {"ref": policy, "ref_ctx": policy.disable_adapter, "rm": value, "rm_ctx": value.disable_adapter}
    else:
        ref = load_model(ModelConfig(**{**vars(base), "name": str(sft_path)}), tokenizer, sft_path, device, cfg.seed)
        rm = load_model(ModelConfig(**{**vars(base), "name": str(rm_path)}), tokenizer, rm_path, device, cfg.seed,
                        kind="reward")
        for frozen in (ref, rm):
            frozen.eval().requires_grad_(False)
        models = {"ref": ref, "ref_ctx": contextlib.nullcontext, "rm": rm, "rm_ctx": contextlib.nullcontext}
    return {"policy": policy, "value": value, **models}


def no_dropout(lora: LoraConfig) -> LoraConfig:
    """The LoRA block with its dropout off: a dropped adapter input in training but not in scoring would
    make the ratio differ from 1 at the first minibatch (the model's own dropout is set to 0 likewise)."""
    return LoraConfig(**{**vars(lora), "dropout": 0.0})


def runners(models: dict, cfg: PPOConfig, device: torch.device) -> dict:
    """The models as PPO calls them (``distributed.wrap``): policy and value train under DDP or FSDP;
    the frozen reference and RM are sharded under FSDP and kept whole under DDP. With LoRA those two
    are the policy and value runners with adapters disabled, and with LoRA on the top layers only
    ``frozen`` counts the layers below, which scoring runs once per rollout for both uses of a model and
    whose output every training forward of the rollout reuses (not under FSDP, which shards the layers)."""
    policy = distributed.wrap(models["policy"], device, cfg.fsdp)
    value = distributed.wrap(models["value"], device, cfg.fsdp)
    frozen = dict.fromkeys(("policy", "value"), 0)  # lowest layers run once per rollout (``frozen_layers``)
    if cfg.lora.enabled and cfg.cache_frozen_layers and not (cfg.fsdp and distributed.world_size() > 1):
        frozen = {m: frozen_layers(models[m]) for m in frozen}
    if cfg.lora.enabled:
        return {**models, "policy": policy, "value": value, "ref": policy, "rm": value, "frozen": frozen}
    return {**models, "policy": policy, "value": value, "frozen": frozen,
            "ref": distributed.wrap(models["ref"], device, cfg.fsdp, trainable=False),
            "rm": distributed.wrap(models["rm"], device, cfg.fsdp, trainable=False)}


def cpu_copy(cfg: PPOConfig, tokenizer, path: Path, kind: str):
    """The policy's ('causal') or value model's ('reward') architecture on the CPU, to receive the gathered
    weights of a sharded model for export."""
    model = load_model(ModelConfig(**{**vars(cfg.model), "dropout": 0.0, "name": str(path)}), tokenizer, path,
                       torch.device("cpu"), cfg.seed, kind=kind)
    if cfg.lora.enabled:
        model = apply_lora(model, no_dropout(cfg.lora), task_type="CAUSAL_LM" if kind == "causal" else "SEQ_CLS")
    return model


def run(cfg: PPOConfig, resume: bool = False, overwrite: bool = False, allow_changes: bool = False) -> Path:
    # 1. validate every input before anything is written
    errors = []
    if not cfg.prompts:
        errors.append("--prompts: required (a prompts JSONL file)")
    if cfg.ptx_coef > 0 and not cfg.ptx_data:
        errors.append(f"--ptx-data: required when --ptx-coef is {cfg.ptx_coef} > 0 (pretraining text for PPO-ptx)")
    if cfg.ptx_data and cfg.ptx_coef == 0:  # else the text is silently ignored and the run is plain PPO
        errors.append(f"--ptx-data {cfg.ptx_data}: given with --ptx-coef 0, so it would be ignored (plain PPO); "
                      "set --ptx-coef > 0 for PPO-ptx (the paper: 27.8) or drop --ptx-data")
    if cfg.temperature <= 0:
        errors.append("temperature: PPO samples, so it must be > 0")
    world = distributed.world_size()
    if cfg.rollout_batch_size % world or cfg.mini_batch_size % world:
        errors.append(f"rollout_batch_size ({cfg.rollout_batch_size}) and mini_batch_size ({cfg.mini_batch_size}): "
                      f"must be multiples of the number of processes ({world}); each rank takes an equal share")
    if errors:
        raise BadInput(errors)
    run_dir = Path(cfg.run_dir)
    prompts = read_prompts(cfg.prompts)
    ptx_texts = read_pretrain(cfg.ptx_data) if cfg.ptx_coef > 0 else []
    sft_path = Path(find_model(cfg.sft, run_dir, "sft", "--sft"))
    rm_path = Path(find_model(cfg.rm, run_dir, "rm", "--rm"))
    tokenizer, _ = load_tokenizer(ModelConfig(name=str(sft_path)))
    rm_tokenizer, _ = load_tokenizer(ModelConfig(name=str(rm_path)))
    if not same_tokenizer(tokenizer, rm_tokenizer):
        raise BadInput([f"--rm {rm_path}: its tokenizer differs from the SFT model's ({sft_path}); the reward model "
                        "must read the policy's tokens (train it from the same SFT model)"])
    # prompt + response must fit model.max_seq_len and what the policy and reward model were built for
    limits = [position_limit(str(p), cfg.model.trust_remote_code) for p in (sft_path, rm_path)]
    context = min([cfg.model.max_seq_len, *filter(None, limits)])
    queries = render_queries(tokenizer, prompts, cfg.max_new_tokens, context)
    # a reward model that learned nothing sends PPO after noise: the accuracy train-rm saved with it
    rm_record = reward_stats(rm_path)
    rm_accuracy, rm_warning = describe_rm_accuracy(rm_record)
    if cfg.require_rm_accuracy > 0:
        accuracy = (rm_record or {}).get("eval/accuracy")
        if accuracy is None:
            raise BadInput([f"--require-rm-accuracy {cfg.require_rm_accuracy}: the reward model {rm_path} has no "
                            "held-out accuracy record (train it with igpt train-rm and --val-fraction > 0)"])
        if accuracy < cfg.require_rm_accuracy:
            raise BadInput([f"--require-rm-accuracy {cfg.require_rm_accuracy}: the reward model {rm_path} has "
                            f"{rm_accuracy}, below the required {cfg.require_rm_accuracy:.1%}"])
    stage = Stage(run_dir, STAGE)
    device = resolve_device(cfg.device)
    inputs = {"prompts": file_input(cfg.prompts), "sft": model_input(sft_path), "rm": model_input(rm_path)}
    if ptx_texts:
        inputs["ptx_data"] = file_input(cfg.ptx_data)
    mode, changes = open_stage(stage, cfg, inputs, resume, overwrite, allow_changes)  # lock; what resume changes
    if mode == "done":
        say(f"ppo: {stage.final} is already complete; nothing to do")
        return stage.final
    ptx = pretrain_blocks(tokenizer, ptx_texts, cfg.ptx_seq_len) if ptx_texts else []
    if ptx_texts and not ptx:
        raise BadInput([f"--ptx-data {cfg.ptx_data}: its text makes no block of 2 tokens or more to train on"])

    # 2. models, optimizer, schedule
    torch.manual_seed(cfg.seed)  # sampling; a resumed run restores the RNG state of its checkpoint
    loaded = load_models(cfg, tokenizer, sft_path, rm_path, device)
    trained = PolicyAndValue(loaded["policy"], loaded["value"])
    models = runners(loaded, cfg, device)  # DDP or FSDP under a launcher; FSDP shards trained's parameters
    distributed.seed_rank(cfg.seed)
    B = cfg.rollout_batch_size  # every iteration samples exactly B episodes (the prompt order wraps)
    if cfg.max_steps > 0:
        total_steps = cfg.max_steps
    elif cfg.total_episodes > 0:
        total_steps = math.ceil(cfg.total_episodes / B)  # whole iterations: the banner says when it rounds up
    else:
        total_steps = math.ceil(len(prompts) / B)
    vf_lr = cfg.vf_lr or cfg.optim.lr
    # two parameter groups: the value model has its own learning rate (InstructGPT C.4) and gradient clip
    optimizer = build_optimizer(trained, cfg.optim, {"policy": cfg.optim.lr, "value": vf_lr})
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps * cfg.ppo_epochs * math.ceil(B / cfg.mini_batch_size))

    # 3. the stage directory and the resume point (the KL controller's beta travels with the checkpoint)
    begin_stage(stage, mode, cfg, inputs)
    step, extra, ckpt = restore(stage, mode, trained, optimizer, scheduler, changes)
    state = {"beta": float(extra.get("beta", cfg.beta))}
    episodes = f"{total_steps * B} episodes"
    if cfg.max_steps == 0 and cfg.total_episodes > 0 and total_steps * B != cfg.total_episodes:
        episodes += f" (--total-episodes {cfg.total_episodes} rounded up to whole iterations of {B})"
    repeats = " (more than the file has: an iteration samples some prompts more than once)" if B > len(prompts) else ""
    clip = f"each model's gradient clipped to norm {cfg.optim.grad_clip:g}" if cfg.optim.grad_clip else "no clipping"
    banner("igpt ppo", {
        "prompts": f"{cfg.prompts} ({len(prompts)}), {B} per iteration{repeats}, {cfg.max_new_tokens} new tokens at "
                   f"T={cfg.temperature}",
        "models": f"policy {sft_path}, value and reward {rm_path}, on {device}",
        "reward model": rm_accuracy,
        "objective": f"beta {state['beta']}" + (f" -> KL {cfg.target_kl}" if cfg.target_kl else " (fixed)")
                     + (f", ptx gamma {cfg.ptx_coef} on {len(ptx)} blocks of {cfg.ptx_seq_len}" if ptx else ", no ptx"),
        "steps": f"{total_steps} iterations x {cfg.ppo_epochs} epochs x {math.ceil(B / cfg.mini_batch_size)} minibatches"
                 + processes_note(cfg.fsdp) + f"; {episodes}",
        "lr": f"policy {cfg.optim.lr:g}, value {vf_lr:g}; {clip}",
        "forward": f"policy {forward_name(trained.policy)}, value {forward_name(trained.value)}",
        **model_rows(trained, cfg.lora.enabled, ckpt),
    })
    if rm_warning:
        say(f"[bold red]warning:[/] {rm_warning}")
    timings: dict[str, float] = {}

    # 4. iterate: rollout, score, update
    def iteration(i: int) -> dict:
        t0 = time.perf_counter()
        idx = stream_indices(len(prompts), i, B, cfg.seed)  # exactly B: a pass's end continues into the next
        mine = idx[distributed.rank()::world]  # B is a multiple of world: every rank B / world prompts
        batch_queries = [queries[j] for j in mine]
        with torch.no_grad():  # outside the runner too: DDP must not expect a backward of this forward
            responses = models["policy"](generate, tokenizer, batch_queries, cfg.max_new_tokens, cfg.temperature,
                                         cfg.optim.batch_size * 2, distributed.is_sharded(trained))
        ro = Rollout(*(x.to(device) if torch.is_tensor(x) else x for x in
                       build_rollout(batch_queries, responses, tokenizer.pad_token_id, tokenizer.eos_token_id)))
        t1 = time.perf_counter()
        sc = score_rollout(models, ro, cfg, state["beta"], 2 * cfg.optim.batch_size)  # no grad: twice the micro-batch
        t2 = time.perf_counter()
        bad = non_finite(sc)
        if bad is None:
            stats, ptx_s = ppo_update(models, trained, optimizer, scheduler, ro, sc, cfg, ptx, i, tokenizer.pad_token_id)
        else:  # no update from a NaN reward, value or advantage: the iteration is a skipped step
            skip_step(*bad)
            stats, ptx_s = {"policy/entropy": float("nan")}, 0.0
        t3 = time.perf_counter()
        # means over all ranks' responses (every rank has as many), the EOS count summed: the KL controller
        # sees the global KL, so beta stays the same on every rank
        batch = distributed.reduce_metrics({
            "kl": float(sc["kl"].sum(1).mean()), "scores": float(sc["scores"].mean()),
            "rlhf_reward": float(sc["rewards"].sum(1).mean()), "eos": int(ro.has_eos.sum()),
            "length": float(ro.lengths.float().mean())}, sums=("eos",))
        kl = batch["kl"]
        record = {
            "episode": (i + 1) * B, "objective/kl": kl, "objective/scores": batch["scores"],
            "objective/entropy": stats.pop("policy/entropy"), "objective/beta": state["beta"],
            "objective/non_score_reward": -state["beta"] * kl,
            "objective/rlhf_reward": batch["rlhf_reward"],  # penalised score - beta * KL
            "val/num_eos_tokens": batch["eos"], "val/response_length": batch["length"],
            **stats, "train/lr_value": scheduler.get_last_lr()[1],
            "timing/generation": t1 - t0, "timing/scoring": t2 - t1,
            **{f"timing/scoring/{part}": v for part, v in sc["seconds"].items()},
            "timing/training": t3 - t2 - ptx_s, "timing/ptx": ptx_s,
        }
        if cfg.target_kl > 0:
            state["beta"] = adaptive_kl_beta(state["beta"], kl, cfg.target_kl, cfg.kl_horizon, B)
        if (i + 1) % cfg.sample_every == 0 or i + 1 == total_steps:
            write_samples(stage, i + 1, [prompts[j].prompt for j in mine], responses, sc, tokenizer)
        record["timing/other"] = time.perf_counter() - t3
        for k, v in record.items():
            if k.startswith("timing/"):
                timings[k] = timings.get(k, 0.0) + v
        return record

    step = fit(stage, trained, optimizer, scheduler, step, total_steps, iteration, None, 1, cfg.save_every,
               cfg.keep_checkpoints, extra_state=lambda: dict(state), show="objective/scores")

    # 5. export from rank 0: ppo/final/policy (HF causal LM) and ppo/final/value, published together
    # (sharded models are first gathered into plain copies there)
    policy = distributed.full_model(trained.policy, lambda: cpu_copy(cfg, tokenizer, sft_path, "causal"))
    value = distributed.full_model(trained.value, lambda: cpu_copy(cfg, tokenizer, rm_path, "reward"))
    if distributed.is_main():
        with building(stage.final) as tmp:  # a full disk: no partial final/, the previous one (if any) kept
            save_final(policy, tokenizer, tmp / "policy")
            save_final(value, tokenizer, tmp / "value")
    finish_stage(stage, step, policy=str(stage.final / "policy"), value=str(stage.final / "value"))
    # the phases add up to the whole; timing/scoring/<model> split the scoring phase
    total_s = sum(v for k, v in timings.items() if k.count("/") == 1) or 1.0
    banner("where the time went", {("  " * (k.count("/") - 1)) + k.split("/")[-1]: f"{v:.1f}s ({100 * v / total_s:.0f}%)"
                                   for k, v in timings.items()})
    return stage.final


def write_samples(stage: Stage, step: int, prompts: list[str], responses: list[list[int]], sc: dict, tokenizer) -> None:
    """ppo/samples/step-NNNNNN.jsonl: what the policy says now, with its score and KL. Every rank sends
    its share; rank 0 writes them in the step's prompt order."""
    from ..rundir import atomic_write_text

    lines = [json.dumps({"prompt": p, "response": decode_response(tokenizer, r), "score": float(s), "kl": float(k)},
                        ensure_ascii=False)
             for p, r, s, k in zip(prompts, responses, sc["scores"], sc["kl"].sum(1))]
    parts = distributed.gather(lines)  # parts[r][k] is prompt k * world + r of the step
    if distributed.is_main():
        lines = [line for group in zip(*parts) for line in group]
        atomic_write_text(stage.dir / "samples" / f"step-{step:06d}.jsonl", "\n".join(lines) + "\n")
