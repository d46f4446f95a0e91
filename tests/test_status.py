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
    assert "stopped at step 2" in igpt("status", run_dir).stdout


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
