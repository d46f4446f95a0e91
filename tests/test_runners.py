"""A runner (``instructgpt_cli.runners``) runs its model on the path chosen when it was built: the lean and the
transformers path agree on log-probs, values and scores; a model the lean forward does not admit runs
transformers'; nothing is chosen per call; adapters disabled give the base model's numbers; greedy generation is
the greedy loop written by hand; on a CPU the lean decoder takes the few-row products itself."""
from __future__ import annotations

import pytest
import torch

from instructgpt_cli import forward, lean, rollout
from instructgpt_cli.batches import pad_left, pad_right
from instructgpt_cli.config import LoraConfig
from instructgpt_cli.models import apply_lora, tiny_config, tiny_model, tiny_tokenizer
from instructgpt_cli.rewards import Layout, ranking_scores, score_sequences
from instructgpt_cli.runners import RolloutEngine, Runner

CPU = torch.device("cpu")


@pytest.fixture
def tok():
    return tiny_tokenizer()


def batch() -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """query + response ids (3, 14) with left-padded queries and a row that ends early, mask, context length 6,
    and each response's length."""
    ids = torch.randint(5, 60, (3, 14), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 14, dtype=torch.long)
    mask[0, :2] = 0
    mask[2, :4] = 0
    mask[1, 11:] = 0
    return ids, mask, 6, mask[:, 6:].sum(1)


def transformers_runner(monkeypatch, model, **kwargs) -> Runner:
    """A runner of ``model`` built while the lean forward admits no model: it keeps transformers' path after."""
    with monkeypatch.context() as m:
        m.setattr(forward, "runs_lean", lambda model: False)
        return Runner(model, CPU, **kwargs)


def adapted(model):
    """``model`` with LoRA adapters on its top layer that change its output."""
    model = apply_lora(model, LoraConfig(enabled=True, r=4, layers=1))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model


def test_lean_and_transformers_runners_agree(tok, monkeypatch):
    policy, value = tiny_model(tok, 0), tiny_model(tok, 1, kind="reward")
    lean_policy, lean_value = Runner(policy, CPU), Runner(value, CPU)
    hf_policy, hf_value = transformers_runner(monkeypatch, policy), transformers_runner(monkeypatch, value)
    assert lean_policy.path is forward.LEAN and hf_policy.path is forward.TRANSFORMERS
    assert lean_policy.name == "igpt lean Llama" and hf_policy.name == "transformers LlamaForCausalLM"
    ids, mask, context, lengths = batch()
    real = mask[:, context:].bool()
    with torch.no_grad():
        for a, b in ((lean_policy, hf_policy), (lean_value, hf_value)):
            assert a.model is b.model  # one model, two paths
        (lp, ent), (hlp, hent) = (r.logprobs(ids, mask, context, 0.7, entropy=True) for r in (lean_policy, hf_policy))
        outputs = [(lp, hlp), (ent, hent),
                   *[tuple(r.values(ids, mask, context) for r in (lean_value, hf_value))],
                   *[tuple(r.log_softmax(ids, mask, context, 0.7) for r in (lean_policy, hf_policy))]]
        for a, b in outputs:
            torch.testing.assert_close(a[real], b[real], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lean_value.scores(ids, mask, context, lengths),
                                   hf_value.scores(ids, mask, context, lengths), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lean_policy.trunk(1, ids, mask)[mask.bool()],
                                   hf_policy.trunk(1, ids, mask)[mask.bool()], rtol=1e-5, atol=1e-6)
        blocks, _ = pad_right([list(range(5, 30)), list(range(40, 49))], tok.pad_token_id)
        lm_mask = (blocks != tok.pad_token_id).long()
        (a, n), (b, m) = lean_policy.lm_loss_sum(blocks, lm_mask), hf_policy.lm_loss_sum(blocks, lm_mask)
    torch.testing.assert_close(a, b)
    assert int(n) == int(m) == 24 + 8


def test_a_model_the_lean_forward_does_not_admit_runs_transformers_and_nothing_is_chosen_per_call(tok, monkeypatch):
    from transformers import LlamaForCausalLM

    eager = LlamaForCausalLM._from_config(tiny_config(tok), attn_implementation="eager")
    assert Runner(eager, CPU).path is forward.TRANSFORMERS
    assert Runner(eager, CPU).name == "transformers LlamaForCausalLM"
    runners = [Runner(tiny_model(tok, 0), CPU), Runner(eager, CPU)]
    assert [r.path for r in runners] == [forward.LEAN, forward.TRANSFORMERS]
    ids, mask, context, lengths = batch()

    def chosen_again(model):
        raise AssertionError("the path was chosen again after the runner was built")

    monkeypatch.setattr(forward, "runs_lean", chosen_again)
    with torch.no_grad():
        for r in runners:
            r.logprobs(ids, mask, context, 1.0)
            r.lm_loss_sum(ids, torch.ones_like(mask))
            r.next_token_logits(ids[:, :context], mask[:, :context])
            r.generate(tok, [[10, 11, 12], [13, 14]], 3, 1.0, 2)


def test_adapters_disabled_give_the_base_models_logprobs_through_the_same_module(tok):
    base = Runner(tiny_model(tok, 0), CPU)
    runner = Runner(adapted(tiny_model(tok, 0)), CPU)  # the same base weights, adapters on top
    reference = runner.adapters_disabled()
    assert reference.model is runner.model and reference._module is runner._module
    ids, mask, context, _ = batch()
    real = mask[:, context:].bool()
    with torch.no_grad():
        want = base.logprobs(ids, mask, context, 1.0)[0]
        torch.testing.assert_close(reference.logprobs(ids, mask, context, 1.0)[0][real], want[real])
        adapted_logprobs = runner.logprobs(ids, mask, context, 1.0)[0]  # the adapters are on again after
    assert not torch.allclose(adapted_logprobs[real], want[real])
    with pytest.raises(ValueError, match="no adapters"):
        base.adapters_disabled()


def greedy_by_hand(model, query: list[int], max_new: int, eos: int) -> list[int]:
    """Argmax of the model's own forward over the whole sequence, a token at a time, up to EOS."""
    out: list[int] = []
    with torch.no_grad():
        while len(out) < max_new:
            token = int(model(input_ids=torch.tensor([query + out])).logits[0, -1].argmax())
            out.append(token)
            if token == eos:
                break
    return out


@pytest.mark.parametrize("family", ["lean", "transformers"])
def test_generate_at_temperature_0_is_the_greedy_loop_by_hand(tok, monkeypatch, family):
    model = tiny_model(tok, 0).eval()
    runner = Runner.for_eval(model) if family == "lean" else transformers_runner(monkeypatch, model)
    queries = [list(range(10, 13 + 3 * i)) for i in range(4)]  # lengths 3..12: left padding in each batch
    eos = greedy_by_hand(model, queries[1], 5, -1)[2]  # a token one query reaches: that row stops there
    tokenizer = type("Ids", (), {"pad_token_id": tok.pad_token_id, "eos_token_id": eos})()
    got = runner.generate(tokenizer, queries, 10, 0.0, batch_size=2)
    assert got == [greedy_by_hand(model, q, 10, eos) for q in queries]
    assert got[1][-1] == eos and len(got[1]) <= 3


def test_a_runner_is_a_rollout_engine_that_samples_with_the_live_weights(tok):
    model = tiny_model(tok, 0)
    runner = Runner(model, CPU)
    assert isinstance(runner, RolloutEngine)
    runner.load_weights(runner)  # in process: nothing to load
    with pytest.raises(ValueError):
        runner.load_weights(Runner(tiny_model(tok, 1), CPU))
    queries = [[10, 11, 12], [20, 21]]
    before = runner.generate(tok, queries, 4, 0.0, 2)
    with torch.no_grad():
        model.model.norm.weight.zero_()  # an update: every logit 0, argmax token 0
    runner.load_weights(runner)
    assert runner.generate(tok, queries, 4, 0.0, 2) == [[0] * 4] * 2 != before
    assert model.training  # generate puts the model back in the mode it found it in


def medium(eager: bool = False):
    """A Llama whose LM head has 2^22 weights: on a CPU its decoding steps take the few-row product."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=16384, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, pad_token_id=3,
                         eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(config, attn_implementation="eager") if eager else LlamaForCausalLM(config)
    return model.eval()


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_on_a_cpu_the_lean_decoder_takes_its_products_itself_and_transformers_layers_are_swapped(
        monkeypatch, one_thread):
    model = medium()
    few = rollout.decoding_products(model, 2, 1)
    assert set(few) == {model.lm_head}
    ids, mask = pad_left([[5, 6, 7, 8], [9, 10]], 3)
    with torch.no_grad():
        plain = lean.Decoder(model, ids, mask, 2)
        direct = lean.Decoder(model, ids, mask, 2, few)
        step = torch.tensor([4, 4])
        logits = [(plain.start(), direct.start()), (plain.step(step), direct.step(step))]
        with rollout.swapped_forwards(few):  # the same products as the layer's swapped forward computes
            swapped = lean.Decoder(model, ids, mask, 2)
            swapped_logits = [swapped.start(), swapped.step(step)]
    for (a, b), c in zip(logits, swapped_logits):
        assert torch.equal(b, c)
    assert not torch.equal(*logits[1])  # a step's two rows: (W @ x.T).T, other bits than torch's linear

    calls, swaps, packed = [], [], []
    real_product, real_swap, real_call = rollout.few_row_product, rollout.swapped_forwards, lean.PackedProduct.__call__
    monkeypatch.setattr(rollout, "few_row_product", lambda *a, **k: calls.append(1) or real_product(*a, **k))
    monkeypatch.setattr(rollout, "swapped_forwards", lambda p: swaps.append(set(p)) or real_swap(p))
    monkeypatch.setattr(lean.PackedProduct, "__call__", lambda self, x: packed.append(x.shape) or real_call(self, x))
    tokenizer = type("Ids", (), {"pad_token_id": 3, "eos_token_id": 2})()
    two = [[5, 6, 7, 8], [9, 10]]
    Runner.for_eval(model).generate(tokenizer, two, 3, 1.0, 2)
    assert calls and not swaps  # the lean decoder computed them; no layer had its forward swapped
    eager = medium(eager=True)
    Runner.for_eval(eager).generate(tokenizer, two, 3, 1.0, 2)
    assert swaps == [{eager.lm_head}] and not any("forward" in vars(m) for m in eager.modules())  # swapped back
    lora = adapted(medium())
    Runner.for_eval(lora).generate(tokenizer, two, 3, 1.0, 2)
    assert lora.base_model.model.lm_head in swaps[-1]  # peft's adapter layers call their base layers: swapped too
    if lean.can_pack(model.lm_head.weight):  # a batch of PACK_ROWS or more: packed products, steps only
        four = two + [[11, 12], [13, 14, 15]]
        torch.manual_seed(0)
        fast = Runner.for_eval(model).generate(tokenizer, four, 3, 1.0, 4)
        assert {shape[0] for shape in packed} == {4, 16}  # the 4 rows of a step; the 4 x 4 prompt tokens: linear
        attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
        fused = rollout.decoding_products(model, 4, 1, fuse=True)  # q, k, v as one product; gate and up as one
        assert fused[attn.q_proj] is fused[attn.k_proj] is fused[attn.v_proj] and fused[mlp.gate_proj] is \
            fused[mlp.up_proj] and fused[mlp.down_proj] is not fused[mlp.up_proj]
        real_products = rollout.decoding_products
        with monkeypatch.context() as m:  # the same tokens as each layer's own packed product, and as torch's linear
            m.setattr(rollout, "decoding_products", lambda model, rows, threads, fuse=False:
                      real_products(model, rows, threads))
            torch.manual_seed(0)
            assert Runner.for_eval(model).generate(tokenizer, four, 3, 1.0, 4) == fast
            m.setattr(rollout, "PACK_ROWS", 10 ** 6)
            torch.manual_seed(0)
            assert Runner.for_eval(model).generate(tokenizer, four, 3, 1.0, 4) == fast


def test_scores_of_rankings_and_sequences_are_the_reward_functions_run_through_the_module(tok):
    rm, pad = tiny_model(tok, 2, kind="reward").eval(), tok.pad_token_id
    runner = Runner(rm, CPU)
    rankings = [[[7, 8, 9, 10, 11], [7, 8, 9, 40, 41, 42]], [[20, 21, 22, 23], [20, 21, 50]]]
    with torch.no_grad():
        for layout in (Layout(), Layout(shared=True), Layout(packed=True)):
            assert torch.equal(runner.ranking_scores(rankings, pad, layout),
                               ranking_scores(rm, rankings, pad, CPU, layout))
    seqs = [s for r in rankings for s in r]
    assert torch.equal(runner.sequence_scores(seqs, pad, 3), score_sequences(rm, seqs, pad, 3))
