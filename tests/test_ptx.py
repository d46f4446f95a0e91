"""PPO-ptx and the LM losses: the chunked head + cross-entropy against the plain one, ptx micro-batches
against one forward, PPO and ptx gradients in one optimizer step, one ptx batch per optimizer step, and the
paper preset (configs/instructgpt.yaml) scaled down to a tiny model."""
import contextlib
import random

import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import REPO, arithmetic_demos, igpt, marker_rankings, write_jsonl
from grads import assert_same_grads
from instructgpt_cli import losses, train
from instructgpt_cli.config import OptimConfig, PPOConfig
from instructgpt_cli.data import IGNORE_INDEX, Demo, collate, pad_right, tokenize_demos
from instructgpt_cli.losses import linear_cross_entropy_sum, policy_loss, ptx_loss, sft_loss_sum, value_loss
from instructgpt_cli.models import tiny_model, tiny_tokenizer
from instructgpt_cli.rollout import Rollout, build_rollout, lm_loss_sum, response_logprobs, token_values
from instructgpt_cli.rundir import read_metrics
from instructgpt_cli.stages import ppo, sft
from instructgpt_cli.train import stream_indices


def grads_of(model) -> dict:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


# ---------------------------------------------------------------- chunked LM head + cross-entropy


@pytest.mark.parametrize("rows", [1, 4, 37, 1000])
def test_chunked_linear_cross_entropy_equals_one_matmul(rows):
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    targets[::5] = IGNORE_INDEX  # skipped rows: no loss, no gradient
    want = F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    got = linear_cross_entropy_sum(hidden, weight, targets, rows)
    torch.testing.assert_close(got, want)
    # a factor on the loss (the caller's normalisation) reaches both gradients
    assert_same_grads(dict(zip("hw", torch.autograd.grad(2.5 * got, (hidden, weight)))),
                      dict(zip("hw", torch.autograd.grad(2.5 * want, (hidden, weight)))))
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy_sum(hidden, weight, targets, rows), want.detach())


def test_chunked_linear_cross_entropy_edges():
    weight = torch.randn(11, 4, requires_grad=True)
    hidden = torch.randn(3, 4, requires_grad=True)
    none = linear_cross_entropy_sum(hidden, weight, torch.full((3,), IGNORE_INDEX), 2)  # every row ignored
    none.backward()
    assert none.item() == 0.0 and hidden.grad.abs().sum() == 0 and weight.grad.abs().sum() == 0
    empty = linear_cross_entropy_sum(torch.zeros(0, 4), weight.detach(), torch.zeros(0, dtype=torch.long))
    assert empty.item() == 0.0
    # a frozen head (LoRA): only the hidden states get a gradient
    h = torch.randn(5, 4, requires_grad=True)
    t = torch.randint(0, 11, (5,))
    frozen = weight.detach()
    (g,) = torch.autograd.grad(linear_cross_entropy_sum(h, frozen, t, 2), (h,))
    (want,) = torch.autograd.grad(F.cross_entropy(h @ frozen.T, t, reduction="sum"), (h,))
    torch.testing.assert_close(g, want)


def test_chunk_rows_keep_fp32_logits_to_tens_of_mb():
    assert losses.chunk_rows(49152) * 49152 * 4 <= losses.CHUNK_BYTES < (losses.chunk_rows(49152) + 1) * 49152 * 4
    assert losses.chunk_rows(10**9) == 1


def saved_logit_rows(fn, vocab: int) -> int:
    """The most rows of any (.., vocab) tensor autograd keeps for the backward while ``fn`` runs."""
    most = 0

    def pack(t):
        nonlocal most
        if t.dim() >= 1 and t.size(-1) == vocab:
            most = max(most, t.numel() // vocab)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return most


def test_sft_and_ptx_losses_chunked_equal_the_full_logits_and_keep_no_logits(monkeypatch):
    """sft.loss_sum and rollout.lm_loss_sum on the lean path (a tiny Llama) against the model's own logits:
    the same loss and gradients, and no full-vocabulary tensor kept for the backward (the plain loss keeps
    its logits and their log-softmax: (rows, V) each)."""
    monkeypatch.setattr(losses, "CHUNK_BYTES", 4 * 7 * 260)  # a few rows a chunk: many chunks
    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=0)
    vocab = model.config.vocab_size
    rng = random.Random(0)
    blocks = [[rng.randrange(4, len(tok)) for _ in range(n)] for n in (23, 9, 16)]
    ids, mask = pad_right(blocks, tok.pad_token_id)
    summed, n = lm_loss_sum(model, ids, mask)
    assert int(n) == sum(len(b) - 1 for b in blocks)
    (summed / n).backward()
    got = grads_of(model)
    want_loss = ptx_loss(model(input_ids=ids, attention_mask=mask).logits, ids, mask)
    want_loss.backward()
    torch.testing.assert_close(summed / n, want_loss)
    assert_same_grads(got, grads_of(model))
    assert saved_logit_rows(lambda: lm_loss_sum(model, ids, mask), vocab) == 0
    assert saved_logit_rows(lambda: ptx_loss(model(input_ids=ids, attention_mask=mask).logits, ids, mask),
                            vocab) >= int(n)

    demos = [Demo([{"role": "user", "content": d["prompt"]}], d["response"], None, f"d:{i}")
             for i, d in enumerate(arithmetic_demos(4))]
    batch = collate(tokenize_demos(tok, demos, 256)[0], tok.pad_token_id)
    summed, n = sft.loss_sum(model, batch)
    summed.backward()
    got = grads_of(model)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    want, want_n = sft_loss_sum(model(**inputs).logits, batch["labels"])
    want.backward()
    assert int(n) == int(want_n) > 0
    torch.testing.assert_close(summed, want)
    assert_same_grads(got, grads_of(model))
    assert saved_logit_rows(lambda: sft.loss_sum(model, batch), vocab) == 0
