"""What the user sees on stderr: one console for rank 0 (the other ranks of a launched run stay quiet), run
banners, progress bars and one-line messages. Metrics go to metrics.jsonl, not here. Imports no torch at load
(``distributed`` is imported where a rank is asked), so ``igpt status`` can use its formatting and stay quick."""
from __future__ import annotations

import os
import resource
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Any


def console() -> Any:
    """stderr of rank 0; the other ranks of a launched run stay quiet."""
    from rich.console import Console

    from . import distributed

    return Console(stderr=True, quiet=not distributed.is_main())


def say_every_rank(message: str) -> None:
    from rich.console import Console

    from . import distributed

    Console(stderr=True).print(f"rank {distributed.rank()}/{distributed.world_size()}: {message}")


def say(message: str) -> None:
    """One message, one line: never wrapped at the terminal's width, so a log file can be grepped for it."""
    console().print(message, soft_wrap=True)


def banner(title: str, rows: dict[str, str], run_dir: Path | None = None) -> None:
    """A run banner: what is about to happen (examples, steps, effective batch, parameters). With ``run_dir``
    (a training stage's) it also names where and what runs (:func:`run_rows`), so a batch log says which run
    it is. On a terminal a table; in a log one ``key  value`` line a row, never wrapped (a path or the command
    line stays whole to copy) and without trailing spaces."""
    from rich.table import Table

    rows = {**rows, **run_rows(run_dir)} if run_dir is not None else rows
    out = console()
    if not out.is_terminal:
        width = max(map(len, rows), default=0)
        out.print("\n".join([title, *(f"{key:<{width}}  {value}".rstrip() for key, value in rows.items())]),
                  soft_wrap=True, markup=False, highlight=False)
        return
    table = Table(title=title, show_header=False, title_justify="left", box=None, pad_edge=False)
    for key, value in rows.items():
        table.add_row(f"[bold]{key}[/]", value)
    out.print(table)


def run_rows(run_dir: Path) -> dict[str, str]:
    """Where and what runs: host, pid, igpt's version, the CPU threads and why (cpus.py), the command line and the
    run directory (absolute)."""
    from . import __version__, cpus

    return {"host": socket.gethostname(), "pid": str(os.getpid()), "igpt": __version__, **cpus.banner_row(),
            "command": shlex.join(["igpt", *sys.argv[1:]]), "run dir": str(Path(run_dir).resolve())}


def timestamp() -> str:
    """The wall-clock time a log line starts with: ``2026-12-07 02:10:33`` (local time)."""
    return time.strftime("%Y-%m-%d %H:%M:%S")


def peak_memory() -> str:
    """This process's peak memory so far: resident set size (what the OOM killer and a batch scheduler's limit
    count) and, on a GPU, PyTorch's peak allocated memory on the current device."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # bytes
    text = f"peak RSS {rss / 2**30:.2f} GiB"
    torch = sys.modules.get("torch")  # a loop that reports memory has torch loaded; none here means no GPU
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        text += f", GPU {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    return text


LOG_SECONDS = 30.0  # a plain progress line about this often when --log-every is 0


def clock(seconds: float) -> str:
    """A duration as ``1:02:03``, or ``2:03`` under an hour."""
    seconds = int(round(seconds))
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _value(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class StepProgress:
    """Progress of a training loop, wherever its stderr goes. On a terminal a rich bar with the headline
    metric and the ETA; anywhere else (a batch log under Slurm or nohup, ``| tee``) a plain line every
    ``every`` steps, or about every LOG_SECONDS when ``every`` is 0, and at the first and the last step:
    the wall-clock time, step/total, the headline metrics (eval metrics keep their last value), throughput,
    peak memory and ETA, as HF Trainer and litgpt log. Only rank 0 shows anything."""

    def __init__(self, name: str, total: int, start: int, headline: tuple[str, ...], every: int = 0) -> None:
        self.name, self.total, self.start, self.headline, self.every = name, total, start, headline, every
        self.shown: dict[str, Any] = {}
        self.out = console()
        self.bar: Any = None
        self.started = self.last_line = time.perf_counter()

    def __enter__(self) -> "StepProgress":
        if self.out.is_terminal and not self.out.quiet:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TimeRemainingColumn(), console=self.out).__enter__()
            self.task = self.bar.add_task(self.name, total=self.total, completed=self.start)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def update(self, step: int, record: dict) -> None:
        """After optimizer step ``step`` (1-based) with its metrics record."""
        self.shown.update({k: record[k] for k in self.headline if k in record})
        metrics = "  ".join(f"{k.split('/')[-1] if k.startswith('train/') else k} {_value(v)}"
                            for k, v in self.shown.items())
        if self.bar is not None:
            self.bar.update(self.task, completed=step, description=f"{self.name} {metrics}")
            return
        now = time.perf_counter()
        due = (step % self.every == 0) if self.every else (now - self.last_line >= LOG_SECONDS)
        if not (due or step == self.start + 1 or step == self.total) or self.out.quiet:
            return
        self.last_line = now
        self.out.print(self.line(step, record, now - self.started), soft_wrap=True, highlight=False, markup=False)

    def say(self, message: str) -> None:
        """A one-line note between progress updates (a checkpoint saved): above the bar on a terminal, a
        timestamped line in a log."""
        self.out.print(message if self.bar is not None else f"{timestamp()} {message}", soft_wrap=True,
                       highlight=False, markup=False)

    def line(self, step: int, record: dict, elapsed: float) -> str:
        """``2026-12-07 02:10:33 sft step 12/400 (3%)  loss 2.311  eval/loss 2.41  |  0.31 steps/s  1,502
        tokens/s  |  peak RSS 1.20 GiB, GPU 3.41 GiB  |  0:39 elapsed, ETA 20:50``; the rate counts the steps
        of this process (a resumed run's first)."""
        done = step - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = clock((self.total - step) / rate) if rate > 0 else "?"
        parts = [f"{timestamp()} {self.name} step {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%)"]
        parts += [f"{k.split('/')[-1] if k.startswith('train/') else k} {_value(v)}" for k, v in self.shown.items()]
        speed = f"{rate:.3g} steps/s"
        if "train/tokens_per_s" in record:
            speed += f"  {record['train/tokens_per_s']:,.0f} tokens/s"
        return "  ".join(parts) + f"  |  {speed}  |  {peak_memory()}  |  {clock(elapsed)} elapsed, ETA {eta}"


def processes_note(fsdp: bool) -> str:
    """Banner suffix saying how a step is shared ('' for one process)."""
    from . import distributed

    world = distributed.world_size()
    if world == 1:
        return " (--fsdp ignored: one process)" if fsdp else ""
    return f" over {world} processes ({'FSDP' if fsdp else 'DDP'})"


def model_rows(model: Any, lora: bool, ckpt: Path | None) -> dict[str, str]:
    """Banner rows every training stage shows: trainable parameters and where it starts from."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": f"{trainable:,} of {total:,} parameters" + (" (LoRA)" if lora else ""),
            "resume": f"from {ckpt.name}" if ckpt else "no (fresh start)"}
