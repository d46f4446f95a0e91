"""A training stage's life in its run directory, around the training itself: opening it (the stage's lock,
fresh / resume / done, and what a resume would change), beginning it (config and inputs recorded, later
stages marked stale), stopping it on a signal between steps with a checkpoint, and finishing it (its output's
hash recorded). Stop signals: SIGTERM and SIGUSR1 (what Slurm and Kubernetes send before the kill) and SIGINT
end a stage between optimizer steps (PPO: iterations) once training has begun (``signals.py``). README,
"Failure and recovery"."""
from __future__ import annotations

import os
import shlex
import socket
import sys
from pathlib import Path
from typing import Any

from . import config as config_mod
from . import cpus, distributed, locks, signals, trackers
from .console import say
from .errors import BadInput, Interrupted
from .presets import saved_config
from .rundir import (CHECKPOINT_PREFIX, Stage, check_stage, checkpoint_name, complete_checkpoints, content_size,
                     mark_stale, read_manifest, start_stage_dir, stored_path, update_manifest)
from .storage import atomic_write_text, now, weights_sha256

def open_stage(stage: Stage, cfg: Any, inputs: dict, resume: bool, overwrite: bool,
               allow_changes: bool = False) -> tuple[str, list[dict]]:
    """Before any model is loaded: take the stage's lock (one writer per stage directory), decide between
    'fresh', 'resume' and 'done' (:func:`rundir.check_stage`), and for a stage that has outputs compare this
    run's settings and inputs with the ones it recorded (:func:`resume_changes`).

    A resume that would change what a step computes is refused (BadInput, every difference listed) unless
    ``allow_changes``; the changes are returned for :func:`restore` to record with the step they take effect.
    A finished stage is 'done' unless its length grew (``--resume --max-steps N``: 'resume' extends it). A
    ``--max-steps`` below the step the run has reached is refused (:func:`check_not_behind`)."""
    trackers.check(getattr(cfg, "report_to", []))  # a missing tracker library: exit 2 before the lock's file
    locks.check_writable(stage.run_dir)
    locks.take(stage.run_dir, stage.name, str(stage.dir))
    if distributed.is_main():
        locks.settle_statuses(stage.run_dir)
    status = read_manifest(stage.run_dir).get("stages", {}).get(stage.name, {}).get("status")
    mode = check_stage(stage.dir, resume, overwrite, status)
    if mode == "fresh":
        return mode, []
    changes = resume_changes(stage, cfg, inputs)
    if mode == "done" and not any(c["setting"] in config_mod.EXTENDS for c in changes):
        stale = [c for c in changes if c["setting"].startswith("input ")]
        if stale:  # a finished stage built from an input that has changed since
            say(f"[yellow]warning:[/] {stage.dir} was built from inputs that changed since: "
                + "; ".join(describe_change(c) for c in stale) + "; rebuild it with --overwrite")
        other = [c for c in changes if not c["free"] and not c["setting"].startswith("input ")]
        if other:  # asked for with other settings (--ensemble 3 of a single model): nothing done, said so
            say(f"[yellow]warning:[/] {stage.dir} is finished, built with other settings than these: "
                + "; ".join(describe_change(c) for c in other) + "; nothing is redone (--overwrite rebuilds it)")
        return "done", []
    check_not_behind(stage, cfg)
    binding = [c for c in changes if not c["free"]]
    if binding and not allow_changes:
        raise BadInput([f"{stage.dir}: --resume would continue with other settings or inputs than the run so far:"]
                       + [f"  {describe_change(c)}" for c in binding]
                       + ["pass --allow-changes to continue anyway (recorded in the manifest with the step), or "
                          "--overwrite to start over"])
    for c in changes:
        say(f"resume: {describe_change(c)}")
    return "resume", changes


def check_not_behind(stage: Stage, cfg: Any) -> None:
    """Refuse a resume whose ``max_steps`` is below the newest checkpoint's step: training cannot go back, so
    it would export that later step under a length it exceeds (``igpt status``: "190 of 40"). Equal is
    allowed: it ends the run at the step it has reached."""
    done = complete_checkpoints(stage.checkpoints)
    reached = int(done[-1].name[len(CHECKPOINT_PREFIX):]) if done else 0
    if 0 < cfg.max_steps < reached:
        raise BadInput([f"{stage.dir}: --max-steps {cfg.max_steps} is below the step this run has reached, "
                        f"{reached} ({stage.checkpoints / done[-1].name}), and a resume cannot go back: pass "
                        f"--max-steps {reached} to end it there, a larger value to train on, or --overwrite to "
                        f"start over"])


def describe_change(change: dict) -> str:
    """One line for a resume change: ``lr: 1e-05 -> 2e-05``; for an input whose content changed, the file and
    what differs (``input data: /d/demos.jsonl: content changed since the run began (20 -> 21 records, 1.9 kB ->
    2.1 kB; sha256 1a2b3c4d -> 5e6f7a8b)``) rather than two bare hashes. A manifest from an igpt that recorded no
    size says only what the input holds now."""
    if change.get("path"):
        path, began = change["path"], change.get("began_with")
        what = ("content changed since the run began" if began in (None, str(Path(path).resolve()))
                else f"other content than {began}, which the run began with")
        sizes = size_change(change.get("was_size") or {}, content_size(Path(path)))
        return (f"{change['setting']}: {path}: {what} ({sizes}sha256 {str(change['was'])[:8]} -> "
                f"{str(change['now'])[:8]})")
    return f"{change['setting']}: {change['was']!r} -> {change['now']!r}"


def size_change(was: dict, now: dict) -> str:
    """``20 -> 21 records, 1.9 kB -> 2.1 kB; `` from two :func:`rundir.content_size` records (``now 21 records,
    2.1 kB; `` when the first is unknown: a manifest from an igpt that recorded none); '' when nothing is known."""
    parts = []
    for key in ("records", "files", "bytes"):
        if key in now:
            if key == "bytes":
                value = f"{now[key] / 1000:.1f} kB"
                before = f"{was[key] / 1000:.1f} kB -> " if key in was else ""
            else:
                value, before = f"{now[key]} {key}", (f"{was[key]} -> " if key in was else "")
            parts.append(before + value)
    if not parts:
        return ""
    return ("" if was else "now ") + ", ".join(parts) + "; "


def resume_changes(stage: Stage, cfg: Any, inputs: dict) -> list[dict]:
    """Settings and inputs of this run that differ from what ``stage`` recorded when it started: one
    ``{setting, was, now, free}`` each. ``free`` settings (config.FREE_ON_RESUME) decide when to save,
    evaluate and stop or where to run, not what a step computes. Inputs are compared by content (sha256),
    so a data file moved elsewhere is no change; a file path setting is compared through its input."""
    changes: list[dict] = []
    recorded = saved_config(stage.dir)
    old = _flatten(config_mod.to_dict(recorded)) if recorded is not None else {}
    new = _flatten(config_mod.to_dict(config_mod.absolute_paths(cfg)))
    for key in sorted(set(old) | set(new)):
        if key in config_mod.INPUT_SETTINGS or old.get(key) == new.get(key):
            continue
        changes.append({"setting": key, "was": old.get(key), "now": new.get(key),
                        "free": key in config_mod.FREE_ON_RESUME})
    before = read_manifest(stage.run_dir).get("stages", {}).get(stage.name, {}).get("inputs", {})
    for key in sorted(set(before) | set(inputs)):
        hashed = all(isinstance(x, dict) and x.get("sha256") for x in (before.get(key), inputs.get(key)))
        was, now_ = (_identity(before.get(key), hashed), _identity(inputs.get(key), hashed))
        if was != now_:
            change = {"setting": f"input {key}", "was": was, "now": now_, "free": False}
            if hashed:  # other content: describe_change names the files and says what this one holds now
                began = before[key].get("path")  # as the manifest stores it: maybe relative to the run directory
                change.update(path=inputs[key]["path"],
                              began_with=str(stored_path(stage.run_dir, began).resolve()) if began else None,
                              was_size={k: before[key][k] for k in ("records", "files", "bytes") if k in before[key]})
            changes.append(change)
    return changes


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _identity(entry: Any, hashed: bool) -> Any:
    """What an input is, for comparison: its sha256 when both sides recorded one, else where it came from (a
    resolved path, or a model name), as an igpt before the hashes recorded it."""
    if hashed:
        return entry["sha256"]
    where = entry.get("path") if isinstance(entry, dict) else entry
    return str(Path(where).resolve()) if isinstance(where, str) and Path(where).exists() else where


def begin_stage(stage: Stage, mode: str, cfg: Any, inputs: dict) -> None:
    """Create the stage directory and record the resolved config and the inputs in the manifest.
    Called only after every input has been validated: the first barrier waits until every rank has
    validated (and so could still fail with nothing written), the second until the files exist.
    Stages built from this one's checkpoints are marked stale (:func:`rundir.mark_stale`: they are cleared); those
    built from its ``final/`` only if it is not kept (an ``--overwrite`` run keeps it until the new one is whole,
    so a run that fails leaves them as fresh as they were)."""
    distributed.barrier()
    if distributed.is_main():
        kept = ((read_manifest(stage.run_dir).get("stages", {}).get(stage.name, {}).get("outputs") or {}).get("sha256")
                if (stage.final / "config.json").is_file() or (stage.final / "policy" / "config.json").is_file()
                else None)
        start_stage_dir(stage.dir, mode)
        atomic_write_text(stage.dir / "config.yaml", config_mod.to_yaml(stage.name, config_mod.absolute_paths(cfg)))
        update_manifest(stage.run_dir, stage.name, status="running", started=now(), inputs=inputs,
                        pid=os.getpid(), host=socket.gethostname(), threads=cpus.current())
        mark_stale(stage.run_dir, stage.name, kept, clear=False)
    distributed.barrier()


def stop(stage: Stage, step: int, total_steps: int, signum: int) -> None:
    """End a stage on a stop signal, its checkpoint of ``step`` written: manifest 'interrupted', how to
    resume on stderr, and :class:`Interrupted` (exit 128 + signal)."""
    import signal

    name = signal.Signals(signum).name
    if distributed.is_main():
        update_manifest(stage.run_dir, stage.name, status="interrupted", stopped=now(), stopped_at_step=step,
                        signal=name)
    say(f"{stage.name}: stopped by {name} after step {step} of {total_steps}; checkpoint {checkpoint_name(step)} "
        f"is complete. Resume with: {resume_command()}")
    stopped = Interrupted(signum)
    stopped.said = True
    raise stopped


def resume_command() -> str:
    """This command line with ``--resume`` (and without ``--overwrite``)."""
    if distributed.world_size() > 1:
        return "the same launcher command with --resume"
    args = [a for a in sys.argv[1:] if a != "--overwrite"]
    return shlex.join(["igpt", *args, *([] if "--resume" in args else ["--resume"])])


def finish_stage(stage: Stage, steps: int, **outputs: Any) -> None:
    """Mark the stage completed (rank 0, after it wrote ``final/``) with the sha256 of its weights, which
    later stages record as their input (lineage); every rank returns after that. A stop signal that came
    while ``final/`` was written ends the command now (the stage is complete)."""
    if distributed.is_main():
        sha = weights_sha256(stage.final)
        update_manifest(stage.run_dir, stage.name, status="completed", finished=now(), steps=steps,
                        outputs={"final": str(stage.final), "sha256": sha, **outputs})
        mark_stale(stage.run_dir, stage.name, sha)
    distributed.barrier()
    signals.undefer()
    signals.check_stop()
