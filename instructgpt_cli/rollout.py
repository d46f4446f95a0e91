"""Generation: left-padded batched sampling with the KV cache, truncation at EOS, decoding."""
from __future__ import annotations

from typing import Any

import torch

from .data import pad_left


def generation_config(tokenizer: Any, max_new_tokens: int, temperature: float) -> Any:
    """Pure temperature sampling (no top-k / top-p, whatever the model's defaults say), so the
    distribution sampled from is exactly softmax(logits / T) — the one PPO scores."""
    from transformers import GenerationConfig

    common = dict(max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, use_cache=True)
    if temperature == 0:
        return GenerationConfig(do_sample=False, **common)
    return GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, **common)


def truncate_at_eos(tokens: list[int], eos_id: int) -> list[int]:
    """Tokens up to and including the first EOS (everything after it is not part of the response)."""
    return tokens[:tokens.index(eos_id) + 1] if eos_id in tokens else tokens


@torch.no_grad()
def generate(model: Any, tokenizer: Any, queries: list[list[int]], max_new_tokens: int, temperature: float,
             batch_size: int) -> list[list[int]]:
    """Sample one response per query (token lists, EOS included where the model stopped).

    Queries are left-padded so every row's new tokens start in the same column; transformers derives
    position ids from the attention mask, so padding does not shift positions.
    """
    device = next(model.parameters()).device
    config = generation_config(tokenizer, max_new_tokens, temperature)
    was_training = model.training
    model.eval()
    responses: list[list[int]] = []
    for start in range(0, len(queries), batch_size):
        ids, mask = pad_left(queries[start:start + batch_size], tokenizer.pad_token_id)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
        for row in out[:, ids.shape[1]:].tolist():
            tokens = truncate_at_eos(row, tokenizer.eos_token_id)
            responses.append([t for t in tokens if t != tokenizer.pad_token_id])
    model.train(was_training)
    return responses


def decode_response(tokenizer: Any, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


@torch.no_grad()
def score_sequences(model: Any, seqs: list[list[int]], pad_id: int, batch_size: int) -> torch.Tensor:
    """Normalised reward-model scores (N,) of token sequences (prompt + response + EOS), in batches."""
    from .data import pad_right
    from .models import reward_scores

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(seqs), batch_size):
        ids, mask = pad_right(seqs[start:start + batch_size], pad_id)
        out.append(reward_scores(model, ids.to(device), mask.to(device)).float().cpu())
    model.train(was_training)
    return torch.cat(out)
