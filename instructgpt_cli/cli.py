"""The ``igpt`` command line, built from the table of stages (stages.STAGES) and their config dataclasses:
options -> config -> stage.run().

A stage's flags are its config fields (config.py), each with the field's doc as help and its default shown.
``field_name`` is ``--field-name`` and a block's ``block.field_name`` is ``--block-field-name`` (``--lora-r``,
``--optim-weight-decay``), except the short names in ALIASES that scripts already use (``--lr`` is optim.lr,
``--model`` model.name, ``--dtype`` model.dtype ...; HIDDEN_ALIASES keeps older names working, unshown). A bool
is ``--x/--no-x``, a list comma-separated. A new config field is a flag without touching this file. A flag not
given is None: Defaults < --config file < flags. An unknown flag is answered with the flag meant: the same with
``-`` for ``_``, igpt's name for a TRL name (TRL_NAMES), or a close match (:class:`Command`).

Heavy imports (torch, transformers) happen inside the commands, so ``igpt --help`` is instant.
Exit codes (README, "Failure and recovery"): 0 success, 2 bad input or usage (every problem reported as
FILE:LINE: field: reason, nothing written), 3 non-finite training values, 4 a failed write (full disk,
I/O error), 128 + N a stop signal N (130 SIGINT, 138 SIGUSR1, 143 SIGTERM), 1 an unexpected error.
"""
from __future__ import annotations

import difflib
import inspect
import sys
from pathlib import Path
from typing import Any, Optional

import typer
import typer.core
from typing_extensions import Annotated

from . import config as config_mod
from .presets import resolve
from .stages import STAGES, StageSpec

# The click typer builds on: its own copy in newer typer (typer._click), click itself in older ones.
CLICK = getattr(typer.core, "_click", None) or typer.core.click


def plain_switches(params: list[Any]) -> list[Any]:
    """``params`` with the type column of every switch (``--resume``, ``--lora/--no-lora``, ``--help``) empty:
    typer's rich help shows ``<bool>`` there, which reads as if the switch took a value."""
    for param in params:
        if getattr(param, "is_flag", False):
            param.display_type_rich = lambda ctx: None
    return params


# TRL's (and transformers.TrainingArguments') names for igpt's settings, flag -> igpt's flags in order of
# preference (the first the command has answers): igpt answers with its own name instead of a guess.
TRL_NAMES = {
    "--learning-rate": ("--lr",), "--num-train-epochs": ("--epochs",), "--per-device-train-batch-size":
    ("--batch-size",), "--gradient-accumulation-steps": ("--grad-accum",), "--output-dir": ("--run-dir",),
    "--max-length": ("--max-seq-len",), "--max-seq-length": ("--max-seq-len",), "--logging-steps": ("--log-every",),
    "--save-steps": ("--save-every",), "--save-total-limit": ("--keep-checkpoints",), "--eval-steps": ("--eval-every",),
    "--warmup-steps": ("--optim-warmup-steps",), "--weight-decay": ("--optim-weight-decay",),
    "--lr-scheduler-type": ("--optim-scheduler",), "--max-grad-norm": ("--optim-grad-clip",),
    "--adam-beta1": ("--optim-beta1",), "--adam-beta2": ("--optim-beta2",), "--adam-epsilon": ("--optim-eps",),
    "--use-peft": ("--lora",), "--model-name-or-path": ("--model", "--sft"), "--torch-dtype": ("--dtype",),
    "--bf16": ("--dtype bfloat16",), "--fp16": ("--dtype float16",), "--kl-coef": ("--beta",),
    "--num-ppo-epochs": ("--ppo-epochs",), "--response-length": ("--max-new-tokens",),
    "--dataset-name": ("--data", "--rankings", "--prompts"), "--data-seed": ("--seed",),
}


def unknown_flag(given: str, known: list[str]) -> str:
    """What to say about a flag the command does not have: the same flag with ``-`` for ``_`` (``--report_to``),
    igpt's name for a TRL name (``--learning-rate``), else the known flags close to it, if any (difflib: a
    ratio of 0.75 matches a typo, not any flag sharing a few letters)."""
    name = "--" + given.lstrip("-").replace("_", "-")
    if name in known:
        return f"no such option: {given}; igpt spells it {name}"
    ours = [flag for flag in TRL_NAMES.get(name, ()) if flag.split()[0] in known]
    if ours:
        return f"no such option: {given} (TRL's name); igpt calls it {ours[0]}"
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.75)
    return f"no such option: {given}" + (f"; did you mean {' or '.join(close)}?" if close else "")


class Command(typer.core.TyperCommand):
    """An igpt command: switches show no value in --help (:func:`plain_switches`), and an unknown flag is
    answered with the flag meant (:func:`unknown_flag`) rather than click's loose guess."""

    def get_params(self, ctx: Any) -> list[Any]:
        return plain_switches(super().get_params(ctx))

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except CLICK.exceptions.NoSuchOption as e:
            known = [o for p in self.get_params(ctx) if p.param_type_name == "option" and not p.hidden
                     for o in (*p.opts, *p.secondary_opts) if o.startswith("--")]
            raise CLICK.exceptions.NoSuchOption(e.option_name, unknown_flag(e.option_name, known), ctx=ctx) from None


class Group(typer.core.TyperGroup):
    """``igpt`` itself: its switches (--version, --help) show no value in --help either."""

    def get_params(self, ctx: Any) -> list[Any]:
        return plain_switches(super().get_params(ctx))


app = typer.Typer(
    name="igpt",
    cls=Group,
    help="Train language models to follow instructions from human feedback, as InstructGPT does: "
         "sft -> sample/label -> train-rm -> ppo -> eval/compare, all in one run directory.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)



def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"igpt {__version__}")
        raise typer.Exit()


@app.callback()
def _top(version: Annotated[Optional[bool], typer.Option("--version", callback=_print_version, is_eager=True,
                                                         help="Print igpt's version and exit.")] = None) -> None:
    pass  # the options of `igpt` itself; the help text is Typer(help=...) above


# Flags whose name is not derived from their config key (scripts use them); the same in every stage.
# model.dtype is --dtype as in sample, eval and compare: one name for one thing.
ALIASES = {"model.name": "--model", "model.dtype": "--dtype", "model.dropout": "--dropout",
           "model.max_seq_len": "--max-seq-len", "model.gradient_checkpointing": "--gradient-checkpointing",
           "lora.enabled": "--lora",
           "optim.lr": "--lr", "optim.batch_size": "--batch-size", "optim.grad_accum": "--grad-accum"}
HIDDEN_ALIASES = {"model.dtype": "--model-dtype"}  # earlier names, still accepted (scripts), not shown in --help
PANELS = {"model": "Model", "lora": "LoRA", "optim": "Optimizer"}  # --help groups a block's flags

# Options that are no config field: how to run a stage, not what it computes. They go to its run().
ConfigFile = Annotated[Optional[Path], typer.Option("--config", help="YAML preset with a section for this command (a "
                                                         "stage's saved config.yaml has one, for that stage); flags "
                                                         "override it.")]
PrintConfig = Annotated[bool, typer.Option("--print-config", help="Print the resolved config as YAML and exit.")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue from the newest complete checkpoint.")]
ResumeSamples = Annotated[bool, typer.Option("--resume", help="Go on after the samples a stopped run kept.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Delete this stage's outputs and start over.")]
AllowChanges = Annotated[bool, typer.Option("--allow-changes", help="With --resume: continue even though settings or "
                                            "inputs that change training differ from the run so far (recorded in the "
                                            "manifest).")]
Replace = Annotated[bool, typer.Option("--overwrite", help="Replace --out if it exists.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout (for scripts).")]
TRAINING_OPTIONS = {"resume": (Resume, False), "overwrite": (Overwrite, False), "allow_changes": (AllowChanges, False)}
ReplaceResults = Annotated[bool, typer.Option("--overwrite", help="Replace this report's earlier results if there "
                                              "are any (without it, they are kept and the command exits 2).")]
STAGE_OPTIONS = {"sample": {"overwrite": (Replace, False), "resume": (ResumeSamples, False)},
                 "eval": {"as_json": (AsJson, False), "overwrite": (ReplaceResults, False),
                          "resume": (ResumeSamples, False)},
                 "compare": {"overwrite": (ReplaceResults, False), "resume": (ResumeSamples, False)}}


def flag_name(key: str) -> str:
    """``optim.weight_decay`` -> ``--optim-weight-decay``, unless ALIASES names it."""
    return ALIASES.get(key) or "--" + key.replace(".", "-").replace("_", "-")


def help_text(doc: str, tp: Any, default: Any, flag: str) -> str:
    """The field's doc and its default (a list as the comma-separated text the flag takes; none for an empty
    list or path, whose meaning the doc says)."""
    text = doc
    if tp is bool:
        text += f" [default: {'' if default else 'no-'}{flag[2:]}]"
    elif isinstance(default, list):
        text += "; comma-separated" + (f" [default: {','.join(map(str, default))}]" if default else "")
    elif default != "":  # what an empty path means (required, or RUN_DIR/...) the doc says
        text += f" [default: {default}]"
    return rich_safe(text)


def rich_safe(text: str) -> str:
    """``text`` with its brackets escaped where typer formats help with rich, which takes ``[default: x]`` for a
    markup tag and drops it."""
    return text.replace("[", "\\[") if typer.core.HAS_RICH else text


def config_parameters(stage: StageSpec) -> tuple[list[inspect.Parameter], dict[str, tuple[str, Any]]]:
    """Typer parameters for a stage's config fields (its positional arguments first, required), and
    ``{parameter name: (dotted key, field type)}``; a field in HIDDEN_ALIASES has a second, hidden parameter
    that sets the same key."""
    params, keys = [], {}
    for key, (tp, default, doc) in config_mod.flat_fields(stage.config()).items():
        if key in stage.unflagged:
            continue
        name, flag = key.replace(".", "__"), flag_name(key)
        assert flag not in {flag_name(k) for k, _ in keys.values()}, f"{stage.name}: two fields are {flag}"
        text = help_text(doc, tp, default, flag)
        cli_type = str if tp is list else tp  # a list is given comma-separated
        if key in stage.arguments:  # the command's subject (igpt eval MODEL): required, so --help says so
            info = typer.Argument(help=text, show_default=False, metavar=key.upper() + ("..." if tp is list else ""))
            params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,  # a list: one or more values
                                            annotation=Annotated[list[str] if tp is list else cli_type, info]))
            keys[name] = (key, tp)
            continue
        for pname, names, hidden in ((name, flag, False), (name + "__alias", HIDDEN_ALIASES.get(key), True)):
            if names is None:
                continue
            info = typer.Option(f"{names}/--no-{names[2:]}" if tp is bool else names, help=text, show_default=False,
                                hidden=hidden, rich_help_panel=PANELS.get(key.split(".")[0]) if "." in key else None)
            params.append(inspect.Parameter(pname, inspect.Parameter.KEYWORD_ONLY, default=None,
                                            annotation=Annotated[Optional[cli_type], info]))
            keys[pname] = (key, tp)
    params.sort(key=lambda p: keys[p.name][0] not in stage.arguments)  # stable: field order kept
    return params, keys


def stage_command(stage: StageSpec) -> None:
    """Register ``igpt COMMAND``: the stage's config fields as flags, then --config, --print-config and the
    stage's own options (TRAINING_OPTIONS, STAGE_OPTIONS), which run_stage hands to its run()."""
    params, keys = config_parameters(stage)
    options = {"config": (ConfigFile, None), "print_config": (PrintConfig, False),
               **(TRAINING_OPTIONS if stage.training else STAGE_OPTIONS.get(stage.name, {}))}
    clash = sorted(set(options) & set(keys))
    assert not clash, f"{stage.name}: config fields {clash} clash with the command's own options"
    params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d, annotation=a)
               for n, (a, d) in options.items()]

    def command(**values: Any) -> None:
        overrides: dict[str, Any] = {}
        for pname, (key, tp) in keys.items():
            value = values.pop(pname)
            if tp is list and value is not None:  # comma-separated; an argument's values may be too
                value = [v.strip() for part in ([value] if isinstance(value, str) else value)
                         for v in part.split(",") if v.strip()]
            if value is not None or key not in overrides:  # a hidden alias given sets its key too
                overrides[key] = value
        run_stage(stage.name, values.pop("config"), values.pop("print_config"), overrides, **values)

    command.__signature__ = inspect.Signature(params)  # typer reads the parameters from the signature
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__name__ = stage.command.replace("-", "_")
    command.__doc__ = stage.help
    app.command(stage.command, cls=Command)(command)


def fail(messages: list[str], code: int = 2) -> None:
    """Print each problem as ``error: ...`` (the first errors.SHOWN of a long list) and exit with ``code``."""
    from .errors import shown

    for line in shown(messages):
        typer.echo(f"error: {line}", err=True)
    raise typer.Exit(code)


def run_stage(stage: str, config_file: Optional[Path], print_config: bool, overrides: dict[str, Any],
              **options: Any) -> None:
    """Resolve the config, print it or run the stage: ``stages.<module>.run(cfg, **options)``, a training
    stage inside ``distributed.launched`` (under torchrun / accelerate launch it joins the process group).
    The path a stage returns is printed; a report (eval, compare) only with --json, as JSON (the stage has
    shown it). Known failures end with their exit code and one message each, no traceback (errors.py);
    the locks the command took are released in every case, and a stage that ended early is marked
    'interrupted' or 'failed' in the manifest."""
    import importlib
    import json

    from .cpus import env_threads
    from .errors import BadInput, Interrupted, NonFinite, WriteFailed
    from .locks import release_all
    from .signals import stop_requested
    from .distributed import is_main
    from .storage import disk_errno

    status = "failed"
    try:
        cfg = resolve(stage, config_file, overrides, flag_name)
        env_threads()  # a bad IGPT_THREADS: exit 2 naming it, as a bad flag is
        if print_config:
            typer.echo(config_mod.to_yaml(stage, cfg), nl=False)
            return
        stage_module = importlib.import_module(STAGES[stage].module)
        settle_threads(stage, cfg, overrides.get("threads"), options.get("resume", False))
        if STAGES[stage].training:
            from .distributed import launched

            with launched(cfg.device):
                result = stage_module.run(cfg, **options)
        else:
            result = stage_module.run(cfg, **options)
        if isinstance(result, dict):
            result = json.dumps(result, indent=2) if options.get("as_json") else None
        status = None
    except (BadInput, NonFinite, WriteFailed) as e:
        release_all(status, e.messages[0] if e.messages else str(e), e.code)  # igpt status shows why and how
        fail(e.messages, e.code)
    except (Interrupted, KeyboardInterrupt) as e:
        interrupted(stage, e if isinstance(e, Interrupted) else Interrupted(2))
    except Exception as e:
        if stop_requested() is not None:  # a library swallowed the signal's exception and raised its own
            interrupted(stage, Interrupted(stop_requested()))
        if not isinstance(e, OSError) or disk_errno(e) is None:
            raise
        failed = WriteFailed(e.filename or "a file", e.errno)
        release_all(status, failed.messages[0], 4)  # the storage failed outside igpt's own writers (a library's file)
        fail(failed.messages, 4)
    finally:
        error = sys.exc_info()[1]  # an unexpected error (exit 1, with its traceback): named in the manifest
        release_all(status, f"{type(error).__name__}: {error}" if error is not None else None,
                    1 if error is not None else None)
    if result is not None and is_main():
        typer.echo(str(result))


def settle_threads(stage: str, cfg: Any, flag: int | None, resume: bool) -> None:
    """Choose and apply the command's CPU threads once, before it loads a model (cpus.py): a training stage's
    resume prefers the count its newest checkpoint was written with. A stage with a banner shows the choice in
    it; eval and compare, which have none, say it in their first line."""
    from .checkpoint import recorded_threads
    from .console import say
    from .cpus import settle
    from .rundir import Stage

    resumed = recorded_threads(Stage(Path(cfg.run_dir), stage)) if resume and STAGES[stage].training else None
    choice = settle(flag, cfg.threads, cfg.device, resumed)
    if stage in ("eval", "compare"):
        say(f"{STAGES[stage].command}: threads {choice}")


def interrupted(stage: str, e: Any) -> None:
    """Exit 128 + signal; the stage's manifest entry says 'interrupted' (a training stage that stopped
    between steps has already said how to resume)."""
    from .locks import release_all

    release_all("interrupted")
    if not e.said and STAGES[stage].training:
        typer.echo(f"{stage}: interrupted ({e}); nothing half-written is kept: rerun the command with --resume "
                   "to go on from its last complete checkpoint", err=True)
    elif not e.said:  # eval, compare and sample tell what they kept themselves; nothing was kept here
        typer.echo(f"{stage}: interrupted ({e}) before anything was kept; rerun the command", err=True)
    raise typer.Exit(e.code) from None


for spec in STAGES.values():
    if spec.config is not None:
        stage_command(spec)


@app.command(help=STAGES["label"].help, cls=Command)
def label(
    samples: Annotated[str, typer.Argument(help="Samples JSONL from `igpt sample`: {prompt, responses}.",
                                           metavar="SAMPLES")],
    out: Annotated[str, typer.Option("--out", help="Rankings JSONL to append to (train-rm reads it).")],
    judge: Annotated[str, typer.Option("--judge", help="human (you, in the terminal), model:REF (a local LM ranks "
                                       "by pairwise verdicts; REF a model directory, a stage such as sft, or a "
                                       "checkpoint such as ppo@step-40) or python:MODULE:FUNCTION (f(prompt, "
                                       "responses) -> scores); README, Judges")] = "human",
    run_dir: Annotated[Path, typer.Option("--run-dir", help="The run whose stages and checkpoints a model:REF "
                                          "judge may name")] = Path(config_mod.RunBlock().run_dir),
    batch_size: Annotated[int, typer.Option("--batch-size", help="model judge: prompts per forward pass "
                                            "(sequences)", min=1)] = 8,
    device: Annotated[str, typer.Option("--device", help="model judge: auto, cpu, cuda, cuda:N or mps")] = "auto",
    tie_margin: Annotated[float, typer.Option("--tie-margin", help="score differences up to this are ties (the "
                                              "function's units; nats for a model judge)", min=0.0)] = 0.0,
    threads: Annotated[Optional[int], typer.Option("--threads", help=rich_safe(
        config_mod.field_docs(config_mod.RunBlock)["threads"] + " [default: 0]"), min=0, show_default=False)] = None,
) -> None:
    from .console import say
    from .cpus import env_threads, settle
    from .errors import BadInput, Interrupted, WriteFailed
    from .judges import Settings
    from .stages import label as stage

    from .locks import release_all

    try:
        env_threads()  # a bad IGPT_THREADS: exit 2 naming it, before anything is read
        if judge != "human":  # before the judge loads; a person ranking in the terminal computes nothing
            say(f"label: threads {settle(threads, 0, device)}")
        stage.run(samples, out, judge, Settings(batch_size=batch_size, device=device, tie_margin=tie_margin), run_dir)
    except (BadInput, WriteFailed) as e:
        release_all()
        fail(e.messages, e.code)
    except Interrupted as e:  # each ranking was appended whole as it was made
        typer.echo(f"label: interrupted ({e}); the rankings made so far are kept in {out}: rerun the command to go "
                   "on after them", err=True)
        raise typer.Exit(e.code) from None
    finally:
        release_all()


@app.command(help=STAGES["status"].help, cls=Command)
def status(
    run_dir: Annotated[Optional[Path], typer.Argument(help=rich_safe("Run directory [default: runs/default]."),
                                                      metavar="RUN_DIR", show_default=False)] = None,
    run_dir_option: Annotated[Optional[Path], typer.Option("--run-dir", help="The same as RUN_DIR.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print it as one JSON object on stdout (keys: README, "
                                                         "'Checking on a run').")] = False,
) -> None:
    from .errors import BadInput
    from .stages import status as stage

    if run_dir and run_dir_option and run_dir != run_dir_option:
        fail([f"RUN_DIR {run_dir} and --run-dir {run_dir_option}: give one"])
    try:
        stage.run(run_dir or run_dir_option or Path(config_mod.RunBlock().run_dir), as_json)
    except BadInput as e:
        fail(e.messages)


def main() -> None:
    import os

    from .errors import Interrupted
    from .signals import install_signal_handlers

    install_signal_handlers()  # before the heavy imports: a stop signal while loading ends the command cleanly
    # No model or data set is ever fetched from a hub at run time; local directories only.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # a dataset id is read from the local cache only
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # igpt reports what matters itself
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\.")
    try:
        app()
    except Interrupted as e:  # before a command's own handling (building or parsing the command line)
        typer.echo(f"igpt: interrupted ({e}) before the command started; nothing was written", err=True)
        raise SystemExit(e.code) from None


if __name__ == "__main__":
    main()
