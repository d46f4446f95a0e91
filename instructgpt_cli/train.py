"""What every training stage shares: optimizer and schedule, the deterministic data order, and the
resumable training state (trainable weights, optimizer, scheduler, RNG) inside a checkpoint.

The data order is a pure function of (seed, epoch), so a resumed run needs only the step number to
continue exactly where the interrupted one was. Under a launcher every rank runs these functions; only
rank 0 writes files, and barriers keep the others from reading what is half written (distributed.py).
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch

from . import distributed, lifecycle, signals, trackers
from .config import OptimConfig
from .console import StepProgress, say, say_every_rank
from .errors import BadInput, NonFinite
from .rundir import (Stage, append_jsonl, begin_checkpoint, checkpoint_name, latest_checkpoint, publish_checkpoint,
                     read_manifest, read_metrics, truncate_metrics, update_manifest)
from .storage import now, writing

FAULT_ENV = "IGPT_FAULT_AFTER_STEP"  # test hook: die (exit 99, no cleanup) right after this step


def trainable_parameters(model: Any) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def build_optimizer(model: Any, cfg: OptimConfig, lrs: dict[str, float] | None = None) -> torch.optim.Optimizer:
    """AdamW, fused where torch has the kernel (CPU and CUDA floats): without ``fused`` torch steps each
    tensor in a Python loop on CPU, many times slower for a 135M model (bench/README.md).

    ``lrs``: one parameter group per named submodule of ``model``, in that order, each with its own peak
    learning rate (PPO's ``{"policy": lr, "value": vf_lr}``); a schedule scales every group's alike."""
    params = trainable_parameters(model)
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    groups = params if lrs is None else [{"params": trainable_parameters(getattr(model, name)), "lr": lr}
                                         for name, lr in lrs.items()]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, fused=fused or None)


@torch.no_grad()
def clip_gradients(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Global L2 norm of the gradients, scaled to ``max_norm`` when above it (``max_norm <= 0``: no clip).

    The same arithmetic as ``torch.nn.utils.clip_grad_norm_`` (coefficient max_norm / (norm + 1e-6)), with
    per-tensor norms in one ``_foreach_norm`` call, and no multiply at all when the norm is within bounds
    (torch's path multiplies every gradient by the clamped coefficient, 1.0 included). DDP has
    reduced the gradients by now; FSDP's are shards (DTensors), whose norm torch's own path reduces over
    every rank.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if distributed.any_sharded(params):
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        return distributed.as_float(norm)
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)))
    if max_norm > 0:
        coef = max_norm / (float(norm) + 1e-6)
        if coef < 1.0:
            torch._foreach_mul_(grads, coef)
    return float(norm)


def optimizer_step(optimizer: Any, scheduler: Any, grad_clip: float, loss: float | None = None) -> float:
    """Clip, step, advance the schedule, clear the gradients; returns the gradient norm before clipping.
    The parameters are the optimizer's (the model's trainable ones, listed once when it was built).
    A non-finite gradient norm or ``loss`` skips the step (:func:`applied`)."""
    grad_norm = clip_gradients([p for group in optimizer.param_groups for p in group["params"]], grad_clip)
    if applied(optimizer, {"loss": loss, "gradient norm": grad_norm}):
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def optimizer_step_by_group(optimizer: Any, scheduler: Any, grad_clip: float) -> list[float]:
    """:func:`optimizer_step` with each parameter group's gradient clipped on its own norm, so one group's
    large gradient (PPO-ptx's, gamma 27.8, on the policy) cannot shrink another's (the value model's)
    through a shared norm. Returns each group's norm before clipping."""
    norms = [clip_gradients(group["params"], grad_clip) for group in optimizer.param_groups]
    if applied(optimizer, {f"gradient norm of parameter group {i}": n for i, n in enumerate(norms)}):
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norms


# ---------------------------------------------------------------- non-finite values

SKIPS_IN_A_ROW = 3  # consecutive skipped steps that end a stage (exit 3)


class Skips:
    """Optimizer steps not applied because a value was NaN or infinite (this process, this stage)."""

    total = 0
    in_a_row = 0
    last: tuple[str, float] = ("", 0.0)


def skip_step(quantity: str, value: float) -> None:
    """Record a step that was not applied (no optimizer step, no schedule step)."""
    Skips.total += 1
    Skips.in_a_row += 1
    Skips.last = (quantity, value)


def applied(optimizer: Any, values: dict[str, float | None]) -> bool:
    """Whether a step with these values may be applied: all finite. Otherwise the gradients are dropped
    and the step recorded as skipped. Every value here is the same on every rank (gradient norms are
    taken after DDP's all-reduce; a loss is passed only by a single process), so all ranks agree."""
    for name, value in values.items():
        if value is not None and not math.isfinite(value):
            optimizer.zero_grad(set_to_none=True)
            skip_step(name, value)
            return False
    Skips.in_a_row = 0
    return True


def all_finite(params: list[torch.Tensor]) -> bool:
    """Whether every element of ``params`` is finite, over all ranks (FSDP shards: each rank its own)."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in params]
    bad = sum(int(not torch.isfinite(p.detach()).all()) for p in local)
    return not distributed.agree(bad)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> Any:
    """``transformers.get_scheduler``; ``cosine_with_min_lr`` decays to ``min_lr_ratio`` of the peak,
    as InstructGPT's schedules do (to 10%)."""
    from transformers import get_scheduler

    extra = {"min_lr_rate": cfg.min_lr_ratio} if cfg.scheduler == "cosine_with_min_lr" else None
    return get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                         num_training_steps=total_steps, scheduler_specific_kwargs=extra)


class Plan(NamedTuple):
    """How many items an optimizer step takes (over every rank), steps an epoch, steps in all."""

    per_step: int
    epoch_steps: int
    total_steps: int


def plan_steps(cfg: Any, n_train: int) -> Plan:
    """The plan of an epoch-based stage (SFT, train-rm): ``optim.batch_size x grad_accum x ranks`` items a
    step, ``max_steps`` if set, else ``epochs`` passes."""
    per_step = cfg.optim.batch_size * cfg.optim.grad_accum * distributed.world_size()
    epoch_steps = steps_per_epoch(n_train, per_step)
    return Plan(per_step, epoch_steps, cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * epoch_steps)


def steps_per_epoch(n_items: int, per_step: int) -> int:
    return max(1, math.ceil(n_items / per_step))


def step_indices(n_items: int, step: int, per_step: int, seed: int) -> list[int]:
    """Indices of the items optimizer step ``step`` (0-based) trains on.

    Each epoch is a fresh permutation seeded by (seed, epoch); the last step of an epoch may be short.
    """
    per_epoch = steps_per_epoch(n_items, per_step)
    epoch, i = divmod(step, per_epoch)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n_items, generator=gen).tolist()
    return perm[i * per_step:(i + 1) * per_step]


def stream_indices(n_items: int, step: int, per_step: int, seed: int) -> list[int]:
    """Indices of the ``per_step`` items step ``step`` (0-based) takes from an endless stream of passes over
    ``n_items`` items, each pass a fresh permutation seeded by (seed, pass) as in :func:`step_indices`.

    Unlike :func:`step_indices`, no step is short: one that reaches the end of a pass continues into the
    next, so every step has exactly ``per_step`` items (repeating some when ``per_step > n_items``) and,
    step after step, each item is taken once per pass, none skipped."""
    first, last = step * per_step, (step + 1) * per_step  # positions in the stream
    out: list[int] = []
    for epoch in range(first // n_items, (last - 1) // n_items + 1):
        perm = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
        out += perm[max(first - epoch * n_items, 0):last - epoch * n_items]
    return out


def micro_batches(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def step_chunks(items: list, step: int, per_step: int, micro: int, seed: int) -> list[list]:
    """The items of optimizer step ``step``, split into micro-batches of ``micro``."""
    return [[items[j] for j in chunk] for chunk in micro_batches(step_indices(len(items), step, per_step, seed), micro)]


def rng_state() -> dict:
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def numerics(model: Any) -> dict:
    """What a step's bits depend on beyond the saved state: the thread count (a CPU reduction splits its sums
    by thread), the device, the dtype and the torch version. A resume under the same numerics continues
    bit-identical to an uninterrupted run; under other ones it continues correctly, not bit for bit."""
    param = next(model.parameters())
    device = param.device.type
    if device == "cuda":
        device = f"cuda ({torch.cuda.get_device_name(param.device)})"
    return {"threads": torch.get_num_threads(), "device": device, "dtype": str(param.dtype).removeprefix("torch."),
            "torch": str(torch.__version__)}


def numerics_changed(saved: dict, now: dict) -> list[str]:
    """``saved -> now`` for each numeric setting that differs (threads only on a CPU, where they matter)."""
    keys = [k for k in ("threads", "device", "dtype", "torch") if k != "threads" or now["device"] == "cpu"]
    return [f"{k} {saved[k]} -> {now[k]}" for k in keys if k in saved and saved[k] != now[k]]


def save_train_state(dest: Path, model: Any, optimizer: Any, scheduler: Any, step: int, extra: dict | None = None,
                     rngs: list[dict] | None = None) -> None:
    """Trainable weights as safetensors; optimizer, scheduler, RNG and step with ``torch.save``
    (read back with ``weights_only=True``). Every rank calls this: a sharded (FSDP) model is written by
    all ranks with torch.distributed.checkpoint, anything else by rank 0. ``rngs`` holds every rank's
    RNG state in rank order (default: this process's), so each rank resumes its own sampling stream."""
    from safetensors.torch import save_file

    sharded = distributed.is_sharded(model)
    if sharded:
        distributed.save_sharded(dest, model, optimizer)
    if not distributed.is_main():
        return
    if not sharded:
        weights = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(weights, dest / "trainable.safetensors")
        torch.save(optimizer.state_dict(), dest / "optimizer.pt")
    rngs = rngs or [rng_state()]
    state = {"step": step, "scheduler": scheduler.state_dict(), "rng": rngs[0], "extra": extra or {},
             "numerics": numerics(model)}
    if len(rngs) > 1:
        state["rng_ranks"] = rngs
    torch.save(state, dest / "state.pt")


def load_train_state(src: Path, model: Any, optimizer: Any, scheduler: Any) -> tuple[int, dict]:
    """Restore what :func:`save_train_state` wrote; returns (step, extra). A sharded checkpoint loads
    into any number of processes, sharded or not; one written whole loads whole (not into FSDP)."""
    from safetensors.torch import load_file

    if (src / ".metadata").exists():  # torch.distributed.checkpoint's index: written under --fsdp
        distributed.load_sharded(src, model, optimizer)
    elif distributed.is_sharded(model):
        raise BadInput([f"{src}: written without --fsdp; resume it without --fsdp (or start over with --overwrite)"])
    else:
        weights = load_file(src / "trainable.safetensors")
        params = dict(model.named_parameters())
        missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
        if missing:
            raise RuntimeError(f"{src}: checkpoint lacks {len(missing)} trainable tensors (e.g. {missing[0]}); "
                               "was it written with other LoRA/model settings?")
        with torch.no_grad():
            for name, tensor in weights.items():
                params[name].copy_(tensor)
        saved = torch.load(src / "optimizer.pt", weights_only=True, map_location="cpu")
        if len(saved["param_groups"]) != len(optimizer.param_groups):  # e.g. PPO before the value's own group
            raise BadInput([f"{src}: its optimizer has {len(saved['param_groups'])} parameter groups and this run's "
                            f"{len(optimizer.param_groups)}; it was written by another igpt version (start over with "
                            "--overwrite)"])
        optimizer.load_state_dict(saved)
    state = torch.load(src / "state.pt", weights_only=True)
    changed = numerics_changed(state.get("numerics", {}), numerics(model))
    if changed:
        say(f"{src.name} was written with other numerics ({', '.join(changed)}): the rest of this run will not be "
            "bit-identical to an uninterrupted one")
    scheduler.load_state_dict(state["scheduler"])
    rngs, world = state.get("rng_ranks", [state["rng"]]), distributed.world_size()
    if len(rngs) == world or world == 1:
        rng = rngs[distributed.rank()] if len(rngs) == world else state["rng"]
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    else:  # another number of processes: the data order continues exactly, the RNG streams start afresh
        say(f"{src.name} was written by {len(rngs)} processes and this run has {world}: dropout and sampling "
            "continue from this run's per-rank seeds")
    return int(state["step"]), state["extra"]


def save_state(stage: Stage, step: int, model: Any, optimizer: Any, scheduler: Any, extra: dict | None,
               keep: int) -> None:
    """A resumable checkpoint, written under a temporary name, renamed, then sealed with ``COMPLETED``.
    Every rank calls this; rank 0 publishes the folder once every rank has written its part. Weights
    that are not finite are never written (NonFinite): the previous checkpoint stays the newest."""
    if not all_finite(trainable_parameters(model)):
        raise NonFinite(f"{stage.name}: step {step}: the weights are no longer finite (NaN or inf); no checkpoint was "
                        f"written from them, the last one ({_newest(stage)}) is intact")
    rngs = distributed.gather(rng_state())
    tmp = distributed.broadcast(begin_checkpoint(stage.checkpoints, step) if distributed.is_main() else None)
    target = stage.checkpoints / checkpoint_name(step)
    with writing(target, tmp):  # a full disk: the partial folder goes, the previous checkpoint stays newest
        save_train_state(tmp, model, optimizer, scheduler, step, extra, rngs)
        distributed.barrier()
        if distributed.is_main():
            maybe_fault(step, "publish")
            publish_checkpoint(stage.checkpoints, tmp, step, keep)
    distributed.barrier()


def _newest(stage: Stage) -> str:
    ckpt = latest_checkpoint(stage.checkpoints)
    return ckpt.name if ckpt else "none yet"


def restore(stage: Stage, mode: str, model: Any, optimizer: Any, scheduler: Any,
            changes: list[dict] | None = None) -> tuple[int, dict, Path | None]:
    """Resume point: (step, extra state, checkpoint) of the newest complete checkpoint, or a fresh start.
    Metrics logged after that step are dropped; the resumed run logs them again. Rank 0 picks the
    checkpoint (the newest that matches its record, rundir.latest_checkpoint) and every rank loads that one.
    ``changes`` (from :func:`open_stage`) are recorded in the manifest's ``resumes`` with the step they
    take effect at."""
    ckpt = None
    if mode == "resume" and distributed.is_main():
        try:
            ckpt = latest_checkpoint(stage.checkpoints, warn=say)
        except BadInput as e:  # every rank stops, not only the one that looked
            ckpt = e
    ckpt = distributed.broadcast(ckpt)
    if isinstance(ckpt, BadInput):
        raise ckpt
    step, extra = load_train_state(ckpt, model, optimizer, scheduler) if ckpt is not None else (0, {})
    if distributed.is_main():
        truncate_metrics(stage.metrics, step)
        if mode == "resume":
            entry = read_manifest(stage.run_dir).get("stages", {}).get(stage.name, {})
            resumes = entry.get("resumes", []) + [{"step": step, "at": now(), "changes": changes or []}]
            update_manifest(stage.run_dir, stage.name, resumes=resumes)
    if ckpt is not None and distributed.world_size() > 1:
        say_every_rank(f"resumed at step {step} from {ckpt.name}")
    return step, extra, ckpt


def fit(stage: Stage, model: Any, optimizer: Any, scheduler: Any, step: int, total_steps: int,
        train_step: Callable[[int], dict], evaluate: Callable[[], dict] | None, eval_every: int, save_every: int,
        keep: int, extra_state: Callable[[], dict] | None = None, headline: tuple[str, ...] = ("train/loss",),
        log_every: int = 0) -> int:
    """Run optimizer steps ``step..total_steps``: log a metrics line per step (held-out metrics every
    ``eval_every`` and at the end), checkpoint every ``save_every`` and after the last step (so that
    ``--resume --max-steps`` can extend a finished run). ``train_step(step)`` does one optimizer step and
    returns its metrics (``train/tokens`` gives tokens/s). Progress shows the ``headline`` metrics: a bar on a
    terminal, a plain line every ``log_every`` steps (0: about every 30 s) in a log (console.StepProgress).
    Returns the last step.

    From here until :func:`finish_stage` a stop signal is acted on between steps: the step in flight
    ends, a checkpoint is written and the stage stops (:func:`stop`). Steps whose values were not finite
    are not applied (``train/skipped_steps``); SKIPS_IN_A_ROW in a row end the stage (exit 3)."""
    distributed.keep_freed_memory()
    started = time.perf_counter()
    Skips.total, Skips.in_a_row = _skipped_before(stage, step), 0
    saved = step  # the step of the newest checkpoint (the resume point, or 0: nothing to save)
    if distributed.is_main():  # the planned length, for `igpt status` (step N of total_steps)
        update_manifest(stage.run_dir, stage.name, total_steps=total_steps)

    def checkpoint() -> None:
        save_state(stage, step, model, optimizer, scheduler, extra_state() if extra_state else None, keep)

    signals.defer()
    # --report-to's trackers are closed however fit ends
    with trackers.reporting(stage, step) as report, \
            StepProgress(stage.name, total_steps, step, headline, log_every) as shown:
        while step < total_steps:
            t0 = time.perf_counter()
            record = train_step(step)
            step += 1
            seconds = time.perf_counter() - t0
            record = {"step": step, **record, "train/lr": scheduler.get_last_lr()[0],
                      "train/skipped_steps": Skips.total}
            if "train/tokens" in record:
                record["train/tokens_per_s"] = record["train/tokens"] / seconds
            record["elapsed_s"] = time.perf_counter() - started
            if evaluate is not None and (step % eval_every == 0 or step == total_steps):
                record.update(evaluate())
            if distributed.is_main():
                append_jsonl(stage.metrics, record)
                report(record)
            if Skips.in_a_row >= SKIPS_IN_A_ROW:
                quantity, value = Skips.last
                raise NonFinite(f"{stage.name}: step {step}: the {quantity} was {value} in {Skips.in_a_row} optimizer "
                                f"steps in a row; none of them was applied and no checkpoint was written from them. "
                                f"The newest checkpoint ({_newest(stage)}) is intact: resume from it (--resume, with "
                                "--allow-changes for a lower --lr) or check the data")
            if step % save_every == 0 or step == total_steps:
                checkpoint()
                saved = step
            shown.update(step, record)
            maybe_fault(step)
            signum = distributed.agree(signals.stop_requested() or 0)  # every rank stops after the same step
            if signum:
                if saved != step:
                    checkpoint()
                lifecycle.stop(stage, step, total_steps, signum)
    return step


def _skipped_before(stage: Stage, step: int) -> int:
    """``train/skipped_steps`` at the resume point (0 for a fresh start)."""
    if step == 0 or not distributed.is_main():
        return 0
    counts = [r.get("train/skipped_steps", 0) for r in read_metrics(stage.metrics) if r.get("step", 0) <= step]
    return int(counts[-1]) if counts else 0


def maybe_fault(step: int, where: str = "step") -> None:
    """Faults for the recovery tests, from ``IGPT_FAULT_AFTER_STEP``: ``N`` ends the process after step N
    (every rank of a launched run, once all of them have finished that step); ``N:publish`` ends it inside
    the checkpoint of step N, its files written but not yet published; ``N:SIGTERM`` (or another signal
    name) has rank 0 send itself that signal after step N, as a scheduler would."""
    value = os.environ.get(FAULT_ENV, "")
    at, _, what = value.partition(":")
    if at != str(step) or (what == "publish") != (where == "publish"):
        return
    if what.startswith("SIG"):
        if distributed.is_main():
            import signal

            os.kill(os.getpid(), signal.Signals[what])
        return
    if where == "step":
        distributed.barrier()
    os._exit(99)
