"""--report-to (trackers.py): each tracker, read back through its own library, holds the metrics.jsonl lines
(the same names, the optimizer step as x axis), and --resume continues the same tracker run. Offline only:
W&B in offline mode, MLflow in a local file store, trackio in a local SQLite file, TensorBoard event files."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, TINY_CONFIG, arithmetic_demos, igpt, write_jsonl
from instructgpt_cli import faults, trackers
from instructgpt_cli.config import SFTConfig
from instructgpt_cli.rundir import read_metrics

ALL = "tensorboard,wandb,trackio,mlflow"


def need(*modules: str) -> None:
    """`make test` installs the tracker extras, so CI (CI=true) fails without one; elsewhere a test that
    reads a tracker back is skipped, saying how to install it."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing and os.environ.get("CI"):
        pytest.fail(f"tracker libraries missing in CI: {missing}; `make test` installs .[test,trackers]")
    if missing:
        pytest.skip(f"needs {', '.join(missing)}: pip install -e '.[trackers]'")


def offline_env(root: Path) -> dict:
    """Every tracker stores under ``root`` and none reaches the network."""
    return {"WANDB_MODE": "offline", "WANDB_DIR": str(root), "WANDB_SILENT": "true",
            "TRACKIO_DIR": str(root / "trackio"),
            "MLFLOW_TRACKING_URI": f"file:{root / 'mlruns'}", "MLFLOW_ALLOW_FILE_STORE": "true",
            "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1"}


def sft_args(data: Path, run_dir: Path, *extra) -> list:
    return ["sft", "--config", TINY_CONFIG, "--data", data, "--run-dir", run_dir, "--max-steps", "6",
            "--save-every", "2", "--eval-every", "3", "--report-to", ALL, *extra]


def run(args: list, env: dict) -> subprocess.CompletedProcess:
    """The CLI in a fresh process (a stop signal, a hard kill; trackio reads TRACKIO_DIR when imported)."""
    return subprocess.run([sys.executable, "-m", "instructgpt_cli", *map(str, args)], cwd=REPO, text=True,
                          capture_output=True, timeout=300, env={**os.environ, **env})


def numbers(line: dict) -> dict:
    return {k: v for k, v in line.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


# ---------------------------------------------------------------- reading each tracker back


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) of every scalar, as TensorBoard shows them (events a purge_step dropped are gone)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def wandb_records(path: Path) -> list:
    """The records of a .wandb file (W&B's LevelDB-style log: a 7-byte header, 32 KiB blocks of chunks with
    a 7-byte header each: crc32c, length, type FULL=1 FIRST=2 MIDDLE=3 LAST=4), as protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", path
    pos, pending, out = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7 or data[pos + 6] == 0:  # the block's zero-filled tail
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def wandb_run(run_dir: Path) -> tuple[str, list[dict], dict]:
    """(run id, history rows, newest summary) of one offline run directory."""
    records = wandb_records(next(run_dir.glob("run-*.wandb")))

    def items(entries) -> dict:
        return {e.key or "/".join(e.nested_key): json.loads(e.value_json) for e in entries}

    history = [items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
    summaries = [items(r.summary.update) for r in records if r.WhichOneof("record_type") == "summary"]
    run_ids = {r.run.run_id for r in records if r.WhichOneof("record_type") == "run"}
    assert len(run_ids) <= 1, run_ids  # none in a run killed before W&B wrote a record
    return (run_ids.pop() if run_ids else ""), history, summaries[-1] if summaries else {}


# ---------------------------------------------------------------- every tracker, stopped, killed and resumed


def test_every_tracker_holds_the_metrics_lines_and_a_resumed_run_continues_the_same_tracker_run(tmp_path, monkeypatch):
    need("tensorboard", "wandb", "trackio", "mlflow")
    demos = write_jsonl(tmp_path / "demos.jsonl", arithmetic_demos(24))
    run_dir, env = tmp_path / "demo", offline_env(tmp_path)
    # 1. SIGTERM after step 3: a checkpoint of step 3, every tracker closed as interrupted
    stopped = run(sft_args(demos, run_dir), {**env, faults.FAULT_ENV: "3:SIGTERM"})
    assert stopped.returncode == 143, stopped.stderr
    first = json.loads((run_dir / "sft" / trackers.RECORD).read_text())
    assert set(first) == {"tensorboard", "wandb", "trackio", "mlflow"}
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.setenv(key, env[key])
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    assert client.get_run(first["mlflow"]["run_id"]).info.status == "KILLED"
    # 2. resumed, then killed outright after step 5 (checkpoint of step 4): step 5 is trained and logged again
    killed = run(sft_args(demos, run_dir, "--resume"), {**env, faults.FAULT_ENV: "5"})
    assert killed.returncode == 99, killed.stderr
    # 3. resumed to the end
    done = run(sft_args(demos, run_dir, "--resume"), env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(run_dir / "sft" / "final")  # the trackers print nothing on stdout
    assert "warning" not in done.stderr.lower(), done.stderr
    record = json.loads((run_dir / "sft" / trackers.RECORD).read_text())
    assert record["wandb"]["id"] == first["wandb"]["id"] and record["mlflow"]["run_id"] == first["mlflow"]["run_id"]

    lines = read_metrics(run_dir / "sft" / "metrics.jsonl")
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5, 6] and "eval/loss" in lines[2] and "eval/loss" not in lines[0]
    expected = {(m["step"], k): v for m in lines for k, v in numbers(m).items()}
    assert {"train/loss", "train/lr", "elapsed_s", "epoch", "eval/loss"} <= {k for _, k in expected}

    # TensorBoard: every number of every line, once per step (the killed run's step 5 purged), float32
    scalars = tensorboard_scalars(run_dir / "sft" / "tensorboard")
    got = {(step, tag): value for tag, points in scalars.items() for step, value in points}
    assert sum(len(p) for p in scalars.values()) == len(expected) and got.keys() == expected.keys()
    assert all(got[k] == pytest.approx(v, rel=1e-6, abs=1e-6) for k, v in expected.items())

    # W&B: one run id in all three offline runs; the resumed run's history is the lines from step 5 on, exactly
    offline = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(offline) == 3 and all(d.name.endswith("-" + record["wandb"]["id"]) for d in offline)
    runs = [wandb_run(d) for d in offline]
    assert runs[0][0] == runs[2][0] == record["wandb"]["id"]
    assert [{k: v for k, v in row.items() if not k.startswith("_")} for row in runs[0][1]] == \
           [numbers(m) for m in lines[:3]]
    last_history = runs[2][1]
    assert [row["_step"] for row in last_history] == [5, 6]
    assert [{k: v for k, v in row.items() if not k.startswith("_")} for row in last_history] == \
           [numbers(m) for m in lines[4:]]
    assert {k: v for k, v in runs[2][2].items() if not k.startswith("_")} == numbers(lines[-1])  # the summary

    # MLflow: the same run all along, finished; the newest value of every step is the line's
    mlrun = client.get_run(record["mlflow"]["run_id"])
    assert mlrun.info.status == "FINISHED" and mlrun.info.run_name == "demo/sft"
    assert mlrun.data.params["optim.lr"] == "0.001" and mlrun.data.params["report_to"] == str(ALL.split(","))
    for key in {k for _, k in expected}:
        history = sorted(client.get_metric_history(mlrun.info.run_id, key), key=lambda m: (m.step, m.timestamp))
        newest = {m.step: m.value for m in history}
        assert newest == {s: v for (s, k), v in expected.items() if k == key}, key
    steps = [m.step for m in client.get_metric_history(mlrun.info.run_id, "train/loss")]
    assert sorted(set(steps)) == [1, 2, 3, 4, 5, 6]  # step 5 may be there twice: MLflow cannot delete a point

    # trackio: one run of that name in project igpt; the newest value of each step is the line's. It writes
    # every 0.5 s from a thread: a hard kill loses the steps it had not written (here 4, never redone)
    trackio_rows = trackio_logs(tmp_path / "trackio", "igpt", "demo/sft")
    newest = {(row["step"], k): v for row in trackio_rows for k, v in row.items() if (row["step"], k) in expected}
    assert newest.items() <= expected.items()
    assert {key for key in expected if key[0] != 4} <= newest.keys()


def trackio_logs(trackio_dir: Path, project: str, name: str) -> list[dict]:
    """trackio reads TRACKIO_DIR when it is imported: a fresh process reads the test's store."""
    code = ("import json, sys; from trackio.sqlite_storage import SQLiteStorage as S; "
            "print(json.dumps({'runs': S.get_runs(sys.argv[1]), 'logs': S.get_logs(sys.argv[1], sys.argv[2])}))")
    out = subprocess.run([sys.executable, "-c", code, project, name], capture_output=True, text=True, check=True,
                         cwd=REPO, env={**os.environ, "TRACKIO_DIR": str(trackio_dir)})
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["runs"] == [name]
    return sorted(found["logs"], key=lambda row: (row["step"], row["timestamp"]))


# ---------------------------------------------------------------- bad input: exit 2, nothing written


@pytest.mark.parametrize("name", ["tensorboard", "wandb", "trackio", "mlflow"])
def test_a_missing_tracker_library_exits_2_naming_its_extra_before_anything_is_written(tmp_path, demos_file,
                                                                                        monkeypatch, name):
    monkeypatch.setitem(sys.modules, name, None)  # `import name` raises ImportError, as when it is not installed
    result = igpt("sft", "--config", TINY_CONFIG, "--data", demos_file, "--run-dir", tmp_path / "run",
                  "--report-to", f"{name},tensorboard" if name != "tensorboard" else name)
    assert result.exit_code == 2, result.output
    assert f"--report-to {name} needs the {name} package: pip install 'instructgpt-cli[{name}]'" in result.stderr
    assert not (tmp_path / "run").exists()


def test_an_unknown_tracker_exits_2_listing_the_known_ones(tmp_path, demos_file):
    result = igpt("sft", "--config", TINY_CONFIG, "--data", demos_file, "--run-dir", tmp_path / "run",
                  "--report-to", "tensorboard,comet")
    assert result.exit_code == 2
    assert "--report-to (sft.report_to): ['tensorboard', 'comet'] must name trackers among tensorboard, wandb, trackio, mlflow" \
        in result.stderr
    assert not (tmp_path / "run").exists()


def test_an_mlflow_store_that_refuses_to_open_exits_2_before_anything_is_written(tmp_path, demos_file,
                                                                                   monkeypatch):
    need("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")  # MLflow 3 refuses a file store
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    result = igpt("sft", "--config", TINY_CONFIG, "--data", demos_file, "--run-dir", tmp_path / "run",
                  "--report-to", "mlflow")
    assert result.exit_code == 2, result.output
    assert "--report-to mlflow: tracking store" in result.stderr and "MLFLOW_ALLOW_FILE_STORE=true" in result.stderr
    assert not (tmp_path / "run").exists()


def test_every_training_stage_takes_report_to_comma_separated():
    import yaml

    for command, section in (("sft", "sft"), ("train-rm", "rm"), ("ppo", "ppo")):
        shown = igpt(command, "--report-to", "tensorboard, wandb", "--print-config")
        assert shown.exit_code == 0, shown.output
        assert yaml.safe_load(shown.stdout)[section]["report_to"] == ["tensorboard", "wandb"]
        assert yaml.safe_load(igpt(command, "--print-config").stdout)[section]["report_to"] == []  # default: none


# ---------------------------------------------------------------- what reaches a tracker, and how it ends


def test_numbers_keep_every_int_and_float_but_the_step():
    line = {"step": 7, "epoch": 0.5, "train/loss": 2.0, "train/tokens": 120, "train/skipped_steps": 0,
            "elapsed_s": 1.25, "note": "text", "flag": True, "eval/loss": float("nan")}
    kept = trackers.numbers(line)
    assert list(kept) == ["epoch", "train/loss", "train/tokens", "train/skipped_steps", "elapsed_s", "eval/loss"]
    assert trackers.numbers({"step": 1}) == {}
    assert trackers.requested(["none"]) == [] and trackers.requested(["wandb", "none", "wandb"]) == ["wandb"]


class Fake:
    """A tracker that records what it is told; ``fail`` names the calls that raise."""

    made: list["Fake"] = []
    fail: set[str] = set()

    def __init__(self, name, stage, params, step, saved):
        self.name, self.params, self.step, self.saved, self.logged, self.code = name, params, step, saved, [], None
        self.record = {"id": f"run-{len(Fake.made)}"}
        Fake.made.append(self)
        if "init" in Fake.fail:
            raise ConnectionError("tracker unreachable")

    def log(self, metrics, step):
        if "log" in Fake.fail:
            raise ConnectionError("tracker went away")
        self.logged.append((step, metrics))

    def close(self, code):
        self.code = code
        if "close" in Fake.fail:
            raise ConnectionError("close failed")


@pytest.fixture
def fake_stage(tmp_path, monkeypatch):
    from instructgpt_cli.rundir import Stage

    Fake.made, Fake.fail = [], set()
    monkeypatch.setitem(trackers.ADAPTERS, "wandb", Fake)
    stage = Stage(tmp_path / "demo", "sft")
    stage.dir.mkdir(parents=True)  # no config.yaml: the trackers take the config the stage runs with
    return stage


def test_reporting_sends_the_lines_records_the_run_and_resumes_it(fake_stage):
    with trackers.reporting(fake_stage, 0, SFTConfig(report_to=["wandb"])) as report:
        report({"step": 1, "train/loss": 2.5, "name": "x"})
    first = Fake.made[0]
    assert first.name == "demo/sft" and first.params["report_to"] == ["wandb"] and first.saved == {}
    assert first.logged == [(1, {"train/loss": 2.5})] and first.code == 0
    assert json.loads((fake_stage.dir / trackers.RECORD).read_text()) == {"wandb": {"id": "run-0"}}
    with trackers.reporting(fake_stage, 1, SFTConfig(report_to=["wandb"])) as report:
        report({"step": 2, "train/loss": 2.0})
    assert Fake.made[1].saved == {"id": "run-0"} and Fake.made[1].step == 1  # the resumed run gets the record


@pytest.mark.parametrize("error,code", [("interrupted", 143), ("nonfinite", 3), ("bug", 1)])
def test_reporting_closes_with_the_exit_code_and_a_failing_close_hides_no_error(fake_stage, error, code):
    import signal

    from instructgpt_cli.errors import Interrupted, NonFinite

    raised = {"interrupted": Interrupted(signal.SIGTERM), "nonfinite": NonFinite("nan"), "bug": KeyError("k")}[error]
    Fake.fail = {"close"}
    with pytest.raises(type(raised)) as caught:
        with trackers.reporting(fake_stage, 0, SFTConfig(report_to=["wandb"])) as report:
            report({"step": 1, "train/loss": 1.0})
            raise raised
    assert caught.value is raised and Fake.made[0].code == code


def test_a_tracker_that_fails_is_warned_about_and_training_goes_on(fake_stage, capsys):
    Fake.fail = {"log"}
    with trackers.reporting(fake_stage, 0, SFTConfig(report_to=["wandb"])) as report:
        report({"step": 1, "train/loss": 1.0})
        report({"step": 2, "train/loss": 0.5})  # no second call: the tracker was closed after the first
    assert Fake.made[0].code == 1 and "logging step 1 failed; no more metrics go to it" in capsys.readouterr().err
    Fake.fail = {"init"}
    with trackers.reporting(fake_stage, 0, SFTConfig(report_to=["wandb"])) as report:
        report({"step": 1, "train/loss": 1.0})
    assert "could not start its run" in capsys.readouterr().err
