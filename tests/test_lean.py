"""The lean Llama forward (``instructgpt_cli.lean``) computes what transformers computes: log-probs, values,
gradients, trunk states and sampled tokens, with and without left padding, LoRA and dropout; and it steps
aside where it cannot promise that. Also the sampler's draw."""
from __future__ import annotations

import pytest
import torch

from instructgpt_cli import forward
from instructgpt_cli import families
from instructgpt_cli import lean, rollout
from instructgpt_cli.models import tiny_config, tiny_model, tiny_tokenizer
from instructgpt_cli.forward import choose


@pytest.fixture
def tok():
    return tiny_tokenizer()


def batch(left_padded: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    """query + response ids (3, 14), mask, context length 6; rows end early on the right, and with
    ``left_padded`` the queries are of different lengths."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 60, (3, 14), generator=gen)
    mask = torch.ones(3, 14, dtype=torch.long)
    if left_padded:
        mask[0, :2] = 0
        mask[2, :4] = 0
    mask[1, 11:] = 0
    return ids, mask, 6


def run_both(monkeypatch, fn):
    """fn() on the lean path and on transformers' forward."""
    out = fn()
    with monkeypatch.context() as m:
        m.setattr(forward, "runs_lean", lambda model: False)  # forward.py is where the path is chosen
        ref = fn()
    return out, ref


def grads(model) -> dict:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("left_padded", [True, False])
def test_log_probs_values_and_gradients_equal_transformers(tok, monkeypatch, left_padded):
    policy, value = tiny_model(tok, 0), tiny_model(tok, 1, kind="reward")
    assert families.runs_lean(policy) and families.runs_lean(value)
    ids, mask, context = batch(left_padded)
    real = mask[:, context:].bool()

    def run():
        logprobs, entropy = forward.choose(policy).response_logprobs(policy, ids, mask, context, 0.7, True)
        values = forward.choose(value).token_values(value, ids, mask, context)
        ((logprobs * real).sum() + (values * real).sum()).backward()
        return logprobs.detach(), entropy, values.detach(), grads(policy), grads(value)

    out, ref = run_both(monkeypatch, run)
    for a, b in zip(out[:3], ref[:3]):
        torch.testing.assert_close(a[real], b[real], rtol=1e-5, atol=1e-6)
    for a, b in zip(out[3:], ref[3:]):
        assert a.keys() == b.keys() and len(a) > 10
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


def test_dropout_in_training_draws_what_transformers_draws(tok, monkeypatch):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    policy = LlamaForCausalLM(tiny_config(tok, dropout=0.3)).train()
    ids, mask, context = batch(True)

    def run():
        torch.manual_seed(7)
        return forward.choose(policy).response_logprobs(policy, ids, mask, context, 1.0)[0].detach()

    out, ref = run_both(monkeypatch, run)
    policy.eval()
    assert not torch.allclose(out, run())  # the dropout did something
    torch.testing.assert_close(out[mask[:, context:].bool()], ref[mask[:, context:].bool()])


def test_lora_trunk_states_and_disabled_adapters_equal_transformers(tok, monkeypatch):
    from instructgpt_cli.config import LoraConfig
    from instructgpt_cli.models import apply_lora
    from instructgpt_cli.families import frozen_layers

    model = apply_lora(tiny_model(tok, 0), LoraConfig(enabled=True, r=4, layers=1))
    with torch.no_grad():  # adapters that change the output
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    assert families.runs_lean(model) and frozen_layers(model) == 1
    ids, mask, context = batch(True)

    def run():
        states = choose(model).trunk_states(model, 1, ids, mask)
        adapted = forward.choose(model).response_logprobs(model, ids, mask, context, 1.0, trunk=(1, states))[0]
        whole = forward.choose(model).response_logprobs(model, ids, mask, context, 1.0)[0]
        with model.disable_adapter():
            base = forward.choose(model).response_logprobs(model, ids, mask, context, 1.0)[0]
        return states, adapted, whole, base

    out, ref = run_both(monkeypatch, run)
    real = mask.bool()
    torch.testing.assert_close(out[0][real], ref[0][real])
    for a, b in zip(out[1:], ref[1:]):
        torch.testing.assert_close(a[real[:, context:]], b[real[:, context:]])
    torch.testing.assert_close(out[1], out[2])  # the trunk shortcut computes the whole model's numbers
    assert not torch.allclose(out[2], out[3])  # the adapters matter, and disabling them is seen


def test_decoding_matches_generate_and_the_transformers_cache(tok, monkeypatch):
    from transformers import GenerationConfig

    from instructgpt_cli.batches import pad_left

    model = tiny_model(tok, 0).eval()
    queries = [list(range(10, 13 + 4 * i)) for i in range(4)]  # lengths 3..15: left padding
    ids, mask = pad_left(queries, tok.pad_token_id)
    with torch.no_grad():
        greedy = rollout.sample(model, forward.choose(model), ids, mask, 16, 0.0, -1, tok.pad_token_id)
    eos = int(greedy[0, 3])  # a token the first row reaches greedily: rows stop there, then pad
    with torch.no_grad():
        greedy = rollout.sample(model, forward.choose(model), ids, mask, 16, 0.0, eos, tok.pad_token_id)
        config = GenerationConfig(do_sample=False, max_new_tokens=16, eos_token_id=eos, pad_token_id=tok.pad_token_id)
        expected = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, ids.size(1):]
    assert greedy.tolist() == expected.tolist()
    assert (greedy == eos).any(1).sum() >= 1 and (greedy[0, 4:] == tok.pad_token_id).all()

    def sampled():
        torch.manual_seed(3)
        with torch.no_grad():
            return rollout.sample(model, forward.choose(model), ids, mask, 16, 1.0, tok.eos_token_id, tok.pad_token_id)

    out, ref = run_both(monkeypatch, sampled)  # lean.Decoder against transformers' forward and cache
    assert out.tolist() == ref.tolist() and len(set(map(tuple, out.tolist()))) == 4


def test_repeated_prompts_share_one_prefill(tok, monkeypatch):
    """igpt sample's K copies of a prompt: each distinct prompt runs once, its cache is copied to its rows, and
    the samples are those of the unshared decoder (and of transformers' forward); greedy rows equal each
    prompt decoded alone."""
    from instructgpt_cli.batches import pad_left

    model = tiny_model(tok, 0).eval()
    distinct = [list(range(10, 13 + 4 * i)) for i in range(3)]
    ids, mask = pad_left([q for q in distinct for _ in range(3)], tok.pad_token_id)  # K = 3, as igpt sample lays out
    first, rows = forward.distinct_rows(ids, mask)
    assert first.tolist() == [0, 3, 6] and rows.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert forward.distinct_rows(ids[::3], mask[::3]) is None
    prefilled = []
    monkeypatch.setattr(lean.Decoder, "start", lambda self, start=lean.Decoder.start: (
        prefilled.append(self.ids.size(0)), start(self))[1])

    def sampled(temperature=1.0):
        torch.manual_seed(5)
        with torch.no_grad():
            return rollout.sample(model, forward.choose(model), ids, mask, 12, temperature, tok.eos_token_id, tok.pad_token_id)

    shared = sampled()
    assert prefilled == [3]  # three prompts prefilled, not nine
    out, ref = run_both(monkeypatch, sampled)  # transformers' decoder never shares
    assert out.tolist() == ref.tolist() == shared.tolist()
    monkeypatch.setattr(forward, "distinct_rows", lambda ids, mask: None)
    assert sampled().tolist() == shared.tolist() and prefilled[-1] == 9
    assert len(set(map(tuple, shared[:3].tolist()))) == 3  # the copies of one prompt sample apart
    monkeypatch.undo()
    greedy = sampled(0.0)
    for i, q in enumerate(distinct):
        alone = rollout.sample(model, forward.choose(model), torch.tensor([q]), torch.ones(1, len(q), dtype=torch.long), 12, 0.0,
                               tok.eos_token_id, tok.pad_token_id)
        assert (greedy[3 * i:3 * i + 3] == alone).all()


def test_supported_only_where_the_numbers_are_the_same(tok):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from instructgpt_cli.models import enable_checkpointing

    assert families.runs_lean(tiny_model(tok, 0))
    eager = LlamaForCausalLM._from_config(tiny_config(tok), attn_implementation="eager")
    assert not families.runs_lean(eager)
    assert not families.runs_lean(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)))
    dynamic = tiny_config(tok)
    dynamic.rope_parameters = {**dynamic.rope_parameters, "rope_type": "dynamic", "factor": 2.0}
    assert not families.runs_lean(LlamaForCausalLM(dynamic))  # its frequencies depend on the length
    checkpointed = tiny_model(tok, 0)
    enable_checkpointing(checkpointed, "tiny")
    assert families.runs_lean(checkpointed)  # lean.states checkpoints as transformers' layers do (test_models.py)

    class Hooked(LlamaDecoderLayer):  # as FSDP turns a sharded layer into a subclass that gathers its weights
        pass

    wrapped = tiny_model(tok, 0)
    wrapped.model.layers[1].__class__ = Hooked
    assert not families.runs_lean(wrapped)


def test_draw_samples_softmax_at_temperature_and_never_an_impossible_token():
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, float("-inf")])
    draws = rollout.draw(logits.expand(40000, 5), 0.7)
    freq = torch.bincount(draws, minlength=5).double() / len(draws)
    expected = torch.softmax(logits.double() / 0.7, -1)
    assert freq[4] == 0
    assert (freq - expected).abs().max() < 0.01  # 4 standard errors at most
    assert rollout.draw(torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 1.0]]), 0.0).tolist() == [1, 0]


def test_draw_over_several_blocks_follows_softmax_by_a_chi_square_test():
    """A vocabulary of 2.5 blocks (rollout.DRAW_BLOCK): the two levels of the draw (block, then token in it)
    together give softmax(logits / T); the padded end of the last block and impossible tokens never come."""
    torch.manual_seed(1)
    vocab = 2 * rollout.DRAW_BLOCK + rollout.DRAW_BLOCK // 2
    logits = torch.randn(vocab) * 1.5
    logits[7] = logits[vocab - 1] = float("-inf")
    logits[-2] = 6.0  # most of the mass in the padded last block
    n = 300_000
    draws = torch.cat([rollout.draw(logits.expand(2000, vocab), 0.8) for _ in range(n // 2000)])
    assert draws.max() < vocab
    counts = torch.bincount(draws, minlength=vocab).double()
    expected = torch.softmax(logits.double() / 0.8, -1) * n
    assert counts[7] == counts[vocab - 1] == 0
    live = expected > 0
    chi2 = float(((counts[live] - expected[live]) ** 2 / expected[live]).sum())
    df = int(live.sum()) - 1
    assert chi2 < df + 5 * (2 * df) ** 0.5, (chi2, df)  # 5 sd of the chi-square's spread above its mean
    with pytest.MonkeyPatch.context() as m:  # a uniform at the very top of its range: still a possible token
        m.setattr(torch, "rand", lambda *a, **k: torch.full(a, 1 - 1e-16, dtype=k["dtype"]))
        assert rollout.draw(logits.expand(4, vocab), 0.8).tolist() == [vocab - 2] * 4
    one = torch.full((3, vocab), float("-inf"))
    one[:, 1500] = 0.0  # all mass on one token, in the second block
    assert rollout.draw(one, 1.0).tolist() == [1500] * 3


@pytest.mark.parametrize("packed", [True, False])
def test_sft_loss_and_gradients_equal_transformers_packed_and_padded(tok, monkeypatch, packed):
    from instructgpt_cli.batches import Example, IGNORE_INDEX, collate, collate_packed
    from instructgpt_cli.forward import choose

    model = tiny_model(tok, 0)
    gen = torch.Generator().manual_seed(1)
    examples = []
    for length, prompt in ((9, 4), (14, 6), (6, 2)):
        ids = torch.randint(5, 60, (length,), generator=gen).tolist()
        examples.append(Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    batch = collate_packed(examples) if packed else collate(examples, tok.pad_token_id)
    assert ("position_ids" in batch) == packed

    def step():
        summed, n = choose(model).response_loss_sum(model, batch)
        summed.backward()
        return summed.detach(), n, grads(model)

    out, ref = run_both(monkeypatch, step)
    torch.testing.assert_close(out[0], ref[0])
    assert int(out[1]) == int(ref[1]) == 5 + 8 + 4  # response tokens
    for name in ref[2]:
        torch.testing.assert_close(out[2][name], ref[2][name], rtol=1e-4, atol=1e-6, msg=name)


def test_heads_wider_than_the_model_and_ungrouped_attention(tok, monkeypatch):
    """head_dim x heads need not equal the width (o_proj maps back), nor keys share heads."""
    from transformers import LlamaForCausalLM

    config = tiny_config(tok)
    config.head_dim, config.num_key_value_heads = 32, 4  # 4 heads of 32 on a width of 64
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    ids, mask, context = batch(True)
    out, ref = run_both(monkeypatch, lambda: forward.choose(model).response_logprobs(model, ids, mask, context, 1.0)[0].detach())
    torch.testing.assert_close(out[mask[:, context:].bool()], ref[mask[:, context:].bool()])


def test_packed_rows_attend_within_each_sequence(tok):
    """One packed row runs each sequence's causal attention on its own; several rows use the
    block-diagonal mask. Both give each sequence the states it has alone."""
    from instructgpt_cli.batches import pack

    model = tiny_model(tok, 0)
    gen = torch.Generator().manual_seed(2)
    seqs = [torch.randint(5, 60, (n,), generator=gen).tolist() for n in (5, 9, 3, 7)]
    with torch.no_grad():
        alone = [lean.states(model, torch.tensor([s]), None)[0] for s in seqs]
        one_row = lean.states(model, pack(seqs)[0], None, positions=pack(seqs)[1])[0]
        rows = [pack(seqs[:2]), pack(seqs[2:] + [[7, 8, 9, 10]])]  # two rows of 14 tokens
        two_rows = lean.states(model, torch.cat([r[0] for r in rows]), None, positions=torch.cat([r[1] for r in rows]))
    torch.testing.assert_close(one_row, torch.cat(alone))
    torch.testing.assert_close(two_rows[0], torch.cat(alone[:2]))
    torch.testing.assert_close(two_rows[1, :10], torch.cat(alone[2:]))


@pytest.mark.parametrize("heads,kv", [(9, 3), (4, 4)])
def test_one_query_attention_equals_sdpa_with_grouped_heads_and_a_padding_mask(heads, kv):
    """A decoding step's attention on a CPU (lean._one_query_attention) against SDPA: grouped or not, with the
    left-padding mask a decoder keeps (a row may not attend to its first positions) and without."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    attn = type("Attn", (), {"scaling": 0.125})()
    q, k, v = torch.randn(5, heads, 1, 64), torch.randn(5, kv, 11, 64), torch.randn(5, kv, 11, 64)
    allowed = torch.ones(5, 1, 1, 11, dtype=torch.bool)
    allowed[1, ..., :4] = allowed[3, ..., :1] = False
    for mask in (None, allowed):
        ours = lean._one_query_attention(attn, q, k, v, mask)
        theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.125, enable_gqa=heads != kv)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    masked = lean._one_query_attention(attn, q, k, v.clone().index_fill_(2, torch.arange(4), 1e6), allowed)
    assert masked[1].abs().max() < 1e3  # the masked positions' huge values never reach row 1
