"""The reward-vs-KL frontier of a PPO run (``igpt eval ppo --checkpoints all``): which models it measures, and
the gold judge that tells over-optimisation from progress.

Gao et al. 2022 ("Scaling laws for reward model overoptimization") show the proxy reward model's score rising
with the KL to the initial policy while a gold reward peaks and falls: past the peak PPO exploits the proxy's
errors. Here each saved PPO checkpoint is a point: the SFT model (step 0, KL 0), every complete checkpoint in
``ppo/checkpoints/`` (or the steps listed), and ``ppo/final/policy`` (a checkpoint of the final step holds the
same weights and is left out). The gold is a second reward model (``--gold-rm PATH``), a Python function
(``--gold python:MODULE:FUNCTION``, one call per response) or a local LM judge (``--gold model:REF``): a
pairwise judge gives no score, so its gold number is the win rate over the SFT model's response to the same
prompt (ties half; the SFT point is 0.5 by definition, not judged). Torch is not imported at module level.

Its points (a PPO run's checkpoints) and every model reference are read by ``refs.py``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from . import judges
from .errors import BadInput
from .stats import WIN_VALUE, t_quantile, win_rate


def mean_sd(xs: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample sd (n - 1) of ``xs``; None where undefined (no item; one item's sd)."""
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None)


class Gold:
    """The gold judge of the frontier: ``kind`` 'score' (a reward model or a Python function: a number per
    response, summarised as mean and sd) or 'win rate' (a pairwise LM judge: each response against the SFT
    model's to the same prompt, summarised as the win rate with its 95% Wilson interval)."""

    def __init__(self, name: str, kind: str, judge: Any = None, rm_path: Path | None = None):
        self.name, self.kind, self.judge, self.rm_path, self.rm = name, kind, judge, rm_path, None

    def score(self, prompts: list, queries: list, responses: list, texts: list[str], sft_texts: list[str] | None,
              tokenizer: Any, load_rm: Any, batch_size: int) -> tuple[list, dict]:
        """Per response: the gold value (a score, or the pairwise winner 'A' / 'B' / 'tie' against the SFT
        response); and the summary {gold_mean, gold_sd} or {gold_mean (the win rate), gold_ci, gold_n}.
        ``sft_texts`` None: these are the SFT model's own responses (win rate 0.5 by definition)."""
        if self.kind == "win rate":
            if sft_texts is None:
                return ["tie"] * len(texts), {"gold_mean": 0.5, "gold_ci": None, "gold_n": 0}
            pairs = [{"prompt": p.prompt, "a": t, "b": s} for p, t, s in zip(prompts, texts, sft_texts)]
            won = [j["winner"] for j in self.judge.compare(pairs)]
            r = win_rate(won.count("A"), won.count("tie"), won.count("B"))
            return won, {"gold_mean": r["win_rate"], "gold_ci": [r["ci_low"], r["ci_high"]], "gold_n": r["n"]}
        if self.rm_path is not None:
            from .rollout import score_responses

            self.rm = self.rm or load_rm(self.rm_path)
            values = score_responses(self.rm, tokenizer, queries, responses, batch_size).tolist()
        else:
            values = [self.judge.scores(p.prompt, [t], f"prompt {i + 1}")[0]
                      for i, (p, t) in enumerate(zip(prompts, texts))]
        m, sd = mean_sd(values)
        return values, {"gold_mean": m, "gold_sd": sd}


def load_gold(gold: str, gold_rm: str, settings: judges.Settings, run_dir: Path | None = None) -> Gold | None:
    """The gold judge of ``--gold`` / ``--gold-rm`` (at most one), checked before any model loads; None without.
    ``run_dir``: the run a ``model:`` gold's reference may name a stage or checkpoint of."""
    if gold and gold_rm:
        raise BadInput([f"--gold {gold} and --gold-rm {gold_rm}: give one gold judge"])
    if gold_rm:
        if not (Path(gold_rm) / "config.json").is_file():
            raise BadInput([f"--gold-rm {gold_rm}: not a model directory with config.json"])
        from .models import require_role

        require_role(gold_rm, "reward", "--gold-rm")
        return Gold(f"rm:{gold_rm}", "score", rm_path=Path(gold_rm))
    if not gold:
        return None
    judge = judges.load(gold, settings, run_dir=run_dir)
    return Gold(gold, "win rate" if gold.startswith("model:") else "score", judge=judge)


def best(points: list[dict], key: str) -> str | None:
    """The label of the point with the highest ``key`` (the earliest of equal ones); None if none has it."""
    scored = [p for p in points if p.get(key) is not None]
    return max(scored, key=lambda p: p[key])["label"] if scored else None


def gold_drop(points: list[dict], best_gold: str | None, best_proxy: str | None, values: dict[str, list],
              groups: list | None = None) -> dict | None:
    """How far the gold fell from its best point to the proxy's pick, where the pick is a later point (so the
    proxy rose past the gold's peak), with a 95% interval; None where there is no such pair.

    ``values``: each point's per-prompt gold (scores, or a pairwise judge's 'A' / 'tie' / 'B' against the SFT
    response, 1 / 0.5 / 0), the same prompts in the same order at every point. The drop is the mean of the
    per-prompt differences best - pick (paired: a prompt's difficulty cancels), its interval Student's t on
    their sd (n - 1). ``significant``, the frontier's over-optimisation, only when the interval lies above 0:
    two points' means differ by chance by about their sd / sqrt(n), and on a few dozen prompts a drop of that
    size is noise (Gao et al. 2022 read the fall over many points of a curve). The interval does not allow
    for the best gold point being the maximum of several noisy ones (it errs towards a drop).

    ``groups``: each prompt's ``group`` (prompts framed from one message share one). Where every prompt has
    one, the differences are averaged within each group first and the drop and its interval are taken over the
    group means (n - 1 = groups - 1): prompts of one message move together, so counting them as independent
    would make the interval too narrow. With groups of one size (the gold prompts: 4 framings each) the drop is
    the mean over prompts as before; with unequal ones each group weighs alike."""
    step = {p["label"]: p["step"] for p in points}
    if best_gold is None or best_proxy is None or step[best_proxy] <= step[best_gold]:
        return None
    proxy = {p["label"]: p["score_mean"] for p in points}
    if not proxy[best_proxy] > proxy[best_gold]:  # the earliest of equal proxies is its pick: never here
        return None
    a, b = ([WIN_VALUE.get(v, v) if isinstance(v, str) else v for v in values[k]] for k in (best_gold, best_proxy))
    diffs = [x - y for x, y in zip(a, b)]
    units = diffs
    if groups and all(g is not None for g in groups):
        by_group: dict = {}
        for g, d in zip(groups, diffs):
            by_group.setdefault(g, []).append(d)
        units = [sum(v) / len(v) for v in by_group.values()]
    n = len(units)
    m, sd = mean_sd(units)
    out = {"from": best_gold, "to": best_proxy, "n": len(diffs), "clusters": n if units is not diffs else None,
           "drop": m, "ci": None, "significant": False}
    if n >= 2:
        half = t_quantile(0.975, n - 1) * sd / math.sqrt(n)
        out.update(ci=[m - half, m + half], significant=m - half > 0)
    return out


def show(report: dict, out: Path) -> None:
    """The frontier as a table: one row per point, the best gold marked *, the proxy's pick marked ^."""
    from rich.table import Table

    from .console import console
    from .report import drop_text, number, temperatures_text

    gold = report.get("gold")
    table = Table(title=f"igpt eval ppo --checkpoints  ({out / 'report.json'})", title_justify="left")
    cols = ["model", "episodes", f"KL to SFT (T={report['kl_temperature']:g})", "proxy RM score"]
    cols += [f"gold ({'win rate vs sft' if report['gold_kind'] == 'win rate' else gold})"] if gold else []
    for col in cols + ["length", "EOS rate", ""]:
        table.add_column(col, justify="left" if col == "model" else "right")
    for p in report["points"]:
        marks = ("*" if p["label"] == report.get("best_gold") else "") + ("^" if p["label"] == report["best_proxy"]
                                                                         else "")
        cells = [p["label"], str(p["episodes"]), number(p["kl_to_sft"], ".3f"), number(p.get("score_mean"), ".3f")]
        cells += [number(p.get("gold_mean"), ".3f")] if gold else []
        table.add_row(*cells, number(p["response_length"], ".1f"), number(p["eos_rate"], ".0%"), marks)
    console().print(table)
    console().print(temperatures_text(report))
    if gold:
        console().print(f"* best gold: {report['best_gold']}; ^ the proxy would pick: {report['best_proxy']}")
        if report.get("gold_drop"):
            console().print(drop_text(report["gold_drop"]))
