"""Stage configurations: defaults < YAML preset (``--config``) < command-line flags.

Each stage has one dataclass. Every field carries a one-line doc (``metadata["doc"]``) with its unit.
A YAML file holds one section per stage (``sft:``, ``rm:``, ``ppo:``, ``dpo:`` ...), so one preset can configure
the whole pipeline; the resolved config a stage saves (``sft/config.yaml``) has the same shape and can
be passed back with ``--config``. Unknown keys and wrong types are errors that name the file and key.

This module imports no torch: ``igpt --help`` and ``--print-config`` stay instant.
"""
from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from .errors import BadInput
from .presets import build, check_ranges, load_preset, merge, nest


def f(default: Any, doc: str) -> Any:
    """A dataclass field with a default and a one-line doc (the unit goes in the doc)."""
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass
class ModelConfig:
    name: str = f("smollm2-135m", "model source: 'smollm2-135m' (bundled), 'tiny' (random, for tests) or a local HF directory")
    dtype: str = f("auto", "parameter dtype: auto (fp32 on CPU, bf16 on GPUs that support it), float32, bfloat16, float16")
    dropout: float = f(0.0, "dropout probability set on every dropout field of the model config (probability)")
    max_seq_len: int = f(1024, "context window used for training, capped at the model's own (tokens)")
    trust_remote_code: bool = f(False, "allow custom model code from a local directory (never on by default)")
    gradient_checkpointing: bool = f(False, "recompute each decoder layer's activations in the backward instead of "
                                            "keeping them: memory for one layer's activations, not all (about a "
                                            "third more compute per step)")


@dataclass
class LoraConfig:
    enabled: bool = f(False, "train LoRA adapters (peft) instead of all weights")
    r: int = f(16, "LoRA rank (dimensions)")
    alpha: int = f(32, "LoRA scaling numerator; the update is scaled by alpha / r (dimensionless)")
    dropout: float = f(0.0, "dropout on the LoRA input (probability)")
    target_modules: list = f(["all-linear"], "module names to adapt; ['all-linear'] adapts every linear layer but the LM head")
    layers: int = f(8, "adapt only the top N transformer layers (all of a model with no more); the backward stops "
                       "there, and PPO runs the frozen layers below once per rollout; 0 = every layer")


@dataclass
class OptimConfig:
    lr: float = f(1e-5, "peak learning rate (per step)")
    weight_decay: float = f(0.0, "AdamW decoupled weight decay (per step, times lr)")
    beta1: float = f(0.9, "AdamW first-moment decay (dimensionless)")
    beta2: float = f(0.95, "AdamW second-moment decay (dimensionless)")
    eps: float = f(1e-8, "AdamW epsilon (dimensionless)")
    scheduler: str = f("cosine_with_min_lr", "transformers.get_scheduler name: cosine_with_min_lr, cosine, linear, constant_with_warmup ...")
    min_lr_ratio: float = f(0.1, "for cosine_with_min_lr: final lr as a fraction of the peak (InstructGPT decays to 10%)")
    warmup_steps: int = f(0, "linear warmup length (optimizer steps)")
    grad_clip: float = f(1.0, "clip the global gradient norm to this value; 0 disables (L2 norm)")
    batch_size: int = f(8, "micro-batch size (sequences per forward pass)")
    grad_accum: int = f(1, "micro-batches per optimizer step; effective batch = batch_size * grad_accum (sequences)")


@dataclass
class SFTConfig:
    data: str = f("", "demonstrations: JSONL, parquet/CSV/JSON, a datasets directory or cached hub id (required)")
    split: str = f("train", "split to read from a DatasetDict directory or a hub dataset id (name); a single file is "
                            "read whole")
    columns: list = f([], "dataset columns named otherwise, FIELD=COLUMN (e.g. prompt=question,response=answer); "
                          "applies to every input of the stage that has COLUMN")
    run_dir: str = f("runs/default", "run directory shared by all stages (path)")
    model: ModelConfig = f(ModelConfig(), "model block")
    lora: LoraConfig = f(LoraConfig(), "LoRA block")
    optim: OptimConfig = f(OptimConfig(), "optimizer block")
    epochs: int = f(16, "passes over the training split (epochs); InstructGPT trains SFT 16 epochs")
    max_steps: int = f(0, "stop after this many optimizer steps; 0 = run all epochs (steps)")
    val_fraction: float = f(0.05, "share of demonstrations held out for eval loss (fraction, 0 disables)")
    padding_free: bool = f(True, "pack each micro-batch into one row with block-diagonal attention instead of padding "
                                 "(model families known to support it; others are padded)")
    eval_every: int = f(50, "evaluate on the held-out split every N optimizer steps, and at the end (steps)")
    save_every: int = f(100, "write a resumable checkpoint every N optimizer steps (steps)")
    keep_checkpoints: int = f(2, "keep only the newest N complete checkpoints (count)")
    log_every: int = f(0, "in a log file (stderr not a terminal): a progress line every N optimizer steps; 0 = about "
                          "every 30 s (steps)")
    fsdp: bool = f(False, "under torchrun / accelerate launch, shard weights, gradients and optimizer state over the "
                          "processes (FSDP2) instead of replicating them (DDP): for models that do not fit one device")
    report_to: list = f([], "experiment trackers that also receive every metrics.jsonl line and the config, "
                            "comma-separated: tensorboard, wandb, trackio, mlflow (TRL's names; each an extra, "
                            "README 'Experiment trackers'); none by default")
    seed: int = f(0, "seed for initialisation, data order and dropout")
    device: str = f("auto", "auto, cpu, cuda, cuda:N or mps")


@dataclass
class RMConfig:
    rankings: str = f("", "rankings JSONL file: {prompt, responses, ranks} or {prompt, chosen, rejected} (required)")
    demos: str = f("", "demonstrations used to normalise the reward to mean 0; default: the run's SFT data")
    split: str = f("train", "split to read from a DatasetDict directory or a hub dataset id (name); a single file is "
                            "read whole")
    columns: list = f([], "dataset columns named otherwise, FIELD=COLUMN (e.g. prompt=question,response=answer); "
                          "applies to every input of the stage that has COLUMN")
    normalize: bool = f(True, "set the reward bias so the demonstrations score mean 0, as the paper does before RL")
    sft: str = f("", "SFT model directory to initialise from; default: RUN_DIR/sft/final")
    run_dir: str = f("runs/default", "run directory shared by all stages (path)")
    model: ModelConfig = f(ModelConfig(name=""), "model block; model.name, when set, replaces the SFT model as the "
                                                 "initialisation (smollm2-135m, tiny or a directory)")
    lora: LoraConfig = f(LoraConfig(), "LoRA block")
    optim: OptimConfig = f(OptimConfig(batch_size=8), "optimizer block; batch_size counts prompts (rankings), each "
                                                      "with all K of its responses")
    epochs: int = f(1, "passes over the rankings (epochs); the paper trains the RM a single epoch (it overfits after)")
    max_steps: int = f(0, "stop after this many optimizer steps; 0 = run all epochs (steps)")
    val_fraction: float = f(0.1, "share of rankings held out for pairwise accuracy; where rankings have a "
                                 "\"group\", of whole groups (fraction, 0 disables)")
    share_prompts: bool = f(True, "run the prompt a ranking's K responses start with once, each response attending "
                                  "to it and to itself (model families known to support it, where it saves a tenth "
                                  "of the tokens)")
    padding_free: bool = f(True, "pack each micro-batch's responses into one row with block-diagonal attention "
                                 "instead of padding (model families known to support it; others are padded)")
    eval_every: int = f(20, "held-out loss and accuracy every N optimizer steps, and at the end (steps)")
    save_every: int = f(100, "write a resumable checkpoint every N optimizer steps (steps)")
    keep_checkpoints: int = f(2, "keep only the newest N complete checkpoints (count)")
    log_every: int = f(0, "in a log file (stderr not a terminal): a progress line every N optimizer steps; 0 = about "
                          "every 30 s (steps)")
    fsdp: bool = f(False, "under torchrun / accelerate launch, shard weights, gradients and optimizer state over the "
                          "processes (FSDP2) instead of replicating them (DDP): for models that do not fit one device")
    report_to: list = f([], "experiment trackers that also receive every metrics.jsonl line and the config, "
                            "comma-separated: tensorboard, wandb, trackio, mlflow (TRL's names; each an extra, "
                            "README 'Experiment trackers'); none by default")
    seed: int = f(0, "seed for the head initialisation, data order and dropout")
    device: str = f("auto", "auto, cpu, cuda, cuda:N or mps")


@dataclass
class DPOConfig:
    rankings: str = f("", "rankings JSONL file, the one train-rm reads: {prompt, responses, ranks} or {prompt, chosen, "
                          "rejected} (required)")
    sft: str = f("", "SFT model: the policy's initialisation and the frozen reference; default RUN_DIR/sft/final")
    split: str = f("train", "split to read from a DatasetDict directory or a hub dataset id (name); a single file is "
                            "read whole")
    columns: list = f([], "dataset columns named otherwise, FIELD=COLUMN (e.g. prompt=question,chosen=better)")
    run_dir: str = f("runs/default", "run directory shared by all stages (path)")
    model: ModelConfig = f(ModelConfig(name=""), "model block; model.name, when set, replaces the SFT model as policy "
                                                 "and reference (smollm2-135m, tiny or a directory); dropout stays 0 "
                                                 "in DPO")
    lora: LoraConfig = f(LoraConfig(), "LoRA block: the reference is the same weights with adapters disabled; "
                                       "lora.dropout stays 0 in DPO")
    optim: OptimConfig = f(OptimConfig(lr=1e-6, batch_size=8, scheduler="linear"),
                           "optimizer block; batch_size counts prompts (rankings), each with all K of its responses")
    beta: float = f(0.1, "DPO's beta: implicit reward = beta * (log pi - log pi_ref), the KL strength (dimensionless)")
    epochs: int = f(1, "passes over the rankings (epochs)")
    max_steps: int = f(0, "stop after this many optimizer steps; 0 = run all epochs (steps)")
    val_fraction: float = f(0.1, "share of rankings held out for the DPO metrics; where rankings have a \"group\", "
                                 "of whole groups (fraction, 0 disables)")
    share_prompts: bool = f(True, "run the prompt a ranking's K responses start with once, each response attending "
                                  "to it and to itself (model families known to support it, where it saves a tenth "
                                  "of the tokens)")
    padding_free: bool = f(True, "pack each micro-batch's responses into one row instead of padding (model families "
                                 "known to support it; others are padded)")
    eval_every: int = f(20, "held-out DPO loss and reward accuracy every N optimizer steps, and at the end (steps)")
    save_every: int = f(100, "write a resumable checkpoint every N optimizer steps (steps)")
    keep_checkpoints: int = f(2, "keep only the newest N complete checkpoints (count)")
    log_every: int = f(0, "in a log file (stderr not a terminal): a progress line every N optimizer steps; 0 = about "
                          "every 30 s (steps)")
    fsdp: bool = f(False, "under torchrun / accelerate launch, shard weights, gradients and optimizer state over the "
                          "processes (FSDP2) instead of replicating them (DDP): for models that do not fit one device")
    seed: int = f(0, "seed for data order and the held-out split (DPO trains without dropout)")
    device: str = f("auto", "auto, cpu, cuda, cuda:N or mps")


@dataclass
class PPOConfig:
    prompts: str = f("", "prompts JSONL for rollouts: {prompt}, optional category (required)")
    ptx_data: str = f("", "pretraining text for PPO-ptx: JSONL {text} or a .txt file (needed when ptx_coef > 0)")
    split: str = f("train", "split to read from a DatasetDict directory or a hub dataset id (name); a single file is "
                            "read whole")
    columns: list = f([], "dataset columns named otherwise, FIELD=COLUMN (e.g. prompt=question,response=answer); "
                          "applies to every input of the stage that has COLUMN")
    ptx_coef: float = f(0.0, "gamma of PPO-ptx: weight of the pretraining LM loss in every optimizer step; paper 27.8")
    ptx_batch_size: int = f(4, "pretraining sequences per optimizer step (sequences); paper: 8x the RL minibatch")
    ptx_seq_len: int = f(256, "length of each pretraining sequence (tokens)")
    ptx_micro_batch_size: int = f(0, "pretraining sequences per forward and backward of the ptx term, memory only "
                                     "(sequences); 0 = optim.batch_size")
    sft: str = f("", "SFT model: the policy's initialisation and the KL reference; default RUN_DIR/sft/final")
    rm: str = f("", "reward model (also the value model's initialisation); default RUN_DIR/rm/final")
    require_rm_accuracy: float = f(0.0, "refuse to start unless the RM's held-out pairwise accuracy recorded by "
                                        "train-rm is at least this (fraction); 0 = no check")
    run_dir: str = f("runs/default", "run directory shared by all stages (path)")
    model: ModelConfig = f(ModelConfig(name=""), "model block: dtype, max_seq_len; dropout stays 0 in PPO")
    lora: LoraConfig = f(LoraConfig(), "LoRA block: adapters on policy and value; the reference and the reward "
                                       "model are the same weights with adapters disabled (no extra copies); "
                                       "lora.dropout stays 0 in PPO")
    optim: OptimConfig = f(OptimConfig(lr=1e-5, scheduler="constant_with_warmup", warmup_steps=0, batch_size=4),
                           "optimizer block for policy and value; batch_size is the micro-batch (sequences); "
                           "grad_clip clips each model's gradient norm on its own")
    vf_lr: float = f(0.0, "peak learning rate of the value model, in its own parameter group with its own gradient "
                          "clip (per step); 0 = optim.lr; paper 9e-6 (C.4)")
    total_episodes: int = f(0, "stop after this many sampled responses (episodes, the paper's unit), rounded up to "
                                "whole iterations; 0 = use max_steps")
    max_steps: int = f(0, "PPO iterations (each a rollout batch and its update); 0 = one pass over the prompts")
    rollout_batch_size: int = f(16, "prompts per PPO iteration, one response each (episodes), every iteration: "
                                    "a pass's end continues into the next shuffled pass; paper 512")
    mini_batch_size: int = f(8, "responses per optimizer step within an iteration (episodes); paper 64")
    ppo_epochs: int = f(1, "passes over each rollout batch (epochs); the paper uses a single inner epoch")
    temperature: float = f(1.0, "sampling temperature; log-probs use the same logits / T (dimensionless)")
    max_new_tokens: int = f(64, "longest response (tokens)")
    beta: float = f(0.02, "KL penalty coefficient per token on log pi - log pi_SFT; paper 0.02")
    target_kl: float = f(0.0, "adaptive beta: KL to aim for per response (nats); 0 keeps beta fixed (the paper)")
    kl_horizon: int = f(10000, "adaptive beta: controller horizon (episodes), Ziegler et al. 2019")
    gamma: float = f(1.0, "discount (dimensionless); the paper applies none")
    lam: float = f(0.95, "GAE lambda (dimensionless); paper 0.95")
    cliprange: float = f(0.2, "PPO policy ratio clip (dimensionless); paper 0.2")
    cliprange_value: float = f(0.2, "value prediction clip around the rollout values (reward units)")
    vf_coef: float = f(0.1, "weight of the value loss (dimensionless)")
    missing_eos_penalty: float = f(1.0, "subtracted from the score of a response that never emitted EOS (reward units)")
    reward_clip: float = f(0.0, "clip scores to +-this value before the KL penalty; 0 disables (reward units)")
    whiten_advantages: bool = f(True, "normalise advantages to mean 0, std 1 per rollout batch")
    ema_decay: float = f(0.0, "also export ppo/final/policy_ema, an exponential moving average of the policy's "
                              "weights (with LoRA the adapted, merged ones) updated after every optimizer step "
                              "(decay per step); 0 = off; paper 0.992. It starts as the SFT model, with no bias "
                              "correction: decay^N of the start remains after N steps (0.992^96 = 46%)")
    cache_frozen_layers: bool = f(True, "with LoRA on the top layers only: run the frozen layers below them once per "
                                        "rollout and feed their output to every scoring and training forward of the "
                                        "layers above (keeps 2 x rollout x length x hidden floats)")
    sample_every: int = f(10, "write prompts, responses and scores to ppo/samples/ every N iterations")
    save_every: int = f(20, "write a resumable checkpoint every N iterations")
    keep_checkpoints: int = f(2, "keep only the newest N complete checkpoints (count); a frontier (igpt eval ppo "
                                 "--checkpoints all) needs more")
    log_every: int = f(0, "in a log file (stderr not a terminal): a progress line every N optimizer steps; 0 = about "
                          "every 30 s (steps)")
    fsdp: bool = f(False, "under torchrun / accelerate launch, shard weights, gradients and optimizer state over the "
                          "processes (FSDP2) instead of replicating them (DDP): for models that do not fit one device")
    report_to: list = f([], "experiment trackers that also receive every metrics.jsonl line and the config, "
                            "comma-separated: tensorboard, wandb, trackio, mlflow (TRL's names; each an extra, "
                            "README 'Experiment trackers'); none by default")
    seed: int = f(0, "seed for prompt order, sampling and minibatch order")
    device: str = f("auto", "auto, cpu, cuda, cuda:N or mps")


@dataclass
class SampleConfig:
    prompts: str = f("", "prompts JSONL file: {prompt}, optional category (required)")
    split: str = f("train", "split to read from a DatasetDict directory or a hub dataset id (name); a single file is "
                            "read whole")
    columns: list = f([], "dataset columns named otherwise, FIELD=COLUMN (e.g. prompt=question,response=answer); "
                          "applies to every input of the stage that has COLUMN")
    out: str = f("", "output JSONL: {prompt, responses, category} per prompt, ready for ranks (required)")
    k: int = f(4, "responses sampled per prompt (count); the paper's labelers rank K = 4 to 9")
    model: str = f("", "model to sample from: a directory, tiny or smollm2-135m; default RUN_DIR/sft/final")
    run_dir: str = f("runs/default", "run directory whose SFT model is the default (path)")
    temperature: float = f(1.0, "sampling temperature (dimensionless); 0 = greedy")
    max_new_tokens: int = f(128, "longest response (tokens)")
    batch_size: int = f(16, "sequences generated at once (sequences)")
    seed: int = f(0, "sampling seed: the same seed gives the same samples")
    device: str = f("auto", "auto, cpu, cuda, cuda:N or mps")
    dtype: str = f("auto", "parameter dtype: auto, float32, bfloat16, float16")


@dataclass
class EvalConfig:
    model: str = f("", "model to evaluate: a stage of the run (sft, ppo) or a model directory (required)")
    prompts: str = f("", "held-out prompts JSONL: {prompt}, optional category (required)")
    rankings: str = f("", "held-out rankings JSONL for the reward model's pairwise accuracy (optional)")
    ptx_data: str = f("", "held-out pretraining text for the LM loss / perplexity, the alignment tax (optional)")
    split: str = f("train", "split to read from a DatasetDict directory or a hub dataset id (name); a single file is "
                            "read whole")
    columns: list = f([], "dataset columns named otherwise, FIELD=COLUMN (e.g. prompt=question,response=answer); "
                          "applies to every input of the stage that has COLUMN")
    rm: str = f("", "reward model that scores the responses; default RUN_DIR/rm/final")
    sft: str = f("", "reference for KL and the alignment tax; default RUN_DIR/sft/final")
    name: str = f("", "report name, eval/NAME/; default the model's stage name or directory name")
    run_dir: str = f("runs/default", "run directory (path)")
    temperature: float = f(1.0, "sampling temperature (dimensionless); 0 = greedy")
    kl_temperature: float = f(0.0, "temperature T of the KL to SFT, KL(pi_T || pi_SFT,T) as PPO pays it: its "
                                   "samples are drawn and its log-probs taken at T (a second set of samples where "
                                   "--temperature differs) (dimensionless); 0 = the run's PPO temperature "
                                   "(ppo/config.yaml), else 1.0")
    max_new_tokens: int = f(128, "longest response (tokens)")
    batch_size: int = f(8, "sequences per forward pass (sequences)")
    ptx_seq_len: int = f(256, "length of each pretraining-text block (tokens)")
    seed: int = f(0, "sampling seed")
    device: str = f("auto", "auto, cpu, cuda, cuda:N or mps")
    dtype: str = f("auto", "parameter dtype: auto, float32, bfloat16, float16")
    checkpoints: str = f("", "the reward-vs-KL frontier of MODEL ppo: 'all' = the SFT model, every complete PPO "
                             "checkpoint and the final policy, or a comma list of PPO steps (iterations); '' = the "
                             "model only")
    gold_rm: str = f("", "with --checkpoints: a second reward model whose score is the gold beside the proxy's (path)")
    gold: str = f("", "with --checkpoints: a gold judge, python:MODULE:FUNCTION (scores) or model:PATH (win rate over "
                      "the SFT model's responses); README, Frontier")


@dataclass
class CompareConfig:
    a: str = f("", "model A: a stage of the run (sft, ppo), a PPO checkpoint (ppo@step-N: the policy after iteration "
                   "N, a point of the frontier) or a model directory (required)")
    b: str = f("", "model B, the baseline (required)")
    prompts: str = f("", "prompts both models answer (required)")
    split: str = f("train", "split to read from a DatasetDict directory or a hub dataset id (name); a single file is "
                            "read whole")
    columns: list = f([], "dataset columns named otherwise, FIELD=COLUMN (e.g. prompt=question,response=answer); "
                          "applies to every input of the stage that has COLUMN")
    judge: str = f("rm", "rm (the reward model picks), human (a terminal labeler), model:PATH (a local LM asked "
                         "in both orders) or python:MODULE:FUNCTION (f(prompt, responses) -> scores); README, Judges")
    rm: str = f("", "reward model for --judge rm; default RUN_DIR/rm/final")
    tie_margin: float = f(0.0, "score differences up to this count as ties (reward units for rm, the function's for "
                               "python, nats of log P(1) - log P(2) for model)")
    run_dir: str = f("runs/default", "run directory (path)")
    temperature: float = f(0.7, "sampling temperature, the same for both models")
    max_new_tokens: int = f(128, "longest response (tokens)")
    batch_size: int = f(8, "sequences per forward pass (sequences)")
    seed: int = f(0, "sampling seed, the same for both models; also the order and sides shown to a human")
    device: str = f("auto", "auto, cpu, cuda, cuda:N or mps")
    dtype: str = f("auto", "parameter dtype: auto, float32, bfloat16, float16")


STAGE_CONFIGS: dict[str, type] = {"sft": SFTConfig, "rm": RMConfig, "ppo": PPOConfig, "sample": SampleConfig,
                                  "eval": EvalConfig, "compare": CompareConfig, "dpo": DPOConfig}


def field_docs(cls: type, prefix: str = "") -> dict[str, str]:
    """Flattened ``{"optim.lr": "peak learning rate ..."}`` for every field of a config class."""
    docs: dict[str, str] = {}
    hints = typing.get_type_hints(cls)
    for fl in dataclasses.fields(cls):
        key = prefix + fl.name
        if dataclasses.is_dataclass(hints[fl.name]):
            docs.update(field_docs(hints[fl.name], key + "."))
        else:
            docs[key] = fl.metadata.get("doc", "")
    return docs


def flat_fields(obj: Any, prefix: str = "") -> dict[str, tuple[Any, Any, str]]:
    """``{"optim.lr": (float, 1e-05, "peak learning rate ...")}``: type, default and doc of every leaf field of
    config instance ``obj`` (a stage's own block defaults, e.g. rm's ``model.name: ""``); the CLI's flags."""
    out: dict[str, tuple[Any, Any, str]] = {}
    hints = typing.get_type_hints(type(obj))
    for fl in dataclasses.fields(obj):
        value = getattr(obj, fl.name)
        if dataclasses.is_dataclass(value):
            out.update(flat_fields(value, prefix + fl.name + "."))
        else:
            out[prefix + fl.name] = (hints[fl.name], value, fl.metadata.get("doc", ""))
    return out


# Settings a resumed run may change without --allow-changes: when to save, evaluate, write samples and
# stop, and where to run; none changes what a step computes (README, "Failure and recovery"). A longer
# run (EXTENDS) resumes even a finished stage. The model's memory-only switches belong here too.
FREE_ON_RESUME = frozenset({"run_dir", "device", "fsdp", "save_every", "eval_every", "sample_every", "keep_checkpoints",
                            "max_steps", "epochs", "total_episodes", "require_rm_accuracy", "log_every",
                            "model.gradient_checkpointing", "ptx_micro_batch_size", "report_to"})
EXTENDS = frozenset({"max_steps", "epochs", "total_episodes"})
# File settings: compared by the content of what they name (the manifest's input hashes), not by path.
INPUT_SETTINGS = frozenset({"data", "rankings", "demos", "prompts", "ptx_data", "sft", "rm"})


def resolve(stage: str, config_file: str | Path | None, overrides: dict[str, Any],
            flag_of: Callable[[str], str] | None = None) -> Any:
    """Defaults < ``config_file``'s section for ``stage`` < ``overrides`` (dotted keys; None = not given).

    Every section of the file is checked now (unknown keys, types, ranges), not when its stage runs, and
    every error names where the bad value came from: ``FILE: stage.key`` for the file, the flag
    (``flag_of(key)``, e.g. ``--k``) for a value given on the command line."""
    sections = load_preset(config_file) if config_file else {}
    errors: list[str] = []
    for name, section in sections.items():
        if name != stage:
            try:
                other = build(STAGE_CONFIGS[name], section, f"{config_file}: {name}")
                errors += [f"{config_file}: {name}.{key}: {why}" for key, why in check_ranges(other)]
            except BadInput as e:
                errors += e.messages
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        cfg = build(STAGE_CONFIGS[stage], merge(sections.get(stage, {}), nest(given)),
                    f"{config_file}: {stage}" if config_file else stage)
    except BadInput as e:
        raise BadInput(e.messages + errors) from None

    def source(key: str) -> str:
        if key in given:
            return f"{flag_of(key)} ({stage}.{key})" if flag_of else f"{stage}.{key} (command line)"
        return f"{config_file}: {stage}.{key}" if config_file else f"{stage}.{key}"

    errors = [f"{source(key)}: {why}" for key, why in check_ranges(cfg)] + errors
    if errors:
        raise BadInput(errors)
    return cfg


def absolute_paths(cfg: Any) -> Any:
    """A copy of ``cfg`` whose settings naming an existing file or directory (the inputs, the run directory, a
    model directory) are absolute: the config.yaml a stage saves then means the same files when it is read
    from another working directory (``--config RUN/sft/config.yaml``). Names (``tiny``, a dataset id) stay."""
    out = copy.deepcopy(cfg)
    for key in INPUT_SETTINGS | {"run_dir", "out", "model"}:
        value = getattr(out, key, None)
        if dataclasses.is_dataclass(value):
            value = value.name if isinstance(value, ModelConfig) else None
            if value and Path(value).is_dir():
                out.model.name = str(Path(value).resolve())
        elif isinstance(value, str) and value and Path(value).exists():
            setattr(out, key, str(Path(value).resolve()))
    return out


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(stage: str, cfg: Any) -> str:
    """The resolved config as YAML in preset shape (``{stage: {...}}``), loadable with ``--config``."""
    return yaml.safe_dump({stage: to_dict(cfg)}, sort_keys=False, allow_unicode=True)
