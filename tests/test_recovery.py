"""Failure and recovery (README): locks, stop signals, non-finite steps, failed writes, resume checks,
lineage and preflight. Runs that must be killed or signalled run as subprocesses; the rest in-process."""
from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, TINY_CONFIG, arithmetic_demos, igpt, write_jsonl
from instructgpt_cli import rundir
from instructgpt_cli import checkpoint, faults, locks, signals, train
from instructgpt_cli.errors import NonFinite
from instructgpt_cli.errors import BadInput, Interrupted
from instructgpt_cli.rundir import read_metrics


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())["stages"]


def sft_args(data: Path, run_dir: Path, *extra) -> list:
    return ["sft", "--config", TINY_CONFIG, "--data", data, "--run-dir", run_dir, "--max-steps", "6",
            "--save-every", "2", "--val-fraction", "0", *extra]


def start(args: list, env_extra: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "instructgpt_cli", *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(args: list, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    proc = start(args, env_extra)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def final_weights(model_dir: Path) -> dict:
    return {k: v for f in sorted(model_dir.rglob("*.safetensors")) for k, v in load_file(f).items()}


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture
def demos(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "demos.jsonl", arithmetic_demos(24))


# ---------------------------------------------------------------- 1. one writer per stage directory


def test_lock_refuses_a_second_holder_names_it_and_is_gone_after_release(tmp_path):
    first = locks.Lock(tmp_path / "run" / ".locks" / "sft.lock", "run/sft")
    first.acquire()
    with pytest.raises(BadInput) as refused:
        locks.Lock(tmp_path / "run" / ".locks" / "sft.lock", "run/sft").acquire()
    assert f"in use by pid {os.getpid()} on " in refused.value.messages[0]
    assert locks.is_locked(tmp_path / "run", "sft")
    first.release()
    assert not locks.is_locked(tmp_path / "run", "sft")
    assert not (tmp_path / "run").exists()  # the run directory the lock made for nothing is gone too
    again = locks.Lock(tmp_path / "run" / ".locks" / "sft.lock", "run/sft")
    again.acquire()
    again.release()


def test_a_held_stage_lock_refuses_overwrite_and_leaves_the_run_intact(tmp_path, demos):
    run_dir = tmp_path / "run"
    assert igpt(*sft_args(demos, run_dir)).exit_code == 0
    before = {p: p.read_bytes() for p in (run_dir / "sft").rglob("*") if p.is_file()}
    holder = locks.Lock(locks.lock_path(run_dir, "sft"), "sft")
    holder.acquire()
    try:
        refused = igpt(*sft_args(demos, run_dir, "--overwrite"))
    finally:
        holder.release()
    assert refused.exit_code == 2 and f"in use by pid {os.getpid()}" in refused.stderr, refused.output
    assert {p: p.read_bytes() for p in (run_dir / "sft").rglob("*") if p.is_file()} == before


def test_two_concurrent_runs_the_second_is_refused_the_first_finishes_intact(tmp_path, demos):
    run_dir = tmp_path / "race"
    # the first run stops itself for a moment after step 2 (SIGSTOP would need a second process), so the
    # second surely starts while the first holds its lock
    first = start(sft_args(demos, run_dir, "--max-steps", "40", "--save-every", "10"))
    deadline = time.time() + 120
    while not (run_dir / "sft" / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.05)
    first.send_signal(signal.SIGSTOP)
    try:
        second = run(sft_args(demos, run_dir, "--max-steps", "40", "--overwrite"))
    finally:
        first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=300)
    assert second.returncode == 2 and f"in use by pid {first.pid} on " in second.stderr, second.stderr
    assert "Traceback" not in second.stderr
    assert first.returncode == 0, err
    steps = [m["step"] for m in read_metrics(run_dir / "sft" / "metrics.jsonl")]
    assert steps == list(range(1, 41))  # no second writer's lines in between
    assert manifest(run_dir)["sft"]["status"] == "completed" and (run_dir / "sft" / "final").is_dir()


# ---------------------------------------------------------------- 2. stop signals


@pytest.mark.parametrize("sig,code", [("SIGTERM", 143), ("SIGUSR1", 138), ("SIGINT", 130)])
def test_stop_signal_checkpoints_the_step_and_resume_is_bit_identical(tmp_path, demos, sig, code):
    straight = tmp_path / "straight"
    assert igpt(*sft_args(demos, straight)).exit_code == 0
    stopped = run(sft_args(demos, tmp_path / "stopped"), {faults.FAULT_ENV: f"3:{sig}"})
    assert stopped.returncode == code, stopped.stderr
    assert f"stopped by {sig} after step 3 of 6; checkpoint step-000003 is complete" in stopped.stderr
    assert "--resume" in stopped.stderr and "Traceback" not in stopped.stderr
    sft = tmp_path / "stopped" / "sft"
    assert sorted(p.name for p in (sft / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
    assert not (sft / "final").exists()
    entry = manifest(tmp_path / "stopped")["sft"]
    assert entry["status"] == "interrupted" and entry["stopped_at_step"] == 3 and entry["signal"] == sig
    resumed = igpt(*sft_args(demos, tmp_path / "stopped", "--resume"))
    assert resumed.exit_code == 0 and "from step-000003" in resumed.stderr, resumed.output
    assert_same_weights(straight / "sft" / "final", sft / "final")


def test_ppo_stop_signal_ends_the_iteration_and_resumes_bit_identical(tmp_path, demos):
    from rule_rm import make_rule_rm
    from instructgpt_cli.models import tiny_tokenizer

    assert igpt(*sft_args(demos, tmp_path / "base")).exit_code == 0
    make_rule_rm(tmp_path / "rule_rm", tiny_tokenizer(), "e")
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"What is {i} plus {i + 1}?"} for i in range(16)])

    def ppo(run_dir):
        return ["ppo", "--prompts", tmp_path / "prompts.jsonl", "--sft", tmp_path / "base" / "sft" / "final",
                "--rm", tmp_path / "rule_rm", "--run-dir", run_dir, "--max-new-tokens", "8", "--rollout-batch-size",
                "4", "--mini-batch-size", "2", "--lr", "3e-3", "--max-steps", "4", "--save-every", "10"]

    assert igpt(*ppo(tmp_path / "straight")).exit_code == 0
    stopped = run(ppo(tmp_path / "stopped"), {faults.FAULT_ENV: "2:SIGTERM"})
    assert stopped.returncode == 143 and "stopped by SIGTERM after step 2 of 4" in stopped.stderr, stopped.stderr
    assert igpt(*ppo(tmp_path / "stopped"), "--resume").exit_code == 0
    assert_same_weights(tmp_path / "straight" / "ppo" / "final", tmp_path / "stopped" / "ppo" / "final")


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_while_loading_ends_the_command_with_nothing_written(tmp_path, demos, sig, code):
    proc = start(sft_args(demos, tmp_path / "run"))
    time.sleep(0.7)  # importing torch and transformers (a lazy import there once swallowed the signal)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err and "interrupted" in err
    # the stage never ran: no run directory, or (on a fast machine, loading already done) no step
    assert not (tmp_path / "run" / "sft" / "metrics.jsonl").exists()


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGUSR1, 138)])
def test_a_stop_signal_during_an_import_exits_at_once_and_raises_elsewhere(tmp_path, sig, code):
    """Outside an import a stop signal raises Interrupted; inside one (a module that signals its own process while
    it is imported) the handler exits 128 + N itself: raised there, the exception can land in a pybind11 callback
    (torch's import; the process aborts) or in importlib's callbacks (printed and swallowed)."""
    (tmp_path / "slow_module.py").write_text(f"import os, time\nos.kill(os.getpid(), {int(sig)})\ntime.sleep(5)\n")
    script = ("import os, sys, time\nfrom instructgpt_cli import signals\nfrom instructgpt_cli.errors import "
              "Interrupted\nsignals.install_signal_handlers()\ntry:\n    os.kill(os.getpid(), {sig})\n"
              "    time.sleep(0.5)\nexcept Interrupted as e:\n    print('raised', e.code, flush=True)\n"
              "signals._Stop.signum = None\nsys.path.insert(0, {path!r})\nimport slow_module\nprint('not reached')\n")
    proc = subprocess.run([sys.executable, "-c", script.format(sig=int(sig), path=str(tmp_path))],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == code, proc.stderr
    assert proc.stdout.split() == ["raised", str(code)]
    assert proc.stderr == f"igpt: interrupted ({sig.name}) while loading libraries; stopped at once\n"


def test_second_sigint_aborts_at_once_while_the_first_waits_for_the_step():
    signals.install_signal_handlers()
    try:
        signals.defer()
        signals._on_signal(signal.SIGINT, None)  # the first: noted, the loop finishes its step
        assert signals.stop_requested() == signal.SIGINT
        with pytest.raises(Interrupted) as aborted:
            signals._on_signal(signal.SIGINT, None)
        assert aborted.value.code == 130
    finally:
        for s in signals.STOP_SIGNALS:
            signal.signal(s, signal.default_int_handler if s == signal.SIGINT else signal.SIG_DFL)
        signals.undefer()
        signals._Stop.signum = None


# ---------------------------------------------------------------- 3. non-finite values


def nan_at(monkeypatch, steps: set[int]):
    """Make the SFT loss NaN in the given (0-based) optimizer steps: every micro-batch's sum."""
    from instructgpt_cli.stages import sft

    real, seen = sft.train_step, {"step": 0}

    def step(runner, state, *args, **kwargs):
        i = seen["step"]
        seen["step"] += 1
        if i in steps:
            original = runner.response_loss_sum
            monkeypatch.setattr(runner, "response_loss_sum", lambda b: tuple(x * math.nan if j == 0 else x
                                                                            for j, x in enumerate(original(b))))
            try:
                return real(runner, state, *args, **kwargs)
            finally:
                monkeypatch.setattr(runner, "response_loss_sum", original)
        return real(runner, state, *args, **kwargs)

    monkeypatch.setattr(sft, "train_step", step)


def test_a_nan_step_is_skipped_not_applied_and_counted(tmp_path, demos, monkeypatch):
    nan_at(monkeypatch, {2})
    run_dir = tmp_path / "run"
    result = igpt(*sft_args(demos, run_dir, "--max-steps", "5"))
    assert result.exit_code == 0, result.output
    metrics = read_metrics(run_dir / "sft" / "metrics.jsonl")
    assert [m["train/skipped_steps"] for m in metrics] == [0, 0, 1, 1, 1]
    assert math.isnan(metrics[2]["train/loss"])
    # the skipped step moved neither the weights' schedule nor the weights: the lr stayed where it was
    assert metrics[2]["train/lr"] == metrics[1]["train/lr"] != metrics[3]["train/lr"]
    assert all(torch.isfinite(t).all() for t in final_weights(run_dir / "sft" / "final").values())


def test_the_skipped_step_count_travels_in_the_checkpoint_not_in_the_metrics(tmp_path, demos, monkeypatch):
    """A resume takes train/skipped_steps from the checkpoint's state (checkpoint.py), not from metrics.jsonl, a
    file written for people: here the lines before the checkpoint are rewritten to say 0, and the resumed steps
    still count the one skipped step; those in a row start afresh."""
    nan_at(monkeypatch, {2})
    run_dir = tmp_path / "run"
    assert igpt(*sft_args(demos, run_dir, "--max-steps", "4")).exit_code == 0
    state = torch.load(run_dir / "sft" / "checkpoints" / "step-000004" / "state.pt", weights_only=True)
    assert state["skipped"] == 1 and state["step"] == 4
    path = run_dir / "sft" / "metrics.jsonl"
    path.write_text("".join(json.dumps({**m, "train/skipped_steps": 0}) + "\n" for m in read_metrics(path)))
    resumed = igpt(*sft_args(demos, run_dir, "--resume", "--max-steps", "6"))
    assert resumed.exit_code == 0, resumed.output
    assert [m["train/skipped_steps"] for m in read_metrics(path)] == [0, 0, 0, 0, 1, 1]


def test_three_nan_steps_in_a_row_stop_with_exit_3_and_the_last_checkpoint_intact(tmp_path, demos, monkeypatch):
    nan_at(monkeypatch, {2, 3, 4})
    run_dir = tmp_path / "run"
    result = igpt(*sft_args(demos, run_dir, "--max-steps", "8"))
    assert result.exit_code == 3, result.output
    assert "step 5: the loss was nan in 3 optimizer steps in a row" in result.stderr
    assert "(step-000004) is intact" in result.stderr and "Traceback" not in result.stderr
    # the manifest keeps why and how it ended, for igpt status
    entry = json.loads((run_dir / "manifest.json").read_text())["stages"]["sft"]
    assert entry["status"] == "failed" and entry["exit_code"] == 3 and "3 optimizer steps in a row" in entry["error"]
    shown = json.loads(igpt("status", run_dir, "--json").stdout)["stages"]["sft"]
    assert shown["exit_code"] == 3 and shown["state"] == "failed" and "nan" in shown["error"]
    ckpts = sorted(p.name for p in (run_dir / "sft" / "checkpoints").iterdir())
    assert ckpts == ["step-000002", "step-000004"]  # step 4's weights are step 2's: nothing was applied since
    a, b = (load_file(run_dir / "sft" / "checkpoints" / c / "trainable.safetensors") for c in ckpts)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert manifest(run_dir)["sft"]["status"] == "failed"


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = math.inf
    stage = rundir.Stage(tmp_path, "sft")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = train.TrainState(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), step=3)
    with pytest.raises(NonFinite, match="no longer finite"):
        checkpoint.save(stage, state, 2)
    assert not stage.checkpoints.exists()


def test_ppo_refuses_a_non_finite_reward(tmp_path, demos, monkeypatch):
    from rule_rm import make_rule_rm
    from instructgpt_cli.models import tiny_tokenizer

    from instructgpt_cli.stages import ppo

    assert igpt(*sft_args(demos, tmp_path / "base")).exit_code == 0
    make_rule_rm(tmp_path / "rule_rm", tiny_tokenizer(), "e")
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"What is {i} plus {i + 1}?"} for i in range(8)])
    real = ppo.score_rollout

    def nan_scores(*args, **kwargs):
        sc = real(*args, **kwargs)
        sc.scores[0] = math.nan
        return sc

    monkeypatch.setattr(ppo, "score_rollout", nan_scores)
    updates = []
    monkeypatch.setattr(ppo, "ppo_update", lambda *a, **k: updates.append(1))
    result = igpt("ppo", "--prompts", tmp_path / "prompts.jsonl", "--sft", tmp_path / "base" / "sft" / "final",
                  "--rm", tmp_path / "rule_rm", "--run-dir", tmp_path / "run", "--max-new-tokens", "6",
                  "--rollout-batch-size", "4", "--mini-batch-size", "2", "--max-steps", "5")
    assert result.exit_code == 3 and "step 3: the reward model score was nan" in result.stderr, result.output
    assert updates == [] and not (tmp_path / "run" / "ppo" / "checkpoints").exists()


# ---------------------------------------------------------------- 4. full disk and I/O errors


def test_a_full_disk_while_checkpointing_exits_4_and_keeps_the_previous_checkpoint(tmp_path, demos, monkeypatch):
    real = checkpoint.write

    def full_at_4(dest, state, *args, **kwargs):
        if state.step == 4:
            (dest / "trainable.safetensors").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(dest, state, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "write", full_at_4)
    run_dir = tmp_path / "run"
    result = igpt(*sft_args(demos, run_dir))
    ckpts = run_dir / "sft" / "checkpoints"
    assert result.exit_code == 4, result.output
    assert f"no space left on device while writing {ckpts / 'step-000004'}" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000002"]  # no partial folder
    monkeypatch.setattr(checkpoint, "write", real)
    resumed = igpt(*sft_args(demos, run_dir, "--resume"))
    assert resumed.exit_code == 0 and "from step-000002" in resumed.stderr


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_real_full_disk_exits_4_and_the_run_resumes_after_space_is_freed(tmp_path, demos, small_disk):
    run_dir = small_disk / "run"
    assert igpt(*sft_args(demos, run_dir, "--max-steps", "4")).exit_code == 0
    free = os.statvfs(small_disk)
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (free.f_bavail * free.f_frsize - 64 * 1024))  # leave 64 KiB
    result = igpt(*sft_args(demos, run_dir, "--max-steps", "6", "--resume"))
    assert result.exit_code == 4, result.output
    assert "no space left on device while writing" in result.stderr and "Traceback" not in result.stderr
    ckpts = sorted(p.name for p in (run_dir / "sft" / "checkpoints").iterdir())
    assert ckpts[-1] == "step-000004" and not list((run_dir / "sft" / "checkpoints").glob(".tmp-*"))
    filler.unlink()
    assert igpt(*sft_args(demos, run_dir, "--max-steps", "6", "--resume")).exit_code == 0
    assert [m["step"] for m in read_metrics(run_dir / "sft" / "metrics.jsonl")] == list(range(1, 7))


# ---------------------------------------------------------------- 6. resume checks what changed


def interrupted_sft(tmp_path, demos, monkeypatch) -> Path:
    class Killed(Exception):
        pass

    def die_after_3(step):
        if step == 3:
            raise Killed

    run_dir = tmp_path / "run"
    monkeypatch.setattr(faults, "after_step", die_after_3)
    with pytest.raises(Killed):
        igpt(*sft_args(demos, run_dir, "--lr", "1e-3"))
    monkeypatch.undo()
    return run_dir


def test_resume_with_other_data_or_lr_is_refused_and_nothing_is_rewritten(tmp_path, demos, monkeypatch):
    run_dir = interrupted_sft(tmp_path, demos, monkeypatch)
    config_before = (run_dir / "sft" / "config.yaml").read_bytes()
    sha_before = manifest(run_dir)["sft"]["inputs"]["data"]["sha256"]
    other = write_jsonl(tmp_path / "other.jsonl", arithmetic_demos(24, seed=1))
    refused = igpt(*sft_args(other, run_dir, "--lr", "5e-3", "--resume"))
    assert refused.exit_code == 2, refused.output
    assert "optim.lr: 0.001 -> 0.005" in refused.stderr and "input data:" in refused.stderr
    assert (run_dir / "sft" / "config.yaml").read_bytes() == config_before
    assert manifest(run_dir)["sft"]["inputs"]["data"]["sha256"] == sha_before
    # the same data under another name, and settings that only say when to save: no change to refuse
    moved = write_jsonl(tmp_path / "moved.jsonl", arithmetic_demos(24))
    ok = igpt(*sft_args(moved, run_dir, "--lr", "1e-3", "--save-every", "3", "--resume"))
    assert ok.exit_code == 0, ok.output
    assert manifest(run_dir)["sft"]["resumes"][-1]["changes"] == [
        {"setting": "save_every", "was": 2, "now": 3, "free": True}]


def test_allow_changes_continues_and_records_the_change_with_its_step(tmp_path, demos, monkeypatch):
    run_dir = interrupted_sft(tmp_path, demos, monkeypatch)
    result = igpt(*sft_args(demos, run_dir, "--lr", "5e-3", "--resume", "--allow-changes"))
    assert result.exit_code == 0, result.output
    resumed = manifest(run_dir)["sft"]["resumes"][-1]
    assert resumed["step"] == 2 and {"setting": "optim.lr", "was": 0.001, "now": 0.005, "free": False} in \
        resumed["changes"]
    assert "5e-3" in (run_dir / "sft" / "config.yaml").read_text() or "0.005" in \
        (run_dir / "sft" / "config.yaml").read_text()


def test_resume_with_more_steps_extends_a_finished_run(tmp_path, demos):
    run_dir = tmp_path / "run"
    assert igpt(*sft_args(demos, run_dir, "--max-steps", "4")).exit_code == 0
    before = final_weights(run_dir / "sft" / "final")
    same = igpt(*sft_args(demos, run_dir, "--max-steps", "4", "--resume"))
    assert same.exit_code == 0 and "already complete" in same.stderr
    longer = igpt(*sft_args(demos, run_dir, "--max-steps", "7", "--resume"))
    assert longer.exit_code == 0 and "from step-000004" in longer.stderr, longer.output
    assert [m["step"] for m in read_metrics(run_dir / "sft" / "metrics.jsonl")] == list(range(1, 8))
    assert manifest(run_dir)["sft"]["steps"] == 7
    after = final_weights(run_dir / "sft" / "final")
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_resume_under_other_numerics_says_it_will_not_be_bit_identical(tmp_path, demos):
    run_dir = tmp_path / "run"
    assert igpt(*sft_args(demos, run_dir, "--max-steps", "2")).exit_code == 0
    state = torch.load(run_dir / "sft" / "checkpoints" / "step-000002" / "state.pt", weights_only=True)
    assert state["numerics"] == {"threads": torch.get_num_threads(), "device": "cpu", "dtype": "float32",
                                 "torch": torch.__version__}
    same = igpt(*sft_args(demos, run_dir, "--max-steps", "3", "--resume"))
    assert same.exit_code == 0 and "bit-identical" not in same.stderr, same.stderr
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        other = igpt(*sft_args(demos, run_dir, "--max-steps", "4", "--resume"))
    finally:
        torch.set_num_threads(threads)
    assert other.exit_code == 0, other.output
    lines = [line for line in other.stderr.splitlines() if "bit-identical" in line]
    assert len(lines) == 1 and f"threads {threads} -> {threads + 1}" in lines[0], other.stderr
    assert "step-000003" in lines[0] and "will not be" in lines[0]
    assert [m["step"] for m in read_metrics(run_dir / "sft" / "metrics.jsonl")] == [1, 2, 3, 4]
    assert numerics_changed_on_gpu_ignores_threads()


def numerics_changed_on_gpu_ignores_threads() -> bool:
    saved = {"threads": 1, "device": "cuda (NVIDIA H100)", "dtype": "bfloat16", "torch": "2.13.0"}
    return (checkpoint.numerics_changed(saved, {**saved, "threads": 8}) == []
            and checkpoint.numerics_changed(saved, {**saved, "threads": 8, "dtype": "float32"}) == ["dtype bfloat16 -> float32"]
            and checkpoint.numerics_changed({}, saved) == [])


# ---------------------------------------------------------------- 7. lineage


def test_rerunning_sft_marks_later_stages_stale_and_train_rm_warns(tmp_path, demos):
    from conftest import marker_rankings

    run_dir = tmp_path / "run"
    assert igpt(*sft_args(demos, run_dir)).exit_code == 0
    rankings = write_jsonl(tmp_path / "ranks.jsonl", marker_rankings(12))
    rm = ["train-rm", "--rankings", rankings, "--run-dir", run_dir, "--max-steps", "2"]  # from the run's SFT model
    assert igpt(*rm).exit_code == 0
    assert "stale" not in manifest(run_dir)["rm"]
    # a deterministic re-run gives the same weights: rm stays fresh
    assert igpt(*sft_args(demos, run_dir, "--overwrite")).exit_code == 0
    assert "stale" not in manifest(run_dir)["rm"]
    # an --overwrite run that dies before its final/ keeps the old one: rm, built from it, is as fresh as it was
    died = start(sft_args(demos, run_dir, "--overwrite", "--lr", "3e-3"), {"IGPT_FAULT_AFTER_STEP": "3"})
    died.communicate(timeout=600)
    assert died.returncode == 99 and "stale" not in manifest(run_dir)["rm"]
    # other weights: rm was built from an SFT model that is gone
    assert igpt(*sft_args(demos, run_dir, "--overwrite", "--lr", "3e-3")).exit_code == 0
    assert "re-run" in manifest(run_dir)["rm"]["stale"]
    again = igpt(*rm, "--resume")
    assert again.exit_code == 0 and "built from inputs that changed since" in again.stderr, again.output


def test_a_stage_beginning_over_its_kept_final_neither_condemns_nor_clears_what_was_built_from_it(tmp_path):
    """rundir.mark_stale with clear=False (lifecycle.begin_stage while the old final/ is kept): an entry built
    from those weights keeps its flag whatever it says (ppo, stale because rm was re-run) or its absence (rm);
    one built from a cleared checkpoint is stale; at the stage's end (clear) a matching entry is fresh again."""
    from instructgpt_cli.rundir import mark_stale

    run = tmp_path / "run"
    (run / "sft" / "final").mkdir(parents=True)
    final = str((run / "sft" / "final").resolve())
    gone = str((run / "sft" / "checkpoints" / "step-000002").resolve())
    stale_ppo = "its input rm (x) is the output of rm, re-run on 2026-12-07"
    (run / "manifest.json").write_text(json.dumps({"stages": {
        "sft": {"outputs": {"sha256": "abc"}},
        "rm": {"inputs": {"sft": {"path": final, "sha256": "abc"}}},
        "ppo": {"inputs": {"sft": {"path": final, "sha256": "abc"}}, "stale": stale_ppo},
        "eval/sft-step-2": {"inputs": {"a": {"path": gone, "sha256": "def"}}}}}))
    mark_stale(run, "sft", "abc", clear=False)
    stages = manifest(run)
    assert "stale" not in stages["rm"] and stages["ppo"]["stale"] == stale_ppo
    assert "re-run" in stages["eval/sft-step-2"]["stale"]
    mark_stale(run, "sft", "abc")
    assert "stale" not in manifest(run)["ppo"]


def test_a_ppo_re_run_makes_what_was_built_from_its_best_point_stale(tmp_path):
    """ppo/best/ (ppo --watch's point of best gold, ``ppo@best``) is one of the stage's outputs: a report on it is
    stale while PPO runs again, and fresh again only if the new run's best point has the same weights."""
    from instructgpt_cli.rundir import mark_stale
    from instructgpt_cli.storage import weights_sha256

    run = tmp_path / "run"
    best = run / "ppo" / "best"
    best.mkdir(parents=True)
    (best / "model.safetensors").write_bytes(b"weights")
    sha = weights_sha256(best)
    (run / "manifest.json").write_text(json.dumps({"stages": {
        "ppo": {"outputs": {"sha256": "abc"}},
        "compare/ppo-best-vs-sft": {"inputs": {"a": {"path": str(best.resolve()), "sha256": sha}}},
        "compare/sft-vs-dpo": {"inputs": {"a": {"path": str(run / "sft" / "final"), "sha256": "x"}}}}}))
    mark_stale(run, "ppo")  # PPO runs again
    stages = manifest(run)
    assert "re-run" in stages["compare/ppo-best-vs-sft"]["stale"] and "stale" not in stages["compare/sft-vs-dpo"]
    mark_stale(run, "ppo", "abc")  # it completes, its best point the same weights: fresh again
    assert "stale" not in manifest(run)["compare/ppo-best-vs-sft"]
    (best / "model.safetensors").write_bytes(b"other weights")
    mark_stale(run, "ppo", "abc")  # another best point: the report judged other weights
    assert "re-run" in manifest(run)["compare/ppo-best-vs-sft"]["stale"]


# ---------------------------------------------------------------- 8. preflight


@pytest.mark.parametrize("device", ["cuda", "cuda:3", "mps"])
def test_a_missing_device_is_one_line_and_exit_2_before_any_work(tmp_path, demos, device):
    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 3:
        pytest.skip("this machine has the device")
    result = igpt(*sft_args(demos, tmp_path / "run", "--device", device))
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and f"--device {device}:" in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_read_only_run_directory_is_refused_before_any_work(tmp_path, demos, small_disk):
    run_dir = small_disk / "run"
    assert igpt(*sft_args(demos, run_dir)).exit_code == 0
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    try:
        for args in (sft_args(demos, run_dir, "--overwrite"),
                     ["eval", "sft", "--config", TINY_CONFIG, "--prompts", demos, "--run-dir", run_dir]):
            result = igpt(*args)
            assert result.exit_code == 2 and "not writable" in result.stderr, result.output
            assert "Traceback" not in result.stderr
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    assert (run_dir / "sft" / "final").is_dir()


def test_running_is_read_as_interrupted_once_the_process_is_gone(tmp_path, demos):
    run_dir = tmp_path / "run"
    killed = run(sft_args(demos, run_dir), {faults.FAULT_ENV: "3"})  # dies (exit 99) with no chance to say so
    assert killed.returncode == 99
    assert manifest(run_dir)["sft"]["status"] == "running"  # what the file says
    assert locks.stage_status(run_dir, "sft") == "interrupted"  # what it means
    assert igpt(*sft_args(demos, run_dir, "--resume")).exit_code == 0
    assert locks.stage_status(run_dir, "sft") == "completed"


def test_a_run_recorded_by_an_older_igpt_resumes_when_its_inputs_are_where_they_were(tmp_path, demos):
    # igpt before issue 18 recorded a model input as its path, with no hash: the same path is no change
    base = tmp_path / "base"
    assert igpt(*sft_args(demos, base, "--max-steps", "2")).exit_code == 0
    model = base / "sft" / "final"
    run_dir = tmp_path / "run"
    args = sft_args(demos, run_dir, "--model", model, "--max-steps", "4")
    assert igpt(*args).exit_code == 0
    old = json.loads((run_dir / "manifest.json").read_text())
    assert old["stages"]["sft"]["inputs"]["model"]["sha256"]
    old["stages"]["sft"]["inputs"]["model"] = str(model)  # the older record
    (run_dir / "manifest.json").write_text(json.dumps(old))
    longer = igpt(*sft_args(demos, run_dir, "--model", model, "--max-steps", "5", "--resume"))
    assert longer.exit_code == 0 and "from step-000004" in longer.stderr, longer.output
    # another directory under the older record is a change
    old = json.loads((run_dir / "manifest.json").read_text())
    old["stages"]["sft"]["inputs"]["model"] = str(tmp_path / "elsewhere")
    (run_dir / "manifest.json").write_text(json.dumps(old))
    refused = igpt(*sft_args(demos, run_dir, "--model", model, "--max-steps", "6", "--resume"))
    assert refused.exit_code == 2 and "input model" in refused.stderr, refused.output
