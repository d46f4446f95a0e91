"""One watch point's scoring (``ppo --watch``), before and now, on a finished `make gold` run's models: the proxy's
scores and the KL to SFT of the same validation responses as three whole forwards (``score_responses`` +
``response_kl``) or from one trunk (``watch.proxy_and_kl``), alternating in one process, with the largest
difference between the two's numbers.

    python bench/watch_scoring.py runs/gold --threads 2 --reps 2
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from instructgpt_cli.batches import render_queries
from instructgpt_cli.config import LoraConfig, ModelConfig, PPOConfig
from instructgpt_cli.data import read_prompts
from instructgpt_cli.models import load_tokenizer
from instructgpt_cli.rollout import response_kl, score_responses
from instructgpt_cli.stages.ppo import as_runners, load_models
from instructgpt_cli.watch import proxy_and_kl

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help="a make gold run directory (its sft/final and rm/final)")
    ap.add_argument("--prompts", type=Path, default=REPO / "examples" / "gold" / "prompts_valid.jsonl")
    ap.add_argument("--n", type=int, default=80, help="validation prompts (make gold's watch: 80)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    # make gold's PPO: LoRA r 16 on the top 8 layers, 32 new tokens, batches of 16 (2 x its batch size)
    cfg = PPOConfig(lora=LoraConfig(enabled=True, r=16, alpha=32, layers=8), max_new_tokens=32)
    sft, rm = a.run_dir / "sft" / "final", a.run_dir / "rm" / "final"
    tok, _ = load_tokenizer(ModelConfig(name=str(sft)))
    cpu = torch.device("cpu")
    models = as_runners(load_models(cfg, tok, sft, rm, cpu), cfg, cpu)
    queries = render_queries(tok, read_prompts(str(a.prompts))[:a.n], cfg.max_new_tokens, 512)
    torch.manual_seed(0)
    responses = models.policy.generate(tok, queries, cfg.max_new_tokens, 1.0, 16)
    for rep in range(a.reps):
        t = time.perf_counter()
        scores = score_responses(models.reward, tok, queries, responses, 16)
        kl = response_kl(models.policy, models.reference, tok, queries, responses, 1.0, 16)
        before = time.perf_counter() - t
        t = time.perf_counter()
        proxy, kl_now = proxy_and_kl(models, tok, queries, responses, 1.0, 16, step=1)
        now = time.perf_counter() - t
        print(f"rep {rep}: three whole forwards {before:.1f} s, one trunk {now:.1f} s; largest difference: scores "
              f"{(scores - torch.tensor(proxy)).abs().max():.1e}, KL {(kl - torch.tensor(kl_now)).abs().max():.1e}")


if __name__ == "__main__":
    main()
