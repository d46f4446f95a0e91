"""Config resolution: defaults < YAML < flags; unknown keys and wrong types fail; presets validate."""
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, TINY_CONFIG, igpt
from instructgpt_cli import presets
from instructgpt_cli import config as config_mod
from instructgpt_cli.errors import BadInput

PRESETS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=[p.name for p in PRESETS])
def test_every_preset_resolves_for_every_stage_it_configures(preset):
    raw = yaml.safe_load(preset.read_text())
    assert raw and set(raw) <= set(presets.SECTIONS)
    for stage in raw:
        if stage in config_mod.STAGE_CONFIGS:
            cfg = config_mod.resolve(stage, preset, {})
            assert config_mod.to_dict(cfg)  # built and range-checked


def test_every_field_has_a_doc():
    for stage, cls in config_mod.STAGE_CONFIGS.items():
        docs = config_mod.field_docs(cls)
        assert docs and all(len(d) > 10 for d in docs.values()), [k for k, d in docs.items() if len(d) <= 10]


def test_flags_override_file_override_defaults(tmp_path):
    cfg = config_mod.resolve("sft", TINY_CONFIG, {"optim.lr": 0.5, "epochs": None})
    assert cfg.optim.lr == 0.5  # flag
    assert cfg.epochs == 2 and cfg.model.name == "tiny"  # file (flag not given)
    assert cfg.optim.beta2 == 0.95  # default


def test_unknown_keys_wrong_types_and_ranges_are_all_reported(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sft:\n  optim: {lrr: 1, batch_size: 0}\n  epochs: many\n  model: {dtype: int8}\n")
    with pytest.raises(BadInput) as e:
        config_mod.resolve("sft", bad, {})
    text = "\n".join(e.value.messages)
    assert f"{bad}: sft.optim.lrr: unknown key" in text
    assert f"{bad}: sft.epochs: expected int, got str 'many'" in text
    bad.write_text("sft:\n  optim: {batch_size: 0}\n  model: {dtype: int8}\nppx: {}\n")
    with pytest.raises(BadInput) as e:
        config_mod.resolve("sft", bad, {})
    assert "ppx: unknown section" in e.value.messages[0]
    bad.write_text("sft:\n  optim: {batch_size: 0}\n  model: {dtype: int8}\n")
    with pytest.raises(BadInput) as e:
        config_mod.resolve("sft", bad, {})
    assert any("sft.optim.batch_size: 0 must be >= 1" in m for m in e.value.messages)
    assert any("sft.model.dtype: 'int8' must be one of" in m for m in e.value.messages)


def test_print_config_round_trips_and_cli_errors_exit_2(tmp_path):
    result = igpt("sft", "--config", TINY_CONFIG, "--data", "d.jsonl", "--lr", "0.25", "--print-config")
    assert result.exit_code == 0
    saved = tmp_path / "resolved.yaml"
    saved.write_text(result.stdout)
    cfg = config_mod.resolve("sft", saved, {})
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
    rm = config_mod.resolve("rm", preset, {})
    assert rm.model.name == "" and rm.model.max_seq_len == 128
    ppo = config_mod.resolve("ppo", preset, {})
    assert ppo.optim.lr == 0.5 and ppo.optim.scheduler == "constant_with_warmup"
