"""Step 1 of InstructGPT: supervised fine-tuning on labeler demonstrations.

Loss is next-token cross-entropy on response tokens only (prompt tokens masked), normalised by the
number of response tokens in the whole optimizer step. The paper trains 16 epochs with a cosine
schedule decaying to 10% and residual dropout 0.2 (Ouyang et al. 2022, appendix C.1).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .. import config as config_mod
from ..config import SFTConfig
from ..data import Example, collate, read_demos, tokenize_demos
from ..errors import BadInput
from ..losses import sft_loss_sum
from ..models import (apply_lora, context_window, count_parameters, load_causal_lm, load_tokenizer,
                      resolve_device, save_final)
from ..rundir import (append_jsonl, atomic_write_text, check_stage, file_input, latest_checkpoint, now,
                      save_checkpoint, start_stage_dir, truncate_metrics, update_manifest)
from ..train import (banner, say, build_optimizer, build_scheduler, maybe_fault, micro_batches, progress,
                     save_train_state, load_train_state, step_indices, steps_per_epoch, trainable_parameters)

STAGE = "sft"


def split(examples: list[Example], val_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Deterministic held-out split; at least one training example is always kept."""
    n_val = int(len(examples) * val_fraction) if val_fraction > 0 else 0
    n_val = min(n_val, len(examples) - 1)
    if n_val == 0:
        return examples, []
    perm = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    return [examples[i] for i in perm[n_val:]], [examples[i] for i in perm[:n_val]]


@torch.no_grad()
def eval_loss(model, examples: list[Example], batch_size: int, pad_id: int, device: torch.device) -> float:
    """Mean response-token loss over ``examples``."""
    model.eval()
    total, tokens = 0.0, 0
    for chunk in micro_batches(examples, batch_size):
        batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
        loss_sum, n = sft_loss_sum(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                   batch["labels"])
        total, tokens = total + loss_sum.item(), tokens + int(n)
    model.train()
    return total / max(tokens, 1)


def train_step(model, optimizer, scheduler, chunks: list[list[Example]], pad_id: int, device: torch.device,
               grad_clip: float) -> tuple[float, float, int]:
    """One optimizer step over micro-batches ``chunks``; returns (loss, grad_norm, tokens seen)."""
    n_targets = sum(sum(1 for t in e.labels[1:] if t != -100) for chunk in chunks for e in chunk)
    loss_total, tokens = 0.0, 0
    for chunk in chunks:
        batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss_sum, _ = sft_loss_sum(logits, batch["labels"])
        (loss_sum / max(n_targets, 1)).backward()
        loss_total += loss_sum.item()
        tokens += int(batch["attention_mask"].sum())
    params = trainable_parameters(model)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_total / max(n_targets, 1), float(grad_norm), tokens


def run(cfg: SFTConfig, resume: bool = False, overwrite: bool = False) -> Path:
    # 1. validate every input before anything is written
    if not cfg.data:
        raise BadInput(["--data: required (a demonstrations JSONL file)"])
    demos = read_demos(cfg.data)
    tokenizer, source = load_tokenizer(cfg.model)
    run_dir = Path(cfg.run_dir)
    stage_dir = run_dir / STAGE
    mode = check_stage(stage_dir, resume, overwrite)
    if mode == "done":
        say(f"sft: {stage_dir / 'final'} is already complete; nothing to do")
        return stage_dir / "final"
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = load_causal_lm(cfg.model, tokenizer, source, device, cfg.seed)
    examples, truncated = tokenize_demos(tokenizer, demos, context_window(cfg.model, model))

    # 2. split, model, optimizer, schedule
    train, val = split(examples, cfg.val_fraction, cfg.seed)
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    model.train()
    per_step = cfg.optim.batch_size * cfg.optim.grad_accum
    epoch_steps = steps_per_epoch(len(train), per_step)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * epoch_steps
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps)

    # 3. the stage directory: config, manifest, resume point
    start_stage_dir(stage_dir, mode)
    atomic_write_text(stage_dir / "config.yaml", config_mod.to_yaml(STAGE, cfg))
    update_manifest(run_dir, STAGE, status="running", started=now(), inputs={
        "data": file_input(cfg.data), "model": str(source or cfg.model.name)})
    metrics_path, ckpt_root = stage_dir / "metrics.jsonl", stage_dir / "checkpoints"
    step = 0
    ckpt = latest_checkpoint(ckpt_root) if mode == "resume" else None
    if ckpt is not None:
        step, _ = load_train_state(ckpt, model, optimizer, scheduler)
    truncate_metrics(metrics_path, step)
    trainable, total = count_parameters(model)
    banner("igpt sft", {
        "data": f"{cfg.data} ({len(train)} train, {len(val)} held out, {truncated} responses cut to fit)",
        "model": f"{cfg.model.name} on {device} ({next(model.parameters()).dtype})",
        "trainable": f"{trainable:,} of {total:,} parameters" + (" (LoRA)" if cfg.lora.enabled else ""),
        "steps": f"{total_steps} ({epoch_steps}/epoch), effective batch {per_step}",
        "resume": f"from {ckpt.name}" if ckpt else "no (fresh start)",
    })

    # 4. train
    started = time.perf_counter()
    with progress() as bar:
        task = bar.add_task("sft", total=total_steps, completed=step)
        while step < total_steps:
            t0 = time.perf_counter()
            chunk_ids = micro_batches(step_indices(len(train), step, per_step, cfg.seed), cfg.optim.batch_size)
            chunks = [[train[i] for i in ids] for ids in chunk_ids]
            loss, grad_norm, tokens = train_step(model, optimizer, scheduler, chunks, tokenizer.pad_token_id,
                                                 device, cfg.optim.grad_clip)
            step += 1
            seconds = time.perf_counter() - t0
            record = {"step": step, "epoch": round(step / epoch_steps, 4), "train/loss": loss,
                      "train/lr": scheduler.get_last_lr()[0], "train/grad_norm": grad_norm,
                      "train/tokens": tokens, "train/tokens_per_s": tokens / seconds,
                      "elapsed_s": time.perf_counter() - started}
            if val and (step % cfg.eval_every == 0 or step == total_steps):
                record["eval/loss"] = eval_loss(model, val, cfg.optim.batch_size, tokenizer.pad_token_id, device)
            append_jsonl(metrics_path, record)
            if step % cfg.save_every == 0 and step < total_steps:
                save_checkpoint(ckpt_root, step, lambda d: save_train_state(d, model, optimizer, scheduler, step),
                                cfg.keep_checkpoints)
            bar.update(task, advance=1, description=f"sft loss {loss:.4f}")
            maybe_fault(step)

    # 5. export
    save_final(model, tokenizer, stage_dir / "final")
    update_manifest(run_dir, STAGE, status="completed", finished=now(), steps=step,
                    outputs={"final": str(stage_dir / "final")})
    return stage_dir / "final"
