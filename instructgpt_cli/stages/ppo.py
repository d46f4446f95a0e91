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

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .. import distributed
from ..config import LoraConfig, ModelConfig, PPOConfig
from ..console import banner, model_rows, processes_note, say
from ..batches import pretrain_blocks, render_queries
from ..data import read_pretrain, read_prompts
from ..ema import ModelEMA, averaged_model
from ..distributed import resolve_device
from ..errors import BadInput
from ..families import frozen_layers
from ..forward import forward_name
from ..losses import adaptive_kl_beta
from ..models import apply_lora, load_model, load_tokenizer, position_limit, require_same_tokenizer, save_final
from ..rewards import reward_stats
from ..rollout import Rollout, build_rollout, decode_response, generate
from ..rundir import Stage, file_input, find_model, model_input
from ..stats import describe_rm_accuracy
from ..storage import building
from ..lifecycle import begin_stage, finish_stage, open_stage
from .ppo_step import PolicyAndValue, PPOModels, Scored, non_finite, ppo_update, score_rollout
from ..train import build_optimizer, build_scheduler, fit, restore, skip_step, stream_indices

STAGE = "ppo"


def load_models(cfg: PPOConfig, tokenizer, sft_path: Path, rm_path: Path, device: torch.device) -> PPOModels:
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
        return PPOModels(policy, value, reference=policy, reward=value, reference_ctx=policy.disable_adapter,
                         reward_ctx=value.disable_adapter)
    ref = load_model(ModelConfig(**{**vars(base), "name": str(sft_path)}), tokenizer, sft_path, device, cfg.seed)
    rm = load_model(ModelConfig(**{**vars(base), "name": str(rm_path)}), tokenizer, rm_path, device, cfg.seed,
                    kind="reward")
    for frozen in (ref, rm):
        frozen.eval().requires_grad_(False)
    return PPOModels(policy, value, reference=ref, reward=rm)


def no_dropout(lora: LoraConfig) -> LoraConfig:
    """The LoRA block with its dropout off: a dropped adapter input in training but not in scoring would
    make the ratio differ from 1 at the first minibatch (the model's own dropout is set to 0 likewise)."""
    return LoraConfig(**{**vars(lora), "dropout": 0.0})


def runners(models: PPOModels, cfg: PPOConfig, device: torch.device) -> PPOModels:
    """The models as PPO calls them (``distributed.wrap``): policy and value train under DDP or FSDP;
    the frozen reference and RM are sharded under FSDP and kept whole under DDP. With LoRA those two
    are the policy and value runners with adapters disabled, and with LoRA on the top layers only
    ``frozen_*`` count the layers below, which scoring runs once per rollout for both uses of a model and
    whose output every training forward of the rollout reuses (not under FSDP, which shards the layers)."""
    policy = distributed.wrap(models.policy, device, cfg.fsdp)
    value = distributed.wrap(models.value, device, cfg.fsdp)
    frozen = (0, 0)  # lowest layers run once per rollout (``frozen_layers``)
    if cfg.lora.enabled and cfg.cache_frozen_layers and not (cfg.fsdp and distributed.world_size() > 1):
        frozen = frozen_layers(models.policy), frozen_layers(models.value)
    if cfg.lora.enabled:
        reference, reward = policy, value
    else:
        reference = distributed.wrap(models.reference, device, cfg.fsdp, trainable=False)
        reward = distributed.wrap(models.reward, device, cfg.fsdp, trainable=False)
    return replace(models, policy=policy, value=value, reference=reference, reward=reward, frozen_policy=frozen[0],
                   frozen_value=frozen[1])


def cpu_copy(cfg: PPOConfig, tokenizer, path: Path, kind: str):
    """The policy's ('causal') or value model's ('reward') architecture on the CPU, to receive the gathered
    weights of a sharded model for export."""
    model = load_model(ModelConfig(**{**vars(cfg.model), "dropout": 0.0, "name": str(path)}), tokenizer, path,
                       torch.device("cpu"), cfg.seed, kind=kind)
    if cfg.lora.enabled:
        model = apply_lora(model, no_dropout(cfg.lora), task_type="CAUSAL_LM" if kind == "causal" else "SEQ_CLS")
    return model


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


def run(cfg: PPOConfig, resume: bool = False, overwrite: bool = False, allow_changes: bool = False) -> Path:
    # 1. validate every input before anything is written
    check_flags(cfg)
    inp = read_inputs(cfg)
    stage = Stage(Path(cfg.run_dir), STAGE)
    device = resolve_device(cfg.device)
    files = {"prompts": file_input(cfg.prompts, cfg.split, cfg.columns), "sft": model_input(inp.sft_path), "rm": model_input(inp.rm_path)}
    if inp.ptx_texts:
        files["ptx_data"] = file_input(cfg.ptx_data, cfg.split, cfg.columns)
    mode, changes = open_stage(stage, cfg, files, resume, overwrite, allow_changes)  # lock; what resume changes
    if mode == "done":
        say(f"ppo: {stage.final} is already complete; nothing to do")
        return stage.final
    ptx = pretrain_blocks(inp.tokenizer, inp.ptx_texts, cfg.ptx_seq_len) if inp.ptx_texts else []
    if inp.ptx_texts and not ptx:
        raise BadInput([f"--ptx-data {cfg.ptx_data}: its text makes no block of 2 tokens or more to train on"])

    # 2. models, optimizer, schedule
    torch.manual_seed(cfg.seed)  # sampling; a resumed run restores the RNG state of its checkpoint
    loaded = load_models(cfg, inp.tokenizer, inp.sft_path, inp.rm_path, device)
    trained = PolicyAndValue(loaded.policy, loaded.value)
    models = runners(loaded, cfg, device)  # DDP or FSDP under a launcher; FSDP shards trained's parameters
    distributed.seed_rank(cfg.seed)
    total_steps = iterations(cfg, len(inp.prompts))
    # two parameter groups: the value model has its own learning rate (InstructGPT C.4) and gradient clip
    optimizer = build_optimizer(trained, cfg.optim, {"policy": cfg.optim.lr, "value": cfg.vf_lr or cfg.optim.lr})
    scheduler = build_scheduler(optimizer, cfg.optim,
                                total_steps * cfg.ppo_epochs * math.ceil(cfg.rollout_batch_size / cfg.mini_batch_size))
    # an EMA of the policy's weights (with LoRA the adapted ones), updated after every optimizer step (InstructGPT,
    # appendix C: 0.992)
    ema = ModelEMA(trained.policy, cfg.ema_decay, optimizer) if cfg.ema_decay > 0 else None

    # 3. the stage directory and the resume point (the KL controller's beta travels with the checkpoint)
    begin_stage(stage, mode, cfg, files)
    step, extra, ckpt = restore(stage, mode, trained, optimizer, scheduler, changes)
    if ema is not None:
        ema.load(extra.get("ema"))
    iteration = Iteration(cfg, stage, inp, models, trained, optimizer, scheduler, ptx, device, total_steps,
                          beta=float(extra.get("beta", cfg.beta)))
    banner("igpt ppo", banner_rows(cfg, inp, ptx, device, total_steps, iteration.beta, trained, ckpt))
    if inp.rm_warning:
        say(f"[bold red]warning:[/] {inp.rm_warning}")

    # 4. iterate: rollout, score, update
    def checkpointed() -> dict:  # what a checkpoint holds besides the trained weights: beta, the EMA
        return {"beta": iteration.beta, **({"ema": ema.state()} if ema else {})}

    step = fit(stage, trained, optimizer, scheduler, step, total_steps, iteration, None, 1, cfg.save_every,
               cfg.keep_checkpoints, extra_state=checkpointed,
               headline=("objective/scores", "objective/kl", "val/response_length"), log_every=cfg.log_every)

    # 5. export from rank 0: ppo/final/policy (HF causal LM), ppo/final/value (and policy_ema), published together
    export(cfg, stage, trained, inp, ema)
    finish_stage(stage, step, policy=str(stage.final / "policy"), value=str(stage.final / "value"),
                 **({"policy_ema": str(stage.final / "policy_ema")} if ema else {}))
    # the phases add up to the whole; timing/scoring/<model> split the scoring phase
    total_s = sum(v for k, v in iteration.timings.items() if k.count("/") == 1) or 1.0
    banner("where the time went", {("  " * (k.count("/") - 1)) + k.split("/")[-1]:
                                   f"{v:.1f}s ({100 * v / total_s:.0f}%)" for k, v in iteration.timings.items()})
    return stage.final


def check_flags(cfg: PPOConfig) -> None:
    """The flags that must go together, before any file is read."""
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


def read_inputs(cfg: PPOConfig) -> Inputs:
    """Prompts, pretraining text, the SFT and reward models' paths and tokenizer (one for both), the queries
    (prompt + response must fit model.max_seq_len and what the policy and reward model were built for)."""
    prompts = read_prompts(cfg.prompts, cfg.split, cfg.columns)
    ptx_texts = read_pretrain(cfg.ptx_data, cfg.split, cfg.columns) if cfg.ptx_coef > 0 else []
    run_dir = Path(cfg.run_dir)
    sft_path = Path(find_model(cfg.sft, run_dir, "sft", "--sft"))
    rm_path = Path(find_model(cfg.rm, run_dir, "rm", "--rm"))
    tokenizer, _ = load_tokenizer(ModelConfig(name=str(sft_path)))
    require_same_tokenizer(tokenizer, sft_path, {"--rm": rm_path},
                           "the reward model must read the policy's tokens (train it from the same SFT model)")
    limits = [position_limit(str(p), cfg.model.trust_remote_code) for p in (sft_path, rm_path)]
    context = min([cfg.model.max_seq_len, *filter(None, limits)])
    queries = render_queries(tokenizer, prompts, cfg.max_new_tokens, context)
    rm_accuracy, rm_warning = check_rm_accuracy(cfg, rm_path)
    return Inputs(prompts, queries, ptx_texts, sft_path, rm_path, tokenizer, rm_accuracy, rm_warning)


def check_rm_accuracy(cfg: PPOConfig, rm_path: Path) -> tuple[str, str | None]:
    """The accuracy train-rm saved with the reward model, described, and a warning when it is poor: a reward
    model that learned nothing sends PPO after noise. Below ``require_rm_accuracy``, or without a record
    when it is set, a BadInput."""
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
                trained: PolicyAndValue, ckpt: Path | None) -> dict[str, str]:
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
        "reward model": inp.rm_accuracy,
        "objective": f"beta {beta}" + (f" -> KL {cfg.target_kl}" if cfg.target_kl else " (fixed)")
                     + (f", ptx gamma {cfg.ptx_coef} on {len(ptx)} blocks of {cfg.ptx_seq_len}" if ptx else ", no ptx"),
        "steps": f"{total_steps} iterations x {cfg.ppo_epochs} epochs x {math.ceil(B / cfg.mini_batch_size)} "
                 "minibatches" + processes_note(cfg.fsdp) + f"; {episodes}",
        "lr": f"policy {cfg.optim.lr:g}, value {cfg.vf_lr or cfg.optim.lr:g}; {clip}",
        "forward": f"policy {forward_name(trained.policy)}, value {forward_name(trained.value)}",
        **({"EMA": f"decay {cfg.ema_decay:g} per optimizer step -> final/policy_ema"} if cfg.ema_decay else {}),
        **model_rows(trained, cfg.lora.enabled, ckpt),
    }


@dataclass
class Iteration:
    """``fit``'s train step: PPO iteration ``i`` samples, scores and updates, and returns its metrics record.
    ``beta`` is the KL controller's (checkpointed); ``timings`` add up each timing/ metric over the run."""

    cfg: PPOConfig
    stage: Stage
    inp: Inputs
    models: PPOModels
    trained: PolicyAndValue
    optimizer: Any
    scheduler: Any
    ptx: list[list[int]]
    device: torch.device
    total_steps: int
    beta: float
    timings: dict[str, float] = field(default_factory=dict)

    def __call__(self, i: int) -> dict:
        cfg, tokenizer = self.cfg, self.inp.tokenizer
        t0 = time.perf_counter()
        mine, responses, ro = self.sample(i)
        t1 = time.perf_counter()
        sc = score_rollout(self.models, ro, cfg, self.beta, 2 * cfg.optim.batch_size)  # no grad: twice the micro-batch
        t2 = time.perf_counter()
        bad = non_finite(sc)
        if bad is None:
            stats, ptx_s = ppo_update(self.models, self.trained, self.optimizer, self.scheduler, ro, sc, cfg, self.ptx,
                                      i, tokenizer.pad_token_id)
        else:  # no update from a NaN reward, value or advantage: the iteration is a skipped step
            skip_step(*bad)
            stats, ptx_s = {"policy/entropy": float("nan")}, 0.0
        t3 = time.perf_counter()
        record = {**self.record(i, ro, sc, stats), "timing/generation": t1 - t0, "timing/scoring": t2 - t1,
                  **{f"timing/scoring/{part}": v for part, v in sc.seconds.items()},
                  "timing/training": t3 - t2 - ptx_s, "timing/ptx": ptx_s}
        if cfg.target_kl > 0 and bad is None:  # a skipped iteration trained nothing: its KL moves no beta
            self.beta = adaptive_kl_beta(self.beta, record["objective/kl"], cfg.target_kl, cfg.kl_horizon,
                                         cfg.rollout_batch_size)
        if (i + 1) % cfg.sample_every == 0 or i + 1 == self.total_steps:
            write_samples(self.stage, i + 1, [self.inp.prompts[j].prompt for j in mine], responses, sc, tokenizer)
        record["timing/other"] = time.perf_counter() - t3
        for k, v in record.items():
            if k.startswith("timing/"):
                self.timings[k] = self.timings.get(k, 0.0) + v
        return record

    def sample(self, i: int) -> tuple[list[int], list[list[int]], Rollout]:
        """This rank's prompts of iteration ``i`` (indices), the policy's responses and their rollout."""
        cfg, tokenizer = self.cfg, self.inp.tokenizer
        idx = stream_indices(len(self.inp.prompts), i, cfg.rollout_batch_size, cfg.seed)  # a pass's end continues
        mine = idx[distributed.rank()::distributed.world_size()]  # a multiple of world: every rank B / world
        batch_queries = [self.inp.queries[j] for j in mine]
        with torch.no_grad():  # outside the runner too: DDP must not expect a backward of this forward
            responses = self.models.policy(generate, tokenizer, batch_queries, cfg.max_new_tokens, cfg.temperature,
                                           cfg.optim.batch_size * 2, distributed.is_sharded(self.trained))
        ro = Rollout(*(x.to(self.device) if torch.is_tensor(x) else x for x in
                       build_rollout(batch_queries, responses, tokenizer.pad_token_id, tokenizer.eos_token_id)))
        return mine, responses, ro

    def record(self, i: int, ro: Rollout, sc: Scored, stats: dict) -> dict:
        """Iteration ``i``'s metrics but timings. Means over all ranks' responses (every rank has as many),
        the EOS count summed: the KL controller sees the global KL, so beta stays the same on every rank."""
        batch = distributed.reduce_metrics({
            "kl": float(sc.kl.sum(1).mean()), "scores": float(sc.scores.mean()),
            "rlhf_reward": float(sc.rewards.sum(1).mean()), "eos": int(ro.has_eos.sum()),
            "length": float(ro.lengths.float().mean())}, sums=("eos",))
        kl = batch["kl"]
        return {
            "episode": (i + 1) * self.cfg.rollout_batch_size, "objective/kl": kl, "objective/scores": batch["scores"],
            "objective/entropy": stats.pop("policy/entropy"), "objective/beta": self.beta,
            "objective/non_score_reward": -self.beta * kl,
            "objective/rlhf_reward": batch["rlhf_reward"],  # penalised score - beta * KL
            "val/num_eos_tokens": batch["eos"], "val/eos_rate": batch["eos"] / self.cfg.rollout_batch_size,
            "val/response_length": batch["length"],
            **stats, "train/lr_value": self.scheduler.get_last_lr()[1],
        }


def export(cfg: PPOConfig, stage: Stage, trained: PolicyAndValue, inp: Inputs, ema: ModelEMA | None = None) -> None:
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
