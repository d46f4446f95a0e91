"""Issue 20: what users of HF Trainer, TRL and litgpt expect — progress lines in a batch log, --version,
YAML 1.2 numbers, config files checked whole, errors that name where a value came from, portable outputs."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, igpt


TIME = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "  # the wall-clock time a log line starts with


def progress_lines(stderr: str, stage: str) -> list[str]:
    """The progress lines of ``stage``, each without its leading wall-clock time."""
    return [line[20:] for line in stderr.splitlines() if re.match(rf"{TIME}{stage} step \d+/\d+ ", line)]


def test_batch_log_gets_a_line_every_log_every_steps(tmp_path: Path, demos_file: Path):
    """stderr is not a terminal (CliRunner): plain lines at the first step, every 3rd and the last, with
    step/total, the headline metrics, throughput and ETA; no rich bar control codes."""
    result = igpt("sft", "--model", "tiny", "--data", demos_file, "--run-dir", tmp_path / "run", "--max-steps", "10",
                  "--batch-size", "4", "--eval-every", "5", "--log-every", "3")
    assert result.exit_code == 0, result.output
    lines = progress_lines(result.stderr, "sft")
    assert [int(re.match(r"sft step (\d+)/10", x).group(1)) for x in lines] == [1, 3, 6, 9, 10], result.stderr
    metrics = [json.loads(x) for x in (tmp_path / "run" / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert f"loss {metrics[2]['train/loss']:.4g}" in lines[1]  # step 3's loss, as logged
    assert "eval/loss" not in lines[0] and f"eval/loss {metrics[4]['eval/loss']:.4g}" in lines[2]  # kept from step 5
    assert all("steps/s" in x and "tokens/s" in x and "ETA " in x for x in lines)
    assert lines[-1].endswith("ETA 0:00")
    assert "\x1b[" not in result.stderr  # no terminal control codes in a log


def test_batch_log_default_is_time_based(tmp_path: Path, demos_file: Path, monkeypatch):
    """--log-every 0 (default): a line when LOG_SECONDS have passed since the last one (here always)."""
    from instructgpt_cli import console

    monkeypatch.setattr(console, "LOG_SECONDS", 0.0)
    result = igpt("sft", "--model", "tiny", "--data", demos_file, "--run-dir", tmp_path / "run", "--max-steps", "4",
                  "--batch-size", "4")
    assert result.exit_code == 0, result.output
    assert len(progress_lines(result.stderr, "sft")) == 4
    monkeypatch.setattr(console, "LOG_SECONDS", 1e9)
    result = igpt("sft", "--model", "tiny", "--data", demos_file, "--run-dir", tmp_path / "run", "--max-steps", "7",
                  "--batch-size", "4", "--resume")
    assert result.exit_code == 0, result.output
    lines = progress_lines(result.stderr, "sft")
    assert [x.split()[2] for x in lines] == ["5/7", "7/7"]  # the first step of this process and the last


def test_sampling_shows_a_line_a_batch_in_a_log(tmp_path: Path, monkeypatch):
    """igpt sample (and eval and compare, through rollout.generate) can sample for minutes: a line a batch of
    prompts, with the responses so far, the last one counting them all."""
    from conftest import write_jsonl
    from instructgpt_cli import console

    monkeypatch.setattr(console, "LOG_SECONDS", 0.0)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"what is {i} plus {i}?"} for i in range(5)])
    result = igpt("sample", "--model", "tiny", "--prompts", prompts, "--k", "3", "--batch-size", "4",
                  "--max-new-tokens", "4", "--out", tmp_path / "s.jsonl")
    assert result.exit_code == 0, result.output
    lines = progress_lines(result.stderr, "sample")
    assert [x.split()[2] for x in lines] == [f"{i}/4" for i in range(1, 5)], result.stderr  # 15 responses, 4 a batch
    assert [int(re.search(r"responses (\d+)", x).group(1)) for x in lines] == [4, 8, 12, 15]
    assert len((tmp_path / "s.jsonl").read_text().splitlines()) == 5


def test_a_real_log_file(tmp_path: Path, demos_file: Path):
    """The command as a batch script runs it: stderr redirected to a file."""
    log = tmp_path / "log.txt"
    with log.open("w") as err:
        subprocess.run([sys.executable, "-m", "instructgpt_cli", "sft", "--model", "tiny", "--data", str(demos_file),
                        "--run-dir", str(tmp_path / "run"), "--max-steps", "4", "--batch-size", "4", "--log-every", "2"],
                       stderr=err, stdout=subprocess.DEVNULL, check=True, cwd=REPO)
    assert [x.split()[2] for x in progress_lines(log.read_text(), "sft")] == ["1/4", "2/4", "4/4"]


def test_a_batch_log_says_when_where_what_and_how_to_go_on(tmp_path: Path, demos_file: Path):
    """Issue 31 item 8: a log read the next morning. Each progress line starts with the wall-clock time and
    shows peak memory; the banner names host, pid, version, command line and run directory; each checkpoint
    saved is a line with its size; the resume command after a stop is one line however long; no line ends in
    spaces."""
    import os
    import socket

    from instructgpt_cli import __version__

    log, run_dir = tmp_path / "log.txt", tmp_path / ("a-long-run-directory-name-" + "y" * 80)
    env = {**os.environ, "IGPT_FAULT_AFTER_STEP": "3:SIGTERM", "COLUMNS": "80"}
    with log.open("w") as err:
        stopped = subprocess.run([sys.executable, "-m", "instructgpt_cli", "sft", "--model", "tiny", "--data",
                                  str(demos_file), "--run-dir", str(run_dir), "--max-steps", "6", "--batch-size", "4",
                                  "--log-every", "1", "--save-every", "2"],
                                 stderr=err, stdout=subprocess.DEVNULL, cwd=REPO, env=env, timeout=300)
    text = log.read_text()
    assert stopped.returncode == 143, text
    lines = text.splitlines()
    assert [line for line in lines if line != line.rstrip()] == []
    progress = [line for line in lines if re.match(rf"{TIME}sft step \d+/6 ", line)]
    assert len(progress) == 3 and all(re.search(r"\|  peak RSS \d+\.\d\d GiB  \|", line) for line in progress)
    rows = [re.match(r"(host|pid|igpt|command|run dir)  +(.*)$", line) for line in lines]
    banner = {row.group(1): row.group(2) for row in rows if row}
    assert banner["host"] == socket.gethostname() and banner["igpt"] == __version__
    assert banner["pid"].isdigit() and banner["run dir"] == str(run_dir.resolve())
    assert banner["command"].startswith("igpt sft --model tiny --data ") and str(run_dir) in banner["command"]
    saved = [line for line in lines if re.match(rf"{TIME}sft: checkpoint step-00000[23] saved \([\d.,]+ MiB\)$", line)]
    assert len(saved) == 2, text  # every 2 steps, and at the stop after step 3
    resume = [line for line in lines if "Resume with: " in line]
    assert len(resume) == 1 and resume[0].endswith(f"--run-dir {run_dir} --max-steps 6 --batch-size 4 "
                                                   "--log-every 1 --save-every 2 --resume"), text


def test_version_matches_the_package():
    import tomllib

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    result = igpt("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"igpt {version}"


def test_help_shows_defaults_and_lora_flags():
    result = igpt("sft", "--help")
    text = " ".join(result.stdout.replace("│", " ").split())
    assert "[default: runs/default]" in text and "[default: 16]" in text  # run dir; epochs and lora r
    assert all(flag in text for flag in ("--lora-r", "--lora-alpha", "--lora-layers", "--log-every"))


@pytest.mark.parametrize("text, value", [("1e-4", 1e-4), ("3E5", 3e5), ("-2.5e-3", -2.5e-3), (".5", 0.5),
                                         ("1.0e-4", 1e-4), ("2", 2), ("010", 10), ("0x1f", 31), ("0o17", 15),
                                         (".inf", float("inf")), ("1_000", "1_000"), ("1:30", "1:30")])
def test_yaml_numbers_follow_yaml_1_2(text: str, value):
    from instructgpt_cli.presets import read_yaml

    got = read_yaml(f"x: {text}")["x"]
    assert got == value and type(got) is type(value)


def test_config_file_with_lr_1e_4(tmp_path: Path):
    preset = tmp_path / "hf.yaml"
    preset.write_text("sft:\n  optim:\n    lr: 1e-4\n    weight_decay: 1e-2\n")
    result = igpt("sft", "--config", preset, "--data", "d.jsonl", "--print-config")
    assert result.exit_code == 0, result.output
    assert "lr: 0.0001" in result.stdout and "weight_decay: 0.01" in result.stdout


def test_every_section_is_checked_when_the_file_is_loaded(tmp_path: Path):
    """A typo in ppo's section stops `igpt sft --config` at once, with every problem of every section."""
    preset = tmp_path / "p.yaml"
    preset.write_text("sft:\n  epochs: 2\nppo:\n  cliprnage: 0.2\n  optim: {lr: -1}\nrm:\n  epochs: many\n")
    result = igpt("sft", "--config", preset, "--data", "d.jsonl", "--print-config")
    assert result.exit_code == 2
    assert f"{preset}: ppo.cliprnage: unknown key" in result.stderr
    assert f"{preset}: rm.epochs: expected int, got str 'many'" in result.stderr
    preset.write_text("sft:\n  epochs: 2\nppo:\n  optim: {lr: -1}\n")  # ranges, once keys and types are right
    result = igpt("sft", "--config", preset, "--data", "d.jsonl", "--print-config", "--epochs", "3")
    assert result.exit_code == 2 and f"{preset}: ppo.optim.lr: -1.0 must be > 0" in result.stderr


def test_an_error_names_where_the_value_came_from(tmp_path: Path):
    preset = tmp_path / "gold.yaml"
    preset.write_text("sample:\n  k: 4\n  max_new_tokens: 0\n")
    result = igpt("sample", "--k", "1", "--config", preset, "--prompts", "p.jsonl", "--out", "o.jsonl",
                  "--print-config")
    assert result.exit_code == 2
    errors = result.stderr.splitlines()
    assert "error: --k (sample.k): 1 must be >= 2 (rankings need two responses at least)" in errors
    assert f"error: {preset}: sample.max_new_tokens: 0 must be >= 1" in errors
    assert not any(f"{preset}: sample.k" in e for e in errors)


def modes(root: Path) -> set[str]:
    return {oct(p.stat().st_mode & 0o777) for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("mask, mode", [(0o022, "0o644"), (0o027, "0o640")])
def test_written_files_honour_the_umask(tmp_path: Path, demos_file: Path, mask: int, mode: str):
    """safetensors writes 0600: a shared cluster's group could not read the models."""
    import os

    old = os.umask(mask)
    try:
        result = igpt("sft", "--model", "tiny", "--data", demos_file, "--run-dir", tmp_path / "run", "--max-steps", "2",
                      "--batch-size", "4", "--lora")
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    assert modes(tmp_path / "run") == {mode}


def test_adapter_loads_from_another_directory(tmp_path: Path, demos_file: Path, monkeypatch):
    """A LoRA adapter names its base model by absolute path: AutoPeftModelForCausalLM loads it from any
    working directory, and it equals the merged model igpt saved beside it."""
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(tmp_path)
    base = igpt("sft", "--model", "tiny", "--data", demos_file, "--run-dir", "base", "--max-steps", "1",
                "--batch-size", "4")
    assert base.exit_code == 0, base.output
    lora = igpt("sft", "--model", "base/sft/final", "--data", demos_file, "--run-dir", "run", "--max-steps", "3",
                "--batch-size", "4", "--lora", "--lr", "1e-2")
    assert lora.exit_code == 0, lora.output
    adapter = tmp_path / "run" / "sft" / "final" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "base" / "sft" / "final")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    peft_model = AutoPeftModelForCausalLM.from_pretrained(adapter).eval()
    merged = AutoModelForCausalLM.from_pretrained(adapter.parent).eval()
    ids = torch.tensor([[1, 5, 9, 3]])
    torch.testing.assert_close(peft_model(ids).logits, merged(ids).logits, rtol=1e-4, atol=1e-4)


def test_run_directory_moves_and_reads_from_elsewhere(tmp_path: Path, demos_file: Path, monkeypatch):
    """The manifest stores paths inside the run directory relative to it and others absolute; config.yaml
    holds absolute paths. A moved run directory keeps its lineage; its config.yaml works from anywhere."""
    from conftest import marker_rankings, write_jsonl

    monkeypatch.chdir(tmp_path)
    assert igpt("sft", "--model", "tiny", "--data", demos_file, "--run-dir", "runs/a", "--max-steps", "2",
                "--batch-size", "4").exit_code == 0
    ranks = write_jsonl(tmp_path / "ranks.jsonl", marker_rankings(8))
    result = igpt("train-rm", "--rankings", ranks, "--run-dir", "runs/a", "--max-steps", "1", "--batch-size", "4")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "runs/a/manifest.json").read_text())["stages"]
    assert manifest["sft"]["outputs"]["final"] == "sft/final" and manifest["rm"]["outputs"]["final"] == "rm/final"
    assert manifest["rm"]["inputs"]["init"]["path"] == "sft/final"
    assert manifest["rm"]["inputs"]["rankings"]["path"] == str(ranks)
    (tmp_path / "runs/a").rename(tmp_path / "moved")
    saved = tmp_path / "moved" / "sft" / "config.yaml"
    assert f"data: {demos_file}" in saved.read_text() and f"run_dir: {tmp_path / 'runs' / 'a'}" in saved.read_text()
    monkeypatch.chdir(tmp_path / "moved")  # a moved run: lineage still finds rm's input, sft's output
    result = igpt("sft", "--model", "tiny", "--data", demos_file, "--run-dir", ".", "--max-steps", "2",
                  "--batch-size", "4", "--lr", "1e-2", "--overwrite")
    assert result.exit_code == 0, result.output
    assert "stale" in json.loads((tmp_path / "moved/manifest.json").read_text())["stages"]["rm"]
    printed = igpt("sft", "--config", saved, "--print-config")  # from another directory: the same data file
    assert printed.exit_code == 0 and f"data: {demos_file}" in printed.stdout


@pytest.mark.parametrize("name", ["../elsewhere", "/tmp/x", ".hidden", "a/b"])
def test_eval_name_is_one_folder_under_eval(tmp_path: Path, name: str):
    """--name ../x or an absolute path would write outside RUN_DIR/eval (an absolute one crashed with a
    traceback); refused with exit 2 before a model loads, nothing written."""
    from conftest import write_jsonl

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi?"}])
    result = igpt("eval", "tiny", "--prompts", prompts, "--sft", "tiny", "--run-dir", tmp_path / "run", "--name", name)
    assert result.exit_code == 2 and "a report name is one folder name" in result.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "elsewhere").exists()
