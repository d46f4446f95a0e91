"""`make gold`: does igpt's PPO make answers better by a judge it never trained on? (README, "Gold-judged
experiment").

Two tasks (--task), each with a gold labeller nobody on igpt wrote (the `[gold]` extra):
  reply    reply to a message in one sentence, in a warm, positive tone (make_prompts.py), judged by VADER's
           sentiment lexicon (gold_judge.py); the default
  explain  explain a topic to a ten-year-old in a short paragraph (explain/make_prompts.py; up to 64 new
           tokens), judged by textstat's Flesch reading ease (readability_judge.py)
Every other setting is common to both (the size's config). The driver only calls igpt's stages, as a user would
(each one resumes or is skipped when its output exists, so a rerun picks up where a run stopped):

  1. igpt sft       on data/demos.jsonl
  2. igpt sample    K responses per training prompt (prompts_train.jsonl) from the SFT model
  3. igpt label     the gold judge ranks them (AI feedback: no person in the loop)
  4. igpt train-rm  the proxy reward model, on the gold judge's rankings; its held-out rankings are whole messages
                    (the prompts' "group", which sample and label carry), none trained on under another framing
  5. igpt ppo --watch JUDGE --watch-prompts VALID  PPO against the proxy, watched by the gold judge on validation
                                                    prompts (prompts_valid.jsonl) every watch_every iterations: proxy
                                                    and gold against KL to SFT as it runs, and the policy of best gold
                                                    kept as ppo/best/ (early stopping on a validation set)
  6. igpt compare ppo@best sft --judge JUDGE        the gold win rate of that point on held-out prompts
                                                    (prompts_heldout.jsonl, messages neither trained on nor used to
                                                    pick it), with its interval; and of the final policy beside it

and prints, and saves in RUN/gold-summary.json, the reward model's held-out accuracy, the watched points, the point
it picks, and the gold win rates (raw and length-controlled) with each side's mean length. The prompts carry their
message as "group": train-rm holds out a message's rankings together (step 4), and the raw win rate's interval is
clustered by message.

    python examples/gold/run.py                       # the full run (examples/gold/gold.yaml, SmolLM2-135M)
    python examples/gold/run.py --task explain --run-dir runs/gold-explain   # the second task
    python examples/gold/run.py --tiny --run-dir /tmp/g --judge python:myrule:score   # seconds: the mechanics
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DATA = REPO / "data"

# Counts per size (the rest of each stage's size lives in its config file): training prompts sampled K times for
# the reward model's rankings (from prompts_train.jsonl; PPO trains on all of it), validation prompts of every
# watch (from prompts_valid.jsonl), held-out prompts of compare (from prompts_heldout.jsonl, whole
# messages), and the demonstrations whose mean score train-rm sets to 0 (the first of data/demos.jsonl: the bias
# is one number, and scoring all 320 long demos took 3 min).
SIZES = {
    "full": {"config": HERE / "gold.yaml", "rm_prompts": 240, "watch_prompts": 80, "compare_prompts": 80,
             "norm_demos": 64},
    "tiny": {"config": HERE / "tiny.yaml", "rm_prompts": 12, "watch_prompts": 4, "compare_prompts": 8,
             "norm_demos": 8},
}
# The tasks (README, "Gold-judged experiment"): each its prompts' folder (prompts_train, _valid and _heldout.jsonl,
# grouped by source message or topic), its gold judge, and the longest response it samples where that differs
# from the config's (the size's config, common to both tasks, holds every other setting).
TASKS = {
    "reply": {"prompts": HERE, "judge": "python:gold_judge:score", "max_new_tokens": None},   # one warm sentence
    "explain": {"prompts": HERE / "explain", "judge": "python:readability_judge:score",        # a paragraph a
                "max_new_tokens": 64},                                                          # child can read
}


def subprocess_igpt(*args: str) -> None:
    """Run one igpt command in its own process (how a user runs it); stop the experiment if it fails."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
    code = subprocess.call([sys.executable, "-m", "instructgpt_cli", *args], env=env)
    if code:
        raise SystemExit(f"gold: `igpt {' '.join(args)}` exited {code}")


def take_lines(src: Path, dst: Path, n: int) -> Path:
    """The first ``n`` lines of a JSONL file, written to ``dst`` (the same file on a rerun)."""
    lines = [x for x in src.read_text(encoding="utf-8").splitlines() if x.strip()][:n]
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("".join(x + "\n" for x in lines), encoding="utf-8")
    return dst


def take_messages(src: Path, dst: Path, n: int) -> Path:
    """The prompts of the first messages of a JSONL prompts file (their "group", in order of first appearance),
    every framing of each, up to ``n`` prompts in the file's order, written to ``dst``: a cut of whole messages,
    so an interval clustered by message has whole clusters (all of the file when ``n`` covers it)."""
    lines = [x for x in src.read_text(encoding="utf-8").splitlines() if x.strip()]
    groups = [json.loads(x).get("group") or x for x in lines]
    size = {g: groups.count(g) for g in groups}
    kept, count = set(), 0
    for g in dict.fromkeys(groups):
        if count + size[g] > n:
            break
        kept.add(g)
        count += size[g]
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("".join(x + "\n" for x, g in zip(lines, groups) if g in kept), encoding="utf-8")
    return dst


def main(argv: list[str] | None = None, igpt: Callable[..., None] = subprocess_igpt) -> dict:
    """Run the experiment; ``igpt(*args)`` runs one command (a test passes an in-process runner)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--run-dir", default="runs/gold", help="run directory (default runs/gold)")
    p.add_argument("--task", choices=sorted(TASKS), default="reply",
                   help="reply: answer a message in one warm sentence, judged by VADER's valence (default); explain: "
                        "explain a topic to a ten-year-old in a short paragraph, judged by the Flesch reading ease")
    p.add_argument("--judge", default=None, help="the gold judge, igpt's --judge form (default: the task's)")
    p.add_argument("--seed", type=int, default=0, help="seed of every stage (sampling, data order, init)")
    p.add_argument("--tiny", action="store_true", help="the random tiny model and a few prompts: the mechanics")
    p.add_argument("--config", default=None, help="igpt config with every stage's section (default by size)")
    p.add_argument("--allow-weak-rm", action="store_true",
                   help="run PPO even when the reward model's held-out accuracy interval reaches 50%% (the full-size "
                        "recipe refuses: PPO against a reward model at chance optimises noise)")
    p.add_argument("--also-frontier", action="store_true",
                   help="also run the earlier recipe on the same PPO run: keep every checkpoint, draw the frontier "
                        "afterwards (eval ppo --checkpoints all --gold) on the same validation prompts, pick its PPO "
                        "point of best gold and compare that one with SFT too; the summary sets the two picks, "
                        "their held-out results and their costs side by side. Give it from the start: a PPO stage "
                        "that finished without it kept only its newest checkpoints")
    a = p.parse_args(argv)
    size, task = SIZES["tiny" if a.tiny else "full"], TASKS[a.task]
    a.judge = a.judge or task["judge"]
    train, valid, heldout = (task["prompts"] / f"prompts_{s}.jsonl" for s in ("train", "valid", "heldout"))
    # the task's response length, on every command that samples (the watch samples as PPO does)
    tokens = ["--max-new-tokens", str(task["max_new_tokens"])] if task["max_new_tokens"] else []
    cfg, run, seed = str(a.config or size["config"]), Path(a.run_dir), str(a.seed)
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))  # gold_judge for an in-process runner, as PYTHONPATH for a subprocess
    work = run / "gold-data"
    rm_prompts = take_lines(train, work / "rm_prompts.jsonl", size["rm_prompts"])
    watch_prompts = take_lines(valid, work / "watch_prompts.jsonl", size["watch_prompts"])
    compare_prompts = take_messages(heldout, work / "compare_prompts.jsonl", size["compare_prompts"])
    norm_demos = take_lines(DATA / "demos.jsonl", work / "norm_demos.jsonl", size["norm_demos"])
    samples, rankings = work / "samples.jsonl", work / "rankings.jsonl"
    common = ["--config", cfg, "--run-dir", str(run), "--seed", seed]
    times: dict[str, float] = {}

    def stage(name: str, *args: str, label: str | None = None) -> None:
        start = time.perf_counter()
        print(f"\n== gold: igpt {name} {' '.join(args)}", flush=True)
        igpt(name, *args)
        times[label or name] = times.get(label or name, 0.0) + time.perf_counter() - start

    # 1-4: SFT, then the proxy reward model on the gold judge's rankings of the SFT model's samples
    stage("sft", *common, "--data", str(DATA / "demos.jsonl"), "--resume")
    if not samples.exists():
        stage("sample", *common, *tokens, "--prompts", str(rm_prompts), "--out", str(samples))
    stage("label", str(samples), "--judge", a.judge, "--out", str(rankings))  # resumes after ranked prompts
    stage("train-rm", *common, "--rankings", str(rankings), "--demos", str(norm_demos), "--resume")
    # 5: PPO, watched by the gold judge on the validation prompts: ppo/best/ is the point of best gold
    # (the full-size recipe first requires the reward model to be above chance on held-out messages; the tiny
    # run's random model is not meant to be)
    gate = [] if a.tiny or a.allow_weak_rm else ["--require-rm-above-chance"]
    keep = ["--keep-checkpoints", "100"] if a.also_frontier else []
    stage("ppo", *common, *tokens, "--prompts", str(train), "--ptx-data", str(DATA / "pretrain.jsonl"),
          "--watch", a.judge, "--watch-prompts", str(watch_prompts), *gate, *keep, "--resume")
    # (--also-frontier) the earlier recipe: the frontier of the kept checkpoints afterwards, on the same prompts
    frontier_pick = None
    if a.also_frontier:
        stage("eval", "ppo", *common, *tokens, "--checkpoints", "all", "--gold", a.judge,
              "--prompts", str(watch_prompts), "--overwrite", label="frontier")
        frontier_pick = pick_frontier(json.loads((run / "eval" / "ppo-frontier" / "report.json")
                                                 .read_text(encoding="utf-8")))
    # 6: the gold win rates over SFT on held-out prompts, of the point the watch kept and of the final policy
    chosen = pick(json.loads((run / "ppo" / "watch.json").read_text(encoding="utf-8")))
    for model in dict.fromkeys([chosen, "ppo", *([frontier_pick] if frontier_pick else [])]):
        stage("compare", model, "sft", *common, *tokens, "--judge", a.judge, "--prompts", str(compare_prompts),
              "--overwrite")
    return summarise(run, a.task, a.judge, chosen, times, frontier_pick)


def pick(watch: dict) -> str:
    """The recipe's point, as compare names it: the watch's best (``ppo@best``; the first of equal golds, the SFT
    point included), or ``ppo`` when that is the final policy."""
    last = watch["points"][-1]["step"]
    return "ppo" if watch["best"]["step"] == last else "ppo@best"


def pick_frontier(frontier: dict) -> str:
    """The earlier recipe's point, from the frontier drawn afterwards (eval/ppo-frontier/report.json): the PPO
    checkpoint of highest mean gold on the validation prompts (the earliest of equal ones; the SFT point is not a
    candidate), as compare names it: ``ppo@step-N``, or ``ppo`` for the final policy."""
    points = [p for p in frontier["points"] if p["step"] > 0 and p.get("gold_mean") is not None]
    if not points:
        raise SystemExit("the frontier has no PPO checkpoint with a gold score to pick (eval/ppo-frontier/report.json)")
    best = max(points, key=lambda p: p["gold_mean"])  # max keeps the first of equal ones
    return "ppo" if best["label"].startswith("final") else f"ppo@step-{best['step']}"


def summarise(run: Path, task: str, judge: str, chosen: str, times: dict[str, float],
              frontier_pick: str | None = None) -> dict:
    """Print and save (RUN/gold-summary.json) what the experiment measured."""
    from instructgpt_cli.rewards import reward_stats
    from instructgpt_cli.stages.compare import result_dir
    from instructgpt_cli.storage import atomic_write_text

    def versus_sft(model: str) -> dict:
        # compare clusters its interval by the prompts' "group" (the message): the held-out prompts are 20
        # messages under 4 framings, whose judgments are not independent; ci_iid is Wilson's over 80 prompts
        r = json.loads((result_dir(run, f"{model.replace('@', '-')}-vs-sft", judge) / "report.json")
                       .read_text(encoding="utf-8"))
        keys = ("win_rate", "ci_low", "ci_high", "ci_iid", "groups", "design_effect", "ci_method", "wins", "ties",
                "losses")
        return {"model": model, **{k: r.get(k) for k in keys},
                "length_controlled": r.get("length_controlled"), "mean_length": r.get("mean_length")}

    watch = json.loads((run / "ppo" / "watch.json").read_text(encoding="utf-8"))
    rm = reward_stats(run / "rm" / "final") or {}
    keys = ("step", "kl", "proxy", "gold", "gold_ci", "length", "words", "seconds")
    proxy_best = max(watch["points"], key=lambda p: p["proxy"])["step"]
    summary = {
        "task": task, "judge": judge,
        "rm_accuracy": {k: rm.get(f"eval/{k}")
                        for k in ("accuracy", "accuracy_ci_low", "accuracy_ci_high", "rankings")},
        "watched": [{k: pt.get(k) for k in keys} for pt in watch["points"]], "fit": watch.get("fit"),
        "best_gold": watch["best"]["step"], "best_proxy": proxy_best, "picked": chosen,
        "picked_vs_sft": versus_sft(chosen), "final_vs_sft": versus_sft("ppo"),
        "seconds": {k: round(v, 1) for k, v in times.items()},
        "watch_seconds": round(sum(pt.get("seconds") or 0.0 for pt in watch["points"]), 1),
    }
    if frontier_pick:
        fr = json.loads((run / "eval" / "ppo-frontier" / "report.json").read_text(encoding="utf-8"))
        summary["frontier"] = {
            "picked": frontier_pick, "picked_vs_sft": versus_sft(frontier_pick),
            "seconds": summary["seconds"]["frontier"],
            "points": [{"label": p["label"], "step": p["step"], "kl": p.get("kl_to_sft"), "proxy": p.get("score_mean"),
                        "gold": p.get("gold_mean")} for p in fr["points"]]}
    atomic_write_text(run / "gold-summary.json", json.dumps(summary, indent=2) + "\n")
    acc = summary["rm_accuracy"]
    print(f"\n== gold: the experiment (task {task}, gold {judge})")
    if acc["accuracy"] is not None:
        print(f"reward model held-out pair accuracy {acc['accuracy']:.1%} "
              f"(95% CI {acc['accuracy_ci_low']:.1%}-{acc['accuracy_ci_high']:.1%} clustered by ranking, "
              f"{acc['rankings']} rankings of messages it never trained on)")
    print("the watch on validation prompts (PPO's temperature):")
    print(f"{'iteration':>10} {'KL to SFT':>10} {'proxy':>8} {'gold':>8} {'words':>7} {'seconds':>8}")
    for pt in summary["watched"]:
        print(f"{pt['step']:>10} {pt['kl']:>10.3f} {pt['proxy']:>8.3f} {pt['gold']:>8.3f} {pt['words']:>7.1f} "
              f"{pt['seconds']:>8.1f}")
    print(f"best gold: iteration {summary['best_gold']}; the proxy would pick: iteration {summary['best_proxy']}; "
          f"the recipe keeps the point of best gold: {chosen}")
    for name, w in (("picked", summary["picked_vs_sft"]), ("final", summary["final_vs_sft"])):
        lc, ml = w["length_controlled"] or {}, w["mean_length"] or {}
        print(f"gold win rate of {w['model']} ({name}) over sft on held-out prompts: {w['win_rate']:.1%} "
              f"(95% CI {w['ci_low']:.1%}-{w['ci_high']:.1%} clustered by message over {w['groups']} messages; "
              f"{w['wins']} wins, {w['ties']} ties, {w['losses']} losses)")
        if lc.get("win_rate") is not None:
            print(f"  length-controlled: {lc['win_rate']:.1%} (95% CI {lc['ci_low']:.1%}-{lc['ci_high']:.1%})")
        if ml:
            print(f"  mean length (words): {w['model']} {ml['a']['words']:.1f}, sft {ml['b']['words']:.1f}")
        if name == "picked" and w["model"] == "ppo":
            break  # the final policy is the pick
    if frontier_pick:
        w = summary["frontier"]["picked_vs_sft"]
        print(f"the earlier recipe (frontier drawn afterwards, {summary['frontier']['seconds']:.0f} s against the "
              f"watches' {summary['watch_seconds']:.0f} s) picks {frontier_pick}: gold win rate over sft "
              f"{w['win_rate']:.1%} (95% CI {w['ci_low']:.1%}-{w['ci_high']:.1%}; {w['wins']} wins, {w['ties']} ties, "
              f"{w['losses']} losses)")
    print(f"saved {run / 'gold-summary.json'}; stage seconds {summary['seconds']}")
    return summary


if __name__ == "__main__":
    main()
