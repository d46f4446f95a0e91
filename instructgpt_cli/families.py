"""What igpt may do with each model family beyond calling the model's own forward, in one table: how its
logits follow from its LM head, whether packed rows attend within themselves, whether a custom 4-D mask is
taken as it is (prompt sharing), whether its backbone can be split at a layer, whether igpt's lean Llama
forward may run it; and how to reach a model's parts under peft's wrappers."""
from __future__ import annotations

from typing import Any, NamedTuple

import torch


class Family(NamedTuple):
    """What igpt may do with a model family (``config.model_type``) beyond calling the model's forward.

    ``logits``: what the family's causal LM does to ``lm_head(hidden)`` to give its logits, in order, each
    step an (operation, config field): ``multiply`` (Cohere's ``logit_scale``), ``divide`` (Granite's
    ``logits_scaling``), ``softcap`` (cap * tanh(logits / cap), Gemma 2's ``final_logit_softcapping``); empty:
    the head's output is the logits. Paths that compute logits from hidden states themselves (SFT's loss on
    response positions, PPO's lean log-probs, the lean decoder) apply them (:func:`logit_transform`).
    ``packed``: its attention builds the mask with ``create_causal_mask``, which reads positions that restart
    at 0 (and no attention mask) as packed sequences and masks block-diagonally; sliding-window families
    (Gemma 2/3) are left out until tested. ``split``: given ``inputs_embeds``, its backbone only builds the
    causal mask and rotary embeddings, runs its decoder layers and the final norm, doing nothing to the
    embeddings on the way in (Gemma scales them, Granite multiplies them), so the states entering layer k fed
    back as ``inputs_embeds`` to the layers from k up give the model's own output. ``lean``: igpt's lean
    Llama forward (``lean.py``) may run it, where :func:`runs_lean` finds transformers' own Llama classes."""

    logits: tuple[tuple[str, str], ...] = ()
    packed: bool = False
    split: bool = False
    lean: bool = False


DIVIDE_SCALING = (("divide", "logits_scaling"),)


MULTIPLY_SCALE = (("multiply", "logit_scale"),)


SOFTCAP = (("softcap", "final_logit_softcapping"),)


# One row per family igpt knows (tests/test_models.py checks each on a tiny random model against the model's
# own forward). A family not listed takes the model's forward everywhere: no packing, no split forward, and
# logits only from ``model(...)``.
FAMILIES: dict[str, Family] = {
    "llama": Family(packed=True, split=True, lean=True),
    "mistral": Family(packed=True, split=True),
    "qwen2": Family(packed=True, split=True),
    "qwen3": Family(packed=True, split=True),
    "gemma": Family(packed=True),
    "phi3": Family(packed=True),
    "olmo": Family(packed=True),
    "olmo2": Family(packed=True),
    "smollm3": Family(packed=True),
    "granite": Family(DIVIDE_SCALING, packed=True),
    "granitemoe": Family(DIVIDE_SCALING),
    "cohere": Family(MULTIPLY_SCALE),
    "cohere2": Family(MULTIPLY_SCALE),
    "gemma2": Family(SOFTCAP),
    "gemma3_text": Family(SOFTCAP),
    "gpt2": Family(),
    "gpt_neox": Family(),
    "phi": Family(),
}


def family(model: Any) -> Family | None:
    """The capabilities of ``model``'s family; None for a family igpt does not know."""
    return FAMILIES.get(getattr(model.config, "model_type", None))


class LogitTransform(NamedTuple):
    """What a causal LM does to its LM head's output (..., V): times ``multiply``, divided by ``divide``, then
    soft-capped at ``softcap`` (0: none), in the order and dtype the model's forward does it."""

    multiply: float = 1.0
    divide: float = 1.0
    softcap: float = 0.0

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.multiply != 1.0:
            logits = logits * self.multiply
        if self.divide != 1.0:
            logits = logits / self.divide
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def logit_transform(model: Any) -> LogitTransform | None:
    """How ``model``'s logits follow from its LM head's output: ``transform(head(hidden))`` equals
    ``model(...).logits`` at the same positions (``LogitTransform()`` is the identity). None for a family not
    in :data:`FAMILIES`: take the model's own forward for its logits."""
    fam = family(model)
    if fam is None:
        return None
    values: dict[str, float] = {}
    for op, field in fam.logits:
        value = getattr(model.config, field, None)
        if value is not None:
            values[op] = float(value)
    return LogitTransform(**values)


def supports_packing(model: Any) -> bool:
    """Whether sequences packed end to end in one row attend only within themselves in ``model``."""
    fam = family(model)
    return fam is not None and fam.packed and getattr(model.config, "_attn_implementation", "sdpa") in (
        "sdpa", "eager", "flash_attention_2", "flex_attention")


def supports_sharing(model: Any) -> bool:
    """Whether ``model`` takes a custom 4-D attention mask as it is (``shared_reward_scores``): the ``packed``
    families under SDPA or eager attention (flash-attention kernels take no such mask)."""
    fam = family(model)
    return fam is not None and fam.packed and getattr(model.config, "_attn_implementation", "sdpa") in ("sdpa", "eager")


def unwrapped(model: Any) -> Any:
    """The transformers model under peft's wrappers (``model`` itself when there are none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def backbone(model: Any) -> torch.nn.Module:
    """The decoder stack (e.g. ``LlamaModel``: embed_tokens, layers, norm) under a transformers head and
    under peft's wrappers."""
    return unwrapped(model).base_model


def frozen_layers(model: Any) -> int:
    """How many of the lowest decoder layers hold nothing that trains, embeddings included (LoRA on the top
    layers only: their output is the same for the adapted model and its base, and stays so during
    training); 0 for families that are not ``split`` (:data:`FAMILIES`)."""
    fam = family(model)
    if fam is None or not fam.split:
        return 0
    stack = backbone(model)
    if any(p.requires_grad for p in stack.embed_tokens.parameters()):
        return 0
    n = 0
    for layer in stack.layers:
        if any(p.requires_grad for p in layer.parameters()):
            break
        n += 1
    return n if n < len(stack.layers) else 0


def shared_layers(models: list[Any]) -> int:
    """How many of the lowest decoder layers, embeddings included, compute the same in every one of ``models``:
    one ``split`` family (:data:`FAMILIES`), no adapter in those layers (a peft view with its adapters disabled
    shares its module with the adapted model but not its computation), and equal weights (the same tensors, or
    ``torch.equal`` ones: models fine-tuned with LoRA on their top layers from one base). Their output, computed
    once, serves each model's layers above (``forward.Trunk``): eval's KL to SFT and reward scores of one set
    of responses. At most all layers but the top one; 0 for one model, sharded weights or another family."""
    if len(models) < 2 or any(family(m) is None or not family(m).split for m in models):
        return 0
    stacks = [backbone(m) for m in models]
    if len({len(s.layers) for s in stacks}) != 1:
        return 0

    def same(modules: list[torch.nn.Module]) -> bool:
        named = [list(m.named_parameters()) + list(m.named_buffers()) for m in modules]
        first = named[0]
        return all(len(other) == len(first) and all(
            na == nb and "lora_" not in na and type(a.data) is torch.Tensor and type(b.data) is torch.Tensor
            and a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
            and (a.data_ptr() == b.data_ptr() or torch.equal(a, b)) for (na, a), (nb, b) in zip(first, other))
            for other in named[1:])

    rotary = [s.rotary_emb for s in stacks if hasattr(s, "rotary_emb")]
    if not same([s.embed_tokens for s in stacks]) or rotary and (len(rotary) < len(stacks) or not same(rotary)):
        return 0
    n = 0
    for layers in zip(*(s.layers for s in stacks)):
        if not same(list(layers)):
            break
        n += 1
    return min(n, len(stacks[0].layers) - 1)


def runs_lean(model: Any) -> bool:
    """Whether ``model`` runs on the lean path: a family :data:`FAMILIES` marks ``lean``, whose stack's
    classes are exactly transformers' Llama ones, under SDPA attention, with rotary frequencies that do not
    depend on the sequence's length (dynamic and LongRoPE scaling recompute them per call). Asked once, when a
    model's ``runners.Runner`` is built (``forward.choose``), after FSDP and peft wrapped it: both change the
    answer."""
    from transformers.models.llama import modeling_llama as ml

    fam = family(model)
    if fam is None or not fam.lean or getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    stack = backbone(model)
    if type(stack) is not ml.LlamaModel or any(t in str(getattr(stack.rotary_emb, "rope_type", "default"))
                                               for t in ("dynamic", "longrope")):
        return False
    return all(type(layer) is ml.LlamaDecoderLayer and type(layer.self_attn) is ml.LlamaAttention
               and type(layer.mlp) is ml.LlamaMLP and type(layer.input_layernorm) is ml.LlamaRMSNorm
               and type(layer.post_attention_layernorm) is ml.LlamaRMSNorm for layer in stack.layers)


def checkpointing(model: Any) -> bool:
    """Whether ``model``'s decoder layers checkpoint their activations in training."""
    return any(getattr(module, "gradient_checkpointing", False) is True for module in model.modules())
