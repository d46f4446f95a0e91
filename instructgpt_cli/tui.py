"""The labeler's terminal UI (rich): pick the better of two responses, or rank K of them.

Reads answers from standard input, so a test (or a script) can drive it through a pipe; interactive use
is the same prompts in a terminal.
"""
from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel

QUIT = "q"


def _console() -> Console:
    return Console(stderr=True, highlight=False)


def _ask(con: Console, question: str) -> str:
    con.print(escape(question), end="")
    try:
        return input().strip().lower()
    except EOFError:  # the input stream ended: stop cleanly, what was answered is saved
        return QUIT


def show_prompt(con: Console, index: int, total: int, prompt: str) -> None:
    con.rule(f"[bold]{index + 1} / {total}")
    con.print(Panel(escape(prompt), title="prompt", title_align="left", border_style="cyan"))


def pick_better(index: int, total: int, prompt: str, first: str, second: str) -> str:
    """Show two responses; returns '1', '2', 't' (tie), 's' (skip) or 'q' (quit)."""
    con = _console()
    show_prompt(con, index, total, prompt)
    con.print(Panel(escape(first), title="response 1", title_align="left"))
    con.print(Panel(escape(second), title="response 2", title_align="left"))
    while True:
        answer = _ask(con, "Which is better? [1] [2] [t]ie [s]kip [q]uit: ")
        if answer in ("1", "2", "t", "s", QUIT):
            return answer
        con.print("[red]answer 1, 2, t, s or q[/]")


def rank(index: int, total: int, prompt: str, responses: list[str]) -> list[int] | str:
    """Show K responses; returns their ranks (1 = best, equal numbers are ties) or 's' / 'q'."""
    con = _console()
    show_prompt(con, index, total, prompt)
    for i, r in enumerate(responses, start=1):
        con.print(Panel(escape(r), title=f"response {i}", title_align="left"))
    k = len(responses)
    while True:
        answer = _ask(con, f"Rank of each response, in order (1 = best, ties share a number), e.g. "
                           f"{' '.join(str(i) for i in range(1, k + 1))}; or [s]kip [q]uit: ")
        if answer in ("s", QUIT):
            return answer
        problem = rank_problem(answer, k)
        if problem is None:
            return [int(x) for x in answer.replace(",", " ").split()]
        con.print(f"[red]{problem}[/]")


def rank_problem(answer: str, k: int) -> str | None:
    """Why ``answer`` is not a valid ranking of k responses, or None."""
    parts = answer.replace(",", " ").split()
    if len(parts) != k or not all(p.isdigit() for p in parts):
        return f"give {k} whole numbers"
    ranks = [int(p) for p in parts]
    if min(ranks) < 1:
        return "ranks start at 1"
    if len(set(ranks)) == 1:
        return "all tied: nothing to learn from; rank them or skip"
    return None


def say(message: Any) -> None:
    _console().print(message)
