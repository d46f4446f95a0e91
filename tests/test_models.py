"""The capability table (``families.FAMILIES``) and gradient checkpointing.

Per family, on a tiny random model of each: igpt's own ways to logits (SFT's LM head on response positions,
padded and packed, PPO's response log-probs) give what the model's own ``model(...).logits`` gives, scaled
or soft-capped logits included. With gradient checkpointing, losses and gradients equal those without, on
the lean Llama forward and on transformers' (Qwen2, GPT-NeoX), with and without LoRA and under dropout; and
the stages run with ``--gradient-checkpointing`` and say which forward runs."""
from __future__ import annotations


import pytest
import torch

from conftest import TINY_CONFIG, arithmetic_demos, igpt, write_jsonl
from grads import assert_same_grads
from instructgpt_cli import batches
from instructgpt_cli import rewards
from instructgpt_cli import forward
from instructgpt_cli import families
from instructgpt_cli import models
from instructgpt_cli.batches import Example, IGNORE_INDEX, collate, collate_packed
from instructgpt_cli.losses import sft_loss_sum
from instructgpt_cli.forward import choose

VOCAB = 96
# what a tiny model of a family needs beyond the common fields; the logit transforms far from 1 (Cohere's
# default 0.0625, Granite's 1, Gemma 2's cap of 30 that random logits never reach), so leaving one out shows
SPECIAL = {"gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=128),
           "granite": dict(logits_scaling=4.0), "granitemoe": dict(logits_scaling=4.0, num_local_experts=2,
                                                                   num_experts_per_tok=1),
           "cohere": dict(logit_scale=0.25), "cohere2": dict(logit_scale=0.25),
           "gemma2": dict(final_logit_softcapping=0.5), "gemma3_text": dict(final_logit_softcapping=0.5)}


def tiny_family(model_type: str, kind: str = "causal", **extra):
    """A random 2-layer model of ``model_type`` (width 64, logits of order 1: init std 0.2)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    fields = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=128, initializer_range=0.2,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2, num_labels=1)
    config = AutoConfig.for_model(model_type, **{**fields, **SPECIAL.get(model_type, {}), **extra})
    cls = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
    torch.manual_seed(0)
    return cls.from_config(config)


def demo_examples() -> list[Example]:
    """Three sequences of 9, 14 and 6 tokens, prompts of 4, 6 and 2 masked."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for length, prompt in ((9, 4), (14, 6), (6, 2)):
        ids = torch.randint(3, VOCAB, (length,), generator=gen).tolist()
        out.append(Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return out


def own_loss(model, examples: list[Example]) -> torch.Tensor:
    """Summed response-token cross-entropy from the model's own logits, one sequence at a time."""
    return sum(sft_loss_sum(model(input_ids=torch.tensor([e.input_ids])).logits, torch.tensor([e.labels]))[0]
               for e in examples)


def test_every_family_of_the_table_is_a_transformers_model_type():
    from transformers import CONFIG_MAPPING

    assert set(families.FAMILIES) <= set(CONFIG_MAPPING.keys())
    assert {"llama", "granite", "cohere", "gemma2", "qwen2"} <= set(families.FAMILIES)
    assert [name for name, fam in families.FAMILIES.items() if fam.lean] == ["llama"]
    assert all(fam.packed for fam in families.FAMILIES.values() if fam.split)  # split families are plain Llama-likes


@pytest.mark.parametrize("model_type", sorted(families.FAMILIES))
def test_igpt_logits_equal_the_models_own_in_every_family(model_type):
    model = tiny_family(model_type).eval()
    transform = families.logit_transform(model)
    assert transform is not None
    examples = demo_examples()
    with torch.no_grad():
        want = own_loss(model, examples)
        padded, n = choose(model).response_loss_sum(model, collate(examples, 0))
        torch.testing.assert_close(padded, want, rtol=1e-5, atol=1e-5)
        assert int(n) == 5 + 8 + 4
        if families.supports_packing(model):  # what the table claims: packed rows attend within each sequence
            torch.testing.assert_close(choose(model).response_loss_sum(model, collate_packed(examples))[0], want, rtol=1e-5, atol=1e-5)

        # PPO's log-probs at temperature 0.7 of a left-padded batch
        gen = torch.Generator().manual_seed(2)
        qr = torch.randint(3, VOCAB, (3, 12), generator=gen)
        mask = torch.ones_like(qr)
        mask[0, :3], mask[1, 10:] = 0, 0
        logprobs, _ = forward.choose(model).response_logprobs(model, qr, mask, 5, 0.7)
        logits = model(input_ids=qr, attention_mask=mask, position_ids=batches.position_ids(mask)).logits
        want_lp = torch.log_softmax(logits[:, 4:-1].float() / 0.7, -1).gather(-1, qr[:, 5:, None])[..., 0]
        real = mask[:, 5:].bool()
        torch.testing.assert_close(logprobs[real], want_lp[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type, field, value, expected", [
    ("granite", "logits_scaling", 4.0, families.LogitTransform(divide=4.0)),
    ("cohere", "logit_scale", 0.25, families.LogitTransform(multiply=0.25)),
    ("gemma2", "final_logit_softcapping", 0.5, families.LogitTransform(softcap=0.5)),
    ("gemma2", "final_logit_softcapping", None, families.LogitTransform()),
    ("qwen2", "logit_scale", 3.0, families.LogitTransform()),  # a field its family does not read
])
def test_logit_transform_reads_the_familys_own_field(model_type, field, value, expected):
    model = tiny_family(model_type, **{field: value})
    assert families.logit_transform(model) == expected
    x = torch.tensor([-3.0, 0.0, 0.2, 3.0])
    by_hand = {"divide": x / 4, "multiply": x * 0.25, "softcap": torch.tanh(x / 0.5) * 0.5}
    want = next((by_hand[k] for k in ("divide", "multiply", "softcap") if getattr(expected, k) not in (1.0, 0.0)), x)
    torch.testing.assert_close(families.logit_transform(model)(x), want)


def test_a_family_not_in_the_table_takes_the_models_own_forward(monkeypatch):
    """igpt does not know what such a family does to its logits: SFT's loss comes from ``model(...)``."""
    model = tiny_family("granite").eval()
    monkeypatch.delitem(families.FAMILIES, "granite")
    assert families.family(model) is None and families.logit_transform(model) is None
    assert not families.supports_packing(model) and not families.supports_sharing(model)
    with torch.no_grad():
        torch.testing.assert_close(choose(model).response_loss_sum(model, collate(demo_examples(), 0))[0], own_loss(model, demo_examples()),
                                   rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- gradient checkpointing


def build(model_type: str, kind: str, checkpointed: bool, lora: bool):
    """A tiny model of ``model_type`` in training with dropout 0.1, checkpointed or not, with LoRA on its top
    layer (adapters initialised to change the output): the same weights either way."""
    from instructgpt_cli.config import LoraConfig

    if model_type == "llama":
        tok = models.tiny_tokenizer()
        model = models.tiny_model(tok, 0, dropout=0.1, kind=kind)
    else:
        model = tiny_family(model_type, kind, attention_dropout=0.1, hidden_dropout=0.1)
    if checkpointed:
        models.enable_checkpointing(model, model_type)
    if lora:
        torch.manual_seed(1)
        model = models.apply_lora(model, LoraConfig(enabled=True, r=4, layers=1),
                                  task_type="CAUSAL_LM" if kind == "causal" else "SEQ_CLS")
        gen = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model.train()


def layer_calls(model) -> list[int]:
    """A live count of calls of each decoder layer's MLP (a checkpointed layer is run again in the backward,
    up to its last saved tensor, inside the MLP: counted as the MLP is entered)."""
    stack = families.backbone(model)
    layers = stack.layers if hasattr(stack, "layers") else stack.h
    counts = [0] * len(layers)
    for i, layer in enumerate(layers):
        layer.mlp.register_forward_pre_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


def loss_grads_and_calls(model, kind: str, packed: bool):
    """(losses, gradients, MLP calls per layer) of one forward and backward, dropout seeded: SFT's loss or a
    reward model's scores (train-rm), and PPO's log-probs or values."""
    counts = layer_calls(model)
    gen = torch.Generator().manual_seed(2)
    qr = torch.randint(3, VOCAB, (3, 12), generator=gen)
    mask = torch.ones_like(qr)
    mask[0, :3], mask[1, 10:] = 0, 0
    torch.manual_seed(7)
    if kind == "causal":
        examples = demo_examples()
        first = choose(model).response_loss_sum(model, collate_packed(examples) if packed else collate(examples, 0))[0]
        second = forward.choose(model).response_logprobs(model, qr, mask, 5, 0.7)[0][mask[:, 5:].bool()]
    else:
        first = rewards.reward_scores(model, qr, mask)
        second = forward.choose(model).token_values(model, qr, mask, 5)[mask[:, 5:].bool()]
    (first.sum() + second.square().sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return (first.detach(), second.detach()), grads, list(counts)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("model_type, kind, packed", [
    ("llama", "causal", True), ("llama", "causal", False), ("llama", "reward", False),
    ("qwen2", "causal", True), ("qwen2", "reward", False), ("gpt_neox", "causal", False)])
def test_gradient_checkpointing_gives_the_same_losses_and_gradients(model_type, kind, packed, lora):
    plain = build(model_type, kind, False, lora)
    checkpointed = build(model_type, kind, True, lora)
    assert families.checkpointing(checkpointed) and not families.checkpointing(plain)
    assert families.runs_lean(checkpointed) == families.runs_lean(plain) == (model_type == "llama")
    out, grads, calls = loss_grads_and_calls(plain, kind, packed)
    out_c, grads_c, calls_c = loss_grads_and_calls(checkpointed, kind, packed)
    for a, b in zip(out_c, out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert grads and any("lora" in n for n in grads) == lora
    assert_same_grads(grads_c, grads)
    # every layer that trains runs its forward again in the backward, on the lean path too; with LoRA on the top
    # layer only, the one below has nothing to recompute (no input made to require grad)
    assert calls == [2, 2]
    assert calls_c == ([2, 4] if lora else [4, 4])
    torch.manual_seed(7)  # dropout did something: without it the numbers differ
    assert not torch.allclose(loss_grads_and_calls(plain.eval(), kind, packed)[0][0], out[0])


def test_checkpointing_a_model_without_it_is_bad_input():
    from instructgpt_cli.errors import BadInput

    model = models.tiny_model(models.tiny_tokenizer(), 0)
    model.supports_gradient_checkpointing = False
    with pytest.raises(BadInput, match="model.gradient_checkpointing"):
        models.enable_checkpointing(model, "tiny")


def test_stages_run_with_gradient_checkpointing_and_say_which_forward_runs(tmp_path):
    from rule_rm import make_rule_rm
    from safetensors.torch import load_file

    demos = write_jsonl(tmp_path / "demos.jsonl", arithmetic_demos(16))
    run = tmp_path / "run"
    sft = igpt("sft", "--config", TINY_CONFIG, "--data", demos, "--run-dir", run, "--max-steps", "3",
               "--gradient-checkpointing", "--dropout", "0.1")
    assert sft.exit_code == 0, sft.output
    assert "igpt lean Llama (gradient checkpointing)" in " ".join(sft.stderr.split())
    assert "gradient_checkpointing: true" in (run / "sft" / "config.yaml").read_text()
    weights = load_file(str(run / "sft" / "final" / "model.safetensors"))
    start = models.tiny_model(models.tiny_tokenizer(), 0).state_dict()
    assert not torch.equal(weights["model.layers.0.mlp.up_proj.weight"], start["model.layers.0.mlp.up_proj.weight"])

    rankings = write_jsonl(tmp_path / "rankings.jsonl", [
        {"prompt": f"Say {i}.", "chosen": f"yes {i} banana", "rejected": f"no {i}"} for i in range(8)])
    rm = igpt("train-rm", "--config", TINY_CONFIG, "--rankings", rankings, "--run-dir", run, "--max-steps", "2",
              "--gradient-checkpointing")
    assert rm.exit_code == 0, rm.output
    assert "transformers LlamaForSequenceClassification (gradient checkpointing)" in " ".join(rm.stderr.split())

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"What is {i} plus 2?"} for i in range(8)])
    rule_rm = make_rule_rm(tmp_path / "rule_rm", models.tiny_tokenizer(), "e")
    ppo = igpt("ppo", "--config", TINY_CONFIG, "--prompts", prompts, "--rm", rule_rm, "--run-dir", run,
               "--max-steps", "1", "--max-new-tokens", "8", "--gradient-checkpointing")
    assert ppo.exit_code == 0, ppo.output
    banner = " ".join(ppo.stderr.split())
    assert ("policy igpt lean Llama (gradient checkpointing), value igpt lean Llama (gradient checkpointing)"
            in banner), banner
    assert (run / "ppo" / "final" / "policy" / "model.safetensors").is_file()

    plain = igpt("sft", "--config", TINY_CONFIG, "--data", demos, "--run-dir", tmp_path / "plain", "--max-steps", "1")
    assert plain.exit_code == 0 and "forward igpt lean Llama" in " ".join(plain.stderr.split())
    assert "checkpointing" not in plain.stderr
