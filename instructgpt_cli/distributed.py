"""Where a stage runs: its device (``--device``, checked before any work), this process's memory reuse, and
several processes under ``torchrun`` or ``accelerate launch`` (torch.distributed).

igpt builds no launcher. A launcher starts one process per device and sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT; :func:`launched` joins that process group for one stage (gloo
on CPU, nccl on CUDA) and leaves it afterwards. Without a launcher (WORLD_SIZE unset or 1) every
function here is a no-op, so a single-process run computes exactly what it computed before this module.

How a stage shares an optimizer step: every rank reads the whole data set and computes the step's
items from (seed, step) alone (``train.step_indices``), splits them into micro-batches, and trains on
its share of them (:func:`rank_chunks`). The effective batch is therefore batch_size x grad_accum x
world_size, and losses are normalised by counts of the *whole* step, which every rank can compute.
DDP and FSDP average gradients over ranks; stages multiply their losses by the world size so that the
average is the sum the single-process loss defines.

How a model is wrapped for several processes (DDP, FSDP2) and called is ``runners.Runner``'s.
"""
from __future__ import annotations

import contextlib
import gc
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from .errors import BadInput

# ---------------------------------------------------------------- who am I


def world_size() -> int:
    """Processes in the group; 1 when not launched (or the group is not joined)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def no_autograd() -> contextlib.AbstractContextManager:
    """For forwards that never back-propagate (sampling, rollout scoring): ``torch.inference_mode`` in one
    process (no autograd bookkeeping at all: no version counters, no view tracking), ``no_grad`` under a launcher, where
    the buffers DDP and FSDP allocate in a forward must stay writable outside inference mode."""
    return torch.inference_mode() if world_size() == 1 else torch.no_grad()


def is_main() -> bool:
    """Rank 0 is the only process that writes files; before a launched run joins its group (or after it
    left), the launcher's ``RANK`` says which process this is."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def launched(device_name: str) -> Iterator[None]:
    """Join the launcher's process group for the duration of a stage (a no-op without a launcher).
    On CUDA the process is pinned to ``cuda:LOCAL_RANK`` (nccl needs it before the first collective)
    and fp32 matmuls may use TF32."""
    device = resolve_device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")  # TF32 on Ampere and newer; bf16 autocast does the rest
    joined = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    if joined:
        cuda = device.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    try:
        yield
    finally:
        if joined:
            # Free the stage's DDP/FSDP wrappers (held in reference cycles) while the interpreter is alive:
            # a gloo group they still hold when the interpreter finalises can abort the process at exit
            # ("terminate called without an active exception"), after a run that succeeded.
            gc.collect()
            dist.destroy_process_group()


# ---------------------------------------------------------------- collectives (identity for one process)


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (picklable objects)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def max_over_ranks(value: int) -> int:
    """The largest of every rank's ``value`` (one small all-reduce; ``value`` itself for one process): a
    decision, such as stopping on a signal only some ranks received, that every rank must take together."""
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over ranks (a new tensor; ``t`` itself for one process). Used for the counts and
    moments that must be global: whitening, token normalisation."""
    if world_size() == 1:
        return t
    out = t.detach().clone()
    dist.all_reduce(out)
    return out


def reduce_metrics(record: dict, sums: tuple[str, ...] = ()) -> dict:
    """A metrics record averaged over ranks, except keys in ``sums`` (counts, and means each rank has
    already weighted by its share of the global count), which are summed. One all-reduce."""
    if world_size() == 1:
        return record
    keys = sorted(record)
    values = torch.tensor([float(record[k]) for k in keys], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(values)
    out = {}
    for k, v in zip(keys, values.tolist()):
        v = v if k in sums else v / world_size()
        out[k] = int(round(v)) if isinstance(record[k], int) and k in sums else v
    return out


# ---------------------------------------------------------------- sharing the work


def rank_chunks(chunks: list) -> list[tuple[Any, float]]:
    """This rank's share of a step's micro-batches, as (chunk, weight): chunk j goes to rank j mod W.

    Every rank gets the same number of chunks (ranks short of one repeat the first chunk with weight 0),
    because DDP reduces in the last backward of every rank and FSDP gathers parameters in every
    forward: all ranks must run the same number of them. One process: every chunk, weight 1.
    """
    w, r = world_size(), rank()
    mine = [(c, 1.0) for c in chunks[r::w]]
    rounds = -(-len(chunks) // w)
    return mine + [(chunks[0], 0.0)] * (rounds - len(mine))


def seed_rank(seed: int) -> None:
    """Seed dropout and sampling differently on every rank (the data order does not use this RNG).
    Called once the models are built, so initialisation is the same on every rank. No-op alone."""
    if world_size() > 1:
        torch.manual_seed(seed + 1_000_003 * rank())


def is_sharded(model: torch.nn.Module) -> bool:
    return any_sharded(model.parameters())


def any_sharded(params: Iterable[torch.Tensor]) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in params)


def as_float(x: Any) -> float:
    """A scalar that may be a DTensor (FSDP's gradient norm) as a float."""
    return float(x.full_tensor()) if hasattr(x, "full_tensor") else float(x)


# ---------------------------------------------------------------- sharded checkpoints and export (FSDP)


def save_sharded(dest: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its shards of the trainable weights and the optimizer state into ``dest``
    (torch.distributed.checkpoint); any number of processes, sharded or not, can load them back."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_train_state_dict(model, optimizer), checkpoint_id=str(dest))


def load_sharded(src: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = _train_state_dict(model, optimizer)
    dcp.load(state, checkpoint_id=str(src))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(strict=False))


def _train_state_dict(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights, optim = get_state_dict(model, optimizer)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return {"model": {k: v for k, v in weights.items() if k in trainable}, "optim": optim}


def full_model(model: torch.nn.Module, rebuild: Callable[[], torch.nn.Module]) -> torch.nn.Module | None:
    """The model to export: itself, or for a sharded model a plain copy on rank 0's CPU (``rebuild()``
    makes one of the same architecture) holding the gathered full weights; None on other ranks.
    Every rank must call this (gathering is collective)."""
    if not is_sharded(model):
        return model
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main():
        return None
    plain = rebuild()
    plain.load_state_dict(full)
    return plain.to(dtype=next(iter(full.values())).dtype)


def resolve_device(name: str) -> torch.device:
    """``auto``: the GPU of this process (``cuda:LOCAL_RANK`` under torchrun) or the CPU; ``cuda`` alone
    also means this process's GPU. A device this machine lacks is BadInput (one line, before any work)."""
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    elif name == "auto":
        return torch.device("cpu")
    else:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise BadInput([f"--device {name}: not a device (auto, cpu, cuda, cuda:N or mps)"]) from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise BadInput([f"--device {name}: this machine has no CUDA GPU that torch can use "
                            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); use --device cpu"])
        if (device.index or 0) >= count:
            raise BadInput([f"--device {name}: this machine has {count} CUDA GPU(s): cuda:0..cuda:{count - 1}"])
    elif device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise BadInput([f"--device {name}: MPS (Apple GPU) is not available here; use --device cpu"])
    return device


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep the memory a training step frees, for the next step to reuse.

    By default glibc serves every block over its mmap threshold (128 KiB, rising to 32 MiB at most) with a
    fresh ``mmap`` and unmaps it on free, and trims the heap's top: every step's activations and gradients (a
    135M model's embedding gradient alone is 113 MB) are then page-faulted in afresh every step (what that
    costs: bench/README.md).
    With mmap and trimming off, freed blocks stay in the heap and the next step reuses them; the peak did not
    grow in the bench, only the memory is not handed back before the process ends (jemalloc and tcmalloc, which
    PyTorch's CPU tuning guide suggests preloading, hold on to it the same way). Once per process, on glibc
    only; ``MALLOC_MMAP_MAX_`` or ``MALLOC_TRIM_THRESHOLD_`` in the environment means the user chose, and
    nothing is changed. Returns whether the setting is now in force."""
    global _KEPT
    if _KEPT is None:
        _KEPT = False
        if not any(v in os.environ for v in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")):
            import ctypes

            try:  # the process's own symbols: libc's, without searching for the library
                mallopt = ctypes.CDLL(None).mallopt
            except (OSError, AttributeError, TypeError):  # no mallopt (macOS, Windows): its allocator as it is
                return False
            m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
            _KEPT = bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))
    return _KEPT


_KEPT: bool | None = None
