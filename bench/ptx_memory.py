"""Peak memory of one PPO-ptx step: igpt's micro-batched, chunked LM loss against full-vocabulary logits.

One ptx step of the paper preset's shape per process (``ru_maxrss`` is a process's peak, so each variant runs
in a fresh subprocess): SmolLM2-135M's architecture (vocabulary 49152, hidden 576, 9 heads, 3 key/value
heads, intermediate 1536; random weights from a LlamaConfig, nothing downloaded), ``--batch`` pretraining
blocks of ``--tokens`` tokens, forward and backward of gamma x the mean token loss. Variants:

  chunked       igpt: ``ppo.ptx_backward``, micro-batches of ``--micro`` blocks, the LM head + cross-entropy in
                chunks of rows (``losses.linear_cross_entropy_sum``)
  full          the same micro-batches, the loss on the model's full fp32 logits (before the chunking)
  full-whole    every block in one forward on full logits (igpt before micro-batching; needs the most memory)

    python bench/ptx_memory.py                       # 30 layers: chunked vs full; 2 layers: all three
    python bench/ptx_memory.py --layers 30 --variants chunked,full

Not a timed test; the numbers go to bench/README.md.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one_step(variant: str, layers: int, tokens: int, batch: int, micro: int, threads: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(REPO))
    from instructgpt_cli.runners import Runner
    from instructgpt_cli.config import PPOConfig
    from instructgpt_cli.batches import IGNORE_INDEX, pad_right
    from instructgpt_cli.losses import lm_targets
    from instructgpt_cli.stages import ppo
    from instructgpt_cli.distributed import keep_freed_memory

    torch.set_num_threads(threads)
    keep_freed_memory()  # as training runs (train.Session)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
                         attn_implementation="sdpa", bos_token_id=0, eos_token_id=0, pad_token_id=2)
    model = LlamaForCausalLM(config).train()
    blocks = torch.randint(3, 49152, (batch, tokens)).tolist()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    policy = Runner(model, torch.device("cpu"))
    cfg = PPOConfig(ptx_coef=27.8, ptx_batch_size=batch, ptx_micro_batch_size=micro)
    t0 = time.perf_counter()
    if variant == "chunked":
        loss = ppo.ptx_backward(policy, blocks, 0, cfg, 2, torch.device("cpu"))
    else:  # the model's logits (B, L, V), then the fp32 cross-entropy on all of them
        size = batch if variant == "full-whole" else micro
        n_total = batch * (tokens - 1)
        loss = 0.0
        for start in range(0, batch, size):
            ids, mask = pad_right(blocks[start:start + size], 2)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            part = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(),
                                                     lm_targets(ids, mask).reshape(-1), ignore_index=IGNORE_INDEX)
            n = int(mask[:, 1:].sum())
            (part * (cfg.ptx_coef * n / n_total)).backward()
            loss += part.item() * n / n_total
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()
                                                            if p.grad is not None])))
    return {"variant": variant, "layers": layers, "tokens": tokens, "batch": batch, "micro": micro,
            "peak_rss_mib": peak / 1024, "model_rss_mib": base / 1024, "seconds": seconds, "loss": loss,
            "grad_norm": grad_norm}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="*", default=[30, 2])
    ap.add_argument("--variants", default="")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--micro", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # variant,layers: run in this process
    args = ap.parse_args()
    if args.one:
        variant, layers = args.one.split(",")
        print(json.dumps(one_step(variant, int(layers), args.tokens, args.batch, args.micro, args.threads)))
        return
    rows = []
    for layers in args.layers:
        variants = args.variants.split(",") if args.variants else (
            ["chunked", "full"] if layers > 4 else ["chunked", "full", "full-whole"])
        for variant in variants:
            out = subprocess.run([sys.executable, __file__, "--one", f"{variant},{layers}", "--tokens",
                                  str(args.tokens), "--batch", str(args.batch), "--micro", str(args.micro),
                                  "--threads", str(args.threads)], capture_output=True, text=True)
            if out.returncode:
                rows.append({"variant": variant, "layers": layers, "error": out.stderr.strip().splitlines()[-1:]})
            else:
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    print(f"# {platform.processor() or platform.machine()}, {args.threads} threads, torch "
          f"{__import__('torch').__version__}")
    for layers in args.layers:
        mine = {r["variant"]: r for r in rows if r["layers"] == layers and "error" not in r}
        if "chunked" in mine:
            for other in ("full", "full-whole"):
                if other in mine:
                    print(f"{layers} layers: peak RSS chunked {mine['chunked']['peak_rss_mib']:.0f} MiB vs {other} "
                          f"{mine[other]['peak_rss_mib']:.0f} MiB: {mine['chunked']['peak_rss_mib'] / mine[other]['peak_rss_mib']:.2f}x")


if __name__ == "__main__":
    main()
