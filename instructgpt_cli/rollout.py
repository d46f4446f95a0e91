"""Generation: left-padded batched sampling with the KV cache, truncation at EOS, decoding."""
from __future__ import annotations

import contextlib
import functools
import inspect
import types
from typing import Any, Iterator, NamedTuple

import torch

from . import distributed
from .data import pad_left
from .distributed import no_autograd


def draw(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """One token per row (B,) from logits (B, V): exactly softmax(logits / T) (pure temperature sampling, no
    top-k / top-p), the distribution PPO scores; the argmax at T = 0.

    Inverse-CDF sampling: one uniform per row against the cumulative probabilities (float64 where the
    device has it, so the tail of a 49K vocabulary keeps its mass). It draws from the same distribution as
    ``torch.multinomial``, which on a CPU took 3x as long for 8 rows of a 260-token vocabulary."""
    if temperature == 0:
        return logits.argmax(-1)
    wide = torch.float32 if logits.device.type == "mps" else torch.float64
    cdf = torch.softmax(logits.to(wide) / temperature, -1).cumsum(-1)
    u = torch.rand(cdf.size(0), 1, dtype=wide, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=cdf.size(1) - 1)


def truncate_at_eos(tokens: list[int], eos_id: int) -> list[int]:
    """Tokens up to and including the first EOS (everything after it is not part of the response)."""
    return tokens[:tokens.index(eos_id) + 1] if eos_id in tokens else tokens


def generate(model: Any, tokenizer: Any, queries: list[list[int]], max_new_tokens: int, temperature: float,
             batch_size: int, synced: bool = False) -> list[list[int]]:
    """Sample one response per query (token lists, EOS included where the model stopped), ``batch_size``
    queries at a time (:func:`sample`). Runs under ``distributed.no_autograd``: ``inference_mode`` in one
    process. ``synced``: every rank keeps stepping until all are done (a sharded model gathers its weights
    in every forward)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    responses: list[list[int]] = []
    for start in range(0, len(queries), batch_size):
        ids, mask = pad_left(queries[start:start + batch_size], tokenizer.pad_token_id)
        with no_autograd(), few_row_linears(model) if device.type == "cpu" else contextlib.nullcontext():
            out = sample(model, ids.to(device), mask.to(device), max_new_tokens, temperature, tokenizer.eos_token_id,
                         tokenizer.pad_token_id, synced)
        responses += [truncate_at_eos(row, tokenizer.eos_token_id) for row in out.tolist()]
    model.train(was_training)
    return responses


def sample(model: Any, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, temperature: float, eos_id: int,
           pad_id: int, synced: bool = False) -> torch.Tensor:
    """New tokens (B, n <= max_new_tokens) after left-padded queries ``ids`` (B, L), decoded with a KV
    cache; a row that has sampled EOS continues with ``pad_id``, and decoding stops once every row has.

    Our own loop rather than ``model.generate``: one forward and one :func:`draw` a token, none of
    generate's per-step logits processors, stopping criteria and input preparation (a fifth of a tiny
    model's sampling time), and for Llama models the lean forward (``lean.Decoder``). Positions count real
    tokens only, so left padding shifts nothing."""
    from . import lean

    decoder = (lean.Decoder if lean.supported(model) else CachedDecoder)(model, ids, mask, max_new_tokens)
    out = ids.new_full((ids.size(0), max_new_tokens), pad_id)
    done = torch.zeros(ids.size(0), dtype=torch.bool, device=ids.device)
    logits = decoder.start()
    n = 0  # tokens drawn
    while True:
        token = torch.where(done, pad_id, draw(logits, temperature))
        out[:, n] = token
        done |= token == eos_id
        n += 1
        left = (~done).sum()
        if n == max_new_tokens or int(distributed.total(left) if synced else left) == 0:
            return out[:, :n]
        logits = decoder.step(token)


class CachedDecoder:
    """Token-by-token logits of any transformers causal LM through its own forward and KV cache (what
    ``lean.Decoder`` does for Llama models)."""

    def __init__(self, model: Any, ids: torch.Tensor, mask: torch.Tensor, max_new: int):
        from .models import position_ids

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
    from .models import unwrapped

    return _parameters(type(unwrapped(model)))


# Which linear layers take the (W @ x.T).T path on a CPU, and up to how many rows (bench/README.md): the
# gain is a memory-bound weight's; for small weights the extra Python costs more than the product.
LARGE_WEIGHT = 1 << 22  # elements (an LM head: 49152 x 576 is 28M): up to 8 rows, at any thread count
MID_WEIGHT = 1 << 16    # elements (576 x 576 is 332K): up to 2 rows, with 2 or more threads
FEW_ROWS = 8


def few_row_limit(weight: torch.Tensor, threads: int) -> int:
    """The most rows of an input for which ``weight``'s product runs as (W @ x.T).T; 0: never."""
    if weight.numel() >= LARGE_WEIGHT:
        return FEW_ROWS
    return 2 if weight.numel() >= MID_WEIGHT and threads >= 2 else 0


def _few_row_linear(self: torch.nn.Linear, x: torch.Tensor, rows: int = FEW_ROWS) -> torch.Tensor:
    if x.numel() > rows * x.shape[-1]:
        return torch.nn.functional.linear(x, self.weight, self.bias)
    out = (self.weight @ x.reshape(-1, x.shape[-1]).t()).t().reshape(*x.shape[:-1], self.weight.shape[0])
    return out if self.bias is None else out + self.bias


@contextlib.contextmanager
def few_row_linears(model: torch.nn.Module, threads: int | None = None) -> Iterator[None]:
    """Within the block, ``model``'s large linear layers compute inputs of a few rows (a decoding step: one
    token per sequence) as ``(W @ x.T).T``. On CPUs torch's ``linear`` (x @ W.T) runs such near-vector
    products far below memory bandwidth: a 49152 x 576 LM head on 2 rows took 24 ms against 6 ms, and
    135M-parameter sampling of 2 sequences ran 1.8x faster this way. Which layers, and up to how many rows:
    ``few_row_limit`` (small layers, as in a tiny model, stay as they are: there the stock path is faster).
    Same product, other summation order; larger inputs (the prompt's forward) keep ``linear``."""
    threads = torch.get_num_threads() if threads is None else threads
    linears = [(m, few_row_limit(m.weight, threads)) for m in model.modules()
               if type(m) is torch.nn.Linear and "forward" not in vars(m)]
    linears = [(m, rows) for m, rows in linears if rows]
    for m, rows in linears:
        m.forward = types.MethodType(functools.partial(_few_row_linear, rows=rows), m)
    try:
        yield
    finally:
        for m, _ in linears:
            del m.forward


def decode_response(tokenizer: Any, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


@torch.no_grad()
def score_sequences(model: Any, seqs: list[list[int]], pad_id: int, batch_size: int) -> torch.Tensor:
    """Normalised reward-model scores (N,) of token sequences (prompt + response + EOS), in batches."""
    from .data import pad_right
    from .models import reward_scores

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(seqs), batch_size):
        ids, mask = pad_right(seqs[start:start + batch_size], pad_id)
        out.append(reward_scores(model, ids.to(device), mask.to(device)).float().cpu())
    model.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def score_ranking(model: Any, seqs: list[list[int]], pad_id: int, batch_size: int) -> torch.Tensor:
    """Normalised reward-model scores (K,) of one ranking's sequences (prompt + response + EOS): as one row
    with the prompt once (``models.shared_reward_scores``) where the model takes that and it saves a tenth
    of the tokens, else as :func:`score_sequences` does."""
    from .data import pays_to_share
    from .models import shared_reward_scores, supports_sharing

    if not (supports_sharing(model) and pays_to_share([seqs])):
        return score_sequences(model, seqs, pad_id, batch_size)
    was_training = model.training
    model.eval()
    scores = shared_reward_scores(model, [seqs], pad_id, next(model.parameters()).device).float().cpu()
    model.train(was_training)
    return scores


# ---------------------------------------------------------------- scoring query + response (PPO)


def response_log_softmax(model: Any, query_response: torch.Tensor, mask: torch.Tensor, context_len: int,
                         temperature: float, trunk: tuple[int, torch.Tensor] | None = None) -> torch.Tensor:
    """Log-probabilities (B, T, V) over the vocabulary at each response position of
    ``query_response[:, context_len:]`` under ``model``, of logits / T (fp32).

    Only the last T+1 positions go through the LM head (``logits_to_keep``): query positions never
    compute full-vocabulary logits. ``trunk``: run only the layers above cached frozen ones
    (``models.model_inputs``)."""
    from . import lean
    from .models import model_inputs

    n_response = query_response.size(1) - context_len
    if lean.supported(model):
        hidden = lean_states(model, query_response, mask, trunk)[:, context_len - 1:-1]
        logits = lean.logits(model, hidden).float()
    else:
        ctx, inputs = model_inputs(model, query_response, mask, trunk)
        with ctx:
            logits = model(**inputs, logits_to_keep=n_response + 1).logits[:, :-1].float()
    if temperature != 1.0:  # at T=1 the division is an identity: no op, no backward node
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1)


def response_logprobs(model: Any, query_response: torch.Tensor, mask: torch.Tensor, context_len: int,
                      temperature: float, with_entropy: bool = False, trunk: tuple[int, torch.Tensor] | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (B, T) of the response tokens ``query_response[:, context_len:]`` under ``model`` at the
    sampling temperature (logits / T, the distribution generation drew from), and optionally entropy
    (:func:`response_log_softmax`)."""
    logp = response_log_softmax(model, query_response, mask, context_len, temperature, trunk)
    logprobs = logp.gather(-1, query_response[:, context_len:].unsqueeze(-1)).squeeze(-1)
    entropy = None
    if with_entropy:  # a statistic: no graph for it
        with torch.no_grad():
            entropy = -(logp.exp() * logp).sum(-1)
    return logprobs, entropy


def head_outputs(model: Any, query_response: torch.Tensor, mask: torch.Tensor,
                 trunk: tuple[int, torch.Tensor] | None = None) -> torch.Tensor:
    """The scalar head of a reward/value model at every position (B, L), normalisation bias added."""
    from . import lean
    from .models import REWARD_BIAS, model_inputs, scalar_head, scalar_head_outputs

    if lean.supported(model):
        out = scalar_head(model)(lean_states(model, query_response, mask, trunk))
        return out[..., 0].float() + getattr(model.config, REWARD_BIAS, 0.0)
    ctx, inputs = model_inputs(model, query_response, mask, trunk)
    with ctx:
        return scalar_head_outputs(model, **inputs)


def lean_states(model: Any, query_response: torch.Tensor, mask: torch.Tensor,
                trunk: tuple[int, torch.Tensor] | None) -> torch.Tensor:
    """The final hidden states (B, L, H) on the lean path, from the tokens or from cached trunk states."""
    from . import lean

    if trunk is None:
        return lean.states(model, query_response, mask)
    return lean.states(model, None, mask, embeds=trunk[1], start=trunk[0])


def token_values(model: Any, query_response: torch.Tensor, mask: torch.Tensor, context_len: int,
                 trunk: tuple[int, torch.Tensor] | None = None) -> torch.Tensor:
    """Per-token values (B, T): the head at the state before each response token."""
    return head_outputs(model, query_response, mask, trunk)[:, context_len - 1:-1]


def last_token_scores(model: Any, query_response: torch.Tensor, mask: torch.Tensor, context_len: int,
                      lengths: torch.Tensor, trunk: tuple[int, torch.Tensor] | None = None) -> torch.Tensor:
    """Reward-model scores (B,) read at each response's last real token (its EOS, when it has one)."""
    out = head_outputs(model, query_response, mask, trunk)
    return out[torch.arange(out.size(0), device=out.device), context_len + lengths - 1]


# ---------------------------------------------------------------- LM losses (SFT, PPO-ptx, eval's alignment tax)


def head_loss_sum(model: Any, hidden: torch.Tensor, targets: torch.Tensor, transform: Any = None) -> torch.Tensor:
    """Summed cross-entropy of the LM head's fp32 logits on final hidden states ``hidden`` (N, H) against
    ``targets`` (N,) (IGNORE_INDEX skipped), after the family's logit transform (``models.logit_transform``;
    None: the identity). A plain linear head with no transform runs a chunk of rows at a time
    (``losses.linear_cross_entropy_sum``): full-vocabulary fp32 logits never exist for all N rows, in the forward
    or the backward. Any other head (LoRA-adapted, with a bias) or a scaling/soft-capping family runs whole."""
    from .data import IGNORE_INDEX
    from .losses import linear_cross_entropy_sum
    from .models import LogitTransform

    head = model.get_output_embeddings()
    identity = transform is None or transform == LogitTransform()
    if identity and type(head) is torch.nn.Linear and head.bias is None:
        return linear_cross_entropy_sum(hidden, head.weight, targets)
    logits = head(hidden) if identity else transform(head(hidden))
    return torch.nn.functional.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


def lm_loss_sum(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over the real tokens of right-padded text ``ids``, ``mask`` (B, L), and
    the number of predicted tokens: the LM loss of PPO-ptx and of eval's alignment tax. On the lean path the
    head runs in chunks over the predicting positions only (:func:`head_loss_sum`); other models give their
    own logits (B, L, V) (any soft-capping or scaling applied), one micro-batch's at a time."""
    from . import lean
    from .data import IGNORE_INDEX
    from .losses import lm_targets

    targets = lm_targets(ids, mask)
    selected = targets != IGNORE_INDEX
    if lean.supported(model):
        from .models import logit_transform

        hidden = lean.states(model, ids, mask)[:, :-1][selected]
        return head_loss_sum(model, hidden, targets[selected], logit_transform(model)), selected.sum()
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                                             ignore_index=IGNORE_INDEX, reduction="sum"), selected.sum()


class Rollout(NamedTuple):
    """One PPO batch. query_response (B, L): left-padded queries then right-padded responses;
    attention_mask (B, L); context_len: query width; the rest are (B, T) over response tokens or (B,)."""

    query_response: torch.Tensor
    attention_mask: torch.Tensor
    context_len: int
    response_mask: torch.Tensor
    has_eos: torch.Tensor
    lengths: torch.Tensor


def build_rollout(queries: list[list[int]], responses: list[list[int]], pad_id: int, eos_id: int) -> Rollout:
    """Pack sampled responses after their left-padded queries, with masks built from the true lengths
    (a sampled token that happens to equal the pad id is still a response token)."""
    from .data import pad_left, pad_right

    q_ids, q_mask = pad_left(queries, pad_id)
    r_ids, r_mask = pad_right([r if r else [pad_id] for r in responses], pad_id)
    lengths = torch.tensor([max(len(r), 1) for r in responses])
    has_eos = torch.tensor([bool(r) and r[-1] == eos_id for r in responses])
    return Rollout(torch.cat([q_ids, r_ids], 1), torch.cat([q_mask, r_mask], 1), q_ids.size(1), r_mask, has_eos,
                   lengths)


# ---------------------------------------------------------------- evaluation helpers (eval, compare)


def rollouts(tokenizer: Any, queries: list[list[int]], responses: list[list[int]], batch_size: int,
             device: torch.device):
    """(start index, Rollout on ``device``) for consecutive batches of queries and their responses."""
    for start in range(0, len(queries), batch_size):
        ro = build_rollout(queries[start:start + batch_size], responses[start:start + batch_size],
                           tokenizer.pad_token_id, tokenizer.eos_token_id)
        yield start, Rollout(*(x.to(device) if torch.is_tensor(x) else x for x in ro))


@torch.no_grad()
def score_responses(rm: Any, tokenizer: Any, queries: list[list[int]], responses: list[list[int]],
                    batch_size: int) -> torch.Tensor:
    """Reward-model scores (N,) of each query's response, read at the last real token."""
    device = next(rm.parameters()).device
    rm.eval()
    return torch.cat([last_token_scores(rm, ro.query_response, ro.attention_mask, ro.context_len, ro.lengths).cpu()
                      for _, ro in rollouts(tokenizer, queries, responses, batch_size, device)])


@torch.no_grad()
def response_kl(model: Any, ref: Any, tokenizer: Any, queries: list[list[int]], responses: list[list[int]],
                temperature: float, batch_size: int) -> torch.Tensor:
    """Per-response KL (N,): the sum over response positions of KL(pi_T(. | x, y_<t) || pi_ref,T(. | x, y_<t)),
    both distributions of logits / T, each over the whole vocabulary, along the model's own samples.

    PPO penalises the one-sample estimate log pi(y_t) - log pi_ref(y_t) of the same per-token KL on samples
    drawn at its temperature T; the exact per-token sum is that estimate's expectation, never negative, and
    still the KL at PPO's T when eval samples at another temperature (the one-sample estimate is then not a KL
    at all: at T = 0.7 samples and T = 1 log-probs it came out negative on the demo). Padding counts 0."""
    if not temperature > 0:
        raise ValueError(f"response_kl: temperature must be > 0 (log-probs of logits / T), got {temperature}")
    device = next(model.parameters()).device
    model.eval(), ref.eval()
    out = []
    for _, ro in rollouts(tokenizer, queries, responses, batch_size, device):
        logp = response_log_softmax(model, ro.query_response, ro.attention_mask, ro.context_len, temperature)
        ref_logp = response_log_softmax(ref, ro.query_response, ro.attention_mask, ro.context_len, temperature)
        per_token = (logp.exp() * (logp - ref_logp)).sum(-1).clamp(min=0.0)  # rounding can dip below 0
        out.append(torch.where(ro.response_mask.bool(), per_token, 0.0).sum(1).cpu())
    return torch.cat(out)


@torch.no_grad()
def lm_loss(model: Any, blocks: list[list[int]], pad_id: int, batch_size: int) -> float:
    """Mean next-token loss over all tokens of pretraining-text blocks (exp of it is the perplexity)."""
    from .data import pad_right

    device = next(model.parameters()).device
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        ids, mask = pad_right(blocks[start:start + batch_size], pad_id)
        summed, n = lm_loss_sum(model, ids.to(device), mask.to(device))
        total, tokens = total + summed.item(), tokens + int(n)
    return total / max(tokens, 1)
