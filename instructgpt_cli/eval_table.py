"""``igpt eval sft ppo dpo``: several models' eval reports side by side, the paper's evaluations in one table.

One row per model: the reward model's score with its 95% interval, the KL to SFT, response length and EOS rate,
the perplexity of held-out
pretraining text, each benchmark task's headline metric with its standard error and the difference to the SFT
model (the alignment tax per task, with its interval), and toxicity (expected maximum toxicity and toxicity
probability, each with its interval). The reward model's held-out preference accuracy does not depend on the
model evaluated, so it is one line under the table. Printed to the terminal and published as
eval/summary/report.json and report.html (one self-contained page, no script), which compare's report links to.
A cell a report has no number for is '-' (None in JSON), never 0.
"""
from __future__ import annotations

import json
from pathlib import Path

from .report import e, number
from .stats import mean_interval
from .storage import publish_set

PREFERRED = ("acc_norm", "acc", "mc2", "exact_match", "f1")  # a task's headline metric, in this order


def score_interval(r: dict) -> list[float] | None:
    """The 95% t-interval of an eval report's mean RM score (its sd over n responses); None for fewer than 2."""
    return mean_interval(r.get("score_mean"), r.get("score_sd"), r.get("n") or 0)


def headline(metrics: dict) -> str | None:
    """The metric a task's column shows: the first of PREFERRED it has, else its first."""
    return next((m for m in PREFERRED if m in metrics), next(iter(metrics), None))


def row(report: dict, path: Path) -> dict:
    """One model's row of the table, from its eval report."""
    out = {"model": report["model"], "report": str(path / "report.json"), "model_sha256": report.get("model_sha256"),
           "n": report.get("n"), "score_mean": report.get("score_mean"), "score_ci": score_interval(report),
           "kl_to_sft": report.get("kl_to_sft"), "ptx_perplexity": report.get("ptx_perplexity"),
           "response_length": report.get("response_length"), "eos_rate": report.get("eos_rate"),
           "rm_accuracy": report.get("rm_accuracy"), "rm_accuracy_ci": report.get("rm_accuracy_ci")}
    bench = report.get("benchmarks") or {}
    tasks = {}
    for task, result in (bench.get("tasks") or {}).items():
        metric = headline(result["metrics"])
        if metric is None:
            continue
        tax = (bench.get("tax") or {}).get(task, {}).get(metric)
        tasks[task] = {"metric": metric, **result["metrics"][metric], "tax": tax}
    out["benchmarks"] = tasks
    tox = report.get("toxicity")
    out["toxicity"] = None if not tox else {k: tox.get(k) for k in (
        "expected_max_toxicity", "expected_max_toxicity_ci", "toxicity_probability", "toxicity_probability_ci",
        "n", "k")}
    return out


def build(reports: list[dict], paths: list[Path]) -> dict:
    rows = [row(r, p) for r, p in zip(reports, paths)]
    tasks = sorted({t for r in rows for t in r["benchmarks"]})
    acc = next((r for r in rows if r["rm_accuracy"] is not None), None)
    return {"models": [r["model"] for r in rows], "tasks": tasks, "rows": rows,
            "rm_accuracy": None if acc is None else {"accuracy": acc["rm_accuracy"], "ci": acc["rm_accuracy_ci"]}}


def publish(out: Path, reports: list[dict], paths: list[Path]) -> dict:
    """Build the table of ``reports`` (eval reports, in the order given) and publish eval/summary/ together."""
    summary = build(reports, paths)
    with publish_set(out) as tmp:
        (tmp / "report.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        (tmp / "report.html").write_text(html(summary), encoding="utf-8")
    return summary


def interval_text(ci: list[float] | None, spec: str, compact: bool = False) -> str:
    """' [low, high]', or with ``compact`` (the terminal) ' ±half' for an interval symmetric about its value."""
    if not ci or None in ci:
        return ""
    if compact:
        return f" ±{format((ci[1] - ci[0]) / 2, spec.lstrip('+'))}"
    return f" [{format(ci[0], spec)}, {format(ci[1], spec)}]"


def cells(r: dict, tasks: list[str], compact: bool = False) -> list[str]:
    """The row's cells as text: the columns of :func:`columns` (``compact``: the terminal's, symmetric intervals
    as ± their half-width; a task's difference to SFT in a column of its own)."""
    out = [r["model"], number(r["score_mean"], ".3f") + interval_text(r["score_ci"], ".3f", compact),
           number(r["kl_to_sft"], ".3f"), number(r["response_length"], ".1f"), number(r["eos_rate"], ".0%"),
           number(r["ptx_perplexity"], ".2f")]
    for t in tasks:
        b = r["benchmarks"].get(t)
        tax = (b or {}).get("tax") or {}
        value = "-" if b is None else number(b["value"], ".3f") + (
            f" ±{b['stderr']:.3f}" if b.get("stderr") is not None else "")
        diff = "" if tax.get("diff") is None else f"{tax['diff']:+.3f}" + interval_text(tax.get("ci95"), "+.3f",
                                                                                         compact)
        out += [value, diff or "-"] if compact else [value + (f" ({diff})" if diff else "")]
    tox = r["toxicity"]
    out += (["-", "-"] if not tox else
            [number(tox["expected_max_toxicity"], ".3f") + interval_text(tox["expected_max_toxicity_ci"], ".3f"),
             number(tox["toxicity_probability"], ".1%") + interval_text(tox["toxicity_probability_ci"], ".1%")])
    return out


def lines(r: dict, tasks: list[str]) -> list[str]:
    """One model's benchmark and toxicity numbers as lines (``igpt eval MODEL``'s terminal output)."""
    text = cells(r, tasks)
    first = len(columns({"tasks": [], "rows": []})) - 2  # the first task's cell
    out = [f"benchmark {t} ({r['benchmarks'][t]['metric']} ± its standard error; in brackets the difference to "
           f"SFT with its 95% interval): {text[first + i]}" for i, t in enumerate(tasks) if t in r["benchmarks"]]
    if r["toxicity"]:
        out.append(f"toxicity over {r['toxicity']['n']} prompts x {r['toxicity']['k']} continuations: expected maximum "
                   f"{text[-2]}, probability {text[-1]}")
    return out


def columns(summary: dict, compact: bool = False) -> list[str]:
    """The table's columns (``compact``: the terminal's, a task's difference to SFT in a column of its own)."""
    tasks = ([x for t in summary["tasks"] for x in (f"{t} ({metric(summary, t)}) ± se", "  vs SFT ±95%")]
             if compact else [f"{t} ({metric(summary, t)}) ± se (vs SFT [95% CI])" for t in summary["tasks"]])
    return (["model", "RM score" + (" ±95%" if compact else " [95% CI]"), "KL to SFT", "length (tokens)", "EOS rate",
             "ptx perplexity", *tasks,
             "expected max toxicity [95% CI]", "toxicity probability [95% CI]"])


def metric(summary: dict, task: str) -> str:
    """The headline metric a task's column shows (the first row's that has the task)."""
    return next((r["benchmarks"][task]["metric"] for r in summary["rows"] if task in r["benchmarks"]), "")


def caption(summary: dict) -> str:
    acc = summary["rm_accuracy"]
    return ("" if acc is None else f"reward model's held-out preference accuracy (the same for every row): "
            f"{number(acc['accuracy'], '.1%')}" + interval_text(acc["ci"], ".1%"))


def show(summary: dict, out: Path) -> None:
    from rich.table import Table

    from .console import console

    # one column per model and a row per measurement: three models fit 80 columns, a row per model would not
    table = Table(title=f"igpt eval {' '.join(summary['models'])}  ({out / 'report.html'})", title_justify="left")
    table.add_column("")
    for m in summary["models"]:
        table.add_column(m, justify="right")
    rows = [cells(r, summary["tasks"], compact=True) for r in summary["rows"]]
    for i, label in enumerate(columns(summary, compact=True)[1:], start=1):
        table.add_row(label, *[r[i] for r in rows])
    if caption(summary):
        table.caption, table.caption_justify = caption(summary), "left"
    console().print(table)


def html(summary: dict) -> str:
    head = "".join(f"<th>{e(c)}</th>" for c in columns(summary))
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in cells(r, summary["tasks"])) + "</tr>"
                   for r in summary["rows"])
    links = "".join(f"<li>{e(r['model'])}: <code>{e(r['report'])}</code></li>" for r in summary["rows"])
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>igpt eval: "
            f"{e(' '.join(summary['models']))}</title><style>body{{font-family:sans-serif;margin:2em}}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
            "td:first-child{text-align:left}</style></head><body>"
            f"<h1>igpt eval: {e(', '.join(summary['models']))}</h1><table><tr>{head}</tr>{body}</table>"
            f"<p>{e(caption(summary))}</p><p>A benchmark cell: the task's metric ± its standard error, and in "
            "brackets the difference to the SFT model (the alignment tax: for a higher-is-better metric, negative "
            "is worse than SFT) with its 95% interval (conservative: the two models' results taken as independent). "
            "RM score: mean with its 95% t-interval. Toxicity: expected maximum toxicity over each "
            "prompt's continuations and the share of prompts with at least one continuation scored 0.5 or more, "
            f"each with its 95% interval. '-': not measured.</p><h2>Reports</h2><ul>{links}</ul></body></html>\n")
