"""``igpt label samples.jsonl --out ranks.jsonl``: the paper's labeler step in a terminal.

Shows each prompt with its K responses and takes their ranks (1 = best, ties share a number); each
ranking is appended to the output at once, in the rankings format train-rm reads. Prompts already
ranked in the output are skipped, so a session can stop (q, or the end of input) and resume.
"""
from __future__ import annotations

import json
from pathlib import Path

from .. import tui
from ..data import iter_jsonl, parse_prompt_field, read_records
from ..errors import BadInput


def parse_sample(obj: dict, where: str, errors: list[str]) -> dict | None:
    turns = parse_prompt_field(obj, where, errors)  # text, or a conversation's turns
    responses = obj.get("responses")
    if not isinstance(responses, list) or len(responses) < 2 or not all(isinstance(r, str) and r.strip()
                                                                         for r in responses):
        errors.append(f"{where}: responses: must be a list of at least 2 non-empty strings")
        return None
    if len({r.strip() for r in responses}) < len(responses):
        errors.append(f"{where}: responses: has duplicates, which cannot be ranked against each other")
        return None
    return obj if turns else None


def key(prompt: str | list) -> str:
    """A prompt (text or turns) as a set member."""
    return json.dumps(prompt, sort_keys=True)


def shown(prompt: str | list) -> str:
    """What the labeler reads: the text, or each turn as ``role: content``."""
    return prompt if isinstance(prompt, str) else "\n\n".join(f"{t['role']}: {t['content']}" for t in prompt)


def run(samples: str, out: str) -> Path:
    records = read_records(samples, parse_sample, "samples")
    out_path = Path(out)
    done: set[str] = set()
    if out_path.exists():
        errors: list[str] = []
        done = {key(obj.get("prompt")) for _, obj in iter_jsonl(out_path, errors)}
        if errors:
            raise BadInput(errors)
    todo = [r for r in records if key(r["prompt"]) not in done]
    tui.say(f"{len(records)} prompts, {len(records) - len(todo)} already ranked in {out_path}")
    ranked = 0
    for i, rec in enumerate(todo):
        answer = tui.rank(len(records) - len(todo) + i, len(records), shown(rec["prompt"]), rec["responses"])
        if answer == tui.QUIT:
            break
        if answer == "s":
            continue
        out_path.parent.mkdir(parents=True, exist_ok=True)
        with open(out_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({**rec, "ranks": answer}, ensure_ascii=False) + "\n")
        ranked += 1
    tui.say(f"ranked {ranked} this session; {len(done) + ranked} of {len(records)} in {out_path}")
    return out_path
