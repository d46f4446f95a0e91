"""compare/A-vs-B/report.html: one self-contained page (matplotlib charts embedded as PNG data URIs) with
the win rate and its interval, the per-category table, the PPO run's training curves when the run has
one, and sample pairs side by side. Opens offline; nothing is fetched."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from .rundir import atomic_write_text

CURVES = [("objective/scores", "reward-model score"), ("objective/kl", "KL to SFT (nats)"),
          ("loss/ptx", "pretraining loss (ptx)")]


def number(x: float | None, spec: str) -> str:
    """``x`` formatted, or '-' where a report has no number (None: undefined, e.g. the sd of one score)."""
    return "-" if x is None else format(x, spec)


def score_text(r: dict) -> str:
    """'mean ± sd' of an eval report's scores ('-' without a reward model; no sd for a single score)."""
    if r.get("score_mean") is None:
        return "-"
    return f"{r['score_mean']:.3f}" + (f" ± {r['score_sd']:.3f}" if r.get("score_sd") is not None else "")


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def win_chart(report: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("all", report)] + list(report["categories"].items())
    rows = [(label, r) for label, r in rows if r["n"]]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
    ys = list(range(len(rows)))[::-1]
    rates = [r["win_rate"] for _, r in rows]
    # bar lengths below and above the rate, clamped at 0: matplotlib refuses a negative one, and a bound
    # rounded past the rate (an interval that should end exactly at 0 or 1) must not crash the page
    err = [[max(0.0, r["win_rate"] - r["ci_low"]) for _, r in rows],
           [max(0.0, r["ci_high"] - r["win_rate"]) for _, r in rows]]
    ax.barh(ys, rates, xerr=err, color="#4c72b0", capsize=3)
    ax.axvline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_yticks(ys, [f"{label} (n={r['n']})" for label, r in rows])
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"win rate of {report['a']} over {report['b']} (ties = half), 95% CI")
    return _png(fig)


def curve_charts(metrics: list[dict]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    charts = []
    for key, label in CURVES:
        points = [(m["step"], m[key]) for m in metrics if key in m]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(4.2, 2.8))
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 40 else None)
        ax.set_xlabel("PPO iteration")
        ax.set_title(label)
        charts.append((label, _png(fig)))
    return charts


def write_html(path: Path, report: dict, judgments: list[dict], ppo_metrics: list[dict], n_samples: int = 12) -> None:
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>igpt: {e(report['a'])} vs {e(report['b'])}</title>",
             "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}.pair{display:flex;gap:1em}.pair div{flex:1;"
             "white-space:pre-wrap;border:1px solid #ddd;padding:.6em;border-radius:4px}.win{background:#eef7ee}"
             "</style></head><body>",
             f"<h1>{e(report['a'])} vs {e(report['b'])}</h1>",
             f"<p>Judge: <b>{e(report['judge'])}</b>. {report['judged']} of {report['n_prompts']} prompts judged. "
             f"{e(report['ci_method'])}.</p>"]
    if report["n"]:
        parts.append(f"<p><b>Win rate of {e(report['a'])}: {report['win_rate']:.1%}</b> "
                     f"(95% CI {report['ci_low']:.1%} – {report['ci_high']:.1%}; {report['wins']} wins, "
                     f"{report['ties']} ties, {report['losses']} losses)</p>")
        parts.append(f"<img alt='win rate chart' src='{win_chart(report)}'>")
    parts.append("<h2>By category</h2><table><tr><th>category</th><th>n</th><th>wins</th><th>ties</th>"
                 "<th>losses</th><th>win rate</th><th>95% CI</th></tr>")
    for c, r in report["categories"].items():
        parts.append(f"<tr><td>{e(c)}</td><td>{r['n']}</td><td>{r['wins']}</td><td>{r['ties']}</td><td>{r['losses']}</td>"
                     f"<td>{r['win_rate']:.1%}</td><td>{r['ci_low']:.1%} – {r['ci_high']:.1%}</td></tr>")
    parts.append("</table>")
    charts = curve_charts(ppo_metrics)
    if charts:
        parts.append("<h2>PPO training</h2>" + "".join(f"<img alt='{e(label)}' src='{src}'>" for label, src in charts))
    parts.append("<h2>Samples</h2>")
    for j in judgments[:n_samples]:
        a_cls, b_cls = ("win" if j["winner"] == "A" else ""), ("win" if j["winner"] == "B" else "")
        scores = f" (A {j['score_a']:.3f}, B {j['score_b']:.3f})" if "score_a" in j else ""
        parts.append(f"<h3>{e(j['prompt'][:200])}</h3><p>winner: {e(j['winner'])}{scores}</p><div class='pair'>"
                     f"<div class='{a_cls}'><b>{e(report['a'])}</b>\n{e(j['a'])}</div>"
                     f"<div class='{b_cls}'><b>{e(report['b'])}</b>\n{e(j['b'])}</div></div>")
    parts.append("</body></html>")
    atomic_write_text(path, "\n".join(parts) + "\n")
