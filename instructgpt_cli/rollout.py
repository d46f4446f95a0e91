"""Sampling responses (left-padded batches, a KV cache, truncation at EOS, decoding) and the PPO rollout
batch they make, with the scores, KL and LM loss eval and compare read off such batches through runners."""
from __future__ import annotations

import contextlib
import functools
import json
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import torch

from . import distributed, forward
from .batches import pad_left, pad_right
from .console import StepProgress, say
from .errors import BadInput, Interrupted, WriteFailed
from .families import shared_layers
from .lifecycle import resume_command
from .storage import append_lines, atomic_write_text, drop_torn_line
from .distributed import no_autograd
from .lean import PackedProduct, Product, can_pack, few_row_product, packed_gemm


DRAW_BLOCK = 1024  # tokens whose probabilities are summed together in :func:`draw`


def draw(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """One token per row (B,) from logits (B, V): exactly softmax(logits / T) (pure temperature sampling, no
    top-k / top-p), the distribution PPO scores; the argmax at T = 0.

    Inverse-CDF sampling in two levels, one uniform per row: the vocabulary in blocks of :data:`DRAW_BLOCK`, the
    uniform placed first among the blocks' masses, then among the chosen block's tokens. Each token's weight is
    its float32 softmax (relative error ~1e-7, whatever the vocabulary's size); the running sums are float64,
    so a 49K vocabulary's tail keeps its mass. A single float64 softmax and cumulative sum over the
    whole vocabulary (this function before) drew the same token from the same seed for 99.96% of draws (the
    rest sat on a boundary that rounding moves) and cost 2-6x as much: 10.0 ms against 1.8 ms for 64 rows of
    SmolLM2's 49152 logits on a 2-thread Intel Xeon. It draws from the
    same distribution as ``torch.multinomial``, which on a CPU took 3x as long for 8 rows of a 260-token
    vocabulary."""
    if temperature == 0:
        return logits.argmax(-1)
    rows, vocab = logits.shape
    wide = torch.float32 if logits.device.type == "mps" else torch.float64
    if vocab <= DRAW_BLOCK:  # one block: a float64 softmax and cumulative sum over it (a tiny model's vocabulary)
        cdf = torch.softmax(logits.to(wide) / temperature, -1).cumsum(-1)
        u = torch.rand(rows, 1, dtype=wide, device=logits.device) * cdf[:, -1:]
        return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=vocab - 1)
    weights = torch.softmax(logits.float() / temperature if temperature != 1.0 else logits.float(), -1)
    blocks = -(-vocab // DRAW_BLOCK)
    if vocab % DRAW_BLOCK:  # the last block padded with weight 0: never drawn
        weights = torch.nn.functional.pad(weights, (0, blocks * DRAW_BLOCK - vocab))
    weights = weights.view(rows, blocks, DRAW_BLOCK)
    masses = weights.sum(-1).to(wide)  # (B, blocks)
    cdf = masses.cumsum(-1)
    u = torch.rand(rows, 1, dtype=wide, device=logits.device) * cdf[:, -1:]
    block = torch.searchsorted(cdf, u, right=True).clamp_(max=blocks - 1)  # (B, 1)
    left = u - (cdf.gather(1, block) - masses.gather(1, block))  # the uniform's place inside its block
    inside = weights.gather(1, block[..., None].expand(rows, 1, DRAW_BLOCK)).squeeze(1).to(wide).cumsum(-1)
    token = torch.searchsorted(inside, left, right=True)
    # where rounding leaves the uniform past the block's last step (its float32 mass above the float64 sum): the
    # block's last token of positive weight, never one of weight 0
    token = torch.minimum(token, (inside < inside[:, -1:]).sum(-1, keepdim=True))
    return (block * DRAW_BLOCK + token).squeeze(1).clamp_(max=vocab - 1)


CHUNK = 32  # prompts that sample, eval and compare draw, seed and keep together: what a stop can cost


def chunk_seed(seed: int, chunk: int) -> int:
    """The torch seed of chunk ``chunk`` of a command's prompts: from (seed, chunk) alone, so a chunk gets the
    same samples whether the chunks before it were drawn in this process or by an earlier one that stopped
    (``--resume``). Chunk 0's is ``seed`` itself: CHUNK prompts or fewer draw what one seeded pass drew."""
    return seed + chunk * 1_000_003


def start_kept(kept: Path, resume: bool, overwrite: bool) -> None:
    """Before any model loads: ``--overwrite`` drops the chunks a stopped run kept in ``kept``; without it or
    ``--resume`` a folder that holds some is refused (BadInput), since starting afresh would throw them away."""
    if overwrite:
        shutil.rmtree(kept, ignore_errors=True)
    elif not resume and any(f.stat().st_size for f in kept.rglob("rows.jsonl")):
        raise BadInput([f"{kept}: samples kept by a stopped run; pass --resume to go on with them or --overwrite "
                        "to start over"])


@contextlib.contextmanager
def kept_until_published(kept: Path) -> Iterator[None]:
    """Around what a command does with its drawn rows (measure, judge, publish): the chunks in ``kept`` go once
    the results are published, and with a failure that a rerun would meet again (a judge's, a bug: the rerun
    starts afresh, nothing of this run left behind); a stop signal or a full disk leaves them for --resume."""
    try:
        yield
    except Interrupted as stopped:
        tell_kept(stopped, kept, "all")
        raise
    except WriteFailed:
        raise
    except BaseException:
        shutil.rmtree(kept, ignore_errors=True)
        raise
    shutil.rmtree(kept, ignore_errors=True)


def draw_chunks(n: int, draw_chunk: Callable[[int], list[dict]], kept: Path, settings: dict,
                resume: bool) -> list[dict]:
    """One row per prompt for ``n`` prompts, drawn CHUNK at a time by ``draw_chunk(chunk)`` (the rows of prompts
    chunk * CHUNK onwards, seeded from ``chunk_seed``), each chunk appended whole to ``kept/rows.jsonl``
    as it is drawn: a stop signal or a full disk loses at most the chunk being drawn. With ``resume`` the rows
    a stopped run kept with the same ``settings`` (kept/settings.json) are read back and drawing goes on after
    them, so the rows are those of an uninterrupted run (BadInput for rows kept under other settings). The
    caller has checked ``kept`` (:func:`start_kept`) and removes it once its results are published."""
    rows_file, settings_file = kept / "rows.jsonl", kept / "settings.json"
    rows: list[dict] = []
    if resume and rows_file.is_file():
        if json.loads(settings_file.read_text(encoding="utf-8")) != settings:
            raise BadInput([f"{kept}: kept by a run with other models, prompts or settings; pass --overwrite to "
                            "start over"])
        if drop_torn_line(rows_file):
            say(f"[yellow]note:[/] {rows_file}: its last line was cut off (a stopped write); dropped it")
        rows = [json.loads(line) for line in rows_file.read_text(encoding="utf-8").splitlines()]
        say(f"resuming: {len(rows)} of {n} prompts already drawn in {kept}")
    else:
        shutil.rmtree(kept, ignore_errors=True)
        kept.mkdir(parents=True)
        atomic_write_text(settings_file, json.dumps(settings, sort_keys=True) + "\n")
    try:
        for start in range(len(rows) - len(rows) % CHUNK, n, CHUNK):
            fresh = draw_chunk(start // CHUNK)[len(rows) - start:]  # a torn chunk's kept rows are drawn alike
            append_lines(rows_file, [json.dumps(r, allow_nan=False) for r in fresh])
            rows += fresh
    except Interrupted as stopped:
        done = len(rows_file.read_bytes().splitlines()) if rows_file.is_file() else 0  # what a rerun finds
        if done:
            tell_kept(stopped, kept, f"{done} of {n}")
        raise
    return rows


def tell_kept(stopped: Interrupted, kept: Path, how_many: str) -> None:
    """Say, once, that a stop signal ended the command with ``how_many`` prompts' samples kept in ``kept``, and
    the command that goes on from them (so the generic message, that nothing was kept, is not printed)."""
    if not stopped.said:
        say(f"stopped by {stopped}; {how_many} prompts' samples are kept in {kept}. Resume with: {resume_command()}")
        stopped.said = True


def truncate_at_eos(tokens: list[int], eos_id: int) -> list[int]:
    """Tokens up to and including the first EOS (everything after it is not part of the response)."""
    return tokens[:tokens.index(eos_id) + 1] if eos_id in tokens else tokens


def generate(model: Any, path: forward.Forward, tokenizer: Any, queries: list[list[int]], max_new_tokens: int,
             temperature: float, batch_size: int, synced: bool = False, progress: str = "") -> list[list[int]]:
    """Sample one response per query (token lists, EOS included where the model stopped), ``batch_size``
    queries at a time (:func:`sample`), on ``path``, the forward ``runners.Runner`` chose for ``model``. Runs
    under ``distributed.no_autograd``: ``inference_mode`` in one process. ``synced``: every rank keeps stepping
    until all are done (a sharded model gathers its weights in every forward). ``progress``: a name to show progress under, a step a batch (in a log file a line
    about every LOG_SECONDS: sampling a stage's prompts can take minutes)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    responses: list[list[int]] = []
    batches = range(0, len(queries), batch_size)
    shown = StepProgress(progress, len(batches), 0, ("responses",)) if progress else None
    rows = min(batch_size, len(queries))  # the decoding batch (a last short batch keeps torch's products)
    with shown or contextlib.nullcontext(), no_autograd(), \
            cpu_decoding(model, path, rows) if device.type == "cpu" else contextlib.nullcontext() as products:
        for step, start in enumerate(batches, 1):
            ids, mask = pad_left(queries[start:start + batch_size], tokenizer.pad_token_id)
            out = sample(model, path, ids.to(device), mask.to(device), max_new_tokens, temperature,
                         tokenizer.eos_token_id, tokenizer.pad_token_id, synced, products)
            responses += [truncate_at_eos(row, tokenizer.eos_token_id) for row in out.tolist()]
            if shown is not None:
                shown.update(step, {"responses": len(responses)})
    model.train(was_training)
    return responses


def sample(model: Any, path: forward.Forward, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int,
           temperature: float, eos_id: int, pad_id: int, synced: bool = False,
           products: dict[torch.nn.Module, Product] | None = None) -> torch.Tensor:
    """New tokens (B, n <= max_new_tokens) after left-padded queries ``ids`` (B, L), decoded with a KV
    cache on ``path``; a row that has sampled EOS continues with
    ``pad_id``, and decoding stops once every row has. ``products``: :func:`cpu_decoding`'s.

    Our own loop rather than ``model.generate``: one forward and one :func:`draw` a token, none of
    generate's per-step logits processors, stopping criteria and input preparation, and for Llama models the lean
    forward (``forward.LeanForward``). Positions count real tokens only, so left padding shifts nothing."""
    stepper, logits = path.start_decoding(model, ids, mask, max_new_tokens, products)
    out = ids.new_full((ids.size(0), max_new_tokens), pad_id)
    done = torch.zeros(ids.size(0), dtype=torch.bool, device=ids.device)
    n = 0  # tokens drawn
    while True:
        token = torch.where(done, pad_id, draw(logits, temperature))
        out[:, n] = token
        done |= token == eos_id
        n += 1
        left = (~done).sum()
        if n == max_new_tokens or int(distributed.sum_over_ranks(left) if synced else left) == 0:
            return out[:, :n]
        logits = stepper.step(token)


# Which linear layers a decoding step on a CPU computes its own way, and for how many rows (bench/README.md):
# the gain is a memory-bound weight's; for small weights the extra Python costs more than the product.
LARGE_WEIGHT = 1 << 22  # elements (an LM head: 49152 x 576 is 28M): (W @ x.T).T up to 8 rows, any thread count
MID_WEIGHT = 1 << 16    # elements (576 x 576 is 332K): (W @ x.T).T up to 2 rows, with 2 or more threads; packed
FEW_ROWS = 8
PACK_ROWS = 3  # a decoding batch of this many rows or more: MKL's packed products for every weight of MID_WEIGHT+
PACK_MEMORY = 0.5  # packed copies only while they take at most this share of the memory available now


def available_memory() -> float:
    """Bytes of memory available now (Linux's MemAvailable); infinite where the system does not say."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return float("inf")


def few_row_limit(weight: torch.Tensor, threads: int) -> int:
    """The most rows of an input for which ``weight``'s product runs as (W @ x.T).T; 0: never."""
    if weight.numel() >= LARGE_WEIGHT:
        return FEW_ROWS
    return 2 if weight.numel() >= MID_WEIGHT and threads >= 2 else 0


def decoding_products(model: torch.nn.Module, rows: int, threads: int,
                      fuse: bool = False) -> dict[torch.nn.Module, Product]:
    """``model``'s linear layers whose products a decoding step of ``rows`` sequences computes its own way, each
    with its product: for a batch of :data:`PACK_ROWS` or more, MKL's GEMM on the weight packed once for it
    (``lean.PackedProduct``: float32 weights of :data:`MID_WEIGHT` elements or more; with ``fuse``, for a decoder
    that calls them itself, an attention's q, k and v projections as one product, an MLP's gate and up as one);
    otherwise (W @ x.T).T up to :func:`few_row_limit` rows (``lean.few_row_product``); the same where the packed
    copies would take more than :data:`PACK_MEMORY` of the memory available now. A layer whose forward is already
    replaced is left as it is."""
    def own(m: Any) -> bool:
        return type(m) is torch.nn.Linear and "forward" not in vars(m)

    def packs(layers: tuple) -> bool:
        return (rows >= PACK_ROWS and all(map(own, layers)) and sum(m.weight.numel() for m in layers) >= MID_WEIGHT
                and all(can_pack(m.weight) for m in layers))

    products: dict[torch.nn.Module, Product] = {}
    gemm = packed_gemm()
    packing = [m for m in model.modules() if own(m) and packs((m,))]
    if sum(m.weight.numel() * m.weight.element_size() for m in packing) > PACK_MEMORY * available_memory():
        rows = 0  # no room for a packed copy of the weights beside them: torch's own products
    if fuse:
        for block in model.modules():
            for names in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
                layers = tuple(getattr(block, n, None) for n in names)
                if packs(layers):
                    product = PackedProduct(layers, rows, gemm)
                    products.update(dict.fromkeys(layers, product))
    for m in model.modules():
        if not own(m) or m in products:
            continue
        if packs((m,)):
            products[m] = PackedProduct((m,), rows, gemm)
        elif limit := few_row_limit(m.weight, threads):
            products[m] = functools.partial(few_row_product, m, rows=limit)
    return products


@contextlib.contextmanager
def cpu_decoding(model: torch.nn.Module, path: forward.Forward, rows: int) -> Iterator[dict[torch.nn.Module, Product]]:
    """Within the block, on a CPU, a decoding step of ``rows`` sequences computes the products of ``model``'s large
    linear layers its own way (:func:`decoding_products`; figures: bench/README.md); inputs of other sizes (the
    prompt's forward, a last short batch) keep ``linear``. The weights must not change within the block (a packed
    copy is made of each when the block starts, and dropped when it ends).

    Yields those layers and their products where ``path``'s decoder calls every layer itself (the lean decoder).
    Where the calls are in code igpt does not write (transformers' forward, peft's adapter layers around their
    base layers), the only way in is the layer: for the block, those instances' ``forward`` is their product
    (:func:`swapped_forwards`), and it yields no layer."""
    if path.calls_linears(model):
        yield decoding_products(model, rows, torch.get_num_threads(), fuse=True)
        return
    with swapped_forwards(decoding_products(model, rows, torch.get_num_threads())):
        yield {}


@contextlib.contextmanager
def swapped_forwards(products: dict[torch.nn.Module, Product]) -> Iterator[None]:
    """Within the block, each layer of ``products`` has its product as its ``forward`` (an attribute of the
    instance, deleted on the way out): for layers called by code igpt does not write (:func:`cpu_decoding`), one
    product a layer (a product of several layers side by side would give each of them all their outputs)."""
    assert not any(isinstance(p, PackedProduct) and len(p.layers) > 1 for p in products.values())
    for m, product in products.items():
        m.forward = product
    try:
        yield
    finally:
        for m in products:
            del m.forward


def decode_response(tokenizer: Any, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


# ---------------------------------------------------------------- the PPO rollout batch


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
    """Reward-model scores (N,) of each query's response, read where the model reads its score (the last real
    token, or the response's mean: ``forward.REWARD_POOL``). ``rm``: the reward model's ``runners.Runner``."""
    rm.eval()
    return torch.cat([rm.scores(ro.query_response, ro.attention_mask, ro.context_len, ro.lengths).cpu()
                      for _, ro in rollouts(tokenizer, queries, responses, batch_size, rm.device)])


@torch.no_grad()
def response_kl(model: Any, ref: Any, tokenizer: Any, queries: list[list[int]], responses: list[list[int]],
                temperature: float, batch_size: int) -> torch.Tensor:
    """Per-response KL (N,): the sum over response positions of KL(pi_T(. | x, y_<t) || pi_ref,T(. | x, y_<t)),
    both distributions of logits / T, each over the whole vocabulary, along ``responses``.

    PPO penalises the one-sample estimate log pi(y_t) - log pi_ref(y_t) of the same per-token KL on samples
    drawn at its temperature T; the exact per-token sum is that estimate's expectation given the prefixes,
    never negative. Its mean over responses drawn from pi_T is an unbiased estimate of the sequence KL
    KL(pi_T(. | x) || pi_ref,T(. | x)) (the chain rule) only when ``responses`` were drawn at this same T:
    along samples of another temperature it weighs the prefixes wrongly (1.10x the true value on a
    two-token example at T = 0.7 samples, T = 1 log-probs), so eval draws them at T. Padding counts 0.
    ``model``, ``ref``: their ``runners.Runner``."""
    return kl_and_scores(model, ref, None, tokenizer, queries, responses, temperature, batch_size)[0]


@torch.no_grad()
def kl_and_scores(model: Any, ref: Any, rm: Any | None, tokenizer: Any, queries: list[list[int]],
                  responses: list[list[int]], temperature: float, batch_size: int
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`response_kl` of ``model`` to ``ref`` along ``responses`` and, with a reward model ``rm``, its
    :func:`score_responses` of the same responses (else None), each batch's lowest layers run once where the
    models hold the same ones (``families.shared_layers``: fine-tuned with LoRA on their top layers from one
    base, as igpt's presets train SFT, the reward model and the policy): eval's three forwards of a response
    then cost one trunk and three tops. The same numbers as three whole forwards."""
    if not temperature > 0:
        raise ValueError(f"response_kl: temperature must be > 0 (log-probs of logits / T), got {temperature}")
    # an ensemble of reward models (``runners.RewardEnsemble``) scores whole: only a single model shares layers
    sharing = [model, ref] + ([rm] if rm is not None and hasattr(rm, "model") else [])
    for r in (model, ref, *([rm] if rm is not None else [])):
        r.eval()
    shared = (shared_layers([r.model for r in sharing])
              if len({type(r.path) for r in sharing}) == 1 and len({r.device for r in sharing}) == 1 else 0)
    kls, scores = [], []
    for _, ro in rollouts(tokenizer, queries, responses, batch_size, model.device):
        qr, mask = ro.query_response, ro.attention_mask
        trunk = (shared, model.trunk(shared, qr, mask)) if shared else None
        logp = model.log_softmax(qr, mask, ro.context_len, temperature, trunk)
        ref_logp = ref.log_softmax(qr, mask, ro.context_len, temperature, trunk)
        per_token = (logp.exp() * (logp - ref_logp)).sum(-1).clamp(min=0.0)  # rounding can dip below 0
        kls.append(torch.where(ro.response_mask.bool(), per_token, 0.0).sum(1).cpu())
        if rm is not None:
            scores.append(rm.scores(qr, mask, ro.context_len, ro.lengths, trunk if rm in sharing else None).cpu())
    return torch.cat(kls), torch.cat(scores) if rm is not None else None


@torch.no_grad()
def lm_loss(model: Any, blocks: list[list[int]], pad_id: int, batch_size: int) -> float:
    """Mean next-token loss over all tokens of pretraining-text blocks (exp of it is the perplexity). ``model``:
    its ``runners.Runner``."""
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        ids, mask = pad_right(blocks[start:start + batch_size], pad_id)
        summed, n = model.lm_loss_sum(ids.to(model.device), mask.to(model.device))
        total, tokens = total + summed.item(), tokens + int(n)
    return total / max(tokens, 1)
