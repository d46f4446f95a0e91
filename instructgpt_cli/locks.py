"""One writer per output of a run directory: a ``flock`` on ``RUN_DIR/.locks/NAME.lock`` for each stage
(``sft``), report (``eval/NAME``, ``compare/A-vs-B``) or file igpt writes, released by the kernel when the
process dies (SIGKILL included), so a lock is never stale; and what the locks say about the manifest's
``running`` entries. Torch is imported only when a stage takes its lock (a launched run shares a refusal with
every rank); the status readers need none."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
from pathlib import Path

from .errors import BadInput
from .storage import now


LOCK_DIR = ".locks"


def lock_path(run_dir: Path, name: str) -> Path:
    """The lock file of output ``name`` (``sft``, ``eval/ppo``) of ``run_dir``."""
    return Path(run_dir) / LOCK_DIR / (name.replace("/", "--") + ".lock")


class Lock:
    """An exclusive ``flock`` on a lock file, taken without waiting. The file is removed on release while
    still locked; a taker checks that the file it locked is still the one at the path (else it retries),
    so a release racing a take never leaves two holders."""

    def __init__(self, path: Path, what: str, run_dir: Path | None = None, stage: str | None = None):
        self.path, self.what, self.fd = Path(path), what, -1
        self.run_dir, self.stage = run_dir, stage  # the manifest entry this lock guards, if any
        self.made: list[Path] = []  # folders the lock created (the run directory of a first stage), innermost first

    def acquire(self) -> None:
        self.made = [p for p in [self.path.parent, *self.path.parent.parents] if not p.exists()]
        for _ in range(20):
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # the folder was removed by a release in between: try again
                continue
            except OSError as e:
                raise BadInput([f"{self.path.parent}: cannot write here ({e.strerror}); "
                                "igpt needs a writable run directory"]) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                raise BadInput([f"{self.what}: in use by {describe_holder(self.path)}; wait for it to end or stop "
                                "it (a killed process releases its lock at once)"]) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # released and removed between our open and our flock
                os.close(fd)
                continue
            holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv[:3]),
                      "since": now()}
            os.ftruncate(fd, 0)
            os.write(fd, (json.dumps(holder) + "\n").encode("utf-8"))
            self.fd = fd
            return
        raise BadInput([f"{self.what}: could not take its lock {self.path}"])

    def release(self) -> None:
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self.fd)
        self.fd = -1
        with contextlib.suppress(OSError):  # only when empty: another lock keeps it
            self.path.parent.rmdir()
        for folder in self.made[1:]:  # a run directory made for a stage that wrote nothing goes too
            with contextlib.suppress(OSError):
                folder.rmdir()


def describe_holder(path: Path) -> str:
    try:
        h = json.loads(path.read_text(encoding="utf-8"))
        return f"pid {h['pid']} on {h['host']} ({h['command']}, since {h['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def is_locked(run_dir: Path, name: str) -> bool:
    """Whether a live process holds the lock of ``name`` (a shared lock attempt fails)."""
    path = lock_path(run_dir, name)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def holder(run_dir: Path, name: str) -> dict | None:
    """Who holds the lock of ``name`` now (``{pid, host, command, since}``, what a refused writer is told), or
    None, found without taking any lock: ``igpt status`` reads beside the writers, and even a shared lock held
    for an instant would refuse a stage starting then. A lock file exists only while it is held or after its
    holder was killed, and on the holder's host a killed holder's pid is no live process (a pid reused since by
    another process would read as held). A holder on another host (a shared file system) cannot be asked that
    way: there, and for a record being written this instant, :func:`is_locked`'s probe decides."""
    path = lock_path(run_dir, name)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return None
    try:
        h = json.loads(text)
        pid, host = int(h["pid"]), str(h["host"])
    except (ValueError, KeyError, TypeError):
        return dict.fromkeys(("pid", "host", "command", "since")) if is_locked(run_dir, name) else None
    if host != socket.gethostname():
        return h if is_locked(run_dir, name) else None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # alive, another user's
        pass
    return h


_HELD: list[Lock] = []


def take(run_dir: Path, name: str, what: str | None = None) -> None:
    """Hold the lock of output ``name`` of ``run_dir`` until :func:`release_all` (the end of the command)
    or the end of the process. Under a launcher rank 0 takes it and every rank raises its refusal."""
    from . import distributed

    problem = None
    if distributed.is_main():
        lock = Lock(lock_path(run_dir, name), what or str(Path(run_dir) / name), Path(run_dir), name)
        try:
            lock.acquire()
            _HELD.append(lock)
        except BadInput as e:
            problem = e.messages
    problem = distributed.broadcast(problem)  # rank 0's answer on every rank (itself, alone)
    if problem:
        raise BadInput(problem)


def take_file(out: Path) -> None:
    """Hold a lock beside the output file ``out`` (``.NAME.lock``) until :func:`release_all`, after checking
    its folder is writable: one writer per file (two sessions would both write what is not yet in it)."""
    check_writable(out.parent)
    lock = Lock(out.parent / f".{out.name}.lock", str(out))
    lock.acquire()
    hold(lock)


def hold(lock: Lock) -> None:
    """Keep ``lock`` (acquired) until :func:`release_all`."""
    _HELD.append(lock)


def release_all(status: str | None = None, error: str | None = None, exit_code: int | None = None) -> None:
    """Release every lock this process holds. ``status`` ('interrupted', 'failed'): the command ended
    early, and a stage whose manifest entry still says ``running`` is marked so first, with when it ended and,
    for a failure, its first error message and exit code (``igpt status`` shows them)."""
    from .rundir import read_manifest, update_manifest
    from .storage import now

    details = {"stopped": now(), **({"error": error} if error else {}),
               **({"exit_code": exit_code} if exit_code is not None else {})}
    while _HELD:
        lock = _HELD.pop()
        if status and lock.stage:
            with contextlib.suppress(OSError, ValueError):
                if read_manifest(lock.run_dir).get("stages", {}).get(lock.stage, {}).get("status") == "running":
                    update_manifest(lock.run_dir, lock.stage, status=status, **details)
        lock.release()


def check_writable(path: Path) -> None:
    """BadInput unless a file can be created in ``path`` (or in its nearest existing ancestor, which is
    what ``mkdir -p`` would need). Nothing is left behind."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK) or not probe.is_dir():
        why = "is not a directory" if not probe.is_dir() else "is read-only"
        raise BadInput([f"{path}: not writable ({probe} {why})"])


def settle_statuses(run_dir: Path) -> None:
    """Rewrite as ``interrupted`` every manifest entry that says ``running`` while nobody holds its lock
    (a process killed with no chance to say so). Rank 0, while holding a lock of the run directory."""
    from .rundir import read_manifest, update_manifest

    manifest = read_manifest(Path(run_dir))
    for name, entry in manifest.get("stages", {}).items():
        if entry.get("status") == "running" and stage_status(run_dir, name, manifest) == "interrupted":
            update_manifest(Path(run_dir), name, status="interrupted",
                            note=f"pid {entry.get('pid', '?')} ended without finishing (killed?)")


def stage_status(run_dir: Path, stage: str, manifest: dict | None = None) -> str | None:
    """The manifest's status of ``stage``, with a ``running`` whose lock is free read as ``interrupted``."""
    from .rundir import read_manifest

    entry = (manifest or read_manifest(Path(run_dir))).get("stages", {}).get(stage, {})
    status = entry.get("status")
    if status == "running" and not is_locked(run_dir, stage):
        return "interrupted"
    return status


def claim(run_dir: Path, out: Path, overwrite: bool = False) -> None:
    """Before eval or compare samples a token: ``out`` (``RUN_DIR/eval/NAME``) can be written, this process
    holds its lock (one writer per report), and it holds no earlier results (``report.json``) unless
    ``overwrite``: as a training stage, a report is never replaced silently. Checked under the lock, so of
    two runs started together the second sees the first one's results."""
    check_writable(out.parent)
    take(run_dir, out.relative_to(run_dir).as_posix(), str(out))
    if not overwrite and (out / "report.json").is_file():
        raise BadInput([f"{out}: already has results (report.json); pass --overwrite to replace them"])
