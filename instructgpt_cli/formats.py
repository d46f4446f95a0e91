"""The fields of a record, checked one by one with every problem recorded as ``WHERE: field: reason``:
non-empty strings, chat turns (``{role, content}`` messages), prompts and replies that are either text or
turns, and the preference pairs of TRL's dataset formats, with an explicit prompt or an implicit one shared
by ``chosen`` and ``rejected`` (TRL's ``maybe_extract_prompt``). ``data.py`` builds records from them."""
from __future__ import annotations

from typing import Any

ROLES = ("system", "user", "assistant")


def json_type(value: Any) -> str:
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
        kind = "empty string" if isinstance(value, str) else json_type(value)
        errors.append(f"{where}: {key}: must be a non-empty string, got {kind}")
        return None
    return value


def check_turns(msgs: Any, key: str, where: str, errors: list[str]) -> list[dict] | None:
    """``msgs`` as ``[{"role", "content"}, ...]`` (other keys dropped) if it is a non-empty list of messages
    with known roles and non-empty content; otherwise record every problem under ``key``."""
    if not isinstance(msgs, list) or not msgs:
        errors.append(f"{where}: {key}: must be a non-empty list of {{role, content}} objects")
        return None
    n_errors = len(errors)
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            errors.append(f"{where}: {key}[{i}]: expected an object, got {json_type(m)}")
            continue
        role = m.get("role")
        if role not in ROLES:
            errors.append(f"{where}: {key}[{i}].role: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        nonempty_str(m, "content", f"{where}: {key}[{i}]", errors)
    if len(errors) > n_errors:
        return None
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def prompt_turns(turns: list[dict], key: str, where: str, errors: list[str]) -> list[dict] | None:
    """A conversation the model answers next: it must end with a user turn (the chat template then opens
    the assistant's reply)."""
    if turns[-1]["role"] != "user":
        errors.append(f"{where}: {key}[{len(turns) - 1}].role: a prompt must end with a user turn, "
                      f"got {turns[-1]['role']!r}")
        return None
    return turns


def parse_prompt_field(obj: dict, where: str, errors: list[str], key: str = "prompt") -> list[dict] | None:
    """A prompt as chat turns: a non-empty string is one user turn; a list of messages (TRL's conversational
    prompt) is kept as it is, to be rendered with the model's chat template."""
    if isinstance(obj.get(key), list):
        turns = check_turns(obj[key], key, where, errors)
        return prompt_turns(turns, key, where, errors) if turns else None
    text = nonempty_str(obj, key, where, errors)
    return [{"role": "user", "content": text}] if text is not None else None


def parse_reply(obj: dict, key: str, where: str, errors: list[str]) -> str | None:
    """A response: a non-empty string, or (conversational) a list holding one assistant message."""
    value = obj.get(key)
    if not isinstance(value, list):
        return nonempty_str(obj, key, where, errors)
    turns = check_turns(value, key, where, errors)
    if turns is None:
        return None
    if len(turns) != 1 or turns[0]["role"] != "assistant":
        errors.append(f"{where}: {key}: expected one assistant message, got "
                      f"{', '.join(t['role'] for t in turns)}")
        return None
    return turns[0]["content"]


def parse_pair(obj: dict, where: str, errors: list[str]) -> tuple[list[dict] | None, Any]:
    """``(prompt turns, ([chosen, rejected], [1, 2]))`` of a preference pair: an explicit ``prompt`` with
    ``chosen``/``rejected`` texts or one-assistant-message lists, or the implicit-prompt form where both hold
    the whole text or conversation and the prompt is what they share (TRL's ``maybe_extract_prompt``: a
    ``prompt`` of the other kind than ``chosen`` is ignored, as there)."""
    for key in ("chosen", "rejected"):
        if key not in obj:
            errors.append(f"{where}: {key}: missing")
    if "chosen" not in obj or "rejected" not in obj:
        return None, None
    chosen = obj["chosen"]
    if "prompt" in obj and isinstance(obj["prompt"], list) == isinstance(chosen, list):
        turns = parse_prompt_field(obj, where, errors)
        pair = [parse_reply(obj, "chosen", where, errors), parse_reply(obj, "rejected", where, errors)]
    elif isinstance(chosen, list):
        turns, pair = _implicit_turns(obj, where, errors)
    else:
        pair = [nonempty_str(obj, "chosen", where, errors), nonempty_str(obj, "rejected", where, errors)]
        if None in pair:
            return None, None
        p = common_prompt(pair[0], pair[1])
        if not pair[0][:p].strip():
            errors.append(f"{where}: prompt: missing, and chosen and rejected share no prompt text to take as one")
            return None, None
        turns, pair = [{"role": "user", "content": pair[0][:p]}], [pair[0][p:], pair[1][p:]]
        for key, text in zip(("chosen", "rejected"), pair):
            if not text.strip():
                errors.append(f"{where}: {key}: nothing after the prompt it shares with the other response")
                return None, None
    if turns is None or None in pair:
        return None, None
    if pair[0].strip() == pair[1].strip():
        errors.append(f"{where}: rejected: identical to chosen")
        return None, None
    return turns, (pair, [1, 2])


def common_prompt(chosen: Any, rejected: Any) -> int:
    """Length of the implicit prompt: the longest common prefix, minus a space that ends it (the space
    starts the responses), as TRL's ``extract_prompt``."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    return n - 1 if n and isinstance(chosen, str) and chosen[n - 1] == " " else n


def _implicit_turns(obj: dict, where: str, errors: list[str]) -> tuple[list[dict] | None, list]:
    """Conversational implicit prompt: the turns chosen and rejected share, then one assistant turn each."""
    chosen = check_turns(obj["chosen"], "chosen", where, errors)
    rejected = check_turns(obj["rejected"], "rejected", where, errors) if isinstance(obj["rejected"], list) else None
    if not isinstance(obj["rejected"], list):
        errors.append(f"{where}: rejected: must be a list of messages like chosen, got {json_type(obj['rejected'])}")
    if chosen is None or rejected is None:
        return None, [None]
    p = common_prompt(chosen, rejected)
    if p == 0:
        errors.append(f"{where}: prompt: missing, and chosen and rejected share no opening turns to take as one")
        return None, [None]
    turns = prompt_turns(chosen[:p], "chosen", where, errors)
    pair = [parse_reply({k: v[p:]}, k, where, errors) for k, v in (("chosen", chosen), ("rejected", rejected))]
    return turns, pair
