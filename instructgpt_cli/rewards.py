"""Reward models: their scalar scores of token sequences, in the row layout that pays (padded rows, sequences
packed end to end, or a ranking's K responses sharing their prompt's row), and the held-out record train-rm
saves with them."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .batches import (common_prefix, mask_inputs, pack, packed_columns, pad_right, padded_columns, pays_to_pack,
                      pays_to_share, shared_prefix_mask, shared_rows)
from .families import backbone, unwrapped
from .forward import REWARD_BIAS, layers_above, lower_states, read_scores, reward_pool, scalar_head_outputs

REWARD_STATS = "igpt_reward_stats"  # config field: train-rm's held-out loss, accuracy and its interval
# train-rm --ensemble N: the other members' stages under RUN_DIR/rm/members/, listed in RUN_DIR/rm/ensemble.json
MEMBERS, ENSEMBLE = "members", "ensemble.json"


def ensemble_members(rm_path: Path) -> list[Path]:
    """The other members of the ensemble ``rm_path`` (a ``final/`` of train-rm --ensemble N) belongs to, their
    final/ directories in order; [] for a reward model trained alone (or by another tool)."""
    import json

    listing = Path(rm_path).parent / ENSEMBLE
    if Path(rm_path).name != "final" or not listing.is_file():
        return []
    return [listing.parent / m for m in json.loads(listing.read_text(encoding="utf-8"))["members"]]


def ensemble_objective(member_scores: torch.Tensor, objective: str, std_coef: float) -> torch.Tensor:
    """The score PPO optimises (B,) from an ensemble's member scores (B, M): their ``mean``, their ``min``, or
    ``mean-std``, the mean less ``std_coef`` sample standard deviations over the members (0 for one member).
    Coste et al. 2023 ("Reward model ensembles help mitigate overoptimization") optimise the mean (an
    ensemble average), the worst case, and an uncertainty-penalised mean (theirs subtracts the variance; the
    standard deviation keeps the penalty in reward units)."""
    if objective == "min":
        return member_scores.min(dim=1).values
    mean = member_scores.mean(dim=1)
    if objective == "mean" or member_scores.shape[1] < 2:
        return mean
    return mean - std_coef * member_scores.std(dim=1)


def reward_stats(path: Path) -> dict | None:
    """The held-out record train-rm saved with a reward model (``config.json``), or None (another tool's RM)."""
    import json

    try:
        stats = json.loads((Path(path) / "config.json").read_text(encoding="utf-8")).get(REWARD_STATS)
    except (OSError, ValueError):
        return None
    return stats if isinstance(stats, dict) else None


def reward_scores(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  starts: list[int] | None = None) -> torch.Tensor:
    """Normalised scalar rewards (B,) of right-padded sequences, read at each one's last real token (or, with
    ``starts``, where each response starts, the mean over the response: ``forward.read_scores``).

    The scalar head of a transformers sequence classifier has no bias, so the normalisation the paper
    applies before RL is stored as ``config.igpt_reward_bias`` and added here, in fp32 as the packed and shared
    layouts add it (``forward.scalar_head_outputs``): in bf16 a bias of 5 leaves steps of 1/32 between scores,
    so distinct scores would tie and count as wrong pairs.
    """
    if starts is not None:
        head = scalar_head_outputs(model, input_ids=input_ids, **mask_inputs(attention_mask))
        return read_scores(head.flatten(), padded_columns(attention_mask.sum(1).tolist(), head.size(1)), starts)
    logits = model(input_ids=input_ids, **mask_inputs(attention_mask), use_cache=False).logits[:, 0]
    return logits.float() + getattr(model.config, REWARD_BIAS, 0.0)


class Layout(NamedTuple):
    """How a micro-batch of rankings may be laid out for its forward pass (each used only where it pays)."""

    shared: bool = False  # one row per ranking, the prompt its K responses start with run once
    packed: bool = False  # all sequences end to end in one row, no padding


class Rows(NamedTuple):
    """One forward's inputs for a list of sequences in one of the row layouts, and where each sequence's tokens
    sit in it."""

    inputs: dict  # input_ids (G, L), and position_ids and an attention mask where the layout needs them
    columns: list[list[int]]  # flat index (row * L + column) of every token of every sequence, in order
    padding: Any = None  # right-padded rows' attention mask (G, L): any sequence classifier scores them itself


def padded_rows(seqs: list[list[int]], pad_id: int, device: torch.device) -> Rows:
    """Right-padded rows, one a sequence."""
    ids, mask = pad_right(seqs, pad_id)
    return Rows({"input_ids": ids.to(device), **mask_inputs(mask.to(device))},
                padded_columns([len(s) for s in seqs], ids.size(1)), mask.to(device))


def packed_rows(seqs: list[list[int]], device: torch.device) -> Rows:
    """The sequences end to end in one row (``batches.pack``: no padding, each attends only to itself)."""
    ids, positions = pack(seqs)
    return Rows({"input_ids": ids.to(device), "position_ids": positions.to(device)}, packed_columns(seqs))


def prefix_shared_rows(model: Any, groups: list[list[list[int]]], pad_id: int, device: torch.device) -> Rows:
    """Groups of sequences with a common prefix (a ranking's K responses to one prompt): one row per group with
    the prefix once (``batches.shared_rows``), each sequence attending to the prefix and to itself only."""
    rows = shared_rows(groups, pad_id)
    mask = shared_prefix_mask(rows.segments.to(device))
    if model.config._attn_implementation == "eager":  # eager attention adds its mask to the scores
        dtype = next(model.parameters()).dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, torch.finfo(dtype).min)
    return Rows({"input_ids": rows.input_ids.to(device), "position_ids": rows.position_ids.to(device),
                 "attention_mask": mask}, rows.columns)


def ranking_rows(model: Any, rankings: list[list[list[int]]], pad_id: int, device: torch.device, layout: Layout,
                 batch_size: int | None = None) -> list[tuple[Rows, slice]]:
    """The forwards that score ``rankings`` (each a prompt's K sequences), each with the slice of the flat list of
    sequences it holds: the one place that picks the row layout. ``layout.shared`` and sharing saves a tenth of
    the tokens: one row per ranking with its prompt once; else ``layout.packed`` and padding would waste a tenth:
    one packed row; else right-padded rows, ``batch_size`` at a time (None: all at once)."""
    seqs = [s for ranking in rankings for s in ranking]
    if layout.shared and pays_to_share(rankings):
        return [(prefix_shared_rows(model, rankings, pad_id, device), slice(0, len(seqs)))]
    if layout.packed and pays_to_pack([len(q) for q in seqs]):
        return [(packed_rows(seqs, device), slice(0, len(seqs)))]
    size = batch_size or max(len(seqs), 1)
    return [(padded_rows(seqs[a:a + size], pad_id, device), slice(a, a + size)) for a in range(0, len(seqs), size)]


class FrozenStates:
    """The output of a reward model's ``layers`` lowest decoder layers, which hold nothing that trains (LoRA on
    the top layers only, ``families.frozen_layers``), for every sequence of the rankings it has seen: computed
    the first time a forward needs them, and from then on only the layers above run. Epochs after the first,
    every held-out evaluation, an ensemble's other members and a sweep's other trials (built from the same
    initial model, so the same frozen layers) pay for the layers above only.

    Each ranking's states are computed from that ranking alone, in the layout ``ranking_rows`` gives it alone,
    so they are the same numbers whichever batch first asks for them: a resumed run reads what an
    uninterrupted one read. Kept on the model's device, about ``tokens x hidden x dtype bytes`` (the stage
    sizes it before it starts, :func:`frozen_states_bytes`)."""

    def __init__(self, layers: int):
        self.layers = layers
        # sequence's tokens -> (its ranking's states (N, H) at each distinct token, this sequence's rows in them)
        self._seqs: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._seqs)

    @property
    def nbytes(self) -> int:
        """The bytes of the states held (each ranking's once, however many sequences read them)."""
        return sum(t.nbytes for t in {id(states): states for states, _ in self._seqs.values()}.values())

    @torch.no_grad()
    def fill(self, model: Any, rankings: list[list[list[int]]], pad_id: int, device: torch.device,
             layout: Layout) -> None:
        """Compute the states of every sequence of ``rankings`` not held yet, one ranking at a time."""
        for ranking in rankings:
            if all(tuple(s) in self._seqs for s in ranking):
                continue
            (rows, _), = ranking_rows(model, [ranking], pad_id, device, layout)
            flat = lower_states(model, self.layers, **rows.inputs).flatten(0, 1)
            used = sorted({c for cols in rows.columns for c in cols})  # a shared prefix's columns once
            states = flat[torch.tensor(used, device=flat.device)].clone()
            where = {c: i for i, c in enumerate(used)}
            for s, cols in zip(ranking, rows.columns):
                self._seqs[tuple(s)] = (states, torch.tensor([where[c] for c in cols], device=flat.device))

    def embeds(self, seqs: list[list[int]], rows: Rows) -> torch.Tensor:
        """The states (G, L, H) entering layer ``layers`` for ``rows`` of ``seqs`` (every one held: :meth:`fill`);
        padding positions are zeros, which no real token attends to."""
        shape = rows.inputs["input_ids"].shape
        parts = [self._seqs[tuple(s)] for s in seqs]
        source = torch.cat([states.index_select(0, rows_of) for states, rows_of in parts])
        flat = source.new_zeros(shape[0] * shape[1], source.size(1))
        # a shared prefix's columns are written once per sequence, always with the same states
        flat[torch.tensor([c for cols in rows.columns for c in cols], device=source.device)] = source
        return flat.view(*shape, -1)


@torch.no_grad()
def frozen_weights_key(model: Any, layers: int) -> tuple:
    """What identifies the weights of ``model``'s embeddings and ``layers`` lowest decoder layers, for models
    that may share :class:`FrozenStates`: each tensor's shape, dtype, float64 sum and a strided sample of its
    values (a pass over the weights; equal keys of different weights would take values chosen to collide)."""
    stack = backbone(model)
    params = [*stack.embed_tokens.parameters(), *(p for layer in stack.layers[:layers] for p in layer.parameters())]
    digest = hashlib.sha256()
    for p in params:
        flat = p.detach().flatten()
        digest.update(f"{tuple(p.shape)}{p.dtype}{flat.double().sum().item()!r}".encode())
        digest.update(flat[::1009].float().cpu().numpy().tobytes())
    return layers, digest.hexdigest()


def frozen_states_bytes(model: Any, layers: int, rankings: list[list[list[int]]], layout: Layout) -> int:
    """How many bytes :class:`FrozenStates` holds for ``rankings``: a state (hidden size x the weights' dtype)
    per distinct token of each ranking (its prompt once where ``layout.shared`` and sharing pays for it alone)."""
    param = next(model.parameters())
    per_token = unwrapped(model).config.hidden_size * param.element_size()
    tokens = sum(sum(len(s) for s in ranking) - (len(ranking) - 1) * (common_prefix(ranking) if shared else 0)
                 for ranking in rankings
                 for shared in [layout.shared and pays_to_share([ranking])])  # as FrozenStates.fill lays it out
    return tokens * per_token if layers else 0


def head_outputs(model: Any, seqs: list[list[int]], rows: Rows, frozen: FrozenStates | None) -> torch.Tensor:
    """The scalar head (G, L) over ``rows`` of ``seqs``: the whole model, or with ``frozen`` only the layers above
    its cached states."""
    if frozen is None:
        return scalar_head_outputs(model, **rows.inputs)
    rest = {k: v for k, v in rows.inputs.items() if k != "input_ids"}
    with layers_above(model, frozen.layers):
        return scalar_head_outputs(model, inputs_embeds=frozen.embeds(seqs, rows), **rest)


def ranking_scores(model: Any, rankings: list[list[list[int]]], pad_id: int, device: torch.device,
                   layout: Layout, batch_size: int | None = None, starts: list[int] | None = None,
                   frozen: FrozenStates | None = None) -> torch.Tensor:
    """Normalised rewards (N,) of every sequence of ``rankings`` (each a prompt's K sequences, prompt +
    response + EOS), in order, in the row layout that pays (:func:`ranking_rows`). ``starts``: where each
    sequence's response starts, which a model that pools over the response (``forward.REWARD_POOL``) needs and
    any other ignores. ``frozen``: the model's frozen layers' states, computed here where missing and reused."""
    seqs = [s for ranking in rankings for s in ranking]
    if reward_pool(model) != "mean":
        starts = None
    elif starts is None or len(starts) != len(seqs):
        raise ValueError("a reward model that pools over the response needs where each response starts")
    if frozen is not None:
        frozen.fill(model, rankings, pad_id, device, layout)
    out = []
    for rows, part in ranking_rows(model, rankings, pad_id, device, layout, batch_size):
        if frozen is None and starts is None and rows.padding is not None:  # the model's own read of its last token
            out.append(reward_scores(model, rows.inputs["input_ids"], rows.padding))
            continue
        head = head_outputs(model, seqs[part], rows, frozen)
        out.append(read_scores(head.flatten(), rows.columns, None if starts is None else starts[part]))
    return torch.cat(out)


def packed_reward_scores(model: Any, seqs: list[list[int]], device: torch.device,
                         starts: list[int] | None = None) -> torch.Tensor:
    """Normalised rewards (N,) of token sequences packed into one row (:func:`packed_rows`), read at each one's
    last token (or, with ``starts``, over its response)."""
    rows = packed_rows(seqs, device)
    return read_scores(scalar_head_outputs(model, **rows.inputs).flatten(), rows.columns, starts)


def shared_reward_scores(model: Any, groups: list[list[list[int]]], pad_id: int, device: torch.device,
                         starts: list[int] | None = None) -> torch.Tensor:
    """Normalised rewards (N,) of groups of sequences with a common prefix, one row per group
    (:func:`prefix_shared_rows`), read at every sequence's last token (or, with ``starts``, over its response)."""
    rows = prefix_shared_rows(model, groups, pad_id, device)
    return read_scores(scalar_head_outputs(model, **rows.inputs).flatten(), rows.columns, starts)


@torch.no_grad()
def score_sequences(model: Any, seqs: list[list[int]], pad_id: int, batch_size: int,
                    starts: list[int] | None = None) -> torch.Tensor:
    """Normalised reward-model scores (N,) of token sequences (prompt + response + EOS, each response from
    ``starts``) on the CPU, in eval mode, as right-padded rows ``batch_size`` at a time."""
    was_training = model.training
    model.eval()
    scores = ranking_scores(model, [seqs], pad_id, next(model.parameters()).device, Layout(), batch_size, starts)
    model.train(was_training)
    return scores.float().cpu()
