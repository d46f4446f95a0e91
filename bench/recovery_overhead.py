"""What the failure-and-recovery guards (issue 18) cost a training step, against a tiny PPO iteration.

Per step, `train.Session.record` asks whether a stop signal came (`signals.stop_requested`, and
`distributed.max_over_ranks`, a no-op in one process), each optimizer step checks its loss and gradient norm are
finite (`train.first_non_finite`), and the metrics line gains `train/skipped_steps`. Per checkpoint: the weights
are checked finite (`checkpoint.all_finite`) and every file is hashed into COMPLETED (`storage.seal_dir`). Per
stage: one lock (`locks.Lock`). This script times each on its own (a loop of 20,000 calls), and a tiny
PPO iteration (igpt's tiny model, 8 prompts, 24 new tokens, 1 thread) from an in-process `igpt ppo` run's
metrics, and prints the ratios.

    .venv/bin/python bench/recovery_overhead.py
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def per_call(fn, n: int = 20_000) -> float:
    """Median over 5 rounds of the seconds one call of ``fn`` takes."""
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        rounds.append((time.perf_counter() - t0) / n)
    return statistics.median(rounds)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    import json
    import random

    import torch
    from typer.testing import CliRunner

    from instructgpt_cli import checkpoint, distributed, locks, signals, train
    from instructgpt_cli.cli import app
    from instructgpt_cli.rundir import read_metrics
    from instructgpt_cli.storage import seal_dir

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="igpt-recovery-bench-"))
    tiny = REPO / "configs" / "tiny.yaml"
    rng = random.Random(0)
    demos = work / "demos.jsonl"
    demos.write_text("".join(json.dumps({"prompt": f"What is {a} plus {b}?", "response": f"{a + b}."}) + "\n"
                             for a, b in ((rng.randint(1, 30), rng.randint(1, 30)) for _ in range(32))))
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {i} plus {i + 1}?"}) + "\n" for i in range(64)))
    ranks = work / "ranks.jsonl"
    ranks.write_text("".join(json.dumps({"prompt": f"Say {i}.", "chosen": "yes banana", "rejected": "no"}) + "\n"
                             for i in range(16)))

    def igpt(*args) -> None:
        result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == 0, result.output

    run = work / "run"
    igpt("sft", "--config", tiny, "--data", demos, "--run-dir", run, "--max-steps", "4")
    igpt("train-rm", "--config", tiny, "--rankings", ranks, "--run-dir", run, "--max-steps", "2")
    igpt("ppo", "--config", tiny, "--prompts", prompts, "--run-dir", run, "--max-steps", "12", "--rollout-batch-size",
         "8", "--mini-batch-size", "4", "--max-new-tokens", "24", "--save-every", "100")
    elapsed = [m["elapsed_s"] for m in read_metrics(run / "ppo" / "metrics.jsonl")]
    iteration = statistics.median(b - a for a, b in zip(elapsed[1:], elapsed[2:]))
    minibatches = 2  # 8 episodes / 4 per minibatch, 1 PPO epoch: optimizer steps per iteration

    record: dict = {}
    state = train.TrainState(None, None, None)
    signal_check = per_call(lambda: distributed.max_over_ranks(signals.stop_requested() or 0))
    finite_check = per_call(lambda: train.first_non_finite({"loss": 1.0, "gradient norm": 2.0}))
    metric = per_call(lambda: record.__setitem__("train/skipped_steps", state.skipped))
    from instructgpt_cli.stages import ppo

    t = torch.randn(8, 24)  # non_finite reads scores (8,), values and advantages (8, 24)
    sc = ppo.Scored(t, t, torch.randn(8, 24), torch.randn(8), t, t, torch.randn(8, 24), t, None, None, {})
    rollout_check = per_call(lambda: ppo.non_finite(sc), n=5_000)  # PPO: rewards, values, advantages finite
    per_iteration = signal_check + metric + minibatches * finite_check + rollout_check

    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(run / "ppo" / "final" / "policy")
    params = [p for p in policy.parameters()]
    weights_check = per_call(lambda: checkpoint.all_finite(params), n=200)
    ckpt = sorted((run / "ppo" / "checkpoints").iterdir())[-1]
    seal = per_call(lambda: seal_dir(ckpt), n=20)

    def lock_cycle() -> None:
        lock = locks.Lock(work / ".locks" / "x.lock", "x")
        lock.acquire()
        lock.release()

    lock = per_call(lock_cycle, n=500)
    print(f"host: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, 1 thread")
    print(f"tiny PPO iteration (8 episodes, 24 new tokens, 2 optimizer steps): {iteration * 1e3:.1f} ms")
    print(f"per step: stop-signal check {signal_check * 1e6:.2f} us, finiteness check {finite_check * 1e6:.2f} us "
          f"per optimizer step, skipped-steps metric {metric * 1e6:.2f} us, PPO rollout finiteness "
          f"{rollout_check * 1e6:.2f} us per iteration")
    print(f"per iteration: {per_iteration * 1e6:.2f} us = {100 * per_iteration / iteration:.4f}% of an iteration "
          "(target: under 1%)")
    print(f"per checkpoint (tiny policy+value, {sum(p.numel() for p in params):,} policy parameters): weights finite "
          f"{weights_check * 1e3:.2f} ms, COMPLETED hashes {seal * 1e3:.2f} ms")
    print(f"per stage: lock taken and released {lock * 1e6:.0f} us")


if __name__ == "__main__":
    main()
