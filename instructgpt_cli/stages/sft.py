"""Step 1 of InstructGPT: supervised fine-tuning on labeler demonstrations.

Loss is next-token cross-entropy on response tokens only (prompt tokens masked), normalised by the
number of response tokens in the whole optimizer step (over all ranks of a launched run). The paper
trains 16 epochs with a cosine schedule decaying to 10% and residual dropout 0.2 (Ouyang et al. 2022,
appendix C.1).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .. import distributed
from ..config import SFTConfig
from ..batches import Example, IGNORE_INDEX, collate, collate_packed, pays_to_pack, tokenize_demos
from ..data import read_demos
from ..distributed import resolve_device
from ..console import banner, model_rows, processes_note, say
from ..errors import BadInput
from ..families import supports_packing
from ..models import apply_lora, context_window, load_model, load_tokenizer, require_role, save_final
from ..rundir import Stage, file_input, model_input
from ..runners import Runner
from ..lifecycle import begin_stage, finish_stage, open_stage
from ..checkpoint import restore
from ..train import Session, TrainState, build_optimizer, build_scheduler, micro_batches, plan_steps, step_chunks

STAGE = "sft"


def split(examples: list[Example], val_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Deterministic held-out split; at least one training example is always kept."""
    n_val = int(len(examples) * val_fraction) if val_fraction > 0 else 0
    n_val = min(n_val, len(examples) - 1)
    if n_val == 0:
        return examples, []
    perm = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    return [examples[i] for i in perm[n_val:]], [examples[i] for i in perm[:n_val]]


def make_batch(chunk: list[Example], pad_id: int, packed: bool, device: torch.device) -> dict:
    """A micro-batch on ``device``: one packed row (no padding) where that saves work, else right-padded rows."""
    pack = packed and pays_to_pack([len(e.input_ids) for e in chunk])
    batch = collate_packed(chunk) if pack else collate(chunk, pad_id)
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def eval_loss(runner: Runner, examples: list[Example], batch_size: int, pad_id: int, packed: bool,
              device: torch.device) -> float:
    """Mean response-token loss over ``examples``; each rank scores its share of the micro-batches."""
    runner.eval()
    total, tokens = 0.0, 0
    for chunk, weight in distributed.rank_chunks(micro_batches(examples, batch_size)):
        summed, n = runner.response_loss_sum(make_batch(chunk, pad_id, packed, device))
        if weight:  # a weight-0 chunk only keeps the ranks in step
            total, tokens = total + summed.item(), tokens + int(n)
    runner.train()
    sums = distributed.reduce_metrics({"loss": total, "tokens": tokens}, sums=("loss", "tokens"))
    return sums["loss"] / max(sums["tokens"], 1)


def train_step(runner: Runner, state: TrainState, chunks: list[list[Example]], pad_id: int, packed: bool,
               device: torch.device, grad_clip: float) -> dict:
    """One optimizer step over micro-batches ``chunks`` (every rank passes all of the step's and trains on
    its share); the loss is normalised by the response tokens of all of them. Returns the step's metrics,
    summed over ranks."""
    n_targets = sum(sum(1 for t in e.labels[1:] if t != IGNORE_INDEX) for chunk in chunks for e in chunk)
    scale = distributed.world_size()  # DDP and FSDP average gradients over ranks; the loss wants their sum
    mine = distributed.rank_chunks(chunks)
    loss_total, tokens = 0.0, 0
    for j, (chunk, weight) in enumerate(mine):
        with runner.syncing(j == len(mine) - 1):
            summed, _ = runner.response_loss_sum(make_batch(chunk, pad_id, packed, device))
            (summed / max(n_targets, 1) * (scale * weight)).backward()
        if weight:
            loss_total += summed.item()
            tokens += sum(len(e.input_ids) for e in chunk)
    local_loss = loss_total if distributed.world_size() == 1 else None  # ranks agree on the norm; not on a loss
    grad_norm = state.optimizer_step(grad_clip, local_loss)
    sums = distributed.reduce_metrics({"loss": loss_total, "tokens": tokens}, sums=("loss", "tokens"))
    return {"train/loss": sums["loss"] / max(n_targets, 1), "train/grad_norm": grad_norm,
            "train/tokens": sums["tokens"]}


def run(cfg: SFTConfig, resume: bool = False, overwrite: bool = False, allow_changes: bool = False) -> Path:
    # 1. validate every input before anything is written
    if not cfg.data:
        raise BadInput(["--data: required (a demonstrations JSONL file)"])
    demos = read_demos(cfg.data, cfg.split, cfg.columns)
    require_role(cfg.model.name, "policy", "--model")
    tokenizer, source = load_tokenizer(cfg.model)
    stage = Stage(Path(cfg.run_dir), STAGE)
    device = resolve_device(cfg.device)
    inputs = {"data": file_input(cfg.data, cfg.split, cfg.columns), "model": model_input(source or cfg.model.name)}
    mode, changes = open_stage(stage, cfg, inputs, resume, overwrite, allow_changes)  # lock; what resume changes
    if mode == "done":
        say(f"sft: {stage.final} is already complete; nothing to do")
        return stage.final

    def build(on: torch.device):  # the same model on every rank; again on CPU to export a sharded one
        model = load_model(cfg.model, tokenizer, source, on, cfg.seed)
        return apply_lora(model, cfg.lora) if cfg.lora.enabled else model

    torch.manual_seed(cfg.seed)
    model = build(device)
    examples, truncated = tokenize_demos(tokenizer, demos, context_window(cfg.model, model))

    # 2. split, model (DDP or FSDP under a launcher), optimizer, schedule
    train, val = split(examples, cfg.val_fraction, cfg.seed)
    model.train()
    packed = cfg.padding_free and supports_packing(model)
    runner = Runner(model, device, cfg.fsdp)
    distributed.seed_rank(cfg.seed)
    per_step, epoch_steps, total_steps = plan_steps(cfg, len(train))
    optimizer = build_optimizer(model, cfg.optim)
    state = TrainState(model, optimizer, build_scheduler(optimizer, cfg.optim, total_steps))

    # 3. the stage directory and the resume point
    begin_stage(stage, mode, cfg, inputs)
    ckpt = restore(stage, mode, state, changes)
    banner("igpt sft", {
        "data": f"{cfg.data} ({len(train)} train, {len(val)} held out, {truncated} responses cut to fit)",
        "model": f"{cfg.model.name} on {device} ({next(model.parameters()).dtype})",
        "steps": f"{total_steps} ({epoch_steps}/epoch), effective batch {per_step}"
                 + (", padding-free" if packed else ", padded") + processes_note(cfg.fsdp),
        "forward": runner.name,
        **model_rows(model, cfg.lora.enabled, ckpt),
    }, run_dir=stage.run_dir)

    # 4. train: one optimizer step on the step's demonstrations, the held-out loss every eval_every steps
    def held_out() -> dict:
        return {"eval/loss": eval_loss(runner, val, cfg.optim.batch_size, tokenizer.pad_token_id, packed, device)}

    with Session(stage, cfg, state, total_steps) as session:
        for i in session.steps():
            chunks = step_chunks(train, i, per_step, cfg.optim.batch_size, cfg.seed)
            record = train_step(runner, state, chunks, tokenizer.pad_token_id, packed, device, cfg.optim.grad_clip)
            session.record({"epoch": round((i + 1) / epoch_steps, 4), **record}, held_out if val else None)

    # 5. export from rank 0 (a sharded model is first gathered into a plain copy there)
    final = distributed.full_model(model, lambda: build(torch.device("cpu")))
    if distributed.is_main():
        save_final(final, tokenizer, stage.final)
    finish_stage(stage, state.step)
    return stage.final
