"""Hand-built models for PPO, eval and compare tests.

``make_rule_rm``: a real LlamaForSequenceClassification directory whose score rises with the share of one
target token in the sequence (and falls with the share of an optional ``minus`` token). Layer 0 attends
uniformly (q = k = 0) and copies a 'is target' feature (+1 target, -1 minus) into the residual stream;
everything else is the identity.

``make_constant_lm``: a LlamaForCausalLM directory whose greedy choice is always one token."""
from pathlib import Path

import torch


def zero_but_norms(model) -> None:
    """Every weight 0 and every norm's scale 1: a model whose outputs come only from what is set by hand."""
    for name, p in model.named_parameters():
        p.fill_(1.0 if "norm" in name else 0.0)


def make_rule_rm(path: Path, tokenizer, target: str, scale: float = 4.0, minus: str | None = None) -> Path:
    from transformers import LlamaForSequenceClassification

    from instructgpt_cli.models import tiny_config

    target_id = tokenizer.convert_tokens_to_ids(target)
    model = LlamaForSequenceClassification(tiny_config(tokenizer))
    with torch.no_grad():
        zero_but_norms(model)
        emb = model.model.embed_tokens.weight
        emb[:, 0] = 1.0  # a constant feature keeps every RMS norm finite
        emb[target_id, 1] = 1.0  # the 'is target' feature
        if minus is not None:
            emb[tokenizer.convert_tokens_to_ids(minus), 1] = -1.0  # same norm as a target, opposite sign
        attn = model.model.layers[0].self_attn
        attn.v_proj.weight[0, 1] = 1.0  # kv head 0, dim 0 <- 'is target'
        attn.o_proj.weight[2, 0] = 1.0  # residual dim 2 <- uniform average of it = share of target tokens
        model.score.weight[0, 2] = scale
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_constant_lm(path: Path, tokenizer, token: str) -> Path:
    """A causal LM that always prefers ``token`` (logit 3x any other's after every input): greedy decoding
    repeats it. Attention and MLPs are zero; the tied embedding's constant feature drives the head."""
    from transformers import LlamaForCausalLM

    from instructgpt_cli.models import tiny_config

    model = LlamaForCausalLM(tiny_config(tokenizer))
    with torch.no_grad():
        zero_but_norms(model)
        emb = model.model.embed_tokens.weight  # tied to the LM head
        emb[:, 0] = 1.0
        emb[tokenizer.convert_tokens_to_ids(token), 0] = 3.0
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def sft_with_rule_rm(t: Path, sft_dir: Path, rm_dir: Path, demos: int, steps: int) -> None:
    """The world most PPO, eval and frontier tests start from: a tiny SFT run in ``sft_dir`` (``steps`` steps on
    ``demos`` arithmetic demonstrations written to ``t``/demos.jsonl) and the rule reward model ('e' share) at
    ``rm_dir``."""
    from conftest import TINY_CONFIG, arithmetic_demos, igpt, write_jsonl
    from instructgpt_cli.models import tiny_tokenizer

    write_jsonl(t / "demos.jsonl", arithmetic_demos(demos))
    result = igpt("sft", "--config", TINY_CONFIG, "--data", t / "demos.jsonl", "--run-dir", sft_dir,
                  "--max-steps", str(steps))
    assert result.exit_code == 0, result.output
    make_rule_rm(rm_dir, tiny_tokenizer(), "e")
