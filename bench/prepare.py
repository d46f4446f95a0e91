"""Setup steps of the benchmark: the machine's fp32 matmul peak (calibration), and the models and data
both sides train on (random weights saved once, synthetic JSONL of exact token lengths).
"""
from __future__ import annotations

import json
import random
import time

from common import DATA, MODELS, base_tokenizer, exact_text, llama_config, model_dir, word_pool, write_json

# Exact token lengths of the synthetic data (prompt lengths include the chat template).
RM_PROMPT, RM_RESPONSE = 12, 12          # each ranked sequence: 24 tokens
SFT_PROMPT, SFT_RESPONSE = 32, 96        # each demonstration: 128 tokens
PPO_PROMPT = 16                          # each query: 16 tokens
RM_KS = (2, 4, 9)


def calibrate(threads: int, seconds: float = 1.5) -> dict:
    """fp32 GFLOP/s of torch.mm at a few shapes (square, and the 135M model's own); the best is the peak. Also
    the read bandwidth (GB/s) that the sampling groups' bound uses."""
    import torch

    torch.manual_seed(0)
    shapes = [(2048, 2048, 2048), (1024, 1024, 1024), (512, 576, 1536), (512, 1536, 576), (4096, 576, 576)]
    out = {}
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        for _ in range(3):
            torch.mm(a, b)
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            torch.mm(a, b)
            reps += 1
        dt = time.perf_counter() - t0
        out[f"{m}x{k}x{n}"] = 2 * m * k * n * reps / dt / 1e9
    from sampling import read_bandwidth_gbs  # the sampling groups' bound: big.sum() of 512 MB, best of 5

    return {"threads": threads, "gflops_by_shape": out, "peak_gflops": max(out.values()),
            "read_gbs": read_bandwidth_gbs("cpu")}


def prepare_models(shape: str) -> dict:
    """policy/: a random causal LM (the 'SFT model'); reward/: the same backbone with a fresh scalar head."""
    import torch
    from transformers import AutoModelForSequenceClassification, LlamaForCausalLM

    tok = base_tokenizer(shape)
    pdir, rdir = model_dir(shape, "policy"), model_dir(shape, "reward")
    if (pdir / "config.json").exists() and (rdir / "config.json").exists():
        return {"shape": shape, "reused": True}
    torch.manual_seed(1234)
    model = LlamaForCausalLM(llama_config(shape, tok))
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(pdir)
    tok.save_pretrained(pdir)
    torch.manual_seed(4321)
    rm = AutoModelForSequenceClassification.from_pretrained(pdir, num_labels=1, dtype=torch.float32)
    rm.config.pad_token_id = tok.pad_token_id
    rm.save_pretrained(rdir)
    tok.save_pretrained(rdir)
    n = sum(p.numel() for p in model.parameters())
    return {"shape": shape, "parameters": n}


def prepare_data(shape: str) -> dict:
    """Synthetic JSONL files whose tokenisation through igpt's own functions has exact lengths."""
    from common import load_tokenizer_for
    from instructgpt_cli.batches import encode_response, render_prompt

    tok = load_tokenizer_for(shape)
    pool = word_pool(tok, shape)
    rng = random.Random(7)
    enc_prompt = lambda t: render_prompt(tok, [{"role": "user", "content": t}])  # noqa: E731
    enc_resp = lambda t: encode_response(tok, t)  # noqa: E731
    d = DATA / shape
    d.mkdir(parents=True, exist_ok=True)
    made = {}
    # the chat template's own tokens come on top of the content (a few for SmolLM2, ~20 bytes for tiny)
    overhead = len(enc_prompt("")) + 4
    rm_prompt, sft_prompt, ppo_prompt = max(RM_PROMPT, overhead), max(SFT_PROMPT, overhead), max(PPO_PROMPT, overhead)
    # rankings and fixed-length demos for both shapes (the tiny ones serve `run.py --smoke`)
    for k in RM_KS:
        lines = []
        for _ in range(16):
            ranks = list(range(1, k + 1))
            rng.shuffle(ranks)
            lines.append({"prompt": exact_text(rng, pool, rm_prompt, enc_prompt),
                          "responses": [exact_text(rng, pool, RM_RESPONSE, enc_resp) for _ in range(k)],
                          "ranks": ranks})
        (d / f"rankings_k{k}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        made[f"rankings_k{k}"] = len(lines)
    demos = [{"prompt": exact_text(rng, pool, sft_prompt, enc_prompt),
              "response": exact_text(rng, pool, SFT_RESPONSE, enc_resp)} for _ in range(32)]
    (d / "demos_fixed.jsonl").write_text("".join(json.dumps(x) + "\n" for x in demos))
    made["demos_fixed"] = len(demos)
    prompts = [{"prompt": exact_text(rng, pool, ppo_prompt, enc_prompt)} for _ in range(64)]
    (d / "prompts.jsonl").write_text("".join(json.dumps(x) + "\n" for x in prompts))
    made["prompts"] = len(prompts)
    write_json(d / "lengths.json", {"rm_prompt": rm_prompt, "rm_response": RM_RESPONSE, "sft_prompt": sft_prompt,
                                    "sft_response": SFT_RESPONSE, "ppo_prompt": ppo_prompt})
    return made


def prepare(spec: dict) -> dict:
    out = {}
    for shape in spec.get("shapes", ("tiny", "135m")):
        out[shape] = {"models": prepare_models(shape), "data": prepare_data(shape)}
    out["models_dir"] = str(MODELS)
    return out
