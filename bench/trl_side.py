"""The TRL side: SFTTrainer and RewardTrainer of the current TRL release, and the PPO trainer of TRL 1.12.0
(``trl.experimental.ppo``, the last release that has it), on the same models, token ids, data order and
hyperparameters as the igpt side.

Settings that differ from TRL's defaults so that both sides do the same work: fp32 (``bf16=False``), no
gradient checkpointing (igpt has none), AdamW betas (0.9, 0.95) and igpt's learning-rate schedules, the
batch sizes below, and a sequential sampler over a dataset laid out in igpt's data order. Implementation
choices stay TRL's own (its default fused AdamW, its loss code, its collators).
Per-step wall times are taken at ``on_step_end`` (one optimizer step; for PPO one update = one rollout
batch); the peak RSS at ``on_train_end``.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from common import DATA, model_dir, vm_hwm_mb

COMMON_ARGS = dict(learning_rate=1e-5, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, weight_decay=0.0,
                   warmup_steps=0, gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True,
                   report_to="none", save_strategy="no", logging_steps=1_000_000, disable_tqdm=True, seed=0,
                   dataloader_num_workers=0)


def _clock():
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.ticks: list[float] = []
            self.peak = None

        def on_step_end(self, args, state, control, **kwargs):
            self.ticks.append(time.perf_counter())

        def on_train_end(self, args, state, control, **kwargs):
            self.peak = vm_hwm_mb()

    return Clock()


def _seconds(clock, warmup: int) -> list[float]:
    t = clock.ticks
    return [t[i] - t[i - 1] for i in range(max(warmup, 1), len(t))]


def _versions() -> dict:
    import torch
    import transformers
    import trl

    return {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__}


def sft(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from workloads import sft_plan

    plan = sft_plan(spec)
    rows = [{"input_ids": plan["examples"][j].input_ids, "labels": plan["examples"][j].labels}
            for s in plan["steps"] for j in s["indices"]]
    out = Path(tempfile.mkdtemp(prefix="trl-bench-sft-"))
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir(spec["shape"], "policy"), dtype=torch.float32)
        args = SFTConfig(output_dir=str(out), per_device_train_batch_size=spec["batch_size"],
                         gradient_accumulation_steps=1, max_steps=plan["total_steps"],
                         lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
                         max_grad_norm=1.0, train_sampling_strategy="sequential", max_length=1024, packing=False,
                         **COMMON_ARGS)
        clock = _clock()
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=plan["tokenizer"], callbacks=[clock])
        res = trainer.train()
        timed = plan["steps"][spec["warmup"]:]
        return {"step_seconds": _seconds(clock, spec["warmup"]), "units_per_step": [s["tokens"] for s in timed],
                "flops_per_step": [s["flops"] for s in timed], "peak_rss_mb": clock.peak or vm_hwm_mb(),
                "notes": {"versions": _versions(), "optim": str(args.optim), "train_loss_mean": res.training_loss,
                          "tokens_total": trainer._total_train_tokens,
                          "tokens_total_expected": sum(s["tokens"] for s in plan["steps"])}}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def rm(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from workloads import rm_plan

    plan = rm_plan(spec)
    groups = plan["groups"]
    rows = [{"chosen_ids": groups[gi].sequences[b], "rejected_ids": groups[gi].sequences[w]}
            for step in plan["order"] for gi in step for b, w in groups[gi].pairs]
    out = Path(tempfile.mkdtemp(prefix="trl-bench-rm-"))
    try:
        model = AutoModelForSequenceClassification.from_pretrained(model_dir(spec["shape"], "policy"), num_labels=1,
                                                                   dtype=torch.float32)
        model.config.pad_token_id = plan["tokenizer"].pad_token_id
        args = RewardConfig(output_dir=str(out), per_device_train_batch_size=plan["comparisons_per_step"],
                            gradient_accumulation_steps=1, max_steps=plan["total_steps"],
                            lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
                            max_grad_norm=1.0, train_sampling_strategy="sequential", max_length=1024,
                            **COMMON_ARGS)
        clock = _clock()
        trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                processing_class=plan["tokenizer"], callbacks=[clock])
        res = trainer.train()
        seconds = _seconds(clock, spec["warmup"])
        return {"step_seconds": seconds, "units_per_step": [plan["comparisons_per_step"]] * len(seconds),
                "flops_per_step": [plan["trl_flops_per_step"]] * len(seconds),
                "peak_rss_mb": clock.peak or vm_hwm_mb(),
                "notes": {"versions": _versions(), "optim": str(args.optim),
                          "sequences_per_step": plan["trl_sequences_per_step"], "forwards_per_comparison": 2,
                          "train_loss_mean": res.training_loss, "tokens_total": trainer._total_train_tokens}}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def dpo(spec: dict) -> dict:
    """TRL's DPOTrainer on the same rankings expanded to their C(K,2) (chosen, rejected) pairs, in igpt's order,
    its reference log-probs precomputed before training (``precompute_ref_log_probs``) as igpt's are."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from instructgpt_cli.batches import render_prompt
    from instructgpt_cli.data import read_rankings
    from workloads import rm_plan

    plan = rm_plan(spec)
    tok = plan["tokenizer"]
    rankings = read_rankings(plan["data"])
    rows = []
    for step in plan["order"]:
        for gi in step:
            r = rankings[gi]
            prompt = tok.decode(render_prompt(tok, r.messages))
            rows += [{"prompt": prompt, "chosen": r.responses[b], "rejected": r.responses[w]}
                     for b, w in plan["groups"][gi].pairs]
    out = Path(tempfile.mkdtemp(prefix="trl-bench-dpo-"))
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir(spec["shape"], "policy"), dtype=torch.float32)
        args = DPOConfig(output_dir=str(out), per_device_train_batch_size=plan["comparisons_per_step"],
                         gradient_accumulation_steps=1, max_steps=plan["total_steps"], lr_scheduler_type="linear",
                         max_grad_norm=1.0, train_sampling_strategy="sequential", max_length=1024, beta=0.1,
                         precompute_ref_log_probs=True, **{**COMMON_ARGS, "learning_rate": 1e-6})
        clock = _clock()
        trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                             callbacks=[clock])
        res = trainer.train()
        seconds = _seconds(clock, spec["warmup"])
        return {"step_seconds": seconds, "units_per_step": [plan["comparisons_per_step"]] * len(seconds),
                "flops_per_step": [plan["trl_flops_per_step"]] * len(seconds),
                "peak_rss_mb": clock.peak or vm_hwm_mb(),
                "notes": {"versions": _versions(), "sequences_per_step": plan["trl_sequences_per_step"],
                          "train_loss_mean": res.training_loss}}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def ppo(spec: dict) -> dict:
    """TRL 1.12's PPOTrainer. It steps the optimizer once every ``gradient_accumulation_steps`` micro-batches,
    i.e. once per PPO epoch over the whole rollout batch whatever ``num_mini_batches`` is; igpt is therefore
    run with one minibatch per epoch (mini_batch_size = rollout_batch_size), the only layout both share."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from common import load_tokenizer_for
    from instructgpt_cli.data import read_prompts
    from instructgpt_cli.batches import render_prompt
    from workloads import ppo_plan

    plan = ppo_plan(spec)
    shape = spec["shape"]
    tok = load_tokenizer_for(shape)
    tok.padding_side = "left"
    queries = [render_prompt(tok, p.messages) for p in read_prompts(DATA / shape / "prompts.jsonl")]
    ds = Dataset.from_list([{"input_ids": q} for q in queries])
    out = Path(tempfile.mkdtemp(prefix="trl-bench-ppo-"))
    try:
        pdir, rdir = model_dir(shape, "policy"), model_dir(shape, "reward")
        load_lm = lambda: AutoModelForCausalLM.from_pretrained(pdir, dtype=torch.float32)  # noqa: E731
        load_rm = lambda: AutoModelForSequenceClassification.from_pretrained(rdir, num_labels=1,  # noqa: E731
                                                                             dtype=torch.float32)
        policy, ref, value, reward = load_lm(), load_lm(), load_rm(), load_rm()
        for m in (policy, ref, value, reward):
            m.config.pad_token_id = tok.pad_token_id
        policy.generation_config.pad_token_id = tok.pad_token_id
        micro, batch = spec["micro_batch"], spec["rollout_batch"]
        args = PPOConfig(output_dir=str(out), per_device_train_batch_size=micro,
                         gradient_accumulation_steps=batch // micro, num_mini_batches=1,
                         num_ppo_epochs=spec["ppo_epochs"], total_episodes=plan["episodes"],
                         response_length=spec["response_length"], temperature=spec["temperature"],
                         kl_coef=spec["kl_coef"], missing_eos_penalty=1.0, stop_token="eos",
                         local_rollout_forward_batch_size=2 * micro, num_sample_generations=0,
                         lr_scheduler_type="constant", sft_model_path=str(pdir), reward_model_path=str(rdir),
                         **COMMON_ARGS)
        clock = _clock()
        trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                             train_dataset=ds, value_model=value, eval_dataset=ds, callbacks=[clock])
        trainer.train()
        seconds = _seconds(clock, spec["warmup"])
        return {"step_seconds": seconds, "units_per_step": [batch] * len(seconds),
                "peak_rss_mb": clock.peak or vm_hwm_mb(),
                "notes": {"versions": _versions(), "optim": str(args.optim),
                          "updates": len(clock.ticks)}}
    finally:
        shutil.rmtree(out, ignore_errors=True)


TASKS = {"sft": sft, "rm": rm, "ppo": ppo, "dpo": dpo}
