"""Reward models: their scalar scores of token sequences, in the row layout that pays (padded rows, sequences
packed end to end, or a ranking's K responses sharing their prompt's row), and the held-out record train-rm
saves with them."""
from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch

from .batches import (mask_inputs, pack, packed_columns, pad_right, padded_columns, pays_to_pack, pays_to_share,
                      shared_prefix_mask, shared_rows)
from .forward import REWARD_BIAS, read_scores, reward_pool, scalar_head_outputs

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


def packed_reward_scores(model: Any, seqs: list[list[int]], device: torch.device,
                         starts: list[int] | None = None) -> torch.Tensor:
    """Normalised rewards (N,) of token sequences packed into one row (``data.pack``: no padding, each
    attends only to itself), read at each one's last token (or, with ``starts``, over its response)."""
    ids, positions = pack(seqs)
    head = scalar_head_outputs(model, input_ids=ids.to(device), position_ids=positions.to(device))
    return read_scores(head.flatten(), packed_columns(seqs), starts)


def shared_reward_scores(model: Any, groups: list[list[list[int]]], pad_id: int, device: torch.device,
                         starts: list[int] | None = None) -> torch.Tensor:
    """Normalised rewards (N,) of groups of sequences with a common prefix (a ranking's K responses to one
    prompt): one row per group with the prefix once (``data.shared_rows``), each sequence attending to the
    prefix and to itself only, read at every sequence's last token (or, with ``starts``, over its response)."""
    rows = shared_rows(groups, pad_id)
    mask = shared_prefix_mask(rows.segments.to(device))
    if model.config._attn_implementation == "eager":  # eager attention adds its mask to the scores
        dtype = next(model.parameters()).dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, torch.finfo(dtype).min)
    head = scalar_head_outputs(model, input_ids=rows.input_ids.to(device), position_ids=rows.position_ids.to(device),
                               attention_mask=mask)
    return read_scores(head.flatten(), rows.columns, starts)


class Layout(NamedTuple):
    """How a micro-batch of rankings may be laid out for its forward pass (each used only where it pays)."""

    shared: bool = False  # one row per ranking, the prompt its K responses start with run once
    packed: bool = False  # all sequences end to end in one row, no padding


def ranking_scores(model: Any, rankings: list[list[list[int]]], pad_id: int, device: torch.device,
                   layout: Layout, batch_size: int | None = None, starts: list[int] | None = None) -> torch.Tensor:
    """Normalised rewards (N,) of every sequence of ``rankings`` (each a prompt's K sequences, prompt +
    response + EOS), in order: the one place that picks the row layout. ``layout.shared`` and sharing saves a
    tenth of the tokens: one row per ranking with its prompt once (:func:`shared_reward_scores`); else
    ``layout.packed`` and padding would waste a tenth: one packed row (:func:`packed_reward_scores`); else
    right-padded rows, ``batch_size`` at a time (None: all at once). ``starts``: where each sequence's response
    starts, which a model that pools over the response (``forward.REWARD_POOL``) needs and any other ignores."""
    seqs = [s for ranking in rankings for s in ranking]
    if reward_pool(model) != "mean":
        starts = None
    elif starts is None or len(starts) != len(seqs):
        raise ValueError("a reward model that pools over the response needs where each response starts")
    if layout.shared and pays_to_share(rankings):
        return shared_reward_scores(model, rankings, pad_id, device, starts)
    if layout.packed and pays_to_pack([len(q) for q in seqs]):
        return packed_reward_scores(model, seqs, device, starts)
    out, size = [], batch_size or max(len(seqs), 1)
    for start in range(0, len(seqs), size):
        ids, mask = pad_right(seqs[start:start + size], pad_id)
        out.append(reward_scores(model, ids.to(device), mask.to(device),
                                 None if starts is None else starts[start:start + size]))
    return torch.cat(out)


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
