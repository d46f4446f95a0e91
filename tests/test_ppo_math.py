"""PPO's pure functions against hand computation."""
import math

import pytest
import torch

from instructgpt_cli.losses import (adaptive_kl_beta, gae, kl_penalized_rewards, masked_mean, masked_whiten,
                                    policy_loss, ptx_loss, value_loss)
from instructgpt_cli.rollout import build_rollout


def test_kl_penalized_rewards_put_the_score_on_the_last_real_token():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # second response ended after 2 tokens
    rewards, kl = kl_penalized_rewards(torch.tensor([2.0, -1.0]), logprobs, ref, mask, beta=0.1)
    assert kl.tolist() == [[0.5, -1.0, 0.0], [1.0, 0.0, 0.0]]
    assert rewards.flatten().tolist() == pytest.approx([-0.05, 0.1, 2.0, -0.1, -1.0, 0.0])


def test_gae_by_hand_gamma_1_lambda_095():
    values = torch.tensor([[0.5, 1.0, 9.0]])  # the last value is after the end: ignored
    rewards = torch.tensor([[0.0, 2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    adv, ret = gae(values, rewards, mask, gamma=1.0, lam=0.95)
    d1 = 2.0 + 0.0 - 1.0  # t=1: next value is 0 (episode over)
    d0 = 0.0 + 1.0 - 0.5
    assert adv[0].tolist() == pytest.approx([d0 + 0.95 * d1, d1, 0.0])
    assert ret[0].tolist() == pytest.approx([d0 + 0.95 * d1 + 0.5, d1 + 1.0, 0.0])


def test_masked_whiten_ignores_padding():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    w = masked_whiten(x, mask)
    real = torch.tensor([1.0, 2.0, 3.0, 4.0])
    expected = (real - 2.5) / real.var(unbiased=True).sqrt()
    assert w[:, :2].flatten().tolist() == pytest.approx(expected.tolist(), rel=1e-5)
    assert w[:, 2].tolist() == [0.0, 0.0]
    assert masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_clipped_policy_loss_by_hand():
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    adv = torch.tensor([[1.0, 1.0, -2.0]])
    mask = torch.ones(1, 3)
    loss, stats = policy_loss(new, old, adv, mask, clip=0.2)
    # per token max(-A r, -A clip(r)): [-1.2 (clipped), -0.5 (unclipped wins), 2.2]
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 2.2) / 3, rel=1e-5)
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)
    assert stats["ratio"].item() == pytest.approx((1.5 + 0.5 + 1.1) / 3, rel=1e-5)
    same, s = policy_loss(old, old, adv, mask, clip=0.2)
    assert s["ratio"].item() == 1.0 and s["approxkl"].item() == 0.0


def test_clipped_value_loss_by_hand():
    old = torch.tensor([[0.0, 0.0]])
    new = torch.tensor([[1.0, 0.1]])
    ret = torch.tensor([[2.0, -1.0]])
    loss, stats = value_loss(new, old, ret, torch.ones(1, 2), clip=0.2)
    # token 0: unclipped (1-2)^2=1, clipped (0.2-2)^2=3.24 -> 3.24; token 1: (0.1+1)^2=1.21 both
    assert loss.item() == pytest.approx(0.5 * (3.24 + 1.21) / 2, rel=1e-5)
    assert stats["clipfrac"].item() == pytest.approx(0.5)


def test_ptx_loss_is_mean_token_cross_entropy_over_real_tokens():
    logits = torch.zeros(1, 4, 3)
    logits[0, 0, 1] = math.log(2.0)  # p(token 1 | pos 0) = 2/4
    ids = torch.tensor([[0, 1, 2, 0]])
    mask = torch.tensor([[1, 1, 1, 0]])  # last position is padding
    loss = ptx_loss(logits, ids, mask)
    assert loss.item() == pytest.approx((math.log(2.0) + math.log(3.0)) / 2, rel=1e-6)


def test_everything_after_eos_is_masked():
    eos, pad = 2, 3
    ro = build_rollout([[10, 11], [12]], [[5, 6, eos], [7, 8, 9, 4]], pad, eos)
    assert ro.context_len == 2
    assert ro.query_response.tolist() == [[10, 11, 5, 6, eos, pad], [pad, 12, 7, 8, 9, 4]]
    assert ro.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]]
    assert ro.response_mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert ro.has_eos.tolist() == [True, False] and ro.lengths.tolist() == [3, 4]


def test_adaptive_kl_controller_moves_beta_towards_target():
    assert adaptive_kl_beta(0.1, kl=12.0, target=6.0, horizon=100, n_steps=10) == pytest.approx(0.1 * 1.02)
    assert adaptive_kl_beta(0.1, kl=3.0, target=6.0, horizon=100, n_steps=10) == pytest.approx(0.1 * (1 - 0.2 * 0.1))  # error clipped to -0.2


def test_few_row_linears_compute_the_same_products_and_restore_the_layers():
    from instructgpt_cli.models import tiny_model, tiny_tokenizer
    from instructgpt_cli.rollout import FEW_ROWS, few_row_linears

    torch.manual_seed(0)
    # an LM-head-sized layer (2^22 weights), a mid-sized one (2^16) and a small one (as in a tiny model)
    large, mid, small = torch.nn.Linear(256, 16384), torch.nn.Linear(256, 256, bias=False), torch.nn.Linear(64, 64)
    layers = torch.nn.ModuleList([large, mid, small])
    inputs = {m: [torch.randn(1, n, m.in_features) for n in (1, 2, 3, FEW_ROWS, FEW_ROWS + 1)] for m in layers}
    with torch.no_grad():
        stock = {m: [m(x) for x in xs] for m, xs in inputs.items()}
        for threads, patched in ((2, {large, mid}), (1, {large})):  # mid-sized layers gain only with 2+ threads
            with few_row_linears(layers, threads=threads):
                assert {m for m in layers if "forward" in vars(m)} == patched
                fast = {m: [m(x) for x in xs] for m, xs in inputs.items()}
            assert not any("forward" in vars(m) for m in layers)  # the layers are themselves again
            for m in layers:
                for x, a, b in zip(inputs[m], stock[m], fast[m]):
                    limit = (FEW_ROWS if m is large else 2) if m in patched else 0
                    if x.shape[1] > limit:
                        assert torch.equal(a, b)  # torch's own linear
                    else:
                        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        model = tiny_model(tiny_tokenizer(), seed=0).eval()
        with few_row_linears(model, threads=2):  # a tiny model's layers are all small: none is patched
            assert not any("forward" in vars(m) for m in model.modules())


def test_sampling_runs_without_autograd_draws_what_no_grad_draws_and_leaves_the_model_trainable(monkeypatch):
    """One process samples under ``inference_mode``: the same tokens, from the same seed, as sampling
    under ``no_grad``; the model then trains (no inference tensor left in it: KV cache, buffers)."""
    from instructgpt_cli import rollout
    from instructgpt_cli.distributed import no_autograd
    from instructgpt_cli.models import tiny_model, tiny_tokenizer

    assert isinstance(no_autograd(), torch.inference_mode)  # one process
    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=0)
    queries = [tok.encode("2+3=")[:6], tok.encode("12+7=")]
    torch.manual_seed(5)
    fast = rollout.generate(model, tok, queries, 12, 1.0, batch_size=2)
    monkeypatch.setattr(rollout, "no_autograd", torch.no_grad)
    torch.manual_seed(5)
    assert rollout.generate(model, tok, queries, 12, 1.0, batch_size=2) == fast
    assert len(fast) == 2 and all(fast)
    ids = torch.tensor([queries[1] + fast[1]])
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    assert all(p.grad is not None and not p.is_inference() for p in model.parameters() if p.requires_grad)
