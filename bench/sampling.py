"""Sampling: igpt's sampler (``rollout.sample``) against transformers' ``generate``, on the bundled
SmolLM2-135M-Instruct (real weights), B different chat-templated prompts of one length, a fixed number of new tokens
with no early stop (igpt: an EOS id that never occurs; generate: ``min_new_tokens = max_new_tokens``), plain
sampling at temperature 1 (no top-k, no top-p) on both sides.

Sides (``spec["side"]``): ``igpt`` (``rollout.generate``: ``rollout.sample`` on igpt's decoding path, as PPO, eval
and compare sample), ``generate`` with ``spec["cache"]`` ``dynamic`` (transformers' default cache) or ``static``
(its static cache with the decoding steps ``torch.compile``d through ``CompileConfig``, transformers' own way:
prefill runs uncompiled). ``vllm`` (``gpu.sh`` only, where vLLM is importable): ``LLM.generate`` with ``ignore_eos``.
Each run makes ``warmup`` untimed calls first (for ``static`` the first compiles; its seconds are recorded as
``compile_s``), then ``steps`` timed calls; the run's figure is the median call.

Used by ``run.py`` (groups ``sample_b1``, ``sample_b16``, ``sample_b64``: one side per worker process) and by
``gpu.sh`` (``python bench/sampling.py --device cuda --dtype bfloat16``: every side, each in its own process).
The roofline bound of a decoding step is :func:`common.sampling_bound`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

PROMPT = "Write a short story about a lighthouse keeper."
# the other prompts' subjects (distinct_prompts): those of the token count of "lighthouse"
WORDS = ("green white black brown stone water glass paper river ocean field night music bread fruit sugar honey "
         "horse mouse sheep tiger eagle snake whale shark storm cloud frost flame earth steel metal silver golden "
         "happy quiet smart brave grand royal rural urban north south coast beach plant farm light round small "
         "large short sweet dream power guest court train chair table clock heart smoke beach peace judge dance "
         "craft trade store opera ghost poker coach tower ranch manor cabin hotel motel dorm club guard").split()


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _compiled_graphs() -> int:
    """How many graphs torch.compile has made in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def read_bandwidth_gbs(device: str = "cpu", mb: int = 512, tries: int = 5) -> float:
    """Read bandwidth, GB/s: the best of ``tries`` ``big.sum()`` over an fp32 tensor of ``mb`` MB."""
    import torch

    dev = torch.device(device)
    big = torch.ones(mb * 2**20 // 4, dtype=torch.float32, device=dev)
    big.sum()
    _sync(dev)
    best = float("inf")
    for _ in range(tries):
        t0 = time.perf_counter()
        big.sum()
        _sync(dev)
        best = min(best, time.perf_counter() - t0)
    return big.numel() * 4 / best / 1e9


def mm_peak_gflops(device: str, dtype: str = "bfloat16", n: int = 8192, reps: int = 10) -> float:
    """Matmul peak on a GPU (the CPU's comes from ``prepare.calibrate``): n x n x n products, mean of ``reps``."""
    import torch

    dev, dt = torch.device(device), getattr(torch, dtype)
    a, b = torch.randn(n, n, device=dev, dtype=dt), torch.randn(n, n, device=dev, dtype=dt)
    for _ in range(3):
        a @ b
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(dev)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def model_facts(model, prompt_len: int, new_tokens: int) -> dict:
    """What the bound needs: parameter bytes (each tensor once: a tied embedding is the LM head), the input
    embedding's bytes (not read whole when untied: a step looks up B rows), matmul parameters (every linear
    layer, the LM head included), layers, width, the mean context of a decoding step, KV-cache bytes per token."""
    import torch

    params = list(model.parameters())
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == emb.data_ptr()
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return {"param_bytes": sum(p.numel() * p.element_size() for p in params),
            "embedding_bytes": emb.numel() * emb.element_size(), "tied": tied,
            "element_bytes": emb.element_size(),
            "matmul_params": sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)),
            "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
            "kv_bytes_per_token": 2 * cfg.num_hidden_layers * kv_heads * head_dim * emb.element_size(),
            "prompt_len": prompt_len, "new_tokens": new_tokens,
            # decoding step i (1 .. new-1) attends over prompt_len + i positions
            "mean_context": prompt_len + new_tokens / 2}


def load(spec: dict):
    """(model, tokenizer, 64 prompts' ids (:func:`distinct_prompts`), device): the bundled SmolLM2-135M-Instruct (``shape`` other than ``tiny``)
    or igpt's tiny random model, in ``spec['dtype']`` on ``spec['device']``."""
    import torch

    from instructgpt_cli.batches import render_prompt
    from instructgpt_cli.config import ModelConfig
    from instructgpt_cli.models import load_model, load_tokenizer

    name = "tiny" if spec.get("shape") == "tiny" else "smollm2-135m"
    cfg = ModelConfig(name=name, dtype=spec.get("dtype", "float32"))
    device = torch.device(spec.get("device", "cpu"))
    tok, path = load_tokenizer(cfg)
    model = load_model(cfg, tok, path, device, 0).eval()
    return model, tok, distinct_prompts(tok, render_prompt, 64), device


def distinct_prompts(tok, render, n: int) -> list[list[int]]:
    """``n`` different chat-templated prompts of one length: :data:`PROMPT` with its subject swapped for another
    word of the same token count (so no sampler can share a prompt's forward between rows, as igpt's
    decoder does for copies of one prompt, ``forward.distinct_rows``, and no row is padded)."""
    base = render(tok, [{"role": "user", "content": PROMPT}])
    out, seen = [base], {tuple(base)}
    # one-token words for a tokenizer that has "lighthouse" as one token (SmolLM2's); 10 letters for one that reads
    # bytes (the tiny model's)
    for word in WORDS + [w + "house" for w in WORDS if len(w) == 5]:
        if len(out) == n:
            break
        ids = render(tok, [{"role": "user", "content": PROMPT.replace("lighthouse", word)}])
        if len(ids) == len(base) and tuple(ids) not in seen:
            out.append(ids)
            seen.add(tuple(ids))
    assert len(out) == n, f"only {len(out)} prompts of {len(base)} tokens"
    return out


def caller(spec: dict, model, tok, prompts: list[list[int]], device):
    """A function that samples ``new_tokens`` after the first ``batch`` prompts and returns the new tokens."""
    import torch

    from instructgpt_cli.batches import pad_left

    b, new = spec["batch"], spec["new_tokens"]
    ids, mask = pad_left(prompts[:b], tok.pad_token_id)
    ids, mask = ids.to(device), mask.to(device)
    if spec["side"] == "igpt":
        from instructgpt_cli import rollout
        from instructgpt_cli.runners import Runner

        runner = Runner.for_eval(model)
        # rollout.generate, as PPO, eval and compare sample (rollout.sample in batches of b, inference mode, and on a
        # CPU the decoding step's own products), with an EOS id that never occurs: every row runs to new_tokens
        never_ends = types.SimpleNamespace(eos_token_id=-1, pad_token_id=tok.pad_token_id)

        def call():
            return torch.tensor(rollout.generate(model, runner.path, never_ends, prompts[:b], new, 1.0, b))

        return call, {"forward": runner.name}
    if spec["side"] == "vllm":  # gpu.sh, where vLLM is importable: the same weights (igpt's converted directory)
        from vllm import LLM, SamplingParams

        from instructgpt_cli.models import model_path

        llm = LLM(model=str(model_path("smollm2-135m")), dtype=spec["dtype"], seed=0, gpu_memory_utilization=0.3)
        params = SamplingParams(n=1, temperature=1.0, top_p=1.0, max_tokens=new, min_tokens=new, ignore_eos=True)
        requests = [{"prompt_token_ids": list(p)} for p in prompts[:b]]

        def call():
            outs = llm.generate(requests, params, use_tqdm=False)
            return torch.tensor([list(o.outputs[0].token_ids) for o in outs])

        return call, {"vllm": __import__("vllm").__version__}
    from transformers import CompileConfig

    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                  pad_token_id=tok.pad_token_id)
    notes = {"cache": spec["cache"]}
    if spec["cache"] == "static":
        # transformers' way (generation_config.compile_config): the decoding steps run torch.compile'd on a static
        # cache. "reduce-overhead" (CUDA graphs) is its default and does nothing on a CPU, where generate compiles
        # only when asked to (_compile_all_devices), in the default mode.
        cc = CompileConfig(fullgraph=spec.get("fullgraph", True),
                           mode="reduce-overhead" if device.type == "cuda" else "default")
        if device.type != "cuda":
            cc._compile_all_devices = True
        kwargs.update(cache_implementation="static", compile_config=cc)
        # compile_s is a cold compile: not one served by inductor's on-disk cache of an earlier run's graphs
        import torch._inductor.config as inductor

        inductor.fx_graph_cache = False
        notes.update(compile_mode=cc.mode, fullgraph=cc.fullgraph, fx_graph_cache=False)

    def call():
        with torch.inference_mode():
            return model.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, ids.size(1):]

    return call, notes


def sample(spec: dict) -> dict:
    """One side at one batch size: warm-up calls, then timed calls; the worker's result."""
    import torch

    model, tok, prompts, device = load(spec)
    call, notes = caller(spec, model, tok, prompts, device)
    b, new = spec["batch"], spec["new_tokens"]
    warm = []
    for i in range(spec.get("warmup", 1)):
        torch.manual_seed(0)
        _sync(device)
        t0 = time.perf_counter()
        try:
            out = call()
        except Exception as e:
            if i or spec.get("cache") != "static" or not spec.get("fullgraph", True):
                raise
            # a graph break under fullgraph=True: compile what can be compiled instead, and say so
            torch._dynamo.reset()
            spec = {**spec, "fullgraph": False}
            call, notes = caller(spec, model, tok, prompts, device)
            notes["fullgraph_error"] = f"{type(e).__name__}: {e}"[:500]
            torch.manual_seed(0)
            t0 = time.perf_counter()
            out = call()
        _sync(device)
        warm.append(time.perf_counter() - t0)
    graphs = _compiled_graphs()
    seconds = []
    for _ in range(spec.get("steps", 3)):
        torch.manual_seed(0)
        _sync(device)
        t0 = time.perf_counter()
        out = call()
        _sync(device)
        seconds.append(time.perf_counter() - t0)
    assert tuple(out.shape) == (b, new), f"{spec['side']} returned {tuple(out.shape)}, not ({b}, {new})"
    med = statistics.median(seconds)
    result = {"step_seconds": [med], "units_per_step": [b * new],
              "notes": {**notes, "call_seconds": seconds, "warmup_seconds": warm,
                        "tokens_per_s": b * new / med, "facts": model_facts(model, len(prompts[0]), new),
                        "device": str(device), "dtype": str(next(model.parameters()).dtype)}}
    if spec.get("cache") == "static" and warm:  # the first call compiled (and ran once)
        result["notes"]["compile_s"] = max(0.0, warm[0] - med)
        # graphs compiled during the timed calls (a recompile there would be timed): should be 0
        result["notes"]["graphs_compiled_in_timed_calls"] = _compiled_graphs() - graphs
    from common import vm_hwm_mb

    result["peak_rss_mb"] = vm_hwm_mb()
    if device.type == "cuda":
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


SIDES = {"igpt": {"side": "igpt"}, "generate_dynamic": {"side": "generate", "cache": "dynamic"},
         "generate_static": {"side": "generate", "cache": "static"}, "vllm": {"side": "vllm"}}


def main() -> int:
    """Every side at every batch size, each in a fresh process of this Python (for gpu.sh), and the bound."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--sides", default="igpt,generate_dynamic,generate_static", help="and vllm: " + ",".join(SIDES))
    ap.add_argument("--shape", default="real", help="real (the bundled SmolLM2-135M-Instruct) or tiny")
    ap.add_argument("--timeout", type=int, default=240, help="seconds per process")
    ap.add_argument("--budget", type=float, default=3600, help="seconds for every process together")
    ap.add_argument("--json", default="", help="write every result here too")
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: run one spec (JSON) in this process
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if args.one:
        spec = json.loads(args.one)
        try:
            print("RESULT " + json.dumps(sample(spec)), flush=True)
        except Exception as e:  # noqa: BLE001: reported, not raised
            print("RESULT " + json.dumps({"error": f"{type(e).__name__}: {e}"[:1000]}), flush=True)
        return 0
    from common import sampling_bound

    read_gbs = read_bandwidth_gbs(args.device)
    peak = mm_peak_gflops(args.device, args.dtype) if args.device.startswith("cuda") else None
    if peak is None:
        import prepare

        peak = prepare.calibrate(int(os.environ.get("OMP_NUM_THREADS", "1")))["peak_gflops"]
    print(f"calibration on {args.device}: read {read_gbs:.0f} GB/s, {args.dtype} matmul peak {peak:.0f} GFLOP/s",
          flush=True)
    results = {}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    batches = [int(x) for x in args.batches.split(",")]
    deadline = time.perf_counter() + args.budget
    # side by side, one side's batch sizes after another: what the budget leaves out is the last side's largest runs
    for label in args.sides.split(","):
        for b in batches:
            left = deadline - time.perf_counter()
            if left < 20:
                results[f"{label}_b{b}"] = {"error": f"skipped: the --budget of {args.budget} s was spent"}
                print(f"  B={b:<3} {label:17s} skipped: the --budget of {args.budget} s was spent", flush=True)
                continue
            spec = {**SIDES[label], "batch": b, "new_tokens": args.new_tokens, "warmup": 1, "steps": args.steps,
                    "device": args.device, "dtype": args.dtype, "shape": args.shape}
            timeout = int(min(args.timeout, left))
            t0 = time.perf_counter()
            try:
                proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True,
                                      text=True, timeout=timeout, env=env)
                lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                res = json.loads(lines[-1][7:]) if lines else {"error": f"exit {proc.returncode}: "
                                                                         f"{proc.stderr[-600:]}"}
            except subprocess.TimeoutExpired:
                res = {"error": f"timed out after {timeout} s"}
            res["process_s"] = time.perf_counter() - t0
            results[f"{label}_b{b}"] = res
            n = res.get("notes", {})
            if "error" in res:
                print(f"  B={b:<3} {label:17s} error: {res['error'][:300]}", flush=True)
                continue
            extra = f", compile {n['compile_s']:.1f} s" if "compile_s" in n else ""
            extra += " with fullgraph=False (a graph break under True)" if "fullgraph_error" in n else ""
            mem = f", peak GPU {res['peak_gpu_mib']:.0f} MiB" if "peak_gpu_mib" in res else ""
            calls = ", ".join(f"{s:.2f}" for s in n["call_seconds"])
            print(f"  B={b:<3} {label:17s} {n['tokens_per_s']:9.1f} tok/s (calls {calls} s{extra}{mem}; "
                  f"process {res['process_s']:.0f} s)", flush=True)
    rows = []
    print(f"summary ({args.new_tokens} new tokens, {args.dtype} on {args.device}; bound from read {read_gbs:.0f} GB/s "
          f"and peak {peak:.0f} GFLOP/s):", flush=True)
    for b in batches:
        runs = {label: results.get(f"{label}_b{b}", {}) for label in args.sides.split(",")}
        row = {"batch": b, **{label: r["notes"]["tokens_per_s"] for label, r in runs.items() if "notes" in r}}
        facts = next((r["notes"]["facts"] for r in runs.values() if "notes" in r), None)
        if facts:
            bound = sampling_bound(facts, b, read_gbs, peak)
            row["bound"] = bound["tokens_per_s"]
            igpt = row.get("igpt")
            share = f"{100 * igpt / row['bound']:.0f}%" if igpt else "–"
            ratios = "  ".join(f"igpt/{k} {igpt / row[k]:.2f}x" for k in SIDES if k != "igpt" and igpt and row.get(k))
            sides = "  ".join(f"{k} {row[k]:.0f}" for k in SIDES if row.get(k))
            print(f"  B={b:<3} tok/s: {sides}  bound {row['bound']:.0f} ({bound['limit']}-bound, step "
                  f"{1e3 * bound['step_s']:.3f} ms); igpt {share} of the bound; {ratios}", flush=True)
        rows.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps({"read_gbs": read_gbs, "peak_gflops": peak, "results": results,
                                               "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
