"""PPO's pure functions against hand computation."""
import math
from pathlib import Path

import pytest
import torch

from instructgpt_cli.losses import adaptive_kl_beta, gae, kl_penalized_rewards, masked_mean, masked_whiten, policy_loss, value_loss
from instructgpt_cli.forward import choose
from instructgpt_cli.rollout import build_rollout
from instructgpt_cli.stages import ppo


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
    # approx-KL 0.5 * mean((log r)^2) over the three tokens
    assert stats["approxkl"].item() == pytest.approx(0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2
                                                            + math.log(1.1) ** 2) / 3, rel=1e-5)
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


def test_everything_after_eos_is_masked():
    eos, pad = 2, 3
    ro = build_rollout([[10, 11], [12]], [[5, 6, eos], [7, 8, 9, 4]], pad, eos)
    assert ro.context_len == 2
    assert ro.query_response.tolist() == [[10, 11, 5, 6, eos, pad], [pad, 12, 7, 8, 9, 4]]
    assert ro.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]]
    assert ro.response_mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert ro.has_eos.tolist() == [True, False] and ro.lengths.tolist() == [3, 4]


def test_adaptive_kl_controller_moves_beta_towards_target():
    # proportional inside the clip: error = KL / target - 1, beta *= 1 + error * n / horizon
    assert adaptive_kl_beta(0.1, kl=6.6, target=6.0, horizon=100, n_steps=10) == pytest.approx(0.1 * (1 + 0.1 * 0.1))
    assert adaptive_kl_beta(0.1, kl=5.7, target=6.0, horizon=100, n_steps=10) == pytest.approx(0.1 * (1 - 0.05 * 0.1))
    assert adaptive_kl_beta(0.1, kl=6.0, target=6.0, horizon=100, n_steps=10) == 0.1  # on target: unchanged
    # outside it the error is clipped to +-0.2
    assert adaptive_kl_beta(0.1, kl=12.0, target=6.0, horizon=100, n_steps=10) == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    assert adaptive_kl_beta(0.1, kl=3.0, target=6.0, horizon=100, n_steps=10) == pytest.approx(0.1 * (1 - 0.2 * 0.1))


def test_a_non_finite_kl_leaves_beta_where_it_is():
    # min(0.2, nan) is 0.2: without the guard a NaN KL raised beta by the largest step, 0.1 -> 0.1 * (1 + 0.02)
    for kl in (math.nan, math.inf, -math.inf):
        assert adaptive_kl_beta(0.1, kl=kl, target=6.0, horizon=100, n_steps=10) == 0.1


def test_stream_indices_give_every_step_exactly_per_step_items_in_pass_order():
    """The prompt order of PPO: one stream of passes, each a seeded permutation; a step that reaches the end
    of a pass continues into the next (no short step), a pure function of (seed, step)."""
    from instructgpt_cli.train import step_indices, stream_indices

    perm = lambda seed, p: torch.randperm(10, generator=torch.Generator().manual_seed(seed * 1_000_003 + p)).tolist()  # noqa: E731
    steps = [stream_indices(10, s, 4, seed=3) for s in range(5)]
    assert all(len(s) == 4 for s in steps)
    assert sum(steps, []) == perm(3, 0) + perm(3, 1)  # 20 items = two whole passes, in their order
    assert steps[2] == perm(3, 0)[8:] + perm(3, 1)[:2]  # the step across the end of pass 0
    assert stream_indices(10, 2, 4, seed=3) == steps[2]  # the same again: a resumed run continues exactly
    # more per step than items: a step spans passes, some items twice
    passes = sum((torch.randperm(3, generator=torch.Generator().manual_seed(p)).tolist() for p in range(6)), [])
    assert stream_indices(3, 1, 8, seed=0) == passes[8:16]
    # where per_step divides the items it is the epoch order of the other stages
    assert [stream_indices(12, s, 4, 7) for s in range(6)] == [step_indices(12, s, 4, 7) for s in range(6)]
    assert stream_indices(1, 5, 3, 0) == [0, 0, 0]  # one item


@pytest.mark.parametrize("gemm", ["mkl", "onednn"])
def test_decoding_products_compute_the_same_products_and_restore_the_layers(monkeypatch, gemm):
    """A decoding step's own products (rollout.decoding_products): (W @ x.T).T for one or two sequences, a packed
    GEMM for a batch (MKL's or oneDNN's, lean.packed_gemm); each close to torch's linear, inputs of other sizes
    exactly torch's linear, and the layers themselves again after the block."""
    from instructgpt_cli.lean import can_pack
    from instructgpt_cli.models import tiny_model, tiny_tokenizer
    from instructgpt_cli.rollout import FEW_ROWS, PACK_ROWS, decoding_products, swapped_forwards

    torch.manual_seed(0)
    # an LM-head-sized layer (2^22 weights), a mid-sized one (2^16) and a small one (as in a tiny model)
    large, mid, small = torch.nn.Linear(256, 16384), torch.nn.Linear(256, 256, bias=False), torch.nn.Linear(64, 64)
    layers = torch.nn.ModuleList([large, mid, small])
    batch = PACK_ROWS + 2
    sizes = (1, 2, 3, FEW_ROWS, FEW_ROWS + 1, batch)
    inputs = {m: [torch.randn(1, n, m.in_features) for n in sizes] for m in layers}
    monkeypatch.setenv("IGPT_CPU_GEMM", gemm)
    packs = can_pack(large.weight)
    with torch.no_grad():
        stock = {m: [m(x) for x in xs] for m, xs in inputs.items()}
        # (rows, threads) -> {layer: rows its own product takes}
        cases = {(1, 2): {large: FEW_ROWS, mid: 2}, (1, 1): {large: FEW_ROWS},
                 (batch, 1): {large: batch, mid: batch} if packs else {large: FEW_ROWS}}
        for (rows, threads), own in cases.items():
            with swapped_forwards(decoding_products(layers, rows, threads)):
                assert {m for m in layers if "forward" in vars(m)} == set(own)
                fast = {m: [m(x) for x in xs] for m, xs in inputs.items()}
            assert not any("forward" in vars(m) for m in layers)  # the layers are themselves again
            for m in layers:
                for x, a, b in zip(inputs[m], stock[m], fast[m]):
                    taken = x.shape[1] == own[m] if rows >= PACK_ROWS and packs and m in own else \
                        x.shape[1] <= own.get(m, 0)
                    if taken:
                        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
                    else:
                        assert torch.equal(a, b), (rows, threads, x.shape)  # torch's own linear
        model = tiny_model(tiny_tokenizer(), seed=0).eval()
        for rows in (1, batch):  # a tiny model's layers are all small: none has a product of its own
            assert decoding_products(model, rows, threads=2) == {}


def test_no_packed_copies_without_the_memory_for_them_nor_of_an_fsdp_shard(monkeypatch):
    """decoding_products packs only while the copies take at most PACK_MEMORY of the memory available (else
    torch's products, or (W @ x.T).T where it has them), and never a sharded weight (FSDP gathers the full one
    only inside its forward: packing the shard failed in MKL's op)."""
    import subprocess
    import sys

    from instructgpt_cli import rollout
    from instructgpt_cli.lean import PackedProduct, can_pack

    layers = torch.nn.ModuleList([torch.nn.Linear(256, 16384, bias=False), torch.nn.Linear(256, 256)])
    if not can_pack(layers[0].weight):
        pytest.skip("torch without MKL: nothing is packed anyway")
    assert all(isinstance(p, PackedProduct) for p in rollout.decoding_products(layers, 8, 1).values())
    monkeypatch.setattr(rollout, "available_memory", lambda: 2 * (16384 * 256 + 256 * 256) * 4 - 1)
    products = rollout.decoding_products(layers, 8, 1)
    assert not any(isinstance(p, PackedProduct) for p in products.values()) and layers[0] in products
    code = """
import torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from instructgpt_cli import rollout
from instructgpt_cli.lean import PackedProduct
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29513", rank=0, world_size=1)
model = torch.nn.Sequential(torch.nn.Linear(576, 576), torch.nn.Linear(576, 576))
fully_shard(model)
print(sum(isinstance(p, PackedProduct) for p in rollout.decoding_products(model, 4, 1).values()))
dist.destroy_process_group()
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.split()[-1] == "0", done.stderr[-2000:]


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
    fast = rollout.generate(model, choose(model), tok, queries, 12, 1.0, batch_size=2)
    monkeypatch.setattr(rollout, "no_autograd", torch.no_grad)
    torch.manual_seed(5)
    assert rollout.generate(model, choose(model), tok, queries, 12, 1.0, batch_size=2) == fast
    assert len(fast) == 2 and all(fast)
    ids = torch.tensor([queries[1] + fast[1]])
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    assert all(p.grad is not None and not p.is_inference() for p in model.parameters() if p.requires_grad)


def policy_and_value(n_policy: int = 6, n_value: int = 4):
    """A stand-in for ppo.PolicyAndValue: two linear layers whose weights are the parameters."""
    from instructgpt_cli.stages.ppo import PolicyAndValue

    return PolicyAndValue(torch.nn.Linear(n_policy, 1, bias=False), torch.nn.Linear(n_value, 1, bias=False))


def test_value_parameters_step_with_their_own_learning_rate_under_the_schedule():
    from instructgpt_cli.config import OptimConfig
    from instructgpt_cli.train import TrainState, build_optimizer, build_scheduler

    pv = policy_and_value()
    before = {k: p.detach().clone() for k, p in pv.named_parameters()}
    cfg = OptimConfig(lr=1e-2, weight_decay=0.0, scheduler="linear", grad_clip=0.0)
    optimizer = build_optimizer(pv, cfg, {"policy": 1e-2, "value": 1e-3})
    scheduler = build_scheduler(optimizer, cfg, total_steps=10)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-2, 1e-3]
    for p in pv.parameters():
        p.grad = torch.randn_like(p) * 5
    TrainState(pv, optimizer, scheduler).optimizer_step_by_group(cfg.grad_clip)
    # Adam's first step moves every weight by lr * g / (|g| + eps): lr itself, per group
    for name, lr in (("policy.weight", 1e-2), ("value.weight", 1e-3)):
        step = (dict(pv.named_parameters())[name] - before[name]).abs()
        torch.testing.assert_close(step, torch.full_like(step, lr), rtol=1e-4, atol=0)  # float32 weights
    # the linear schedule scales both groups alike: 9/10 of each peak after one of ten steps
    assert scheduler.get_last_lr() == pytest.approx([0.9e-2, 0.9e-3])


def test_a_huge_policy_gradient_does_not_shrink_the_value_update():
    """Each group is clipped on its own norm: ptx's gradient on the policy (ptx_coef 27.8) cannot scale the
    value model's step through a shared norm (with one norm the value step here would be 2e-7 of itself)."""
    from instructgpt_cli.train import TrainState

    pv = policy_and_value(n_policy=4, n_value=4)
    before = {k: p.detach().clone() for k, p in pv.named_parameters()}
    optimizer = torch.optim.SGD([{"params": [pv.policy.weight]}, {"params": [pv.value.weight]}], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    pv.policy.weight.grad = torch.full((1, 4), 1e6)  # norm 2e6
    pv.value.weight.grad = torch.tensor([[0.3, 0.0, -0.4, 0.0]])  # norm 0.5, under the clip of 1
    norms = TrainState(pv, optimizer, scheduler).optimizer_step_by_group(grad_clip=1.0)
    assert norms == pytest.approx([2e6, 0.5])
    torch.testing.assert_close(before["value.weight"] - pv.value.weight.detach(), torch.tensor([[0.3, 0.0, -0.4, 0.0]]))
    policy_step = before["policy.weight"] - pv.policy.weight.detach()
    assert policy_step.norm().item() == pytest.approx(1.0, rel=1e-5)  # clipped to norm 1
    assert all(p.grad is None for p in pv.parameters())


def constant_rm(tok, score: float):
    """A tiny reward model that scores every sequence ``score``: a zero head plus the normalisation bias."""
    from instructgpt_cli.forward import REWARD_BIAS
    from instructgpt_cli.models import tiny_model

    rm = tiny_model(tok, seed=2, kind="reward")
    with torch.no_grad():
        rm.score.weight.zero_()
    setattr(rm.config, REWARD_BIAS, score)
    return rm.requires_grad_(False).eval()


def scoring_models(tok, rm, policy_dropout: float = 0.0):
    from instructgpt_cli.config import PPOConfig
    from instructgpt_cli.models import tiny_model

    policy, ref = tiny_model(tok, seed=0, dropout=policy_dropout), tiny_model(tok, seed=0).requires_grad_(False).eval()
    value = tiny_model(tok, seed=1, kind="reward")
    return ppo.as_runners(ppo.PPOModules(policy, value, reference=ref, reward=rm), PPOConfig(), torch.device("cpu"))


def fixed_rollout(tok):
    """Four queries and responses: rows 0 and 2 end in EOS, rows 1 and 3 ran out of tokens."""
    queries = [tok.encode(q) for q in ("2+3=", "12+7=", "9+9=", "1+1=")]
    words = [tok.encode(w) for w in ("five", "nineteen and more", "eighteen", "two two two")]
    responses = [w + [tok.eos_token_id] if i % 2 == 0 else w for i, w in enumerate(words)]
    return build_rollout(queries, responses, tok.pad_token_id, tok.eos_token_id)


@pytest.mark.parametrize("raw, clip, penalty, expected", [
    (3.0, 1.0, 0.5, [1.0, 0.5, 1.0, 0.5]),     # clipped to 1, then 0.5 off where no EOS
    (-3.0, 1.0, 0.5, [-1.0, -1.5, -1.0, -1.5]),
    (3.0, 0.0, 2.0, [3.0, 1.0, 3.0, 1.0]),     # no clip
    (0.25, 1.0, 0.0, [0.25] * 4),              # inside the clip, no penalty: the score itself
])
def test_scoring_clips_scores_and_penalises_a_missing_eos_by_hand(raw, clip, penalty, expected):
    """Through ppo's scoring: the RM says ``raw`` for every response; the reward at the last real token is
    the clipped score less the penalty where the response has no EOS (the policy is the reference: KL 0)."""
    from instructgpt_cli.config import PPOConfig
    from instructgpt_cli.models import tiny_tokenizer

    tok = tiny_tokenizer()
    ro = fixed_rollout(tok)
    cfg = PPOConfig(reward_clip=clip, missing_eos_penalty=penalty)
    sc = ppo.score_rollout(scoring_models(tok, constant_rm(tok, raw)), ro, cfg, beta=0.05, batch=3)
    assert sc.scores.tolist() == pytest.approx([raw] * 4)  # objective/scores: the RM's own
    assert sc.kl.abs().max().item() < 1e-6
    last = ro.lengths - 1
    assert sc.rewards[torch.arange(4), last].tolist() == pytest.approx(expected, abs=1e-6)
    assert sc.rewards.sum(1).tolist() == pytest.approx(expected, abs=1e-6)  # nothing anywhere else


def test_scoring_runs_policy_and_value_in_eval_mode():
    """A policy with dropout, left in train mode by the last update, scores as in eval mode (the mode it
    sampled in): the old log-probs are exactly the eval-mode ones."""
    from instructgpt_cli.config import PPOConfig
    from instructgpt_cli.models import tiny_tokenizer

    tok = tiny_tokenizer()
    ro = fixed_rollout(tok)
    models = scoring_models(tok, constant_rm(tok, 0.0), policy_dropout=0.5)
    models.policy.train(), models.value.train()
    torch.manual_seed(0)
    sc = ppo.score_rollout(models, ro, PPOConfig(), beta=0.05, batch=4)
    policy = models.policy.model
    assert not policy.training and not models.value.model.training
    with torch.no_grad():
        expected, _ = choose(policy).response_logprobs(policy.eval(), ro.query_response, ro.attention_mask,
                                                       ro.context_len, 1.0)
    mask = ro.response_mask.bool()
    torch.testing.assert_close(sc.logprobs[mask], expected[mask], rtol=1e-5, atol=1e-6)


def test_generate_truncates_at_eos_mid_batch_and_pads_after_it():
    """A model whose LM head forces EOS in rows 0 and 2 at the 4th token and never elsewhere: those rows
    stop there (EOS kept, pad after it in the sampled block), the others run to max_new_tokens; the
    rollout's response mask, has_eos and lengths follow."""
    from instructgpt_cli import rollout
    from instructgpt_cli.models import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=0).eval()
    k, max_new, stop_rows = 3, 7, [0, 2]
    calls = []

    def force(module, inputs, logits):  # logits (B, V) or (B, 1, V): one call per drawn token
        logits = logits.clone()
        logits[..., tok.eos_token_id] = -float("inf")
        if len(calls) == k:
            logits[stop_rows, ..., tok.eos_token_id] = 1e4
        calls.append(1)
        return logits

    hook = model.lm_head.register_forward_hook(force)
    queries = [tok.encode(q) for q in ("2+3=", "12+7=", "9+9=", "1+1=")]
    try:
        torch.manual_seed(0)
        ids, mask = rollout.pad_left(queries, tok.pad_token_id)
        with torch.no_grad():
            out = rollout.sample(model, choose(model), ids, mask, max_new, 1.0, tok.eos_token_id, tok.pad_token_id)
        calls.clear()
        torch.manual_seed(0)
        responses = rollout.generate(model, choose(model), tok, queries, max_new, 1.0, batch_size=4)
    finally:
        hook.remove()
    assert out.shape == (4, max_new)
    for r in stop_rows:
        assert out[r, k].item() == tok.eos_token_id and (out[r, k + 1:] == tok.pad_token_id).all()
    assert not (out[[1, 3]] == tok.eos_token_id).any()
    assert [len(r) for r in responses] == [k + 1, max_new, k + 1, max_new]
    assert [r[-1] == tok.eos_token_id for r in responses] == [True, False, True, False]
    assert responses[0] == out[0, :k + 1].tolist() and responses[1] == out[1].tolist()  # same draws
    ro = build_rollout(queries, responses, tok.pad_token_id, tok.eos_token_id)
    assert ro.response_mask.tolist() == [[1] * (k + 1) + [0] * (max_new - k - 1), [1] * max_new] * 2
    assert ro.has_eos.tolist() == [True, False, True, False] and ro.lengths.tolist() == [4, 7, 4, 7]


def test_decoding_stops_once_every_row_has_ended():
    from instructgpt_cli import rollout
    from instructgpt_cli.models import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=0).eval()
    calls = []

    def force(module, inputs, logits):  # every row: EOS at the 2nd token
        logits = logits.clone()
        logits[..., tok.eos_token_id] = 1e4 if len(calls) == 1 else -float("inf")
        calls.append(1)
        return logits

    hook = model.lm_head.register_forward_hook(force)
    try:
        responses = rollout.generate(model, choose(model), tok, [tok.encode("2+3="), tok.encode("1+1=")], 9, 1.0,
                                     batch_size=2)
    finally:
        hook.remove()
    assert [len(r) for r in responses] == [2, 2] and len(calls) == 2  # no forward after the last EOS


def test_update_stats_means_by_kind_by_hand():
    """Minibatch metrics: per-minibatch sums of token-weighted micro values, averaged over all minibatches
    (one minibatch may add nothing); 'first' the first minibatch's sum; 'step' the mean of per-step values."""
    from instructgpt_cli.stages.ppo import UpdateStats

    stats = UpdateStats(n_minibatches=4)
    stats.add("minibatch", {"loss/policy": 0.25 * 2.0})  # minibatch 1: two micro-batches, weights 1/4 and 3/4
    stats.add("minibatch", {"loss/policy": 0.75 * 4.0})
    stats.add("first", {"val/ratio_first": 0.25 * 1.0})
    stats.add("first", {"val/ratio_first": 0.75 * 1.0})
    stats.add("step", {"loss/ptx": 3.0})
    stats.add("step", {"train/grad_norm": 1.0}, same_on_ranks=True)
    stats.add("minibatch", {"loss/policy": 1.0 * 8.0})  # minibatch 2: one micro-batch
    stats.add("step", {"loss/ptx": 6.0})
    stats.add("step", {"train/grad_norm": 5.0}, same_on_ranks=True)
    out = stats.means()
    assert out == {"loss/policy": (3.5 + 8.0) / 4, "val/ratio_first": 1.0, "loss/ptx": 4.5, "train/grad_norm": 3.0}
    assert list(out) == ["loss/policy", "val/ratio_first", "loss/ptx", "train/grad_norm"]  # minibatch kinds first
    assert stats.same_on_ranks == {"train/grad_norm"}  # not summed over ranks, the others are
    assert UpdateStats(3).means() == {}  # a skipped update: nothing


def test_packed_gemm_is_mkl_on_intel_onednn_elsewhere_unless_asked(monkeypatch):
    """Which packed GEMM a CPU decoding step uses (lean.packed_gemm): MKL's on an Intel CPU, oneDNN's on others
    (where MKL's few-row products ran at a third of the memory's bandwidth), IGPT_CPU_GEMM where it names one; and
    the vendor as /proc/cpuinfo says it."""
    from instructgpt_cli import lean

    monkeypatch.delenv("IGPT_CPU_GEMM", raising=False)
    assert lean.packed_gemm("GenuineIntel") == "mkl"
    assert lean.packed_gemm("AuthenticAMD") == lean.packed_gemm("") == "onednn"
    monkeypatch.setenv("IGPT_CPU_GEMM", "mkl")
    assert lean.packed_gemm("AuthenticAMD") == "mkl"
    monkeypatch.setenv("IGPT_CPU_GEMM", "ONEDNN ")
    assert lean.packed_gemm("GenuineIntel") == "onednn"
    monkeypatch.setenv("IGPT_CPU_GEMM", "cublas")  # not a CPU GEMM igpt knows: the vendor's choice
    assert lean.packed_gemm("GenuineIntel") == "mkl"
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)  # torch without oneDNN: MKL anywhere
    assert lean.packed_gemm("AuthenticAMD") == "mkl"
    cpuinfo = Path("/proc/cpuinfo")
    line = next((x for x in cpuinfo.read_text().splitlines() if x.startswith("vendor_id")), None) \
        if cpuinfo.exists() else None
    assert lean.cpu_vendor() == (line.split(":", 1)[1].strip() if line else "")
