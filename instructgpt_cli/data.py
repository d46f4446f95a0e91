"""The records igpt reads (demonstrations, rankings, prompts, pretraining text): parsing and
line-accurate validation.

Every reader checks the whole input and raises one :class:`BadInput` listing every bad line as
``FILE:LINE: field: reason`` (a dataset's rows as ``SOURCE:ROW``, ROW counted from 1); nothing is written by
a stage before its inputs pass. An input is igpt's JSONL, or anything ``sources.py`` reads through
``datasets`` (a save_to_disk directory, parquet, CSV, JSON, a cached hub dataset id). Besides igpt's own
fields, TRL's dataset formats are read as they are: prompt/completion, conversational prompts (message lists,
rendered later with the model's chat template like ``messages``), and preference pairs with an explicit or
implicit prompt. Torch is not imported here, so validation runs without it (tokenising: ``batches.py``).
"""
from __future__ import annotations

import codecs
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from . import sources
from .errors import BadInput
from .formats import check_turns, json_type, nonempty_str, parse_pair, parse_prompt_field, parse_reply


def iter_jsonl(path: str | Path, errors: list[str]) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, object)`` for each non-blank line; append bad lines to ``errors``."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise BadInput([f"{p}: file not found"]) from None
    except IsADirectoryError:
        raise BadInput([f"{p}: is a directory, expected a JSONL file"]) from None
    # A UTF-8 byte order mark (Windows editors, Excel's "UTF-8" export) is no part of the first record
    for lineno, line in enumerate(raw.removeprefix(codecs.BOM_UTF8).split(b"\n"), start=1):
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
            errors.append(f"{p}:{lineno}: expected a JSON object, got {json_type(obj)}")
            continue
        yield lineno, obj


def column_map(columns: list[str] | tuple = ()) -> dict[str, str]:
    """``["prompt=question"]`` -> ``{"question": "prompt"}``: dataset column -> igpt field (presets checks the form)."""
    return {col.strip(): fld.strip() for fld, col in (c.split("=", 1) for c in columns)}


def rename(obj: dict, mapping: dict[str, str]) -> dict:
    """The row with mapped columns under igpt's field names; a column the row lacks is left alone, so one
    stage-wide mapping serves every input of the stage (it applies by field name)."""
    if not mapping or not any(c in obj for c in mapping):
        return obj
    out = {k: v for k, v in obj.items() if k not in mapping}
    out.update({fld: obj[col] for col, fld in mapping.items() if col in obj})
    return out


def read_records(path: str | Path, parse: Callable[[dict, str, list[str]], Any], what: str, split: str = "train",
                 columns: list[str] | tuple = (), needs: tuple = ()) -> list:
    """Parse every line (or dataset row) of ``path`` with ``parse(obj, "FILE:LINE", errors)``; raise all errors
    at once. ``needs``: the column sets one of which a dataset must have (checked once, not per row)."""
    errors: list[str] = []
    records = []
    mapping = column_map(columns)
    if sources.is_dataset(path):
        label, names, rows = sources.load_rows(str(path), split)
        names = list(rename(dict.fromkeys(names), mapping))
        if needs and not any(set(n) <= set(names) for n in needs):
            raise BadInput([f"{label}: no columns igpt reads as {what}: it has {', '.join(names) or 'none'}; "
                            f"expected {' or '.join('+'.join(n) for n in needs)} (map yours with --columns "
                            "FIELD=COLUMN,...)"])
    else:
        label, rows = str(path), iter_jsonl(path, errors)
    for lineno, obj in rows:
        rec = parse(rename(obj, mapping), f"{label}:{lineno}", errors)
        if rec is not None:
            records.append(rec)
    if not errors and not records:
        errors.append(f"{label}: no {what} found (the file is empty)")
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
    msgs = check_turns(obj["messages"], "messages", where, errors)
    if msgs is None:
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
    return msgs[:-1], msgs[-1]["content"]


def parse_demo(obj: dict, where: str, errors: list[str]) -> Demo | None:
    """Chat ``messages``, or a prompt (string or message list) with ``response`` or TRL's ``completion``."""
    category = nonempty_str(obj, "category", where, errors, required=False)
    if "messages" in obj:
        if "prompt" in obj or "response" in obj or "completion" in obj:
            errors.append(f"{where}: messages: give either messages or prompt/response, not both")
            return None
        parsed = _parse_messages(obj, where, errors)
        return Demo(parsed[0], parsed[1], category, where) if parsed else None
    if "response" in obj and "completion" in obj:
        errors.append(f"{where}: completion: give either response or completion, not both")
        return None
    turns = parse_prompt_field(obj, where, errors)
    response = parse_reply(obj, "completion" if "completion" in obj else "response", where, errors)
    if turns is None or response is None:
        return None
    return Demo(turns, response, category, where)


def read_demos(path: str | Path, split: str = "train", columns: list[str] | tuple = ()) -> list[Demo]:
    """Validate and read demonstrations (``prompt``/``response``, ``prompt``/``completion`` or ``messages``)."""
    return read_records(path, parse_demo, "demonstrations", split, columns,
                        needs=(("messages",), ("prompt", "response"), ("prompt", "completion")))


# ---------------------------------------------------------------- prompts


@dataclass
class Prompt:
    prompt: str  # the text a reader sees: the prompt, or a conversation's last user turn
    category: str | None
    where: str = ""  # "FILE:LINE", for error messages after tokenisation
    turns: list[dict] | None = None  # a conversational prompt's turns; None: one user turn, ``prompt``
    group: str | None = None  # prompts that belong together (one source message, one user): held out together
    # read as a list of messages (one user turn too), so ``sample`` writes it back as one; not part of what the
    # prompt is (a one-turn list and the plain string are the same prompt)
    listed: bool = field(default=False, compare=False)

    @property
    def messages(self) -> list[dict]:
        return self.turns or [{"role": "user", "content": self.prompt}]

    @property
    def record(self) -> str | list[dict]:
        """The prompt in the form it was read (what ``sample`` writes): the text, or the list of turns."""
        return self.messages if self.listed else self.prompt


def split_turns(turns: list[dict]) -> tuple[str, list[dict] | None]:
    """``(text, turns)`` for Prompt and Ranking: a single user turn is the plain-text prompt it stands for."""
    return turns[-1]["content"], (turns if len(turns) > 1 else None)


def parse_prompt(obj: dict, where: str, errors: list[str]) -> Prompt | None:
    category = nonempty_str(obj, "category", where, errors, required=False)
    group = nonempty_str(obj, "group", where, errors, required=False)
    turns = parse_prompt_field(obj, where, errors)
    if turns is None:
        return None
    text, conversation = split_turns(turns)
    return Prompt(text, category, where, conversation, group, listed=isinstance(obj.get("prompt"), list))


def read_prompts(path: str | Path, split: str = "train", columns: list[str] | tuple = (), at_most: int = 0,
                 seed: int = 0) -> list[Prompt]:
    """Validate and read prompts: ``{"prompt": str or [messages]}``, optional ``"category"`` and ``"group"``
    (``sample`` copies both to its output, so they reach the rankings ``label`` writes). ``at_most`` (> 0): that
    many of them, drawn at random with ``seed`` and kept in file order (``--max-prompts``); every record is
    validated all the same."""
    prompts = read_records(path, parse_prompt, "prompts", split, columns, needs=(("prompt",),))
    if not at_most or at_most >= len(prompts):
        return prompts
    return [prompts[i] for i in sorted(random.Random(seed).sample(range(len(prompts)), at_most))]


# ---------------------------------------------------------------- rankings


@dataclass
class Ranking:
    """K responses to one prompt with their ranks (1 = best; equal ranks are ties and make no pair)."""

    prompt: str  # the text, or a conversational prompt's last user turn
    responses: list[str]
    ranks: list[int]
    category: str | None
    where: str
    turns: list[dict] | None = None  # a conversational prompt's turns; None: one user turn, ``prompt``
    group: str | None = None  # rankings that belong together: train-rm holds them out together

    @property
    def messages(self) -> list[dict]:
        return self.turns or [{"role": "user", "content": self.prompt}]

    def pairs(self) -> list[tuple[int, int]]:
        """All ordered pairs ``(better, worse)`` of response indices; ties skipped. C(K,2) without ties."""
        k = len(self.ranks)
        return [(i, j) if self.ranks[i] < self.ranks[j] else (j, i)
                for i in range(k) for j in range(i + 1, k) if self.ranks[i] != self.ranks[j]]


def _parse_ranked(obj: dict, where: str, errors: list[str]) -> tuple[list[str], list[int]] | None:
    responses, ranks = obj["responses"], obj.get("ranks")
    if not isinstance(responses, list):
        errors.append(f"{where}: responses: must be a list of strings, got {json_type(responses)}")
        return None
    if len(responses) < 2:
        errors.append(f"{where}: responses: need at least 2 responses to rank (K >= 2), got {len(responses)}")
        return None
    n_errors = len(errors)
    for i, r in enumerate(responses):
        if not isinstance(r, str) or not r.strip():
            kind = "empty string" if isinstance(r, str) else json_type(r)
            errors.append(f"{where}: responses[{i}]: must be a non-empty string, got {kind}")
    if "ranks" not in obj:
        errors.append(f"{where}: ranks: missing (one integer per response, 1 = best)")
    elif not isinstance(ranks, list):
        errors.append(f"{where}: ranks: must be a list of integers, got {json_type(ranks)}")
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
    """``{"prompt", "responses", "ranks"}``, or a preference pair (K=2) in any of TRL's forms: see
    :func:`formats.parse_pair`."""
    category = nonempty_str(obj, "category", where, errors, required=False)
    group = nonempty_str(obj, "group", where, errors, required=False)
    if "responses" in obj:
        if "chosen" in obj or "rejected" in obj:
            errors.append(f"{where}: responses: give either responses/ranks or chosen/rejected, not both")
            return None
        turns = parse_prompt_field(obj, where, errors)
        parsed = _parse_ranked(obj, where, errors)
    elif "chosen" in obj or "rejected" in obj:
        turns, parsed = parse_pair(obj, where, errors)
    else:
        errors.append(f"{where}: responses: missing (give responses and ranks, or chosen and rejected)")
        return None
    if turns is None or parsed is None:
        return None
    text, conversation = split_turns(turns)
    return Ranking(text, parsed[0], parsed[1], category, where, conversation, group)


def read_rankings(path: str | Path, split: str = "train", columns: list[str] | tuple = ()) -> list[Ranking]:
    """Validate and read rankings (K responses with ranks, or chosen/rejected pairs), optional ``"category"``
    and ``"group"`` (rankings that share one are held out together: the prompts of one message, one user's)."""
    return read_records(path, parse_ranking, "rankings", split, columns,
                        needs=(("prompt", "responses", "ranks"), ("chosen", "rejected")))


# ---------------------------------------------------------------- pretraining text (PPO-ptx, alignment tax)


def parse_text(obj: dict, where: str, errors: list[str]) -> str | None:
    return nonempty_str(obj, "text", where, errors)


def read_pretrain(path: str | Path, split: str = "train", columns: list[str] | tuple = ()) -> list[str]:
    """Pretraining text: ``{"text": str}`` records (JSONL or a dataset) or a plain ``.txt`` file (paragraphs
    split on blank lines)."""
    p = Path(path)
    if p.suffix == ".txt":
        try:
            text = p.read_text(encoding="utf-8-sig")  # utf-8, without a byte order mark if there is one
        except FileNotFoundError:
            raise BadInput([f"{p}: file not found"]) from None
        except UnicodeDecodeError as e:
            raise BadInput([f"{p}: invalid UTF-8 at byte {e.start}"]) from None
        paragraphs = [t.strip() for t in text.split("\n\n") if t.strip()]
        if not paragraphs:
            raise BadInput([f"{p}: no text found (the file is empty)"])
        return paragraphs
    return read_records(p, parse_text, "texts", split, columns, needs=(("text",),))


