"""A hand-built reward model for PPO tests: a real LlamaForSequenceClassification directory whose score
rises with the share of one target token in the sequence. Layer 0 attends uniformly (q = k = 0) and
copies a 'is target' feature into the residual stream; everything else is the identity."""
from pathlib import Path

import torch


def make_rule_rm(path: Path, tokenizer, target: str, scale: float = 4.0) -> Path:
    from transformers import LlamaForSequenceClassification

    from instructgpt_cli.models import tiny_config

    target_id = tokenizer.convert_tokens_to_ids(target)
    model = LlamaForSequenceClassification(tiny_config(tokenizer))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
        emb = model.model.embed_tokens.weight
        emb[:, 0] = 1.0  # a constant feature keeps every RMS norm finite
        emb[target_id, 1] = 1.0  # the 'is target' feature
        attn = model.model.layers[0].self_attn
        attn.v_proj.weight[0, 1] = 1.0  # kv head 0, dim 0 <- 'is target'
        attn.o_proj.weight[2, 0] = 1.0  # residual dim 2 <- uniform average of it = share of target tokens
        model.score.weight[0, 2] = scale
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
