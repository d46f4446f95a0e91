"""Faults on request, for the recovery tests: ``IGPT_FAULT_AFTER_STEP`` makes a training stage die or get a
signal at a chosen point, as a preemption, an OOM kill or a scheduler would. Unset (always, outside tests),
nothing here does anything.

- ``N``: the process ends (exit 99, no cleanup) after step N (every rank of a launched run, once all of them
  have finished that step);
- ``N:publish``: it ends inside the checkpoint of step N, its files written but not yet published;
- ``N:SIGTERM`` (or another signal name): rank 0 sends itself that signal after step N.
"""
from __future__ import annotations

import os

from . import distributed

FAULT_ENV = "IGPT_FAULT_AFTER_STEP"


def _requested(step: int) -> str | None:
    """What the environment asks to happen after ``step`` ('' for death, 'publish', 'SIG...'), else None."""
    at, _, what = os.environ.get(FAULT_ENV, "").partition(":")
    return what if at == str(step) else None


def after_step(step: int) -> None:
    """The fault requested after ``step``, if any (train.Session calls this once a step is recorded)."""
    what = _requested(step)
    if what is None or what == "publish":
        return
    if what.startswith("SIG"):
        if distributed.is_main():
            import signal

            os.kill(os.getpid(), signal.Signals[what])
        return
    distributed.barrier()
    os._exit(99)


def inside_checkpoint(step: int) -> None:
    """``N:publish``: end the process with step N's checkpoint written and not yet published."""
    if _requested(step) == "publish":
        os._exit(99)
