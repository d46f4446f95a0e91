"""The JSONL files igpt reads (demonstrations, rankings, prompts, pretraining text): parsing and
line-accurate validation.

Every reader checks the whole file and raises one :class:`BadInput` listing every bad line as
``FILE:LINE: field: reason``; nothing is written by a stage before its inputs pass.
Torch is not imported here, so validation runs without it (tokenising and batching: ``batches.py``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import BadInput

ROLES = ("system", "user", "assistant")


def iter_jsonl(path: str | Path, errors: list[str]) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, object)`` for each non-blank line; append bad lines to ``errors``."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise BadInput([f"{p}: file not found"]) from None
    except IsADirectoryError:
        raise BadInput([f"{p}: is a directory, expected a JSONL file"]) from None
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            errors.append(f"{p}:{lineno}: invalid UTF-8 at byte {e.start}")
            continue
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            errors.append(f"{p}:{lineno}: not valid JSON: {e.msg} (column {e.colno})")
            continue
        if not isinstance(obj, dict):
            errors.append(f"{p}:{lineno}: expected a JSON object, got {_json_type(obj)}")
            continue
        yield lineno, obj


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(
        type(value), "null")


def nonempty_str(obj: dict, key: str, where: str, errors: list[str], required: bool = True) -> str | None:
    """``obj[key]`` if it is a non-empty string; otherwise record ``where: key: reason``."""
    if key not in obj:
        if required:
            errors.append(f"{where}: {key}: missing")
        return None
    value = obj[key]
    if not isinstance(value, str) or not value.strip():
        kind = "empty string" if isinstance(value, str) else _json_type(value)
        errors.append(f"{where}: {key}: must be a non-empty string, got {kind}")
        return None
    return value


def read_records(path: str | Path, parse: Callable[[dict, str, list[str]], Any], what: str) -> list:
    """Parse every line of ``path`` with ``parse(obj, "FILE:LINE", errors)``; raise all errors at once."""
    errors: list[str] = []
    records = []
    for lineno, obj in iter_jsonl(path, errors):
        rec = parse(obj, f"{path}:{lineno}", errors)
        if rec is not None:
            records.append(rec)
    if not errors and not records:
        errors.append(f"{path}: no {what} found (the file is empty)")
    if errors:
        raise BadInput(errors)
    return records


# ---------------------------------------------------------------- demonstrations


@dataclass
class Demo:
    """One demonstration: the conversation up to the target, and the target assistant reply."""

    messages: list[dict]  # prompt turns: [{"role", "content"}, ...], ending with a user turn
    response: str
    category: str | None
    where: str  # "FILE:LINE", for error messages after tokenisation


def _parse_messages(obj: dict, where: str, errors: list[str]) -> tuple[list[dict], str] | None:
    msgs = obj["messages"]
    if not isinstance(msgs, list) or not msgs:
        errors.append(f"{where}: messages: must be a non-empty list of {{role, content}} objects")
        return None
    n_errors = len(errors)
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            errors.append(f"{where}: messages[{i}]: expected an object, got {_json_type(m)}")
            continue
        role = m.get("role")
        if role not in ROLES:
            errors.append(f"{where}: messages[{i}].role: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        nonempty_str(m, "content", f"{where}: messages[{i}]", errors)
    if len(errors) > n_errors:
        return None
    if not any(m["role"] == "assistant" for m in msgs):
        errors.append(f"{where}: messages: no assistant turn (the last assistant message is the target)")
        return None
    if msgs[-1]["role"] != "assistant":
        errors.append(f"{where}: messages[{len(msgs) - 1}].role: the conversation must end with the assistant "
                      f"turn to learn, got {msgs[-1]['role']!r}")
        return None
    if not any(m["role"] == "user" for m in msgs[:-1]):
        errors.append(f"{where}: messages: no user turn before the target assistant turn")
        return None
    return [{"role": m["role"], "content": m["content"]} for m in msgs[:-1]], msgs[-1]["content"]


def parse_demo(obj: dict, where: str, errors: list[str]) -> Demo | None:
    category = nonempty_str(obj, "category", where, errors, required=False)
    if "messages" in obj:
        if "prompt" in obj or "response" in obj:
            errors.append(f"{where}: messages: give either messages or prompt/response, not both")
            return None
        parsed = _parse_messages(obj, where, errors)
        return Demo(parsed[0], parsed[1], category, where) if parsed else None
    prompt = nonempty_str(obj, "prompt", where, errors)
    response = nonempty_str(obj, "response", where, errors)
    if prompt is None or response is None:
        return None
    return Demo([{"role": "user", "content": prompt}], response, category, where)


def read_demos(path: str | Path) -> list[Demo]:
    """Validate and read a demonstrations file (``prompt``/``response`` or chat ``messages``)."""
    return read_records(path, parse_demo, "demonstrations")


# ---------------------------------------------------------------- tokenisation


# ---------------------------------------------------------------- prompts


@dataclass
class Prompt:
    prompt: str
    category: str | None
    where: str = ""  # "FILE:LINE", for error messages after tokenisation

    @property
    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.prompt}]


def parse_prompt(obj: dict, where: str, errors: list[str]) -> Prompt | None:
    category = nonempty_str(obj, "category", where, errors, required=False)
    prompt = nonempty_str(obj, "prompt", where, errors)
    return Prompt(prompt, category, where) if prompt is not None else None


def read_prompts(path: str | Path) -> list[Prompt]:
    """Validate and read a prompts file: ``{"prompt": str}``, optional ``"category"``."""
    return read_records(path, parse_prompt, "prompts")


# ---------------------------------------------------------------- rankings


@dataclass
class Ranking:
    """K responses to one prompt with their ranks (1 = best; equal ranks are ties and make no pair)."""

    prompt: str
    responses: list[str]
    ranks: list[int]
    category: str | None
    where: str

    @property
    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.prompt}]

    def pairs(self) -> list[tuple[int, int]]:
        """All ordered pairs ``(better, worse)`` of response indices; ties skipped. C(K,2) without ties."""
        k = len(self.ranks)
        return [(i, j) if self.ranks[i] < self.ranks[j] else (j, i)
                for i in range(k) for j in range(i + 1, k) if self.ranks[i] != self.ranks[j]]


def _parse_ranked(obj: dict, where: str, errors: list[str]) -> tuple[list[str], list[int]] | None:
    responses, ranks = obj["responses"], obj.get("ranks")
    if not isinstance(responses, list):
        errors.append(f"{where}: responses: must be a list of strings, got {_json_type(responses)}")
        return None
    if len(responses) < 2:
        errors.append(f"{where}: responses: need at least 2 responses to rank (K >= 2), got {len(responses)}")
        return None
    n_errors = len(errors)
    for i, r in enumerate(responses):
        if not isinstance(r, str) or not r.strip():
            kind = "empty string" if isinstance(r, str) else _json_type(r)
            errors.append(f"{where}: responses[{i}]: must be a non-empty string, got {kind}")
    if "ranks" not in obj:
        errors.append(f"{where}: ranks: missing (one integer per response, 1 = best)")
    elif not isinstance(ranks, list):
        errors.append(f"{where}: ranks: must be a list of integers, got {_json_type(ranks)}")
    elif len(ranks) != len(responses):
        errors.append(f"{where}: ranks: has {len(ranks)} entries for {len(responses)} responses")
    else:
        for i, r in enumerate(ranks):
            if not isinstance(r, int) or isinstance(r, bool) or r < 1:
                errors.append(f"{where}: ranks[{i}]: must be an integer >= 1 (1 = best), got {r!r}")
    if len(errors) > n_errors:
        return None
    seen: dict[str, int] = {}
    for i, r in enumerate(responses):
        if r.strip() in seen:
            errors.append(f"{where}: responses[{i}]: duplicate of responses[{seen[r.strip()]}]; "
                          "identical responses cannot be ranked against each other")
            return None
        seen[r.strip()] = i
    if len(set(ranks)) == 1:
        errors.append(f"{where}: ranks: all responses are tied, so there is no pair to learn from")
        return None
    return responses, ranks


def parse_ranking(obj: dict, where: str, errors: list[str]) -> Ranking | None:
    """``{"prompt", "responses", "ranks"}`` or the pairwise ``{"prompt", "chosen", "rejected"}`` (K=2)."""
    category = nonempty_str(obj, "category", where, errors, required=False)
    prompt = nonempty_str(obj, "prompt", where, errors)
    if "responses" in obj:
        if "chosen" in obj or "rejected" in obj:
            errors.append(f"{where}: responses: give either responses/ranks or chosen/rejected, not both")
            return None
        parsed = _parse_ranked(obj, where, errors)
    elif "chosen" in obj or "rejected" in obj:
        chosen = nonempty_str(obj, "chosen", where, errors)
        rejected = nonempty_str(obj, "rejected", where, errors)
        if chosen is None or rejected is None:
            return None
        if chosen.strip() == rejected.strip():
            errors.append(f"{where}: rejected: identical to chosen")
            return None
        parsed = [chosen, rejected], [1, 2]
    else:
        errors.append(f"{where}: responses: missing (give responses and ranks, or chosen and rejected)")
        return None
    if prompt is None or parsed is None:
        return None
    return Ranking(prompt, parsed[0], parsed[1], category, where)


def read_rankings(path: str | Path) -> list[Ranking]:
    """Validate and read a rankings file."""
    return read_records(path, parse_ranking, "rankings")


# ---------------------------------------------------------------- pretraining text (PPO-ptx, alignment tax)


def parse_text(obj: dict, where: str, errors: list[str]) -> str | None:
    return nonempty_str(obj, "text", where, errors)


def read_pretrain(path: str | Path) -> list[str]:
    """Pretraining text: JSONL ``{"text": str}`` or a plain ``.txt`` file (paragraphs split on blank lines)."""
    p = Path(path)
    if p.suffix == ".txt":
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise BadInput([f"{p}: file not found"]) from None
        except UnicodeDecodeError as e:
            raise BadInput([f"{p}: invalid UTF-8 at byte {e.start}"]) from None
        paragraphs = [t.strip() for t in text.split("\n\n") if t.strip()]
        if not paragraphs:
            raise BadInput([f"{p}: no text found (the file is empty)"])
        return paragraphs
    return read_records(p, parse_text, "texts")


