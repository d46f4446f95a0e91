"""Behaviour fixture: proof that a refactor changed nothing igpt does.

Runs the igpt CLI as subprocesses (``python -m instructgpt_cli``, one thread, seeded) over a small chain on
the tiny random model: sft -> train-rm -> dpo, PPO with full weights (PPO-ptx, EMA and exactly one
NaN-skipped iteration), PPO with LoRA (ptx and EMA), and killed-then-resumed runs of sft, train-rm, dpo, full
PPO and LoRA PPO next to their uninterrupted twins. Everything the runs leave that should not depend on the
clock is written to one JSON fixture: every metrics.jsonl line (wall-clock fields dropped), the sha256 of
every weights file under each stage's final/ (and of checkpoints' weights), final/'s JSON files parsed, the
PPO samples, the manifest's lasting fields, exit codes. Two fixtures compare with ``--check``.

    # the baseline, from a tree of the commit before the refactor (its own .venv, so its own package)
    cd /work/base && .venv/bin/python /work/main/bench/behaviour.py --out /work/fixture-base.json --workdir /tmp/fx-base
    # after the refactor
    cd /work/main && .venv/bin/python bench/behaviour.py --out /work/fixture-new.json --workdir /tmp/fx-new
    .venv/bin/python bench/behaviour.py --check /work/fixture-base.json /work/fixture-new.json

The package that runs is the one ``python -m instructgpt_cli`` imports with the working directory set to
the repository (``--repo``; by default the tree whose .venv runs this script, else the tree holding this
script): its path is printed and kept in the fixture's ``_meta``, which ``--check`` shows but does not compare.

The NaN step: no CLI switch makes a reward NaN, so the script builds a reward model that gives NaN for one
input. It copies train-rm's final model and dedicates one hidden dimension F (zeroed in every weight that
reads or writes it, so it is exactly 0 in every position of every input) and one MLP unit G of layer 0 to a
trigger byte ('~', in one prompt only): that byte's embedding has 1 in F; G's gate and up rows read only F,
with weight 1e20, so at the trigger's position (gate * up) overflows to inf and G's zero down-projection
column turns it into NaN, which attention carries to every later position, the RM's score among them. Every
weight stays finite (checkpoints refuse non-finite weights) and, without the trigger, every gradient into F
or G is exactly 0, so the value model (initialised from this RM) keeps the construction while it trains. The
prompt order (24 prompts, 8 per iteration, 3 iterations: one pass) puts the trigger prompt in iteration 2
only; sampling at T=0.7 from the SFT model makes the policy writing '~' itself very unlikely, and the
fixture records (checks.*) that exactly one step was skipped.

All command lines are in the COMMANDS table below: if an option is renamed, change it there (and only there).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

# one thread everywhere, before torch is imported (here or in any subprocess): bit-identical results need it
THREADS = "1"
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = THREADS

# ====================================================================================================
# COMMANDS: every igpt command line the fixture runs, in order. {W} is the work directory, {D} its data/.
# Each row: (name, run directory under {W}, igpt arguments, extra environment, expected exit status).
# A run directory's stages are recorded after its last command. Options renamed by a refactor: edit here.
# ====================================================================================================
FAULT = "IGPT_FAULT_AFTER_STEP"  # faults.py: N = exit 99 after step N; N:publish; N:SIGTERM
SFT = ["sft", "--model", "tiny", "--data", "{D}/demos.jsonl", "--max-steps", "60", "--max-seq-len", "256",
       "--lr", "3e-3", "--batch-size", "8", "--val-fraction", "0.1", "--eval-every", "20", "--save-every", "20",
       "--seed", "0"]
RM = ["train-rm", "--rankings", "{D}/rankings.jsonl", "--demos", "{D}/demos.jsonl", "--sft", "{W}/chain/sft/final",
      "--max-steps", "8", "--lr", "2e-3", "--batch-size", "8", "--val-fraction", "0.25", "--eval-every", "3",
      "--save-every", "3", "--seed", "0"]
DPO = ["dpo", "--rankings", "{D}/rankings.jsonl", "--sft", "{W}/chain/sft/final", "--max-steps", "8",
       "--lr", "3e-3", "--batch-size", "8", "--beta", "0.1", "--val-fraction", "0.25", "--eval-every", "4",
       "--save-every", "2", "--seed", "0"]
PPO = ["ppo", "--sft", "{W}/chain/sft/final", "--max-new-tokens", "24", "--rollout-batch-size", "8",
       "--mini-batch-size", "4", "--ptx-coef", "0.5", "--ptx-data", "{D}/pretrain.jsonl", "--ptx-batch-size", "4",
       "--ema-decay", "0.9", "--sample-every", "1", "--save-every", "2", "--seed", "0"]
# full weights, PPO-ptx, EMA, adaptive KL, and the NaN reward model: iteration 2 of 3 is skipped
PPO_NAN = [*PPO, "--prompts", "{D}/prompts_nan.jsonl", "--rm", "{W}/nan_rm", "--max-steps", "3", "--lr", "1e-3",
           "--vf-lr", "1e-3", "--temperature", "0.7", "--target-kl", "0.5", "--kl-horizon", "80"]
# LoRA on the top layer only (the frozen layer cached), PPO-ptx, EMA
PPO_LORA = [*PPO, "--prompts", "{D}/prompts.jsonl", "--rm", "{W}/chain/rm/final", "--max-steps", "4", "--lr", "3e-3",
            "--lora", "--lora-r", "8", "--lora-alpha", "16", "--lora-layers", "1"]
# full weights, for the kill-and-resume pair: two PPO epochs, adaptive KL, its own value lr
PPO_FULL = [*PPO, "--prompts", "{D}/prompts.jsonl", "--rm", "{W}/chain/rm/final", "--max-steps", "5", "--lr", "3e-3",
            "--vf-lr", "1e-3", "--ppo-epochs", "2", "--target-kl", "0.5", "--kl-horizon", "80"]
RESUME = ["--resume"]

COMMANDS: list[tuple[str, str, list[str], dict[str, str], int]] = [
    # the chain: sft -> train-rm -> dpo in one run directory
    ("sft", "chain", SFT, {}, 0),
    ("train-rm", "chain", RM, {}, 0),
    ("dpo", "chain", DPO, {}, 0),
    # (the NaN reward model is built here from chain/rm/final: see build_nan_rm)
    ("ppo-full-nan", "ppo_nan", PPO_NAN, {}, 0),
    ("ppo-lora", "ppo_lora", PPO_LORA, {}, 0),
    ("ppo-full-straight", "ppo_straight", PPO_FULL, {}, 0),
    # killed after step 3 (exit 99), resumed from the step-2 checkpoint: equal to ppo_straight
    ("ppo-full-killed", "ppo_resumed", PPO_FULL, {FAULT: "3"}, 99),
    ("ppo-full-resume", "ppo_resumed", [*PPO_FULL, *RESUME], {}, 0),
    # LoRA stopped by SIGTERM after step 3 (checkpoint written, exit 143), resumed: equal to ppo_lora
    ("ppo-lora-stopped", "ppo_lora_resumed", PPO_LORA, {FAULT: "3:SIGTERM"}, 143),
    ("ppo-lora-resume", "ppo_lora_resumed", [*PPO_LORA, *RESUME], {}, 0),
    # the other stages killed and resumed: equal to the chain's
    ("sft-killed", "sft_resumed", SFT, {FAULT: "30"}, 99),
    ("sft-resume", "sft_resumed", [*SFT, *RESUME], {}, 0),
    ("train-rm-killed", "rm_resumed", RM, {FAULT: "6:publish"}, 99),
    ("train-rm-resume", "rm_resumed", [*RM, *RESUME], {}, 0),
    ("dpo-stopped", "dpo_resumed", DPO, {FAULT: "5:SIGTERM"}, 143),
    ("dpo-resume", "dpo_resumed", [*DPO, *RESUME], {}, 0),
]
# pairs whose final weights and metrics must be equal (recorded under checks, compared by --check too)
SAME_AS = {"ppo_resumed": ("ppo_straight", "ppo"), "ppo_lora_resumed": ("ppo_lora", "ppo"),
           "sft_resumed": ("chain", "sft"), "rm_resumed": ("chain", "rm"), "dpo_resumed": ("chain", "dpo")}
TRIGGER = "~"  # the byte the NaN reward model scores NaN
TRIGGER_PROMPT = 4  # index in prompts_nan.jsonl: with seed 0, 24 prompts and 8 per iteration, iteration 2
# ====================================================================================================

STAGES = ("sft", "rm", "ppo", "dpo")
WALL_CLOCK = ("elapsed_s", "train/tokens_per_s")  # plus every timing/* key and any *_per_s
MARKER = ".behaviour-workdir"


def wall_clock(key: str) -> bool:
    return key.startswith("timing/") or key in WALL_CLOCK or key.endswith("_per_s")


# ---------------------------------------------------------------------------------------------- data


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def write_data(d: Path) -> None:
    """Small inputs, the same every time (the generators of tests/conftest.py and tests/test_ppo.py)."""
    d.mkdir(parents=True)
    rng = random.Random(0)
    demos = []
    for _ in range(32):
        a, b = rng.randint(1, 30), rng.randint(1, 30)
        demos.append({"prompt": f"What is {a} plus {b}?", "response": f"{a} plus {b} is {a + b}.",
                      "category": "closed_qa"})
    write_jsonl(d / "demos.jsonl", demos)
    # rankings with a learnable preference (responses with 'banana' win), as the tests make them
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import marker_rankings

    rankings = marker_rankings(32, seed=1)
    write_jsonl(d / "rankings.jsonl", rankings)
    rng = random.Random(2)
    prompts = [{"prompt": f"What is {rng.randint(1, 30)} plus {rng.randint(1, 30)}?"} for _ in range(24)]
    write_jsonl(d / "prompts.jsonl", prompts)
    prompts[TRIGGER_PROMPT] = {"prompt": f"What is {TRIGGER} plus 3?"}
    write_jsonl(d / "prompts_nan.jsonl", prompts)
    pwords = "the quick brown fox jumps over a lazy dog while seven wizards quietly hum old tunes".split()
    write_jsonl(d / "pretrain.jsonl", [{"text": " ".join(rng.choice(pwords) for _ in range(60))} for _ in range(40)])


def build_nan_rm(src: Path, dst: Path) -> dict:
    """A copy of the reward model at ``src`` whose score is NaN for any sequence holding TRIGGER (module
    docstring); finite and unchanged in meaning otherwise. No COMPLETED file: a model from 'another tool'."""
    import torch
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name != "COMPLETED":
            shutil.copy2(f, dst / f.name)
    trigger = json.loads((dst / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"][TRIGGER]
    sd = load_file(str(dst / "model.safetensors"))
    hidden = sd["model.embed_tokens.weight"].shape[1]
    inter = sd["model.layers.0.mlp.gate_proj.weight"].shape[0]
    F, G = hidden - 1, inter - 1
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("model.layers."))
    with torch.no_grad():
        emb = sd["model.embed_tokens.weight"]
        emb[:, F] = 0.0
        emb[trigger, F] = 1.0
        for i in range(layers):
            p = f"model.layers.{i}."
            for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
                sd[p + m + ".weight"][:, F] = 0.0  # nothing reads F ...
            for m in ("self_attn.o_proj", "mlp.down_proj"):
                sd[p + m + ".weight"][F, :] = 0.0  # ... and nothing writes it
            sd[p + "input_layernorm.weight"][F] = 1.0
            sd[p + "post_attention_layernorm.weight"][F] = 1.0
        sd["model.norm.weight"][F] = 1.0
        sd["score.weight"][:, F] = 0.0
        p = "model.layers.0.mlp."
        sd[p + "gate_proj.weight"][G, :] = 0.0
        sd[p + "up_proj.weight"][G, :] = 0.0
        sd[p + "down_proj.weight"][:, G] = 0.0  # inf * 0: NaN
        sd[p + "gate_proj.weight"][G, F] = 1e20  # ... but G reads F, hugely
        sd[p + "up_proj.weight"][G, F] = 1e20
    save_file({k: v.contiguous() for k, v in sd.items()}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return {"trigger": TRIGGER, "trigger_id": trigger, "dim": F, "unit": G,
            "sha256": sha256(dst / "model.safetensors")}


# ---------------------------------------------------------------------------------------------- recording


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:?\d\d)?")


class Normaliser:
    """Paths of this machine made neutral ($WORKDIR, $REPO), dates and times as $TIME (the key stays), NaN and
    infinities as strings (strict JSON)."""

    def __init__(self, workdir: Path, repo: Path):
        self.subs = sorted({(str(workdir), "$WORKDIR"), (str(workdir.resolve()), "$WORKDIR"),
                            (str(repo), "$REPO"), (str(repo.resolve()), "$REPO")}, key=lambda s: -len(s[0]))

    def __call__(self, x):
        if isinstance(x, float) and not math.isfinite(x):
            return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")
        if isinstance(x, str):
            x = TIMESTAMP.sub("$TIME", x)
            for a, b in self.subs:
                x = x.replace(a, b)
            return x
        if isinstance(x, dict):
            return {self(k): self(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [self(v) for v in x]
        return x


def read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def record_dir(d: Path, norm: Normaliser) -> dict:
    """Files of a final/ (or model) directory: weights and other files by sha256 (text files once normalised),
    JSON files parsed."""
    out: dict = {"weights_sha256": {}, "json": {}, "other_sha256": {}}
    for f in sorted(p for p in d.rglob("*") if p.is_file()):
        rel = f.relative_to(d).as_posix()
        if f.name == "COMPLETED":  # a timestamp and the hashes below
            continue
        if f.suffix == ".safetensors":
            out["weights_sha256"][rel] = sha256(f)
        elif f.suffix == ".json" and f.name not in ("tokenizer.json",):
            out["json"][rel] = norm(json.loads(f.read_text(encoding="utf-8")))
        else:  # text with this machine's paths normalised first (peft's README names the base model's path)
            try:
                text = f.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                out["other_sha256"][rel] = sha256(f)
            else:
                out["other_sha256"][rel] = hashlib.sha256(norm(text).encode("utf-8")).hexdigest()
    return out


MANIFEST_VOLATILE = {"pid", "host", "hostname"}  # timestamps are kept as $TIME (Normaliser)


def lasting(x):
    """The manifest without its process fields."""
    if isinstance(x, dict):
        return {k: lasting(v) for k, v in x.items() if k not in MANIFEST_VOLATILE}
    if isinstance(x, list):
        return [lasting(v) for v in x]
    return x


def record_run_dir(run: Path, norm: Normaliser) -> dict:
    rec: dict = {}
    for stage in STAGES:
        s = run / stage
        if not s.is_dir():
            continue
        r: dict = {}
        if (s / "metrics.jsonl").is_file():
            r["metrics"] = norm([{k: v for k, v in m.items() if not wall_clock(k)}
                                 for m in read_jsonl(s / "metrics.jsonl")])
            r["dropped_metric_keys"] = sorted({k for m in read_jsonl(s / "metrics.jsonl") for k in m if wall_clock(k)})
            r["final_metrics"] = r["metrics"][-1] if r["metrics"] else None
        if (s / "final").is_dir():
            r["final"] = record_dir(s / "final", norm)
        if (s / "samples").is_dir():
            r["samples"] = {f.name: norm(read_jsonl(f)) for f in sorted((s / "samples").glob("*.jsonl"))}
        if (s / "checkpoints").is_dir():
            r["checkpoints"] = {c.name: {f.relative_to(c).as_posix(): sha256(f)
                                         for f in sorted(c.rglob("*.safetensors"))}
                                for c in sorted((s / "checkpoints").iterdir()) if c.is_dir()}
        r["files"] = sorted(p.relative_to(s).as_posix() for p in s.iterdir())
        rec[stage] = r
    if (run / "manifest.json").is_file():
        rec["manifest"] = norm(lasting(json.loads((run / "manifest.json").read_text(encoding="utf-8"))))
    return rec


def comparable(stage_rec: dict) -> dict:
    return {"metrics": stage_rec.get("metrics"), "final_weights": stage_rec.get("final", {}).get("weights_sha256")}


# ---------------------------------------------------------------------------------------------- running


def default_repo() -> Path:
    venv_tree = Path(sys.prefix).resolve().parent
    if (venv_tree / "instructgpt_cli" / "__init__.py").is_file():
        return venv_tree
    return Path(__file__).resolve().parents[1]


def fresh_workdir(w: Path) -> None:
    if w.exists():
        if any(w.iterdir()) and not (w / MARKER).exists():
            sys.exit(f"--workdir {w} exists, is not empty and was not made by this script: refusing to delete it")
        shutil.rmtree(w)
    w.mkdir(parents=True)
    (w / MARKER).write_text("made by bench/behaviour.py; deleted and rewritten by its next run here\n")


def subprocess_env(w: Path) -> dict:
    env = dict(os.environ)
    env.update({v: THREADS for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "PYTHONHASHSEED": "0",
                "IGPT_CACHE": str(w / "cache"), "COLUMNS": "120", "NO_COLOR": "1"})
    env.pop(FAULT, None)
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES"):
        env.pop(var, None)
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU only, wherever it runs
    return env


def probe_package(repo: Path, env: dict) -> str:
    out = subprocess.run([sys.executable, "-c", "import instructgpt_cli; print(instructgpt_cli.__file__)"],
                         cwd=repo, env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def fill(args: list[str], w: Path) -> list[str]:
    return [a.replace("{W}", str(w)).replace("{D}", str(w / "data")) for a in args]


def run_all(w: Path, repo: Path) -> dict:
    env = subprocess_env(w)
    package = probe_package(repo, env)
    print(f"package: {package}  (python {sys.executable}, cwd {repo})", flush=True)
    if not Path(package).resolve().is_relative_to(repo.resolve()):
        sys.exit(f"the package imported is {package}, not the one in {repo}")
    norm = Normaliser(w, repo)
    write_data(w / "data")
    logs = w / "logs"
    logs.mkdir()
    fixture: dict = {"commands": [], "runs": {}, "checks": {}}
    started = time.perf_counter()
    last_of = {run: name for name, run, *_ in COMMANDS}
    for name, run, args, extra, expect in COMMANDS:
        if name == "ppo-full-nan":  # the NaN reward model, from the chain's
            fixture["nan_rm"] = build_nan_rm(w / "chain" / "rm" / "final", w / "nan_rm")
        argv = [*fill(args, w), "--run-dir", str(w / run)]
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "instructgpt_cli", *argv], cwd=repo, env={**env, **extra},
                              capture_output=True, text=True)
        secs = time.perf_counter() - t0
        (logs / f"{name}.log").write_text(f"$ {' '.join(argv)}\n# env {extra}\n# exit {proc.returncode}\n"
                                          f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}", encoding="utf-8")
        ok = proc.returncode == expect
        print(f"{name:20s} exit {proc.returncode:4d} {'ok' if ok else f'EXPECTED {expect}'}  {secs:6.1f} s", flush=True)
        if not ok:
            print(proc.stderr[-3000:], file=sys.stderr)
        fixture["commands"].append({"name": name, "run_dir": run, "argv": norm(argv), "env": extra,
                                    "exit": proc.returncode, "expected_exit": expect})
        if last_of[run] == name:
            fixture["runs"][run] = record_run_dir(w / run, norm)
    fixture["checks"] = checks(fixture, w)
    fixture["_meta"] = {"package": package, "python": sys.executable, "repo": str(repo), "workdir": str(w),
                        "seconds": round(time.perf_counter() - started, 1), "threads": THREADS,
                        "git_head": git(repo, "rev-parse", "HEAD"),
                        "git_changed_files": len(git(repo, "status", "--porcelain").splitlines())}
    return fixture


def checks(fixture: dict, w: Path) -> dict:
    """Facts the fixture is meant to show, computed from it (and printed): equal resumed runs, one NaN skip."""
    out: dict = {}
    runs = fixture["runs"]
    for run, (twin, stage) in SAME_AS.items():
        a, b = runs.get(run, {}).get(stage), runs.get(twin, {}).get(stage)
        out[f"{run}/{stage} equals {twin}/{stage}"] = bool(a and b and comparable(a) == comparable(b))
    nan = runs.get("ppo_nan", {}).get("ppo", {})
    metrics = nan.get("metrics") or []
    out["ppo_nan skipped_steps by step"] = [m.get("train/skipped_steps") for m in metrics]
    out["ppo_nan NaN scores by step"] = [m.get("objective/scores") == "NaN" for m in metrics]
    responses = [s["response"] for rows in nan.get("samples", {}).values() for s in rows]
    out["ppo_nan responses holding the trigger"] = sum(TRIGGER in r for r in responses)
    out["all exits as expected"] = all(c["exit"] == c["expected_exit"] for c in fixture["commands"])
    for k, v in out.items():
        print(f"check: {k}: {v}")
    return out


def git(repo: Path, *args: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------- --check


def differences(a, b, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            p = f"{path}.{k}" if path else str(k)
            if k not in b:
                out.append(f"{p}: only in A: {short(a[k])}")
            elif k not in a:
                out.append(f"{p}: only in B: {short(b[k])}")
            else:
                out += differences(a[k], b[k], p)
        return out
    if isinstance(a, list) and isinstance(b, list):
        out = []
        if len(a) != len(b):
            out.append(f"{path}: length {len(a)} != {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            out += differences(x, y, f"{path}[{i}]")
        return out
    if type(a) is not type(b) and not (isinstance(a, (int, float)) and isinstance(b, (int, float))
                                       and not isinstance(a, bool) and not isinstance(b, bool)):
        return [f"{path}: {short(a)} ({type(a).__name__}) != {short(b)} ({type(b).__name__})"]
    if a != b:
        extra = ""
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
            extra = f"  (diff {b - a:.3g}, rel {abs(b - a) / max(abs(a), abs(b), 1e-300):.3g})"
        return [f"{path}: {short(a)} != {short(b)}{extra}"]
    return []


def short(x, n: int = 160) -> str:
    s = json.dumps(x, sort_keys=True) if not isinstance(x, str) else repr(x)
    return s if len(s) <= n else s[:n] + "..."


def check(a_path: Path, b_path: Path) -> int:
    a, b = (json.loads(p.read_text(encoding="utf-8")) for p in (a_path, b_path))
    for tag, fx, p in (("A", a, a_path), ("B", b, b_path)):
        meta = fx.get("_meta", {})
        print(f"{tag}: {p}  package {meta.get('package')}  head {meta.get('git_head', '')[:12]} "
              f"(+{meta.get('git_changed_files', '?')} changed files)  {meta.get('seconds')} s")
    diffs = differences({k: v for k, v in a.items() if k != "_meta"}, {k: v for k, v in b.items() if k != "_meta"})
    for d in diffs:
        print(d)
    print(f"{len(diffs)} difference(s)" if diffs else "no difference")
    return 1 if diffs else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--out", type=Path, help="write the fixture here (JSON)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/igpt-behaviour"),
                    help="scratch directory for data and run directories (deleted and rewritten; default %(default)s)")
    ap.add_argument("--repo", type=Path, default=None,
                    help="tree whose instructgpt_cli runs (the subprocesses' cwd); default: the tree whose .venv "
                         "runs this script, else the one holding it")
    ap.add_argument("--check", nargs=2, type=Path, metavar=("A.json", "B.json"),
                    help="compare two fixtures; print every difference; exit 1 if any")
    args = ap.parse_args()
    if args.check:
        return check(*args.check)
    if not args.out:
        ap.error("--out FILE.json or --check A.json B.json")
    repo = (args.repo or default_repo()).resolve()
    w = args.workdir.absolute()
    fresh_workdir(w)
    fixture = run_all(w, repo)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(fixture, indent=1, sort_keys=True, allow_nan=False) + "\n", encoding="utf-8")
    print(f"wrote {args.out} in {fixture['_meta']['seconds']} s (logs in {w / 'logs'})")
    bad = [k for k, v in fixture["checks"].items() if v is False]
    if bad:
        print(f"warning: checks failed: {bad}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
