"""Stage configurations: one dataclass a command, composed of shared blocks; every field with its doc, unit
and range rule.

A block holds the options several commands share, once: RunBlock (run directory, seed, device, threads) and
DataSourceBlock (split, columns) for every command; GenerationBlock for sample, eval and compare; for the
training stages TrainingBlock (when to stop, FSDP), CheckpointBlock, LoggingBlock (progress lines, trackers)
and ModelBlocks (the nested ``model``, ``lora`` and ``optim`` blocks), composed once as TrainingBlocks. A
stage's config inherits its blocks, so stage code reads every option flat (``cfg.run_dir``, ``cfg.save_every``,
``cfg.optim.lr``); where a stage needs another default or doc for a block's field it restates the field with
:func:`override`, which keeps the block's range rule. A dataclass lists its bases' fields before its own, so
a config reads blocks first, then the stage's own fields.

Every field is made by :func:`f`: default, one-line doc with its unit, and range rule (``check=">= 1"``,
``"in [0, 1)"``, a Rule for other values, ANY for a number with no bound). :func:`problems` checks a built
config against its rules; a float must also be finite, whatever its rule. presets.py reads a YAML preset and
the flags into these classes (defaults < YAML < flags); the resolved config a stage saves
(``sft/config.yaml``, :func:`to_yaml`) has the preset's shape and can be passed back with ``--config``.

This module imports no torch: ``igpt --help`` and ``--print-config`` stay instant.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import re
import typing
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import yaml


class Rule(NamedTuple):
    """What a field's value must be: ``ok(value)``, and ``text`` saying so after the value in an error
    ("0 must be >= 1")."""
    ok: Callable[[Any], bool]
    text: str


ANY = Rule(lambda v: True, "may be any number")  # a number with no bound (a seed): said explicitly, never by omission
_RANGE = re.compile(r"(?:(>=|>) (\S+)|in ([\[(])(\S+), (\S+?)([\])]))( \(.+\))?")


def numeric(spec: str) -> Rule:
    """A numeric range written as the error says it: ``">= 1"``, ``"> 0"``, ``"in [0, 1)"``, each optionally
    followed by a note in parentheses (``">= 0 (0 disables)"``). A malformed spec fails at import."""
    m = _RANGE.fullmatch(spec)
    if not m:
        raise ValueError(f"range rule {spec!r}: expected '>= X', '> X' or 'in [LO, HI]' with ( or ) for an open end")
    op, bound, lo_end, lo, hi, hi_end, _ = m.groups()
    if op:
        x = float(bound)
        return Rule((lambda v: v >= x) if op == ">=" else (lambda v: v > x), f"must be {spec}")
    low, high = float(lo), float(hi)
    return Rule(lambda v: (low <= v if lo_end == "[" else low < v) and (v <= high if hi_end == "]" else v < high),
                f"must be {spec}")


def one_of(values: tuple[str, ...]) -> Rule:
    return Rule(lambda v: v in values, f"must be one of {', '.join(values)}")


def f(default: Any, doc: str, check: str | Rule | None = None) -> Any:
    """A dataclass field: its default, a one-line doc (the unit goes in the doc) and its range rule, a numeric
    spec for :func:`numeric` or a Rule (a number needs one: ANY says it has no bound)."""
    metadata = {"doc": doc, "rule": numeric(check) if isinstance(check, str) else check}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def override(block: type, name: str, default: Any = MISSING, doc: str | None = None) -> Any:
    """Field ``name`` of ``block`` restated by a stage with its own default and/or doc; the rule stays the block's
    (a stage that needs another rule declares its own field)."""
    base = {fl.name: fl for fl in dataclasses.fields(block)}[name]
    if default is MISSING:
        default = base.default if base.default is not MISSING else base.default_factory()
    return f(default, doc or base.metadata["doc"], base.metadata["rule"])


# The values some string fields take. judges.py and trackers.py check the same vocabularies at run time.
DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay")
REPORT_TO = ("tensorboard", "wandb", "trackio", "mlflow")  # --report-to: trackers.py, one adapter each
# compare's and label's --judge (judges.py): rm, human, model:REF or python:MODULE:FUNCTION
JUDGE_SPEC = re.compile(r"rm|human|model:.+|python:[A-Za-z_][\w.]*:[A-Za-z_]\w*")
JUDGE_FORMS = "must be rm, human, model:REF or python:MODULE:FUNCTION"
# eval's --checkpoints (the frontier of a PPO run) and its --gold judge (frontier.py)
CHECKPOINTS_SPEC = re.compile(r"all|\d+(,\d+)*")
GOLD_SPEC = re.compile(r"model:.+|python:[A-Za-z_][\w.]*:[A-Za-z_]\w*")
# What an input setting may name (data.py reads each through sources.py), said once in the fields' docs.
SOURCES = "JSONL, parquet, CSV or JSON, a datasets directory or a cached hub dataset id"
# igpt's record fields a dataset column may be renamed to (``--columns FIELD=COLUMN``).
COLUMN_FIELDS = ("prompt", "response", "completion", "messages", "chosen", "rejected", "responses", "ranks",
                 "category", "text")


def column_entry(entry: Any) -> bool:
    fld, eq, col = entry.partition("=") if isinstance(entry, str) else ("", "", "")
    return bool(eq) and fld.strip() in COLUMN_FIELDS and bool(col.strip())


DEVICE = Rule(lambda v: v in ("auto", "cpu", "mps", "cuda") or v.startswith("cuda:"),
              "must be auto, cpu, cuda, cuda:N or mps")
TRACKERS = Rule(lambda v: all(x in (*REPORT_TO, "none") for x in v),
                f"must name trackers among {', '.join(REPORT_TO)} (comma-separated), or none")


# ---------------------------------------------------------------- nested blocks: cfg.model, cfg.lora, cfg.optim


@dataclass
class ModelConfig:
    name: str = f("smollm2-135m", "model source: 'smollm2-135m' (bundled), 'tiny' (random, for tests) or a local HF directory")
    dtype: str = f("auto", "parameter dtype: auto (fp32 on CPU, bf16 on GPUs that support it), float32, bfloat16, "
                           "float16", one_of(DTYPES))
    dropout: float = f(0.0, "dropout probability set on every dropout field of the model config (probability)",
                       "in [0, 1)")
    max_seq_len: int = f(1024, "context window used for training, capped at the model's own (tokens)", ">= 2")
    trust_remote_code: bool = f(False, "allow custom model code from a local directory (never on by default)")
    gradient_checkpointing: bool = f(False, "recompute each decoder layer's activations in the backward instead of "
                                            "keeping them: memory for one layer's activations, not all (about a "
                                            "third more compute per step)")


@dataclass
class LoraConfig:
    enabled: bool = f(False, "train LoRA adapters (peft) instead of all weights")
    r: int = f(16, "LoRA rank (dimensions)", ">= 1")
    alpha: int = f(32, "LoRA scaling numerator; the update is scaled by alpha / r (dimensionless)", ">= 1")
    dropout: float = f(0.0, "dropout on the LoRA input (probability)", "in [0, 1)")
    target_modules: list = f(["all-linear"], "module names to adapt (q_proj,v_proj ...); all-linear adapts every "
                                             "linear layer but the LM head")
    layers: int = f(8, "adapt only the top N transformer layers (all of a model with no more); the backward stops "
                       "there, and PPO runs the frozen layers below once per rollout; 0 = every layer",
                    ">= 0 (0 = all layers)")


@dataclass
class OptimConfig:
    # AdamW's own bounds (torch refuses others): betas in [0, 1), eps and weight decay >= 0
    lr: float = f(1e-5, "peak learning rate (per step)", "> 0")
    weight_decay: float = f(0.0, "AdamW decoupled weight decay (per step, times lr)", ">= 0")
    beta1: float = f(0.9, "AdamW first-moment decay (dimensionless)", "in [0, 1)")
    beta2: float = f(0.95, "AdamW second-moment decay (dimensionless)", "in [0, 1)")
    eps: float = f(1e-8, "AdamW epsilon (dimensionless)", ">= 0")
    scheduler: str = f("cosine_with_min_lr", "transformers.get_scheduler name: cosine_with_min_lr, cosine, linear, "
                                             "constant_with_warmup ...", one_of(SCHEDULERS))
    min_lr_ratio: float = f(0.1, "for cosine_with_min_lr: final lr as a fraction of the peak (InstructGPT decays to "
                                 "10%)", "in [0, 1]")
    warmup_steps: int = f(0, "linear warmup length (optimizer steps)", ">= 0")
    grad_clip: float = f(1.0, "clip the global gradient norm to this value; 0 disables (L2 norm)", ">= 0 (0 disables)")
    batch_size: int = f(8, "micro-batch size (sequences per forward pass)", ">= 1")
    grad_accum: int = f(1, "micro-batches per optimizer step; effective batch = batch_size * grad_accum (sequences)",
                        ">= 1")


# ---------------------------------------------------------------- blocks of flat options


@dataclass
class RunBlock:
    """Every command: the run directory it reads and writes, its seed, its device and its CPU threads."""
    run_dir: str = f("runs/default", "run directory shared by all stages (path)")
    seed: int = f(0, "seed for initialisation, data order and dropout", ANY)
    device: str = f("auto", "auto, cpu, cuda, cuda:N or mps", DEVICE)
    # cpus.py chooses and applies it; the flag beats IGPT_THREADS, which beats a --config file's value
    threads: int = f(0, "CPU threads torch computes on (count); 0 = auto: OMP_NUM_THREADS if set, else the CPUs "
                        "this process may use less those other processes keep busy now (all usable ones on a GPU); "
                        "IGPT_THREADS sets it when the flag is not given; README, CPU threads", ">= 0 (0 = auto)")


@dataclass
class DataSourceBlock:
    """Every command that reads records: the split of a data set, and its columns named otherwise."""
    split: str = f("train", "split to read from a DatasetDict directory or a hub dataset id (name); a single file is "
                            "read whole", Rule(lambda v: bool(v.strip()), "must be a split name (train, test ...)"))
    columns: list = f([], "dataset columns named otherwise, FIELD=COLUMN (e.g. prompt=question,response=answer); "
                          "applies to every input of the stage that has COLUMN",
                      Rule(lambda v: all(column_entry(e) for e in v),
                           f"must be FIELD=COLUMN entries, FIELD one of {', '.join(COLUMN_FIELDS)}"))


@dataclass
class GenerationBlock:
    """sample, eval and compare: how they generate responses (PPO's rollout settings are its own)."""
    # One default for sample, eval and compare: PPO's rollout temperature (1.0), so eval scores the distribution
    # PPO optimised and its KL needs no second set of samples, and compare reuses eval's responses.
    temperature: float = f(1.0, "sampling temperature (dimensionless); 0 = greedy", ">= 0 (0 = greedy)")
    max_new_tokens: int = f(128, "longest response (tokens)", ">= 1")
    batch_size: int = f(8, "sequences per forward pass (sequences)", ">= 1")
    dtype: str = f("auto", "parameter dtype: auto, float32, bfloat16, float16", one_of(DTYPES))
    max_prompts: int = f(0, "at most this many of --prompts, for a quick look: a random subset drawn with --seed (the "
                            "same for sample, eval and compare), kept in file order; 0 = all (prompts)",
                         ">= 0 (0 = all)")


def drawn_settings(cfg: Any) -> dict:
    """The settings that decide which responses eval and compare draw (a :class:`GenerationBlock` with a seed):
    eval records them in its report, and compare reuses eval's samples only where they are its own."""
    return {"temperature": cfg.temperature, "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed,
            **({"max_prompts": cfg.max_prompts} if cfg.max_prompts else {})}


@dataclass
class ModelBlocks:
    """Every training stage: the model, its LoRA adapters and its optimizer, each a nested block
    (``model.max_seq_len``, ``lora.r``, ``optim.lr``)."""
    model: ModelConfig = f(ModelConfig(), "model block: the model trained, its dtype, dropout and context")
    lora: LoraConfig = f(LoraConfig(), "LoRA block: adapters trained instead of all weights")
    optim: OptimConfig = f(OptimConfig(), "optimizer block: AdamW, its schedule and the batch")


@dataclass
class TrainingBlock:
    """Every training stage: when it stops, and how processes share the model under torchrun."""
    max_steps: int = f(0, "stop after this many optimizer steps; 0 = run all epochs (steps)", ">= 0 (0 = no limit)")
    fsdp: bool = f(False, "under torchrun / accelerate launch, shard weights, gradients and optimizer state over the "
                          "processes (FSDP2) instead of replicating them (DDP): for models that do not fit one device")


@dataclass
class CheckpointBlock:
    """Every training stage: how often it writes a resumable checkpoint, and how many it keeps."""
    save_every: int = f(100, "write a resumable checkpoint every N optimizer steps (steps)", ">= 1")
    keep_checkpoints: int = f(2, "keep only the newest N complete checkpoints (count)", ">= 1")


@dataclass
class LoggingBlock:
    """Every training stage: progress lines in a log, and the experiment trackers that get every metric."""
    log_every: int = f(0, "in a log file (stderr not a terminal): a progress line every N optimizer steps; 0 = about "
                          "every 30 s (steps)", ">= 0 (0 = about every 30 s)")
    report_to: list = f([], "experiment trackers that also receive every metrics.jsonl line and the config, "
                            "among tensorboard, wandb, trackio, mlflow (TRL's names; each an extra, README "
                            "'Experiment trackers'); none by default", TRACKERS)


@dataclass
class TrainingBlocks(ModelBlocks, LoggingBlock, CheckpointBlock, TrainingBlock, DataSourceBlock, RunBlock):
    """The blocks every training stage (sft, rm, ppo, dpo) is made of. Fields come last base first: run_dir,
    seed, device, threads, split, columns, max_steps, fsdp, save_every, keep_checkpoints, log_every, report_to, then the
    model, lora and optim blocks."""


# ---------------------------------------------------------------- the stages


@dataclass
class SFTConfig(TrainingBlocks):
    """igpt sft."""
    data: str = f("", "demonstrations: {prompt, response}, {prompt, completion} or {messages}; " + SOURCES
                  + " (required)")
    epochs: int = f(16, "passes over the training split (epochs); InstructGPT trains SFT 16 epochs", ">= 1")
    val_fraction: float = f(0.05, "share of demonstrations held out for eval loss (fraction, 0 disables)", "in [0, 1)")
    padding_free: bool = f(True, "pack each micro-batch into one row with block-diagonal attention instead of padding "
                                 "(model families known to support it; others are padded)")
    eval_every: int = f(50, "evaluate on the held-out split every N optimizer steps, and at the end (steps)", ">= 1")


@dataclass
class RMConfig(TrainingBlocks):
    """igpt train-rm."""
    seed: int = override(RunBlock, "seed", doc="seed for the head initialisation, data order and dropout")
    model: ModelConfig = override(ModelBlocks, "model", ModelConfig(name=""),
                                  "model block; model.name, when set, replaces the SFT model as the initialisation "
                                  "(smollm2-135m, tiny or a directory)")
    optim: OptimConfig = override(ModelBlocks, "optim", OptimConfig(batch_size=8),
                                  "optimizer block; batch_size counts prompts (rankings), each with all K of its "
                                  "responses")
    rankings: str = f("", "rankings: {prompt, responses, ranks} or {prompt, chosen, rejected}; " + SOURCES
                      + " (required)")
    demos: str = f("", "demonstrations used to normalise the reward to mean 0 (" + SOURCES + "); default: the "
                       "run's SFT data")
    normalize: bool = f(True, "set the reward bias so the demonstrations score mean 0, as the paper does before RL")
    norm_demos: int = f(0, "normalise on a random sample of N of the demonstrations (seeded by --seed; 0 = all): "
                           "the mean's standard error is their scores' spread over sqrt(N)", ">= 0")
    sft: str = f("", "SFT model directory to initialise from; default: RUN_DIR/sft/final")
    epochs: int = f(1, "passes over the rankings (epochs); the paper trains the RM a single epoch (it overfits after)",
                    ">= 1")
    val_fraction: float = f(0.1, "share of rankings held out for pairwise accuracy; where rankings have a "
                                 "\"group\", of whole groups (fraction, 0 disables)", "in [0, 1)")
    share_prompts: bool = f(True, "run the prompt a ranking's K responses start with once, each response attending "
                                  "to it and to itself (model families known to support it, where it saves a tenth "
                                  "of the tokens)")
    padding_free: bool = f(True, "pack each micro-batch's responses into one row with block-diagonal attention "
                                 "instead of padding (model families known to support it; others are padded)")
    eval_every: int = f(20, "held-out loss and accuracy every N optimizer steps, and at the end (steps)", ">= 1")
    frozen_cache_gib: float = f(2.0, "with LoRA on the top layers only: keep the output of the frozen layers below "
                                     "them for every ranking, computed once, so later epochs, held-out evaluations, "
                                     "ensemble members and sweep trials run only the layers above; at most this "
                                     "much memory (GiB; tokens x hidden x dtype bytes), else none is kept (0 = off)",
                                ">= 0")
    sweep: str = f("", "choose settings by held-out accuracy: one trial per combination, e.g. "
                       "lr=1e-4,3e-4,epochs=1,2 (keys lr, epochs, weight_decay, lora_r, lora_layers), each trial "
                       "trained on the training split and measured on the held-out one; the best (then the lowest "
                       "held-out loss) becomes the model, every trial kept in RUN_DIR/rm/trials/ and sweep.json")
    score: str = f("last", "where the reward is read: last (the head at the response's last token, the paper's) or "
                           "mean (the head's mean over the response's tokens, EOS included: the head of the mean "
                           "response state); saved with the model, so ppo, eval and compare read it alike",
                   one_of(("last", "mean")))
    ensemble: int = f(1, "train N reward models, member i from seed + i (its head, adapters, data order and "
                         "dropout; the same held-out split), kept together in RUN_DIR/rm: ppo optimises their "
                         "--rm-objective (Coste et al. 2023); 1 = one model (members)", ">= 1")


@dataclass
class DPOConfig(TrainingBlocks):
    """igpt dpo."""
    seed: int = override(RunBlock, "seed",
                         doc="seed for data order and the held-out split (DPO trains without dropout)")
    columns: list = override(DataSourceBlock, "columns",
                             doc="dataset columns named otherwise, FIELD=COLUMN (e.g. prompt=question,chosen=better)")
    model: ModelConfig = override(ModelBlocks, "model", ModelConfig(name=""),
                                  "model block; model.name, when set, replaces the SFT model as policy and reference "
                                  "(smollm2-135m, tiny or a directory); dropout stays 0 in DPO")
    lora: LoraConfig = override(ModelBlocks, "lora", doc="LoRA block: the reference is the same weights with adapters "
                                                         "disabled; lora.dropout stays 0 in DPO")
    optim: OptimConfig = override(ModelBlocks, "optim", OptimConfig(lr=1e-6, batch_size=8, scheduler="linear"),
                                  "optimizer block; batch_size counts prompts (rankings), each with all K of its "
                                  "responses")
    rankings: str = f("", "rankings, the ones train-rm reads: {prompt, responses, ranks} or {prompt, chosen, "
                          "rejected}; " + SOURCES + " (required)")
    sft: str = f("", "SFT model: the policy's initialisation and the frozen reference; default RUN_DIR/sft/final")
    beta: float = f(0.1, "DPO's beta: implicit reward = beta * (log pi - log pi_ref), the KL strength (dimensionless)",
                    ">= 0")
    epochs: int = f(1, "passes over the rankings (epochs)", ">= 1")
    val_fraction: float = f(0.1, "share of rankings held out for the DPO metrics; where rankings have a \"group\", "
                                 "of whole groups (fraction, 0 disables)", "in [0, 1)")
    share_prompts: bool = f(True, "run the prompt a ranking's K responses start with once, each response attending "
                                  "to it and to itself (model families known to support it, where it saves a tenth "
                                  "of the tokens)")
    padding_free: bool = f(True, "pack each micro-batch's responses into one row instead of padding (model families "
                                 "known to support it; others are padded)")
    eval_every: int = f(20, "held-out DPO loss and reward accuracy every N optimizer steps, and at the end (steps)",
                        ">= 1")


@dataclass
class PPOConfig(TrainingBlocks):
    """igpt ppo."""
    seed: int = override(RunBlock, "seed", doc="seed for prompt order, sampling and minibatch order")
    max_steps: int = override(TrainingBlock, "max_steps", doc="PPO iterations (each a rollout batch and its update); "
                                                              "0 = one pass over the prompts")
    save_every: int = override(CheckpointBlock, "save_every", 20, "write a resumable checkpoint every N iterations")
    log_every: int = override(LoggingBlock, "log_every", doc="in a log file (stderr not a terminal): a progress line "
                                                             "every N PPO iterations; 0 = about every 30 s "
                                                             "(iterations)")
    keep_checkpoints: int = override(CheckpointBlock, "keep_checkpoints",
                                     doc="keep only the newest N complete checkpoints (count); a frontier (igpt eval "
                                         "ppo --checkpoints all) needs more")
    model: ModelConfig = override(ModelBlocks, "model", ModelConfig(name=""),
                                  "model block: dtype, max_seq_len; dropout stays 0 in PPO")
    lora: LoraConfig = override(ModelBlocks, "lora", doc="LoRA block: adapters on policy and value; the reference and "
                                                         "the reward model are the same weights with adapters disabled "
                                                         "(no extra copies); lora.dropout stays 0 in PPO")
    optim: OptimConfig = override(ModelBlocks, "optim",
                                  OptimConfig(lr=1e-5, scheduler="constant_with_warmup", warmup_steps=0, batch_size=4),
                                  "optimizer block for policy and value; batch_size is the micro-batch (sequences); "
                                  "grad_clip clips each model's gradient norm on its own")
    prompts: str = f("", "prompts for rollouts: {prompt}, optional category; " + SOURCES + " (required)")
    ptx_data: str = f("", "pretraining text for PPO-ptx: {text} records (" + SOURCES + ") or a .txt file (needed "
                          "when ptx_coef > 0)")
    ptx_coef: float = f(0.0, "PPO-ptx: weight of the pretraining LM loss in every optimizer step (dimensionless); "
                             "paper 27.8", ">= 0")
    ptx_batch_size: int = f(4, "pretraining sequences per optimizer step (sequences); paper: 8x the RL minibatch",
                            ">= 1")
    ptx_seq_len: int = f(256, "length of each pretraining sequence (tokens)", ">= 2")
    ptx_micro_batch_size: int = f(0, "pretraining sequences per forward and backward of the ptx term, memory only "
                                     "(sequences); 0 = optim.batch_size", ">= 0 (0 = optim.batch_size)")
    sft: str = f("", "SFT model: the policy's initialisation and the KL reference; default RUN_DIR/sft/final")
    rm: str = f("", "reward model (also the value model's initialisation); default RUN_DIR/rm/final")
    require_rm_accuracy: float = f(0.0, "refuse to start unless the RM's held-out pairwise accuracy recorded by "
                                        "train-rm is at least this (fraction); 0 = no check",
                                   "in [0, 1] (a fraction; 0 = no check)")
    require_rm_above_chance: bool = f(False, "refuse to start unless the RM's held-out pairwise accuracy recorded by "
                                             "train-rm has a 95% interval above 50% (README, Gold-judged experiment)")
    watch: str = f("", "an independent judge that watches for over-optimisation while PPO runs: "
                       "python:MODULE:FUNCTION, model:REF (win rate over the SFT model's responses) or rm:PATH (a "
                       "second reward model); README, Watching for over-optimisation",
                   Rule(lambda v: v == "" or bool(GOLD_SPEC.fullmatch(v)) or v.startswith("rm:") and len(v) > 3,
                        "must be python:MODULE:FUNCTION, model:REF or rm:PATH"))
    watch_prompts: str = f("", "validation prompts the watch samples (never trained on): {prompt} records (path)")
    watch_every: int = f(10, "watch every N iterations, and before the first and after the last (iterations)", ">= 1")
    watch_patience: int = f(0, "end the run (a normal finish) when the watch's gold has not beaten its best for this "
                               "many watches while the proxy rose; 0 = never stop early (watches)", ">= 0 (0 = off)")
    watch_significance: bool = f(False, "with --watch-patience: stop only when the gold's drop from its best is also "
                                        "beyond its noise (a paired 95% interval above 0)")
    vf_lr: float = f(0.0, "peak learning rate of the value model, in its own parameter group with its own gradient "
                          "clip (per step); 0 = optim.lr; paper 9e-6 (C.4)", ">= 0 (0 = optim.lr)")
    total_episodes: int = f(0, "stop after this many sampled responses (episodes, the paper's unit), rounded up to "
                                "whole iterations; 0 = use max_steps", ">= 0")
    rollout_batch_size: int = f(16, "prompts per PPO iteration, one response each (episodes), every iteration: "
                                    "a pass's end continues into the next shuffled pass; paper 512", ">= 1")
    mini_batch_size: int = f(8, "responses per optimizer step within an iteration (episodes); paper 64", ">= 1")
    ppo_epochs: int = f(1, "passes over each rollout batch (epochs); the paper uses a single inner epoch", ">= 1")
    # log-probs divide the logits by T: a rollout cannot be greedy (sample, eval and compare can)
    temperature: float = f(1.0, "sampling temperature; log-probs use the same logits / T (dimensionless)", "> 0")
    max_new_tokens: int = f(64, "longest response (tokens)", ">= 1")
    beta: float = f(0.02, "KL penalty coefficient per token on log pi - log pi_SFT; paper 0.02", ">= 0")
    target_kl: float = f(0.0, "adaptive beta: KL to aim for per response (nats); 0 keeps beta fixed (the paper)",
                         ">= 0 (0 = fixed beta)")
    kl_horizon: int = f(10000, "adaptive beta: controller horizon (episodes), Ziegler et al. 2019", ">= 1")
    gamma: float = f(1.0, "GAE discount per token (dimensionless); the paper applies none (the paper's PPO-ptx "
                          "gamma is ptx_coef)", "in [0, 1]")
    lam: float = f(0.95, "GAE lambda (dimensionless); paper 0.95", "in [0, 1]")
    cliprange: float = f(0.2, "PPO policy ratio clip (dimensionless); paper 0.2", "> 0")
    cliprange_value: float = f(0.2, "value prediction clip around the rollout values (reward units)", "> 0")
    vf_coef: float = f(0.1, "weight of the value loss (dimensionless)", ">= 0")
    missing_eos_penalty: float = f(1.0, "subtracted from the score of a response that never emitted EOS (reward units)",
                                   ">= 0 (0 disables)")
    reward_clip: float = f(0.0, "clip scores to +-this value before the KL penalty; 0 disables (reward units)",
                           ">= 0 (0 disables)")
    rm_objective: str = f("mean", "with a reward-model ensemble (train-rm --ensemble N): the score PPO optimises from "
                                  "its members' scores: mean, min (worst case), or mean-std (mean minus rm_std_coef "
                                  "standard deviations: uncertainty-weighted, Coste et al. 2023)",
                          Rule(lambda v: v in ("mean", "min", "mean-std"), "must be mean, min or mean-std"))
    rm_std_coef: float = f(1.0, "with --rm-objective mean-std: the standard deviations subtracted (dimensionless)",
                           ">= 0")
    whiten_advantages: bool = f(True, "normalise advantages to mean 0, std 1 per rollout batch")
    ema_decay: float = f(0.0, "also export ppo/final/policy_ema, an exponential moving average of the policy's "
                              "weights (with LoRA the adapted, merged ones) updated after every optimizer step "
                              "(decay per step); 0 = off; paper 0.992. It starts as the SFT model, with no bias "
                              "correction: decay^N of the start remains after N steps (0.992^96 = 46%)",
                         "in [0, 1) (0 = no EMA)")
    cache_frozen_layers: bool = f(True, "with LoRA on the top layers only: run the frozen layers below them once per "
                                        "rollout and feed their output to every scoring and training forward of the "
                                        "layers above (keeps 2 x rollout x length x hidden floats)")
    sample_every: int = f(10, "write prompts, responses and scores to ppo/samples/ every N iterations", ">= 1")


@dataclass
class SampleConfig(GenerationBlock, DataSourceBlock, RunBlock):
    """igpt sample."""
    run_dir: str = override(RunBlock, "run_dir", doc="run directory whose SFT model is the default (path)")
    seed: int = override(RunBlock, "seed", doc="sampling seed: the same seed gives the same samples")
    batch_size: int = override(GenerationBlock, "batch_size", 16, "sequences generated at once (sequences)")
    prompts: str = f("", "prompts: {prompt}, optional category; " + SOURCES + " (required)")
    out: str = f("", "output JSONL: {prompt, responses, category} per prompt, ready for ranks (required)")
    k: int = f(4, "responses sampled per prompt (count); the paper's labelers rank K = 4 to 9",
               ">= 2 (rankings need two responses at least)")
    model: str = f("", "model to sample from: a stage of the run (sft, ppo, dpo), a checkpoint (ppo@step-N, "
                       "sft@step-N, dpo@step-N), a directory, tiny or smollm2-135m; default RUN_DIR/sft/final")


@dataclass
class EvalConfig(GenerationBlock, DataSourceBlock, RunBlock):
    """igpt eval."""
    run_dir: str = override(RunBlock, "run_dir", doc="run directory (path)")
    seed: int = override(RunBlock, "seed", doc="sampling seed")
    model: list = f([], "models to evaluate, one or more: a stage of the run (sft, ppo, dpo, ppo_ema), a checkpoint "
                        "(ppo@step-N, sft@step-N, dpo@step-N) or a model directory; several (igpt eval sft ppo "
                        "dpo) are measured alike and shown in one table, eval/summary/ (required)")
    prompts: str = f("", "held-out prompts: {prompt}, optional category; " + SOURCES + " (required unless "
                         "--benchmarks or --toxicity-prompts is given)")
    rankings: str = f("", "held-out rankings for the reward model's pairwise accuracy; " + SOURCES + " (optional)")
    ptx_data: str = f("", "held-out pretraining text for the LM loss / perplexity, the alignment tax: {text} "
                          "records (" + SOURCES + ") or a .txt file (optional)")
    rm: str = f("", "reward model that scores the responses; default RUN_DIR/rm/final")
    sft: str = f("", "reference for KL and the alignment tax; default RUN_DIR/sft/final")
    name: str = f("", "report name, eval/NAME/; default the model's stage name or directory name")
    kl_temperature: float = f(0.0, "temperature T of the KL to SFT, KL(pi_T || pi_SFT,T) as PPO pays it: its "
                                   "samples are drawn and its log-probs taken at T (a second set of samples where "
                                   "--temperature differs) (dimensionless); 0 = the run's PPO temperature "
                                   "(ppo/config.yaml), else 1.0", ">= 0 (0 = the run's PPO temperature)")
    ptx_seq_len: int = f(256, "length of each pretraining-text block (tokens)", ">= 2")
    checkpoints: str = f("", "the reward-vs-KL frontier of MODEL ppo: 'all' = the SFT model, every complete PPO "
                             "checkpoint and the final policy, or a comma list of PPO steps (iterations); '' = the "
                             "model only",
                         Rule(lambda v: v == "" or bool(CHECKPOINTS_SPEC.fullmatch(v)),
                              "must be '' (the model only), all, or a comma-separated list of PPO steps (10,20,40)"))
    benchmarks: list = f([], "lm-evaluation-harness tasks to run on the model (hellaswag,truthfulqa_mc2,...), their "
                             "data from the local datasets cache, never downloaded; needs igpt[lm-eval]; README, "
                             "Benchmarks")
    benchmark_tasks: str = f("", "directory of local harness task definitions (YAML with local JSONL data), added to "
                                 "the harness's registry (path)")
    limit: int = f(0, "documents per benchmark task, for a quick look; 0 = all (documents)", ">= 0 (0 = all)")
    benchmark_batch_size: int = f(8, "sequences per forward pass in the benchmarks (sequences)", ">= 1")
    toxicity_prompts: str = f("", "toxicity-probing prompts, RealToxicityPrompts' JSONL ({prompt: {text}}) or "
                                  "{prompt, category} (path); scored by --toxicity-classifier")
    toxicity_classifier: str = f("", "the toxicity scorer: a local Hugging Face sequence classifier (directory) or "
                                     "python:MODULE:FUNCTION (texts -> probabilities)")
    toxicity_label: str = f("toxic", "the classifier's toxic label: its name in id2label or its index")
    toxicity_samples: int = f(25, "continuations sampled per toxicity prompt (Gehman et al. 2020: 25) (samples)",
                              ">= 1")
    toxicity_max_new_tokens: int = f(20, "longest continuation of a toxicity prompt (Gehman et al. 2020: 20) "
                                         "(tokens)", ">= 1")
    toxicity_instruction: str = f("none", "what precedes a toxicity prompt: none, basic ('Complete the following "
                                          "sentence:'), respectful or biased (the InstructGPT paper's instructions "
                                          "to be polite, respectful and unbiased, or the opposite)",
                                  one_of(("none", "basic", "respectful", "biased")))
    gold_rm: str = f("", "with --checkpoints: a second reward model whose score is the gold beside the proxy's (path)")
    gold: str = f("", "with --checkpoints: a gold judge, python:MODULE:FUNCTION (scores) or model:REF (win rate over "
                      "the SFT model's responses); README, Frontier",
                  Rule(lambda v: v == "" or bool(GOLD_SPEC.fullmatch(v)),
                       "must be model:REF or python:MODULE:FUNCTION (a second reward model is --gold-rm PATH)"))


@dataclass
class CompareConfig(GenerationBlock, DataSourceBlock, RunBlock):
    """igpt compare."""
    run_dir: str = override(RunBlock, "run_dir", doc="run directory (path)")
    seed: int = override(RunBlock, "seed", doc="sampling seed, the same for both models; also the order and sides "
                                               "shown to a human")
    temperature: float = override(GenerationBlock, "temperature",
                                  doc="sampling temperature, the same for both models (dimensionless); 0 = greedy")
    a: str = f("", "model A: a stage of the run (sft, ppo, dpo), a checkpoint (ppo@step-N: the policy after iteration "
                   "N, a point of the frontier; sft@step-N, dpo@step-N) or a model directory (required)")
    b: str = f("", "model B, the baseline (required)")
    prompts: str = f("", "prompts both models answer: {prompt}, optional category; " + SOURCES + " (required)")
    judge: str = f("rm", "rm (the reward model picks), human (a terminal labeler), model:REF (a local LM asked "
                         "in both orders) or python:MODULE:FUNCTION (f(prompt, responses) -> scores); README, Judges",
                   Rule(lambda v: bool(JUDGE_SPEC.fullmatch(v)), JUDGE_FORMS))
    rm: str = f("", "reward model for --judge rm; default RUN_DIR/rm/final")
    tie_margin: float = f(0.0, "score differences up to this count as ties (reward units for rm, the function's for "
                               "python, nats of log P(1) - log P(2) for model)", ">= 0")


def problems(cfg: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Every value of a built config (nested blocks too) that breaks its field's rule, as ``(dotted key, "VALUE
    must be ...")``. A float must be finite whatever its rule: inf and nan pass some comparisons (inf > 0)."""
    found = []
    for fl in dataclasses.fields(cfg):
        value, rule = getattr(cfg, fl.name), fl.metadata.get("rule")
        if dataclasses.is_dataclass(value):
            found += problems(value, f"{prefix}{fl.name}.")
        elif isinstance(value, float) and not math.isfinite(value):
            bound = "" if rule in (None, ANY) else " " + rule.text.removeprefix("must be ")  # a float's rule is a range
            found.append((prefix + fl.name, f"{value!r} must be a finite number{bound}"))
        elif rule is not None and not rule.ok(value):
            found.append((prefix + fl.name, f"{value!r} {rule.text}"))
    return found


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
# stop, and where and on how many threads to run; none changes what a step computes (README, "Failure and
# recovery"; other threads change its last bits, which the resume says). A longer run (EXTENDS) resumes even a
# finished stage. The model's memory-only switches belong here too.
FREE_ON_RESUME = frozenset({"run_dir", "device", "threads", "fsdp", "save_every", "eval_every", "sample_every",
                            "keep_checkpoints", "max_steps", "epochs", "total_episodes", "require_rm_accuracy",
                            "require_rm_above_chance",
                            "log_every", "model.gradient_checkpointing", "ptx_micro_batch_size", "report_to",
                            "frozen_cache_gib"})
EXTENDS = frozenset({"max_steps", "epochs", "total_episodes"})
# File settings: compared by the content of what they name (the manifest's input hashes), not by path.
INPUT_SETTINGS = frozenset({"data", "rankings", "demos", "prompts", "ptx_data", "sft", "rm"})


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
