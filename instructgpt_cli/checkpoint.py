"""What a resumable checkpoint holds, and the one place that writes and reads it.

``<stage>/checkpoints/step-NNNNNN/`` (written under a temporary name, renamed, sealed with ``COMPLETED``;
rundir.py owns that life):

- ``trainable.safetensors``: the trained module's parameters that train (``requires_grad``), under their
  ``named_parameters`` names. PPO trains policy and value as one module, so its keys start with
  :data:`POLICY` and :data:`VALUE` (``policy.model.layers.0...``, ``value.score.weight``); a reader that
  wants the policy alone (``compare ppo@step-N``, the frontier) strips :data:`POLICY`.
- ``optimizer.pt``: the optimizer's state dict (``torch.save``, read back with ``weights_only=True``).
- ``state.pt``: ``train.TrainState`` but its model and optimizer: the step, the scheduler, every rank's RNG,
  the skipped-step count, the stage's own state (``extra``: PPO's beta, EMA and ptx cursor) and the numerics
  the step's bits depend on (:func:`numerics`).
- under ``--fsdp`` the weights and optimizer are torch.distributed.checkpoint shards (``.metadata`` + shards)
  instead of the first two files.

The state is a ``train.TrainState`` (``Any`` here: train.py checkpoints through this module, so this one
does not import it). A checkpoint is written whole and read whole: nothing a resume needs is rebuilt from files
written for people (metrics, logs) or carried by hooks.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from . import distributed, faults
from .console import say, say_every_rank
from .errors import BadInput, NonFinite
from .rundir import (Stage, begin_checkpoint, checkpoint_name, complete_checkpoints, latest_checkpoint,
                     publish_checkpoint, read_manifest, truncate_metrics, update_manifest)
from .storage import now, writing

WEIGHTS = "trainable.safetensors"
OPTIMIZER = "optimizer.pt"
STATE = "state.pt"
SHARDED_INDEX = ".metadata"  # torch.distributed.checkpoint's index: the checkpoint was written under --fsdp
POLICY = "policy."  # PPO's trained module is train.PolicyAndValue: its policy's keys start with this
VALUE = "value."  # and its value model's with this


def require_whole(ckpt: Path, named: str) -> None:
    """BadInput unless checkpoint ``ckpt`` holds its trainable weights whole (:data:`WEIGHTS`), as a model loads
    them; one written under --fsdp is sharded. ``named``: how the user named it, for the message."""
    if (ckpt / SHARDED_INDEX).exists() or not (ckpt / WEIGHTS).is_file():
        raise BadInput([f"{named}: {ckpt} holds no {WEIGHTS} (a checkpoint written under --fsdp is sharded); only a "
                        "whole checkpoint loads as a model"])


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


def numerics_changed(saved: dict, current: dict) -> list[str]:
    """``saved -> current`` for each numeric setting that differs (threads only on a CPU, where they matter)."""
    keys = [k for k in ("threads", "device", "dtype", "torch") if k != "threads" or current["device"] == "cpu"]
    return [f"{k} {saved[k]} -> {current[k]}" for k in keys if k in saved and saved[k] != current[k]]


def recorded_threads(stage: Stage) -> tuple[str, int] | None:
    """``(name, threads)`` of ``stage``'s newest complete checkpoint if it was written on a CPU, read before the
    command chooses its threads (cpus.choose: a resume on the same threads stays bit-identical); None without
    one. The state is memory-mapped, not read; a checkpoint that cannot be read gives None here (restore says
    what is wrong with it)."""
    done = complete_checkpoints(stage.checkpoints)
    if not done:
        return None
    try:
        saved = torch.load(done[-1] / STATE, weights_only=True, mmap=True).get("numerics", {})
    except Exception:  # any damage: this is only a default's hint, and restore reports it properly
        return None
    if saved.get("device") != "cpu" or not isinstance(saved.get("threads"), int):
        return None
    return done[-1].name, saved["threads"]


def all_finite(params: list[torch.Tensor]) -> bool:
    """Whether every element of ``params`` is finite, over all ranks (FSDP shards: each rank its own)."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in params]
    bad = sum(int(not torch.isfinite(p.detach()).all()) for p in local)
    return not distributed.max_over_ranks(bad)


def write(dest: Path, state: Any, rngs: list[dict] | None = None) -> None:
    """``state`` into folder ``dest``. Every rank calls this: a sharded (FSDP) model is written by all ranks with
    torch.distributed.checkpoint, anything else by rank 0. ``rngs`` holds every rank's RNG state in rank order
    (default: this process's), so each rank resumes its own sampling stream."""
    from safetensors.torch import save_file

    model, optimizer = state.model, state.optimizer
    sharded = distributed.is_sharded(model)
    if sharded:
        distributed.save_sharded(dest, model, optimizer)
    extra = state.extra()  # every rank: a sharded EMA is gathered
    if not distributed.is_main():
        return
    if not sharded:
        weights = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(weights, dest / WEIGHTS)
        torch.save(optimizer.state_dict(), dest / OPTIMIZER)
    rngs = rngs or [rng_state()]
    saved = {"step": state.step, "scheduler": state.scheduler.state_dict(), "rng": rngs[0], "extra": extra,
             "skipped": state.skipped,
             "numerics": numerics(model)}
    if len(rngs) > 1:
        saved["rng_ranks"] = rngs
    torch.save(saved, dest / STATE)


def load(src: Path, state: Any) -> None:
    """Restore into ``state`` what :func:`write` wrote. A sharded checkpoint loads into any number of processes,
    sharded or not; one written whole loads whole (not into FSDP)."""
    from safetensors.torch import load_file

    model, optimizer = state.model, state.optimizer
    if (src / SHARDED_INDEX).exists():
        distributed.load_sharded(src, model, optimizer)
    elif distributed.is_sharded(model):
        raise BadInput([f"{src}: written without --fsdp; resume it without --fsdp (or start over with --overwrite)"])
    else:
        weights = load_file(src / WEIGHTS)
        params = dict(model.named_parameters())
        missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
        if missing:
            raise RuntimeError(f"{src}: checkpoint lacks {len(missing)} trainable tensors (e.g. {missing[0]}); "
                               "was it written with other LoRA/model settings?")
        with torch.no_grad():
            for name, tensor in weights.items():
                params[name].copy_(tensor)
        saved_optimizer = torch.load(src / OPTIMIZER, weights_only=True, map_location="cpu")
        if len(saved_optimizer["param_groups"]) != len(optimizer.param_groups):  # PPO before the value's own group
            raise BadInput([f"{src}: its optimizer has {len(saved_optimizer['param_groups'])} parameter groups and "
                            f"this run's {len(optimizer.param_groups)}; it was written by another igpt version (start "
                            "over with --overwrite)"])
        optimizer.load_state_dict(saved_optimizer)
    saved = torch.load(src / STATE, weights_only=True)
    changed = numerics_changed(saved.get("numerics", {}), numerics(model))
    if changed:
        say(f"{src.name} was written with other numerics ({', '.join(changed)}): the rest of this run will not be "
            "bit-identical to an uninterrupted one")
    state.scheduler.load_state_dict(saved["scheduler"])
    rngs, world = saved.get("rng_ranks", [saved["rng"]]), distributed.world_size()
    if len(rngs) == world or world == 1:
        rng = rngs[distributed.rank()] if len(rngs) == world else saved["rng"]
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    else:  # another number of processes: the data order continues exactly, the RNG streams start afresh
        say(f"{src.name} was written by {len(rngs)} processes and this run has {world}: dropout and sampling "
            "continue from this run's per-rank seeds")
    state.step = int(saved["step"])
    # the run's skipped steps go on counting (an igpt before this count was saved: from 0); those in a row start
    # afresh, as the run does: a resume, often with --allow-changes and a lower --lr, is a new start
    state.skipped, state.skipped_in_a_row = int(saved.get("skipped", 0)), 0
    state.load_extra(saved["extra"])


def save(stage: Stage, state: Any, keep: int) -> None:
    """A resumable checkpoint of ``state`` at its step, written under a temporary name, renamed, then sealed with
    ``COMPLETED``; the newest ``keep`` are kept. Every rank calls this; rank 0 publishes the folder once every
    rank has written its part. Weights that are not finite are never written (NonFinite): the previous
    checkpoint stays the newest."""
    step = state.step
    if not all_finite([p for p in state.model.parameters() if p.requires_grad]):
        raise NonFinite(f"{stage.name}: step {step}: the weights are no longer finite (NaN or inf); no checkpoint was "
                        f"written from them, the last one ({newest(stage)}) is intact")
    rngs = distributed.gather(rng_state())
    tmp = distributed.broadcast(begin_checkpoint(stage.checkpoints, step) if distributed.is_main() else None)
    target = stage.checkpoints / checkpoint_name(step)
    with writing(target, tmp):  # a full disk: the partial folder goes, the previous checkpoint stays newest
        write(tmp, state, rngs)
        distributed.barrier()
        if distributed.is_main():
            faults.inside_checkpoint(step)
            publish_checkpoint(stage.checkpoints, tmp, step, keep)
    distributed.barrier()


def newest(stage: Stage) -> str:
    """The name of ``stage``'s newest complete checkpoint, for messages."""
    ckpt = latest_checkpoint(stage.checkpoints)
    return ckpt.name if ckpt else "none yet"


def restore(stage: Stage, mode: str, state: Any, changes: list[dict] | None = None) -> Path | None:
    """Load the newest complete checkpoint into ``state`` (``mode`` 'resume'), or leave it fresh; returns the
    checkpoint (None: a fresh start). Metrics logged after its step are dropped; the resumed run logs them again.
    Rank 0 picks the checkpoint (the newest that matches its record, rundir.latest_checkpoint) and every rank
    loads that one. ``changes`` (from lifecycle.open_stage) are recorded in the manifest's ``resumes`` with the
    step they take effect at."""
    ckpt = None
    if mode == "resume" and distributed.is_main():
        try:
            ckpt = latest_checkpoint(stage.checkpoints, warn=say)
        except BadInput as e:  # every rank stops, not only the one that looked
            ckpt = e
    ckpt = distributed.broadcast(ckpt)
    if isinstance(ckpt, BadInput):
        raise ckpt
    if ckpt is not None:
        load(ckpt, state)
    if distributed.is_main():
        truncate_metrics(stage.metrics, state.step)
        if mode == "resume":
            entry = read_manifest(stage.run_dir).get("stages", {}).get(stage.name, {})
            resumes = entry.get("resumes", []) + [{"step": state.step, "at": now(), "changes": changes or []}]
            update_manifest(stage.run_dir, stage.name, resumes=resumes)
    if ckpt is not None and distributed.world_size() > 1:
        say_every_rank(f"resumed at step {state.step} from {ckpt.name}")
    return ckpt
