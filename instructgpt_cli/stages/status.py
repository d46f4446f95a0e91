"""``igpt status [RUN_DIR]``: where a run directory stands, read without writing or locking anything in it.

One row per stage: the training stages (sft, rm, ppo) always, and every eval/NAME and compare/A-vs-B[.JUDGE]
result the run holds (or is writing). Its state is one of

- ``done``: completed (manifest), built from the inputs it records;
- ``stale``: completed, but a stage it was built from ran again since (``rundir.mark_stale``);
- ``running``: a live process holds its lock (``locks.holder``: pid and host, as a refused writer is told);
- ``interrupted``: stopped by a signal (``stopped_at_step``) or killed (the manifest says running, nobody
  holds the lock); ``--resume`` goes on;
- ``failed``: ended by an error (bad input, non-finite values, a failed write);
- ``missing``: never run.

Then when it ran: ``started`` (its latest start: a resume restarts the clock), ``ended`` (finished or stopped by
a signal; unknown after a kill) and the duration between them (up to now while it runs); an interrupted
stage's step it stopped at and the step ``--resume`` goes on from (the newest complete checkpoint's); a failed
stage's error and exit code, when the manifest records them. Then its step of the planned total (the newest
metrics line; ``total_steps`` in the manifest, which a training stage records when its steps begin), the last
headline metrics (sft: loss, held-out loss; rm: loss and accuracy, held-out too; ppo: score, KL, the
KL-penalised reward; dpo (when the run has it): loss, pair accuracy and margin; eval: mean score, KL to SFT, pretraining perplexity, alignment tax, RM accuracy; compare:
win rate and its 95% interval), and its outputs (``final/``, the newest complete checkpoint, a report).
Lineage: each model a stage was built from (the manifest's inputs, with their sha256) and the stage of this
run that made it; ``stale`` when that stage has run again since.

``--json`` prints the same as one object (keys stable; null where unknown)::

    {"run_dir": str, "igpt_version": str | null,
     "stages": {NAME: {"kind": "train" | "eval" | "compare", "state": str, "manifest_status": str | null,
                       "step": int | null, "total_steps": int | null, "stopped_at_step": int | null,
                       "resumes_from_step": int | null, "started": str | null, "ended": str | null,
                       "duration_s": number | null, "signal": str | null, "error": str | null,
                       "exit_code": int | null,
                       "metrics": {metric: number}, "holder": {"pid", "host", "command", "since"} | null,
                       "stale": reason | null, "outputs": {"final", "checkpoint", "report", "html": path | null}}},
     "lineage": [{"stage": NAME, "input": key, "from": stage | null, "source": path or model name,
                  "sha256": str | null, "stale": bool}]}

``state`` is the one to act on: done, stale, running, interrupted, failed or missing, as above.
``manifest_status`` is what manifest.json says, raw (completed, running, interrupted, failed): after a kill it
still says ``running`` while ``state`` is ``interrupted`` (nobody holds the lock), so a script must not read it
as a live run. ``started`` and ``ended`` are the manifest's ISO 8601 UTC times; ``duration_s`` is in seconds.
``resumes_from_step`` (an interrupted or failed training stage's): the step of the newest complete checkpoint,
which ``--resume`` goes on from (null when there is none: it starts afresh). ``signal``: the stop signal's name
(SIGTERM, ...). ``error`` and ``exit_code``: a failed stage's message and exit status, null where the manifest
does not record them (igpt records neither yet: a failed stage's entry says only ``failed``).

A stage writing while this reads is fine: the manifest and reports are replaced whole (atomic renames), and a
metrics line cut mid-write is skipped. Paths in the manifest may be absolute or relative to the run directory.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import sys
from pathlib import Path

from ..console import clock
from ..errors import BadInput
from ..locks import LOCK_DIR, holder
from ..rundir import complete_checkpoints, stored_path
from . import STAGES

# from the table of stages: the training stages in pipeline order; the ones listed only when the run has them
# (the paper's pipeline is sft, rm, ppo; dpo is not); the metrics each row shows; the stages that write reports
TRAINING = tuple(s.name for s in STAGES.values() if s.training)
OPTIONAL = tuple(s.name for s in STAGES.values() if s.training and not s.listed)
HEADLINE = {s.name: s.summary for s in STAGES.values() if s.summary}
REPORTS = tuple(s.name for s in STAGES.values() if s.summary and not s.training)


def run(run_dir: Path, as_json: bool = False) -> dict:
    """Read the run directory's state (:func:`read_status`) and print it: a table, or JSON on stdout."""
    status = read_status(Path(run_dir))
    try:
        if as_json:
            print(json.dumps(status, indent=2))
        else:
            show(status)
        sys.stdout.flush()
    except BrokenPipeError:
        # the reader left (``igpt status | head -1``): what it wanted it has, so that is no failure. stdout
        # goes to /dev/null so the interpreter's own flush at exit does not fail on the closed pipe again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return status


def read_status(run_dir: Path) -> dict:
    # 1. the manifest: without one, this is no run directory
    if not run_dir.is_dir():
        raise BadInput([f"{run_dir}: no such run directory"])
    try:
        manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInput([f"{run_dir}: not a run directory (no manifest.json)"]) from None
    except (OSError, ValueError) as e:
        raise BadInput([f"{run_dir / 'manifest.json'}: unreadable ({e})"]) from None
    entries = manifest.get("stages", {}) if isinstance(manifest, dict) else {}

    # 2. every stage: the training stages, then the reports recorded, on disk or being written
    names = [s for s in TRAINING if s not in OPTIONAL or s in entries or (run_dir / s).is_dir()]
    names += sorted(set(report_names(run_dir, entries)))
    stages = {name: stage_status(run_dir, name, entries.get(name)) for name in names}

    # 3. lineage: what each stage was built from
    lineage = [row for name, entry in entries.items() for row in lineage_rows(run_dir, name, entry, entries)]
    return {"run_dir": str(run_dir), "igpt_version": manifest.get("igpt_version"), "stages": stages,
            "lineage": lineage}


def report_names(run_dir: Path, entries: dict) -> list[str]:
    """``eval/NAME`` and ``compare/A-vs-B[.JUDGE]`` of the manifest, of the folders holding a report.json,
    and of the locks held now (a first report being written)."""
    names = [n for n in entries if n.split("/")[0] in REPORTS]
    for kind in REPORTS:
        if (run_dir / kind).is_dir():
            names += [f"{kind}/{p.name}" for p in (run_dir / kind).iterdir()
                      if not p.name.startswith(".") and (p / "report.json").is_file()]
    if (run_dir / LOCK_DIR).is_dir():
        for lock in (run_dir / LOCK_DIR).glob("*.lock"):
            kind, _, rest = lock.stem.partition("--")
            if kind in REPORTS and rest:
                names.append(f"{kind}/{rest}")
    return names


def stage_status(run_dir: Path, name: str, entry: dict | None) -> dict:
    """One stage's row: state, step of total, headline metrics, outputs, the lock's holder."""
    kind = "train" if name in TRAINING else name.split("/")[0]
    entry = entry or {}
    status = entry.get("status")
    held = holder(run_dir, name)
    out = run_dir / name
    if kind == "train":
        step, metrics = newest_metrics(out / "metrics.jsonl", HEADLINE[name])
        present = out.is_dir() and any(out.iterdir())
    else:
        step, metrics = None, report_metrics(out / "report.json", HEADLINE[kind])
        present = (out / "report.json").is_file()
    if held is not None:
        state = "running"
    elif kind != "train":  # a report is published whole, then recorded: there or not
        state = ("stale" if entry.get("stale") else "done") if present else "missing"
    elif status == "running" or (status is None and present):
        state = "interrupted"  # killed: the manifest still says running, and nobody holds the lock
    elif status in ("interrupted", "failed"):
        state = status
    elif status == "completed" and present:
        state = "stale" if entry.get("stale") else "done"
    else:
        state = "missing"
    total = entry.get("total_steps") or (entry.get("steps") if status == "completed" else None)
    found = outputs(run_dir, out, kind, entry)
    started, ended, seconds = run_times(entry, state)
    return {"kind": kind, "state": state, "manifest_status": status, "step": step if kind == "train" else None,
            "total_steps": total if kind == "train" else None, "stopped_at_step": entry.get("stopped_at_step"),
            "resumes_from_step": (checkpoint_step(found["checkpoint"])
                                  if kind == "train" and state in ("interrupted", "failed") else None),
            "started": started, "ended": ended, "duration_s": seconds, "signal": entry.get("signal"),
            "error": entry.get("error"), "exit_code": entry.get("exit_code"),
            "metrics": metrics, "holder": held, "stale": entry.get("stale"), "outputs": found}


def checkpoint_step(path: str | None) -> int | None:
    """The step a checkpoint folder (``.../step-000800``) holds, or None without one."""
    return int(Path(path).name.rpartition("-")[2]) if path else None


def run_times(entry: dict, state: str) -> tuple[str | None, str | None, float | None]:
    """When the stage's latest run started and ended (the manifest's ISO 8601 times) and the seconds between,
    up to now while it runs. An end older than the start belongs to an earlier run (a resume records a new
    start only), so this run's end is unknown: killed, or still going."""
    started, ended = entry.get("started"), entry.get("finished") or entry.get("stopped")
    try:
        start = _dt.datetime.fromisoformat(started) if started else None
        end = _dt.datetime.fromisoformat(ended) if ended and state != "running" else None
    except (TypeError, ValueError):
        return started, ended, None
    if start and end and end < start:
        ended, end = None, None
    if start and state == "running":
        end = _dt.datetime.now(start.tzinfo or _dt.timezone.utc)
    return started, ended if state != "running" else None, (end - start).total_seconds() if start and end else None


def newest_metrics(path: Path, names: tuple[str, ...]) -> tuple[int | None, dict]:
    """The step of the newest metrics line and the newest value of each of ``names`` (held-out metrics are
    logged every few steps only). A line that does not parse (cut by a kill, or being written) is skipped."""
    step, found = None, {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None, {}
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict):
            continue
        step = record.get("step", step)
        found.update({k: record[k] for k in names if k in record})
    return step, {k: found[k] for k in names if k in found}


def report_metrics(path: Path, names: tuple[str, ...]) -> dict:
    """The headline numbers of a report.json ({} while none is there: a report being published is briefly
    absent)."""
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: report[k] for k in names if report.get(k) is not None}


def outputs(run_dir: Path, out: Path, kind: str, entry: dict) -> dict:
    """The stage's ``final/`` and newest complete checkpoint, or the report (and compare's page)."""
    if kind == "train":
        final = out / "final"  # the layout's (an older igpt recorded it relative to its working directory)
        checkpoints = complete_checkpoints(out / "checkpoints")
        found = {"final": str(final) if final.is_dir() else None,
                 "checkpoint": str(checkpoints[-1]) if checkpoints else None, "report": None, "html": None}
        if entry.get("best") and (out / "best").is_dir():  # ppo --watch: the policy at the best gold (ppo@best)
            found["best"] = str(out / "best")
        return found
    report, html = out / "report.json", out / "report.html"
    return {"final": None, "checkpoint": None, "report": str(report) if report.is_file() else None,
            "html": str(html) if html.is_file() else None}


def lineage_rows(run_dir: Path, name: str, entry: dict, entries: dict) -> list[dict]:
    """The models ``name`` was built from: each model input (a directory by path and weights sha256, or a
    model name such as ``tiny``), the stage of this run whose ``final/`` it is, and whether it is stale: the
    manifest's mark names it (``rundir.mark_stale``), or that stage's output now has other weights than
    those recorded. Data files (demonstrations, prompts) are inputs too, but no lineage."""
    rows = []
    finals = {s: (run_dir / s / "final").resolve() for s in TRAINING}
    reason = entry.get("stale") or ""
    for key, source in (entry.get("inputs") or {}).items():
        if isinstance(source, str):  # a model by name: the base model
            rows.append({"stage": name, "input": key, "from": None, "source": source, "sha256": None, "stale": False})
            continue
        if not (isinstance(source, dict) and source.get("path")):
            continue
        path = stored_path(run_dir, source["path"]).resolve()
        made_by = next((s for s, final in finals.items() if path == final or final in path.parents), None)
        if made_by is None and not path.is_dir():
            continue  # a data file
        sha = source.get("sha256")
        now = ((entries.get(made_by) or {}).get("outputs") or {}).get("sha256") if made_by else None
        changed = made_by is not None and path == finals[made_by] and None not in (now, sha) and now != sha
        rows.append({"stage": name, "input": key, "from": made_by, "source": str(path), "sha256": sha,
                     "stale": f"its input {key} (" in reason or changed})
    return rows


def show(status: dict) -> None:
    """The stages and the lineage as two tables on stdout. Nothing is cut: in a file or a pipe each row is one
    line as wide as it needs (a log keeps whole paths to copy), and a narrow terminal folds a cell rather than
    ending it with "…". No line ends in spaces. Rendered first, then written in one go: rich's own answer to a
    closed pipe is exit 1, and :func:`run` treats a reader that left as no failure."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    colours = {"done": "green", "running": "cyan", "stale": "yellow", "interrupted": "yellow", "failed": "red",
               "missing": "dim"}
    out = Console(soft_wrap=False)
    if not out.is_terminal:
        out = Console(soft_wrap=False, width=100_000)  # a table only as wide as its cells: no wrap, no cut
    table = Table(title=f"igpt status {escape(status['run_dir'])}", title_justify="left")
    for col in ("stage", "state", "stale", "step", "started", "ended", "duration", "last metrics", "outputs"):
        table.add_column(col, justify="right" if col in ("step", "duration") else "left", overflow="fold")
    for name, s in status["stages"].items():
        step = "" if s["step"] is None else f"{s['step']}" + (f" of {s['total_steps']}" if s["total_steps"] else "")
        metrics = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in s["metrics"].items())
        paths = "\n".join(escape(str(p)) for p in s["outputs"].values() if p)
        table.add_row(name, f"[{colours[s['state']]}]{s['state']}[/]" + escape(state_detail(s)),
                      escape(s["stale"] or ""), step, when(s["started"]), when(s["ended"]),
                      "" if s["duration_s"] is None else clock(s["duration_s"]), metrics, paths)
    with out.capture() as shown:
        out.print(table)
        if status["lineage"]:
            lineage = Table(title="lineage: what each stage was built from", title_justify="left")
            for col in ("stage", "input", "from", "sha256", "stale"):
                lineage.add_column(col, overflow="fold")
            for row in status["lineage"]:
                lineage.add_row(row["stage"], row["input"], row["from"] or escape(row["source"]),
                                (row["sha256"] or "")[:12], "[yellow]stale[/]" if row["stale"] else "")
            out.print(lineage)
    sys.stdout.write("".join(line.rstrip() + "\n" for line in shown.get().splitlines()))


def state_detail(s: dict) -> str:
    """What follows the state in the table: who runs it, where an interrupted stage stopped and goes on from,
    why a failed one failed."""
    if s["holder"]:
        h = s["holder"]
        return f" (pid {h.get('pid')} on {h.get('host')}, since {h.get('since')})"
    if s["state"] == "interrupted":
        at = s["stopped_at_step"] if s["stopped_at_step"] is not None else s["step"]
        how = f" by {s['signal']}" if s["signal"] and s["stopped_at_step"] is not None else ""
        go_on = (f"resumes from step {s['resumes_from_step']}" if s["resumes_from_step"] is not None
                 else "resumes from the start")
        return f" at step {at}{how}; {go_on}" if at is not None else f"; {go_on}"
    if s["state"] == "failed":
        parts = [f"exit {s['exit_code']}" if s["exit_code"] is not None else "", s["error"] or ""]
        why = f" ({': '.join(p for p in parts if p)})" if any(parts) else ""
        return why + (f"; resumes from step {s['resumes_from_step']}" if s["resumes_from_step"] is not None else "")
    return ""


def when(iso: str | None) -> str:
    """A manifest time as ``2026-12-07 02:10:33`` (UTC, as recorded), '' when unknown."""
    return iso.replace("T", " ").removesuffix("+00:00") if iso else ""
