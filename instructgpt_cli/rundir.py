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
import datetime as _dt
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import BadInput, WriteFailed

COMPLETED = "COMPLETED"
CHECKPOINT_PREFIX = "step-"


def fsync_tree(path: Path) -> None:
    """fsync every file under ``path`` and the directories themselves, so a rename publishes whole data."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(root))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# errno values that mean "the storage failed", not "igpt has a bug": exit 4 (errors.WriteFailed)
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG}


def disk_errno(exc: BaseException, where: Path | None = None) -> int | None:
    """The storage errno behind ``exc``, if it is a failed write: an OSError with one of DISK_ERRNOS, or
    what safetensors ("... (os error 28)") and torch.save (RuntimeError "unexpected pos" or "file write
    failed", no errno at all: ENOSPC when the file system of ``where`` has under 1 MiB free, else EIO)
    make of one."""
    if isinstance(exc, OSError):
        return exc.errno if exc.errno in DISK_ERRNOS else None
    text = str(exc)
    for code in DISK_ERRNOS:
        if f"(os error {code})" in text:
            return code
    if isinstance(exc, RuntimeError) and ("write failed" in text or "unexpected pos" in text):
        probe = where
        while probe is not None and not probe.exists() and probe != probe.parent:
            probe = probe.parent
        with contextlib.suppress(OSError):
            if probe is not None and shutil.disk_usage(probe).free < 1 << 20:
                return errno.ENOSPC
        return errno.EIO
    return None


@contextlib.contextmanager
def writing(target: Path, partial: Path | None = None) -> Iterator[None]:
    """Writes towards ``target`` (a file or folder), building ``partial`` (default: ``target``): if they
    fail, ``partial`` is removed; a failure of the storage (full disk, I/O error) becomes
    :class:`errors.WriteFailed` naming ``target`` (exit 4), anything else is raised as it is."""
    try:
        yield
    except BaseException as e:
        code = disk_errno(e, target.parent) if isinstance(e, Exception) else None  # before freeing the space
        _remove(partial if partial is not None else target)
        if code is not None:
            raise WriteFailed(str(target), code) from e
        raise


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a fsynced temporary file and a rename (a failed write leaves ``path``
    as it was and no temporary file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}"
    with writing(path, tmp):
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    _fsync_dir(path.parent)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_sha256(model_dir: str | Path) -> str | None:
    """One sha256 for a model directory's weights: every ``*.safetensors`` under it (a LoRA run's
    ``adapter/`` too), by relative path in sorted order, each file hashed whole. The same weights give
    the same digest wherever the directory lives; a directory retrained in place gives another. None
    when it holds no safetensors (nothing to vouch for)."""
    root = Path(model_dir)
    files = sorted((p for p in root.rglob("*.safetensors") if p.is_file()),
                   key=lambda p: p.relative_to(root).as_posix())
    if not files:
        return None
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.relative_to(root).as_posix()}\0{sha256_file(p)}\n".encode("utf-8"))
    return h.hexdigest()


def seal_dir(path: Path) -> None:
    """Mark a written directory complete: fsync its files, then write ``COMPLETED`` atomically as
    ``{"completed": time, "files": {relpath: {"size": bytes, "sha256": hex}}}`` for every file under it
    (subdirectories included, posix paths, sorted), so a reader can tell a whole directory from one a
    disk, a copy or a kill damaged since (:func:`verify_dir`)."""
    fsync_tree(path)
    files = sorted((p for p in path.rglob("*") if p.is_file() and p.relative_to(path).as_posix() != COMPLETED),
                   key=lambda p: p.relative_to(path).as_posix())
    record = {p.relative_to(path).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in files}
    atomic_write_text(path / COMPLETED, json.dumps({"completed": now(), "files": record}, indent=1) + "\n")


def verify_dir(path: Path) -> list[str]:
    """What no longer matches ``path/COMPLETED``'s record, one line per file (``model.safetensors: 1234
    bytes, 5678 recorded``, ``optimizer.pt: missing``, ``state.pt: sha256 differs from the one recorded``);
    [] when intact. Files not in the record are not checked. A ``COMPLETED`` holding only a timestamp was
    written by an igpt before the record existed: nothing to check, []. Sizes are compared first and the
    files hashed only when every size matches (a truncated checkpoint is told without reading it)."""
    try:
        text = (path / COMPLETED).read_text(encoding="utf-8")
    except FileNotFoundError:
        return [f"{COMPLETED}: missing"]
    except (OSError, UnicodeDecodeError):
        return [f"{COMPLETED}: unreadable"]
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return [] if _timestamp(text.strip()) else [f"{COMPLETED}: unreadable"]
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, dict) and {"size", "sha256"} <= v.keys()
                                              for v in files.values()):
        return [f"{COMPLETED}: unreadable"]
    problems = []
    for rel, want in files.items():
        p = path / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
        elif p.stat().st_size != want["size"]:
            problems.append(f"{rel}: {p.stat().st_size} bytes, {want['size']} recorded")
    if problems:
        return problems
    return [f"{rel}: sha256 differs from the one recorded" for rel, want in files.items()
            if sha256_file(path / rel) != want["sha256"]]


def _timestamp(text: str) -> bool:
    try:
        _dt.datetime.fromisoformat(text)
    except ValueError:
        return False
    return True


@contextlib.contextmanager
def publish_set(out: Path) -> Iterator[Path]:
    """Publish the files of one result (``eval/NAME/``, ``compare/A-vs-B/``) all or nothing.

    ``with publish_set(out) as tmp:`` write every file into ``tmp``, a fresh directory beside ``out``
    (same file system, so renames are atomic). When the block ends normally the files are fsynced and the
    directories swapped: ``out`` is renamed aside to ``.NAME.old-PID``, ``tmp`` renamed to ``out``, the old
    one removed. If the block raises, ``tmp`` is removed and ``out`` is untouched: a crash while writing
    (a chart that fails, a full disk) leaves the previous complete set. POSIX has no portable atomic swap of
    two directories, so between the two renames ``out`` is briefly absent; a process killed exactly there
    leaves the previous set under ``.NAME.old-PID``, which the next publish renames back before it starts
    (:func:`recover_published`). We chose this over a versioned directory behind a symlink: ``out`` stays a
    plain directory that ``cp -r``, ``rsync`` and Windows copy as it is."""
    parent, name = out.parent, out.name
    parent.mkdir(parents=True, exist_ok=True)
    recover_published(out)
    tmp = parent / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = parent / f".{name}.old-{os.getpid()}"
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(tmp, out)
    _fsync_dir(parent)
    shutil.rmtree(old, ignore_errors=True)
    for stale in list(parent.glob(f".{name}.tmp-*")) + list(parent.glob(f".{name}.old-*")):
        if not _pid_alive(stale.name.rsplit("-", 1)[-1]):  # left by a killed process
            shutil.rmtree(stale, ignore_errors=True)


def recover_published(out: Path) -> None:
    """If a publish was killed between its two renames (``out`` absent, ``.NAME.old-PID`` present), put
    the previous complete set back."""
    olds = sorted(out.parent.glob(f".{out.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if not out.exists() and olds:
        os.replace(olds[-1], out)


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def is_main_process() -> bool:
    """Only rank 0 writes files when launched by torchrun / accelerate."""
    return int(os.environ.get("RANK", "0")) == 0


# ---------------------------------------------------------------- manifest


def read_manifest(run_dir: Path) -> dict:
    path = run_dir / "manifest.json"
    if not path.exists():
        return {"igpt_version": _version(), "stages": {}}
    return json.loads(path.read_text(encoding="utf-8"))


def update_manifest(run_dir: Path, stage: str, **fields: Any) -> None:
    """Merge ``fields`` into ``stages[stage]`` of ``manifest.json`` (atomic rewrite)."""
    manifest = read_manifest(run_dir)
    manifest["igpt_version"] = _version()
    manifest.setdefault("stages", {}).setdefault(stage, {}).update(fields)
    atomic_write_text(run_dir / "manifest.json", json.dumps(manifest, indent=2) + "\n")


def file_input(path: str | Path) -> dict:
    """A manifest ``inputs`` entry: resolved path and sha256."""
    return {"path": str(Path(path).resolve()), "sha256": sha256_file(path)}


def model_input(source: str | Path) -> dict | str:
    """A manifest ``inputs`` entry for a model: a directory's resolved path and weights sha256
    (:func:`weights_sha256`), which lineage compares with the producing stage's output; a name
    (``tiny``, ``smollm2-135m``) as it is."""
    path = Path(source)
    if not path.is_dir():
        return str(source)
    return {"path": str(path.resolve()), "sha256": weights_sha256(path)}


def mark_stale(run_dir: Path, stage: str, sha: str | None = None) -> None:
    """Lineage: flag every manifest entry whose inputs include ``stage``'s ``final/`` (or a folder in it).
    While ``stage`` runs again (``sha`` None) they are all ``stale``; when it completes with weights
    ``sha``, those built from exactly these weights (a deterministic re-run) are fresh again."""
    manifest = read_manifest(run_dir)
    final = (run_dir / stage / "final").resolve()
    changed = False
    for name, entry in manifest.get("stages", {}).items():
        if name == stage:
            continue
        for key, source in entry.get("inputs", {}).items():
            if not (isinstance(source, dict) and source.get("path")):
                continue
            path = Path(source["path"])
            if path != final and final not in path.parents:
                continue
            if sha is not None and source.get("sha256") == weights_sha256(path if path.exists() else final):
                changed |= entry.pop("stale", None) is not None
            else:
                entry["stale"] = f"its input {key} ({path}) is the output of {stage}, re-run on {now()}"
                changed = True
    if changed:
        atomic_write_text(run_dir / "manifest.json", json.dumps(manifest, indent=2) + "\n")


def claim(run_dir: Path, out: Path) -> None:
    """Before eval or compare samples a token: ``out`` (``RUN_DIR/eval/NAME``) can be written, and this
    process holds its lock (one writer per report)."""
    from . import lifecycle

    lifecycle.check_writable(out.parent)
    lifecycle.take(run_dir, out.relative_to(run_dir).as_posix(), str(out))


def record(run_dir: Path, out: Path, models: dict[str, Path]) -> None:
    """A report's manifest entry (``eval/NAME``, ``compare/A-vs-B``): the weights of each model it judged
    (lineage: a later re-run of the stage that made one marks the report stale)."""
    update_manifest(run_dir, out.relative_to(run_dir).as_posix(), status="completed", finished=now(),
                    inputs={k: model_input(p) for k, p in models.items()}, outputs={"report": str(out / "report.json")})


def _version() -> str:
    from . import __version__

    return __version__


# ---------------------------------------------------------------- stage directories


def stage_state(stage_dir: Path) -> str:
    """'empty' (nothing there), 'done' (final/ written) or 'partial' (outputs but no final)."""
    if not stage_dir.exists() or not any(stage_dir.iterdir()):
        return "empty"
    return "done" if (stage_dir / "final").exists() else "partial"


def check_stage(stage_dir: Path, resume: bool, overwrite: bool) -> str:
    """Decide what a stage run does with existing outputs, before anything is written.

    Returns 'fresh', 'resume' or 'done'. A stage with outputs and neither flag is refused (BadInput):
    igpt never silently clobbers a run.
    """
    if resume and overwrite:
        raise BadInput(["--resume and --overwrite exclude each other"])
    state = stage_state(stage_dir)
    if state == "empty" or overwrite:
        return "fresh"
    if not resume:
        raise BadInput([f"{stage_dir}: already has outputs ({'finished' if state == 'done' else 'unfinished'} run); "
                        "pass --resume to continue it or --overwrite to start over"])
    return "done" if state == "done" else "resume"


def start_stage_dir(stage_dir: Path, mode: str) -> None:
    """Create the stage directory (clearing it for a fresh start over old outputs)."""
    if mode == "fresh" and stage_dir.exists():
        shutil.rmtree(stage_dir)
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


def save_checkpoint(ckpt_root: Path, step: int, write: Callable[[Path], None], keep: int) -> Path:
    """``write(tmp_dir)`` the checkpoint files, fsync, rename to ``step-NNNNNN``, mark COMPLETED,
    then delete all but the newest ``keep`` complete checkpoints (and any stale temporary dirs)."""
    tmp = begin_checkpoint(ckpt_root, step)
    write(tmp)
    return publish_checkpoint(ckpt_root, tmp, step, keep)


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
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
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
