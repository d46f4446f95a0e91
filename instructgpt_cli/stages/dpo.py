"""DPO: the policy learns the labelers' rankings directly, without a reward model or sampling (Rafailov et al.
2023), from the same rankings train-rm reads and K-wise as train-rm is.

A response's implicit reward is beta * (log pi(y|x) - log pi_ref(y|x)), pi_ref the SFT model frozen; each
prompt's loss is the mean over its C(K,2) pairs (ties make none) of -log sigmoid(r_better - r_worse), and a
step's loss the mean over its prompts (``losses.kwise_dpo_loss``). A ranking's K responses each run once per
step, whatever the number of pairs (pairwise tools run 2 * C(K,2)), with the prompt once where the model
takes that (``forward.ranking_logprobs``). The reference's log-probs never change: they are computed once, in
a first pass before training, for the rankings the run's steps and its held-out set visit (all of them once a
run reaches a second epoch; a short run on a large file computes no more than it trains on), and kept with the
run (``dpo/ref_logps.safetensors``), so a resumed run reads them instead of loading or running the reference
again, and computes only those a longer resume visits anew; with LoRA the reference is the same weights with the
adapters disabled (no second copy), without it the policy itself before its first step.
"""
from __future__ import annotations

import hashlib
import os
from array import array
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .. import distributed
from ..batches import hold_out, render_prompt, tokenize_rankings
from ..config import DPOConfig, LoraConfig, ModelConfig
from ..console import banner, model_rows, processes_note, say
from ..data import read_rankings
from ..distributed import resolve_device
from ..errors import BadInput
from ..families import supports_packing, supports_sharing
from ..lifecycle import begin_stage, finish_stage, open_stage
from ..losses import kwise_dpo_loss
from ..models import apply_lora, context_window, load_model, load_tokenizer, require_role, save_final, stage_inputs
from ..rewards import Layout
from ..rundir import Stage, file_input, model_input
from ..runners import Runner
from ..stats import rm_accuracy
from ..storage import writing
from ..checkpoint import restore
from ..train import (HeldOut, Session, TrainState, build_optimizer, build_scheduler, micro_batches, plan_steps,
                     step_chunks, visited_indices)

STAGE = "dpo"
REF_FILE = "ref_logps.safetensors"
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")  # TRL's DPOTrainer names, means over the step's pairs


class Item(NamedTuple):
    """A tokenised ranking: K sequences (prompt + response + EOS), its (better, worse) pairs, the prompt's
    length (tokens), its line order in the file (the key of its reference log-probs) and those (K,)."""

    sequences: list[list[int]]
    pairs: list[tuple[int, int]]
    prompt_len: int
    index: int
    ref: Any = None


def dpo_forward(runner: Runner, items: list[Item], pad_id: int, device: torch.device, layout: Layout,
                beta: float) -> tuple[torch.Tensor, dict]:
    """Per-prompt DPO losses (G,) of a micro-batch of rankings, and the sums of its pair statistics (the
    TRL metrics before averaging; ``pairs`` their count; ``ranked`` each ranking's (pairs the implicit reward
    orders right, pairs), for an interval clustered by ranking). One forward of the policy, each sequence once."""
    logps = runner.ranking_logprobs([it.sequences for it in items], [it.prompt_len for it in items], pad_id,
                                    layout.shared, layout.packed)
    ref = torch.cat([it.ref for it in items]).to(device)
    better, worse, group, offset = [], [], [], 0
    for gi, it in enumerate(items):
        for b, w in it.pairs:
            better.append(offset + b), worse.append(offset + w), group.append(gi)
        offset += len(it.sequences)
    as_index = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
    better_t, worse_t = as_index(better), as_index(worse)
    losses, chosen, rejected = kwise_dpo_loss(logps, ref, better_t, worse_t, as_index(group), len(items), beta)
    with torch.no_grad():
        sums = {"rewards/chosen": chosen.sum(), "rewards/rejected": rejected.sum(),
                "rewards/accuracies": (chosen > rejected).float().sum(), "rewards/margins": (chosen - rejected).sum(),
                "logps/chosen": logps[better_t].sum(), "logps/rejected": logps[worse_t].sum()}
        sums = {k: v.item() for k, v in sums.items()}
        right = torch.zeros(len(items), device=device).index_add_(0, as_index(group), (chosen > rejected).float())
    ranked = [(round(c), len(it.pairs)) for c, it in zip(right.tolist(), items)]
    return losses, {**sums, "pairs": len(better), "tokens": sum(len(s) for it in items for s in it.sequences),
                    "ranked": ranked}


def _means(sums: dict, n_prompts: int, prefix: str) -> dict:
    """The step's record: the loss a mean over prompts, the TRL metrics means over pairs (0 with none)."""
    pairs = max(sums["pairs"], 1)
    return {f"{prefix}/loss": sums["loss"] / max(n_prompts, 1), **{f"{prefix}/{k}" if prefix == "eval" else k:
                                                                   sums[k] / pairs for k in METRICS}}


def _accumulate(total: dict, losses: torch.Tensor, stats: dict) -> None:
    total["loss"] = total.get("loss", 0.0) + losses.sum().item()
    for k, v in stats.items():
        total[k] = total.get(k, [] if isinstance(v, list) else 0) + v


def train_step(runner: Runner, state: TrainState, chunks: list[list[Item]], pad_id: int, layout: Layout,
               device: torch.device, grad_clip: float, beta: float) -> dict:
    """One optimizer step over micro-batches of rankings (every rank passes all of the step's and trains on
    its share); the loss is the mean over all prompts of the step, as ``reward.train_step`` normalises."""
    n_prompts = sum(len(c) for c in chunks)
    scale = distributed.world_size()  # DDP and FSDP average gradients over ranks; the loss wants their sum
    mine = distributed.rank_chunks(chunks)
    total: dict = {"loss": 0.0}
    for j, (chunk, weight) in enumerate(mine):
        with runner.syncing(j == len(mine) - 1):
            losses, stats = dpo_forward(runner, chunk, pad_id, device, layout, beta)
            (losses.sum() / n_prompts * (scale * weight)).backward()
        if weight:
            _accumulate(total, losses, stats)
    local_loss = total["loss"] if distributed.world_size() == 1 else None
    grad_norm = state.optimizer_step(grad_clip, local_loss)
    keys = ("loss", "pairs", "tokens", *METRICS)
    sums = distributed.reduce_metrics({k: total.get(k, 0) for k in keys}, sums=keys)
    return {**_means(sums, n_prompts, "train"), "train/grad_norm": grad_norm, "train/tokens": sums["tokens"],
            "train/comparisons": sums["pairs"]}


@torch.no_grad()
def evaluate(runner: Runner, items: list[Item], batch_size: int, pad_id: int, layout: Layout, device: torch.device,
             beta: float) -> dict:
    """Held-out DPO loss (mean per prompt) and the TRL metrics (means over pairs), and the pair accuracy's 95%
    interval clustered by ranking (``stats.rm_accuracy``: a ranking's C(K,2) pairs are not independent);
    each rank scores its share."""
    runner.eval()
    total: dict = {"loss": 0.0}
    for chunk, weight in distributed.rank_chunks(micro_batches(items, batch_size)):
        losses, stats = dpo_forward(runner, chunk, pad_id, device, layout, beta)
        if weight:
            _accumulate(total, losses, stats)
    runner.train()
    keys = ("loss", "pairs", *METRICS)
    ranked = [c for part in distributed.gather(total.get("ranked", [])) for c in part]
    interval = rm_accuracy([c for c, _ in ranked], [n for _, n in ranked])
    return {**_means(distributed.reduce_metrics({k: total.get(k, 0) for k in keys}, sums=keys), len(items), "eval"),
            **({"eval/rewards/accuracies_ci_low": interval["accuracy_ci_low"],
                "eval/rewards/accuracies_ci_high": interval["accuracy_ci_high"],
                "eval/pairs": interval["pairs"], "eval/rankings": interval["rankings"]} if interval else {})}


@torch.no_grad()
def reference_logprobs(model: Any, items: list[Item], batch_size: int, pad_id: int, layout: Layout,
                       device: torch.device) -> list[torch.Tensor]:
    """Every ranking's reference log-probs (K,) fp32 on the CPU, in order: ``model`` as the SFT model, LoRA
    adapters disabled, in eval mode (no dropout); each rank runs its share of the micro-batches."""
    was_training = model.training
    model.eval()
    reference = Runner.for_eval(model)  # this process, the weights' dtype: the numbers the cache is keyed by
    if hasattr(model, "peft_config"):
        reference = reference.adapters_disabled()
    chunks = micro_batches(items, batch_size)
    mine = [reference.ranking_logprobs([it.sequences for it in c], [it.prompt_len for it in c], pad_id,
                                       layout.shared, layout.packed).float().cpu()
            for c, _ in distributed.rank_chunks(chunks)]
    model.train(was_training)
    parts = distributed.gather(mine)  # parts[r][k] holds chunk k * world + r
    flat = torch.cat([parts[j % len(parts)][j // len(parts)] for j in range(len(chunks))])
    return list(flat.split([len(it.sequences) for it in items]))


def tokens_sha256(items: list[Item]) -> str:
    """sha256 of what the reference scores: every ranking's prompt length and token sequences, in order."""
    digest = hashlib.sha256()
    for it in items:
        digest.update(array("q", [it.prompt_len, len(it.sequences), *map(len, it.sequences)]))
        for seq in it.sequences:
            digest.update(array("q", seq))
    return digest.hexdigest()


def read_reference(path: Path, key: dict, n: int) -> list[torch.Tensor] | None:
    """The cached reference log-probs of the run, ranking i's empty where they were not computed, or None where
    there are none for exactly these inputs."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as fh:
        if fh.metadata() != key:
            return None
        logps, offsets = fh.get_tensor("logps"), fh.get_tensor("offsets").tolist()
    return [logps[a:b] for a, b in zip(offsets, offsets[1:])] if len(offsets) == n + 1 else None


def fill_reference(model: Any, items: list[Item], ref: list[torch.Tensor], needed: list[int], batch_size: int,
                   pad_id: int, layout: Layout, device: torch.device) -> int:
    """Compute the reference log-probs of the rankings ``needed`` (indices into ``items``) that ``ref`` lacks
    (empty), in place; returns how many were computed."""
    missing = [i for i in needed if not len(ref[i])]
    if missing:
        for i, r in zip(missing, reference_logprobs(model, [items[i] for i in missing], batch_size, pad_id, layout,
                                                    device)):
            ref[i] = r
    return len(missing)


def write_reference(path: Path, ref: list[torch.Tensor], key: dict) -> None:
    """Reference log-probs, ranking i's at ``logps[offsets[i]:offsets[i+1]]`` (empty where not computed: a ranking
    has two responses or more), via a temporary file and a rename (a failed write leaves none); ``key`` (the
    inputs they were computed from) as metadata."""
    from safetensors.torch import save_file

    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}"
    offsets = torch.tensor([0] + [len(r) for r in ref]).cumsum(0)
    with writing(path, tmp):
        save_file({"logps": torch.cat(ref).contiguous(), "offsets": offsets}, str(tmp), metadata=key)
        os.replace(tmp, path)


def run(cfg: DPOConfig, resume: bool = False, overwrite: bool = False, allow_changes: bool = False) -> Path:
    # 1. validate every input before anything is written
    if not cfg.rankings:
        raise BadInput(["--rankings: required (a rankings JSONL file)"])
    run_dir = Path(cfg.run_dir)
    rankings = read_rankings(cfg.rankings, cfg.split, cfg.columns)
    if cfg.model.name:
        require_role(cfg.model.name, "policy", "--model")
    init = cfg.model.name or stage_inputs(run_dir, {"--sft": (cfg.sft, "sft", "policy")})["--sft"]
    # dropout off, in the model and in LoRA's input, as ppo does: the reference runs without it, so with it the
    # policy's log-probs would be noisy against the reference's (TRL's DPOTrainer disables it too)
    model_cfg = ModelConfig(**{**vars(cfg.model), "name": init, "dropout": 0.0})
    lora_cfg = LoraConfig(**{**vars(cfg.lora), "dropout": 0.0})
    if cfg.model.dropout or (cfg.lora.enabled and cfg.lora.dropout):
        say(f"dpo trains with dropout off (asked: --dropout {cfg.model.dropout:g}"
            f"{f', --lora-dropout {cfg.lora.dropout:g}' if cfg.lora.enabled else ''}): its reference log-probs "
            "are dropout-free, and the policy's must be comparable")
    tokenizer, source = load_tokenizer(model_cfg)
    stage = Stage(run_dir, STAGE)
    device = resolve_device(cfg.device)
    inputs = {"rankings": file_input(cfg.rankings, cfg.split, cfg.columns), "sft": model_input(source or init)}
    mode, changes = open_stage(stage, cfg, inputs, resume, overwrite, allow_changes)  # lock; what resume changes
    if mode == "done":
        say(f"dpo: {stage.final} is already complete; nothing to do")
        return stage.final

    def build(on: torch.device):  # the same model on every rank; again on CPU to export a sharded one
        model = load_model(model_cfg, tokenizer, source, on, cfg.seed)
        return apply_lora(model, lora_cfg) if cfg.lora.enabled else model

    torch.manual_seed(cfg.seed)
    model = build(device)
    max_len = context_window(model_cfg, model)
    groups, truncated = tokenize_rankings(tokenizer, rankings, max_len)
    items = [Item(g.sequences, g.pairs, len(render_prompt(tokenizer, r.messages)), i)
             for i, (g, r) in enumerate(zip(groups, rankings))]
    layout = Layout(shared=cfg.share_prompts and supports_sharing(model),
                    packed=cfg.padding_free and supports_packing(model))

    # 2. the reference's log-probs: read back on resume, else one pass of the SFT model (before any step)
    # (what decides the numbers: the tokens it scores, the reference's weights, the dtype they run in; the
    # tokens, not the file, since --split, --columns and --max-seq-len choose them from it; a named model such
    # as tiny has no weights file, so its seed stands for them)
    key = {"tokens_sha256": tokens_sha256(items), "dtype": str(next(model.parameters()).dtype),
           "reference": str(inputs["sft"].get("sha256") if isinstance(inputs["sft"], dict)
                            else f"{inputs['sft']} seed {cfg.seed}")}
    # the rankings it needs: those the planned steps train on and the held-out ones (split by prompt, whole groups
    # where the rankings have a "group", as train-rm)
    train, val = hold_out(items, cfg.val_fraction, cfg.seed, [r.group for r in rankings])
    per_step, epoch_steps, total_steps = plan_steps(cfg, len(train))
    needed = sorted([train[j].index for j in visited_indices(len(train), total_steps, per_step, cfg.seed)]
                    + [it.index for it in val])
    ref = (read_reference(stage.dir / REF_FILE, key, len(items)) if mode == "resume" else None) or \
        [torch.empty(0)] * len(items)
    computed = fill_reference(model, items, ref, needed, cfg.optim.batch_size, tokenizer.pad_token_id, layout, device)
    train, val = ([it._replace(ref=ref[it.index]) for it in part] for part in (train, val))

    # 3. model (DDP or FSDP under a launcher), optimizer, schedule
    model.train()
    runner = Runner(model, device, cfg.fsdp)
    distributed.seed_rank(cfg.seed)
    optimizer = build_optimizer(model, cfg.optim)
    state = TrainState(model, optimizer, build_scheduler(optimizer, cfg.optim, total_steps))

    # 4. the stage directory, the reference cache and the resume point
    begin_stage(stage, mode, cfg, inputs)
    if computed and distributed.is_main():
        write_reference(stage.dir / REF_FILE, ref, key)
    ckpt = restore(stage, mode, state, changes)
    ks = sorted({len(it.sequences) for it in items})
    banner("igpt dpo", {
        "rankings": f"{cfg.rankings} ({len(train)} train, {len(val)} held-out prompts; K in {ks}; "
                    f"{sum(len(it.pairs) for it in train)} training comparisons; {truncated} responses cut)",
        "policy": f"{init} on {device} ({next(model.parameters()).dtype}); reference: the same, frozen"
                  + (" (adapters disabled)" if cfg.lora.enabled else "") + f"; beta {cfg.beta}",
        "reference": (f"computed for {computed} rankings" if computed else "read back")
                     + (f" ({len(needed) - computed} read back)" if computed and len(needed) > computed else "")
                     + (f", {len(needed)} of {len(items)} (those the steps and the held-out set visit)"
                        if len(needed) < len(items) else "") + f": {stage.dir / REF_FILE}",
        "steps": f"{total_steps} ({epoch_steps}/epoch), {per_step} prompts per step"
                 + (", prompts shared" if layout.shared else "") + (", padding-free" if layout.packed else ", padded")
                 + processes_note(cfg.fsdp),
        "forward": runner.name,
        **model_rows(model, cfg.lora.enabled, ckpt),
    }, run_dir=stage.run_dir)

    # 5. train: one optimizer step on the step's rankings, the held-out DPO metrics every eval_every steps
    held_out = HeldOut(lambda: evaluate(runner, val, cfg.optim.batch_size, tokenizer.pad_token_id, layout, device,
                                        cfg.beta))

    with Session(stage, cfg, state, total_steps) as session:
        for i in session.steps():
            chunks = step_chunks(train, i, per_step, cfg.optim.batch_size, cfg.seed)
            record = train_step(runner, state, chunks, tokenizer.pad_token_id, layout, device, cfg.optim.grad_clip,
                                cfg.beta)
            session.record({"epoch": round((i + 1) / epoch_steps, 4), **record}, held_out if val else None)

    # 6. export from rank 0 (a sharded model is first gathered into a plain copy there)
    summary = held_out.final() if val else {}
    final = distributed.full_model(model, lambda: build(torch.device("cpu")))
    if distributed.is_main():
        save_final(final, tokenizer, stage.final)
    finish_stage(stage, state.step, **summary)
    # the end of the log says what was learned, as train-rm's does: held-out pair accuracy with its interval
    accuracy = held_out_accuracy(summary) if val else "unknown: nothing held out (--val-fraction 0)"
    banner("DPO model", {**({"eval/loss": f"{summary['eval/loss']:.4f}"} if val else {}), "accuracy": accuracy,
                         "saved": str(stage.final)})
    return stage.final


def held_out_accuracy(summary: dict) -> str:
    """The held-out pair accuracy (the implicit reward orders a ranking's pair as labelled) with its 95%
    interval, as train-rm says its reward model's."""
    acc, low = summary["eval/rewards/accuracies"], summary.get("eval/rewards/accuracies_ci_low")
    if low is None:
        return f"held-out pair accuracy {acc:.1%} (no pairs held out)"
    return (f"held-out pair accuracy {acc:.1%} (95% CI {low:.1%} - {summary['eval/rewards/accuracies_ci_high']:.1%}, "
            f"clustered by ranking: {summary['eval/rankings']} held-out rankings, {summary['eval/pairs']} pairs)")
