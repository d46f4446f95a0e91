"""The exceptions that end a command with a known exit code (README, "Failure and recovery"):
2 bad input (nothing written), 3 non-finite training values, 4 a failed write (full disk, I/O error),
128 + N a signal N (130 SIGINT, 138 SIGUSR1, 143 SIGTERM). Anything else is a bug: exit 1."""
from __future__ import annotations

import errno as _errno
import signal as _signal


SHOWN = 20  # problems printed of a longer list: a file with thousands of bad lines would bury the terminal


def shown(messages: list[str], limit: int = SHOWN) -> list[str]:
    """The first ``limit`` messages, then ``... and N more`` for the rest (every one is still checked)."""
    if len(messages) <= limit:
        return list(messages)
    return [*messages[:limit], f"... and {len(messages) - limit} more"]


class BadInput(Exception):
    """Bad user input (data file, config, flag, path). ``messages`` are lines like
    ``demos.jsonl:17: response: must be a non-empty string``; all are kept, the first SHOWN printed
    (:func:`shown`)."""

    code = 2

    def __init__(self, messages: list[str] | str):
        self.messages = [messages] if isinstance(messages, str) else list(messages)
        super().__init__("\n".join(shown(self.messages)))


class NonFinite(Exception):
    """Training produced NaN/inf several steps in a row; the last good checkpoint is kept."""

    code = 3

    def __init__(self, message: str):
        self.messages = [message]
        super().__init__(message)


class WriteFailed(Exception):
    """A write failed for lack of space or an I/O error; partial files were removed."""

    code = 4

    def __init__(self, path: str, errno: int | None):
        reason = {_errno.ENOSPC: "no space left on device", _errno.EDQUOT: "disk quota exceeded",
                  _errno.EIO: "I/O error", _errno.EROFS: "read-only file system"}.get(errno or 0, "write failed")
        self.path, self.errno = path, errno
        self.messages = [f"{reason} while writing {path}"]
        super().__init__(self.messages[0])


class Interrupted(BaseException):
    """A stop signal (SIGTERM, SIGUSR1, SIGINT). A BaseException, like KeyboardInterrupt, so that no
    ``except Exception`` on the way swallows it. ``code`` is the shell's 128 + signal number."""

    def __init__(self, signum: int):
        self.signum = signum
        self.code = 128 + signum
        self.said = False  # True once a training stage has told how to resume
        super().__init__(_signal.Signals(signum).name)
