"""The charts of report.html: matplotlib figures drawn off-screen (Agg) and returned as PNG data URIs, so
the page carries its images and opens offline. Each chart function returns None when it has no point to
draw; the page then leaves it out."""
from __future__ import annotations

import base64
import io
import math

Points = list[tuple[float, float]]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png(fig) -> str:
    """The figure as a PNG data URI (and closed)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def series(records: list[dict], key: str, x: str = "step") -> Points:
    """(record[x], record[key]) of the records that have both as finite numbers: a skipped PPO step logs NaN
    entropy, held-out metrics are logged only every eval_every steps."""
    def finite(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    return [(float(r[x]), float(r[key])) for r in records if finite(r.get(x)) and finite(r.get(key))]


def win_chart(report: dict) -> str:
    plt = _plt()
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
    return png(fig)


def line_chart(title: str, xlabel: str, lines: list[tuple[str, Points]], ylim: tuple[float, float] | None = None
               ) -> str | None:
    """One small chart of one or more named lines (a legend when more than one has points); None if none has."""
    lines = [(label, pts) for label, pts in lines if pts]
    if not lines:
        return None
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(4.2, 2.8))
    for label, pts in lines:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 40 else None, label=label)
    if len(lines) > 1:
        ax.legend(fontsize="small")
    if ylim:
        ax.set_ylim(*ylim)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps and episodes are whole numbers
    ax.ticklabel_format(axis="y", useOffset=False)  # beta moving by 1e-6 reads 0.020001, not "+2e-2" and 1e-6
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize="medium")
    ax.grid(alpha=0.3)
    return png(fig)


def reward_vs_kl(kl: Points, score: Points) -> str | None:
    """PPO's reward-model score against its KL to SFT, one point per iteration coloured by episodes: how
    much reward each nat of divergence bought (the trade-off the KL penalty sets; Gao et al. 2022 plot the
    same against sqrt KL). ``kl`` and ``score`` are (episode, value) pairs of the same records."""
    scores = dict(score)
    pts = [(e, k, scores[e]) for e, k in kl if e in scores]
    if not pts:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    ax.plot([p[1] for p in pts], [p[2] for p in pts], color="#bbbbbb", linewidth=1, zorder=1)
    dots = ax.scatter([p[1] for p in pts], [p[2] for p in pts], c=[p[0] for p in pts], cmap="viridis", zorder=2)
    fig.colorbar(dots, ax=ax, label="episodes")
    ax.set_xlabel("KL to SFT (nats per response)")
    ax.set_ylabel("reward-model score")
    ax.set_title("reward vs KL over PPO training", fontsize="medium")
    ax.grid(alpha=0.3)
    return png(fig)


def frontier_chart(report: dict) -> str | None:
    """The reward-vs-KL frontier of ``igpt eval ppo --checkpoints`` (eval/ppo-frontier/report.json): the proxy
    RM score and the gold (its own axis: other units) against episodes, and both against the KL to SFT, as Gao
    et al. 2022 (fig. 1) plot over-optimisation. The best gold point is starred. None without a point."""
    pts = [p for p in report.get("points", []) if p.get("kl_to_sft") is not None]
    if not pts:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    gold = report.get("gold")
    kl_t = report.get("kl_temperature")
    kl_label = "KL to SFT" + (f" at T={kl_t:g}" if kl_t else "") + " (nats per response)"
    for ax, x, xlabel in ((axes[0], "episodes", "episodes"), (axes[1], "kl_to_sft", kl_label)):
        xs = [p[x] for p in pts]
        ax.plot(xs, [p.get("score_mean") for p in pts], marker="o", color="#4c72b0", label="proxy RM score")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("proxy RM score", color="#4c72b0")
        ax.grid(alpha=0.3)
        if gold:
            twin = ax.twinx()
            twin.plot(xs, [p.get("gold_mean") for p in pts], marker="s", color="#dd8452", label="gold")
            best = [p for p in pts if p["label"] == report.get("best_gold")]
            twin.scatter([p[x] for p in best], [p["gold_mean"] for p in best], marker="*", s=260, color="#c44e52",
                         zorder=3, label="best gold")
            kind = "win rate vs sft" if report.get("gold_kind") == "win rate" else "score"
            twin.set_ylabel(f"gold {kind}", color="#dd8452")
    axes[0].set_title("proxy and gold over PPO training", fontsize="medium")
    axes[1].set_title("against KL to SFT", fontsize="medium")
    fig.tight_layout()
    return png(fig)
