"""The work each benchmark does, computed the same way for both sides: which examples each optimizer step
trains on (igpt's own data order, which the TRL side replays with a sequential sampler), how many tokens,
comparisons or episodes that is, and the model FLOPs of the step.

Every tokenisation goes through igpt's functions, so both sides train on identical token ids.
"""
from __future__ import annotations

from math import comb

from common import DATA, REPO, load_tokenizer_for, train_flops


def sft_examples(spec: dict):
    from instructgpt_cli.data import read_demos
    from instructgpt_cli.batches import tokenize_demos

    path = str(DATA / spec["shape"] / "demos_fixed.jsonl") if spec["data"] == "fixed" else str(REPO / "data" / "demos.jsonl")
    tok = load_tokenizer_for(spec["shape"])
    examples, _ = tokenize_demos(tok, read_demos(path), 1024)
    return path, tok, examples


def sft_plan(spec: dict) -> dict:
    from instructgpt_cli.batches import IGNORE_INDEX
    from instructgpt_cli.train import step_indices

    path, tok, examples = sft_examples(spec)
    total = spec["warmup"] + spec["steps"]
    steps = []
    for i in range(total):
        idx = step_indices(len(examples), i, spec["batch_size"], 0)  # igpt SFT: seed 0, val_fraction 0
        batch = [examples[j] for j in idx]
        lens = [len(e.input_ids) for e in batch]
        targets = sum(1 for e in batch for t in e.labels[1:] if t != IGNORE_INDEX)
        steps.append({"indices": idx, "tokens": sum(lens), "targets": targets, "max_len": max(lens),
                      "flops": train_flops(spec["shape"], lens, targets)})
    return {"data": path, "steps": steps, "total_steps": total, "tokenizer": tok, "examples": examples}


def rm_plan(spec: dict) -> dict:
    from instructgpt_cli.batches import common_prefix, tokenize_rankings
    from instructgpt_cli.data import read_rankings
    from instructgpt_cli.train import step_indices

    k, p = spec["k"], spec["prompts_per_step"]
    path = str(DATA / spec["shape"] / f"rankings_k{k}.jsonl")
    tok = load_tokenizer_for(spec["shape"])
    groups, _ = tokenize_rankings(tok, read_rankings(path), 1024)
    total = spec["warmup"] + spec["steps"]
    order = [step_indices(len(groups), i, p, 0) for i in range(total)]  # igpt train-rm: seed 0, val_fraction 0
    seq_len = len(groups[0].sequences[0])
    assert all(len(s) == seq_len for g in groups for s in g.sequences), "ranked sequences must have one length"
    n_cmp = p * comb(k, 2)
    # tokens igpt runs a step with each ranking's prompt once (share_prompts), and as K full sequences
    shared = [sum(len(s) for s in groups[j].sequences) - (k - 1) * common_prefix(groups[j].sequences)
              for step in order for j in step]
    return {"data": path, "groups": groups, "order": order, "total_steps": total, "tokenizer": tok,
            "seq_len": seq_len, "comparisons_per_step": n_cmp, "igpt_sequences_per_step": p * k,
            "igpt_shared_tokens_per_step": sum(shared) / len(order), "full_tokens_per_step": p * k * seq_len,
            "trl_sequences_per_step": 2 * n_cmp,
            "flops_per_step": train_flops(spec["shape"], [seq_len] * (p * k), 0),
            "trl_flops_per_step": train_flops(spec["shape"], [seq_len] * (2 * n_cmp), 0)}


def ppo_plan(spec: dict) -> dict:
    return {"total_steps": spec["warmup"] + spec["steps"],
            "episodes": spec["rollout_batch"] * (spec["warmup"] + spec["steps"])}
