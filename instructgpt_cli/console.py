"""What the user sees on stderr: one console for rank 0 (the other ranks of a launched run stay quiet), run
banners, progress bars and one-line messages. Metrics go to metrics.jsonl, not here."""
from __future__ import annotations

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
    console().print(message)


def banner(title: str, rows: dict[str, str]) -> None:
    """A run banner: what is about to happen (examples, steps, effective batch, parameters)."""
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left", box=None, pad_edge=False)
    for key, value in rows.items():
        table.add_row(f"[bold]{key}[/]", value)
    console().print(table)


def progress() -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console(), disable=not distributed.is_main())


def processes_note(fsdp: bool) -> str:
    """Banner suffix saying how a step is shared ('' for one process)."""
    world = distributed.world_size()
    if world == 1:
        return " (--fsdp ignored: one process)" if fsdp else ""
    return f" over {world} processes ({'FSDP' if fsdp else 'DDP'})"


def model_rows(model: Any, lora: bool, ckpt: Path | None) -> dict[str, str]:
    """Banner rows every training stage shows: trainable parameters and where it starts from."""
    from .models import count_parameters

    trainable, total = count_parameters(model)
    return {"trainable": f"{trainable:,} of {total:,} parameters" + (" (LoRA)" if lora else ""),
            "resume": f"from {ckpt.name}" if ckpt else "no (fresh start)"}
