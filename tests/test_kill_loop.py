"""The kill loop (README, "Failure and recovery"): sft, train-rm and ppo each killed with SIGKILL at random
points, inside checkpoint writes too, then resumed to the end: final weights bit-identical to a run that was
never interrupted. Seeded, so a failure reproduces."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, THREADS, TINY_CONFIG, arithmetic_demos, igpt, marker_rankings, write_jsonl
from instructgpt_cli.models import tiny_tokenizer
from instructgpt_cli.faults import FAULT_ENV
from rule_rm import make_rule_rm
from test_recovery import assert_same_weights

STEPS = 6


def metric_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except OSError:
        return 0


def kill_at_random(args: list, metrics: Path, after_lines: int, extra_s: float) -> int:
    """Start ``igpt args``; once ``metrics`` has ``after_lines`` lines, wait ``extra_s`` and SIGKILL it
    (wherever it is: a step, a checkpoint write, the export of final/). Returns the exit status."""
    env = dict(os.environ)
    proc = subprocess.Popen([sys.executable, "-m", "instructgpt_cli", *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while proc.poll() is None and metric_lines(metrics) < after_lines and time.time() < deadline:
        time.sleep(0.005)
    time.sleep(extra_s)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    return proc.wait(timeout=120)


def kill_loop(args: list, run_dir: Path, stage: str, seed: int) -> None:
    """Kill ``igpt args --resume`` at random points (and once inside a checkpoint's publish), then let it end."""
    rng = random.Random(seed)
    metrics = run_dir / stage / "metrics.jsonl"
    resume = [*args, "--resume"]  # on an empty stage directory: a fresh start
    statuses = []
    for _ in range(3):
        lines = min(metric_lines(metrics) + 1, STEPS - 1)
        statuses.append(kill_at_random(resume, metrics, rng.randint(lines, STEPS - 1), rng.uniform(0, 0.05)))
    print("kill loop", stage, statuses, metric_lines(metrics))
    assert statuses.count(-signal.SIGKILL) >= 2, statuses  # the kills landed mid-run, not after it ended
    step = rng.randint(min(metric_lines(metrics) + 1, STEPS), STEPS)
    env = {**os.environ, FAULT_ENV: f"{step}:publish"}
    died = subprocess.run([sys.executable, "-m", "instructgpt_cli", *map(str, resume)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert died.returncode in (0, 99), died.stderr  # 0: it had already passed that step
    done = igpt(*resume)
    assert done.exit_code == 0, done.output


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    t = tmp_path_factory.mktemp("kill")
    write_jsonl(t / "demos.jsonl", arithmetic_demos(24))
    write_jsonl(t / "ranks.jsonl", marker_rankings(24))
    write_jsonl(t / "prompts.jsonl", [{"prompt": f"What is {i} plus {i + 2}?"} for i in range(24)])
    make_rule_rm(t / "rule_rm", tiny_tokenizer(), "e")
    assert igpt(*sft(t, t / "base")).exit_code == 0  # ppo's policy and reference
    return t


def sft(t: Path, run_dir: Path) -> list:
    return ["sft", "--config", TINY_CONFIG, "--data", t / "demos.jsonl", "--run-dir", run_dir, "--max-steps", STEPS,
            "--save-every", "1", "--val-fraction", "0", "--dropout", "0.1"]


def test_every_side_computes_at_one_thread_count():
    """The uninterrupted run and the last resume run in this process, the killed runs in subprocesses: a step
    on 2 threads is not bit-identical to one on 1, so all of them must run at the same count."""
    import torch

    child = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=dict(os.environ),
                           capture_output=True, text=True, timeout=120)
    assert torch.get_num_threads() == int(child.stdout) == THREADS


def test_sft_killed_again_and_again_ends_bit_identical(inputs, tmp_path):
    assert igpt(*sft(inputs, tmp_path / "straight")).exit_code == 0
    kill_loop(sft(inputs, tmp_path / "killed"), tmp_path / "killed", "sft", seed=1)
    assert_same_weights(tmp_path / "straight" / "sft" / "final", tmp_path / "killed" / "sft" / "final")


def test_train_rm_killed_again_and_again_ends_bit_identical(inputs, tmp_path):
    def rm(run_dir):
        return ["train-rm", "--config", TINY_CONFIG, "--model", "tiny", "--rankings", inputs / "ranks.jsonl", "--demos",
                inputs / "demos.jsonl", "--run-dir", run_dir, "--max-steps", STEPS, "--save-every", "1",
                "--batch-size", "4"]

    assert igpt(*rm(tmp_path / "straight")).exit_code == 0
    kill_loop(rm(tmp_path / "killed"), tmp_path / "killed", "rm", seed=2)
    assert_same_weights(tmp_path / "straight" / "rm" / "final", tmp_path / "killed" / "rm" / "final")


def test_ppo_killed_again_and_again_ends_bit_identical(inputs, tmp_path):
    def ppo(run_dir):
        return ["ppo", "--prompts", inputs / "prompts.jsonl", "--sft", inputs / "base" / "sft" / "final", "--rm",
                inputs / "rule_rm", "--run-dir", run_dir, "--max-new-tokens", "8", "--rollout-batch-size", "4",
                "--mini-batch-size", "2", "--lr", "3e-3", "--max-steps", STEPS, "--save-every", "1"]

    assert igpt(*ppo(tmp_path / "straight")).exit_code == 0
    kill_loop(ppo(tmp_path / "killed"), tmp_path / "killed", "ppo", seed=3)
    assert_same_weights(tmp_path / "straight" / "ppo" / "final", tmp_path / "killed" / "ppo" / "final")
