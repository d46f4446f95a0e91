"""The commands of igpt, one module each with a ``run`` reading top to bottom (stages never import each other),
and STAGES: the one table of them. Each entry says what the command line (cli.py), presets (presets.py),
``igpt status`` and the stages themselves need to know of a command: its name, config, module, what it writes
and its headline metrics. Imports no torch (``igpt --help`` reads it); a stage's module is imported only when
its command runs."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..config import CompareConfig, DPOConfig, EvalConfig, PPOConfig, RMConfig, SampleConfig, SFTConfig


@dataclass(frozen=True)
class StageSpec:
    """One command. ``name`` is the stage's section in a preset, its folder in the run directory and its key in
    the manifest; ``command`` is what the user types (``igpt train-rm`` is stage ``rm``)."""
    name: str
    command: str
    help: str  # the command's --help
    module: str  # where its run() is
    config: type | None = None  # its config dataclass; None: a command with options of its own (label, status)
    training: bool = False  # runs under torchrun / accelerate launch; takes --resume, --overwrite, --allow-changes
    listed: bool = False  # igpt status shows it even before it has run (the paper's sft -> rm -> ppo)
    arguments: tuple[str, ...] = ()  # config fields given positionally, in order (igpt eval MODEL)
    unflagged: frozenset[str] = frozenset()  # config keys the command never reads, so it has no flag for them
    # What it writes, relative to the run directory (N a step, NAME and A-vs-B set by its options), or OUT, the
    # file --out names
    outputs: tuple[str, ...] = ()
    models: dict[str, str] = field(default_factory=dict)  # the models it publishes: name (igpt eval NAME) -> folder
    headline: tuple[str, ...] = ()  # metrics its progress line shows at every step
    summary: tuple[str, ...] = ()  # metrics igpt status shows: the newest of metrics.jsonl, or of report.json


def _training(name: str, *more: str) -> tuple[str, ...]:
    """What every training stage writes in its folder, then ``more``."""
    return (f"{name}/config.yaml", f"{name}/metrics.jsonl", f"{name}/checkpoints/step-N/", *more)


STAGES: dict[str, StageSpec] = {s.name: s for s in (
    StageSpec("sft", "sft", "Step 1: supervised fine-tuning on demonstrations (loss on response tokens only).",
              f"{__name__}.sft", SFTConfig, training=True, listed=True,
              outputs=_training("sft", "sft/final/"), models={"sft": "sft/final"},
              headline=("train/loss", "eval/loss"), summary=("train/loss", "eval/loss")),
    StageSpec("rm", "train-rm",
              "Step 2: reward model from rankings of K responses per prompt (K-wise loss, reward normalised).",
              f"{__name__}.reward", RMConfig, training=True, listed=True,
              outputs=_training("rm", "rm/final/"), models={"rm": "rm/final"},
              headline=("train/loss", "train/accuracy", "eval/loss", "eval/accuracy"),
              summary=("train/loss", "train/accuracy", "eval/loss", "eval/accuracy")),
    StageSpec("ppo", "ppo", "Step 3: PPO against the reward model with a per-token KL penalty, and PPO-ptx.",
              f"{__name__}.ppo", PPOConfig, training=True, listed=True,
              unflagged=frozenset({"model.name"}),  # the policy is --sft
              outputs=_training("ppo", "ppo/samples/step-N.jsonl", "ppo/final/policy/", "ppo/final/value/",
                                "ppo/final/policy_ema/"),
              models={"ppo": "ppo/final/policy", "ppo_ema": "ppo/final/policy_ema"},  # the EMA with --ema-decay
              headline=("objective/scores", "objective/kl", "val/response_length"),
              summary=("objective/scores", "objective/kl", "objective/rlhf_reward")),
    StageSpec("dpo", "dpo", "Step 2-3 without a reward model: DPO on the same rankings, K-wise (all C(K,2) pairs of a "
              "prompt, K forwards), from the SFT model as policy and frozen reference.",
              f"{__name__}.dpo", DPOConfig, training=True,
              outputs=_training("dpo", "dpo/final/"), models={"dpo": "dpo/final"},
              headline=("train/loss", "rewards/accuracies", "rewards/margins"),
              summary=("train/loss", "rewards/accuracies", "rewards/margins", "eval/rewards/accuracies")),
    StageSpec("sample", "sample",
              "Sample K responses per prompt for labelers to rank (the same seed gives the same samples).",
              f"{__name__}.sample", SampleConfig, outputs=("OUT",)),
    StageSpec("eval", "eval",
              "Reward, KL to SFT, alignment tax and preference accuracy of a model; writes eval/NAME/report.json.",
              f"{__name__}.evaluate", EvalConfig, arguments=("model",),
              outputs=("eval/NAME/report.json", "eval/NAME/samples.jsonl",  # with --checkpoints, the frontier:
                       "eval/NAME/frontier.png", "eval/NAME/samples/step-N.jsonl"),
              summary=("score_mean", "kl_to_sft", "ptx_perplexity", "alignment_tax", "rm_accuracy")),
    StageSpec("compare", "compare",
              "Win rate of A over B with a 95% confidence interval; writes compare/A-vs-B/ with report.html.",
              f"{__name__}.compare", CompareConfig, arguments=("a", "b"),
              outputs=tuple(f"compare/A-vs-B[.JUDGE]/{x}" for x in ("report.json", "report.html", "judgments.jsonl",
                                                                      "responses.jsonl")),
              summary=("win_rate", "ci_low", "ci_high", "n")),
    StageSpec("label", "label", "Rank sampled responses, by you in the terminal or by a judge (1 = best, ties "
              "allowed); resumes where it stopped.", f"{__name__}.label", outputs=("OUT",)),
    StageSpec("status", "status", "Where a run stands: each stage's state, step, last metrics and outputs, and its "
              "lineage (read-only).", f"{__name__}.status"),
)}
