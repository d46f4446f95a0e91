"""What every training stage's loop shares: the optimizer and its schedule, the deterministic data order, the
training state a checkpoint saves whole (:class:`TrainState`), and the per-step bookkeeping a loop calls
(:class:`Session`: the metrics line, trackers, progress, the skipped-step limit, checkpoint cadence, stop
signals).

A stage's loop reads top to bottom in the stage (``stages/ppo.py``: sample -> score -> update -> adapt beta ->
record); it calls these, nothing here calls the stage back. The data order is a pure function of (seed,
epoch), so a resumed run needs only the step number to continue exactly where the interrupted one was.
Under a launcher every rank runs these functions; only rank 0 writes files, and barriers keep the others
from reading what is half written (distributed.py).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NamedTuple

import torch

from . import checkpoint, distributed, faults, lifecycle, signals, trackers
from .config import OptimConfig
from .console import StepProgress
from .errors import NonFinite
from .rundir import Stage, append_jsonl, checkpoint_name, update_manifest
from .stages import STAGES

SKIPS_IN_A_ROW = 3  # consecutive skipped steps that end a stage (exit 3)


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
    return epoch_order(n_items, epoch, seed)[i * per_step:(i + 1) * per_step]


def epoch_order(n_items: int, epoch: int, seed: int) -> list[int]:
    """The order of ``n_items`` items in epoch ``epoch``: a permutation seeded by (seed, epoch)."""
    return torch.randperm(n_items, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


def visited_indices(n_items: int, steps: int, per_step: int, seed: int) -> list[int]:
    """Indices of the items that steps 0 .. ``steps`` - 1 of :func:`step_indices` train on, sorted: every item
    once a run reaches its second epoch, else the first ``steps`` steps' share of the first epoch's order."""
    if steps >= steps_per_epoch(n_items, per_step):
        return list(range(n_items))
    return sorted(epoch_order(n_items, 0, seed)[:steps * per_step])


def stream_indices(n_items: int, step: int, per_step: int, seed: int) -> list[int]:
    """Indices of the ``per_step`` items step ``step`` (0-based) takes from an endless stream of passes over
    ``n_items`` items, each pass a fresh permutation seeded by (seed, pass) as in :func:`step_indices`.

    Unlike :func:`step_indices`, no step is short: one that reaches the end of a pass continues into the
    next, so every step has exactly ``per_step`` items (repeating some when ``per_step > n_items``) and,
    step after step, each item is taken once per pass, none skipped."""
    first, last = step * per_step, (step + 1) * per_step  # positions in the stream
    out: list[int] = []
    for epoch in range(first // n_items, (last - 1) // n_items + 1):
        perm = epoch_order(n_items, epoch, seed)
        out += perm[max(first - epoch * n_items, 0):last - epoch * n_items]
    return out


def micro_batches(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def step_chunks(items: list, step: int, per_step: int, batch_size: int, seed: int) -> list[list]:
    """The items of optimizer step ``step``, split into micro-batches of ``batch_size``."""
    return [[items[j] for j in chunk]
            for chunk in micro_batches(step_indices(len(items), step, per_step, seed), batch_size)]




class HeldOut:
    """A stage's held-out evaluation that keeps its newest result: :meth:`Session.record` runs it at the last step,
    so the final model's summary is that result, not a second pass (one is run where no step ran: a resume of a
    finished schedule)."""

    def __init__(self, evaluate: Callable[[], dict]):
        self.evaluate, self.last = evaluate, {}

    def __call__(self) -> dict:
        self.last = dict(self.evaluate())
        return dict(self.last)

    def final(self) -> dict:
        return dict(self.last) or self()


# ---------------------------------------------------------------- the training state


@dataclass
class TrainState:
    """Everything a resume needs, saved whole in a checkpoint and restored whole (checkpoint.py): the trained
    module's weights, the optimizer, the schedule, the step, and the optimizer steps that were skipped
    because a value was NaN or infinite (the RNG is saved beside it). A stage with more state (PPO's beta,
    EMA and ptx cursor) subclasses it and says what in :meth:`extra` and :meth:`load_extra`.

    ``step`` counts the stage's steps: optimizer steps for sft, train-rm and dpo, iterations for PPO."""

    model: torch.nn.Module  # the trained module; its parameters that train are the checkpoint's weights
    optimizer: torch.optim.Optimizer
    scheduler: Any  # a torch LR scheduler over ``optimizer``
    step: int = 0
    skipped: int = 0  # optimizer steps (PPO: or whole iterations) not applied, over the whole run
    skipped_in_a_row: int = 0  # since the last applied one, in this process (a resume starts afresh)
    last_skip: tuple[str, float] = ("", 0.0)  # what was not finite in the last skipped step, and its value

    def extra(self) -> dict:
        """The stage's own state for the checkpoint (``state.pt``'s ``extra``): tensors, numbers, strings."""
        return {}

    def load_extra(self, extra: dict) -> None:
        """Restore what :meth:`extra` saved."""

    def after_optimizer_step(self) -> None:
        """Called after every optimizer step that was applied (none when a step is skipped)."""

    def skip(self, quantity: str, value: float) -> None:
        """Record a step that is not applied because ``quantity`` was ``value`` (NaN or infinite)."""
        self.skipped += 1
        self.skipped_in_a_row += 1
        self.last_skip = (quantity, value)

    def optimizer_step(self, grad_clip: float, loss: float | None = None) -> float:
        """Clip, step, advance the schedule, clear the gradients; returns the gradient norm before clipping.
        A non-finite gradient norm or ``loss`` skips the step (no optimizer step, no schedule step)."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        grad_norm = clip_gradients(params, grad_clip)
        self._step_if_finite({"loss": loss, "gradient norm": grad_norm})
        return grad_norm

    def optimizer_step_by_group(self, grad_clip: float) -> list[float]:
        """:meth:`optimizer_step` with each parameter group's gradient clipped on its own norm, so one group's
        large gradient (PPO-ptx's, ptx_coef 27.8, on the policy) cannot shrink another's (the value model's)
        through a shared norm. Returns each group's norm before clipping."""
        norms = [clip_gradients(group["params"], grad_clip) for group in self.optimizer.param_groups]
        self._step_if_finite({f"gradient norm of parameter group {i}": n for i, n in enumerate(norms)})
        return norms

    def _step_if_finite(self, values: dict[str, float | None]) -> None:
        """Apply the step when every value is finite, else drop the gradients and record it as skipped. Every
        value here is the same on every rank (gradient norms are taken after DDP's all-reduce; a loss is passed
        only by a single process), so all ranks agree."""
        bad = first_non_finite(values)
        if bad is not None:
            self.skip(*bad)
        else:
            self.skipped_in_a_row = 0
            self.optimizer.step()
            self.scheduler.step()
            self.after_optimizer_step()
        self.optimizer.zero_grad(set_to_none=True)


def first_non_finite(values: dict[str, float | None]) -> tuple[str, float] | None:
    """(name, value) of the first value that is NaN or infinite (None values are not checked), else None."""
    return next(((name, v) for name, v in values.items() if v is not None and not math.isfinite(v)), None)


# ---------------------------------------------------------------- what every loop calls


class Session:
    """The bookkeeping around a stage's loop, which the loop calls:

        with Session(stage, cfg, state, total_steps) as session:
            for i in session.steps():            # i = state.step; ends at total_steps
                record = ... one step ...
                session.record(record, held_out)  # step done: metrics line, checkpoint, stop signal

    From here until lifecycle.finish_stage a stop signal is acted on between steps: the step in flight ends, a
    checkpoint is written and the stage stops (lifecycle.stop). SKIPS_IN_A_ROW skipped steps in a row end the
    stage (exit 3). ``cfg`` gives ``save_every``, ``keep_checkpoints``, ``log_every``, ``report_to`` and, for a
    stage with held-out data, ``eval_every``."""

    def __init__(self, stage: Stage, cfg: Any, state: TrainState, total_steps: int):
        self.stage, self.cfg, self.state, self.total_steps = stage, cfg, state, total_steps
        self.headline = STAGES[stage.name].headline  # the metrics the progress line shows
        self.saved = state.step  # the step of the newest checkpoint (the resume point, or 0: nothing to save)
        self._exit = contextlib.ExitStack()
        self.started = self.step_started = time.perf_counter()  # elapsed_s counts from here

    def __enter__(self) -> "Session":
        distributed.keep_freed_memory()
        if distributed.is_main():  # the planned length, for `igpt status` (step N of total_steps)
            update_manifest(self.stage.run_dir, self.stage.name, total_steps=self.total_steps)
        signals.defer()
        # --report-to's trackers are closed however the loop ends, with its exit code
        self.report = self._exit.enter_context(trackers.reporting(self.stage, self.state.step, self.cfg))
        self.progress = self._exit.enter_context(
            StepProgress(self.stage.name, self.total_steps, self.state.step, self.headline, self.cfg.log_every))
        return self

    def __exit__(self, *exc: Any) -> bool | None:
        return self._exit.__exit__(*exc)

    def steps(self) -> Iterator[int]:
        """The 0-based index of each step still to run (resumed runs start at their checkpoint's step)."""
        while self.state.step < self.total_steps:
            self.step_started = time.perf_counter()
            yield self.state.step

    def record(self, record: dict, held_out: Callable[[], dict] | None = None) -> None:
        """End the step: count it, log its metrics line (``held_out()``'s metrics added every ``eval_every`` steps
        and at the last; ``train/tokens`` gives tokens/s) to metrics.jsonl, the trackers and the progress, then
        stop on SKIPS_IN_A_ROW skipped steps, checkpoint every ``save_every`` steps and after the last (so that
        ``--resume --max-steps`` can extend a finished run), and act on a stop signal."""
        seconds = time.perf_counter() - self.step_started
        state, stage = self.state, self.stage
        state.step += 1
        step = state.step
        record = {"step": step, **record, "train/lr": state.scheduler.get_last_lr()[0],
                  "train/skipped_steps": state.skipped}
        if "train/tokens" in record:
            record["train/tokens_per_s"] = record["train/tokens"] / seconds
        record["elapsed_s"] = time.perf_counter() - self.started
        if held_out is not None and (step % self.cfg.eval_every == 0 or step == self.total_steps):
            record.update(held_out())
        if distributed.is_main():
            append_jsonl(stage.metrics, record)
            self.report(record)
        if state.skipped_in_a_row >= SKIPS_IN_A_ROW:
            quantity, value = state.last_skip
            raise NonFinite(f"{stage.name}: step {step}: the {quantity} was {value} in {state.skipped_in_a_row} "
                            f"optimizer steps in a row; none of them was applied and no checkpoint was written from "
                            f"them. The newest checkpoint ({checkpoint.newest(stage)}) is intact: resume from it "
                            "(--resume, with --allow-changes for a lower --lr) or check the data")
        if step % self.cfg.save_every == 0 or step == self.total_steps:
            self.checkpoint()
        self.progress.update(step, record)
        faults.after_step(step)
        signum = distributed.max_over_ranks(signals.stop_requested() or 0)  # every rank stops after the same step
        if signum:
            if self.saved != step:
                self.checkpoint()
            lifecycle.stop(stage, step, self.total_steps, signum)

    def finish_early(self, reason: str) -> None:
        """End the loop before ``total_steps`` as a normal finish (``igpt ppo --watch-patience``): the last step's
        checkpoint is written and the reason said; the stage then exports final/ as after its last step."""
        if self.saved != self.state.step:
            self.checkpoint()
        if distributed.is_main():
            self.progress.say(f"{self.stage.name}: finishing after step {self.state.step} of {self.total_steps}: "
                              f"{reason}")

    def checkpoint(self) -> None:
        """Save the state at this step (every rank: checkpoint.save) and say so in the progress (rank 0)."""
        checkpoint.save(self.stage, self.state, self.cfg.keep_checkpoints)
        self.saved = self.state.step
        if distributed.is_main():
            folder = self.stage.checkpoints / checkpoint_name(self.state.step)
            size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
            self.progress.say(f"{self.stage.name}: checkpoint {folder.name} saved ({size / 2**20:,.1f} MiB)")
