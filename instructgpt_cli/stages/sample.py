"""Collect responses for labelers: K samples per prompt from the SFT model (the paper's comparison data
comes from several policies' samples; igpt samples the one you point it at).

The output ``{"prompt", "responses": [...], "category"}`` becomes a rankings file once each line gets
``"ranks"`` (by hand, ``igpt label``, or any tool) — the labelling loop of the paper.

Prompts are sampled ``rollout.CHUNK`` at a time, each chunk seeded from (seed, chunk) alone and kept whole in
``.OUT.partial/`` as it is drawn (``rollout.draw_chunks``); ``OUT`` is written at the end, whole (an old one,
under --overwrite, stays until then). A full disk (exit 4) or a stop signal (128 + N) keeps the chunks drawn so
far, and ``--resume`` goes on after them with the very samples an uninterrupted run draws.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import cpus, locks
from ..config import ModelConfig, SampleConfig
from ..console import banner, say
from ..batches import render_queries
from ..data import read_prompts
from ..distributed import resolve_device
from ..errors import BadInput
from ..refs import model_or_checkpoint
from ..models import load_tokenizer, position_limit
from ..rollout import CHUNK, chunk_seed, decode_response, draw_chunks, kept_until_published, start_kept
from ..rundir import find_model
from ..runners import Runner
from ..storage import atomic_write_text, json_sha256, weights_sha256


def run(cfg: SampleConfig, overwrite: bool = False, resume: bool = False) -> Path:
    # 1. validate inputs; nothing is written before they pass
    errors = [f"--{name}: required" for name in ("prompts", "out") if not getattr(cfg, name)]
    if errors:
        raise BadInput(errors)
    out = Path(cfg.out)
    kept = out.parent / f".{out.name}.partial"  # the chunks drawn so far (rollout.draw_chunks)
    if resume and overwrite:
        raise BadInput(["--resume and --overwrite exclude each other"])
    locks.take_file(out)
    if out.exists() and not (overwrite or resume and kept.exists()):
        raise BadInput([f"{out}: already exists; pass --overwrite to replace it"])
    start_kept(kept, resume, overwrite)
    prompts = read_prompts(cfg.prompts, cfg.split, cfg.columns, cfg.max_prompts, cfg.seed)
    run_dir = Path(cfg.run_dir)
    side = model_or_checkpoint(cfg.model or find_model("", run_dir, "sft", "--model"), run_dir, "--model")
    tokenizer, _ = load_tokenizer(ModelConfig(name=str(side.base)))
    queries = render_queries(tokenizer, prompts, cfg.max_new_tokens, position_limit(str(side.base)))

    # 2. load the model
    device = resolve_device(cfg.device)
    model = Runner.for_eval(side.load(tokenizer, device, cfg.dtype, cfg.seed))
    banner("igpt sample", {"prompts": f"{cfg.prompts} ({len(prompts)})", "model": str(side.path),
                           "samples": f"{cfg.k} per prompt at temperature {cfg.temperature}, "
                                      f"at most {cfg.max_new_tokens} tokens", **cpus.banner_row()})
    # what the kept chunks were drawn with: a resume under another model, prompts or settings is refused
    drawn_with = {"model": weights_sha256(side.path) if side.path.is_dir() else str(side.path), "k": cfg.k,
                  "queries": json_sha256(queries), "temperature": cfg.temperature,
                  "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed, "batch_size": cfg.batch_size}

    # 3. sample chunk by chunk, each kept whole as it is drawn; then write OUT whole
    def draw(chunk: int) -> list[dict]:
        torch.manual_seed(chunk_seed(cfg.seed, chunk))
        groups = sample_distinct(model, tokenizer, queries[chunk * CHUNK:(chunk + 1) * CHUNK], cfg)
        return [sample_record(p, g) for p, g in zip(prompts[chunk * CHUNK:], groups)]

    records = draw_chunks(len(prompts), draw, kept, drawn_with, resume)
    with kept_until_published(kept):
        atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    left = sum(1 for r in records if not distinct_nonempty(r["responses"]))
    if left:
        say(f"[yellow]note:[/] {left} prompts still have duplicate or empty responses after {RETRIES} resampling "
            "rounds; a rankings file needs distinct non-empty responses, so drop or fix those before ranking")
    return out


def sample_record(prompt, group: list[str]) -> dict:
    """One output line: the prompt in the form it was read (a conversation stays one: label, train-rm), its
    responses, and its category and group (label keeps the group, so train-rm holds out the prompt's group
    together)."""
    record = {"prompt": prompt.record, "responses": group}
    if prompt.category:
        record["category"] = prompt.category
    if prompt.group:
        record["group"] = prompt.group
    return record


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
