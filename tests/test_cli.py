"""The command line is built from the config dataclasses: today's flags keep their names and meaning, every
config field is a flag, --help shows each default, and Defaults < --config file < flags."""
from __future__ import annotations

import subprocess
import sys

import pytest
import typer
import yaml

from instructgpt_cli import config as config_mod
from instructgpt_cli.stages import STAGES
from conftest import igpt

CONFIGS = {name: stage.config for name, stage in STAGES.items() if stage.config is not None}
COMMAND = {name: stage.command for name, stage in STAGES.items()}  # stage -> command name (rm -> train-rm)

# The flags each command had before the CLI was generated from config.py (recorded from its click
# commands). Scripts use them: the generated CLI may add flags, never drop or rename one.
TODAY_FLAGS = {
    "sft": {"--allow-changes", "--batch-size", "--config", "--data", "--device", "--dropout", "--epochs",
            "--eval-every", "--fsdp", "--grad-accum", "--gradient-checkpointing", "--lora", "--lr", "--max-seq-len",
            "--max-steps", "--model", "--no-fsdp", "--no-gradient-checkpointing", "--no-lora", "--overwrite",
            "--print-config", "--resume", "--run-dir", "--save-every", "--seed", "--val-fraction"},
    "train-rm": {"--allow-changes", "--batch-size", "--config", "--demos", "--device", "--epochs", "--eval-every",
                 "--fsdp", "--grad-accum", "--gradient-checkpointing", "--lora", "--lr", "--max-steps", "--model",
                 "--no-fsdp", "--no-gradient-checkpointing", "--no-lora", "--no-normalize", "--normalize",
                 "--overwrite", "--print-config", "--rankings", "--resume", "--run-dir", "--save-every", "--seed",
                 "--sft", "--val-fraction"},
    "ppo": {"--allow-changes", "--beta", "--config", "--device", "--fsdp", "--gradient-checkpointing", "--lora", "--lr",
            "--max-new-tokens", "--max-steps", "--mini-batch-size", "--no-fsdp", "--no-gradient-checkpointing",
            "--no-lora", "--overwrite", "--ppo-epochs", "--print-config", "--prompts", "--ptx-coef", "--ptx-data",
            "--ptx-micro-batch-size", "--require-rm-accuracy", "--resume", "--rm", "--rollout-batch-size",
            "--run-dir", "--sample-every", "--save-every", "--seed", "--sft", "--target-kl", "--temperature",
            "--total-episodes", "--vf-lr"},
    "sample": {"--batch-size", "--config", "--device", "--k", "--max-new-tokens", "--model", "--out", "--overwrite",
               "--print-config", "--prompts", "--resume", "--run-dir", "--seed", "--temperature"},
    "eval": {"--batch-size", "--config", "--device", "--json", "--kl-temperature", "--max-new-tokens", "--name",
             "--print-config", "--prompts", "--ptx-data", "--rankings", "--rm", "--run-dir", "--seed", "--sft",
             "--temperature"},
    "compare": {"--batch-size", "--config", "--device", "--judge", "--max-new-tokens", "--print-config", "--prompts",
                "--rm", "--run-dir", "--seed", "--temperature", "--tie-margin"},
    "label": {"--out"},
}
TODAY_ARGUMENTS = {"eval": ["model"], "compare": ["a", "b"], "label": ["samples"]}

# The config key each of those flags set (the hand-written `overrides` dicts of the old cli.py).
_TRAINING = {"--run-dir": "run_dir", "--max-steps": "max_steps", "--seed": "seed", "--device": "device",
             "--fsdp": "fsdp", "--lora": "lora.enabled", "--gradient-checkpointing": "model.gradient_checkpointing",
             "--lr": "optim.lr", "--save-every": "save_every"}
TODAY_KEYS = {
    "sft": {**_TRAINING, "--data": "data", "--model": "model.name", "--epochs": "epochs",
            "--batch-size": "optim.batch_size", "--grad-accum": "optim.grad_accum", "--dropout": "model.dropout",
            "--max-seq-len": "model.max_seq_len", "--val-fraction": "val_fraction", "--eval-every": "eval_every"},
    "rm": {**_TRAINING, "--rankings": "rankings", "--demos": "demos", "--normalize": "normalize", "--sft": "sft",
           "--model": "model.name", "--epochs": "epochs", "--batch-size": "optim.batch_size",
           "--grad-accum": "optim.grad_accum", "--val-fraction": "val_fraction", "--eval-every": "eval_every"},
    "ppo": {**_TRAINING, "--prompts": "prompts", "--ptx-coef": "ptx_coef", "--ptx-data": "ptx_data",
            "--ptx-micro-batch-size": "ptx_micro_batch_size", "--sft": "sft", "--rm": "rm",
            "--require-rm-accuracy": "require_rm_accuracy", "--total-episodes": "total_episodes", "--beta": "beta",
            "--target-kl": "target_kl", "--vf-lr": "vf_lr", "--rollout-batch-size": "rollout_batch_size",
            "--mini-batch-size": "mini_batch_size", "--ppo-epochs": "ppo_epochs", "--temperature": "temperature",
            "--max-new-tokens": "max_new_tokens", "--sample-every": "sample_every"},
    "sample": {"--prompts": "prompts", "--out": "out", "--k": "k", "--model": "model", "--run-dir": "run_dir",
               "--temperature": "temperature", "--max-new-tokens": "max_new_tokens", "--batch-size": "batch_size",
               "--seed": "seed", "--device": "device"},
    "eval": {"MODEL": "model", "--prompts": "prompts", "--rankings": "rankings", "--ptx-data": "ptx_data", "--rm": "rm",
             "--sft": "sft", "--name": "name", "--run-dir": "run_dir", "--temperature": "temperature",
             "--kl-temperature": "kl_temperature", "--max-new-tokens": "max_new_tokens", "--batch-size": "batch_size",
             "--seed": "seed", "--device": "device"},
    "compare": {"A": "a", "B": "b", "--prompts": "prompts", "--judge": "judge", "--rm": "rm",
                "--tie-margin": "tie_margin", "--run-dir": "run_dir", "--temperature": "temperature",
                "--max-new-tokens": "max_new_tokens", "--batch-size": "batch_size", "--seed": "seed",
                "--device": "device"},
}
# Valid non-default values for string fields whose range is checked.
STRINGS = {"device": "cpu", "judge": "human", "dtype": "float32", "scheduler": "linear",
           "checkpoints": "all", "gold": "python:mod:fn", "watch": "python:mod:fn",
           "toxicity_instruction": "respectful", "rm_objective": "min", "score": "mean"}


def commands() -> dict:
    from instructgpt_cli.cli import app

    return typer.main.get_command(app).commands


def flags(command) -> set[str]:
    return {o for p in command.params if p.param_type_name == "option" for o in (*p.opts, *p.secondary_opts)}


def lookup(cfg: dict, key: str):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def non_default(value, leaf: str):
    """A value other than ``value`` that passes the range check of field ``leaf`` (as CLI text)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 3
    if isinstance(value, float):
        return 0.25 if value != 0.25 else 0.5
    if isinstance(value, list):
        if leaf == "columns":
            return ["prompt=question", "response=answer"]
        return ["tensorboard", "wandb"] if leaf == "report_to" else ["q_proj", "v_proj"]
    return STRINGS.get(leaf, f"x-{leaf}")


def print_config(stage: str, *args: str) -> dict:
    result = igpt(COMMAND[stage], *args, "--print-config")
    assert result.exit_code == 0, result.stdout + result.stderr
    return yaml.safe_load(result.stdout)[stage]


def test_every_flag_of_today_is_still_there():
    cmds = commands()
    for name, today in TODAY_FLAGS.items():
        missing = today - flags(cmds[name])
        assert not missing, f"igpt {name} lost {sorted(missing)}"
        arguments = [p.name for p in cmds[name].params if p.param_type_name == "argument"]
        assert arguments == TODAY_ARGUMENTS.get(name, []), name


@pytest.mark.parametrize("stage", list(TODAY_KEYS))
def test_every_flag_of_today_sets_the_same_key(stage):
    defaults = config_mod.to_dict(CONFIGS[stage]())
    positional = [k for k in TODAY_KEYS[stage] if not k.startswith("--")]
    for flag, key in TODAY_KEYS[stage].items():
        default = lookup(defaults, key)
        value = non_default(default, key.split(".")[-1])
        args = [f"x-{TODAY_KEYS[stage][p]}" for p in positional]  # the command's required arguments
        if isinstance(value, bool):
            args += [flag if value else "--no-" + flag[2:]]
        elif flag in positional:  # a list argument (eval's MODEL...) takes one or more
            value = args[positional.index(flag)]
            value = [value] if isinstance(default, list) else value
        else:
            args += [flag, str(value)]
        assert lookup(print_config(stage, *args), key) == value, (stage, flag, key)


def expected_flag(key: str) -> str:
    """The naming rule (cli.py's docstring): a flag of today keeps its name, every other field is its dotted key
    with dashes."""
    today = {k: f for keys in TODAY_KEYS.values() for f, k in keys.items() if f.startswith("--")}
    return today.get(key) or "--" + key.replace(".", "-").replace("_", "-")


@pytest.mark.parametrize("stage", list(CONFIGS))
def test_every_config_field_is_a_flag_that_sets_it(stage):
    command = commands()[COMMAND[stage]]
    arguments = [p.name for p in command.params if p.param_type_name == "argument"]
    assert arguments == list(STAGES[stage].arguments)
    for key, (tp, default, doc) in config_mod.flat_fields(CONFIGS[stage]()).items():
        if key in STAGES[stage].unflagged or key in arguments:
            continue
        flag = expected_flag(key)
        assert flag in flags(command), (stage, key, flag)
        value = non_default(default, key.split(".")[-1])
        if isinstance(value, bool):
            args = [flag if value else "--no-" + flag[2:]]
        else:
            args = [flag, ",".join(value) if isinstance(value, list) else str(value)]
        args = [f"x-{a}" for a in arguments] + args
        assert lookup(print_config(stage, *args), key) == value, (stage, flag, key)


def test_help_is_the_field_doc_with_its_default():
    cmds = commands()
    for stage, cls in CONFIGS.items():
        by_flag = {p.opts[0]: p for p in cmds[COMMAND[stage]].params if p.param_type_name == "option"}
        for key, (tp, default, doc) in config_mod.flat_fields(cls()).items():
            param = by_flag.get(expected_flag(key))
            if param is None:
                continue  # a positional argument or unflagged
            assert doc in param.help.replace("\\", ""), (stage, key)
            assert ("[default:" in param.help) == (default not in ("", [])), (stage, key, param.help)
    # rendered as rich does: the defaults survive (rich drops an unescaped "[default: 16]" as markup)
    from typer.testing import CliRunner

    from instructgpt_cli.cli import app

    text = CliRunner().invoke(app, ["sft", "--help"], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"}).stdout
    line = {flag: next(ln for ln in text.splitlines() if f" {flag} " in ln) for flag in ("--epochs", "--lora", "--lr")}
    assert "[default: 16]" in line["--epochs"] and "[default: no-lora]" in line["--lora"]
    assert "[default: 1e-05]" in line["--lr"]


def test_defaults_then_the_config_file_then_flags(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("sft:\n  lora: {r: 4, target_modules: [q_proj]}\n  optim: {weight_decay: 0.1}\n  epochs: 3\n")
    from_file = print_config("sft", "--config", preset)
    assert (from_file["lora"]["r"], from_file["optim"]["weight_decay"], from_file["epochs"]) == (4, 0.1, 3)
    assert from_file["lora"]["target_modules"] == ["q_proj"] and from_file["lora"]["alpha"] == 32  # default
    flagged = print_config("sft", "--config", preset, "--lora-r", "8", "--lora-target-modules", "q_proj, k_proj")
    assert flagged["lora"]["r"] == 8 and flagged["lora"]["target_modules"] == ["q_proj", "k_proj"]
    assert flagged["optim"]["weight_decay"] == 0.1 and flagged["epochs"] == 3
    bad = igpt("sft", "--lora-r", "0", "--data", "d.jsonl", "--print-config")
    assert bad.exit_code == 2 and "--lora-r (sft.lora.r): 0 must be >= 1" in bad.stderr


def test_a_new_config_field_is_a_flag(monkeypatch):
    import dataclasses

    from instructgpt_cli import cli

    @dataclasses.dataclass
    class Sample(config_mod.SampleConfig):
        top_p: float = config_mod.f(1.0, "nucleus sampling: keep the smallest set of tokens with this mass (fraction)")

    monkeypatch.setitem(STAGES, "sample", dataclasses.replace(STAGES["sample"], config=Sample))
    monkeypatch.setattr(cli, "app", typer.Typer())
    cli.stage_command(STAGES["sample"])  # what importing cli.py does, with the new field
    cli.app.command("other")(lambda: None)  # (a group, so the command is named as in igpt)
    from typer.testing import CliRunner

    result = CliRunner().invoke(cli.app, ["sample", "--top-p", "0.5", "--print-config"])
    assert result.exit_code == 0 and yaml.safe_load(result.stdout)["sample"]["top_p"] == 0.5
    [option] = [p for p in typer.main.get_command(cli.app).commands["sample"].params if p.name == "top_p"]
    assert option.opts == ["--top-p"] and option.help.replace("\\", "").endswith("(fraction) [default: 1.0]")


def test_help_imports_no_torch():
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "instructgpt_cli", "ppo", "--help"],
                         capture_output=True, text=True, check=True)
    imported = [ln.split("|")[-1].strip() for ln in out.stderr.splitlines() if ln.startswith("import time:")]
    assert "typer" in imported and not [m for m in imported if m.split(".")[0] in ("torch", "transformers")]


def test_the_table_of_stages_is_every_command():
    """stages.STAGES is the one table of commands: igpt has exactly its commands, each module has the run() the
    command calls, and the sections a preset may hold are the stages with a config."""
    import ast
    import importlib.util
    from pathlib import Path

    from instructgpt_cli import presets

    assert set(commands()) == {stage.command for stage in STAGES.values()}
    for name, stage in STAGES.items():
        source = Path(importlib.util.find_spec(stage.module).origin).read_text(encoding="utf-8")
        functions = {n.name for n in ast.parse(source).body if isinstance(n, ast.FunctionDef)}
        assert "run" in functions, stage.module
        keys = set(config_mod.flat_fields(stage.config())) if stage.config else set()
        assert set(stage.arguments) | stage.unflagged <= keys and (stage.config or not stage.training), name
        assert all(model.startswith(f"{name}/final") for model in stage.models.values()), name
    assert set(presets.sections()) == set(CONFIGS)
