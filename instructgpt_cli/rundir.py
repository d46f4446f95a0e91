"""The run directory: layout, manifest, atomic checkpoints, metrics and resume.

```
runs/NAME/manifest.json
runs/NAME/<stage>/config.yaml  metrics.jsonl  checkpoints/step-000120/{...,COMPLETED}  final/
```
A checkpoint is written under a temporary name, fsynced, renamed, then marked ``COMPLETED``, which records
the size and sha256 of every file in it (``final/`` gets the same record); resume takes the newest complete
one that still matches its record and drops the metrics logged after it. Torch is not imported here.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, NamedTuple

from .errors import BadInput, WriteFailed
from .storage import (COMPLETED, atomic_write_text, disk_errno, fsync_tree, now, publish_dir, seal_dir,
                      verify_dir, weights_sha256)

CHECKPOINT_PREFIX = "step-"



# ---------------------------------------------------------------- manifest


def read_manifest(run_dir: Path) -> dict:
    path = run_dir / "manifest.json"
    if not path.exists():
        return {"igpt_version": _version(), "stages": {}}
    return json.loads(path.read_text(encoding="utf-8"))


def update_manifest(run_dir: Path, stage: str, **fields: Any) -> None:
    """Merge ``fields`` into ``stages[stage]`` of ``manifest.json`` (atomic rewrite). The paths of inputs and
    outputs are stored as :func:`portable` paths."""
    if "inputs" in fields:
        fields["inputs"] = {k: {**v, "path": portable(run_dir, v["path"])} if isinstance(v, dict) and v.get("path")
                            else v for k, v in fields["inputs"].items()}
    if "outputs" in fields:
        fields["outputs"] = {k: portable(run_dir, v) if k in ("final", "report") else v
                             for k, v in fields["outputs"].items()}
    manifest = read_manifest(run_dir)
    manifest["igpt_version"] = _version()
    manifest.setdefault("stages", {}).setdefault(stage, {}).update(fields)
    atomic_write_text(run_dir / "manifest.json", json.dumps(manifest, indent=2) + "\n")


def portable(run_dir: Path, path: str | Path) -> str:
    """A path as the manifest stores it: relative to the run directory when it lies inside (so it still
    resolves after the run directory is moved or copied), else absolute (so it resolves from any working
    directory). :func:`stored_path` reads it back."""
    path, root = Path(path).resolve(), Path(run_dir).resolve()
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def stored_path(run_dir: Path, stored: str) -> Path:
    """A manifest path (:func:`portable`, or an absolute one an older igpt wrote) as a usable path."""
    return Path(stored) if Path(stored).is_absolute() else Path(run_dir) / stored


def file_input(path: str | Path, split: str | None = None, columns: list | None = None) -> dict:
    """A manifest ``inputs`` entry: resolved path (a hub dataset id's local snapshot) and sha256 (of every file
    of a directory), and how a dataset was read (``split``, ``columns``) when the stage has those settings."""
    from .sources import input_sha256

    where, digest = input_sha256(path)
    how = {} if split is None else {"split": split, "columns": list(columns or [])}
    return {"path": str(where.resolve()), "sha256": digest, **how, **content_size(where)}


def content_size(path: Path) -> dict:
    """What an input file holds, for people (a changed-input refusal says ``20 -> 21 records``): ``records`` (the
    non-blank lines of a JSONL file), ``files`` (of a directory) and ``bytes``; {} where it cannot be read."""
    try:
        if path.is_dir():
            files = [p for p in path.rglob("*") if p.is_file()]
            return {"files": len(files), "bytes": sum(p.stat().st_size for p in files)}
        data = path.read_bytes()
    except OSError:
        return {}
    records = {"records": sum(1 for line in data.splitlines() if line.strip())} if path.suffix == ".jsonl" else {}
    return {**records, "bytes": len(data)}


def model_input(source: str | Path) -> dict | str:
    """A manifest ``inputs`` entry for a model: a directory's resolved path and weights sha256
    (:func:`weights_sha256`), which lineage compares with the producing stage's output; a name
    (``tiny``, ``smollm2-135m``) as it is."""
    path = Path(source)
    if not path.is_dir():
        return str(source)
    return {"path": str(path.resolve()), "sha256": weights_sha256(path)}


def mark_stale(run_dir: Path, stage: str, sha: str | None = None, clear: bool = True) -> None:
    """Lineage: flag every manifest entry whose inputs include ``stage``'s ``final/``, ``checkpoints/`` or
    ``best/`` (``ppo --watch``'s best point) or ``members/`` (train-rm --ensemble's) or a folder in them
    (``compare ppo@step-N`` reads a checkpoint). While ``stage`` runs again (``sha`` None) they
    are all ``stale``; when it completes with weights ``sha``, those built from exactly these weights (a
    deterministic re-run) are fresh again. ``clear`` False: those built from weights ``sha`` are left as they are
    (a run that begins while its old final/ is kept neither condemns nor clears them)."""
    manifest = read_manifest(run_dir)
    final = (run_dir / stage / "final").resolve()
    outputs = (final, *((run_dir / stage / part).resolve() for part in ("checkpoints", "best", "members")))
    changed = False
    for name, entry in manifest.get("stages", {}).items():
        if name == stage:
            continue
        for key, source in entry.get("inputs", {}).items():
            if not (isinstance(source, dict) and source.get("path")):
                continue
            path = stored_path(run_dir, source["path"]).resolve()
            if not any(path == out or out in path.parents for out in outputs):
                continue
            if sha is not None and path.exists() and source.get("sha256") == (
                    sha if path == final else weights_sha256(path)):
                changed |= clear and entry.pop("stale", None) is not None
            else:
                entry["stale"] = f"its input {key} ({path}) is the output of {stage}, re-run on {now()}"
                changed = True
    if changed:
        atomic_write_text(run_dir / "manifest.json", json.dumps(manifest, indent=2) + "\n")


def record_report(run_dir: Path, out: Path, models: dict[str, Path]) -> None:
    """A report's manifest entry (``eval/NAME``, ``compare/A-vs-B``): the weights of each model it judged
    (lineage: a later re-run of the stage that made one marks the report stale)."""
    update_manifest(run_dir, out.relative_to(run_dir).as_posix(), status="completed", finished=now(),
                    inputs={k: model_input(p) for k, p in models.items()}, outputs={"report": str(out / "report.json")})


def _version() -> str:
    from . import __version__

    return __version__


# ---------------------------------------------------------------- stage directories


def stage_state(stage_dir: Path, status: str | None = None) -> str:
    """'empty' (nothing there), 'done' (final/ written after the newest checkpoint) or 'partial' (outputs but
    no final, or checkpoints newer than final/, or a manifest ``status`` that says the newest run of the stage
    did not finish: an --overwrite run that stopped before it replaced final/, even before its first
    checkpoint, or a run stopped between writing final/ and recording it)."""
    if not stage_dir.exists() or not any(stage_dir.iterdir()):
        return "empty"
    final = stage_dir / "final"
    if not final.exists() or status in ("running", "interrupted", "failed"):
        return "partial"
    written = final.stat().st_mtime_ns
    newer = [c for c in complete_checkpoints(stage_dir / "checkpoints") if c.stat().st_mtime_ns > written]
    return "partial" if newer else "done"


def check_stage(stage_dir: Path, resume: bool, overwrite: bool, status: str | None = None) -> str:
    """Decide what a stage run does with existing outputs, before anything is written.

    Returns 'fresh', 'resume' or 'done'. A stage with outputs and neither flag is refused (BadInput):
    igpt never silently clobbers a run.
    """
    if resume and overwrite:
        raise BadInput(["--resume and --overwrite exclude each other"])
    state = stage_state(stage_dir, status)
    if state == "empty" or overwrite:
        return "fresh"
    if not resume:
        raise BadInput([f"{stage_dir}: already has outputs ({'finished' if state == 'done' else 'unfinished'} run); "
                        "pass --resume to continue it or --overwrite to start over"])
    return "done" if state == "done" else "resume"


def start_stage_dir(stage_dir: Path, mode: str) -> None:
    """Create the stage directory, clearing it for a fresh start over old outputs except ``final/``: the old
    model stays usable until the new one replaces it whole (``storage.building``), so an --overwrite run that
    fails (a full disk, a stop) leaves the previous final/ in place."""
    if mode == "fresh" and stage_dir.exists():
        for old in stage_dir.iterdir():
            if old.name != "final":
                shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    stage_dir.mkdir(parents=True, exist_ok=True)


# ---------------------------------------------------------------- checkpoints


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:06d}"


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints (marked COMPLETED), oldest first."""
    if not ckpt_root.exists():
        return []
    found = [p for p in ckpt_root.iterdir()
             if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and (p / COMPLETED).exists()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def latest_checkpoint(ckpt_root: Path, warn: Callable[[str], None] | None = None) -> Path | None:
    """The newest complete checkpoint that matches its ``COMPLETED`` record (:func:`verify_dir`), or None
    when there is none. Each damaged newer one is told to ``warn`` in one line (its first problem) and left
    in place for the user to look at; the resumed run replaces it when it reaches that step again. BadInput
    when every complete checkpoint is damaged: starting afresh silently would throw the work away."""
    damaged: list[tuple[Path, str]] = []
    for ckpt in reversed(complete_checkpoints(ckpt_root)):
        problems = verify_dir(ckpt)
        if not problems:
            for bad, problem in damaged:
                if warn is not None:
                    warn(f"{bad} is damaged ({problem}); resuming from {ckpt.name}")
            return ckpt
        damaged.append((ckpt, problems[0]))
    if damaged:
        raise BadInput([f"{bad} is damaged ({problem})" for bad, problem in damaged]
                       + [f"{ckpt_root}: no intact checkpoint to resume from; pass --overwrite to start over"])
    return None


def begin_checkpoint(ckpt_root: Path, step: int) -> Path:
    """A fresh temporary folder for the checkpoint of ``step`` (several processes may write into it)."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_root / f".tmp-{checkpoint_name(step)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def publish_checkpoint(ckpt_root: Path, tmp: Path, step: int, keep: int) -> Path:
    """fsync the written ``tmp``, rename it to ``step-NNNNNN``, mark it COMPLETED (:func:`seal_dir`) and
    prune old ones."""
    final = ckpt_root / checkpoint_name(step)
    fsync_tree(tmp)
    publish_dir(tmp, final)
    seal_dir(final)
    # newer ones are left by the run this one resumed before them (damaged: latest_checkpoint); they are
    # replaced when this run reaches their step, and do not count towards ``keep``
    older = [p for p in complete_checkpoints(ckpt_root) if int(p.name[len(CHECKPOINT_PREFIX):]) <= step]
    for old in older[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


# ---------------------------------------------------------------- metrics


def append_jsonl(path: Path, record: dict) -> None:
    """Append one line; a failed write cuts the file back to its previous end (no half line)."""
    with open(path, "a", encoding="utf-8") as fh:
        end = fh.tell()
        try:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
        except OSError as e:
            with contextlib.suppress(OSError):
                fh.truncate(end)
            code = disk_errno(e, path)
            if code is not None:
                raise WriteFailed(str(path), code) from e
            raise


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics logged after ``step`` (they belong to work the resumed run redoes)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
    atomic_write_text(path, "".join(k + "\n" for k in kept))


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def find_model(explicit: str, run_dir: Path, stage: str, flag: str) -> str:
    """``explicit`` if given, else the ``stage``'s final model in the run directory; BadInput if neither."""
    if explicit:
        return explicit
    final = run_dir / STAGE_MODELS[stage]
    if (final / "config.json").is_file():
        return str(final)
    command = {"rm": "train-rm"}.get(stage, stage)
    raise BadInput([f"{flag}: not given, and {final} does not exist (run `igpt {command}` first or pass {flag} PATH)"])


STAGE_MODELS = {"sft": "sft/final", "ppo": "ppo/final/policy", "rm": "rm/final", "dpo": "dpo/final",
                "ppo_ema": "ppo/final/policy_ema"}  # with --ema-decay: the EMA of the PPO policy's weights


BEST = "ppo@best"  # the policy at the best gold point of ``igpt ppo --watch`` (ppo/best/)


def stage_model(name: str, run_dir: Path, flag: str = "MODEL") -> tuple[str, Path]:
    """A model named by stage (``sft``, ``ppo``, ``ppo@best``) or by path -> (short name, directory); BadInput if
    absent."""
    if name == BEST:
        path = run_dir / "ppo" / "best"
        if not (path / "config.json").is_file():
            raise BadInput([f"{flag} {name}: {path} does not exist (ppo keeps its best point there when it runs with "
                            "--watch)"])
        return "ppo-best", path
    if name in STAGE_MODELS:
        path = run_dir / STAGE_MODELS[name]
        if not (path / "config.json").is_file():
            raise BadInput([f"{flag} {name}: {path} does not exist (has the {name} stage of {run_dir} finished"
                            + (" with --ema-decay > 0" if name == "ppo_ema" else "") + "?)"])
        return name, path
    path = Path(name)
    if not (path / "config.json").is_file():
        raise BadInput([f"{flag} {name}: not a stage of the run ({', '.join(STAGE_MODELS)}) nor a model directory "
                        "with config.json"])
    return [part for part in path.resolve().parts if part not in ("final", "policy")][-1], path


class Stage(NamedTuple):
    """Where a training stage writes: ``run_dir/name/{config.yaml, metrics.jsonl, checkpoints/, final/}``."""

    run_dir: Path
    name: str

    @property
    def dir(self) -> Path:
        return self.run_dir / self.name

    @property
    def metrics(self) -> Path:
        return self.dir / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.dir / "checkpoints"

    @property
    def final(self) -> Path:
        return self.dir / "final"
