"""igpt vs TRL, side by side, in one sitting: ``make bench`` (or ``bench/.venv-trl/bin/python bench/run.py``).

Every measurement is a fresh worker process (``worker.py``) with its threads pinned; the igpt and TRL runs
of a group alternate (the order rotates from one repeat to the next), so slow drifts of the machine hit
both sides alike. Each run drops its warm-up steps; a repeat's throughput is its timed units over its
timed seconds; the table gives the median over repeats, the spread (max - min over median), the peak RSS
and the ratio igpt / TRL. Results: ``bench/results/*.json``; the table in ``bench/README.md`` is rewritten.

    python bench/run.py                      # everything (~20 minutes on 2 cores)
    python bench/run.py --only rm,sft_fixed  # some groups
    python bench/run.py --repeats 1          # fewer repeats
    python bench/run.py --smoke              # every group on the tiny model, 1 step, results to /tmp
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from common import summarise, write_json  # noqa: E402

PY_MAIN = BENCH / ".venv-trl" / "bin" / "python"        # igpt, and TRL (current release): SFT, RM
PY_TRL112 = BENCH / ".venv-trl112" / "bin" / "python"   # TRL 1.12.0: the last release with PPO

# Identical settings on both sides (see trl_side.py for how each maps onto TRL's arguments).
PPO_TINY = dict(task="ppo", shape="tiny", threads=1, rollout_batch=8, micro_batch=4, ppo_epochs=4,
                response_length=32, temperature=1.0, kl_coef=0.02, warmup=2, steps=6)
PPO_135M = dict(task="ppo", shape="135m", threads=2, rollout_batch=2, micro_batch=2, ppo_epochs=4,
                response_length=16, temperature=1.0, kl_coef=0.02, warmup=1, steps=1)
RM = dict(task="rm", shape="135m", threads=2, warmup=2, steps=2)  # a 135M model's first 2 steps pay first-touch allocation
SFT = dict(task="sft", shape="135m", threads=2, batch_size=4, warmup=3)  # steps 2-3 still pay first-touch allocation
# Sampling (sampling.py): the bundled SmolLM2-135M-Instruct (real weights), B different chat-templated prompts of one length,
# 128 new tokens with no early stop, temperature 1, fp32; a run makes `warmup` untimed calls (static: the compile)
# and `steps` timed calls, its figure the median call. igpt's rollout.sample against transformers' generate with its
# dynamic cache and with its static cache + torch.compile (CompileConfig).
SAMPLE = dict(task="sample", shape="real", threads=2, new_tokens=128, dtype="float32", device="cpu", warmup=1, steps=3)
SAMPLE_SMOKE = {"new_tokens": 16}  # --smoke: the tiny model (shape "tiny"), 16 new tokens


def sampling_group(batch: int, **extra) -> dict:
    spec = {**SAMPLE, "batch": batch, **extra}
    return {"igpt": ("igpt", spec), "generate_dynamic": ("generate", {**spec, "cache": "dynamic"}),
            "generate_static": ("generate", {**spec, "cache": "static"})}


# group id -> (variants: label -> (side, spec)), repeats
GROUPS = {
    "rm_k2": {"igpt": ("igpt", {**RM, "k": 2, "prompts_per_step": 4}),
              "trl": ("trl", {**RM, "k": 2, "prompts_per_step": 4}),
              # the engine control: both sides run the same 2 sequences per ranking (igpt's prompt sharing off)
              "igpt_unshared": ("igpt", {**RM, "k": 2, "prompts_per_step": 4, "share_prompts": False})},
    "rm_k4": {"igpt": ("igpt", {**RM, "k": 4, "prompts_per_step": 2}),
              "trl": ("trl", {**RM, "k": 4, "prompts_per_step": 2})},
    "rm_k9": {"igpt": ("igpt", {**RM, "k": 9, "prompts_per_step": 1, "steps": 1}),
              "trl": ("trl", {**RM, "k": 9, "prompts_per_step": 1, "steps": 1})},
    # DPO on the RM groups' rankings: igpt K-wise (K policy forwards a ranking), TRL on the C(K,2) pairs
    "dpo_k2": {"igpt": ("igpt", {**RM, "task": "dpo", "k": 2, "prompts_per_step": 4}),
               "trl": ("trl", {**RM, "task": "dpo", "k": 2, "prompts_per_step": 4})},
    "dpo_k4": {"igpt": ("igpt", {**RM, "task": "dpo", "k": 4, "prompts_per_step": 2}),
               "trl": ("trl", {**RM, "task": "dpo", "k": 4, "prompts_per_step": 2})},
    "dpo_k9": {"igpt": ("igpt", {**RM, "task": "dpo", "k": 9, "prompts_per_step": 1, "steps": 1}),
               "trl": ("trl", {**RM, "task": "dpo", "k": 9, "prompts_per_step": 1, "steps": 1})},
    "ppo_tiny": {"igpt": ("igpt", PPO_TINY), "trl": ("trl112", PPO_TINY)},
    "ppo_135m": {"igpt": ("igpt", PPO_135M), "trl": ("trl112", PPO_135M),
                 "igpt_lora": ("igpt", {**PPO_135M, "lora": True})},
    "sft_fixed": {"igpt": ("igpt", {**SFT, "data": "fixed", "steps": 2}),
                  "trl": ("trl", {**SFT, "data": "fixed", "steps": 2})},
    "sft_demos": {"igpt": ("igpt", {**SFT, "data": "demos", "steps": 3}),
                  "trl": ("trl", {**SFT, "data": "demos", "steps": 3})},
    "sample_b1": sampling_group(1),
    "sample_b16": sampling_group(16),
    "sample_b64": sampling_group(64, steps=2),  # a B=64 call of 128 tokens takes tens of seconds here
}
ORDER = ["ppo_tiny", "rm_k2", "rm_k4", "rm_k9", "dpo_k2", "dpo_k4", "dpo_k9", "sft_fixed", "sft_demos", "ppo_135m",
         "sample_b1", "sample_b16", "sample_b64"]
SAMPLING = [g for g in ORDER if g.startswith("sample_")]  # their own table (sampling_markdown), their own README block

# Table rows: (label, group, metric, target, how the ratio is read[, igpt's variant, default "igpt"])
ROWS = [
    ("RM K=2 comparisons/s (135M shape, 2 thr)", "rm_k2", "throughput", ">= 1.0x", 1.0),
    ("RM K=2, prompt not shared: the same 2 sequences a ranking on both sides", "rm_k2", "throughput", ">= 1.0x", 1.0,
     "igpt_unshared"),
    ("RM K=4 comparisons/s (135M shape, 2 thr)", "rm_k4", "throughput", ">= 2.7x", 2.7),
    ("RM K=9 comparisons/s (135M shape, 2 thr)", "rm_k9", "throughput", ">= 7x", 7.0),
    ("DPO K=2 comparisons/s (135M shape, 2 thr)", "dpo_k2", "throughput", ">= 1.0x", 1.0),
    ("DPO K=4 comparisons/s (135M shape, 2 thr)", "dpo_k4", "throughput", ">= 3x", 3.0),
    ("DPO K=9 comparisons/s (135M shape, 2 thr)", "dpo_k9", "throughput", ">= 7x", 7.0),
    ("PPO episodes/s, tiny, 1 thr, 4 PPO epochs", "ppo_tiny", "throughput", ">= 4x", 4.0),
    ("PPO episodes/s, 135M shape, 2 thr, full FT, 4 PPO epochs", "ppo_135m", "throughput", ">= 1.0x", 1.0),
    ("PPO s/update: igpt LoRA defaults vs TRL full FT (135M, 2 thr)", "ppo_135m", "lora_speed", ">= 2x fewer s", 2.0),
    ("PPO peak RSS: igpt LoRA defaults vs TRL full FT (135M)", "ppo_135m", "lora_rss", "<= 50%", 0.5),
    ("SFT tokens/s, 135M shape, fixed lengths (4 x 128)", "sft_fixed", "throughput", ">= 1.0x", 1.0),
    ("SFT tokens/s, 135M shape, data/demos.jsonl (batch 4)", "sft_demos", "throughput", ">= 1.3x", 1.3),
    ("SFT training MFU, fixed lengths (igpt; TRL for reference)", "sft_fixed", "mfu", ">= 50% of peak", 0.5),
    ("SFT training MFU, data/demos.jsonl (igpt; TRL for reference)", "sft_demos", "mfu", ">= 50% of peak", 0.5),
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


HZ = os.sysconf("SC_CLK_TCK")


def busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all cores), from /proc/stat."""
    with open("/proc/stat") as fh:
        v = [int(x) for x in fh.readline().split()[1:9]]
    return (sum(v) - v[3] - v[4]) / HZ


def own_cpu_seconds() -> float:
    """CPU seconds of this driver and its finished workers."""
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def others_busy(seconds: float = 3.0) -> float:
    """Cores that other processes kept busy over the next ``seconds`` (no worker running)."""
    b0, o0, t0 = busy_seconds(), own_cpu_seconds(), time.perf_counter()
    time.sleep(seconds)
    return max(0.0, (busy_seconds() - b0 - (own_cpu_seconds() - o0)) / (time.perf_counter() - t0))


def wait_for_idle(max_wait: float, threshold: float = 0.2) -> float:
    """Wait (up to ``max_wait`` s) until other processes use less than ``threshold`` cores; returns the wait."""
    t0 = time.perf_counter()
    while True:
        busy = others_busy()
        if busy < threshold or time.perf_counter() - t0 > max_wait:
            return time.perf_counter() - t0
        log(f"  waiting: other processes keep {busy:.1f} cores busy")
        time.sleep(12)


CONTENTION_LIMIT = 0.25  # cores
MAX_WAIT = float(os.environ.get("IGPT_BENCH_MAX_WAIT", 600))


def python_for(side: str) -> Path:
    return PY_TRL112 if side == "trl112" else PY_MAIN


def run_worker(side: str, spec: dict, scratch: Path, tag: str, timeout: int = 1800) -> dict:
    spec = {**spec, "side": "trl" if side == "trl112" else side}
    spec_path, out_path = scratch / f"{tag}.spec.json", scratch / f"{tag}.out.json"
    log_path = scratch / f"{tag}.log"
    write_json(spec_path, spec)
    threads = str(spec.get("threads", 1))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads,
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    waited = wait_for_idle(MAX_WAIT)
    b0, o0, t0 = busy_seconds(), own_cpu_seconds(), time.perf_counter()
    with open(log_path, "w") as fh:
        try:
            proc = subprocess.run([str(python_for(side)), str(BENCH / "worker.py"), str(spec_path), str(out_path)],
                                  stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=timeout, cwd=BENCH.parent)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - t0
    others = max(0.0, (busy_seconds() - b0 - (own_cpu_seconds() - o0)) / wall)
    if out_path.exists():
        result = json.loads(out_path.read_text())
    else:
        tail = log_path.read_text()[-3000:] if log_path.exists() else ""
        result = {"error": f"worker exited with {rc} and wrote no result", "log_tail": tail}
    result["wall_s"] = wall
    result["waited_for_idle_s"] = waited
    result["contention_cores"] = others  # mean cores other processes used while this run ran
    return result


def throughput(result: dict) -> float | None:
    if "error" in result or not result.get("step_seconds"):
        return None
    return sum(result["units_per_step"]) / sum(result["step_seconds"])


def flops_rate(result: dict) -> float | None:
    if "error" in result or not result.get("flops_per_step"):
        return None
    return sum(result["flops_per_step"]) / sum(result["step_seconds"])


def run_group(gid: str, variants: dict, repeats: int, scratch: Path, overrides: dict) -> dict:
    labels = list(variants)
    runs: dict[str, list[dict]] = {label: [] for label in labels}
    for r in range(repeats):
        order = labels[r % len(labels):] + labels[:r % len(labels)]  # rotate: no side always goes first
        for label in order:
            side, spec = variants[label]
            spec = {**spec, **overrides}
            log(f"{gid} repeat {r + 1}/{repeats}: {label} ({side})")
            res = run_worker(side, spec, scratch, f"{gid}-{label}-r{r + 1}")
            for retry in range(2):  # another process shared the cores: the figure is not this machine's
                if res.get("contention_cores", 0) < CONTENTION_LIMIT or "error" in res:
                    break
                log(f"  other processes used {res['contention_cores']:.2f} cores meanwhile: measuring again")
                res = {**run_worker(side, spec, scratch, f"{gid}-{label}-r{r + 1}"), "retries": retry + 1}
            runs[label].append(res)
            if "error" in res:
                log(f"  error: {res['error'][:300]}")
            else:
                tp = throughput(res)
                log(f"  {tp:.3f} units/s, {sum(res['step_seconds']) / len(res['step_seconds']):.2f} s/step, "
                    f"peak RSS {res.get('peak_rss_mb', 0):.0f} MiB, process {res['wall_s']:.0f} s, "
                    f"others {res['contention_cores']:.2f} cores")
    out = {"group": gid, "repeats": repeats, "variants": {}}
    for label in labels:
        side, spec = variants[label]
        rs = runs[label]
        errors = [x["error"] for x in rs if "error" in x]
        out["variants"][label] = {
            "side": side, "spec": {**spec, **overrides},
            "throughput": summarise([throughput(x) for x in rs]),
            "seconds_per_step": summarise([sum(x["step_seconds"]) / len(x["step_seconds"]) for x in rs
                                           if "error" not in x and x.get("step_seconds")]),
            "flops_per_s": summarise([flops_rate(x) for x in rs]),
            "peak_rss_mb": summarise([x.get("peak_rss_mb") for x in rs if "error" not in x]),
            "errors": errors,
            "max_contention_cores": max((x.get("contention_cores", 0) for x in rs), default=0),
            "runs": rs,
        }
    return out


def machine(calibration: dict) -> dict:
    model = "unknown"
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown":
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    mem = ""
    try:
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split(":")[1].strip()
    except OSError:
        pass
    versions = {}
    for name, py in (("main", PY_MAIN), ("trl112", PY_TRL112)):
        try:
            versions[name] = json.loads(subprocess.run(
                [str(py), "-c", "import json, torch, transformers, trl, peft; print(json.dumps({'torch': "
                 "torch.__version__, 'transformers': transformers.__version__, 'trl': trl.__version__, "
                 "'peft': peft.__version__}))"], capture_output=True, text=True, timeout=300).stdout.strip())
        except Exception as e:  # noqa: BLE001
            versions[name] = {"error": str(e)}
    return {"cpu": model, "cores": os.cpu_count(), "memory": mem, "platform": platform.platform(),
            "python": platform.python_version(), "isa": sorted(flags & {"avx2", "avx512f", "avx512_bf16",
                                                                        "amx_tile", "fma"}),
            "versions": versions, "calibration": calibration}


def ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def table_rows(groups: dict, calib: dict) -> list[dict]:
    rows = []
    for label, gid, metric, target, bound, *variant in ROWS:
        g = groups.get(gid)
        if g is None or (variant and variant[0] not in g["variants"]):
            continue
        v = g["variants"]
        igpt, trl = v[variant[0] if variant else "igpt"], v["trl"]
        threads = igpt["spec"]["threads"]
        # the peak of the sitting that measured this group (a shared host's peak moves between sittings)
        peak = g.get("calibration", calib).get(str(threads), {}).get("peak_gflops")
        row = {"figure": label, "group": gid, "metric": metric, "target": target}
        if metric == "throughput":
            a, b = igpt["throughput"], trl["throughput"]
            row.update(igpt=a["median"], trl=b["median"], igpt_spread_pct=a["spread_pct"],
                       trl_spread_pct=b["spread_pct"], ratio=ratio(a["median"], b["median"]))
            row["met"] = row["ratio"] is not None and row["ratio"] >= bound
        elif metric == "lora_speed":
            lo = v.get("igpt_lora")
            a, b = lo["seconds_per_step"], trl["seconds_per_step"]
            row.update(igpt=a["median"], trl=b["median"], igpt_spread_pct=a["spread_pct"],
                       trl_spread_pct=b["spread_pct"], ratio=ratio(b["median"], a["median"]))
            row["met"] = row["ratio"] is not None and row["ratio"] >= bound
            row["unit"] = "s/update; ratio = TRL / igpt"
        elif metric == "lora_rss":
            lo = v.get("igpt_lora")
            a, b = lo["peak_rss_mb"], trl["peak_rss_mb"]
            row.update(igpt=a["median"], trl=b["median"], igpt_spread_pct=a["spread_pct"],
                       trl_spread_pct=b["spread_pct"], ratio=ratio(a["median"], b["median"]))
            row["met"] = row["ratio"] is not None and row["ratio"] <= bound
            row["unit"] = "MiB; ratio = igpt / TRL"
        elif metric == "mfu":
            a, b = igpt["flops_per_s"], trl["flops_per_s"]
            mi = a["median"] / 1e9 / peak if a["median"] and peak else None
            mt = b["median"] / 1e9 / peak if b["median"] and peak else None
            row.update(igpt=mi, trl=mt, ratio=ratio(mi, mt), peak_gflops=peak,
                       igpt_gflops=a["median"] / 1e9 if a["median"] else None,
                       trl_gflops=b["median"] / 1e9 if b["median"] else None)
            row["met"] = mi is not None and mi >= bound
            row["unit"] = "fraction of calibrated peak"
        row["errors"] = {"igpt": igpt["errors"], "trl": trl["errors"]}
        rows.append(row)
    return rows


def fmt(x, metric: str) -> str:
    if x is None:
        return "error"
    if metric == "mfu":
        return f"{100 * x:.0f}%"
    if metric == "lora_rss":
        return f"{x:.0f} MiB"
    if metric == "lora_speed":
        return f"{x:.1f} s"
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def markdown(rows: list[dict], mach: dict, started: str, minutes: float, groups: dict | None = None) -> str:
    cal = mach["calibration"]
    lines = [f"Measured {started} on **{mach['cpu']}**, {mach['cores']} cores, {mach['memory']} RAM "
             f"({mach['platform']}); torch {mach['versions'].get('main', {}).get('torch')}, transformers "
             f"{mach['versions'].get('main', {}).get('transformers')}, TRL {mach['versions'].get('main', {}).get('trl')} "
             f"(SFT, RM) and {mach['versions'].get('trl112', {}).get('trl')} (PPO), peft "
             f"{mach['versions'].get('main', {}).get('peft')}. Calibrated fp32 matmul peak: "
             + ", ".join(f"**{v.get('peak_gflops', float('nan')):.0f} GFLOP/s** at {k} thread{'s' if k != '1' else ''}"
                         for k, v in sorted(cal.items())) + f". The run took {minutes:.0f} minutes.", "",
             "| figure | igpt | TRL | igpt / TRL | target | met? |", "|---|---|---|---|---|---|"]
    for r in rows:
        spread = lambda s: f" (±{s / 2:.0f}%)" if s else ""  # noqa: E731
        a = fmt(r["igpt"], r["metric"]) + (spread(r.get("igpt_spread_pct")) if r["igpt"] is not None else "")
        b = fmt(r["trl"], r["metric"]) + (spread(r.get("trl_spread_pct")) if r["trl"] is not None else "")
        if r["metric"] == "lora_speed":
            q = f"{r['ratio']:.2f}x fewer s" if r["ratio"] else "–"
        elif r["metric"] == "lora_rss":
            q = f"{100 * r['ratio']:.0f}%" if r["ratio"] else "–"
        else:
            q = f"{r['ratio']:.2f}x" if r["ratio"] else "–"
        met = "n/a" if r["ratio"] is None and r["igpt"] is None else ("yes" if r["met"] else "**no**")
        lines.append(f"| {r['figure']} | {a} | {b} | {q} | {r['target']} | {met} |")
    mfu = [r for r in rows if r["metric"] == "mfu" and r.get("peak_gflops")]
    if mfu:
        lines += ["", "MFU is against the calibrated peak of the sitting that measured the group (this shared host's "
                      "peak moved between sittings): " + "; ".join(f"{r['group']} {r['peak_gflops']:.0f} GFLOP/s"
                                                                  for r in mfu) + "."]
    if groups:
        worst = max(((v["max_contention_cores"], gid) for gid, g in groups.items() for v in g["variants"].values()),
                    default=(0, ""))
        lines += ["", f"Other processes on the machine used at most {worst[0]:.2f} cores during any run "
                      f"(runs over {CONTENTION_LIMIT} cores are measured again, twice at most)."]
    errs = [(r["figure"], side, e) for r in rows for side, es in r["errors"].items() for e in es]
    if errs:
        lines += ["", "Errors (recorded instead of a number):"]
        for fig, side, e in errs:
            lines.append(f"- {fig} — {side}: `{e.splitlines()[0][:300]}`")
    return "\n".join(lines) + "\n"


def sampling_rows(groups: dict, calib: dict) -> list[dict]:
    """One row per sampling group: each side's tokens/s (median of its runs), the bound of the sitting (read
    bandwidth and matmul peak of the group's calibration at its thread count), igpt's share of it, the ratios."""
    from common import sampling_bound

    rows = []
    for gid in SAMPLING:
        g = groups.get(gid)
        if g is None:
            continue
        v = g["variants"]
        spec = v["igpt"]["spec"]
        cal = g.get("calibration", calib).get(str(spec["threads"]), {})
        facts = next((x["notes"]["facts"] for var in v.values() for x in var["runs"] if "notes" in x), None)
        bound = (sampling_bound(facts, spec["batch"], cal["read_gbs"], cal["peak_gflops"])
                 if facts and cal.get("read_gbs") and cal.get("peak_gflops") else None)
        row = {"group": gid, "batch": spec["batch"], "new_tokens": spec["new_tokens"], "threads": spec["threads"],
               "shape": spec["shape"],
               "read_gbs": cal.get("read_gbs"), "peak_gflops": cal.get("peak_gflops"), "bound": bound,
               "errors": {label: var["errors"] for label, var in v.items()}}
        for label, var in v.items():
            row[label] = var["throughput"]["median"]
            row[f"{label}_spread_pct"] = var["throughput"]["spread_pct"]
        compile_s = [x["notes"]["compile_s"] for x in v.get("generate_static", {}).get("runs", [])
                     if "compile_s" in x.get("notes", {})]
        row["compile_s"] = summarise(compile_s)["median"]
        igpt = row.get("igpt")
        row["share"] = igpt / bound["tokens_per_s"] if igpt and bound else None
        row["vs_dynamic"] = ratio(igpt, row.get("generate_dynamic"))
        row["vs_static"] = ratio(igpt, row.get("generate_static"))
        targets = [row["vs_dynamic"], row["vs_static"]] + ([row["share"]] if spec["batch"] >= 16 else [])
        need = [1.0, 1.0] + ([0.6] if spec["batch"] >= 16 else [])
        row["met"] = all(x is not None and x >= t for x, t in zip(targets, need))
        rows.append(row)
    return rows


def sampling_markdown(rows: list[dict], mach: dict, started: str, groups: dict) -> str:
    """The sampling table (its own README block), with the host, the date and the sitting's calibration."""
    if not rows:
        return ""
    main = mach["versions"].get("main", {})
    r0 = rows[0]
    threads = f"{r0['threads']} thread{'s' if r0['threads'] != 1 else ''}"
    model = "igpt's tiny random model (--smoke)" if r0["shape"] == "tiny" else "The bundled SmolLM2-135M-Instruct"
    lines = [f"Measured {started} on **{mach['cpu']}**, {mach['cores']} cores ({mach['platform']}); torch "
             f"{main.get('torch')}, transformers {main.get('transformers')}. {model}, fp32, {threads}, "
             f"{r0['new_tokens']} new tokens, no early stop. Calibration of the sitting: read bandwidth "
             f"**{r0['read_gbs'] or float('nan'):.1f} GB/s** (`big.sum()` of 512 MB fp32, best of 5), fp32 matmul "
             f"peak **{r0['peak_gflops'] or float('nan'):.0f} GFLOP/s** at {threads}.", "",
             "| B | igpt tok/s | generate, dynamic cache | generate, static cache + compile | bound tok/s | "
             "igpt / bound (>= 60% at B 16, 64) | igpt / generate dynamic (>= 1.0x) | "
             "igpt / generate static (>= 1.0x) | met? |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def cell(label):
            x = r.get(label)
            s = r.get(f"{label}_spread_pct")
            return "error" if x is None else fmt(x, "throughput") + (f" (±{s / 2:.0f}%)" if s else "")
        b = r["bound"]
        bound = f"{fmt(b['tokens_per_s'], 'throughput')} ({b['limit']})" if b else "–"
        static = cell("generate_static") + (f"; compile {r['compile_s']:.0f} s" if r.get("compile_s") else "")
        share = f"{100 * r['share']:.0f}%" if r["share"] is not None else "–"
        q = lambda x: f"{x:.2f}x" if x is not None else "–"  # noqa: E731
        lines.append(f"| {r['batch']} | {cell('igpt')} | {cell('generate_dynamic')} | {static} | {bound} | {share} | "
                     f"{q(r['vs_dynamic'])} | {q(r['vs_static'])} | {'yes' if r['met'] else '**no**'} |")
    kv = [(r["batch"], r["bound"]["kv_bytes"] / r["bound"]["bytes"]) for r in rows if r["bound"]]
    lines += ["", "Bound per decoding step: every weight read once (the tied embedding once, as the LM head) and the "
                  "KV cache at the mean context over the read bandwidth, or 2 FLOPs per matmul parameter per row "
                  "plus attention (4 · layers · hidden · mean context per row) over the matmul peak, whichever is "
                  "longer; tokens/s = B / step. The KV cache's share of the bytes: " +
                  ", ".join(f"{100 * f:.0f}% at B={b}" for b, f in kv) + "."]
    worst = max((var["max_contention_cores"] for gid in SAMPLING if gid in groups
                 for var in groups[gid]["variants"].values()), default=0)
    lines += ["", f"Other processes used at most {worst:.2f} cores during any run (runs over {CONTENTION_LIMIT} cores "
                  "are measured again, twice at most)."]
    errs = [(r["batch"], label, e) for r in rows for label, es in r["errors"].items() for e in es]
    if errs:
        lines += ["", "Errors (recorded instead of a number):"]
        lines += [f"- B={b} — {label}: `{e.splitlines()[0][:300]}`" for b, label, e in errs]
    return "\n".join(lines) + "\n"


def update_readme(text: str, block: str = "results") -> None:
    readme = BENCH / "README.md"
    start, end = f"<!-- {block}:start -->", f"<!-- {block}:end -->"
    body = readme.read_text() if readme.exists() else f"# Benchmarks\n\n{start}\n{end}\n"
    if start not in body:
        body += f"\n{start}\n{end}\n"
    head, rest = body.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{text}{end}{tail}")


def retable(results: Path, args) -> int:
    mach = json.loads((results / "machine.json").read_text())
    groups = {gid: json.loads((results / f"{gid}.json").read_text()) for gid in ORDER
              if (results / f"{gid}.json").exists()}
    old = json.loads((results / "summary.json").read_text()) if (results / "summary.json").exists() else {}
    rows = table_rows(groups, mach["calibration"])
    started, minutes = old.get("started", "?"), old.get("minutes", 0.0)
    srows = sampling_rows(groups, mach["calibration"])
    write_json(results / "summary.json", {**old, "machine": mach, "rows": rows, "sampling_rows": srows})
    md = markdown(rows, mach, started, minutes, groups)
    print(md)
    smd = sampling_markdown(srows, mach, started, groups)
    print(smd)
    if not args.no_readme:
        if rows:  # a results folder of sampling groups alone leaves the training table as it is
            update_readme(md)
        if smd:
            update_readme(smd, "sampling")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated groups: " + ", ".join(ORDER))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="tiny model, 1 step, 1 repeat; results to /tmp")
    ap.add_argument("--results", default=str(BENCH / "results"))
    ap.add_argument("--no-readme", action="store_true")
    ap.add_argument("--retable", action="store_true",
                    help="measure nothing: rebuild summary.json and the README table from results/*.json")
    args = ap.parse_args()
    for py in (PY_MAIN, PY_TRL112):
        if not py.exists():
            print(f"missing {py}: run `make bench` (it creates the bench environments) or bench/setup.sh")
            return 2
    results = Path("/tmp/igpt-bench-smoke-results") if args.smoke else Path(args.results)
    if args.retable:
        return retable(results, args)
    results.mkdir(parents=True, exist_ok=True)
    scratch = Path(os.environ.get("IGPT_BENCH_WORK", "/tmp/igpt-bench")) / "runs"
    scratch.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M %Z")
    t_start = time.perf_counter()
    groups_to_run = [g for g in ORDER if not args.only or g in args.only.split(",")]
    repeats = 1 if args.smoke else args.repeats
    overrides = {"shape": "tiny", "threads": 1, "warmup": 1, "steps": 1} if args.smoke else {}

    log("setup: random models and synthetic data (reused when present)")
    prep = run_worker("setup", {"task": "prepare", "threads": 2}, scratch, "prepare")
    if "error" in prep:
        print(prep.get("traceback", prep["error"]))
        return 1
    calib = {}
    for threads in (1, 2):
        log(f"calibration: fp32 matmul at {threads} thread(s)")
        c = run_worker("setup", {"task": "calibrate", "threads": threads}, scratch, f"calibrate-{threads}")
        calib[str(threads)] = c
        log(f"  peak {c.get('peak_gflops', float('nan')):.1f} GFLOP/s")
    groups = {}
    for gid in groups_to_run:
        extra = SAMPLE_SMOKE if args.smoke and gid in SAMPLING else {}
        groups[gid] = run_group(gid, GROUPS[gid], repeats, scratch, {**overrides, **extra})
        write_json(results / f"{gid}.json", groups[gid])
    # calibrate again at the end: the peak is the best this machine showed during the sitting
    runs = {k: [v] for k, v in calib.items()}
    for threads in (1, 2):
        log(f"calibration again: fp32 matmul at {threads} thread(s)")
        c = run_worker("setup", {"task": "calibrate", "threads": threads}, scratch, f"calibrate-{threads}-end")
        log(f"  peak {c.get('peak_gflops', float('nan')):.1f} GFLOP/s")
        runs[str(threads)].append(c)
    calib = {k: max(v, key=lambda c: c.get("peak_gflops", 0)) for k, v in runs.items()}
    # the read bandwidth (sampling groups' bound) is the best of the sitting too, whichever run showed it
    calib = {k: {**c, "read_gbs": max((x.get("read_gbs") or 0 for x in runs[k]), default=0) or None}
             for k, c in calib.items()}
    for gid, g in groups.items():  # each group keeps its sitting's peak, so a later --retable credits it right
        g["calibration"] = {k: {"peak_gflops": c.get("peak_gflops"), "read_gbs": c.get("read_gbs")}
                            for k, c in calib.items()}
        write_json(results / f"{gid}.json", g)
    mach = machine(calib)
    mach["calibration_runs"] = {k: [c.get("peak_gflops") for c in v] for k, v in runs.items()}
    mach["read_gbs_runs"] = {k: [c.get("read_gbs") for c in v] for k, v in runs.items()}
    write_json(results / "machine.json", mach)
    # groups measured in an earlier sitting are not mixed into this table
    rows = table_rows(groups, calib)
    srows = sampling_rows(groups, calib)
    minutes = (time.perf_counter() - t_start) / 60
    summary = {"started": started, "minutes": minutes, "repeats": repeats, "smoke": args.smoke, "machine": mach,
               "rows": rows, "sampling_rows": srows}
    write_json(results / "summary.json", summary)
    md = markdown(rows, mach, started, minutes, groups)
    if rows or not srows:  # a sitting of sampling groups alone has no rows for the training table
        print(md)
    smd = sampling_markdown(srows, mach, started, groups)
    print(smd)
    if not args.smoke and not args.no_readme and not args.only:
        update_readme(md)
    if smd and not args.smoke and not args.no_readme:  # its own block, header and calibration: --only too
        update_readme(smd, "sampling")
    log(f"done in {minutes:.1f} min; results in {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
