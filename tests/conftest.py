"""Shared test helpers: tiny data files and an in-process CLI runner (imports are paid once)."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny.yaml"


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def arithmetic_demos(n: int, seed: int = 0) -> list[dict]:
    """Short, learnable demonstrations: 'What is a plus b?' -> 'a plus b is c.'"""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(1, 30), rng.randint(1, 30)
        out.append({"prompt": f"What is {a} plus {b}?", "response": f"{a} plus {b} is {a + b}.", "category": "closed_qa"})
    return out


@pytest.fixture
def demos_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "demos.jsonl", arithmetic_demos(24))


def igpt(*args: str):
    """Run the CLI in-process; returns the click Result (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from instructgpt_cli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
