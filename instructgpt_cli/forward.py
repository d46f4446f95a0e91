"""How a model is run, on one of two paths with the same methods: :class:`LeanForward`, igpt's lean Llama forward
(``lean.py``), and :class:`TransformersForward`, transformers' own, for every forward igpt makes: decoding (a
:class:`Decoder` per batch of prompts), the frozen trunk's states, PPO's response log-probs, values and scores,
DPO's sequence log-probs, and the LM losses of SFT, PPO-ptx and eval, each with the LM head only where a loss or a
log-prob is read.

Which path a model takes is chosen once, when its ``runners.Runner`` is built (:func:`choose`); the stages call
models only through runners."""
from __future__ import annotations

import contextlib
import functools
import inspect
import weakref
from typing import Any, Iterator, Mapping, Protocol

import torch
from transformers.utils import logging as hf_logging

from . import lean
from .batches import (IGNORE_INDEX, mask_inputs, pack, packed_columns, pad_right, padded_columns, pays_to_pack,
                      pays_to_share, position_ids, shared_prefix_mask, shared_rows)
from .families import LogitTransform, backbone, checkpointing, logit_transform, runs_lean, unwrapped
from .losses import linear_cross_entropy_sum, lm_targets, sft_loss_sum

# config field of a reward model: added to its scalar head's output so that the demonstrations score mean 0
# (the normalisation the paper applies before RL; a transformers sequence classifier's head has no bias)
REWARD_BIAS = "igpt_reward_bias"
# config field of a reward model (train-rm --score): where its score is read. "last": the head at the sequence's
# last token, the paper's (and what a model without the field, any other tool's, means); "mean": the head's mean
# over the response's tokens (EOS included), the head of the mean response state, since the head is linear
REWARD_POOL, POOLS = "igpt_reward_pool", ("last", "mean")


def reward_pool(model: Any) -> str:
    """Where ``model``'s score is read (:data:`REWARD_POOL`); a value igpt does not know is refused, never read as
    another."""
    pool = getattr(model.config, REWARD_POOL, "last")
    if pool not in POOLS:
        from .errors import BadInput

        raise BadInput([f"the reward model's config.json: {REWARD_POOL}: {pool!r} must be one of {', '.join(POOLS)}"])
    return pool


def read_scores(head: torch.Tensor, columns: list[list[int]], starts: list[int] | None) -> torch.Tensor:
    """Sequences' scores (N,) from the scalar head at every flat position of their rows (``head``, flattened;
    ``columns``: each sequence's tokens' flat indices): at each one's last token, or with ``starts`` (where each
    response starts) the mean over its response's tokens (at least its last)."""
    device = head.device
    if starts is None:
        return head[torch.tensor([c[-1] for c in columns], device=device)]
    picked = [c[min(s, len(c) - 1):] for c, s in zip(columns, starts)]
    flat = torch.tensor([i for c in picked for i in c], device=device)
    segment = torch.tensor([n for n, c in enumerate(picked) for _ in c], device=device)
    # index_select, not head[flat]: a shared prefix's positions repeat, and advanced indexing's backward adds
    # repeats in a thread-dependent order (index_select's is deterministic)
    sums = torch.zeros(len(picked), dtype=head.dtype, device=device).index_add(0, segment, head.index_select(0, flat))
    return sums / torch.tensor([len(c) for c in picked], dtype=head.dtype, device=device)


class Decoder(Protocol):
    """Token-by-token logits after left-padded prompts: :meth:`start` runs the prompts and gives the logits
    (B, V) of the first new token, each :meth:`step` takes one token per row (B,) and gives the next's."""

    def start(self) -> torch.Tensor: ...

    def step(self, tokens: torch.Tensor) -> torch.Tensor: ...


# model -> (the module holding its scalar head, the head's attribute name): found once, read on every forward
_HEADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def scalar_head(model: Any) -> torch.nn.Module:
    """The scalar head of a sequence classifier (``score`` / ``classifier``), outermost wrapper first
    (under LoRA, peft's wrapper that picks the trained copy or, adapters disabled, the original)."""
    if model not in _HEADS:
        for name, _ in model.named_modules():
            if name.split(".")[-1] in ("score", "classifier"):
                parent, _, attr = name.rpartition(".")
                _HEADS[model] = (model.get_submodule(parent), attr)
                break
        else:
            raise ValueError(f"{type(model).__name__} has no scalar head named score or classifier")
    parent, attr = _HEADS[model]
    return getattr(parent, attr)  # as it is now: peft may have wrapped it since


def scalar_head_outputs(model: Any, **inputs: torch.Tensor) -> torch.Tensor:
    """The scalar head of a reward/value model at every position (B, L), normalisation bias added.

    Read with a hook on the head, since a sequence classifier returns only the pooled score.
    """
    captured: list[torch.Tensor] = []
    hook = scalar_head(model).register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        model(**{"use_cache": False, **inputs})
    finally:
        hook.remove()
    return captured[-1][..., 0].float() + getattr(model.config, REWARD_BIAS, 0.0)


@contextlib.contextmanager
def only_layers(model: Any, start: int, stop: int | None, final_norm: bool = True) -> Iterator[None]:
    """Within the block, ``model``'s backbone runs its decoder layers ``start:stop`` only (and, without
    ``final_norm``, returns the last one's output as it is)."""
    stack = backbone(model)
    layers, norm = stack.layers, stack.norm
    stack.layers = torch.nn.ModuleList(list(layers)[start:stop])
    if not final_norm:
        stack.norm = torch.nn.Identity()
    try:
        yield
    finally:
        stack.layers, stack.norm = layers, norm


def model_inputs(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 trunk: tuple[int, torch.Tensor] | None = None) -> tuple[contextlib.AbstractContextManager, dict]:
    """(context, keyword arguments) for a forward of ``model`` on a batch: the whole model from the token
    ids, or, with ``trunk = (k, states entering layer k)`` (:meth:`Forward.trunk_states`), only its layers from k
    up on those states."""
    inputs = {**mask_inputs(attention_mask), "use_cache": False}
    if trunk is None:
        return contextlib.nullcontext(), {"input_ids": input_ids, **inputs}
    start, states = trunk
    return layers_above(model, start), {"inputs_embeds": states, **inputs}


def lower_states(model: Any, n_layers: int, **inputs: torch.Tensor) -> torch.Tensor:
    """The hidden states (B, L, H) entering decoder layer ``n_layers`` of ``model`` on ``inputs`` (``input_ids`` and
    any of ``attention_mask``, ``position_ids``: padded, packed or prefix-shared rows), by transformers' forward
    of its lowest layers: the input of :func:`layers_above`."""
    with only_layers(model, 0, n_layers, final_norm=False):
        return backbone(model)(**inputs, use_cache=False).last_hidden_state


@contextlib.contextmanager
def layers_above(model: Any, start: int) -> Iterator[None]:
    """Within the block, ``model`` runs its decoder layers from ``start`` up (and its final norm and head), on
    the states entering layer ``start`` passed as ``inputs_embeds``."""
    # A sequence classifier warns that it cannot find the padding in inputs_embeds to pool at the last
    # real token; igpt reads its head at every position (scalar_head_outputs), so that does not matter.
    log = hf_logging.get_logger("transformers.modeling_layers")
    level = log.level
    log.setLevel(hf_logging.ERROR)
    try:
        with only_layers(model, start, None):
            yield
    finally:
        log.setLevel(level)


class CachedDecoder:
    """Token-by-token logits of any transformers causal LM through its own forward and KV cache (what
    ``lean.Decoder`` does for Llama models)."""

    def __init__(self, model: Any, ids: torch.Tensor, mask: torch.Tensor, max_new: int):

        names = forward_parameters(model)
        self.model, self.ids, self.width = model, ids, ids.size(1)
        self.cache_name = "cache" if "cache" in names else "past_key_values"  # renamed in transformers 5.24
        self.with_positions = "position_ids" in names
        self.fixed = {"use_cache": True, **({"logits_to_keep": 1} if "logits_to_keep" in names else {})}
        self.mask = torch.cat([mask, mask.new_ones(ids.size(0), max_new)], 1)  # each step's is a prefix of it
        self.positions = position_ids(mask)
        self.cache, self.seen = None, self.width

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=tokens, attention_mask=self.mask[:, :self.seen], **{self.cache_name: self.cache},
                         **({"position_ids": positions} if self.with_positions else {}), **self.fixed)
        self.cache = getattr(out, self.cache_name)
        return out.logits[:, -1]

    def start(self) -> torch.Tensor:
        return self._forward(self.ids, self.positions)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.seen += 1
        return self._forward(tokens[:, None], self.positions[:, -1:] + self.seen - self.width)


@functools.lru_cache(maxsize=None)
def _parameters(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def forward_parameters(model: Any) -> frozenset[str]:
    """The names ``model``'s forward takes (a PEFT model's: those of the model it wraps)."""

    return _parameters(type(unwrapped(model)))


def head_loss_sum(model: Any, hidden: torch.Tensor, targets: torch.Tensor, transform: Any = None) -> torch.Tensor:
    """Summed cross-entropy of the LM head's fp32 logits on final hidden states ``hidden`` (N, H) against
    ``targets`` (N,) (IGNORE_INDEX skipped), after the family's logit transform (``families.logit_transform``;
    None: the identity). A plain linear head with no transform runs a chunk of rows at a time
    (``losses.linear_cross_entropy_sum``): full-vocabulary fp32 logits never exist for all N rows, in the forward
    or the backward. Any other head (LoRA-adapted, with a bias) or a scaling/soft-capping family runs whole."""

    head = model.get_output_embeddings()
    identity = transform is None or transform == LogitTransform()
    if identity and type(head) is torch.nn.Linear and head.bias is None:
        return linear_cross_entropy_sum(hidden, head.weight, targets)
    logits = head(hidden) if identity else transform(head(hidden))
    return torch.nn.functional.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


Trunk = tuple[int, torch.Tensor]  # (k, the hidden states (B, L, H) entering decoder layer k): run only layers k up


class Forward:
    """The forwards igpt makes of a model, on one path: a subclass gives the few that differ between igpt's lean
    Llama forward and transformers' (decoding, hidden states, logits, the scalar head, the LM loss); the rest,
    the arithmetic on their outputs, is here once. Stateless: one instance a path (:data:`LEAN`,
    :data:`TRANSFORMERS`); every method takes the model first, so that ``runners.Runner`` can run it as the
    wrapped module's forward."""

    lean = False  # whether this is igpt's lean Llama forward (a banner's name, and what sampling can ask of it)

    def name(self, model: Any) -> str:
        """Which forward runs ``model`` (a banner row), and whether its layers checkpoint their activations."""
        name = "igpt lean Llama" if self.lean else f"transformers {type(unwrapped(model)).__name__}"
        return name + (" (gradient checkpointing)" if checkpointing(model) else "")

    # -- what each path does its own way

    def decoder(self, model: Any, ids: torch.Tensor, mask: torch.Tensor, max_new: int,
                products: Mapping[torch.nn.Module, lean.Product] | None = None) -> Decoder:
        """A decoder of ``model`` after left-padded prompts ``ids``, ``mask`` (B, L), for up to ``max_new`` tokens;
        ``products``: layers whose products it computes its own way instead of calling them (``lean.Decoder``)."""
        raise NotImplementedError

    def trunk_states(self, model: Any, n_layers: int, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor) -> torch.Tensor:
        """The hidden states (B, L, H) that enter decoder layer ``n_layers`` of ``model`` (the output of the
        frozen layers below it), positions skipping left padding as everywhere else."""
        raise NotImplementedError

    def final_states(self, model: Any, inputs: dict) -> torch.Tensor:
        """The final hidden states (B, L, H) of ``model``'s backbone on ``inputs`` (``input_ids`` and any of
        ``attention_mask``, ``position_ids``, ``use_cache``: padded or packed rows, or a 4-D boolean mask)."""
        raise NotImplementedError

    def response_logits(self, model: Any, query_response: torch.Tensor, mask: torch.Tensor, context_len: int,
                        trunk: Trunk | None = None) -> torch.Tensor:
        """fp32 logits (B, T, V) at the positions that predict the response tokens ``query_response[:, context_len:]``,
        the LM head run at those positions only. ``trunk``: run only the layers above cached frozen ones."""
        raise NotImplementedError

    def head_outputs(self, model: Any, query_response: torch.Tensor, mask: torch.Tensor,
                     trunk: Trunk | None = None) -> torch.Tensor:
        """The scalar head of a reward/value model at every position (B, L), normalisation bias added."""
        raise NotImplementedError

    def lm_loss_sum(self, model: Any, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed next-token cross-entropy over the real tokens of right-padded text ``ids``, ``mask`` (B, L), and
        the number of predicted tokens: the LM loss of PPO-ptx and of eval's alignment tax."""
        raise NotImplementedError

    def calls_linears(self, model: Any) -> bool:
        """Whether this path's decoder calls each of ``model``'s linear layers itself, and so can compute their
        products its own way on a CPU (``products`` of :meth:`decoder`); where it does not, the calls are in code
        igpt does not write."""
        return False

    def start_decoding(self, model: Any, ids: torch.Tensor, mask: torch.Tensor, max_new: int,
                       products: Mapping[torch.nn.Module, lean.Product] | None = None) -> tuple[Decoder, torch.Tensor]:
        """A :meth:`decoder` of left-padded prompts ``ids``, ``mask`` (B, L) that has run them, and the logits
        (B, V) of the first new token."""
        stepper = self.decoder(model, ids, mask, max_new, products)
        return stepper, stepper.start()

    # -- the same on both paths

    def next_token_logits(self, model: Any, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The logits (B, V) of the token after left-padded prompts ``ids``, ``mask`` (B, L): the decoder's first
        step, nothing generated (a judge's answer)."""
        return self.decoder(model, ids, mask, 1).start()

    def response_log_softmax(self, model: Any, query_response: torch.Tensor, mask: torch.Tensor, context_len: int,
                             temperature: float, trunk: Trunk | None = None) -> torch.Tensor:
        """Log-probabilities (B, T, V) over the vocabulary at each response position of
        ``query_response[:, context_len:]`` under ``model``, of logits / T (fp32)."""
        logits = self.response_logits(model, query_response, mask, context_len, trunk)
        if temperature != 1.0:  # at T=1 the division is an identity: no op, no backward node
            logits = logits / temperature
        return torch.log_softmax(logits, dim=-1)

    def response_logprobs(self, model: Any, query_response: torch.Tensor, mask: torch.Tensor, context_len: int,
                          temperature: float, with_entropy: bool = False, trunk: Trunk | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs (B, T) of the response tokens ``query_response[:, context_len:]`` under ``model`` at the
        sampling temperature (logits / T, the distribution generation drew from), and optionally entropy
        (:meth:`response_log_softmax`)."""
        logp = self.response_log_softmax(model, query_response, mask, context_len, temperature, trunk)
        logprobs = logp.gather(-1, query_response[:, context_len:].unsqueeze(-1)).squeeze(-1)
        entropy = None
        if with_entropy:  # a statistic: no graph for it
            with torch.no_grad():
                entropy = -(logp.exp() * logp).sum(-1)
        return logprobs, entropy

    def token_values(self, model: Any, query_response: torch.Tensor, mask: torch.Tensor, context_len: int,
                     trunk: Trunk | None = None) -> torch.Tensor:
        """Per-token values (B, T): the head at the state before each response token."""
        return self.head_outputs(model, query_response, mask, trunk)[:, context_len - 1:-1]

    def response_scores(self, model: Any, query_response: torch.Tensor, mask: torch.Tensor, context_len: int,
                        lengths: torch.Tensor, trunk: Trunk | None = None) -> torch.Tensor:
        """Reward-model scores (B,) of responses of ``lengths`` tokens after ``context_len``: read at each one's
        last real token (its EOS, when it has one), or for a model that pools (:data:`REWARD_POOL`) the mean
        over its response's tokens."""
        out = self.head_outputs(model, query_response, mask, trunk)
        if reward_pool(model) == "mean":
            at = torch.arange(out.size(1), device=out.device)
            inside = (at >= context_len) & (at < context_len + lengths.unsqueeze(1))  # (B, L)
            return torch.where(inside, out, 0.0).sum(1) / lengths.clamp(min=1).to(out.dtype)
        return out[torch.arange(out.size(0), device=out.device), context_len + lengths - 1]

    def response_loss_sum(self, model: Any, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed response-token loss and its token count for a collated (padded or packed) batch.

        The LM head (a vocabulary-wide matmul) runs only at positions that predict a response token, not
        at prompt or padding positions, followed by the family's logit transform (scaling, soft-capping:
        ``families.logit_transform``); a family igpt does not know takes the model's own forward.
        """
        # no KV cache in training (transformers would build one, and a cache also turns packing detection off)
        inputs = {**{k: v for k, v in batch.items() if k != "labels"}, "use_cache": False}
        transform = logit_transform(model)
        if transform is None:
            return sft_loss_sum(model(**inputs).logits, batch["labels"])
        targets = batch["labels"][:, 1:]
        selected = targets != IGNORE_INDEX
        hidden = self.final_states(model, inputs)
        # fp32 logits a chunk of rows at a time, in the backward too (:func:`head_loss_sum`)
        return head_loss_sum(model, hidden[:, :-1][selected], targets[selected], transform), selected.sum()

    def ranking_logprobs(self, model: Any, rankings: list[list[list[int]]], prompt_lens: list[int], pad_id: int,
                         device: torch.device, shared: bool = False, packed: bool = False) -> torch.Tensor:
        """Summed log-probs (N,) under ``model`` of every sequence's response tokens (those after its ranking's
        prompt of ``prompt_lens[g]`` tokens), sequences in order: DPO's log pi(y | x). Each sequence runs once,
        laid out as ``rewards.ranking_scores`` lays a ranking out for the reward model: with ``shared`` and where
        it saves a tenth of the tokens, one row per ranking with its common beginning once, each response
        attending to it and to itself (``batches.shared_rows``); else with ``packed`` where padding would waste a
        tenth, one packed row; else right-padded rows. The LM head runs only at the states that predict a
        response token (fp32 logits, the family's logit transform)."""
        seqs = [s for r in rankings for s in r]
        starts = [p for r, p in zip(rankings, prompt_lens) for _ in r]
        inputs: dict[str, Any] = {"use_cache": False}
        # cols: the flat index (row * width + column) of every token of every sequence
        if shared and pays_to_share(rankings):
            rows = shared_rows(rankings, pad_id)
            ids, cols = rows.input_ids, rows.columns
            mask = shared_prefix_mask(rows.segments.to(device))
            if model.config._attn_implementation == "eager":  # eager adds its mask to the scores (never lean: SDPA)
                dtype = next(model.parameters()).dtype
                mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, torch.finfo(dtype).min)
            inputs.update(attention_mask=mask, position_ids=rows.position_ids.to(device))
        elif packed and pays_to_pack([len(s) for s in seqs]):
            ids, positions = pack(seqs)
            cols = packed_columns(seqs)
            inputs.update(position_ids=positions.to(device))
        else:
            ids, mask = pad_right(seqs, pad_id)
            cols = padded_columns([len(s) for s in seqs], ids.size(1))
            inputs.update(mask_inputs(mask.to(device)))
        ids = ids.to(device)
        # token i of a sequence is predicted by the state at its token i - 1
        where = [c[i - 1] for c, p, s in zip(cols, starts, seqs) for i in range(p, len(s))]
        targets = torch.tensor([t for p, s in zip(starts, seqs) for t in s[p:]], device=device)
        owner = torch.tensor([n for n, (p, s) in enumerate(zip(starts, seqs)) for _ in s[p:]], device=device)
        where_t = torch.tensor(where, device=device)
        transform = logit_transform(model)
        if transform is None:  # a family igpt does not know: its own forward and logits
            logits = model(input_ids=ids, **inputs).logits.flatten(0, 1).index_select(0, where_t)
        else:
            hidden = self.final_states(model, {"input_ids": ids, **inputs})
            # index_select, not x[where_t]: a shared prompt's last state predicts the first token of each of its K
            # responses, and the backward of advanced indexing adds such repeats on CPU threads in no fixed order
            # (runs then differ in the last bits); index_select's backward adds them in index order
            logits = transform(model.get_output_embeddings()(hidden.flatten(0, 1).index_select(0, where_t)))
        logits = logits.float()
        token_logps = logits.gather(1, targets[:, None])[:, 0] - torch.logsumexp(logits, -1)
        return torch.zeros(len(seqs), dtype=token_logps.dtype, device=device).index_add(0, owner, token_logps)


class LeanForward(Forward):
    """igpt's lean Llama forward (``lean.py``), for the models :func:`families.runs_lean` admits: the same
    numbers as transformers' forward with less Python around them, a decoder with a preallocated cache that
    shares a repeated prompt's prefill, and the LM loss with its head run in chunks."""

    lean = True

    def decoder(self, model: Any, ids: torch.Tensor, mask: torch.Tensor, max_new: int,
                products: Mapping[torch.nn.Module, lean.Product] | None = None) -> Decoder:
        return lean.Decoder(model, ids, mask, max_new, products)

    def trunk_states(self, model: Any, n_layers: int, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor) -> torch.Tensor:
        return lean.states(model, input_ids, attention_mask, stop=n_layers, final_norm=False)

    def calls_linears(self, model: Any) -> bool:
        # except where peft's adapter layers wrap them (LoRA): peft's forward calls those
        return not hasattr(model, "peft_config")

    def start_decoding(self, model: Any, ids: torch.Tensor, mask: torch.Tensor, max_new: int,
                       products: Mapping[torch.nn.Module, lean.Product] | None = None) -> tuple[Decoder, torch.Tensor]:
        # the same prompt K times (igpt sample): each distinct prompt runs once, then its cache is copied
        shared = distinct_rows(ids, mask)
        if shared is None:
            return super().start_decoding(model, ids, mask, max_new, products)
        first, rows = shared
        stepper = lean.Decoder(model, ids.index_select(0, first), mask.index_select(0, first), max_new, products)
        return stepper, stepper.repeat(rows, stepper.start())

    def final_states(self, model: Any, inputs: dict) -> torch.Tensor:
        return lean.states(model, inputs["input_ids"], inputs.get("attention_mask"),
                           positions=inputs.get("position_ids"))

    def _states(self, model: Any, query_response: torch.Tensor, mask: torch.Tensor,
                trunk: Trunk | None) -> torch.Tensor:
        """The final hidden states (B, L, H) from the tokens or from cached trunk states."""
        if trunk is None:
            return lean.states(model, query_response, mask)
        return lean.states(model, None, mask, embeds=trunk[1], start=trunk[0])

    def response_logits(self, model: Any, query_response: torch.Tensor, mask: torch.Tensor, context_len: int,
                        trunk: Trunk | None = None) -> torch.Tensor:
        hidden = self._states(model, query_response, mask, trunk)[:, context_len - 1:-1]
        return lean.logits(model, hidden).float()

    def head_outputs(self, model: Any, query_response: torch.Tensor, mask: torch.Tensor,
                     trunk: Trunk | None = None) -> torch.Tensor:
        out = scalar_head(model)(self._states(model, query_response, mask, trunk))
        return out[..., 0].float() + getattr(model.config, REWARD_BIAS, 0.0)

    def lm_loss_sum(self, model: Any, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # the head runs in chunks over the predicting positions only (:func:`head_loss_sum`)
        targets = lm_targets(ids, mask)
        selected = targets != IGNORE_INDEX
        hidden = lean.states(model, ids, mask)[:, :-1][selected]
        return head_loss_sum(model, hidden, targets[selected], logit_transform(model)), selected.sum()


class TransformersForward(Forward):
    """transformers' own forward of the model's class, for any model: the backbone cut at a layer
    (:func:`only_layers`) for the trunk, the head's output read with a hook, the model's KV cache for decoding."""

    def decoder(self, model: Any, ids: torch.Tensor, mask: torch.Tensor, max_new: int,
                products: Mapping[torch.nn.Module, lean.Product] | None = None) -> Decoder:
        return CachedDecoder(model, ids, mask, max_new)  # transformers calls the layers: ``products`` not its to use

    def trunk_states(self, model: Any, n_layers: int, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor) -> torch.Tensor:
        return lower_states(model, n_layers, input_ids=input_ids, **mask_inputs(attention_mask))

    def final_states(self, model: Any, inputs: dict) -> torch.Tensor:
        return backbone(model)(**inputs).last_hidden_state

    def response_logits(self, model: Any, query_response: torch.Tensor, mask: torch.Tensor, context_len: int,
                        trunk: Trunk | None = None) -> torch.Tensor:
        n_response = query_response.size(1) - context_len  # only the last T+1 positions go through the LM head
        ctx, inputs = model_inputs(model, query_response, mask, trunk)
        with ctx:
            return model(**inputs, logits_to_keep=n_response + 1).logits[:, :-1].float()

    def head_outputs(self, model: Any, query_response: torch.Tensor, mask: torch.Tensor,
                     trunk: Trunk | None = None) -> torch.Tensor:
        ctx, inputs = model_inputs(model, query_response, mask, trunk)
        with ctx:
            return scalar_head_outputs(model, **inputs)

    def lm_loss_sum(self, model: Any, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # the model's own logits (B, L, V) (any soft-capping or scaling applied), one micro-batch's at a time
        targets = lm_targets(ids, mask)
        selected = targets != IGNORE_INDEX
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                                                 ignore_index=IGNORE_INDEX, reduction="sum"), selected.sum()


LEAN, TRANSFORMERS = LeanForward(), TransformersForward()


def distinct_rows(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """For a batch whose rows repeat: (the first row of each distinct (ids, mask) row (U,), and which of
    them each row is (B,)); None when every row is distinct."""
    seen: dict[tuple, int] = {}
    rows = [seen.setdefault((tuple(r), tuple(m)), len(seen)) for r, m in zip(ids.tolist(), mask.tolist())]
    if len(seen) == len(rows):
        return None
    first = [0] * len(seen)
    for i in reversed(range(len(rows))):
        first[rows[i]] = i
    return torch.tensor(first, device=ids.device), torch.tensor(rows, device=ids.device)


def choose(model: Any) -> Forward:
    """The path ``model`` runs on: the lean one where :func:`families.runs_lean` admits it, else transformers'.
    Asked when a runner is built, after FSDP sharded the model and peft wrapped it (both change the answer)."""
    return LEAN if runs_lean(model) else TRANSFORMERS
