"""Step 3 of InstructGPT: PPO against the reward model with a per-token KL penalty to the SFT model,
and PPO-ptx, which adds ptx_coef * (LM loss on pretraining text) to every optimizer step:

    objective(phi) = E_{x, y ~ pi_phi} [ r_theta(x, y) - beta * log(pi_phi(y|x) / pi_SFT(y|x)) ]
                     + ptx_coef * E_{x ~ D_pretrain} [ log pi_phi(x) ]       (Ouyang et al. 2022, eq. 2;
                                                                             the paper's gamma, 27.8)

Each iteration: sample one response per prompt at temperature T, score it (policy and reference
log-probs at the same T, per-token values, the RM score at the last real token), turn scores into
per-token KL-penalised rewards, GAE (gamma 1, lambda 0.95), whitened advantages, then PPO epochs over
shuffled minibatches with clipped policy and value losses. Implementation details follow
lm-human-preferences / "The N implementation details of RLHF with PPO" (Huang et al. 2024).

Under a launcher each rank samples its share of the iteration's prompts with its own seed; advantages
are whitened, losses normalised and metrics reported over all ranks' responses, so beta (the KL
controller's) and every update are those of one batch of ``rollout_batch_size`` episodes.

Reading order: :func:`run` holds the loop (sample -> score -> update -> adapt beta -> record -> checkpoint);
below it, in that order, what each step calls: :func:`sample_rollout`, :func:`score_rollout`,
:func:`ppo_update`, :func:`iteration_metrics`. What a resume needs is :class:`PPOState`.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .. import distributed
from ..batches import pad_right, pretrain_blocks, render_queries
from ..checkpoint import restore
from ..config import LoraConfig, ModelConfig, PPOConfig
from ..console import banner, model_rows, processes_note, say
from ..data import read_pretrain, read_prompts
from ..distributed import resolve_device
from ..ema import ModelEMA, averaged_model
from ..errors import BadInput
from ..families import frozen_layers, shared_layers
from ..lifecycle import begin_stage, finish_stage, open_stage
from ..losses import adaptive_kl_beta, gae, kl_penalized_rewards, masked_mean, masked_whiten, policy_loss, value_loss
from ..models import (apply_lora, load_model, load_tokenizer, position_limit, require_same_tokenizer, save_final,
                      stage_inputs)
from ..rewards import ensemble_members, reward_stats
from ..rollout import Rollout, build_rollout, decode_response
from ..rundir import Stage, file_input, model_input
from ..runners import RewardEnsemble, RolloutEngine, Runner
from ..stats import describe_rm_accuracy
from ..storage import building
from ..watch import Watch, WatchRecord
from ..train import Session, TrainState, build_optimizer, build_scheduler, micro_batches, stream_indices

STAGE = "ppo"


class PPOModules(NamedTuple):
    """The four models of PPO as :func:`load_models` builds them (with LoRA the reference is the policy and the
    reward model the value model: :func:`as_runners` disables their adapters)."""

    policy: torch.nn.Module  # trained, from the SFT model
    value: torch.nn.Module  # trained, from the reward model
    reference: torch.nn.Module  # frozen: the SFT model, pi_SFT of the KL penalty
    reward: torch.nn.Module  # frozen: the reward model r_theta
    members: tuple = ()  # frozen: the other members of a reward-model ensemble (train-rm --ensemble N)


@dataclass
class PPOModels:
    """The four models of PPO as PPO calls them, by name (``models.policy.logprobs(...)``): their runners
    (:func:`as_runners`). With LoRA the reference and the reward model are the policy's and the value model's
    runners with adapters disabled, so no model is held twice."""

    policy: Runner
    value: Runner
    reference: Runner
    reward: Runner | RewardEnsemble
    # layers below the adapters (LoRA on the top layers only): run once per rollout for both uses of a model
    # (``frozen_layers``); 0 = none cached
    frozen_policy: int = 0
    frozen_value: int = 0
    # the value model's frozen layers are the policy's (``families.shared_layers``: both fine-tuned with LoRA on
    # their top layers from one SFT model): the policy's cached output serves both, computed once
    shared_trunk: bool = False


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
    member_scores: torch.Tensor | None = None  # (B, M) each ensemble member's score; None for one reward model


class PolicyAndValue(torch.nn.Module):
    """Policy and value trained together: one optimizer, one checkpoint (their parameters side by side, under
    checkpoint.POLICY and checkpoint.VALUE)."""

    def __init__(self, policy: torch.nn.Module, value: torch.nn.Module):
        super().__init__()
        self.policy, self.value = policy, value


@dataclass
class PPOState(TrainState):
    """What a PPO resume needs (saved whole in every checkpoint): the policy and value weights, optimizer and
    schedule, the iteration (``step``) and skipped steps (:class:`train.TrainState`), and PPO's own: the KL
    controller's ``beta``, the policy's weight average (``ema``) and ``ptx_cursor``, the optimizer steps
    applied so far, which is where PPO-ptx's pretraining stream continues."""

    beta: float = 0.0
    ema: ModelEMA | None = None
    ptx_cursor: int = 0
    watch: Watch | None = None  # its points, best so far and patience count are saved with the state

    def extra(self) -> dict:
        return {"beta": self.beta, "ptx_cursor": self.ptx_cursor, **({"ema": self.ema.state()} if self.ema else {}),
                **({"watch": self.watch.record.to_dict()} if self.watch else {})}

    def load_extra(self, extra: dict) -> None:
        self.beta = float(extra.get("beta", self.beta))
        if self.watch is not None:
            self.watch.record = WatchRecord.from_dict(extra.get("watch"))
        # an igpt before the cursor was saved took it from the schedule's step count, the same number
        self.ptx_cursor = int(extra.get("ptx_cursor", self.scheduler.last_epoch))
        if self.ema is not None:
            self.ema.load(extra.get("ema"))

    def after_optimizer_step(self) -> None:
        if self.ema is not None:  # InstructGPT, appendix C: an EMA of the policy, 0.992 per optimizer step
            self.ema.update()
        self.ptx_cursor += 1


@dataclass
class Inputs:
    """What ``igpt ppo`` reads before anything is written."""

    prompts: list  # data.Prompt records
    queries: list[list[int]]  # the prompts rendered and tokenized, each leaving room for max_new_tokens
    ptx_texts: list[str]  # pretraining text for PPO-ptx ([] without)
    sft_path: Path
    rm_path: Path
    tokenizer: Any
    rm_accuracy: str  # the reward model's held-out accuracy, described
    rm_warning: str | None
    watch: Watch | None = None  # --watch: the over-optimisation watch (watch.py)
    rm_members: tuple = ()  # the other members' paths of a reward-model ensemble (train-rm --ensemble N)


def run(cfg: PPOConfig, resume: bool = False, overwrite: bool = False, allow_changes: bool = False) -> Path:
    # 1. validate every input before anything is written
    check_flags(cfg)
    inp = read_inputs(cfg)
    stage = Stage(Path(cfg.run_dir), STAGE)
    device = resolve_device(cfg.device)
    files = {"prompts": file_input(cfg.prompts, cfg.split, cfg.columns), "sft": model_input(inp.sft_path),
             "rm": model_input(inp.rm_path), **{f"rm_member_{i}": model_input(m) for i, m in
                                                enumerate(inp.rm_members, 1)}}
    if inp.ptx_texts:
        files["ptx_data"] = file_input(cfg.ptx_data, cfg.split, cfg.columns)
    if inp.watch is not None:  # a resume with other validation prompts would watch another quantity
        files["watch_prompts"] = file_input(cfg.watch_prompts)
    mode, changes = open_stage(stage, cfg, files, resume, overwrite, allow_changes)  # lock; what resume changes
    if mode == "done":
        say(f"ppo: {stage.final} is already complete; nothing to do")
        return stage.final
    ptx = pretrain_blocks(inp.tokenizer, inp.ptx_texts, cfg.ptx_seq_len) if inp.ptx_texts else []
    if inp.ptx_texts and not ptx:
        raise BadInput([f"--ptx-data {cfg.ptx_data}: its text makes no block of 2 tokens or more to train on"])

    # 2. models, optimizer, schedule, the training state
    torch.manual_seed(cfg.seed)  # sampling; a resumed run restores the RNG state of its checkpoint
    loaded = load_models(cfg, inp.tokenizer, inp.sft_path, inp.rm_path, device, inp.rm_members)
    trained = PolicyAndValue(loaded.policy, loaded.value)
    models = as_runners(loaded, cfg, device)  # DDP or FSDP under a launcher; FSDP shards trained's parameters
    distributed.seed_rank(cfg.seed)
    total_steps = iterations(cfg, len(inp.prompts))
    # two parameter groups: the value model has its own learning rate (InstructGPT C.4) and gradient clip
    optimizer = build_optimizer(trained, cfg.optim, {"policy": cfg.optim.lr, "value": cfg.vf_lr or cfg.optim.lr})
    scheduler = build_scheduler(optimizer, cfg.optim,
                                total_steps * cfg.ppo_epochs * math.ceil(cfg.rollout_batch_size / cfg.mini_batch_size))
    state = PPOState(trained, optimizer, scheduler, beta=cfg.beta,
                     ema=ModelEMA(trained.policy, cfg.ema_decay) if cfg.ema_decay > 0 else None, watch=inp.watch)

    # 3. the stage directory and the resume point
    begin_stage(stage, mode, cfg, files)
    ckpt = restore(stage, mode, state, changes)
    banner("igpt ppo", banner_rows(cfg, inp, ptx, device, total_steps, state.beta, models, trained, ckpt),
           run_dir=stage.run_dir)
    if inp.rm_warning:
        say(f"[bold red]warning:[/] {inp.rm_warning}")
    if inp.watch is not None and state.step > 0:
        check_watch_resumed(inp.watch, stage, state.step)

    # 4. iterate: sample -> score -> update -> adapt beta -> record (metrics, samples, checkpoint, stop signal)
    timings: dict[str, float] = {}  # each timing/ metric added up over the run
    # why the watch ended the run early (--watch-patience): a run that stopped or was killed on its way to the
    # finish resumes straight to it
    stopped = inp.watch.record.stopped if inp.watch is not None and cfg.watch_patience else None
    keep_best = lambda point: save_best(cfg, stage, trained, inp, point)  # noqa: E731  (the watch's new best)
    with Session(stage, cfg, state, total_steps) as session:
        if stopped:
            session.finish_early(stopped)
        if inp.watch is not None:  # the SFT point, before the first update; a resumed run's points as restored
            if state.step == 0:
                inp.watch.measure(models, 0, keep_best, session.progress.say)
            inp.watch.write(stage.dir)
        for i in ([] if stopped else session.steps()):
            t0 = time.perf_counter()
            prompts, responses, ro = sample_rollout(models, inp, cfg, i, device)
            t1 = time.perf_counter()
            sc = score_rollout(models, ro, cfg, state.beta, 2 * cfg.optim.batch_size)  # no grad: twice the micro-batch
            t2 = time.perf_counter()
            bad = non_finite(sc)
            if bad is None:
                stats, ptx_s = ppo_update(models, state, ro, sc, cfg, ptx, inp.tokenizer.pad_token_id)
            else:  # no update from a NaN reward, value or advantage: the iteration is a skipped step
                state.skip(*bad)
                stats, ptx_s = {"policy/entropy": float("nan")}, 0.0
            t3 = time.perf_counter()
            record = {**iteration_metrics(cfg, state, i, ro, sc, stats), "timing/generation": t1 - t0,
                      "timing/scoring": t2 - t1, **{f"timing/scoring/{part}": v for part, v in sc.seconds.items()},
                      "timing/training": t3 - t2 - ptx_s, "timing/ptx": ptx_s}
            if cfg.target_kl > 0 and bad is None:  # a skipped iteration trained nothing: its KL moves no beta
                state.beta = adaptive_kl_beta(state.beta, record["objective/kl"], cfg.target_kl, cfg.kl_horizon,
                                              cfg.rollout_batch_size)
            if (i + 1) % cfg.sample_every == 0 or i + 1 == total_steps:
                write_samples(stage, i + 1, [inp.prompts[j].prompt for j in prompts], responses, sc, inp.tokenizer)
            if inp.watch is not None and inp.watch.due(i + 1, total_steps):
                record.update(inp.watch.measure(models, i + 1, keep_best, session.progress.say))
                inp.watch.write(stage.dir)
                stopped = inp.watch.stop_reason()
            record["timing/other"] = time.perf_counter() - t3
            for k, v in record.items():
                if k.startswith("timing/"):
                    timings[k] = timings.get(k, 0.0) + v
            session.record(record)
            if stopped:
                session.finish_early(stopped)
                break

    # 5. export from rank 0: ppo/final/policy (HF causal LM), ppo/final/value (and policy_ema), published together
    export(cfg, stage, trained, inp, state.ema)
    finish_stage(stage, state.step, policy=str(stage.final / "policy"), value=str(stage.final / "value"),
                 **({"policy_ema": str(stage.final / "policy_ema")} if state.ema else {}),
                 **({"stopped_by_watch": stopped} if stopped else {}))
    # the phases add up to the whole; timing/scoring/<model> split the scoring phase
    total_s = sum(v for k, v in timings.items() if k.count("/") == 1) or 1.0
    banner("where the time went", {("  " * (k.count("/") - 1)) + k.split("/")[-1]:
                                   f"{v:.1f}s ({100 * v / total_s:.0f}%)" for k, v in timings.items()})
    return stage.final


def check_flags(cfg: PPOConfig) -> None:
    """The flags that must go together, before any file is read."""
    errors = []
    if not cfg.prompts:
        errors.append("--prompts: required (a prompts JSONL file)")
    if cfg.ptx_coef > 0 and not cfg.ptx_data:
        errors.append(f"--ptx-data: required when --ptx-coef is {cfg.ptx_coef} > 0 (pretraining text for PPO-ptx)")
    if (cfg.watch_prompts or cfg.watch_patience or cfg.watch_significance) and not cfg.watch:
        errors.append("--watch: required with --watch-prompts / --watch-patience / --watch-significance (the judge "
                      "that watches)")
    if cfg.watch_significance and not cfg.watch_patience:
        errors.append("--watch-significance: qualifies the stop rule; give --watch-patience P too")
    if cfg.ptx_data and cfg.ptx_coef == 0:  # else the text is silently ignored and the run is plain PPO
        errors.append(f"--ptx-data {cfg.ptx_data}: given with --ptx-coef 0, so it would be ignored (plain PPO); "
                      "set --ptx-coef > 0 for PPO-ptx (the paper: 27.8) or drop --ptx-data")
    world = distributed.world_size()
    if cfg.rollout_batch_size % world or cfg.mini_batch_size % world:
        errors.append(f"rollout_batch_size ({cfg.rollout_batch_size}) and mini_batch_size ({cfg.mini_batch_size}): "
                      f"must be multiples of the number of processes ({world}); each rank takes an equal share")
    if errors:
        raise BadInput(errors)


def read_inputs(cfg: PPOConfig) -> Inputs:
    """Prompts, pretraining text, the SFT and reward models' paths and tokenizer (one for both), the queries
    (prompt + response must fit model.max_seq_len and what the policy and reward model were built for)."""
    prompts = read_prompts(cfg.prompts, cfg.split, cfg.columns)
    ptx_texts = read_pretrain(cfg.ptx_data, cfg.split, cfg.columns) if cfg.ptx_coef > 0 else []
    run_dir = Path(cfg.run_dir)
    found = stage_inputs(run_dir, {"--sft": (cfg.sft, "sft", "policy"), "--rm": (cfg.rm, "rm", "reward")})
    sft_path, rm_path = Path(found["--sft"]), Path(found["--rm"])
    members = tuple(ensemble_members(rm_path))
    if not members and cfg.rm_objective != "mean":
        raise BadInput([f"--rm-objective {cfg.rm_objective}: the reward model {rm_path} is one model, not an "
                        "ensemble (no ensemble.json beside it): train one with igpt train-rm --ensemble N, or leave "
                        "--rm-objective at mean"])
    missing = [str(m) for m in members if not (m / "config.json").is_file()]
    if missing:
        raise BadInput([f"--rm {rm_path}: its ensemble ({rm_path.parent / 'ensemble.json'}) lists members that are "
                        f"not there: {', '.join(missing)}; retrain it with igpt train-rm --ensemble N --resume"])
    tokenizer, _ = load_tokenizer(ModelConfig(name=str(sft_path)))
    require_same_tokenizer(tokenizer, sft_path, {"--rm": rm_path, **{f"--rm member {m}": m for m in members}},
                           "the reward model must read the policy's tokens (train it from the same SFT model)")
    limits = [position_limit(str(p), cfg.model.trust_remote_code) for p in (sft_path, rm_path, *members)]
    context = min([cfg.model.max_seq_len, *filter(None, limits)])
    queries = render_queries(tokenizer, prompts, cfg.max_new_tokens, context)
    rm_accuracy, rm_warning = check_rm_accuracy(cfg, rm_path)
    watching = Watch(cfg, tokenizer, context, run_dir, sft_path) if cfg.watch else None  # its judge checked, not run
    return Inputs(prompts, queries, ptx_texts, sft_path, rm_path, tokenizer, rm_accuracy, rm_warning, watching,
                  members)


def check_rm_accuracy(cfg: PPOConfig, rm_path: Path) -> tuple[str, str | None]:
    """The accuracy train-rm saved with the reward model, described, and a warning when it is poor: a reward
    model that learned nothing sends PPO after noise. Below ``require_rm_accuracy``, with an interval reaching
    50% under ``require_rm_above_chance``, or without a record when either is set, a BadInput that says what to
    do."""
    rm_record = reward_stats(rm_path)
    rm_accuracy, rm_warning = describe_rm_accuracy(rm_record)
    low = (rm_record or {}).get("eval/accuracy_ci_low")
    if cfg.require_rm_above_chance and (low is None or low <= 0.5):
        raise BadInput([f"--require-rm-above-chance: {rm_path}: " + (rm_warning or f"{rm_accuracy}: no interval to "
                        "show it is above chance (train it with igpt train-rm and --val-fraction > 0)")])
    if cfg.require_rm_accuracy > 0:
        accuracy = (rm_record or {}).get("eval/accuracy")
        if accuracy is None:
            raise BadInput([f"--require-rm-accuracy {cfg.require_rm_accuracy}: the reward model {rm_path} has no "
                            "held-out accuracy record (train it with igpt train-rm and --val-fraction > 0)"])
        if accuracy < cfg.require_rm_accuracy:
            raise BadInput([f"--require-rm-accuracy {cfg.require_rm_accuracy}: the reward model {rm_path} has "
                            f"{rm_accuracy}, below the required {cfg.require_rm_accuracy:.1%}"])
    return rm_accuracy, rm_warning


def iterations(cfg: PPOConfig, n_prompts: int) -> int:
    """PPO iterations of the run: every one samples exactly rollout_batch_size episodes (the prompt order
    wraps); --total-episodes rounds up to whole iterations (the banner says so); by default one pass."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    if cfg.total_episodes > 0:
        return math.ceil(cfg.total_episodes / cfg.rollout_batch_size)
    return math.ceil(n_prompts / cfg.rollout_batch_size)


def banner_rows(cfg: PPOConfig, inp: Inputs, ptx: list, device: torch.device, total_steps: int, beta: float,
                models: PPOModels, trained: "PolicyAndValue", ckpt: Path | None) -> dict[str, str]:
    B = cfg.rollout_batch_size
    episodes = f"{total_steps * B} episodes"
    if cfg.max_steps == 0 and cfg.total_episodes > 0 and total_steps * B != cfg.total_episodes:
        episodes += f" (--total-episodes {cfg.total_episodes} rounded up to whole iterations of {B})"
    n = len(inp.prompts)
    repeats = " (more than the file has: an iteration samples some prompts more than once)" if B > n else ""
    clip = f"each model's gradient clipped to norm {cfg.optim.grad_clip:g}" if cfg.optim.grad_clip else "no clipping"
    return {
        "prompts": f"{cfg.prompts} ({n}), {B} per iteration{repeats}, {cfg.max_new_tokens} new tokens at "
                   f"T={cfg.temperature}",
        "models": f"policy {inp.sft_path}, value and reward {inp.rm_path}, on {device}",
        **({"ensemble": f"{len(inp.rm_members) + 1} reward models ({inp.rm_path} and its members), PPO optimises "
                        f"their {cfg.rm_objective}" + (f" (k = {cfg.rm_std_coef:g})" if cfg.rm_objective == "mean-std"
                                                       else "")} if inp.rm_members else {}),
        "reward model": inp.rm_accuracy,
        "objective": f"beta {beta}" + (f" -> KL {cfg.target_kl}" if cfg.target_kl else " (fixed)")
                     + (f", ptx_coef {cfg.ptx_coef} on {len(ptx)} blocks of {cfg.ptx_seq_len}" if ptx else ", no ptx"),
        "steps": f"{total_steps} iterations x {cfg.ppo_epochs} epochs x {math.ceil(B / cfg.mini_batch_size)} "
                 "minibatches" + processes_note(cfg.fsdp) + f"; {episodes}",
        "lr": f"policy {cfg.optim.lr:g}, value {cfg.vf_lr or cfg.optim.lr:g}; {clip}",
        "forward": f"policy {models.policy.name}, value {models.value.name}",
        **({"EMA": f"decay {cfg.ema_decay:g} per optimizer step -> final/policy_ema"} if cfg.ema_decay else {}),
        **model_rows(trained, cfg.lora.enabled, ckpt),
    }


def load_models(cfg: PPOConfig, tokenizer, sft_path: Path, rm_path: Path, device: torch.device,
                members: tuple = ()) -> PPOModules:
    """Policy (from SFT) and value (from the RM) train; reference and RM are frozen. With LoRA the
    reference is the policy with adapters disabled and the RM is the value model with adapters
    disabled, so no model is held twice. The other members of an ensemble are frozen models of their own."""
    base = ModelConfig(**{**vars(cfg.model), "dropout": 0.0})  # dropout off everywhere (PPO needs ratio 1)
    others = tuple(load_model(ModelConfig(**{**vars(base), "name": str(m)}), tokenizer, m, device, cfg.seed,
                              kind="reward").eval().requires_grad_(False) for m in members)
    lora = no_dropout(cfg.lora)
    policy = load_model(ModelConfig(**{**vars(base), "name": str(sft_path)}), tokenizer, sft_path, device, cfg.seed)
    value = load_model(ModelConfig(**{**vars(base), "name": str(rm_path)}), tokenizer, rm_path, device, cfg.seed,
                       kind="reward")
    if cfg.lora.enabled:
        torch.manual_seed(cfg.seed)
        policy = apply_lora(policy, lora)
        value = apply_lora(value, lora, task_type="SEQ_CLS")
        return PPOModules(policy, value, reference=policy, reward=value, members=others)  # (as_runners)
    ref = load_model(ModelConfig(**{**vars(base), "name": str(sft_path)}), tokenizer, sft_path, device, cfg.seed)
    rm = load_model(ModelConfig(**{**vars(base), "name": str(rm_path)}), tokenizer, rm_path, device, cfg.seed,
                    kind="reward")
    for frozen in (ref, rm):
        frozen.eval().requires_grad_(False)
    return PPOModules(policy, value, reference=ref, reward=rm, members=others)


def no_dropout(lora: LoraConfig) -> LoraConfig:
    """The LoRA block with its dropout off: a dropped adapter input in training but not in scoring would
    make the ratio differ from 1 at the first minibatch (the model's own dropout is set to 0 likewise)."""
    return LoraConfig(**{**vars(lora), "dropout": 0.0})


def as_runners(models: PPOModules, cfg: PPOConfig, device: torch.device) -> PPOModels:
    """The models as PPO calls them (:class:`runners.Runner`): policy and value train under DDP or FSDP;
    the frozen reference and RM are sharded under FSDP and kept whole under DDP. With LoRA those two
    are the policy and value runners with adapters disabled, and with LoRA on the top layers only
    ``frozen_*`` count the layers below, which scoring runs once per rollout for both uses of a model and
    whose output every training forward of the rollout reuses (not under FSDP, which shards the layers)."""
    policy = Runner(models.policy, device, cfg.fsdp)
    value = Runner(models.value, device, cfg.fsdp)
    frozen = (0, 0)  # lowest layers run once per rollout (``frozen_layers``)
    shared = False
    if cfg.lora.enabled and cfg.cache_frozen_layers and not (cfg.fsdp and distributed.world_size() > 1):
        frozen = frozen_layers(models.policy), frozen_layers(models.value)
        shared = 0 < frozen[0] == frozen[1] <= shared_layers([models.policy, models.value])
    if cfg.lora.enabled:
        reference, reward = policy.adapters_disabled(), value.adapters_disabled()
    else:
        reference = Runner(models.reference, device, cfg.fsdp, trainable=False)
        reward = Runner(models.reward, device, cfg.fsdp, trainable=False)
    if models.members:
        reward = RewardEnsemble([reward, *(Runner(m, device, cfg.fsdp, trainable=False) for m in models.members)],
                                cfg.rm_objective, cfg.rm_std_coef)
    return PPOModels(policy, value, reference, reward, frozen_policy=frozen[0], frozen_value=frozen[1],
                     shared_trunk=shared)


def cpu_copy(cfg: PPOConfig, tokenizer, path: Path, kind: str):
    """The policy's ('causal') or value model's ('reward') architecture on the CPU, to receive the gathered
    weights of a sharded model for export."""
    model = load_model(ModelConfig(**{**vars(cfg.model), "dropout": 0.0, "name": str(path)}), tokenizer, path,
                       torch.device("cpu"), cfg.seed, kind=kind)
    if cfg.lora.enabled:
        model = apply_lora(model, no_dropout(cfg.lora), task_type="CAUSAL_LM" if kind == "causal" else "SEQ_CLS")
    return model


# ---------------------------------------------------------------- one iteration, step by step


def sample_rollout(models: PPOModels, inp: Inputs, cfg: PPOConfig, i: int,
                   device: torch.device) -> tuple[list[int], list[list[int]], Rollout]:
    """This rank's prompts of iteration ``i`` (indices into ``inp.prompts``), the policy's responses at
    temperature T and their rollout batch."""
    tokenizer = inp.tokenizer
    idx = stream_indices(len(inp.prompts), i, cfg.rollout_batch_size, cfg.seed)  # a pass's end continues
    mine = idx[distributed.rank()::distributed.world_size()]  # a multiple of world: every rank B / world
    batch_queries = [inp.queries[j] for j in mine]
    sampler: RolloutEngine = models.policy  # the seam for a generation engine (runners.RolloutEngine)
    sampler.load_weights(models.policy)  # the policy after its last update
    responses = sampler.generate(tokenizer, batch_queries, cfg.max_new_tokens, cfg.temperature,
                                 cfg.optim.batch_size * 2)
    ro = Rollout(*(x.to(device) if torch.is_tensor(x) else x for x in
                   build_rollout(batch_queries, responses, tokenizer.pad_token_id, tokenizer.eos_token_id)))
    return mine, responses, ro


def trunk(frozen: int, states: torch.Tensor | None, idx: torch.Tensor | None = None) -> tuple[int, torch.Tensor] | None:
    """The cached output of a model's ``frozen`` lowest layers as the forwards take it (rows ``idx``)."""
    if not frozen:
        return None
    return frozen, states if idx is None else states[idx]


class Stopwatch:
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
    ``models`` are runners (:func:`as_runners`).

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
        advantages = masked_whiten(advantages, mask, sum_over_ranks=distributed.sum_over_ranks)
    return Scored(out["logprobs"], out["ref_logprobs"], out["values"], out["scores"], rewards, kl, advantages, returns,
                  out.get("policy_trunk"), out.get("value_trunk"), seconds, out.get("member_scores"))


def model_outputs(models: PPOModels, ro: Rollout, temperature: float,
                  batch: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Every model's outputs over the rollout, ``batch`` responses at a time (:func:`score_micro_batch`),
    concatenated, and the seconds each model took."""
    laps = Stopwatch(("frozen", "policy", "ref", "value", "reward"))
    parts: dict[str, list[torch.Tensor]] = {}
    for idx in micro_batches(torch.arange(len(ro.lengths)), batch):
        laps.start()
        for key, value in score_micro_batch(models, ro, idx, temperature, laps).items():
            parts.setdefault(key, []).append(value)
    if not (models.frozen_policy or models.frozen_value):
        del laps.seconds["frozen"]
    return {k: torch.cat(v) for k, v in parts.items()}, laps.seconds


def score_micro_batch(models: PPOModels, ro: Rollout, idx: torch.Tensor, temperature: float,
                      laps: Stopwatch) -> dict[str, torch.Tensor]:
    """Rows ``idx`` of the rollout through the four models: the frozen layers' outputs first where they
    are cached (``policy_trunk``, ``value_trunk``: the reference reuses the policy's, the reward model the
    value model's), then ``logprobs``, ``ref_logprobs``, ``values`` (B, T) and ``scores`` (B,)."""
    qr, mask = ro.query_response[idx], ro.attention_mask[idx]
    out = {}
    if models.frozen_policy:
        out["policy_trunk"] = models.policy.trunk(models.frozen_policy, qr, mask)
    if models.shared_trunk:
        out["value_trunk"] = out["policy_trunk"]  # the same layers on the same tokens: one tensor
    elif models.frozen_value:
        out["value_trunk"] = models.value.trunk(models.frozen_value, qr, mask)
    policy_trunk = trunk(models.frozen_policy, out.get("policy_trunk"))
    value_trunk = trunk(models.frozen_value, out.get("value_trunk"))
    laps.lap("frozen")
    out["logprobs"] = models.policy.logprobs(qr, mask, ro.context_len, temperature, trunk=policy_trunk)[0]
    laps.lap("policy")
    out["ref_logprobs"] = models.reference.logprobs(qr, mask, ro.context_len, temperature, trunk=policy_trunk)[0]
    laps.lap("ref")
    out["values"] = models.value.values(qr, mask, ro.context_len, value_trunk)
    laps.lap("value")
    if isinstance(models.reward, RewardEnsemble):  # each member's score kept: their disagreement is logged
        out["member_scores"] = models.reward.member_scores(qr, mask, ro.context_len, ro.lengths[idx], value_trunk)
        out["scores"] = models.reward.combine(out["member_scores"])
    else:
        out["scores"] = models.reward.scores(qr, mask, ro.context_len, ro.lengths[idx], value_trunk)
    laps.lap("reward")
    return out


def non_finite(sc: Scored) -> tuple[str, float] | None:
    """(what, value) of the first rollout quantity with a NaN or inf on any rank (reward model scores, values,
    advantages), or None when all are finite; every rank gets the same answer."""
    for x, what in ((sc.scores, "reward model score"), (sc.values, "value"), (sc.advantages, "advantage")):
        bad = ~torch.isfinite(x)
        if distributed.max_over_ranks(int(bad.sum())):
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


def ppo_update(models: PPOModels, state: PPOState, ro: Rollout, sc: Scored, cfg: PPOConfig, ptx: list[list[int]],
               pad_id: int) -> tuple[dict, float]:
    """PPO epochs over shuffled minibatches; each optimizer step adds the ptx term. Returns stats (over
    all ranks) and the seconds spent on ptx. Each rank holds 1/world of the rollout and of every
    minibatch; a minibatch's loss is normalised by the response tokens of all ranks' shares.
    ``optimizer`` has two parameter groups, the policy's then the value model's, each clipped on its own."""
    mini = cfg.mini_batch_size // distributed.world_size()
    stats = UpdateStats(cfg.ppo_epochs * math.ceil(len(ro.lengths) / mini))
    ptx_seconds = 0.0
    models.policy.train(), models.value.train()
    for epoch in range(cfg.ppo_epochs):
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + state.step * 1_009 + epoch)
        for mb_i, mb in enumerate(micro_batches(torch.randperm(len(ro.lengths), generator=gen), mini)):
            minibatch_backward(models, ro, sc, mb, cfg, stats, first=epoch == 0 and mb_i == 0)
            if cfg.ptx_coef > 0:
                ptx_seconds += ptx_term(models.policy, ptx, state.ptx_cursor, cfg, pad_id,
                                        ro.query_response.device, stats)
            # policy and value clipped each on its own norm: ptx's gradient (ptx_coef 27.8) does not shrink the value's
            norm_policy, norm_value = state.optimizer_step_by_group(cfg.optim.grad_clip)
            stats.add("step", {"train/grad_norm": math.hypot(norm_policy, norm_value),
                               "train/grad_norm_policy": norm_policy, "train/grad_norm_value": norm_value},
                      same_on_ranks=True)  # taken after the gradients' all-reduce
    return stats.means(), ptx_seconds


def minibatch_backward(models: PPOModels, ro: Rollout, sc: Scored, mb: torch.Tensor, cfg: PPOConfig,
                       stats: UpdateStats, first: bool) -> None:
    """Backward of minibatch ``mb``'s PPO loss (pg + vf_coef * vf), micro-batch by micro-batch, each weighted by
    its share of the response tokens of all ranks' parts of the minibatch; its metrics into ``stats``."""
    mask_all = ro.response_mask.float()
    n_tokens = distributed.sum_over_ranks(mask_all[mb].sum()).clamp(min=1)
    scale = distributed.world_size()  # DDP and FSDP average gradients over ranks; the losses want their sum
    micros = micro_batches(mb, cfg.optim.batch_size)
    for j, idx in enumerate(micros):
        weight = mask_all[idx].sum() / n_tokens  # micro-batch share of the minibatch's tokens
        last = j == len(micros) - 1  # DDP reduces in the last backward of a model (ptx's, for the policy)
        with models.policy.syncing(last and cfg.ptx_coef == 0), models.value.syncing(last):
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
    logprobs, entropy = models.policy.logprobs(qr, mask, ro.context_len, cfg.temperature, entropy=True,
                                               trunk=trunk(models.frozen_policy, sc.policy_trunk, idx))
    pg_loss, pg = policy_loss(logprobs, sc.logprobs[idx], sc.advantages[idx], rmask, cfg.cliprange)
    values = models.value.values(qr, mask, ro.context_len, trunk(models.frozen_value, sc.value_trunk, idx))
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
    """The PPO-ptx term of optimizer step ``opt_step`` (0-based: the optimizer steps applied so far,
    ``PPOState.ptx_cursor``, saved with the run): backward of ``ptx_coef`` x the mean next-token loss over every
    token of the step's ``ptx_batch_size`` pretraining blocks, into the gradients the step's PPO micro-batches
    left, for the same optimizer step (C.4: "we mix in pretraining gradients"). Returns this rank's part of that
    mean.

    The blocks are the next ones of the data's shuffled passes (``train.stream_indices``): exactly
    ``ptx_batch_size`` per step, each block once a pass. They run ``ptx_micro_batch_size`` at a time (memory
    only): each micro-batch's summed loss is divided by the tokens of the whole ptx batch, so any split
    gives the same gradient. Micro-batch j goes to rank j mod W; every rank runs as many (weight 0 where it
    has none left, ``distributed.rank_chunks``), and the policy's gradients are reduced in the last one."""
    blocks = [ptx[i] for i in stream_indices(len(ptx), opt_step, cfg.ptx_batch_size, cfg.seed)]
    n_tokens = sum(len(b) - 1 for b in blocks)  # predicted tokens of the whole ptx batch, all ranks
    scale = distributed.world_size()  # DDP and FSDP average gradients over ranks; the loss wants their sum
    mine = distributed.rank_chunks(micro_batches(blocks, cfg.ptx_micro_batch_size or cfg.optim.batch_size))
    summed_loss = 0.0
    for j, (chunk, weight) in enumerate(mine):
        ids, mask = (x.to(device) for x in pad_right(chunk, pad_id))
        with policy.syncing(j == len(mine) - 1):
            summed, _ = policy.lm_loss_sum(ids, mask)
            (summed * (cfg.ptx_coef * weight * scale / n_tokens)).backward()
        summed_loss += float(summed.detach()) * weight
    return summed_loss / n_tokens


def iteration_metrics(cfg: PPOConfig, state: PPOState, i: int, ro: Rollout, sc: Scored, stats: dict) -> dict:
    """Iteration ``i``'s metrics but timings (TRL's names). Means over all ranks' responses (every rank has as
    many), the EOS count summed: the KL controller sees the global KL, so beta stays the same on every rank."""
    batch = distributed.reduce_metrics({
        "kl": float(sc.kl.sum(1).mean()), "scores": float(sc.scores.mean()),
        "rlhf_reward": float(sc.rewards.sum(1).mean()), "eos": int(ro.has_eos.sum()),
        "length": float(ro.lengths.float().mean()),
        # an ensemble's disagreement: its members' std per response, and their mean score (in the same all-reduce)
        **({"rm_std": float(sc.member_scores.std(dim=1).mean()), "rm_mean": float(sc.member_scores.mean())}
           if sc.member_scores is not None else {})}, sums=("eos",))
    kl = batch["kl"]
    return {
        "episode": (i + 1) * cfg.rollout_batch_size, "objective/kl": kl, "objective/scores": batch["scores"],
        "objective/entropy": stats.pop("policy/entropy"), "objective/beta": state.beta,
        "objective/non_score_reward": -state.beta * kl,
        "objective/rlhf_reward": batch["rlhf_reward"],  # penalised score - beta * KL
        "val/num_eos_tokens": batch["eos"], "val/eos_rate": batch["eos"] / cfg.rollout_batch_size,
        "val/response_length": batch["length"],
        **({"objective/rm_std": batch["rm_std"], "objective/rm_mean": batch["rm_mean"]}
           if sc.member_scores is not None else {}),
        **stats, "train/lr_value": state.scheduler.get_last_lr()[1],
    }


def export(cfg: PPOConfig, stage: Stage, trained: "PolicyAndValue", inp: Inputs, ema: ModelEMA | None = None) -> None:
    """ppo/final/policy (HF causal LM) and ppo/final/value, and with an EMA ppo/final/policy_ema (the policy with
    the averaged weights; with LoRA the average of the merged weights, a merged model without adapter/), written
    by rank 0 and published together; sharded models are first gathered into plain copies there."""
    policy = distributed.full_model(trained.policy, lambda: cpu_copy(cfg, inp.tokenizer, inp.sft_path, "causal"))
    value = distributed.full_model(trained.value, lambda: cpu_copy(cfg, inp.tokenizer, inp.rm_path, "reward"))
    averaged = ema.state() if ema is not None else None  # every rank: a sharded average is gathered
    if distributed.is_main():
        with building(stage.final) as tmp:  # a full disk: no partial final/, the previous one (if any) kept
            save_final(policy, inp.tokenizer, tmp / "policy")
            save_final(value, inp.tokenizer, tmp / "value")
            if averaged is not None:  # training is over: the policy's weights make way for their average
                save_final(averaged_model(policy, averaged), inp.tokenizer, tmp / "policy_ema")


def check_watch_resumed(watch: Watch, stage: Stage, step: int) -> None:
    """A resumed watched run: its checkpoint must hold the watch's record (a run that was not watched from its
    start has no SFT point, which a pairwise judge compares with), and ppo/best/ must be the restored best. A run
    killed after it wrote a new best/ but before its next checkpoint left a best/ the resumed run reaches again
    only when it repeats those iterations bit for bit (the same thread count, no --allow-changes); where the
    manifest's best is not the restored one, best/ is removed (the next new best writes it again) and said."""
    import shutil

    from ..rundir import read_manifest, update_manifest

    if not watch.record.points:
        raise BadInput([f"--watch: {stage.dir} was not watched from its start (its checkpoint at step {step} has no "
                        "watch record); start it over with --overwrite, or resume it without --watch"])
    recorded = read_manifest(stage.run_dir).get("stages", {}).get(STAGE, {}).get("best")
    restored = watch.record.state.best_iteration if watch.record.state else None
    if recorded and recorded.get("step") != restored and distributed.is_main():
        shutil.rmtree(stage.dir / "best", ignore_errors=True)
        update_manifest(stage.run_dir, STAGE, best=None)
        say(f"note: {stage.dir / 'best'} held iteration {recorded.get('step')}'s policy, written after the checkpoint "
            f"this run resumes from (step {step}); removed: the next new best writes it again")


def save_best(cfg: PPOConfig, stage: Stage, trained: "PolicyAndValue", inp: Inputs, point: dict) -> None:
    """ppo/best/: the policy at the watch's best gold so far (a plain HF directory like final/policy, sealed),
    its step and figures in the manifest (``ppo@best``, ``igpt status``). Replaced whole at each new best."""
    from ..rundir import update_manifest

    policy = distributed.full_model(trained.policy, lambda: cpu_copy(cfg, inp.tokenizer, inp.sft_path, "causal"))
    if distributed.is_main():
        save_final(policy, inp.tokenizer, stage.dir / "best")
        update_manifest(stage.run_dir, STAGE, best={"path": str(stage.dir / "best"), "step": point["step"],
                                                    "gold": point["gold"], "gold_ci": point["gold_ci"],
                                                    "proxy": point["proxy"], "kl": point["kl"], "judge": cfg.watch})


def write_samples(stage: Stage, step: int, prompts: list[str], responses: list[list[int]], sc: Scored,
                  tokenizer) -> None:
    """ppo/samples/step-NNNNNN.jsonl: what the policy says now, with its score and KL. Every rank sends
    its share; rank 0 writes them in the step's prompt order."""
    from ..storage import atomic_write_text

    lines = [json.dumps({"prompt": p, "response": decode_response(tokenizer, r), "score": float(s), "kl": float(k)},
                        ensure_ascii=False)
             for p, r, s, k in zip(prompts, responses, sc.scores, sc.kl.sum(1))]
    parts = distributed.gather(lines)  # parts[r][k] is prompt k * world + r of the step
    if distributed.is_main():
        lines = [line for group in zip(*parts) for line in group]
        atomic_write_text(stage.dir / "samples" / f"step-{step:06d}.jsonl", "\n".join(lines) + "\n")
