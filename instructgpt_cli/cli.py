"""The ``igpt`` command line. One thin command a stage: options -> config -> stage.run().

Heavy imports (torch, transformers) happen inside the commands, so ``igpt --help`` is instant.
Exit codes (README, "Failure and recovery"): 0 success, 2 bad input or usage (every problem reported as
FILE:LINE: field: reason, nothing written), 3 non-finite training values, 4 a failed write (full disk,
I/O error), 128 + N a stop signal N (130 SIGINT, 138 SIGUSR1, 143 SIGTERM), 1 an unexpected error.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import typer
from typing_extensions import Annotated

app = typer.Typer(
    name="igpt",
    help="Train language models to follow instructions from human feedback, as InstructGPT does: "
         "sft -> sample/label -> train-rm -> ppo -> eval/compare, all in one run directory.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Options every training stage takes.
RunDir = Annotated[Optional[str], typer.Option("--run-dir", help="Run directory shared by all stages [default: runs/default].")]
ConfigFile = Annotated[Optional[Path], typer.Option("--config", help="YAML preset; flags override it.")]
PrintConfig = Annotated[bool, typer.Option("--print-config", help="Print the resolved config as YAML and exit.")]
MaxSteps = Annotated[Optional[int], typer.Option("--max-steps", help="Stop after N optimizer steps.")]
Seed = Annotated[Optional[int], typer.Option("--seed", help="Seed for init, data order and sampling.")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue from the newest complete checkpoint.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Delete this stage's outputs and start over.")]
AllowChanges = Annotated[bool, typer.Option("--allow-changes", help="With --resume: continue even though settings or inputs that change training differ from the run so far (recorded in the manifest).")]
Device = Annotated[Optional[str], typer.Option("--device", help="auto, cpu, cuda, cuda:N [default: auto].")]
Model = Annotated[Optional[str], typer.Option("--model", help="smollm2-135m (bundled), tiny, or a local HF directory.")]
Lora = Annotated[Optional[bool], typer.Option("--lora/--no-lora", help="Train LoRA adapters instead of all weights.")]
Fsdp = Annotated[Optional[bool], typer.Option("--fsdp/--no-fsdp", help="Under torchrun: shard the model over the processes (FSDP2) instead of DDP.")]
Checkpointing = Annotated[Optional[bool], typer.Option(
    "--gradient-checkpointing/--no-gradient-checkpointing",
    help="Recompute each layer's activations in the backward: less memory, about a third more compute.")]


def fail(messages: list[str], code: int = 2) -> None:
    for line in messages:
        typer.echo(f"error: {line}", err=True)
    raise typer.Exit(code)


def run_stage(stage: str, config_file: Optional[Path], print_config: bool, overrides: dict[str, Any],
              runner: Callable[[Any], Any]) -> None:
    """Resolve the config, print it or run the stage. Known failures end with their exit code and one
    message each, no traceback (errors.py); the locks the command took are released in every case, and
    a stage that ended early is marked 'interrupted' or 'failed' in the manifest."""
    from . import config as config_mod
    from .errors import BadInput, Interrupted, NonFinite, WriteFailed
    from .locks import release_all
    from .signals import stop_requested
    from .distributed import is_main
    from .storage import disk_errno

    status = "failed"
    try:
        cfg = config_mod.resolve(stage, config_file, overrides)
        if print_config:
            typer.echo(config_mod.to_yaml(stage, cfg), nl=False)
            return
        result = runner(cfg)
        status = None
    except (BadInput, NonFinite, WriteFailed) as e:
        release_all(status)
        fail(e.messages, e.code)
    except (Interrupted, KeyboardInterrupt) as e:
        interrupted(stage, e if isinstance(e, Interrupted) else Interrupted(2))
    except Exception as e:
        if stop_requested() is not None:  # a library swallowed the signal's exception and raised its own
            interrupted(stage, Interrupted(stop_requested()))
        if not isinstance(e, OSError) or disk_errno(e) is None:
            raise
        release_all(status)  # the storage failed outside igpt's own writers (a library's file, a log)
        fail(WriteFailed(e.filename or "a file", e.errno).messages, 4)
    finally:
        release_all(status)
    if result is not None and is_main():
        typer.echo(str(result))


def interrupted(stage: str, e: Any) -> None:
    """Exit 128 + signal; the stage's manifest entry says 'interrupted' (a training stage that stopped
    between steps has already said how to resume)."""
    from .locks import release_all

    release_all("interrupted")
    if not e.said:
        typer.echo(f"{stage}: interrupted ({e}); nothing half-written is kept: rerun the command (with --resume "
                   "for a training stage) to go on from its last complete checkpoint", err=True)
    raise typer.Exit(e.code) from None


@app.command()
def sft(
    data: Annotated[Optional[str], typer.Option("--data", help="Demonstrations JSONL: {prompt, response} or {messages}.")] = None,
    run_dir: RunDir = None,
    model: Model = None,
    lora: Lora = None,
    fsdp: Fsdp = None,
    gradient_checkpointing: Checkpointing = None,
    config: ConfigFile = None,
    print_config: PrintConfig = False,
    max_steps: MaxSteps = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="Passes over the data [default: 16, the paper].")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Micro-batch size (sequences).")] = None,
    grad_accum: Annotated[Optional[int], typer.Option("--grad-accum", help="Micro-batches per optimizer step.")] = None,
    dropout: Annotated[Optional[float], typer.Option("--dropout", help="Dropout probability of the model.")] = None,
    max_seq_len: Annotated[Optional[int], typer.Option("--max-seq-len", help="Context window for training (tokens).")] = None,
    val_fraction: Annotated[Optional[float], typer.Option("--val-fraction", help="Share held out for eval loss.")] = None,
    save_every: Annotated[Optional[int], typer.Option("--save-every", help="Checkpoint every N steps.")] = None,
    eval_every: Annotated[Optional[int], typer.Option("--eval-every", help="Held-out loss every N steps.")] = None,
    seed: Seed = None,
    resume: Resume = False,
    overwrite: Overwrite = False,
    allow_changes: AllowChanges = False,
    device: Device = None,
) -> None:
    """Step 1: supervised fine-tuning on demonstrations (loss on response tokens only)."""
    overrides = {"data": data, "run_dir": run_dir, "model.name": model, "lora.enabled": lora, "max_steps": max_steps,
                 "epochs": epochs, "optim.lr": lr, "optim.batch_size": batch_size, "optim.grad_accum": grad_accum,
                 "model.dropout": dropout, "model.max_seq_len": max_seq_len, "val_fraction": val_fraction,
                 "save_every": save_every, "eval_every": eval_every, "seed": seed, "device": device, "fsdp": fsdp,
                 "model.gradient_checkpointing": gradient_checkpointing}

    def runner(cfg: Any) -> Any:
        from .distributed import launched
        from .stages import sft as stage

        with launched(cfg.device):  # torchrun / accelerate launch: join the process group (else nothing)
            return stage.run(cfg, resume=resume, overwrite=overwrite, allow_changes=allow_changes)

    run_stage("sft", config, print_config, overrides, runner)


@app.command("train-rm")
def train_rm(
    rankings: Annotated[Optional[str], typer.Option("--rankings", help="Rankings JSONL: {prompt, responses, ranks} or {prompt, chosen, rejected}.")] = None,
    demos: Annotated[Optional[str], typer.Option("--demos", help="Demonstrations that define reward 0 [default: the run's SFT data].")] = None,
    normalize: Annotated[Optional[bool], typer.Option("--normalize/--no-normalize", help="Shift rewards so the demonstrations score mean 0.")] = None,
    sft: Annotated[Optional[str], typer.Option("--sft", help="SFT model directory to start from [default: RUN_DIR/sft/final].")] = None,
    run_dir: RunDir = None,
    model: Annotated[Optional[str], typer.Option("--model", help="Start from this model instead of the SFT model (tiny, smollm2-135m, a directory).")] = None,
    lora: Lora = None,
    fsdp: Fsdp = None,
    gradient_checkpointing: Checkpointing = None,
    config: ConfigFile = None,
    print_config: PrintConfig = False,
    max_steps: MaxSteps = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="Passes over the rankings [default: 1, the paper].")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Prompts per micro-batch (each with its K responses).")] = None,
    grad_accum: Annotated[Optional[int], typer.Option("--grad-accum", help="Micro-batches per optimizer step.")] = None,
    val_fraction: Annotated[Optional[float], typer.Option("--val-fraction", help="Share of prompts held out.")] = None,
    save_every: Annotated[Optional[int], typer.Option("--save-every", help="Checkpoint every N steps.")] = None,
    eval_every: Annotated[Optional[int], typer.Option("--eval-every", help="Held-out accuracy every N steps.")] = None,
    seed: Seed = None,
    resume: Resume = False,
    overwrite: Overwrite = False,
    allow_changes: AllowChanges = False,
    device: Device = None,
) -> None:
    """Step 2: reward model from rankings of K responses per prompt (K-wise loss, reward normalised)."""
    overrides = {"rankings": rankings, "demos": demos, "normalize": normalize, "sft": sft, "run_dir": run_dir,
                 "model.name": model, "lora.enabled": lora, "max_steps": max_steps, "epochs": epochs,
                 "optim.lr": lr, "optim.batch_size": batch_size, "optim.grad_accum": grad_accum,
                 "val_fraction": val_fraction, "save_every": save_every, "eval_every": eval_every, "seed": seed,
                 "device": device, "fsdp": fsdp,
                 "model.gradient_checkpointing": gradient_checkpointing}

    def runner(cfg: Any) -> Any:
        from .distributed import launched
        from .stages import reward as stage

        with launched(cfg.device):  # torchrun / accelerate launch: join the process group (else nothing)
            return stage.run(cfg, resume=resume, overwrite=overwrite, allow_changes=allow_changes)

    run_stage("rm", config, print_config, overrides, runner)


@app.command()
def ppo(
    prompts: Annotated[Optional[str], typer.Option("--prompts", help="Prompts JSONL for rollouts: {prompt}, optional category.")] = None,
    ptx_coef: Annotated[Optional[float], typer.Option("--ptx-coef", help="PPO-ptx gamma: weight of the pretraining LM loss (paper: 27.8) [default: 0].")] = None,
    ptx_data: Annotated[Optional[str], typer.Option("--ptx-data", help="Pretraining text: JSONL {text} or .txt.")] = None,
    ptx_micro_batch_size: Annotated[Optional[int], typer.Option("--ptx-micro-batch-size", help="Pretraining sequences per forward/backward, memory only [default: 0 = optim.batch_size].")] = None,
    sft: Annotated[Optional[str], typer.Option("--sft", help="SFT model (policy init and KL reference) [default: RUN_DIR/sft/final].")] = None,
    rm: Annotated[Optional[str], typer.Option("--rm", help="Reward model (and value init) [default: RUN_DIR/rm/final].")] = None,
    require_rm_accuracy: Annotated[Optional[float], typer.Option("--require-rm-accuracy", help="Refuse to start unless the RM's recorded held-out accuracy is at least this (0-1) [default: 0, no check].")] = None,
    run_dir: RunDir = None,
    lora: Lora = None,
    fsdp: Fsdp = None,
    gradient_checkpointing: Checkpointing = None,
    config: ConfigFile = None,
    print_config: PrintConfig = False,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", help="PPO iterations (rollout + update each).")] = None,
    total_episodes: Annotated[Optional[int], typer.Option("--total-episodes", help="Stop after this many sampled responses (rounded up to whole iterations).")] = None,
    beta: Annotated[Optional[float], typer.Option("--beta", help="KL penalty coefficient (paper: 0.02).")] = None,
    target_kl: Annotated[Optional[float], typer.Option("--target-kl", help="Adapt beta towards this KL (0 = fixed).")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Learning rate of the policy (and of the value model when --vf-lr is 0).")] = None,
    vf_lr: Annotated[Optional[float], typer.Option("--vf-lr", help="Learning rate of the value model; 0 = --lr (paper: 9e-6).")] = None,
    rollout_batch_size: Annotated[Optional[int], typer.Option("--rollout-batch-size", help="Prompts per iteration.")] = None,
    mini_batch_size: Annotated[Optional[int], typer.Option("--mini-batch-size", help="Responses per optimizer step.")] = None,
    ppo_epochs: Annotated[Optional[int], typer.Option("--ppo-epochs", help="Passes over each rollout batch.")] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", help="Sampling temperature.")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", help="Longest response (tokens).")] = None,
    save_every: Annotated[Optional[int], typer.Option("--save-every", help="Checkpoint every N iterations.")] = None,
    sample_every: Annotated[Optional[int], typer.Option("--sample-every", help="Write samples every N iterations.")] = None,
    seed: Seed = None,
    resume: Resume = False,
    overwrite: Overwrite = False,
    allow_changes: AllowChanges = False,
    device: Device = None,
) -> None:
    """Step 3: PPO against the reward model with a per-token KL penalty, and PPO-ptx."""
    overrides = {"prompts": prompts, "ptx_coef": ptx_coef, "ptx_data": ptx_data, "sft": sft, "rm": rm,
                 "require_rm_accuracy": require_rm_accuracy,
                 "ptx_micro_batch_size": ptx_micro_batch_size,
                 "run_dir": run_dir, "lora.enabled": lora, "max_steps": max_steps, "total_episodes": total_episodes,
                 "beta": beta, "target_kl": target_kl, "optim.lr": lr, "rollout_batch_size": rollout_batch_size,
                 "mini_batch_size": mini_batch_size, "ppo_epochs": ppo_epochs, "temperature": temperature,
                 "max_new_tokens": max_new_tokens, "save_every": save_every, "sample_every": sample_every,
                 "seed": seed, "device": device, "fsdp": fsdp, "vf_lr": vf_lr,
                 "model.gradient_checkpointing": gradient_checkpointing}

    def runner(cfg: Any) -> Any:
        from .distributed import launched
        from .stages import ppo as stage

        with launched(cfg.device):  # torchrun / accelerate launch: join the process group (else nothing)
            return stage.run(cfg, resume=resume, overwrite=overwrite, allow_changes=allow_changes)

    run_stage("ppo", config, print_config, overrides, runner)


@app.command()
def sample(
    prompts: Annotated[Optional[str], typer.Option("--prompts", help="Prompts JSONL: {prompt}, optional category.")] = None,
    out: Annotated[Optional[str], typer.Option("--out", help="Output JSONL {prompt, responses}; add ranks to train an RM.")] = None,
    k: Annotated[Optional[int], typer.Option("--k", help="Responses per prompt [default: 4].")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="Model to sample [default: RUN_DIR/sft/final].")] = None,
    run_dir: RunDir = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", help="Sampling temperature; 0 = greedy [default: 1.0].")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", help="Longest response in tokens [default: 128].")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Sequences generated at once.")] = None,
    config: ConfigFile = None,
    print_config: PrintConfig = False,
    seed: Seed = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if it exists.")] = False,
    device: Device = None,
) -> None:
    """Sample K responses per prompt for labelers to rank (the same seed gives the same samples)."""
    overrides = {"prompts": prompts, "out": out, "k": k, "model": model, "run_dir": run_dir,
                 "temperature": temperature, "max_new_tokens": max_new_tokens, "batch_size": batch_size,
                 "seed": seed, "device": device}

    def runner(cfg: Any) -> Any:
        from .stages import sample as stage

        return stage.run(cfg, overwrite=overwrite)

    run_stage("sample", config, print_config, overrides, runner)


@app.command("eval")
def evaluate(
    model: Annotated[Optional[str], typer.Argument(help="A stage of the run (sft, ppo) or a model directory.")] = None,
    prompts: Annotated[Optional[str], typer.Option("--prompts", help="Held-out prompts JSONL.")] = None,
    rankings: Annotated[Optional[str], typer.Option("--rankings", help="Held-out rankings: the RM's pairwise accuracy.")] = None,
    ptx_data: Annotated[Optional[str], typer.Option("--ptx-data", help="Held-out pretraining text: LM loss vs SFT (alignment tax).")] = None,
    rm: Annotated[Optional[str], typer.Option("--rm", help="Reward model [default: RUN_DIR/rm/final].")] = None,
    sft: Annotated[Optional[str], typer.Option("--sft", help="KL reference [default: RUN_DIR/sft/final].")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Report folder eval/NAME [default: the model's name].")] = None,
    run_dir: RunDir = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", help="Sampling temperature [default: 1.0].")] = None,
    kl_temperature: Annotated[Optional[float], typer.Option("--kl-temperature", help="Log-prob temperature of the KL to SFT [default: the run's PPO temperature, else 1.0].")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", help="Longest response (tokens).")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Sequences per forward pass.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout (for scripts).")] = False,
    config: ConfigFile = None,
    print_config: PrintConfig = False,
    seed: Seed = None,
    device: Device = None,
) -> None:
    """Reward, KL to SFT, alignment tax and preference accuracy of a model; writes eval/NAME/report.json."""
    overrides = {"model": model, "prompts": prompts, "rankings": rankings, "ptx_data": ptx_data, "rm": rm,
                 "sft": sft, "name": name, "run_dir": run_dir, "temperature": temperature, "kl_temperature": kl_temperature,
                 "max_new_tokens": max_new_tokens, "batch_size": batch_size, "seed": seed, "device": device}

    def runner(cfg: Any) -> Any:
        import json

        from .stages import evaluate as stage

        report = stage.run(cfg, as_json=as_json)
        if as_json:
            typer.echo(json.dumps(report, indent=2))

    run_stage("eval", config, print_config, overrides, runner)


@app.command()
def compare(
    a: Annotated[Optional[str], typer.Argument(help="Model A: a stage of the run (sft, ppo) or a directory.")] = None,
    b: Annotated[Optional[str], typer.Argument(help="Model B, the baseline.")] = None,
    prompts: Annotated[Optional[str], typer.Option("--prompts", help="Prompts both models answer.")] = None,
    judge: Annotated[Optional[str], typer.Option("--judge", help="rm (reward model) or human (terminal labeler) [default: rm].")] = None,
    rm: Annotated[Optional[str], typer.Option("--rm", help="Reward model judge [default: RUN_DIR/rm/final].")] = None,
    tie_margin: Annotated[Optional[float], typer.Option("--tie-margin", help="RM score gap counted as a tie [default: 0].")] = None,
    run_dir: RunDir = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", help="Sampling temperature for both [default: 0.7].")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", help="Longest response (tokens).")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Sequences per forward pass.")] = None,
    config: ConfigFile = None,
    print_config: PrintConfig = False,
    seed: Seed = None,
    device: Device = None,
) -> None:
    """Win rate of A over B with a 95% confidence interval; writes compare/A-vs-B/ with report.html."""
    overrides = {"a": a, "b": b, "prompts": prompts, "judge": judge, "rm": rm, "tie_margin": tie_margin,
                 "run_dir": run_dir, "temperature": temperature, "max_new_tokens": max_new_tokens,
                 "batch_size": batch_size, "seed": seed, "device": device}

    def runner(cfg: Any) -> Any:
        from .stages import compare as stage

        stage.run(cfg)

    run_stage("compare", config, print_config, overrides, runner)


@app.command()
def label(
    samples: Annotated[str, typer.Argument(help="Samples JSONL from `igpt sample`: {prompt, responses}.")],
    out: Annotated[str, typer.Option("--out", help="Rankings JSONL to append to (train-rm reads it).")],
) -> None:
    """Rank sampled responses in the terminal (1 = best, ties allowed); resumes where it stopped."""
    from .errors import BadInput
    from .stages import label as stage

    try:
        stage.run(samples, out)
    except BadInput as e:
        fail(e.messages)


def main() -> None:
    import os

    from .errors import Interrupted
    from .signals import install_signal_handlers

    install_signal_handlers()  # before the heavy imports: a stop signal while loading ends the command cleanly
    # No model or data set is ever fetched from a hub at run time; local directories only.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # igpt reports what matters itself
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\.")
    try:
        app()
    except Interrupted as e:  # between commands' own handling (while parsing the command line)
        raise SystemExit(e.code) from None


if __name__ == "__main__":
    main()
