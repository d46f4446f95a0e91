"""eval's KL to SFT and reward scores of one set of responses: the models' common lowest layers run once
(``families.shared_layers``, ``rollout.kl_and_scores``), with the numbers of three whole forwards."""
import copy

import pytest
import torch

import instructgpt_cli.rollout as rollout
from instructgpt_cli.config import LoraConfig
from instructgpt_cli.families import shared_layers
from instructgpt_cli.models import apply_lora, tiny_model, tiny_tokenizer
from instructgpt_cli.rollout import kl_and_scores, response_kl, score_responses
from instructgpt_cli.runners import Runner


def fine_tuned_above(base, kind: str = "causal", seed: int = 0):
    """A model whose lowest layer and embeddings are ``base``'s and whose top layer (and head) are its own:
    what LoRA on the top layer, merged, leaves of a fine-tuning from ``base``."""
    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=seed, kind=kind) if kind != "causal" else copy.deepcopy(base)
    stack, base_stack = model.model, base.model
    stack.embed_tokens.load_state_dict(base_stack.embed_tokens.state_dict())
    stack.layers[0].load_state_dict(base_stack.layers[0].state_dict())
    with torch.no_grad():
        for p in stack.layers[1].parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_models_fine_tuned_above_one_base_share_its_lower_layers_and_nothing_else():
    tok = tiny_tokenizer()
    base = tiny_model(tok, seed=1).eval()
    policy, rm = fine_tuned_above(base), fine_tuned_above(base, "reward", seed=2)
    assert shared_layers([policy, base, rm]) == 1  # layer 0 and the embeddings, not the top layer
    assert shared_layers([base, copy.deepcopy(base)]) == 1  # all equal: at most all but the top layer
    assert shared_layers([policy]) == 0  # nothing to share with
    assert shared_layers([base, tiny_model(tok, seed=3)]) == 0  # another model from its embeddings up
    # a peft model and its view with adapters disabled share modules, not the adapted layer's computation
    adapted = apply_lora(copy.deepcopy(base), LoraConfig(enabled=True, r=4, alpha=8, layers=2))
    assert shared_layers([adapted, adapted]) == 0  # the adapters are in both layers: nothing runs the same
    top_only = apply_lora(copy.deepcopy(base), LoraConfig(enabled=True, r=4, alpha=8, layers=1))
    assert shared_layers([top_only, base]) == 1


def test_kl_and_scores_with_a_shared_trunk_equal_whole_forwards(monkeypatch):
    tok = tiny_tokenizer()
    base = tiny_model(tok, seed=1).eval()
    policy, rm = fine_tuned_above(base), fine_tuned_above(base, "reward", seed=2)
    runners = [Runner.for_eval(m) for m in (policy, base, rm)]
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    queries = [enc("say e"), enc("a longer prompt here"), enc("go"), enc("x y z")]
    responses = [enc(" eee e") + [tok.eos_token_id], enc("xx"), enc("e") * 5, [tok.eos_token_id]]
    trunks = []
    real_trunk = Runner.trunk
    monkeypatch.setattr(Runner, "trunk", lambda self, *a: trunks.append(a[0]) or real_trunk(self, *a))
    kl, scores = kl_and_scores(*runners, tok, queries, responses, 1.0, 3)
    assert trunks == [1, 1]  # once per batch of 3 (the last one short), one layer
    monkeypatch.setattr(rollout, "shared_layers", lambda models: 0)  # three whole forwards
    whole_kl = response_kl(runners[0], runners[1], tok, queries, responses, 1.0, 3)
    whole_scores = score_responses(runners[2], tok, queries, responses, 3)
    assert trunks == [1, 1]
    assert torch.allclose(kl, whole_kl, atol=1e-6) and torch.allclose(scores, whole_scores, atol=1e-6)
    assert (kl > 0).all() and kl.shape == (4,) and scores.std() > 0  # a real KL, and scores that differ
    # no reward model: the KL alone, the same; and a model against itself: 0
    assert torch.allclose(kl_and_scores(runners[0], runners[1], None, tok, queries, responses, 1.0, 3)[0], whole_kl,
                          atol=1e-6)
    assert torch.allclose(response_kl(runners[1], runners[1], tok, queries, responses, 1.0, 2), torch.zeros(4))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        kl_and_scores(*runners, tok, queries, responses, 0.0, 3)
