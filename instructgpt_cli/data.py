"""JSONL records, line-accurate validation, tokenisation and collation.

Every reader checks the whole file and raises one :class:`BadInput` listing every bad line as
``FILE:LINE: field: reason``; nothing is written by a stage before its inputs pass.
Torch is imported lazily (collation only), so validation runs without it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

from .errors import BadInput

ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100  # label of a token that takes no loss (prompt and padding)


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


class Example(NamedTuple):
    """A tokenised training sequence: ``labels`` is ``input_ids`` with prompt tokens set to IGNORE_INDEX."""

    input_ids: list[int]
    labels: list[int]


def render_prompt(tokenizer: Any, messages: list[dict]) -> list[int]:
    """Token ids of the chat-templated prompt, ending with the assistant header the model answers after."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_response(tokenizer: Any, response: str) -> list[int]:
    """Response ids followed by EOS: the model learns to stop, as generation will ask it to."""
    return tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def tokenize_demos(tokenizer: Any, demos: list[Demo], max_len: int) -> tuple[list[Example], int]:
    """Tokenise prompt and response separately (as generation sees them) and mask the prompt.

    A prompt that leaves no room for a response is an error naming its line; a response that does not
    fit is cut at ``max_len``. Returns the examples and how many responses were cut.
    """
    errors: list[str] = []
    examples: list[Example] = []
    truncated = 0
    for d in demos:
        prompt_ids = render_prompt(tokenizer, d.messages)
        if len(prompt_ids) >= max_len:
            field = "prompt" if len(d.messages) == 1 else "messages"
            errors.append(f"{d.where}: {field}: {len(prompt_ids)} tokens with the chat template, longer than "
                          f"the context window ({max_len} tokens; see model.max_seq_len)")
            continue
        response_ids = encode_response(tokenizer, d.response)
        ids = (prompt_ids + response_ids)[:max_len]
        truncated += len(prompt_ids) + len(response_ids) > max_len
        examples.append(Example(ids, [IGNORE_INDEX] * len(prompt_ids) + ids[len(prompt_ids):]))
    if errors:
        raise BadInput(errors)
    return examples, truncated


def collate(examples: list[Example], pad_id: int) -> dict:
    """Right-pad a list of examples into ``input_ids``, ``attention_mask``, ``labels`` tensors (B, T)."""
    ids, mask = pad_right([e.input_ids for e in examples], pad_id)
    labels, _ = pad_right([e.labels for e in examples], IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pays_to_pack(lengths: list[int]) -> bool:
    """Whether packing beats padding: padding would waste at least 10% of the tokens. (A packed row's
    attention spans all its tokens, masked block-diagonally, which costs more than causal attention over
    rows of one length, so equal lengths are padded — with nothing to pad.)"""
    return len(lengths) > 1 and sum(lengths) <= 0.9 * len(lengths) * max(lengths)


def pack(seqs: list[list[int]]) -> tuple[Any, Any]:
    """Token lists end to end in one row: (input_ids, position_ids), each (1, N), positions restarting at
    0 for every sequence. With no attention mask, transformers reads that as packed sequences and masks
    attention block-diagonally, so each sequence sees only itself and no compute is spent on padding."""
    import torch

    ids = [t for s in seqs for t in s]
    positions = [i for s in seqs for i in range(len(s))]
    return torch.tensor([ids], dtype=torch.long), torch.tensor([positions], dtype=torch.long)


def common_prefix(seqs: list[list[int]]) -> int:
    """How many leading tokens every sequence shares, leaving each at least its last token of its own."""
    n = min(len(s) for s in seqs) - 1
    first = seqs[0]
    for i in range(n):
        if any(s[i] != first[i] for s in seqs[1:]):
            return i
    return n


SHARED_MASK_LIMIT = 1 << 26  # attention-mask elements (rows x L x L) a prefix-shared micro-batch may build


def pays_to_share(groups: list[list[list[int]]]) -> bool:
    """Whether running each group's common prefix once saves at least 10% of the tokens, with an attention
    mask of at most ``SHARED_MASK_LIMIT`` elements."""
    prefixes = [common_prefix(seqs) for seqs in groups]
    total = sum(len(s) for seqs in groups for s in seqs)
    saved = sum((len(seqs) - 1) * p for seqs, p in zip(groups, prefixes))
    row = max(sum(len(s) for s in seqs) - (len(seqs) - 1) * p for seqs, p in zip(groups, prefixes))
    return saved >= 0.1 * total and len(groups) * row * row <= SHARED_MASK_LIMIT


class SharedRows(NamedTuple):
    """Groups of sequences that start alike, one row each: the common prefix once, then every sequence's own
    tokens one after the other (right-padded to the longest row)."""

    input_ids: Any     # (G, L)
    position_ids: Any  # (G, L): a sequence's own tokens continue from the end of the prefix
    segments: Any      # (G, L): 0 the prefix, j + 1 the own tokens of the group's j-th sequence, -1 padding
    ends: Any          # (N,): flat index (row * L + column) of every sequence's last token, groups in order


def shared_rows(groups: list[list[list[int]]], pad_id: int) -> SharedRows:
    """Build :class:`SharedRows`. Under the mask of :func:`shared_prefix_mask` a sequence's last token
    sees exactly what it sees alone (the prefix at positions 0..p-1, then its own tokens): a causal model
    gives it the same output, and the prefix is computed (and back-propagated) once for all K."""
    import torch

    rows, positions, segments, ends = [], [], [], []
    for g, seqs in enumerate(groups):
        p = common_prefix(seqs)
        ids, pos, seg = list(seqs[0][:p]), list(range(p)), [0] * p
        for j, s in enumerate(seqs):
            ids += s[p:]
            pos += range(p, len(s))
            seg += [j + 1] * (len(s) - p)
            ends.append((g, len(ids) - 1))
        rows.append(ids), positions.append(pos), segments.append(seg)
    width = max(len(r) for r in rows)
    padded = lambda xs, fill: torch.tensor([x + [fill] * (width - len(x)) for x in xs], dtype=torch.long)  # noqa: E731
    return SharedRows(padded(rows, pad_id), padded(positions, 0), padded(segments, -1),
                      torch.tensor([g * width + col for g, col in ends]))


def shared_prefix_mask(segments: Any) -> Any:
    """Boolean attention mask (G, 1, L, L), True = may attend: causal, and a token sees the prefix and its
    own segment only. Padding sees the prefix and the padding before it (never an empty row)."""
    import torch

    L = segments.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=segments.device).tril()
    seg_q, seg_k = segments[:, :, None], segments[:, None, :]
    return (causal & ((seg_k == 0) | (seg_k == seg_q)))[:, None]


def collate_packed(examples: list[Example]) -> dict:
    """Examples packed into one row (see :func:`pack`): ``input_ids``, ``position_ids``, ``labels`` (1, N).
    An example's first label is ignored: it would be predicted from the one before."""
    import torch

    ids, positions = pack([e.input_ids for e in examples])
    labels = [t for e in examples for t in [IGNORE_INDEX] + e.labels[1:]]
    return {"input_ids": ids, "position_ids": positions, "labels": torch.tensor([labels], dtype=torch.long)}


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


def render_queries(tokenizer: Any, prompts: list[Prompt], max_new_tokens: int, context: int | None) -> list[list[int]]:
    """The chat-templated prompts as generation reads them (token ids), checked against the context: a
    prompt whose tokens plus ``max_new_tokens`` exceed ``context`` cannot be answered in full (positions
    past the model's limit are untrained, or fail), so every such prompt is an error naming its line, all
    reported at once, as sft and train-rm refuse inputs that do not fit. ``context`` None: no limit known."""
    errors: list[str] = []
    queries = [render_prompt(tokenizer, p.messages) for p in prompts]
    for p, q in zip(prompts, queries):
        if context is not None and len(q) + max_new_tokens > context:
            errors.append(f"{p.where}: prompt: {len(q)} tokens + max_new_tokens {max_new_tokens} exceed the context "
                          f"of {context} tokens")
    if errors:
        raise BadInput(errors)
    return queries


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


class RankedGroup(NamedTuple):
    """A tokenised ranking: K sequences (prompt + response + EOS) and the (better, worse) pairs."""

    sequences: list[list[int]]
    pairs: list[tuple[int, int]]


def tokenize_scored(tokenizer: Any, messages: list[dict], responses: list[str], max_len: int, where: str,
                    errors: list[str]) -> tuple[list[list[int]], int] | None:
    """prompt + response + EOS for each response, the form a reward model scores (at the last token).
    Responses that do not fit are cut; a prompt that leaves no room is an error naming its line."""
    prompt_ids = render_prompt(tokenizer, messages)
    if len(prompt_ids) >= max_len:
        errors.append(f"{where}: prompt: {len(prompt_ids)} tokens with the chat template, longer than the "
                      f"context window ({max_len} tokens; see model.max_seq_len)")
        return None
    seqs, cut = [], 0
    for r in responses:
        ids = prompt_ids + encode_response(tokenizer, r)
        cut += len(ids) > max_len
        seqs.append(ids[:max_len])
    return seqs, cut


def tokenize_rankings(tokenizer: Any, rankings: list[Ranking], max_len: int) -> tuple[list[RankedGroup], int]:
    errors: list[str] = []
    groups, truncated = [], 0
    for r in rankings:
        out = tokenize_scored(tokenizer, r.messages, r.responses, max_len, r.where, errors)
        if out is not None:
            groups.append(RankedGroup(out[0], r.pairs()))
            truncated += out[1]
    if errors:
        raise BadInput(errors)
    return groups, truncated


def pad(seqs: list[list[int]], pad_id: int, side: str) -> tuple[Any, Any]:
    """Pad token lists into (input_ids, attention_mask), each (B, T), on the ``side`` 'left' (what
    generation wants: new tokens start in the same column) or 'right'."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, cols] = torch.tensor(s, dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


def pad_left(seqs: list[list[int]], pad_id: int) -> tuple[Any, Any]:
    return pad(seqs, pad_id, "left")


def pad_right(seqs: list[list[int]], pad_id: int) -> tuple[Any, Any]:
    return pad(seqs, pad_id, "right")


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


def pretrain_blocks(tokenizer: Any, texts: list[str], seq_len: int) -> list[list[int]]:
    """Concatenate the texts (EOS between documents) and cut them into blocks of ``seq_len`` tokens,
    as GPT-style pretraining batches are made; a final block shorter than 2 tokens is dropped."""
    stream: list[int] = []
    for t in texts:
        stream += tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return [stream[i:i + seq_len] for i in range(0, len(stream), seq_len) if len(stream[i:i + seq_len]) >= 2]
