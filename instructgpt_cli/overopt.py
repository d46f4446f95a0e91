"""The over-optimisation watch's statistics (issue 34): a Gao et al. curve fitted to the watch's gold-vs-KL
points, the watch's running best, and the rule that stops PPO once the gold has turned while the proxy rises.

During PPO, every N iterations the watch samples validation prompts at a fixed seed and scores them with the
proxy reward model and an independent gold judge; each watch is a point (iteration, KL to SFT, proxy mean, gold
mean with its 95% interval, the per-prompt gold values). Gao et al. 2022 ("Scaling laws for reward model
overoptimization") find the gold rising and then falling with d = sqrt(KL) while the proxy keeps rising: past
the peak PPO exploits the proxy's errors. :func:`gao_fit` locates that peak; :class:`WatchState`,
:func:`update` and :func:`should_stop` decide when to stop. Pure Python (no torch, no numpy), strict JSON out.
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field, fields, replace

from .stats import WIN_VALUE, t_quantile

MIN_POINTS = 4  # three parameters plus one residual degree of freedom: fewer gives no standard error at all
MIN_DISTINCT_D = 3  # distinct d > 0: the PPO points alone fix the curve, and its bend is seen at 3 KLs, not 2
BOOTSTRAP_DRAWS = 2000  # draws of (alpha, beta) for the peak's interval: its quantiles to about +-0.5%
BOOTSTRAP_SEED = 0  # fixed: the same points give the same interval (a resumed run reports what it did)
SINGULAR = 1e-9  # a column is dependent when less than this share of its length is new to the earlier ones


def finite(x: float | None) -> float | None:
    """``x`` where it is a finite number, else None (strict JSON has no NaN or inf)."""
    return x if x is not None and math.isfinite(x) else None


def xlogx(d: float) -> float:
    """d * log d, taken as its limit 0 at d = 0 (the SFT point)."""
    return d * math.log(d) if d > 0 else 0.0


def least_squares(rows: list[list[float]], y: list[float]) -> tuple[list[float], list[list[float]]] | None:
    """Ordinary least squares of ``y`` (n,) on the design ``rows`` (n, p) by a modified Gram-Schmidt QR (more
    stable than the normal equations, whose condition is the square of the design's). Returns (coefficients
    (p,), (X'X)^-1 (p, p) = R^-1 R^-T), or None when the design is singular: a column with less than SINGULAR
    of its length outside the span of the columns before it."""
    p = len(rows[0])
    q = [[row[j] for row in rows] for j in range(p)]  # columns, orthonormalised in place
    r = [[0.0] * p for _ in range(p)]
    for j in range(p):
        length = math.sqrt(sum(v * v for v in q[j]))
        for k in range(j):
            r[k][j] = sum(a * b for a, b in zip(q[k], q[j]))
            q[j] = [b - r[k][j] * a for a, b in zip(q[k], q[j])]
        r[j][j] = math.sqrt(sum(v * v for v in q[j]))
        if length == 0.0 or r[j][j] <= SINGULAR * length:
            return None
        q[j] = [v / r[j][j] for v in q[j]]
    qty = [sum(a * b for a, b in zip(q[j], y)) for j in range(p)]
    coef = [0.0] * p
    for j in reversed(range(p)):
        coef[j] = (qty[j] - sum(r[j][k] * coef[k] for k in range(j + 1, p))) / r[j][j]
    inv = [[0.0] * p for _ in range(p)]  # R^-1, upper triangular, column by column
    for c in range(p):
        for j in reversed(range(c + 1)):
            inv[j][c] = ((1.0 if j == c else 0.0) - sum(r[j][k] * inv[k][c] for k in range(j + 1, c + 1))) / r[j][j]
    return coef, [[sum(inv[i][k] * inv[j][k] for k in range(p)) for j in range(p)] for i in range(p)]


def peak_of(alpha: float, beta: float) -> float:
    """The d at which d (alpha - beta log d) peaks, exp(alpha / beta - 1), for beta > 0 (its derivative
    alpha - beta (log d + 1) is 0 there and falls through it); inf where that overflows or beta <= 0 (no turn:
    the curve ends rising, so its supremum is at infinite KL)."""
    if beta <= 0:
        return math.inf
    exponent = alpha / beta - 1
    return math.exp(exponent) if exponent < 700 else math.inf


def quantile(sorted_xs: list[float], q: float) -> float:
    """The ``q`` quantile of ascending ``sorted_xs`` by linear interpolation (numpy's default); inf where an
    inf takes part."""
    pos = q * (len(sorted_xs) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(sorted_xs) - 1)
    a, b = sorted_xs[lo], sorted_xs[hi]
    return a if a == b or pos == lo else (math.inf if math.isinf(b) else a + (pos - lo) * (b - a))


def peak_interval(alpha: float, beta: float, cov: list[list[float]], dof: int) -> tuple[list, float]:
    """A 95% interval for the peak's KL by a parametric bootstrap: BOOTSTRAP_DRAWS draws of (alpha, beta) from
    their estimated distribution, a bivariate t with the fit's ``dof`` (the estimate's normal, scaled by
    sqrt(dof / chi2_dof) because the residual variance is estimated too; a normal under-covers at a handful of
    watches), ``cov`` (2, 2) their covariance; the interval is the 2.5% and 97.5% quantiles of exp(a / b - 1)^2
    (KL = d^2). A draw with b <= 0 has no turn: its peak is at infinite KL and it is kept as inf, not skipped,
    since skipping would condition on a turn and bound the peak even where the data allow none. So a bound is
    None (unbounded) where more than 2.5% (or 97.5%) of the draws have no turn. Returns ([low, high],
    the share of draws without a turn)."""
    rng = random.Random(BOOTSTRAP_SEED)
    l11 = math.sqrt(max(cov[0][0], 0.0))
    l21 = cov[1][0] / l11 if l11 > 0 else 0.0
    l22 = math.sqrt(max(cov[1][1] - l21 * l21, 0.0))
    peaks, no_turn = [], 0
    for _ in range(BOOTSTRAP_DRAWS):
        z1, z2 = rng.gauss(0.0, 1.0), rng.gauss(0.0, 1.0)
        scale = math.sqrt(dof / max(rng.gammavariate(dof / 2, 2.0), 1e-300))  # chi2_dof
        a, b = alpha + scale * l11 * z1, beta + scale * (l21 * z1 + l22 * z2)
        no_turn += b <= 0
        d = peak_of(a, b)
        peaks.append(d * d if d < 1e150 else math.inf)
    peaks.sort()
    return [finite(quantile(peaks, 0.025)), finite(quantile(peaks, 0.975))], no_turn / BOOTSTRAP_DRAWS


def gao_fit(kl: list[float], gold: list[float], min_points: int = MIN_POINTS) -> dict | None:
    """Gao et al. 2022's RL form of the gold score against the KL to the SFT model, fitted to the watch's
    points: gold(d) = g0 + d (alpha - beta log d), d = sqrt(KL), with d log d taken as 0 at d = 0.

    The paper's form has no intercept (its gold is 0 at the initial policy by construction); here g0 is a free
    parameter, since an arbitrary judge's gold at the SFT model (d = 0) is whatever it is, not 0. The model is
    linear in (g0, alpha, beta), so the fit is ordinary least squares (unweighted: one judge on the same
    prompts at every watch gives each point about the same noise; the residual variance takes that noise and
    any lack of fit together). Points with a missing or non-finite KL or gold are dropped; a negative KL (a
    sampled estimate can dip below 0 near the SFT model) counts as 0.

    None below ``min_points`` points (MIN_POINTS = 4: three parameters and at least one residual degree of
    freedom, without which nothing measures the noise) or fewer than MIN_DISTINCT_D = 3 distinct d > 0 (the
    curve, bend included, fixed by PPO's own points rather than by repeated SFT ones), or where the design is
    singular anyway.

    For beta > 0 the curve peaks at d* = exp(alpha / beta - 1), with gold g0 + beta d*: ``peak`` is "inside"
    where d* is at most the largest d observed (the run has passed the turn; the range starts at d = 0, where
    every run starts) and "beyond" past it (an extrapolated turn); for beta <= 0 it is "none" (no turn: the
    gold still rises, or falls then rises) and the peak's numbers are None. ``peak_kl_ci`` is the parametric
    bootstrap's 95% interval of the peak's KL (:func:`peak_interval`), computed whatever beta's sign, a bound
    None where unbounded; ``no_turn_share`` the share of its draws with beta <= 0.

    Returns {n, dof, g0, alpha, beta, g0_se, alpha_se, beta_se, residual_sd, r2, d_max, peak, peak_d, peak_kl,
    peak_gold, peak_kl_ci, no_turn_share, ci_method}: standard errors, residual_sd, peak_kl_ci and
    no_turn_share None at dof = 0 (only with ``min_points`` < 4); r2 None where the gold does not vary. Every
    number finite or None."""
    pts = [(math.sqrt(max(float(k), 0.0)), float(g)) for k, g in zip(kl, gold)
           if k is not None and g is not None and math.isfinite(k) and math.isfinite(g)]
    if len(pts) < min_points or len({d for d, _ in pts if d > 0}) < MIN_DISTINCT_D:
        return None
    fit = least_squares([[1.0, d, -xlogx(d)] for d, _ in pts], [g for _, g in pts])
    if fit is None:
        return None
    (g0, alpha, beta), xtx_inv = fit
    n, dof = len(pts), len(pts) - 3
    ys = [g for _, g in pts]
    rss = sum((g - (g0 + alpha * d - beta * xlogx(d))) ** 2 for d, g in pts)
    tss = sum((g - sum(ys) / n) ** 2 for g in ys)
    d_max = max(d for d, _ in pts)
    out = {"n": n, "dof": dof, "g0": g0, "alpha": alpha, "beta": beta, "g0_se": None, "alpha_se": None,
           "beta_se": None, "residual_sd": None, "r2": max(0.0, 1 - rss / tss) if tss > 0 else None, "d_max": d_max,
           "peak": "none", "peak_d": None, "peak_kl": None, "peak_gold": None, "peak_kl_ci": None,
           "no_turn_share": None, "ci_method": "parametric bootstrap (bivariate t on alpha, beta), 95% quantiles"}
    if beta > 0:
        d_star = peak_of(alpha, beta)
        out["peak"] = "inside" if d_star <= d_max else "beyond"
        out["peak_d"] = finite(d_star)
        out["peak_kl"] = finite(d_star * d_star) if d_star < 1e150 else None
        out["peak_gold"] = finite(g0 + beta * d_star)
    if dof > 0:
        s2 = rss / dof
        out.update(residual_sd=math.sqrt(s2), g0_se=math.sqrt(s2 * xtx_inv[0][0]),
                   alpha_se=math.sqrt(s2 * xtx_inv[1][1]), beta_se=math.sqrt(s2 * xtx_inv[2][2]))
        cov = [[s2 * xtx_inv[1][1], s2 * xtx_inv[1][2]], [s2 * xtx_inv[2][1], s2 * xtx_inv[2][2]]]
        out["peak_kl_ci"], out["no_turn_share"] = peak_interval(alpha, beta, cov, dof)
    return out


# --- the watch's running best and the stop rule ----------------------------------------------------------------


@dataclass
class WatchState:
    """What the watch remembers between watches, saved with a PPO checkpoint so that a resumed run restores it
    exactly (:meth:`to_dict` / :meth:`from_dict`, plain JSON): the best gold mean so far (None before the first
    watch), its iteration, its 95% interval, the proxy there, its per-prompt gold values (for the paired test
    of :func:`should_stop`), the number of watches since it and their proxy means (oldest first)."""

    best_gold: float | None = None
    best_iteration: int | None = None
    best_gold_ci: list | None = None
    best_proxy: float | None = None
    best_values: list = field(default_factory=list)
    since_best: int = 0
    proxy_since_best: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict) -> "WatchState":
        """The state :meth:`to_dict` wrote (keys it does not know are ignored; missing ones take defaults)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in names})


def update(state: WatchState, iteration: int, proxy: float, gold: float, gold_ci: list | tuple | None,
           gold_values: list) -> tuple[WatchState, bool]:
    """The state after a watch at ``iteration`` (proxy mean, gold mean, its 95% interval, per-prompt gold),
    and whether it is a new best: the first watch always is; later, only a gold mean strictly above the best
    (a tie keeps the earlier best, so a flat gold counts as not improving). ``state`` is left as it was."""
    if state.best_gold is None or gold > state.best_gold:
        return WatchState(best_gold=gold, best_iteration=iteration, best_gold_ci=list(gold_ci) if gold_ci else None,
                          best_proxy=proxy, best_values=list(gold_values)), True
    return replace(state, since_best=state.since_best + 1, proxy_since_best=[*state.proxy_since_best, proxy]), False


def paired_drop(best_values: list, current_values: list) -> dict | None:
    """The mean per-prompt drop best - now with its 95% paired t interval: mean -+ t_{0.975, n-1} sd / sqrt(n)
    over the n differences (same prompts, same order: a prompt's difficulty cancels). A pairwise judge's
    'A' / 'tie' / 'B' count 1 / 0.5 / 0. None with fewer than 2 prompts (no sd)."""
    if len(best_values) != len(current_values):
        raise ValueError(f"{len(best_values)} gold values at the best but {len(current_values)} now: the watch "
                         "scores the same prompts every time")
    diffs = [(WIN_VALUE[a] if isinstance(a, str) else a) - (WIN_VALUE[b] if isinstance(b, str) else b)
             for a, b in zip(best_values, current_values)]
    n = len(diffs)
    if n < 2:
        return None
    m = sum(diffs) / n
    half = t_quantile(0.975, n - 1) * math.sqrt(sum((x - m) ** 2 for x in diffs) / (n - 1)) / math.sqrt(n)
    return {"drop": m, "ci": [m - half, m + half], "n": n}


def should_stop(state: WatchState, patience: int, significance: bool, best_values: list,
                current_values: list) -> str | None:
    """Why PPO should stop now, or None. Off when ``patience`` is 0.

    Rule 1 (patience): the gold has not beaten its best for ``patience`` watches (since_best >= patience)
    while the proxy rose (the latest proxy above the proxy at the best): the policy is gaining on the proxy
    and not on the gold, Gao et al.'s over-optimisation.

    Rule 2 (``significance``): rule 1, and the latest gold's drop from the best beyond the gold's noise: the
    per-prompt gold at the best (``best_values``) and now (``current_values``), same prompts in the same order,
    compared paired (:func:`paired_drop`), the stop only where the 95% interval of best - now lies above 0
    (never on fewer than 2 prompts).
    Without it a judge's noise on a few dozen prompts can end a run that only plateaued. The interval does not
    allow for the best being the maximum of several noisy watches, so it errs towards a drop."""
    if patience <= 0 or state.best_gold is None or state.since_best < patience or not state.proxy_since_best:
        return None
    now = state.proxy_since_best[-1]
    if not now > state.best_proxy:
        return None
    reason = (f"gold has not beaten its best ({state.best_gold:.3g} at iteration {state.best_iteration}) for "
              f"{state.since_best} watches while the proxy rose from {state.best_proxy:.3g} to {now:.3g}")
    if not significance:
        return reason
    drop = paired_drop(best_values, current_values)
    if drop is None or not drop["ci"][0] > 0:
        return None
    return (reason + f", and the gold fell by {drop['drop']:.3g} per prompt (95% CI {drop['ci'][0]:.3g} to "
            f"{drop['ci'][1]:.3g}, paired over {drop['n']} prompts), beyond its noise")
