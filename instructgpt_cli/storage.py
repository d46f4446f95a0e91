"""Files that are whole or absent: atomic writes, folders sealed with a record of every file's size and
sha256 (``COMPLETED``) and verified against it, results published all or nothing, and a failing disk told
apart from a bug. Torch is not imported here."""
from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from .errors import WriteFailed

COMPLETED = "COMPLETED"


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def fsync_tree(path: Path) -> None:
    """fsync every file under ``path`` and the directories themselves, so a rename publishes whole data.
    Each file gets the mode the umask gives a new file (0644 under umask 022): safetensors writes its
    files 0600, which the group of a shared cluster could not read."""
    mode = 0o666 & ~umask()
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                if os.fstat(fh.fileno()).st_mode & 0o777 != mode:
                    os.fchmod(fh.fileno(), mode)
                os.fsync(fh.fileno())
        _fsync_dir(Path(root))


def umask() -> int:
    """The process's umask, read without changing it where Linux tells it (another thread creating a file
    meanwhile would get umask 0 from the os.umask round trip)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


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
        # before freeing the space; a nested write that already failed is told by the whole it belongs to
        code = (e.errno if isinstance(e, WriteFailed) else
                disk_errno(e, target.parent) if isinstance(e, Exception) else None)
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


def append_lines(path: Path, lines: list[str]) -> None:
    """Append ``lines``, each with its newline, to ``path`` in one fsynced write. A write that fails (a full
    disk, a stop signal) is cut off again, so the file keeps whole lines only, all of ``lines`` or none; a
    failed storage becomes :class:`errors.WriteFailed` naming ``path`` (exit 4)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = memoryview("".join(line + "\n" for line in lines).encode("utf-8"))
    with open(path, "ab", buffering=0) as fh:  # unbuffered: closing the file cannot write a failed rest later
        start = fh.tell()
        try:
            while data:  # a raw write may write part of what it is given
                data = data[fh.write(data):]
            os.fsync(fh.fileno())
        except BaseException as e:
            code = disk_errno(e) if isinstance(e, Exception) else None
            with contextlib.suppress(OSError):  # truncating frees space, so it works on a full disk
                fh.truncate(start)
            if code is None:
                raise
            raise WriteFailed(str(path), code) from e


def drop_torn_line(path: Path) -> bool:
    """Cut a last line without its newline (a process killed while appending it) off ``path``, so that a
    rerun appends after the last whole line; True if there was one."""
    try:
        with open(path, "rb+") as fh:
            data = fh.read()
            if not data or data.endswith(b"\n"):
                return False
            fh.truncate(data.rfind(b"\n") + 1)
            os.fsync(fh.fileno())
    except FileNotFoundError:
        return False
    return True


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def json_sha256(value: Any) -> str:
    """The sha256 of ``value`` as ``json.dumps`` writes it: what a run records of the rendered prompts it sampled
    after (eval, compare, sample), so a later command recognises the same ones by the same digest."""
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()


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
        h.update(f"{p.relative_to(root).as_posix()}\0{_identity_sha256(p)}\n".encode("utf-8"))
    return h.hexdigest()


def _identity_sha256(path: Path) -> str:
    """:func:`sha256_file`, once per process for a file that keeps its size and modification time: a digest
    that names weights (lineage, eval's report), asked for several times a command. Not for integrity:
    :func:`verify_dir` always reads the bytes (a flipped bit changes neither size nor time)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = sha256_file(path)
    return _DIGESTS[key]


_DIGESTS: dict[tuple, str] = {}


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
    with writing(out, tmp):  # a full disk names ``out`` (exit 4); the partial set is removed
        yield tmp
        fsync_tree(tmp)
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


@contextlib.contextmanager
def building(dest: Path, seal: bool = False) -> Iterator[Path]:
    """``with building(dest) as tmp:`` write a folder's files into ``tmp``, a fresh folder beside ``dest``; when
    the block ends they are fsynced (and sealed with ``COMPLETED`` when ``seal``) and ``tmp`` replaces ``dest``
    (:func:`publish_dir`). A failed write removes ``tmp`` and leaves ``dest`` as it was (:func:`writing`)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-{dest.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    with writing(dest, tmp):
        yield tmp
        if seal:
            seal_dir(tmp)
        else:
            fsync_tree(tmp)
    publish_dir(tmp, dest)


def publish_dir(tmp: Path, dest: Path) -> None:
    """Put the written, fsynced folder ``tmp`` in place of ``dest`` (a rename on the same file system; an older
    ``dest`` is removed first) and fsync the parent, so the rename itself survives a power cut."""
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    _fsync_dir(dest.parent)
