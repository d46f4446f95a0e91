"""From validated records to model inputs: tokenising demonstrations, rankings, prompts and pretraining
text (prompt tokens masked with IGNORE_INDEX, context limits checked), and laying token sequences out as
batches: right- or left-padded rows, sequences packed end to end, a ranking's responses sharing their
prompt's row, and the attention masks and positions that go with each. Torch is imported lazily."""
from __future__ import annotations

from typing import Any, NamedTuple

from .data import Demo, Prompt, Ranking
from .errors import BadInput


IGNORE_INDEX = -100  # label of a token that takes no loss (prompt and padding)


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


def hold_out(items: list, fraction: float, seed: int, groups: list | None = None) -> tuple[list, list]:
    """``(train, held out)``: a seeded permutation of whole items (a ranking's pairs stay on one side), the
    first ``fraction`` of it held out; at least one item trains.

    With ``groups`` (one key per item; None: the item is a group of its own) the permutation is of the
    groups and whole groups are held out, the first ``fraction`` of them (at least one trains): items that
    share a key are never on both sides, as the paper splits its data by user ID so that no user's prompts
    are both trained on and evaluated (Ouyang et al. 2022, sec. 3.2). Without keys this is the split by item
    above, the same one for the same seed."""
    import torch

    keys = [(i,) if groups is None or groups[i] is None else groups[i] for i in range(len(items))]
    members: dict = {}
    for i, k in enumerate(keys):
        members.setdefault(k, []).append(i)
    order = list(members)
    n_val = min(int(len(order) * fraction), len(order) - 1) if fraction > 0 else 0
    perm = torch.randperm(len(order), generator=torch.Generator().manual_seed(seed)).tolist()
    pick = lambda part: [items[i] for g in part for i in members[order[g]]]  # noqa: E731
    return pick(perm[n_val:]), pick(perm[:n_val])


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


def pays_to_share(groups: list[list[list[int]]]) -> bool:
    """Whether running each group's common prefix once saves at least 10% of the tokens, with an attention
    mask of at most ``SHARED_MASK_LIMIT`` elements."""
    prefixes = [common_prefix(seqs) for seqs in groups]
    total = sum(len(s) for seqs in groups for s in seqs)
    saved = sum((len(seqs) - 1) * p for seqs, p in zip(groups, prefixes))
    row = max(sum(len(s) for s in seqs) - (len(seqs) - 1) * p for seqs, p in zip(groups, prefixes))
    return saved >= 0.1 * total and len(groups) * row * row <= SHARED_MASK_LIMIT


SHARED_MASK_LIMIT = 1 << 26  # attention-mask elements (rows x L x L) a prefix-shared micro-batch may build


class SharedRows(NamedTuple):
    """Groups of sequences that start alike, one row each: the common prefix once, then every sequence's own
    tokens one after the other (right-padded to the longest row)."""

    input_ids: Any     # (G, L)
    position_ids: Any  # (G, L): a sequence's own tokens continue from the end of the prefix
    segments: Any      # (G, L): 0 the prefix, j + 1 the own tokens of the group's j-th sequence, -1 padding
    columns: list[list[int]]  # flat index of every token of every sequence (its prefix's, then its own), in order


def shared_rows(groups: list[list[list[int]]], pad_id: int) -> SharedRows:
    """Build :class:`SharedRows`. Under the mask of :func:`shared_prefix_mask` a sequence's last token
    sees exactly what it sees alone (the prefix at positions 0..p-1, then its own tokens): a causal model
    gives it the same output, and the prefix is computed (and back-propagated) once for all K."""
    import torch

    rows, positions, segments, cols = [], [], [], []  # cols: (row, column) of every token of every sequence
    for g, seqs in enumerate(groups):
        p = common_prefix(seqs)
        ids, pos, seg = list(seqs[0][:p]), list(range(p)), [0] * p
        for j, s in enumerate(seqs):
            cols.append([(g, i) for i in range(p)] + [(g, len(ids) + i) for i in range(len(s) - p)])
            ids += s[p:]
            pos += range(p, len(s))
            seg += [j + 1] * (len(s) - p)
        rows.append(ids), positions.append(pos), segments.append(seg)
    width = max(len(r) for r in rows)
    padded = lambda xs, fill: torch.tensor([x + [fill] * (width - len(x)) for x in xs], dtype=torch.long)  # noqa: E731
    columns = [[g * width + col for g, col in c] for c in cols]
    return SharedRows(padded(rows, pad_id), padded(positions, 0), padded(segments, -1), columns)


def packed_columns(seqs: list[list[int]]) -> list[list[int]]:
    """The index of every token of every sequence in :func:`pack`'s row, in order."""
    out, start = [], 0
    for s in seqs:
        out.append(list(range(start, start + len(s))))
        start += len(s)
    return out


def padded_columns(lengths: list[int], width: int) -> list[list[int]]:
    """The flat index (row * width + column) of every token of every sequence in rows padded to ``width``."""
    return [[n * width + i for i in range(length)] for n, length in enumerate(lengths)]


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


class RankedGroup(NamedTuple):
    """A tokenised ranking: K sequences (prompt + response + EOS), the (better, worse) pairs, and how many
    tokens the prompt takes (where each response starts)."""

    sequences: list[list[int]]
    pairs: list[tuple[int, int]]
    prompt_len: int

    def starts(self) -> list[int]:
        """Where each sequence's response starts (a reward model that pools over the response reads from there)."""
        return [self.prompt_len] * len(self.sequences)


def tokenize_scored(tokenizer: Any, messages: list[dict], responses: list[str], max_len: int, where: str,
                    errors: list[str]) -> tuple[list[list[int]], int, int] | None:
    """(prompt + response + EOS for each response, the form a reward model scores; how many were cut; the
    prompt's length in tokens). Responses that do not fit are cut; a prompt that leaves no room is an error
    naming its line."""
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
    return seqs, cut, len(prompt_ids)


def tokenize_rankings(tokenizer: Any, rankings: list[Ranking], max_len: int) -> tuple[list[RankedGroup], int]:
    errors: list[str] = []
    groups, truncated = [], 0
    for r in rankings:
        out = tokenize_scored(tokenizer, r.messages, r.responses, max_len, r.where, errors)
        if out is not None:
            groups.append(RankedGroup(out[0], r.pairs(), out[2]))
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


def pretrain_blocks(tokenizer: Any, texts: list[str], seq_len: int) -> list[list[int]]:
    """Concatenate the texts (EOS between documents) and cut them into blocks of ``seq_len`` tokens,
    as GPT-style pretraining batches are made; a final block shorter than 2 tokens is dropped."""
    stream: list[int] = []
    for t in texts:
        stream += tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return [stream[i:i + seq_len] for i in range(0, len(stream), seq_len) if len(stream[i:i + seq_len]) >= 2]


def mask_inputs(attention_mask: Any) -> dict:
    """``attention_mask`` and ``position_ids`` for a forward on a batch with this mask, or neither when no
    row is padded on the left. A right pad comes after every real token of its row, so under causal
    attention no real token sees it, and real tokens sit at positions 0, 1, ... anyway: the model's outputs
    at real tokens are the same, and attention runs unmasked (SDPA's causal kernel, no 4-D mask built).
    What pads themselves output is never read (losses and scores are masked or read at real tokens)."""
    if bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()):
        return {}
    return {"attention_mask": attention_mask, "position_ids": position_ids(attention_mask)}


def position_ids(attention_mask: Any) -> Any:
    """Positions that skip padding (B, T): under left padding the first real token is position 0, as
    transformers' generate assigns them, so scoring sees what generation saw."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
