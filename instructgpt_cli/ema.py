"""An exponential moving average of a model's trained weights (PPO's ``ema_decay``): kept in fp32 on the
model's device, updated after every applied optimizer step, carried in checkpoints, exported as a model.

InstructGPT (Ouyang et al. 2022, appendix C) evaluates an EMA of the RL policy's weights, decay 0.992.
We follow OpenRLHF's ``moving_average`` (``ema = beta * ema + (1 - beta) * param`` after each optimizer
step, the average starting as a copy of the initial model, no bias correction): the paper says nothing of
a correction, and one is only needed for an average that starts at zero (Adam's moments); ours starts at
the SFT weights, so every early value is already a weighted mean of real weights.

Without bias correction the start never quite leaves: after N updates decay^N of the SFT weights remain
(0.992^96 = 46%, 0.992^500 = 1.8%), so a run much shorter than 1 / (1 - decay) steps exports an average
that is still mostly the SFT model.

What is averaged: the policy's weights as they act, the ones its trained parameters set. In a full fine-tune
every trained parameter (``requires_grad``). With LoRA each adapted layer's effective weight
``W + scale * B @ A``, not the factors: the average of a product is not the product of the averages
(ema(B) @ ema(A) != ema(B @ A)), so averaging A and B apart would export a model the policy never was. That
costs an fp32 copy of each adapted weight, where the factors alone were a fraction of it; the average is
kept by the merged model's parameter names and exported as a merged model (it is no rank-r adapter).
Under DDP each rank keeps the whole average (the same on every rank); under FSDP each rank keeps the
average of the shard it holds, and checkpoints and the export gather the whole (one fp32 copy on CPU, as
the export gathers the model).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch

from .errors import BadInput


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


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A parameter whole on every rank: an FSDP shard gathered (collective), else itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class Averaged(NamedTuple):
    """One averaged weight: its ``name`` in the exported model, the parameter ``like`` whose shape and FSDP
    sharding it has, and ``weight()``, its current value as this rank holds it (fp32)."""

    name: str
    like: torch.Tensor
    weight: Callable[[], torch.Tensor]


def averaged_weights(model: Any) -> list[Averaged]:
    """What the EMA of ``model`` averages, in a fixed order: its trained parameters, or for a LoRA (peft) model
    each adapted layer's effective weight ``W + scale * B @ A`` under the merged model's name, and any other
    trained parameter as itself."""
    if not hasattr(model, "peft_config"):
        return [Averaged(n, p, lambda p=p: _local(p).detach().float()) for n, p in model.named_parameters()
                if p.requires_grad]
    from peft.tuners.lora import LoraLayer

    out, covered = [], set()
    base = model.get_base_model()  # its names are those of the merged model (merge_and_unload returns it)
    for name, layer in base.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        (adapter,) = layer.active_adapters
        covered |= {id(p) for p in layer.parameters() if p.requires_grad}
        out.append(Averaged(f"{name}.weight", layer.get_base_layer().weight,
                            lambda layer=layer, adapter=adapter: _adapted_weight(layer, adapter)))
    for n, p in base.named_parameters():
        if p.requires_grad and id(p) not in covered:
            out.append(Averaged(n.replace(".modules_to_save.default.", "."), p,
                                lambda p=p: _local(p).detach().float()))
    return out


def _adapted_weight(layer: Any, adapter: str) -> torch.Tensor:
    """``W + scale * B @ A`` of a peft LoRA layer in fp32, as this rank holds ``W`` (an FSDP shard: the factors
    are gathered, small, and the product cut as ``W`` is)."""
    w = layer.get_base_layer().weight
    with torch.no_grad():
        if adapter in getattr(layer, "lora_A", {}):  # a Linear (Conv1D: fan_in_fan_out, the weight transposed)
            delta = _whole(layer.lora_B[adapter].weight).float() @ _whole(layer.lora_A[adapter].weight).float()
            delta = (delta.T if layer.fan_in_fan_out else delta) * layer.scaling[adapter]
        else:  # another kind of LoRA layer (an embedding): peft's own product, in its dtype
            delta = layer.get_delta_weight(adapter).float()
        if hasattr(w, "device_mesh"):  # every rank has the whole product: keep the rows this rank's W has
            from torch.distributed.tensor import distribute_tensor

            delta = distribute_tensor(delta, w.device_mesh, w.placements, src_data_rank=None).to_local()
        return _local(w).detach().float() + delta


class ModelEMA:
    """The EMA of ``model``'s weights as they act (:func:`averaged_weights`), ``decay`` per :meth:`update`: PPO's
    training state calls it after every optimizer step that was applied (``PPOState.after_optimizer_step``; a
    step skipped for a non-finite value updates nothing)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.averaged = averaged_weights(model)
        self.names = [a.name for a in self.averaged]
        self.decay = decay
        self.shadow = [a.weight().clone() for a in self.averaged]  # starts as the initial weights

    def update(self) -> None:
        ema_update(self.shadow, [a.weight() for a in self.averaged], self.decay)

    def state(self) -> dict[str, torch.Tensor]:
        """The whole average, {parameter name: fp32 tensor on CPU}, for a checkpoint or the export. Every rank
        must call this (an FSDP shard is gathered from every rank)."""
        return {a.name: self._full(a.like, s).cpu() for a, s in zip(self.averaged, self.shadow)}

    def load(self, state: dict[str, torch.Tensor] | None) -> None:
        """Continue from a checkpoint's :meth:`state`; without one (a run that started without an EMA and
        resumed with ``--allow-changes``), start from the weights as they are now."""
        if state is None:
            self.shadow = [a.weight().clone() for a in self.averaged]
            return
        missing = [n for n in self.names if n not in state]
        if missing:  # e.g. a LoRA run's checkpoint from an igpt that averaged the factors A and B apart
            raise BadInput([f"the checkpoint's EMA lacks {len(missing)} of the averaged weights (e.g. {missing[0]}): it "
                            "was written by an igpt that averaged LoRA's factors apart; resume with --allow-changes "
                            "--ema-decay 0, or start over with --overwrite"])
        for n, p, s in zip(self.names, (a.like for a in self.averaged), self.shadow):
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


def averaged_model(model: Any, weights: dict[str, torch.Tensor]) -> Any:
    """``model`` with the averaged ``weights`` (:meth:`ModelEMA.state`) in place of its own: a LoRA model merged
    first (in place), its average being of the merged weights."""
    plain = model.merge_and_unload() if hasattr(model, "peft_config") else model
    load_weights(plain, weights)
    return plain


def load_weights(model: Any, weights: dict[str, torch.Tensor]) -> None:
    """Copy ``weights`` ({parameter name: tensor}) into ``model``'s parameters, each cast to its dtype."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, w in weights.items():
            params[name].copy_(w)
