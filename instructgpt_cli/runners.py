"""One runner per model (policy, value, reference, reward): what a stage calls a model through, by named methods
(log-probs, values, scores, the frozen trunk, LM losses, ranking scores, generate), never by passing the model to a
function.

A runner decides once, when it is built, how its model runs:

- across processes: alone as it is; under a launcher, trainable models in DDP, or with ``fsdp`` every
  transformer block and then the rest sharded by FSDP2 (``distributed.py`` joins the process group);
- in what precision: bf16 autocast over fp32 weights on GPUs that have bf16 (training: fp32 master weights,
  bf16 matmuls), else the weights' own dtype;
- on which forward: igpt's lean Llama forward or transformers' (``forward.choose``), asked after the wrapping,
  which changes the answer (FSDP turns the decoder layers into subclasses that gather their weights when called).

Every named method runs as one forward of the wrapped module (:class:`ModelCall`, whose forward is
``fn(model, *args)``): DDP and FSDP hook a module's forward, and so see every use of the model, including those
that bypass ``model.forward`` (the decoder alone with the LM head at chosen positions; a whole sampling loop).

Sampling is the seam where PPO's rollouts may come from elsewhere: :class:`RolloutEngine` is what PPO asks of a
sampler, once an iteration; a runner is one (in this process, on the weights being trained), and a separate
generation engine on GPUs (vLLM, SGLang) would be another.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Iterator, Protocol, runtime_checkable

import torch

from . import distributed, forward, rewards, rollout
from .rewards import Layout


class ModelCall(torch.nn.Module):
    """``ModelCall(model)(fn, *args)`` is ``fn(model, *args)``, run as this module's forward (under bf16 autocast
    where that applies), so DDP and FSDP, which hook a module's forward, see it."""

    def __init__(self, model: torch.nn.Module, autocast: torch.dtype | None = None):
        super().__init__()
        self.model = model
        self.autocast = autocast

    def forward(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        if self.autocast is None:
            return fn(self.model, *args, **kwargs)
        with torch.autocast("cuda", dtype=self.autocast):
            return fn(self.model, *args, **kwargs)


def autocast_dtype(model: torch.nn.Module, device: torch.device) -> torch.dtype | None:
    """bf16 autocast for fp32 weights on GPUs that have bf16 (fp32 master weights, bf16 matmuls);
    weights already in bf16 compute in bf16, and CPUs compute in fp32 (bf16 is slow there)."""
    if device.type != "cuda" or not torch.cuda.is_bf16_supported():
        return None
    return torch.bfloat16 if next(model.parameters()).dtype == torch.float32 else None


def wrapped(model: torch.nn.Module, device: torch.device, fsdp: bool, trainable: bool,
            autocast: torch.dtype | None) -> torch.nn.Module:
    """``ModelCall(model)``, under several processes wrapped in DDP (trainable models) or sharded with FSDP2
    (``fsdp``: every transformer block, then the rest)."""
    call = ModelCall(model, autocast)
    if distributed.world_size() == 1:
        return call
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        blocks = {name for m in model.modules() for name in (getattr(m, "_no_split_modules", None) or [])}
        for module in model.modules():
            if type(module).__name__ in blocks:
                fully_shard(module)
        fully_shard(call)  # the root: embeddings, final norm and heads, gathered while a runner's method runs
        return call
    if not trainable:
        return call  # frozen models need no gradient reduction
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(call, device_ids=[device.index] if device.type == "cuda" else None,
                                   forward_sync_buffers=False)  # no batch statistics to keep in step


class Runner:
    """A model as a stage calls it. ``Runner(model, device, fsdp, trainable)`` wraps ``model`` for this process
    (module docstring); build the optimizer after it (FSDP replaces the parameters with sharded ones).
    ``mixed_precision=False``: compute in the weights' dtype even on a GPU (eval, compare, sample and the judges
    always have; :meth:`for_eval`).

    ``model`` is the module itself (a transformers model, or peft's around one), for its parameters, saving,
    and what the families table says of it; ``path`` the forward it runs on (``forward.LEAN`` or
    ``forward.TRANSFORMERS``)."""

    def __init__(self, model: torch.nn.Module, device: torch.device, fsdp: bool = False, trainable: bool = True,
                 mixed_precision: bool = True):
        self.model, self.device = model, device
        self._module = wrapped(model, device, fsdp, trainable, autocast_dtype(model, device) if mixed_precision
                               else None)
        self.path = forward.choose(model)  # after sharding (module docstring)
        self._synced = distributed.is_sharded(model)  # every rank must run as many forwards: see generate
        self._context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext

    @classmethod
    def for_eval(cls, model: torch.nn.Module) -> Runner:
        """A runner of ``model`` as eval, compare, sample, label's judges and the frontier use one: in this process
        alone, frozen, in the weights' dtype, on the device the model is on."""
        return cls(model, next(model.parameters()).device, trainable=False, mixed_precision=False)

    @property
    def name(self) -> str:
        """Which forward runs the model (a banner row), and whether its layers checkpoint their activations."""
        return self.path.name(self.model)

    def train(self) -> Runner:
        self._module.train()
        return self

    def eval(self) -> Runner:
        self._module.eval()
        return self

    @contextlib.contextmanager
    def syncing(self, sync: bool) -> Iterator[None]:
        """Around one forward and its backward: DDP reduces gradients only when ``sync`` (the last micro-batch
        of an optimizer step), so accumulation costs one all-reduce. FSDP reduce-scatters every backward:
        it keeps gradients sharded, which is why one uses it."""
        from torch.nn.parallel import DistributedDataParallel

        if sync or not isinstance(self._module, DistributedDataParallel):
            yield
        else:
            with self._module.no_sync():
                yield

    def adapters_disabled(self) -> Runner:
        """This runner with peft's adapters disabled in every call (``disable_adapter``): under LoRA, PPO's
        reference is the policy's runner so, and its reward model the value model's, so no model is held
        twice. The same wrapped module: DDP and FSDP see one model."""
        if not hasattr(self.model, "disable_adapter"):
            raise ValueError(f"{type(self.model).__name__} has no adapters to disable (no LoRA)")
        view = copy.copy(self)
        view._context = self.model.disable_adapter
        return view

    def _run(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        with self._context():
            return self._module(fn, *args, **kwargs)

    # ---------------------------------------------------------------- a policy: log-probs, LM losses

    def logprobs(self, query_response: torch.Tensor, mask: torch.Tensor, context_len: int, temperature: float,
                 entropy: bool = False, trunk: forward.Trunk | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs (B, T) of the response tokens ``query_response[:, context_len:]`` (B, L) at the sampling
        temperature (logits / T), and with ``entropy`` the entropy (B, T) of each position's distribution
        (no graph; else None). ``trunk``: the cached output of the frozen lowest layers (:meth:`trunk`)."""
        return self._run(self.path.response_logprobs, query_response, mask, context_len, temperature, entropy,
                         trunk)

    def log_softmax(self, query_response: torch.Tensor, mask: torch.Tensor, context_len: int,
                    temperature: float, trunk: forward.Trunk | None = None) -> torch.Tensor:
        """Log-probabilities (B, T, V) over the vocabulary at each response position, of logits / T (fp32);
        ``trunk``: the output of lowest layers computed once (:meth:`trunk`)."""
        return self._run(self.path.response_log_softmax, query_response, mask, context_len, temperature, trunk)

    def trunk(self, n_layers: int, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The hidden states (B, L, H) entering decoder layer ``n_layers``: the output of the frozen layers below
        it (``families.frozen_layers``), computed once and passed back as ``trunk=(n_layers, states)``."""
        return self._run(self.path.trunk_states, n_layers, ids, mask)

    def lm_loss_sum(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed next-token loss over the real tokens of right-padded text ``ids``, ``mask`` (B, L), and the
        number of predicted tokens: PPO-ptx's loss, eval's alignment tax."""
        return self._run(self.path.lm_loss_sum, ids, mask)

    def response_loss_sum(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed loss of the response tokens of a collated (padded or packed) SFT batch, and their count."""
        return self._run(self.path.response_loss_sum, batch)

    def ranking_logprobs(self, rankings: list[list[list[int]]], prompt_lens: list[int], pad_id: int,
                         shared: bool = False, packed: bool = False) -> torch.Tensor:
        """Summed log-probs (N,) of every ranked sequence's response tokens, sequences in order: DPO's
        log pi(y | x), each sequence run once (``forward.Forward.ranking_logprobs``: the layouts)."""
        return self._run(self.path.ranking_logprobs, rankings, prompt_lens, pad_id, self.device, shared, packed)

    # ---------------------------------------------------------------- a value or reward model: the scalar head

    def values(self, query_response: torch.Tensor, mask: torch.Tensor, context_len: int,
               trunk: forward.Trunk | None = None) -> torch.Tensor:
        """Per-token values (B, T): the scalar head at the state before each response token."""
        return self._run(self.path.token_values, query_response, mask, context_len, trunk)

    def scores(self, query_response: torch.Tensor, mask: torch.Tensor, context_len: int, lengths: torch.Tensor,
               trunk: forward.Trunk | None = None) -> torch.Tensor:
        """Reward-model scores (B,) of each response: at its last real token (``context_len + lengths - 1``), or
        the mean over its tokens for a model that pools (``forward.REWARD_POOL``)."""
        return self._run(self.path.response_scores, query_response, mask, context_len, lengths, trunk)

    def ranking_scores(self, rankings: list[list[list[int]]], pad_id: int, layout: Layout = Layout(),
                       batch_size: int | None = None, starts: list[int] | None = None,
                       frozen: rewards.FrozenStates | None = None) -> torch.Tensor:
        """Normalised rewards (N,) of every sequence of ``rankings`` (prompt + response + EOS each; each response
        from ``starts``), in order, in the row layout that pays (``rewards.ranking_scores``): train-rm's forward,
        eval's held-out accuracy. ``frozen``: the kept output of the model's frozen layers (computed there where
        missing), so that only the layers above run."""
        return self._run(rewards.ranking_scores, rankings, pad_id, self.device, layout, batch_size, starts, frozen)

    def sequence_scores(self, seqs: list[list[int]], pad_id: int, batch_size: int,
                        starts: list[int] | None = None) -> torch.Tensor:
        """Normalised rewards (N,) of token sequences (each response from ``starts``) on the CPU, scored in eval
        mode as right-padded rows (``rewards.score_sequences``): the demonstrations' scores that set the bias."""
        return self._run(rewards.score_sequences, seqs, pad_id, batch_size, starts)

    # ---------------------------------------------------------------- sampling

    def next_token_logits(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The logits (B, V) of the token after left-padded prompts ``ids``, ``mask`` (B, L), without autograd:
        the decoder's first step (a judge's answer)."""
        with distributed.no_autograd():
            return self._run(self.path.next_token_logits, ids, mask)

    def generate(self, tokenizer: Any, queries: list[list[int]], max_new_tokens: int, temperature: float,
                 batch_size: int, progress: str = "") -> list[list[int]]:
        """One response per query, sampled at ``temperature`` (0: greedy), as token lists ending at EOS where the
        model stopped (``rollout.generate``), ``batch_size`` queries at a time; ``progress``: a name to show
        progress under. A sharded model steps until every rank is done (FSDP gathers weights in every forward).
        On a CPU, large layers compute a decoding step's products their faster way (``rollout.cpu_decoding``)."""
        with torch.no_grad():  # outside the wrapped module too: DDP must not expect a backward of this forward
            return self._run(rollout.generate, self.path, tokenizer, queries, max_new_tokens, temperature,
                             batch_size, self._synced, progress)

    def load_weights(self, policy: Runner) -> None:
        """:class:`RolloutEngine`'s: in this process the runner is the policy and samples with the weights being
        trained, so there is nothing to load."""
        if policy.model is not self.model:
            raise ValueError("a runner samples with its own model's weights; it cannot load another's")


@runtime_checkable
class RolloutEngine(Protocol):
    """What PPO asks of whatever samples its rollouts, once an iteration: :meth:`load_weights` with the policy
    after its last update, then :meth:`generate` on this rank's queries.

    The policy's :class:`Runner` is one: it samples in this process, with the weights being trained, so
    ``load_weights`` does nothing. A separate generation engine on GPUs (vLLM, SGLang) plugs in here: its
    ``load_weights`` copies the policy's weights into the engine (LoRA merged, FSDP shards gathered), and its
    ``generate`` must sample as the runner does, for PPO scores those samples as drawn: pure temperature
    sampling (softmax(logits / T), no top-k, top-p or repetition penalty), one response per query as token ids
    truncated after the first EOS, at most ``max_new_tokens``. Its kernels give other last bits than the trainer's,
    so the first minibatch's ratio is then close to 1 rather than exactly 1."""

    def load_weights(self, policy: Runner) -> None: ...

    def generate(self, tokenizer: Any, queries: list[list[int]], max_new_tokens: int, temperature: float,
                 batch_size: int, progress: str = "") -> list[list[int]]: ...


class RewardEnsemble:
    """A reward-model ensemble (train-rm --ensemble N) run as one reward model: each member scores the same
    sequences (the first, the stage's own model, may reuse the value model's frozen trunk; the others run
    whole) and :func:`rewards.ensemble_objective` turns their scores into the one PPO optimises."""

    def __init__(self, members: list[Runner], objective: str, std_coef: float):
        self.members, self.objective, self.std_coef = members, objective, std_coef
        self.device = members[0].device

    def eval(self) -> "RewardEnsemble":
        for m in self.members:
            m.eval()
        return self

    def member_scores(self, query_response: torch.Tensor, mask: torch.Tensor, context_len: int,
                      lengths: torch.Tensor, trunk: forward.Trunk | None = None) -> torch.Tensor:
        """Each member's score (B, M), read where that member reads its score (``forward.REWARD_POOL``)."""
        return torch.stack([m.scores(query_response, mask, context_len, lengths, trunk if i == 0 else None)
                            for i, m in enumerate(self.members)], dim=1)

    def combine(self, member_scores: torch.Tensor) -> torch.Tensor:
        """The objective's score (B,) from the members' (B, M)."""
        return rewards.ensemble_objective(member_scores, self.objective, self.std_coef)

    def scores(self, query_response: torch.Tensor, mask: torch.Tensor, context_len: int, lengths: torch.Tensor,
               trunk: forward.Trunk | None = None) -> torch.Tensor:
        """The objective's scores (B,): what the watch and every other reader of a reward model's score sees."""
        return self.combine(self.member_scores(query_response, mask, context_len, lengths, trunk))
