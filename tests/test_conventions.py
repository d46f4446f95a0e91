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


def progress_lines(stderr: str, stage: str) -> list[str]:
    return [line for line in stderr.splitlines() if re.match(rf"{stage} step \d+/\d+ ", line)]


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


def test_a_real_log_file(tmp_path: Path, demos_file: Path):
    """The command as a batch script runs it: stderr redirected to a file."""
    log = tmp_path / "log.txt"
    with log.open("w") as err:
        subprocess.run([sys.executable, "-m", "instructgpt_cli", "sft", "--model", "tiny", "--data", str(demos_file),
                        "--run-dir", str(tmp_path / "run"), "--max-steps", "4", "--batch-size", "4", "--log-every", "2"],
                       stderr=err, stdout=subprocess.DEVNULL, check=True, cwd=REPO)
    assert [x.split()[2] for x in progress_lines(log.read_text(), "sft")] == ["1/4", "2/4", "4/4"]
