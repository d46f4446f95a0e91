"""Stop signals: SIGTERM and SIGUSR1 (what Slurm and Kubernetes send before the kill) and SIGINT end a
command at once, except while a training loop defers them (:func:`defer`) to the end of its current
optimizer step (PPO: iteration), where it checkpoints and stops; a second SIGINT aborts at once. One that
lands while a module is being imported ends the process at once, 128 + N (:func:`_on_signal`). Nothing heavy
is imported here: the handlers are installed before torch is."""
from __future__ import annotations

import os
import signal
import sys
from types import FrameType

from .errors import Interrupted

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class _Stop:
    signum: int | None = None  # the first stop signal received
    deferred = False  # True while a training loop will act on it at a step boundary


def install_signal_handlers() -> None:
    """From the start of a command: a stop signal raises :class:`Interrupted` at once, except while a
    training loop defers it (:func:`defer`) to the end of the current step."""
    _Stop.signum, _Stop.deferred = None, False
    for sig in STOP_SIGNALS:
        signal.signal(sig, _on_signal)


def _importing(frame: FrameType | None) -> bool:
    """Whether the signal landed while Python imports a module: importlib's frames on the stack."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _on_signal(signum: int, frame: FrameType | None) -> None:
    if not _Stop.deferred and _importing(frame):
        # Raised inside an import, the exception can land in a C++ extension's callback to Python (pybind11, while
        # torch initialises), which aborts the process (exit -6, a core), or in importlib's own callbacks, which
        # print it and carry on. So end at once: outputs are published whole and locks die with the process, so
        # nothing is left half-written. (os.write: print could re-enter a write the signal interrupted.)
        os.write(2, f"igpt: interrupted ({signal.Signals(signum).name}) while loading libraries; stopped at once\n"
                 .encode())
        os._exit(128 + signum)
    first = _Stop.signum is None
    if first:
        _Stop.signum = signum
    if not _Stop.deferred or (not first and signum == signal.SIGINT):
        _Stop.deferred = False
        raise Interrupted(signum)
    name = signal.Signals(signum).name
    print(f"igpt: {name} received: stopping after the current step with a checkpoint"
          + (" (SIGINT again to abort at once)" if signum == signal.SIGINT else ""), file=sys.stderr, flush=True)


def stop_requested() -> int | None:
    """The stop signal received so far, if any."""
    return _Stop.signum


def check_stop() -> None:
    """Raise :class:`Interrupted` if a stop signal came (called where work may begin or end cleanly)."""
    if _Stop.signum is not None:
        raise Interrupted(_Stop.signum)


def defer() -> None:
    """From now on a stop signal only sets :func:`stop_requested`: the training loop checkpoints and stops
    itself at the end of the current step (a signal that already came stops the command here)."""
    check_stop()
    _Stop.deferred = True


def undefer() -> None:
    _Stop.deferred = False
