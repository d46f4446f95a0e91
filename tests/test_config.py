"""Config resolution: defaults < YAML < flags; unknown keys and wrong types fail; presets validate. The configs
are made of shared blocks: every training stage has every common option, every field a doc, every number a
range rule, checked at its edges."""
import dataclasses
import inspect
import math
import subprocess
import sys
import typing

import pytest
import typer
import yaml

from conftest import REPO, TINY_CONFIG, igpt
from instructgpt_cli import presets
from instructgpt_cli import config as config_mod
from instructgpt_cli.errors import BadInput
from instructgpt_cli.stages import STAGES

PRESETS = sorted((REPO / "configs").glob("*.yaml"))
CONFIGS = {name: stage.config for name, stage in STAGES.items() if stage.config is not None}
TRAINING = {name: stage.config for name, stage in STAGES.items() if stage.training}


@pytest.mark.parametrize("preset", PRESETS, ids=[p.name for p in PRESETS])
def test_every_preset_resolves_for_every_stage_it_configures(preset):
    raw = yaml.safe_load(preset.read_text())
    assert raw and set(raw) <= set(presets.sections())
    for stage in raw:
        cfg = presets.resolve(stage, preset, {})
        assert config_mod.to_dict(cfg)  # built and range-checked


def all_fields(cls: type, prefix: str = ""):
    """(dotted key, type, field) of every field of config class ``cls``, a nested block and its fields too."""
    hints = typing.get_type_hints(cls)
    for fl in dataclasses.fields(cls):
        yield prefix + fl.name, hints[fl.name], fl
        if dataclasses.is_dataclass(hints[fl.name]):
            yield from all_fields(hints[fl.name], f"{prefix}{fl.name}.")


def test_every_field_has_a_doc_and_every_number_a_range_rule():
    for stage, cls in CONFIGS.items():
        for key, tp, fl in all_fields(cls):
            assert len(fl.metadata.get("doc", "")) > 10, f"{stage}.{key}: no doc"
            if tp in (int, float):  # ANY says a number has no bound; none may go without saying
                assert isinstance(fl.metadata.get("rule"), config_mod.Rule), f"{stage}.{key}: no range rule"


def blocks(cls: type) -> list[type]:
    """The blocks config class ``cls`` is made of: the dataclasses among its bases."""
    return [b for b in cls.__mro__[1:] if dataclasses.is_dataclass(b)]


def test_every_training_stage_has_every_common_option():
    """The common options are the fields of the blocks any training stage is made of: each must be a field and a
    flag of every training stage (issue 30: igpt dpo had no --report-to). And an option that every training stage
    declares on its own is a copy that will drift: it belongs in a block."""
    from instructgpt_cli.cli import app, flag_name

    common = {fl.name for cls in TRAINING.values() for block in blocks(cls) for fl in dataclasses.fields(block)}
    assert "report_to" in common and "optim" in common  # the derivation sees the blocks
    commands = typer.main.get_command(app).commands
    for stage, cls in TRAINING.items():
        missing = common - {fl.name for fl in dataclasses.fields(cls)}
        assert not missing, f"{stage} lacks the common options {sorted(missing)}"
        flags = {o for p in commands[STAGES[stage].command].params for o in (*p.opts, *p.secondary_opts)}
        keys = [k for k in config_mod.flat_fields(cls())
                if k.split(".")[0] in common and k not in STAGES[stage].unflagged]
        assert not [flag_name(k) for k in keys if flag_name(k) not in flags], f"igpt {STAGES[stage].command} lacks them"
    own = [set(inspect.get_annotations(cls)) - common for cls in TRAINING.values()]
    assert not set.intersection(*own), "declared by every training stage: move it to a block"
    result = igpt("dpo", "--rankings", "r.jsonl", "--report-to", "tensorboard", "--print-config")
    assert result.exit_code == 0 and yaml.safe_load(result.stdout)["dpo"]["report_to"] == ["tensorboard"]


def test_a_stage_restates_a_block_field_keeping_its_rule():
    ppo, sft = config_mod.PPOConfig(), config_mod.SFTConfig()
    assert (ppo.save_every, sft.save_every) == (20, 100)  # PPO's own default, where the block has it
    rules = {n: {fl.name: fl.metadata["rule"] for fl in dataclasses.fields(c)} for n, c in (("ppo", ppo), ("sft", sft))}
    assert rules["ppo"]["save_every"] is rules["sft"]["save_every"]
    with pytest.raises(BadInput, match=r"ppo.save_every \(command line\): 0 must be >= 1"):
        presets.resolve("ppo", None, {"save_every": 0})


def test_an_older_saved_config_still_loads(tmp_path):
    """A dpo/config.yaml written before dpo had report_to, its keys in the order of that time."""
    saved = config_mod.to_dict(config_mod.DPOConfig(beta=0.2))
    del saved["report_to"]
    older = tmp_path / "config.yaml"
    older.write_text(yaml.safe_dump({"dpo": dict(reversed(saved.items()))}, sort_keys=False))
    assert presets.resolve("dpo", older, {}) == config_mod.DPOConfig(beta=0.2)


def lookup(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("stage, key, edge, beyond", [
    ("ppo", "temperature", 1e-6, 0.0),  # PPO divides logits by T: no greedy rollout
    ("sample", "temperature", 0.0, -1e-6),  # 0 = greedy
    ("eval", "temperature", 0.0, -1e-6),
    ("compare", "temperature", 0.0, -1e-6),
    ("ppo", "gamma", 1.0, 1.000001),
    ("ppo", "ema_decay", 0.0, 1.0),
    ("ppo", "require_rm_accuracy", 1.0, 1.01),
    ("sft", "val_fraction", 0.0, 1.0),
    ("sft", "max_steps", 0, -1),
    ("sft", "optim.lr", 1e-12, 0.0),
    ("dpo", "optim.beta2", 0.0, 1.0),
    ("rm", "optim.min_lr_ratio", 1.0, 1.01),
    ("rm", "lora.layers", 0, -1),
    ("sample", "k", 2, 1),
])
def test_range_rules_at_their_edges(stage, key, edge, beyond):
    assert lookup(presets.resolve(stage, None, {key: edge}), key) == edge
    with pytest.raises(BadInput) as e:
        presets.resolve(stage, None, {key: beyond})
    assert e.value.messages[0].startswith(f"{stage}.{key} (command line): {beyond!r} must be ")


def test_every_float_is_finite():
    for stage, cls in CONFIGS.items():
        for key, (tp, default, doc) in config_mod.flat_fields(cls()).items():
            for value in (math.inf, -math.inf, math.nan) if tp is float else ():
                with pytest.raises(BadInput) as e:
                    presets.resolve(stage, None, {key: value})
                where = f"{stage}.{key} (command line)"
                assert e.value.messages[0].startswith(f"{where}: {value!r} must be a finite number"), e.value.messages


def test_range_errors_through_the_command_line_name_the_flag_or_file_and_exit_2(tmp_path):
    for value in ("inf", "nan"):
        result = igpt("sft", "--data", "d.jsonl", "--lr", value, "--print-config")
        assert result.exit_code == 2
        assert f"error: --lr (sft.optim.lr): {value} must be a finite number > 0" in result.stderr
    preset = tmp_path / "p.yaml"
    preset.write_text("sft:\n  optim: {lr: .nan, grad_clip: .inf}\n")
    result = igpt("sft", "--data", "d.jsonl", "--config", preset, "--print-config")
    assert result.exit_code == 2
    assert f"error: {preset}: sft.optim.lr: nan must be a finite number > 0" in result.stderr
    assert f"error: {preset}: sft.optim.grad_clip: inf must be a finite number >= 0 (0 disables)" in result.stderr
    result = igpt("ppo", "--prompts", "p.jsonl", "--temperature", "0", "--print-config")
    assert result.exit_code == 2 and "error: --temperature (ppo.temperature): 0.0 must be > 0" in result.stderr
    result = igpt("sample", "--prompts", "p.jsonl", "--out", "o.jsonl", "--temperature", "0", "--print-config")
    assert result.exit_code == 0 and yaml.safe_load(result.stdout)["sample"]["temperature"] == 0.0


def test_a_malformed_range_rule_fails_at_definition():
    for spec in ("=> 1", ">= one", "in [0, 1", "[0, 1)"):
        with pytest.raises(ValueError):
            config_mod.numeric(spec)
    half_open = config_mod.numeric("in (0, 1] (a note)")
    assert [half_open.ok(v) for v in (0, 1e-9, 1, 1.1)] == [False, True, True, False]
    assert half_open.text == "must be in (0, 1] (a note)"


def test_flags_override_file_override_defaults(tmp_path):
    cfg = presets.resolve("sft", TINY_CONFIG, {"optim.lr": 0.5, "epochs": None})
    assert cfg.optim.lr == 0.5  # flag
    assert cfg.epochs == 2 and cfg.model.name == "tiny"  # file (flag not given)
    assert cfg.optim.beta2 == 0.95  # default


def test_unknown_keys_wrong_types_and_ranges_are_all_reported(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sft:\n  optim: {lrr: 1, batch_size: 0}\n  epochs: many\n  model: {dtype: int8}\n")
    with pytest.raises(BadInput) as e:
        presets.resolve("sft", bad, {})
    text = "\n".join(e.value.messages)
    assert f"{bad}: sft.optim.lrr: unknown key" in text
    assert f"{bad}: sft.epochs: expected int, got str 'many'" in text
    bad.write_text("sft:\n  optim: {batch_size: 0}\n  model: {dtype: int8}\nppx: {}\n")
    with pytest.raises(BadInput) as e:
        presets.resolve("sft", bad, {})
    assert "ppx: unknown section" in e.value.messages[0]
    bad.write_text("sft:\n  optim: {batch_size: 0}\n  model: {dtype: int8}\n")
    with pytest.raises(BadInput) as e:
        presets.resolve("sft", bad, {})
    assert any("sft.optim.batch_size: 0 must be >= 1" in m for m in e.value.messages)
    assert any("sft.model.dtype: 'int8' must be one of" in m for m in e.value.messages)


def test_print_config_round_trips_and_cli_errors_exit_2(tmp_path):
    result = igpt("sft", "--config", TINY_CONFIG, "--data", "d.jsonl", "--lr", "0.25", "--print-config")
    assert result.exit_code == 0
    saved = tmp_path / "resolved.yaml"
    saved.write_text(result.stdout)
    cfg = presets.resolve("sft", saved, {})
    assert cfg.optim.lr == 0.25 and cfg.data == "d.jsonl" and cfg.model.name == "tiny"
    missing = igpt("sft", "--config", tmp_path / "nope.yaml")
    assert missing.exit_code == 2 and "config file not found" in missing.stderr
    assert igpt("sft", "--model", "tiny").exit_code == 2  # no --data
    unknown_model = igpt("sft", "--model", str(tmp_path / "nowhere"), "--data", TINY_CONFIG)
    assert unknown_model.exit_code == 2


def test_import_does_not_load_torch_and_help_lists_every_stage():
    code = "import sys, instructgpt_cli.cli; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
    help_text = igpt("--help").stdout
    for command in ("sft", "sample", "train-rm", "ppo", "eval", "compare"):
        assert command in help_text


def test_a_partial_block_keeps_the_stage_defaults(tmp_path):
    # rm's model block defaults to name "" (= the run's SFT model); setting another key must not reset it
    preset = tmp_path / "p.yaml"
    preset.write_text("rm:\n  model: {max_seq_len: 128}\nppo:\n  optim: {lr: 0.5}\n")
    rm = presets.resolve("rm", preset, {})
    assert rm.model.name == "" and rm.model.max_seq_len == 128
    ppo = presets.resolve("ppo", preset, {})
    assert ppo.optim.lr == 0.5 and ppo.optim.scheduler == "constant_with_warmup"
