"""What the user sees on stderr: one console for rank 0 (the other ranks of a launched run stay quiet), run
banners, progress bars and one-line messages. Metrics go to metrics.jsonl, not here."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from . import distributed


def console() -> Any:
    """stderr of rank 0; the other ranks of a launched run stay quiet."""
    from rich.console import Console

    return Console(stderr=True, quiet=not distributed.is_main())


def say_every_rank(message: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"rank {distributed.rank()}/{distributed.world_size()}: {message}")


def say(message: str) -> None:
    """One message, one line: never wrapped at the terminal's width, so a log file can be grepped for it."""
    console().print(message, soft_wrap=True)


def banner(title: str, rows: dict[str, str]) -> None:
    """A run banner: what is about to happen (examples, steps, effective batch, parameters)."""
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left", box=None, pad_edge=False)
    for key, value in rows.items():
        table.add_row(f"[bold]{key}[/]", value)
    console().print(table)


LOG_SECONDS = 30.0  # a plain progress line about this often when --log-every is 0


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _value(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class StepProgress:
    """Progress of a training loop, wherever its stderr goes. On a terminal a rich bar with the headline
    metric and the ETA; anywhere else (a batch log under Slurm or nohup, ``| tee``) a plain line every
    ``every`` steps, or about every LOG_SECONDS when ``every`` is 0, and at the first and the last step:
    step/total, the headline metrics (eval metrics keep their last value), throughput and ETA, as HF
    Trainer and litgpt log. Only rank 0 shows anything."""

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

    def line(self, step: int, record: dict, elapsed: float) -> str:
        """``sft step 12/400 (3%)  loss 2.311  eval/loss 2.41  |  0.31 steps/s  1,502 tokens/s  |  0:39
        elapsed, ETA 20:50``; the rate counts the steps of this process (a resumed run's first)."""
        done = step - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = _clock((self.total - step) / rate) if rate > 0 else "?"
        parts = [f"{self.name} step {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%)"]
        parts += [f"{k.split('/')[-1] if k.startswith('train/') else k} {_value(v)}" for k, v in self.shown.items()]
        speed = f"{rate:.3g} steps/s"
        if "train/tokens_per_s" in record:
            speed += f"  {record['train/tokens_per_s']:,.0f} tokens/s"
        return "  ".join(parts) + f"  |  {speed}  |  {_clock(elapsed)} elapsed, ETA {eta}"


def processes_note(fsdp: bool) -> str:
    """Banner suffix saying how a step is shared ('' for one process)."""
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
