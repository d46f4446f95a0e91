"""An exponential moving average of a model's trained weights (PPO's ``ema_decay``): kept in fp32 on the
model's device, updated after every applied optimizer step, carried in checkpoints, exported as a model.

InstructGPT (Ouyang et al. 2022, appendix C) evaluates an EMA of the RL policy's weights, decay 0.992.
We follow OpenRLHF's ``moving_average`` (``ema = beta * ema + (1 - beta) * param`` after each optimizer
step, the average starting as a copy of the initial model, no bias correction): the paper says nothing of
a correction, and one is only needed for an average that starts at zero (Adam's moments); ours starts at
the SFT weights, so every early value is already a weighted mean of real weights.

What is averaged: the trained parameters only (``requires_grad``): every policy parameter in a full
fine-tune, the adapters alone with LoRA (the frozen base is the same in every step: averaging it would
only hold a second copy). Under DDP each rank keeps the whole average (the same on every rank); under
FSDP each rank keeps the average of the shard it holds, and checkpoints and the export gather the whole
(one fp32 copy of the trained weights on CPU, as the export gathers the model).
"""
from __future__ import annotations

from typing import Any

import torch


def ema_update(ema: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    """``ema[i] <- decay * ema[i] + (1 - decay) * params[i]``, in place. ``ema[i]`` and ``params[i]`` have the
    same shape (any); ``ema`` is fp32, ``params`` any float dtype (bf16 is read exactly as fp32).

    Why fp32: at decay 0.992 a step moves the average by 0.8% of (param - ema); in bf16 (8 bits of mantissa,
    a relative step of 2^-8 = 0.4%) most of those increments round away and the average would stall."""
    with torch.no_grad():
        torch._foreach_mul_(ema, decay)
        torch._foreach_add_(ema, [p.detach().float() for p in params], alpha=1.0 - decay)


def _local(t: torch.Tensor) -> torch.Tensor:
    """A parameter as this rank holds it: an FSDP shard (DTensor) as its local tensor, else itself."""
    return t.to_local() if hasattr(t, "to_local") else t


class ModelEMA:
    """The EMA of ``model``'s trained parameters, ``decay`` per optimizer step of ``optimizer`` (a step
    that was skipped for a non-finite value calls no ``optimizer.step()``, so it updates nothing)."""

    def __init__(self, model: torch.nn.Module, decay: float, optimizer: torch.optim.Optimizer):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.decay = decay
        self.shadow = [_local(p).detach().float().clone() for p in self.params]  # starts as the initial weights
        # after every optimizer.step(): the policy's step (the same optimizer also steps the value model)
        optimizer.register_step_post_hook(lambda *_: self.update())

    def update(self) -> None:
        ema_update(self.shadow, [_local(p) for p in self.params], self.decay)

    def state(self) -> dict[str, torch.Tensor]:
        """The whole average, {parameter name: fp32 tensor on CPU}, for a checkpoint or the export. Every rank
        must call this (an FSDP shard is gathered from every rank)."""
        return {n: self._full(p, s).cpu() for n, p, s in zip(self.names, self.params, self.shadow)}

    def load(self, state: dict[str, torch.Tensor] | None) -> None:
        """Continue from a checkpoint's :meth:`state`; without one (a run that started without an EMA and
        resumed with ``--allow-changes``), start from the weights as they are now."""
        if state is None:
            self.shadow = [_local(p).detach().float().clone() for p in self.params]
            return
        missing = [n for n in self.names if n not in state]
        if missing:
            raise RuntimeError(f"the checkpoint's EMA lacks {len(missing)} trained tensors (e.g. {missing[0]})")
        for n, p, s in zip(self.names, self.params, self.shadow):
            full = state[n].to(s.device, torch.float32)
            if hasattr(p, "device_mesh"):  # this rank's shard of it, as FSDP cut the parameter
                from torch.distributed.tensor import distribute_tensor

                full = distribute_tensor(full, p.device_mesh, p.placements).to_local()
            s.copy_(full)

    @staticmethod
    def _full(p: torch.Tensor, shadow: torch.Tensor) -> torch.Tensor:
        if not hasattr(p, "device_mesh"):
            return shadow
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(shadow, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()).full_tensor()


def load_weights(model: Any, weights: dict[str, torch.Tensor]) -> None:
    """Copy ``weights`` ({parameter name: tensor}) into ``model``'s parameters, each cast to its dtype."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, w in weights.items():
            params[name].copy_(w)
