"""Collect responses for labelers: K samples per prompt from the SFT model (the paper's comparison data
comes from several policies' samples; igpt samples the one you point it at).

The output ``{"prompt", "responses": [...], "category"}`` becomes a rankings file once each line gets
``"ranks"`` (by hand, ``igpt label``, or any tool) — the labelling loop of the paper.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import locks
from ..config import ModelConfig, SampleConfig
from ..console import banner, say
from ..batches import render_queries
from ..data import read_prompts
from ..distributed import resolve_device
from ..errors import BadInput
from ..models import load_model, load_tokenizer, position_limit
from ..rollout import decode_response
from ..rundir import find_model
from ..runners import Runner
from ..storage import atomic_write_text


def run(cfg: SampleConfig, overwrite: bool = False) -> Path:
    # 1. validate inputs; nothing is written before they pass
    errors = [f"--{name}: required" for name in ("prompts", "out") if not getattr(cfg, name)]
    if errors:
        raise BadInput(errors)
    out = Path(cfg.out)
    if out.exists() and not overwrite:
        raise BadInput([f"{out}: already exists; pass --overwrite to replace it"])
    locks.take_file(out)
    prompts = read_prompts(cfg.prompts, cfg.split, cfg.columns)
    model_cfg = ModelConfig(name=find_model(cfg.model, Path(cfg.run_dir), "sft", "--model"), dtype=cfg.dtype)
    tokenizer, source = load_tokenizer(model_cfg)
    queries = render_queries(tokenizer, prompts, cfg.max_new_tokens, position_limit(model_cfg.name))

    # 2. load the model and sample K responses per prompt, all prompts batched together
    device = resolve_device(cfg.device)
    model = Runner.for_eval(load_model(model_cfg, tokenizer, source, device, cfg.seed))
    banner("igpt sample", {"prompts": f"{cfg.prompts} ({len(prompts)})", "model": model_cfg.name,
                           "samples": f"{cfg.k} per prompt at temperature {cfg.temperature}, "
                                      f"at most {cfg.max_new_tokens} tokens"})
    torch.manual_seed(cfg.seed)
    groups = sample_distinct(model, tokenizer, queries, cfg)

    # 3. write {prompt, responses} lines atomically
    lines = []
    for p, group in zip(prompts, groups):
        record = {"prompt": p.record, "responses": group}  # a conversation stays one (label, train-rm)
        if p.category:
            record["category"] = p.category
        if p.group:  # label keeps it, so train-rm holds out the prompt's group together
            record["group"] = p.group
        lines.append(json.dumps(record, ensure_ascii=False))
    atomic_write_text(out, "\n".join(lines) + "\n")
    left = sum(1 for g in groups if not distinct_nonempty(g))
    if left:
        say(f"[yellow]note:[/] {left} prompts still have duplicate or empty responses after {RETRIES} resampling "
            "rounds; a rankings file needs distinct non-empty responses, so drop or fix those before ranking")
    return out


RETRIES = 4  # resampling rounds for empty or duplicate responses


def distinct_nonempty(group: list[str]) -> bool:
    return all(group) and len({t.strip() for t in group}) == len(group)


def sample_distinct(model: Runner, tokenizer, queries: list[list[int]], cfg: SampleConfig) -> list[list[str]]:
    """K responses per query; empty or duplicate ones are resampled (a labeler cannot rank them),
    up to RETRIES rounds. Deterministic given the seed."""
    flat = model.generate(tokenizer, [q for q in queries for _ in range(cfg.k)], cfg.max_new_tokens,
                          cfg.temperature, cfg.batch_size, progress="sample")
    groups = [[decode_response(tokenizer, r) for r in flat[i * cfg.k:(i + 1) * cfg.k]] for i in range(len(queries))]
    for _ in range(RETRIES if cfg.temperature > 0 else 0):
        redo = [(gi, j) for gi, g in enumerate(groups) for j, t in enumerate(g)
                if not t or t.strip() in {u.strip() for u in g[:j]}]
        if not redo:
            break
        fresh = model.generate(tokenizer, [queries[gi] for gi, _ in redo], cfg.max_new_tokens, cfg.temperature,
                               cfg.batch_size)
        for (gi, j), tokens in zip(redo, fresh):
            groups[gi][j] = decode_response(tokenizer, tokens)
    return groups
