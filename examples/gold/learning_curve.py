"""How many rankings does a reward model need on your task? train-rm's held-out accuracy against the number of
rankings it trained on (issue 35: a user starting small meets this wall first).

From one rankings file (``igpt label``'s output, with each prompt's "group" where prompts share a source
message), whole groups are held out once (``--heldout-fraction``, seeded), and the same held-out rankings
measure a reward model trained on the first N of the rest for each N of ``--sizes``: ``igpt train-rm
--val-fraction 0`` on them, then ``igpt eval MODEL --rankings HELDOUT --rm ITS_RM``, whose pairwise accuracy
comes with a 95% interval clustered by ranking. Every other setting is the config's ``rm`` section
(``--config``), so the curve is of the recipe you would run, with ``--rm-args`` added to train-rm to measure an
option against it (``--rm-args "--score mean"`` in another ``--run-dir``: the same split, the same sizes;
``--versus`` the recipe's run directory prints the difference at each size with an interval paired by ranking). Prints
a Markdown table and saves ``RUN/learning-curve.json``; each size's run is ``RUN/n-N/`` (a rerun reuses finished
ones).

    python examples/gold/learning_curve.py --rankings runs/gold/gold-data/rankings.jsonl \\
        --sft runs/gold/sft/final --config examples/gold/gold.yaml --run-dir runs/curve --sizes 50,100,200
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import subprocess_igpt  # noqa: E402  (the gold driver's way of running a stage)


def split(rankings: Path, fraction: float, seed: int, out: Path) -> tuple[Path, list[str]]:
    """The held-out rankings (whole groups, as train-rm holds them out) written to ``out``/heldout.jsonl, and
    the remaining lines in their file order."""
    from instructgpt_cli.batches import hold_out

    lines = [x for x in rankings.read_text(encoding="utf-8").splitlines() if x.strip()]
    groups = [json.loads(x).get("group") for x in lines]
    train, held = hold_out(list(range(len(lines))), fraction, seed, groups)
    out.mkdir(parents=True, exist_ok=True)
    heldout = out / "heldout.jsonl"
    heldout.write_text("".join(lines[i] + "\n" for i in sorted(held)), encoding="utf-8")
    return heldout, [lines[i] for i in sorted(train)]


def main(argv: list[str] | None = None, igpt: Callable[..., None] = subprocess_igpt) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rankings", required=True, help="rankings JSONL (igpt label's output)")
    p.add_argument("--sft", required=True, help="the SFT model the reward models start from")
    p.add_argument("--config", required=True, help="igpt config whose rm section is the recipe")
    p.add_argument("--run-dir", default="runs/curve")
    p.add_argument("--sizes", default="50,100,200,400", help="numbers of training rankings, comma-separated")
    p.add_argument("--heldout-fraction", type=float, default=0.2, help="share of groups held out (once)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rm-args", default="", help="more train-rm flags, as one string (e.g. \"--score mean\")")
    p.add_argument("--versus", default="", help="another learning curve's run directory on the same rankings, split "
                                                "and sizes (e.g. the recipe's, when this one is an option's): the "
                                                "difference of the two accuracies at each size, with a paired "
                                                "interval")
    a = p.parse_args(argv)
    run = Path(a.run_dir)
    # a run directory's reward models are of one --rm-args: another would resume them (train-rm finds them
    # finished) and label the old models' accuracies with the new flags
    recorded = run / "rm-args.json"
    if recorded.exists() and json.loads(recorded.read_text(encoding="utf-8")) != a.rm_args:
        sys.exit(f"learning curve: {run} holds reward models trained with --rm-args "
                 f"{json.loads(recorded.read_text(encoding='utf-8'))!r}, not {a.rm_args!r}: use another --run-dir")
    run.mkdir(parents=True, exist_ok=True)
    recorded.write_text(json.dumps(a.rm_args) + "\n", encoding="utf-8")
    heldout, pool = split(Path(a.rankings), a.heldout_fraction, a.seed, run)
    sizes = sorted({int(s) for s in a.sizes.split(",") if s.strip()})
    rows = []
    for n in sizes:
        if n > len(pool):
            print(f"learning curve: {n} rankings asked, {len(pool)} left after holding out; stopping at "
                  f"{len(pool)}")
            n = len(pool)
        folder = run / f"n-{n}"
        train = folder / "train.jsonl"
        folder.mkdir(parents=True, exist_ok=True)
        train.write_text("".join(x + "\n" for x in pool[:n]), encoding="utf-8")
        start = time.perf_counter()
        common = ["--config", a.config, "--run-dir", str(folder), "--seed", str(a.seed)]
        # no normalisation: a constant shift changes no pair's order, and scoring the demonstrations costs minutes
        igpt("train-rm", *common, "--rankings", str(train), "--sft", a.sft, "--val-fraction", "0", "--no-normalize",
             "--resume", *shlex.split(a.rm_args))
        igpt("eval", a.sft, "--run-dir", str(folder), "--rankings", str(heldout), "--rm", str(folder / "rm" / "final"),
             "--sft", a.sft, "--name", "heldout", "--overwrite")
        report = json.loads((folder / "eval" / "heldout" / "report.json").read_text(encoding="utf-8"))
        rows.append({"rankings": n, "accuracy": report["rm_accuracy"], "ci": report["rm_accuracy_ci"],
                     "heldout_rankings": report["rm_rankings"], "pairs": report["rm_pairs"],
                     "seconds": round(time.perf_counter() - start, 1)})
        if n == len(pool):
            break
    result = {"rankings": a.rankings, "config": a.config, "rm_args": a.rm_args, "heldout": str(heldout),
              "seed": a.seed, "rows": rows}
    if a.versus:
        result["versus"] = {"run_dir": a.versus, "rows": versus(run, Path(a.versus), rows)}
    (run / "learning-curve.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print("| training rankings | held-out pair accuracy (95% CI clustered by ranking) | held-out rankings | seconds |")
    print("|---|---|---|---|")
    for r in rows:
        ci = f"{r['ci'][0]:.1%}-{r['ci'][1]:.1%}" if r["ci"] else "-"
        print(f"| {r['rankings']} | {r['accuracy']:.1%} ({ci}) | {r['heldout_rankings']} | {r['seconds']} |")
    if a.versus:
        print(f"\n| training rankings | this run | {a.versus} | difference (95% CI, paired by ranking) |")
        print("|---|---|---|---|")
        for r in result["versus"]["rows"]:
            print(f"| {r['rankings']} | {r['accuracy']:.1%} | {r['versus_accuracy']:.1%} | {r['difference']:+.1%} "
                  f"({r['ci'][0]:+.1%} to {r['ci'][1]:+.1%}) |")
    return result


def versus(run: Path, other: Path, rows: list[dict]) -> list[dict]:
    """This curve's accuracy at each size against ``other``'s on the same held-out rankings: the difference with
    its interval paired by ranking (``stats.paired_rate_difference``: both models see the same rankings, so an
    easy ranking is easy for both, and the difference is measured far more tightly than the two intervals side
    by side suggest)."""
    from instructgpt_cli.stats import paired_rate_difference

    if (other / "heldout.jsonl").read_bytes() != (run / "heldout.jsonl").read_bytes():
        sys.exit(f"learning curve: --versus {other} held out other rankings than {run}: run both on the same "
                 "--rankings, --heldout-fraction and --seed")
    out = []
    for r in rows:
        mine, theirs = (json.loads((d / f"n-{r['rankings']}" / "eval" / "heldout" / "report.json")
                                   .read_text(encoding="utf-8")) for d in (run, other))
        d = paired_rate_difference(mine["rm_correct_by_ranking"], theirs["rm_correct_by_ranking"],
                                   mine["rm_pairs_by_ranking"])
        out.append({"rankings": r["rankings"], "accuracy": mine["rm_accuracy"], "versus_accuracy": theirs["rm_accuracy"],
                    "difference": d["difference"], "ci": [d["ci_low"], d["ci_high"]]})
    return out


if __name__ == "__main__":
    main()
