"""Shared test helpers: tiny data files and an in-process CLI runner (imports are paid once)."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Every bit-for-bit comparison in this suite (kill loops, SIGTERM resume, torchrun equal to one process,
# deterministic reruns) runs all of its sides at one thread count: a step computed on 2 threads is not
# bit-identical to one computed on 1, so a test that mixed them passed or failed with the timing of a kill.
# This process and every igpt it starts run on THREADS threads, whatever the environment says.
THREADS = 1
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = str(THREADS)
# igpt reads IGPT_THREADS before OMP_NUM_THREADS: a user's setting would override THREADS in every igpt started
os.environ.pop("IGPT_THREADS", None)
import torch  # noqa: E402  (after the variables: its thread pool reads them)

torch.set_num_threads(THREADS)
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


def marker_rankings(n: int, seed: int = 0) -> list[dict]:
    """Rankings with a learnable preference: responses that contain 'banana' beat those that do not.
    K varies from 2 to 5; responses without the marker tie with each other."""
    rng = random.Random(seed)
    words = "the cat sat on a mat and then ran away from dog into big red house".split()
    out = []
    for i in range(n):
        k = rng.choice([2, 3, 4, 5])
        responses: list[str] = []
        while len(responses) < k:
            r = " ".join(rng.choice(words) for _ in range(rng.randint(3, 8)))
            if r not in responses:
                responses.append(r)
        marked = [rng.random() < 0.5 for _ in responses]
        if all(marked) or not any(marked):
            marked[0] = not marked[0]
        out.append({"prompt": f"Say something, number {i}.",
                    "responses": [r + " banana" if m else r for r, m in zip(responses, marked)],
                    "ranks": [1 if m else 2 for m in marked]})
    return out
