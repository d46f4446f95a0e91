"""Experiment trackers: ``--report-to tensorboard,wandb,trackio,mlflow`` (TRL's flag and names) sends every
metrics line of a training stage (train.Session) to each tracker named, under the metrics.jsonl names, with the
line's ``step`` (the optimizer step; PPO: the iteration) as the x axis and every other number as a metric
(``elapsed_s``, ``epoch`` ...); text is skipped. metrics.jsonl stays the record: a tracker that fails to
start or to log is warned about once and left out, and training goes on. The resolved config (the stage's
config.yaml) is the run's parameters. Only rank 0 reports.

Each tracker is its library, an optional extra (``pip install 'instructgpt-cli[wandb]'``), checked by
:func:`check` before a model is loaded or anything is written. The project is ``igpt`` unless the
environment names one as the libraries' users know it (WANDB_PROJECT, MLFLOW_EXPERIMENT_NAME,
TRACKIO_PROJECT); the run is ``RUN_DIR-name/STAGE`` (``demo/sft``). The libraries' own settings apply
(WANDB_MODE=offline, WANDB_DIR, MLFLOW_TRACKING_URI, TRACKIO_DIR); TensorBoard writes to RUN_DIR/STAGE/
tensorboard, or TENSORBOARD_LOGGING_DIR/RUN/STAGE when that is set (transformers' variable).

``--resume`` continues the same tracker runs: STAGE/trackers.json (gone with --overwrite, as the whole stage
directory) keeps each one's id: W&B ``id`` with ``resume="allow"``, MLflow's ``run_id``, trackio's run
name with ``resume="allow"``, TensorBoard's log directory. A stop signal checkpoints the step it ends on, so
nothing is logged twice; after a hard kill the steps past the newest checkpoint are trained and logged again
(the same values, resume being exact). TensorBoard purges the old ones (``purge_step``); W&B's steps only
increase, so a resumed online run ignores (with a warning) the steps it has; MLflow and trackio cannot
delete a point and keep both of such a step. A hard kill also loses what a tracker had not written yet
(W&B and trackio write in the background; TensorBoard is flushed every step).
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from . import distributed
from .console import say
from .errors import BadInput
from .config import REPORT_TO
from .rundir import Stage
from .storage import atomic_write_text

RECORD = "trackers.json"  # in the stage directory: each tracker's run, for --resume
PROJECT = "igpt"


def requested(report_to: list[str]) -> list[str]:
    """The trackers named, in order, once each ('none' names none, as in TRL)."""
    return [name for name in dict.fromkeys(report_to) if name != "none"]


def check(report_to: list[str]) -> None:
    """BadInput (exit 2) for each tracker whose library cannot be imported, naming the extra that installs it,
    and for an MLflow tracking store that refuses to open. Called before anything is loaded or written."""
    problems = []
    for name in requested(report_to):
        if name not in REPORT_TO:  # report_to's rule (config.py) has said so already; a caller that skipped it is told too
            problems.append(f"--report-to {name}: unknown tracker (known: {', '.join(REPORT_TO)}, none)")
            continue
        try:
            importlib.import_module(name)  # each library's import name is its tracker name
        except ImportError:
            problems.append(f"--report-to {name} needs the {name} package: pip install 'instructgpt-cli[{name}]'")
            continue
        if name == "mlflow" and distributed.is_main():
            problems += _mlflow_store_problems()
    if problems:
        raise BadInput(problems)


def _mlflow_store_problems() -> list[str]:
    """MlflowClient() opens the tracking store (no network for a server URI): MLflow 3 refuses a file store
    (./mlruns, the default without a database driver, as with mlflow-skinny) unless told to allow it, and a
    database URI needs the full mlflow package. Found here rather than after the model has loaded."""
    import mlflow

    try:
        mlflow.tracking.MlflowClient()
    except Exception as e:  # noqa: BLE001 - MLflow raises several kinds; its message is what the user needs
        reason = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        return [f"--report-to mlflow: tracking store {mlflow.get_tracking_uri()!r}: {reason}",
                "  MLflow needs a tracking server (MLFLOW_TRACKING_URI=http://HOST:5000), or for a local store "
                "the full mlflow package (MLFLOW_TRACKING_URI=sqlite:///mlflow.db) or MLFLOW_ALLOW_FILE_STORE=true "
                "(./mlruns)"]
    return []


def numbers(record: dict) -> dict[str, float | int]:
    """A metrics line's values a tracker plots: every int and float but the step (the x axis); no bool, no text."""
    return {k: v for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1e-5}}`` -> ``{"optim.lr": 1e-5}`` (MLflow's parameters are flat)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


# ---------------------------------------------------------------- one adapter per tracker


class TensorBoard:
    def __init__(self, name: str, stage: Stage, params: dict, step: int, saved: dict):
        from torch.utils.tensorboard import SummaryWriter

        root = os.environ.get("TENSORBOARD_LOGGING_DIR")
        log_dir = str(Path(root).expanduser() / name if root else stage.dir / "tensorboard")
        # purge_step: events of steps after the resume point, written before a hard kill, are dropped when
        # TensorBoard reads the directory (its "restart" handling); a fresh start purges a reused directory
        self.writer = SummaryWriter(log_dir, purge_step=step + 1)
        if step == 0:
            self.writer.add_text("config", "```\n" + yaml.safe_dump(params, sort_keys=False) + "```", 0)
        self.record = {"log_dir": str(Path(log_dir).resolve())}  # for the user; a resume derives it again

    def log(self, metrics: dict, step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a hard kill loses nothing logged (a step takes seconds; a flush, microseconds)

    def close(self, code: int) -> None:
        self.writer.close()


class WandB:
    def __init__(self, name: str, stage: Stage, params: dict, step: int, saved: dict):
        import wandb

        self.run = wandb.init(project=saved.get("project") or os.environ.get("WANDB_PROJECT") or PROJECT,
                              name=name, id=saved.get("id"), resume="allow",
                              config=params)
        self.record = {"id": self.run.id, "project": self.run.project}

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self, code: int) -> None:
        self.run.finish(exit_code=code)


class MLflow:
    def __init__(self, name: str, stage: Stage, params: dict, step: int, saved: dict):
        import mlflow

        self.mlflow, uri = mlflow, mlflow.get_tracking_uri()
        if saved.get("run_id") and saved.get("tracking_uri") == uri:
            self.run = mlflow.start_run(run_id=saved["run_id"])  # parameters were logged when it started
        else:
            mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or PROJECT)
            self.run = mlflow.start_run(run_name=name)
            mlflow.log_params({k: str(v) for k, v in flatten(params).items()})
        self.record = {"run_id": self.run.info.run_id, "tracking_uri": uri}

    def log(self, metrics: dict, step: int) -> None:
        self.mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def close(self, code: int) -> None:
        self.mlflow.end_run(status="FINISHED" if code == 0 else "KILLED" if code >= 128 else "FAILED")


class Trackio:
    def __init__(self, name: str, stage: Stage, params: dict, step: int, saved: dict):
        import trackio

        project = saved.get("project") or os.environ.get("TRACKIO_PROJECT") or PROJECT
        # a fresh start (no record) is a new run even where an old one has this name
        self.trackio = trackio
        self.run = trackio.init(project=project, name=saved.get("name") or name, config=params,
                                resume="allow" if saved else "never")
        self.record = {"project": project, "name": self.run.name}

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self, code: int) -> None:
        self.trackio.finish()  # the module's: it also forgets the run, which trackio's atexit would finish again


ADAPTERS = {"tensorboard": TensorBoard, "wandb": WandB, "trackio": Trackio, "mlflow": MLflow}


# ---------------------------------------------------------------- the stage's trackers


def run_name(stage: Stage) -> str:
    """``RUN/STAGE``; a run nested in another's stage (train-rm --ensemble's members, --sweep's trials:
    ``RUN/rm/members/member-1``) is named from the outer run: ``RUN/rm/members/member-1/rm``."""
    parts = stage.run_dir.resolve().parts
    nested = len(parts) >= 4 and parts[-3] == "rm" and parts[-2] in ("members", "trials")
    return f"{'/'.join(parts[-4:]) if nested else parts[-1]}/{stage.name}"


def _warn(name: str, what: str, e: BaseException) -> None:
    first = str(e).splitlines()[0] if str(e) else ""
    say(f"[yellow]warning:[/] --report-to {name}: {what}: {type(e).__name__}: {first} (metrics.jsonl has every "
        "metric; training goes on)")


def start(stage: Stage, step: int, cfg: Any) -> dict[str, Any]:
    """Open the trackers ``cfg.report_to`` names, with the resolved config (as the stage's config.yaml holds it)
    as the run's parameters, resuming the runs trackers.json recorded; rewrite it."""
    from . import config as config_mod

    names = requested(getattr(cfg, "report_to", None) or [])
    if not names:
        return {}
    path = stage.dir / RECORD
    params = config_mod.to_dict(config_mod.absolute_paths(cfg))
    saved = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    opened: dict[str, Any] = {}
    for name in names:
        try:
            with contextlib.redirect_stdout(sys.stderr):  # stdout is the command's result (a path, --json)
                opened[name] = ADAPTERS[name](run_name(stage), stage, params, step, saved.get(name, {}))
        except Exception as e:  # noqa: BLE001 - a tracker never ends training (module docstring)
            _warn(name, "could not start its run", e)
    atomic_write_text(path, json.dumps({**saved, **{n: t.record for n, t in opened.items()}}, indent=2) + "\n")
    return opened


def log(opened: dict[str, Any], record: dict) -> None:
    """Send one metrics line to every open tracker; one that fails is warned about and closed."""
    metrics, step = numbers(record), int(record["step"])
    for name, tracker in list(opened.items()):
        try:
            with contextlib.redirect_stdout(sys.stderr):
                tracker.log(metrics, step)
        except Exception as e:  # noqa: BLE001
            _warn(name, f"logging step {step} failed; no more metrics go to it", e)
            close({name: opened.pop(name)}, 1)


def close(opened: dict[str, Any], code: int) -> None:
    """Finish each run with the command's exit code (W&B, MLflow mark it failed or killed); an error here is
    a warning, never one that hides the error the stage is ending with."""
    for name, tracker in opened.items():
        try:
            with contextlib.redirect_stdout(sys.stderr):
                tracker.close(code)
        except Exception as e:  # noqa: BLE001
            _warn(name, "could not close its run", e)


@contextlib.contextmanager
def reporting(stage: Stage, step: int, cfg: Any) -> Iterator[Callable[[dict], None]]:
    """``with reporting(stage, step, cfg) as report: ... report(record)``: the trackers of the stage's config
    ``cfg`` from resume point ``step`` on (rank 0; a no-op elsewhere or when none is named), closed however the block ends, with the
    exit code it ends with (0, 128 + signal, 3 non-finite, 1 ...)."""
    opened = start(stage, step, cfg) if distributed.is_main() else {}
    code = 1
    try:
        yield (lambda record: log(opened, record)) if opened else (lambda record: None)
        code = 0
    except BaseException as e:
        code = e.code if isinstance(getattr(e, "code", None), int) else 130 if isinstance(e, KeyboardInterrupt) else 1
        raise
    finally:
        close(opened, code)
