"""What both sides of the benchmark share: thread pinning, model shapes, the benchmark's own models and
data (random weights, synthetic token sequences of exact lengths), timing and memory helpers.

Nothing here depends on TRL; both sides import it, so the models and the tokens they train on are the
same bytes on both sides.
"""
from __future__ import annotations

import json
import os
import random
import statistics
from pathlib import Path

WORK = Path(os.environ.get("IGPT_BENCH_WORK", "/tmp/igpt-bench"))
MODELS = WORK / "models"
DATA = WORK / "data"
BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent


def pin_threads(n: int) -> None:
    """Pin intra-op threads to ``n`` and inter-op to 1 (the env vars are set by the driver too)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (only possible once per process)
        pass


# ---------------------------------------------------------------- shapes

def llama_config(shape: str, tokenizer):
    """tiny: igpt's own tiny config (2 layers, width 64); 135m: SmolLM2-135M's LlamaConfig."""
    from transformers import LlamaConfig

    if shape == "tiny":
        from instructgpt_cli.models import tiny_config

        return tiny_config(tokenizer)
    if shape == "135m":
        return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                           num_attention_heads=9, num_key_value_heads=3, head_dim=64, hidden_act="silu",
                           max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                           tie_word_embeddings=True, num_labels=1, attention_dropout=0.0,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)
    raise ValueError(shape)


def base_tokenizer(shape: str):
    """tiny: igpt's byte-level tokenizer; 135m: the bundled SmolLM2 tokenizer (pad <|endoftext|>)."""
    from instructgpt_cli.config import ModelConfig
    from instructgpt_cli.models import load_tokenizer, tiny_tokenizer

    if shape == "tiny":
        return tiny_tokenizer()
    tok, _ = load_tokenizer(ModelConfig(name="smollm2-135m"))
    return tok


def model_dir(shape: str, kind: str) -> Path:
    """kind: 'policy' (causal LM = the SFT model) or 'reward' (same backbone + scalar head)."""
    return MODELS / shape / kind


def load_tokenizer_for(shape: str):
    """The tokenizer as igpt loads it from the prepared model directory (pad distinct from EOS)."""
    from instructgpt_cli.config import ModelConfig
    from instructgpt_cli.models import load_tokenizer

    tok, _ = load_tokenizer(ModelConfig(name=str(model_dir(shape, "policy"))))
    return tok


def matmul_flops_per_token(model) -> int:
    """Parameters of the backbone's matmuls (every nn.Linear but the LM / scalar head)."""
    import torch

    n = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] not in ("lm_head", "score"):
            n += mod.weight.numel()
    return n


def shape_facts(shape: str) -> dict:
    """Numbers the FLOP model needs: backbone matmul params, layers, width, vocabulary."""
    if shape == "tiny":
        return {"backbone_params": 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128), "layers": 2, "hidden": 64,
                "vocab": 260}
    return {"backbone_params": 30 * (576 * 576 * 2 + 576 * 192 * 2 + 3 * 576 * 1536), "layers": 30, "hidden": 576,
            "vocab": 49152}


def train_flops(shape: str, seq_lens: list[int], lm_head_positions: int) -> float:
    """Model FLOPs of one training step (forward + backward = 3x forward) over sequences of the given
    lengths: backbone matmuls (2 per parameter per token), causal attention scores and values
    (2 * n^2 * d per layer, halved by the causal mask, times two matmuls), and the LM head only at the
    positions the loss needs (``lm_head_positions``; 0 for a reward model). The same count is used for
    both sides: it is the work the step must do, not what an implementation happens to do."""
    f = shape_facts(shape)
    fwd = 0.0
    for n in seq_lens:
        fwd += 2 * f["backbone_params"] * n + 2 * n * n * f["hidden"] * f["layers"]
    fwd += 2 * f["vocab"] * f["hidden"] * lm_head_positions
    return 3 * fwd


def sampling_bound(facts: dict, batch: int, read_gbs: float, peak_gflops: float) -> dict:
    """The roofline bound of one decoding step of ``batch`` rows (``facts``: ``sampling.model_facts``).
    Bytes: every weight read once (a tied embedding once, as the LM head; an untied input embedding only the
    ``batch`` rows looked up) and the KV cache each row's new token attends to, at the mean context (``kv_bytes``:
    every sampler in the model's dtype reads it each step; at 64 rows of 103 tokens it is 56% of the weights' bytes).
    FLOPs: 2 per matmul parameter (the LM head included) per row, and attention 4 * layers * hidden * mean context
    per row. Step = max(bytes / bandwidth, FLOPs / peak); tokens/s = batch / step."""
    row_bytes = facts["hidden"] * facts["element_bytes"]
    kv_bytes = batch * facts["kv_bytes_per_token"] * facts["mean_context"]
    nbytes = facts["param_bytes"] - (0 if facts["tied"] else facts["embedding_bytes"]) + batch * row_bytes + kv_bytes
    flops = 2 * batch * facts["matmul_params"] + 4 * batch * facts["layers"] * facts["hidden"] * facts["mean_context"]
    t_mem, t_flop = nbytes / (read_gbs * 1e9), flops / (peak_gflops * 1e9)
    step = max(t_mem, t_flop)
    return {"bytes": nbytes, "flops": flops, "memory_s": t_mem, "compute_s": t_flop, "step_s": step,
            "limit": "memory" if t_mem >= t_flop else "compute", "tokens_per_s": batch / step,
            "kv_bytes": kv_bytes}


# ---------------------------------------------------------------- synthetic text of exact token lengths

def word_pool(tokenizer, shape: str) -> list[str]:
    """Pieces that are exactly one token each and stay one token when concatenated."""
    if shape == "tiny":
        return list("abcdefghijklmnopqrstuvwxyz")  # byte-level: one character = one token
    import re

    vocab = tokenizer.get_vocab()
    pool = []
    for piece, _ in sorted(vocab.items(), key=lambda kv: kv[1]):
        if re.fullmatch(r"\u0120[a-z]{3,9}", piece):
            word = " " + piece[1:]
            if len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1:
                pool.append(word)
        if len(pool) >= 3000:
            break
    return pool


def text_of_length(rng: random.Random, pool: list[str], n: int) -> str:
    return "".join(rng.choice(pool) for _ in range(n))


def exact_text(rng: random.Random, pool: list[str], n_tokens: int, encode) -> str:
    """Random words, added one at a time, until ``encode(text)`` has exactly ``n_tokens`` tokens
    (restarting when a word overshoots)."""
    for _ in range(1000):
        text, k = "", 0
        while k < n_tokens:
            text += rng.choice(pool)
            k = len(encode(text.strip()))
        if k == n_tokens:
            return text.strip()
    raise RuntimeError(f"could not make a text of {n_tokens} tokens")


# ---------------------------------------------------------------- measurement helpers

def vm_hwm_mb() -> float:
    """Peak resident set size of this process so far (VmHWM), MiB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def summarise(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0, "spread_pct": None}
    med = statistics.median(values)
    return {"median": med, "min": min(values), "max": max(values), "n": len(values),
            "spread_pct": 100 * (max(values) - min(values)) / med if med else None, "values": values}


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
