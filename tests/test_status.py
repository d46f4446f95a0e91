"""``igpt status``: each stage's state, step of total, last metrics, outputs and lineage, read-only."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, TINY_CONFIG, arithmetic_demos, igpt, marker_rankings, write_jsonl
from instructgpt_cli import locks
from instructgpt_cli.rundir import read_metrics


def build_run(t: Path, sft_steps: int = 3) -> Path:
    """sft, train-rm from the SFT model, ppo, eval ppo and compare ppo sft: a few steps each on tiny."""
    write_jsonl(t / "demos.jsonl", arithmetic_demos(24))
    write_jsonl(t / "ranks.jsonl", marker_rankings(16))
    write_jsonl(t / "prompts.jsonl", [{"prompt": f"Say {w}."} for w in "a b c d e f g h".split()])
    run_dir = t / "run"
    for args in (["sft", "--data", t / "demos.jsonl", "--max-steps", str(sft_steps)],
                 ["train-rm", "--rankings", t / "ranks.jsonl", "--model", "", "--max-steps", "2"],  # init: sft/final
                 ["ppo", "--prompts", t / "prompts.jsonl", "--max-steps", "2", "--max-new-tokens", "8"],
                 ["dpo", "--rankings", t / "ranks.jsonl", "--max-steps", "2", "--lr", "1e-3"]):
        result = igpt(*args, "--config", TINY_CONFIG, "--run-dir", run_dir)
        assert result.exit_code == 0, result.output
    for args in (["eval", "ppo"], ["compare", "ppo", "sft"]):
        result = igpt(*args, "--prompts", t / "prompts.jsonl", "--run-dir", run_dir, "--max-new-tokens", "8")
        assert result.exit_code == 0, result.output
    return run_dir


@pytest.fixture(autouse=True)
def wide(monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # the table one line a row, as a terminal that wide shows it


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return build_run(tmp_path_factory.mktemp("statusrun"))


def status(*args) -> dict:
    result = igpt("status", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_done_stages_show_step_n_of_n_their_last_metrics_outputs_and_lineage(run):
    s = status(run)
    manifest = json.loads((run / "manifest.json").read_text())["stages"]
    assert list(s["stages"]) == ["sft", "rm", "ppo", "dpo", "compare/ppo-vs-sft", "eval/ppo"]
    for name, steps in (("sft", 3), ("rm", 2), ("ppo", 2), ("dpo", 2)):
        row = s["stages"][name]
        assert (row["state"], row["step"], row["total_steps"]) == ("done", steps, steps), name
        assert manifest[name]["total_steps"] == steps  # recorded when the steps began
        assert row["outputs"]["final"] == str(run / name / "final")
        assert row["outputs"]["checkpoint"] == str(run / name / "checkpoints" / f"step-{steps:06d}")
        assert row["holder"] is None and row["stale"] is None
    lines = {name: read_metrics(run / name / "metrics.jsonl") for name in ("sft", "rm", "ppo")}
    newest = {name: {k: v for line in ls for k, v in line.items()} for name, ls in lines.items()}
    assert s["stages"]["sft"]["metrics"] == {k: newest["sft"][k] for k in ("train/loss", "eval/loss")}
    assert s["stages"]["sft"]["metrics"]["train/loss"] == lines["sft"][-1]["train/loss"]
    assert set(s["stages"]["rm"]["metrics"]) == {"train/loss", "train/accuracy", "eval/loss", "eval/accuracy"}
    assert s["stages"]["ppo"]["metrics"]["objective/kl"] == lines["ppo"][-1]["objective/kl"]
    assert s["stages"]["ppo"]["metrics"]["objective/scores"] == lines["ppo"][-1]["objective/scores"]
    dpo = read_metrics(run / "dpo" / "metrics.jsonl")[-1]
    assert s["stages"]["dpo"]["metrics"]["rewards/margins"] == dpo["rewards/margins"]
    assert lineage_of(s, "dpo", "sft")["sha256"] == manifest["sft"]["outputs"]["sha256"]
    report = json.loads((run / "eval" / "ppo" / "report.json").read_text())
    assert s["stages"]["eval/ppo"]["metrics"]["score_mean"] == report["score_mean"]
    assert s["stages"]["eval/ppo"]["metrics"]["kl_to_sft"] == report["kl_to_sft"]
    assert s["stages"]["eval/ppo"]["state"] == "done" and s["stages"]["eval/ppo"]["step"] is None
    compared = json.loads((run / "compare" / "ppo-vs-sft" / "report.json").read_text())
    headline = ("win_rate", "ci_low", "ci_high", "n")
    assert s["stages"]["compare/ppo-vs-sft"]["metrics"] == {k: compared[k] for k in headline}
    assert s["stages"]["compare/ppo-vs-sft"]["outputs"]["html"] == str(run / "compare" / "ppo-vs-sft" / "report.html")
    lineage = {(r["stage"], r["input"]): r for r in s["lineage"]}
    sft_sha = manifest["sft"]["outputs"]["sha256"]
    assert lineage[("rm", "init")]["from"] == "sft" and lineage[("rm", "init")]["sha256"] == sft_sha
    assert lineage[("ppo", "sft")]["from"] == "sft" and lineage[("ppo", "sft")]["sha256"] == sft_sha
    assert lineage[("ppo", "rm")]["sha256"] == manifest["rm"]["outputs"]["sha256"]
    assert lineage[("sft", "model")] == {"stage": "sft", "input": "model", "from": None, "source": "tiny",
                                         "sha256": None, "stale": False}
    assert not any(r["stale"] for r in s["lineage"])
    assert ("sft", "data") not in lineage  # a data file is no lineage


def lineage_of(s: dict, stage: str, key: str) -> dict:
    return next(r for r in s["lineage"] if (r["stage"], r["input"]) == (stage, key))


def test_the_table_says_what_the_json_says(run):
    s = status(run)
    shown = igpt("status", "--run-dir", run)
    assert shown.exit_code == 0, shown.output
    stages, _, _ = shown.stdout.partition("lineage")
    table = {line.split("│")[1].strip(): line for line in stages.splitlines() if line.count("│") >= 5}
    for name, row in s["stages"].items():
        assert row["state"] in table[name], name
        if row["step"] is not None:
            assert f"{row['step']} of {row['total_steps']}" in table[name]
    assert f"train/loss {s['stages']['sft']['metrics']['train/loss']:.4g}" in table["sft"]
    assert s["lineage"][0]["stage"] in shown.stdout and "lineage" in shown.stdout


def test_status_writes_nothing_and_skips_a_metrics_line_cut_mid_write(run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(run, run_dir)
    with open(run_dir / "sft" / "metrics.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"step": 4, "train/loss": 0.1')  # a line being written
    before = snapshot(run_dir)
    s = status(run_dir)
    assert s["stages"]["sft"]["step"] == 3 and s["stages"]["sft"]["metrics"]["train/loss"] != 0.1
    assert igpt("status", run_dir).exit_code == 0
    assert snapshot(run_dir) == before and not (run_dir / locks.LOCK_DIR).exists()


def test_a_held_lock_shows_running_with_its_pid_and_host_and_a_dead_holder_does_not(run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(run, run_dir)
    lock = locks.Lock(locks.lock_path(run_dir, "ppo"), "ppo")
    lock.acquire()
    try:
        s = status(run_dir)
        table = igpt("status", run_dir).stdout
    finally:
        lock.release()
    row = s["stages"]["ppo"]
    assert row["state"] == "running"
    assert (row["holder"]["pid"], row["holder"]["host"]) == (os.getpid(), socket.gethostname())
    assert f"pid {os.getpid()} on {socket.gethostname()}" in table
    assert status(run_dir)["stages"]["ppo"]["state"] == "done"  # released
    # a holder killed without releasing leaves its lock file, naming a process that is gone: not running,
    # and its manifest entry, still 'running', reads as interrupted
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    path = locks.lock_path(run_dir, "sft")
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"pid": int(gone.stdout), "host": socket.gethostname(), "command": "igpt sft",
                                "since": "2026-01-01T00:00:00+00:00"}) + "\n")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["stages"]["sft"]["status"] = "running"
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    row = status(run_dir)["stages"]["sft"]
    assert row["state"] == "interrupted" and row["holder"] is None


def test_an_interrupted_sft_shows_the_step_it_stopped_at_and_later_stages_missing(tmp_path):
    demos = write_jsonl(tmp_path / "demos.jsonl", arithmetic_demos(24))
    run_dir = tmp_path / "run"
    env = {**os.environ, "IGPT_FAULT_AFTER_STEP": "2:SIGTERM"}
    stopped = subprocess.run([sys.executable, "-m", "instructgpt_cli", "sft", "--config", str(TINY_CONFIG), "--data",
                              str(demos), "--run-dir", str(run_dir), "--max-steps", "5", "--save-every", "1",
                              "--val-fraction", "0"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert stopped.returncode == 143, stopped.stderr
    s = status(run_dir)
    row = s["stages"]["sft"]
    assert (row["state"], row["step"], row["total_steps"], row["stopped_at_step"]) == ("interrupted", 2, 5, 2)
    assert row["outputs"] == {"final": None, "checkpoint": str(run_dir / "sft" / "checkpoints" / "step-000002"),
                              "report": None, "html": None}
    assert [s["stages"][n]["state"] for n in ("rm", "ppo")] == ["missing", "missing"]
    assert list(s["stages"]) == ["sft", "rm", "ppo"]  # no eval or compare results
    assert "interrupted at step 2 by SIGTERM; resumes from step 2" in igpt("status", run_dir).stdout


def test_a_retrained_sft_makes_rm_ppo_and_the_reports_built_from_it_stale(tmp_path):
    run_dir = build_run(tmp_path)
    retrained = igpt("sft", "--config", TINY_CONFIG, "--data", tmp_path / "demos.jsonl", "--run-dir", run_dir,
                     "--max-steps", "4", "--overwrite")
    assert retrained.exit_code == 0, retrained.output
    s = status(run_dir)
    states = {name: row["state"] for name, row in s["stages"].items()}
    assert states == {"sft": "done", "rm": "stale", "ppo": "stale", "dpo": "stale", "eval/ppo": "stale",
                      "compare/ppo-vs-sft": "stale"}
    assert s["stages"]["sft"]["step"] == s["stages"]["sft"]["total_steps"] == 4
    stale = {(r["stage"], r["input"]) for r in s["lineage"] if r["stale"]}
    assert stale == {("rm", "init"), ("ppo", "sft"), ("dpo", "sft"), ("eval/ppo", "sft"), ("compare/ppo-vs-sft", "b")}
    table = igpt("status", run_dir).stdout
    assert table.count("stale") >= 5 + 5


def test_not_a_run_directory_exits_2(tmp_path, monkeypatch):
    missing = igpt("status", tmp_path / "nowhere")
    assert missing.exit_code == 2 and f"{tmp_path / 'nowhere'}: no such run directory" in missing.stderr
    empty = igpt("status", "--run-dir", tmp_path)
    assert empty.exit_code == 2 and f"{tmp_path}: not a run directory (no manifest.json)" in empty.stderr
    monkeypatch.chdir(tmp_path)
    default = igpt("status")
    assert default.exit_code == 2 and "runs/default: no such run directory" in default.stderr
    assert list(tmp_path.iterdir()) == []  # nothing made


def hand_made_run(t: Path) -> Path:
    """A run directory as a batch job leaves it, written by hand (no training): sft stopped by SIGTERM at step
    843 with checkpoints 400 and 800 complete (and 843's cut short), rm killed while running (its manifest still
    says running; nobody holds the lock), ppo failed with its error and exit code recorded."""
    run_dir = t / ("a-run-directory-with-a-long-name-" + "x" * 60)
    for name, steps in (("sft", (400, 800, 843)), ("rm", (10,)), ("ppo", ())):
        ckpts = run_dir / name / "checkpoints"
        ckpts.mkdir(parents=True)
        for step in steps:
            (ckpts / f"step-{step:06d}").mkdir(parents=True)
            if step != 843:
                (ckpts / f"step-{step:06d}" / "COMPLETED").write_text("{}")
        write_jsonl(run_dir / name / "metrics.jsonl", [{"step": s, "train/loss": 1.0} for s in steps] or [{"step": 1}])
    stages = {"sft": {"status": "interrupted", "started": "2026-12-07T01:00:00+00:00", "total_steps": 1000,
                      "stopped": "2026-12-07T02:30:05+00:00", "stopped_at_step": 843, "signal": "SIGTERM"},
              "rm": {"status": "running", "started": "2026-12-07T03:00:00+00:00", "total_steps": 50},
              "ppo": {"status": "failed", "started": "2026-12-07T04:00:00+00:00", "error": "rewards: non-finite",
                      "exit_code": 3}}
    (run_dir / "manifest.json").write_text(json.dumps({"igpt_version": "0", "stages": stages}))
    return run_dir


def test_json_state_and_times_say_where_each_stage_stopped_and_goes_on_from(tmp_path):
    s = status(hand_made_run(tmp_path))["stages"]
    sft, rm, ppo = s["sft"], s["rm"], s["ppo"]
    assert (sft["state"], sft["stopped_at_step"], sft["resumes_from_step"], sft["signal"]) == \
        ("interrupted", 843, 800, "SIGTERM")
    assert (sft["started"], sft["ended"], sft["duration_s"]) == \
        ("2026-12-07T01:00:00+00:00", "2026-12-07T02:30:05+00:00", 5405.0)
    # killed: the manifest's raw word is kept apart, under a name no script takes for the state
    assert (rm["state"], rm["manifest_status"], rm["resumes_from_step"], rm["ended"]) == \
        ("interrupted", "running", 10, None)
    assert all("status" not in row for row in s.values())
    assert (ppo["state"], ppo["error"], ppo["exit_code"], ppo["resumes_from_step"]) == \
        ("failed", "rewards: non-finite", 3, None)


def test_the_table_in_a_log_or_a_narrow_terminal_cuts_nothing_and_names_every_column(tmp_path, monkeypatch):
    run_dir = hand_made_run(tmp_path)
    monkeypatch.setenv("COLUMNS", "60")
    shown = igpt("status", run_dir)
    assert shown.exit_code == 0, shown.output
    assert "…" not in shown.stdout
    lines = shown.stdout.splitlines()
    assert str(run_dir / "sft" / "checkpoints" / "step-000800") in shown.stdout  # whole, on one line
    header = next(line for line in lines if "state" in line and "stage" in line)
    for col in ("stale", "started", "ended", "duration", "last metrics", "outputs"):
        assert col in header
    sft = next(line for line in lines if line.startswith("│ sft"))
    assert "interrupted at step 843 by SIGTERM; resumes from step 800" in sft
    assert "2026-12-07 01:00:00" in sft and "2026-12-07 02:30:05" in sft and "1:30:05" in sft
    assert "interrupted at step 10; resumes from step 10" in next(line for line in lines if line.startswith("│ rm"))
    assert "failed (exit 3: rewards: non-finite)" in next(line for line in lines if line.startswith("│ ppo"))
    assert not any(line != line.rstrip() for line in lines)


@pytest.mark.parametrize("as_json", [False, True])
def test_a_reader_that_leaves_early_is_no_failure(tmp_path, as_json):
    """``igpt status | head -1``: the pipe closes before igpt writes; it exits 0 and says nothing."""
    run_dir = hand_made_run(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "instructgpt_cli", "status", str(run_dir),
                             *(["--json"] if as_json else [])],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first write
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0 and err == b""
