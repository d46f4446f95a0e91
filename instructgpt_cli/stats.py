"""Statistics igpt reports: proportions with confidence intervals. Pure Python, no torch."""
from __future__ import annotations

import math
from statistics import NormalDist

Z95 = 1.959963984540054  # two-sided 95% normal quantile
WIN_VALUE = {"A": 1.0, "tie": 0.5, "B": 0.0}  # a pairwise verdict for A as a number: a tie is half a win


def wilson_interval(p: float, n: float, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion ``p`` observed over ``n`` trials; (0, 1) when n is 0.

    The closed form reaches 0 at p = 0 and 1 at p = 1 only up to rounding (5.6e-17 at 0 of 3), so the
    bounds are clamped to [0, p] and [p, 1]: the interval is exactly [0, x] at p = 0, [x, 1] at p = 1,
    and always contains p (error bars drawn from it are never negative)."""
    if n == 0:
        return 0.0, 1.0
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(p * (1 - p), 0.0) / n + z * z / (4 * n * n)) / denom
    low, high = max(0.0, center - half), min(1.0, center + half)
    if p <= 0.0:
        low = 0.0
    if p >= 1.0:
        high = 1.0
    return min(low, p), max(high, p)


def win_rate(wins: int, ties: int, losses: int) -> dict:
    """A's win rate over B, ties counted half, with its 95% Wilson interval. With no judgments the rate
    and bounds are None (strict JSON has no NaN)."""
    n = wins + ties + losses
    out = {"wins": wins, "ties": ties, "losses": losses, "n": n}
    if not n:
        return {**out, "win_rate": None, "ci_low": None, "ci_high": None}
    rate = (wins + 0.5 * ties) / n
    lo, hi = wilson_interval(rate, n)
    return {**out, "win_rate": rate, "ci_low": lo, "ci_high": hi}


def grouped_win_rate(winners: list[str], groups: list) -> dict:
    """:func:`win_rate` of judgments (``winners``: "A", "B" or "tie") whose prompts come in ``groups`` (one
    message under several framings, one user's prompts): the same rate, its 95% interval clustered by group
    (:func:`clustered_rate`, ties half) instead of Wilson's over independent prompts, which is too narrow when
    a group's prompts are judged alike. ``ci_iid`` keeps Wilson's; ``design_effect`` is the judgments over the
    effective sample size (1 where the groups add nothing)."""
    out = win_rate(winners.count("A"), winners.count("tie"), winners.count("B"))
    by: dict = {}
    for w, g in zip(winners, groups):
        won, n = by.get(g, (0.0, 0))
        by[g] = (won + WIN_VALUE[w], n + 1)
    r = clustered_rate([w for w, _ in by.values()], [n for _, n in by.values()])
    return {**out, "ci_low": r["ci_low"], "ci_high": r["ci_high"], "groups": r["clusters"],
            "ci_iid": [out["ci_low"], out["ci_high"]],
            "design_effect": r["trials"] / r["effective_n"] if r["effective_n"] else None}


def t_quantile(q: float, df: float) -> float:
    """The ``q`` quantile (0.5 < q < 1) of Student's t with ``df`` >= 1 degrees of freedom (any real ``df``;
    the normal's beyond 1e6). Bisection on P(|T| > t) = I_x(df/2, 1/2), x = df / (df + t^2)."""
    if df > 1e6:
        return NormalDist().inv_cdf(q)
    tail = 2 * (1 - q)  # two-sided
    lo, hi = 0.0, 1.0  # x = df / (df + t^2): I_x rises with x, t falls
    for _ in range(64):  # to 2^-64 in x
        mid = (lo + hi) / 2
        if beta_regularized(df / 2, 0.5, mid) < tail:
            lo = mid
        else:
            hi = mid
    x = (lo + hi) / 2
    return math.sqrt(df * (1 - x) / x)


def mean_interval(mean: float | None, sd: float | None, n: int) -> list[float] | None:
    """The 95% Student's t interval of a mean from its sample sd (n - 1) over ``n`` values; None below 2 values
    or without an sd."""
    if mean is None or sd is None or n < 2:
        return None
    half = t_quantile(0.975, n - 1) * sd / math.sqrt(n)
    return [mean - half, mean + half]


def beta_regularized(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b), 0 <= x <= 1, by its continued fraction (Lentz's
    method; Numerical Recipes, ``betai``), taken on the side where it converges fast."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - beta_regularized(b, a, 1 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 10_000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + num * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1) < 1e-15:
            break
    return front * f


def cr2_df(h: list[float]) -> float:
    """Bell and McCaffrey's (2002) Satterthwaite degrees of freedom of a CR2 cluster-robust variance of a ratio
    estimator, from each cluster's leverage ``h`` (its share of the trials): n - 1 at equal sizes, fewer as a few
    large clusters dominate."""
    a = [hi * hi / (1 - hi) for hi in h]
    return 1 / (sum(hi * hi for hi in h) + sum(a) ** 2 - sum(ai * ai for ai in a))


def clustered_rate(successes: list[float], trials: list[float], z: float = Z95) -> dict:
    """A rate over trials that come in clusters, with a 95% interval that holds its level when the trials of
    a cluster are correlated and the clusters differ in size: a reward model's pairs, clustered in rankings of
    mixed K (C(K,2) pairs each), or win/tie/loss judgments clustered by the message the prompts share.

    ``successes`` (n,) and ``trials`` (n,) per cluster (a tie may count half a success). The rate is the
    ratio estimator sum(successes) / sum(trials), every trial weighted alike. Its variance is the
    cluster-robust (linearised) one with the CR2 small-sample correction (Bell & McCaffrey 2002): cluster i's
    residual e_i = successes_i - rate * trials_i over (1 - h_i), h_i = trials_i / sum(trials), its
    leverage; degrees of freedom are Bell and McCaffrey's Satterthwaite approximation, which shrinks from
    n - 1 as a few large clusters dominate. The interval is Wilson's at the effective sample size rate(1 -
    rate) / variance (capped at the trials), scaled by (z / t_df)^2 (Korn & Graubard 1998): never outside
    [0, 1], and not degenerate near 0 or 1.

    Assumes: clusters independent of each other, trials within one correlated in any way, and enough
    clusters for a normal approximation of the ratio: by simulation (tests/test_stats.py) the 95% interval
    covers 93-96% of 10, 30 or 100 rankings at K in {2, 9}, 4..9 and 4..6 with rankings that differ in how
    well the model does; where each ranking is all right or all wrong it needs about 30 (85% at 10 rankings,
    96% at 30). Where every cluster is all
    successes or all failures (rate 0 or 1) there is no spread to estimate; the effective sample size is
    then the number of clusters, as if each were one trial. Clusters with no trials are dropped.

    Returns {"rate", "ci_low", "ci_high", "clusters", "trials", "effective_n", "df"}: rate and bounds None
    with no trials; the interval (0, 1) from one cluster (nothing measures how clusters vary), with
    effective_n and df None."""
    kept = [(float(s), float(t)) for s, t in zip(successes, trials) if t > 0]
    n, total = len(kept), sum(t for _, t in kept)
    out = {"rate": None, "ci_low": None, "ci_high": None, "clusters": n, "trials": total, "effective_n": None,
           "df": None}
    if not n:
        return out
    rate = min(1.0, max(0.0, sum(s for s, _ in kept) / total))
    if n == 1:
        return {**out, "rate": rate, "ci_low": 0.0, "ci_high": 1.0}
    h = [t / total for _, t in kept]
    var = sum((s - rate * t) ** 2 / (1 - hi) for (s, t), hi in zip(kept, h)) / total ** 2
    df = cr2_df(h)
    if 0.0 < rate < 1.0:
        n_eff = min(rate * (1 - rate) / var, total) if var > 0 else total
    else:
        n_eff = float(n)
    low, high = wilson_interval(rate, n_eff * (z / t_quantile(NormalDist().cdf(z), max(df, 1.0))) ** 2)
    return {**out, "rate": rate, "ci_low": low, "ci_high": high, "effective_n": n_eff, "df": df}


def paired_rate_difference(a: list[float], b: list[float], trials: list[float], z: float = Z95) -> dict:
    """The difference of two rates measured on the same clustered trials (two reward models' pairwise
    accuracies on the same held-out rankings: ``a`` (n,) and ``b`` (n,) each one's successes per cluster,
    ``trials`` (n,) per cluster), with a 95% interval of the difference that uses the pairing: both models see
    the same prompts and responses, so an easy ranking is easy for both, and the interval of the difference is
    far narrower than two rates' own intervals suggest (side by side, they overlap where the difference is
    clear).

    The difference is of ratio estimators, d = (sum(a) - sum(b)) / sum(trials); its variance the cluster-robust
    one of :func:`clustered_rate` with the CR2 correction on the residuals (a_i - b_i) - d * trials_i, and the
    interval d -+ t_df * se with Bell and McCaffrey's degrees of freedom, clipped to [-1, 1]. Where every
    cluster's difference is d times its trials (both models agree on every pair: d = 0) there is no spread to
    estimate: the half-width is then 3 / clusters, the rule of three for a discordance never seen. By simulation
    (tests/test_stats.py) the interval covers 93-97% at 30 rankings of K in {2, 9}.

    Returns {"difference", "ci_low", "ci_high", "clusters", "trials", "df"}: None values with no trials; the
    interval (-1, 1) from one cluster. Clusters with no trials are dropped."""
    kept = [(float(x), float(y), float(t)) for x, y, t in zip(a, b, trials) if t > 0]
    n, total = len(kept), sum(t for _, _, t in kept)
    out = {"difference": None, "ci_low": None, "ci_high": None, "clusters": n, "trials": total, "df": None}
    if not n:
        return out
    d = (sum(x for x, _, _ in kept) - sum(y for _, y, _ in kept)) / total
    if n == 1:
        return {**out, "difference": d, "ci_low": -1.0, "ci_high": 1.0}
    h = [t / total for _, _, t in kept]
    var = sum(((x - y) - d * t) ** 2 / (1 - hi) for (x, y, t), hi in zip(kept, h)) / total ** 2
    df = cr2_df(h)
    half = (t_quantile(NormalDist().cdf(z), max(df, 1.0)) * math.sqrt(var) if var > 1e-24 * max(d * d, 1.0)
            else 3 / n)
    return {**out, "difference": d, "ci_low": max(-1.0, d - half), "ci_high": min(1.0, d + half), "df": df}


def rm_accuracy(correct: list[int], pairs: list[int]) -> dict:
    """A reward model's held-out pairwise accuracy from each held-out ranking's ``correct`` (n,) and ``pairs``
    (n,) counts: correct pairs / pairs, with its 95% interval clustered by ranking (:func:`clustered_rate`).
    The C(K,2) pairs of one ranking share a prompt and responses, so they are not independent, and with K
    mixed a K=9 ranking weighs 36 times a K=2 one: a Wilson interval over pairs is too narrow, and one over
    rankings under-covers too when K is mixed (17% misses at K in {2, 9}, issue 29). The model is above chance
    when the lower bound is above 0.5. Empty when no pair was held out."""
    r = clustered_rate(correct, pairs)
    if r["rate"] is None:
        return {}
    return {"accuracy": r["rate"], "accuracy_ci_low": r["ci_low"], "accuracy_ci_high": r["ci_high"],
            "pairs": int(r["trials"]), "rankings": r["clusters"]}


def describe_rm_accuracy(record: dict | None, prefix: str = "eval/") -> tuple[str, str | None]:
    """(what to print about a reward model's held-out accuracy, a warning or None) from the
    ``prefix``-ed stats train-rm saves with the model (``rm_accuracy`` under ``eval/``; an ensemble's mean score
    under ``ensemble/``)."""
    record = {k[len(prefix):]: v for k, v in (record or {}).items() if k.startswith(prefix)}
    acc = record.get("accuracy")
    if acc is None:
        return ("unknown accuracy (no held-out record saved with the reward model)",
                "the reward model's held-out accuracy is unknown, so nothing shows it learned your rankings; "
                "train it with igpt train-rm and --val-fraction > 0 to measure it")
    low, high, n = (record.get(k) for k in ("accuracy_ci_low", "accuracy_ci_high", "rankings"))
    if low is None or high is None or not n:
        return f"held-out accuracy {acc:.1%} (no confidence interval recorded)", None
    text = (f"held-out accuracy {acc:.1%} (95% CI {low:.1%} - {high:.1%}, clustered by ranking: {n} held-out "
            f"rankings, {record.get('pairs', '?')} pairs)")
    if low > 0.5:
        return text, None
    return text, (f"the reward model is not above chance: its held-out accuracy {acc:.1%} has a 95% interval "
                  f"reaching down to {low:.1%} (<= 50%), so PPO against it may optimise noise. Retrain it (igpt "
                  "train-rm) with more epochs (--epochs), a higher learning rate (--lr) or --lora, or more rankings "
                  "(more held out also narrows the interval)")


# --- length: how much of a score or a preference is response length ------------------------------------------


def average_ranks(xs: list[float]) -> list[float]:
    """1-based ranks of ``xs`` (n,), tied values sharing the mean of the ranks they span ([5, 1, 5] ->
    [2.5, 1, 2.5]): the ranks Spearman's correlation is Pearson's of."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    out = [0.0] * len(xs)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and xs[order[end + 1]] == xs[order[start]]:
            end += 1
        for k in order[start:end + 1]:
            out[k] = (start + end) / 2 + 1
        start = end + 1
    return out


def pearson(xs: list[float], ys: list[float]) -> float:
    """Pearson's r of two equally long lists (n,) whose values both vary (the caller checks)."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))


def correlation(xs: list[float], ys: list[float]) -> dict:
    """Pearson's and Spearman's (rank, ties averaged) correlation of ``xs`` and ``ys`` (n,) with n; both
    None, with the reason, where undefined: fewer than 3 pairs, or either list all one value (zero
    variance; its ranks are then all equal too, so both are undefined together). Never NaN."""
    n = len(xs)
    reason = ("fewer than 3 responses" if n < 3 else "every response has the same length" if len(set(xs)) == 1
              else "every response has the same score" if len(set(ys)) == 1 else None)
    if reason:
        return {"n": n, "pearson": None, "spearman": None, "reason": reason}
    return {"n": n, "pearson": pearson(xs, ys), "spearman": pearson(average_ranks(xs), average_ranks(ys)),
            "reason": None}


def length_bias(scores: list[float], tokens: list[int], words: list[int]) -> dict:
    """The reward model's length bias on one model's samples: the correlation of the RM ``scores`` (n,) with
    response length in ``tokens`` (n,; as sampled, EOS excluded) and in whitespace-separated ``words`` (n,).
    A reward model that prefers longer (or shorter) answers is a target PPO learns (Singhal et al. 2023,
    "A Long Way to Go: Investigating Length Correlations in RLHF")."""
    return {"n": len(scores), "tokens": correlation(tokens, scores), "words": correlation(words, scores)}


def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z)) if z >= 0 else math.exp(z) / (1 + math.exp(z))


def softplus(z: float) -> float:
    """log(1 + e^z) without overflow."""
    return max(z, 0.0) + math.log1p(math.exp(-abs(z)))


def logistic_fit(x: list[float], y: list[float], penalty: float = 0.0, iters: int = 100,
                 tol: float = 1e-10) -> tuple[float, float, list[list[float]]] | None:
    """Maximum-likelihood logistic regression of labels ``y`` (n,) in [0, 1] (fractional labels: y log p +
    (1 - y) log(1 - p)) on one feature ``x`` (n,) with an intercept: P(y) = sigmoid(b0 + b1 x). Newton's method
    with step halving on the negative log-likelihood + ``penalty`` / 2 * b1^2. Returns (b0, b1, covariance
    (2, 2) = the inverse Hessian at the optimum), or None when it does not converge in ``iters`` steps (the
    coefficients run off to infinity: the data are separated)."""
    def loss(b0: float, b1: float) -> float:
        return sum(yi * softplus(-(b0 + b1 * xi)) + (1 - yi) * softplus(b0 + b1 * xi)
                   for xi, yi in zip(x, y)) + penalty / 2 * b1 * b1

    def hessian(b0: float, b1: float) -> tuple[float, float, float]:
        w = [sigmoid(b0 + b1 * xi) * (1 - sigmoid(b0 + b1 * xi)) for xi in x]
        return sum(w), sum(wi * xi for wi, xi in zip(w, x)), sum(wi * xi * xi for wi, xi in zip(w, x)) + penalty

    b0 = b1 = 0.0
    current = loss(b0, b1)
    for _ in range(iters):
        r = [yi - sigmoid(b0 + b1 * xi) for xi, yi in zip(x, y)]
        g0, g1 = sum(r), sum(ri * xi for ri, xi in zip(r, x)) - penalty * b1  # the log-likelihood's gradient
        h00, h01, h11 = hessian(b0, b1)
        det = h00 * h11 - h01 * h01
        if det <= 1e-300:
            return None
        d0, d1 = (h11 * g0 - h01 * g1) / det, (h00 * g1 - h01 * g0) / det
        step = 1.0
        while loss(b0 + step * d0, b1 + step * d1) > current + 1e-12 and step > 1e-6:
            step /= 2
        b0, b1 = b0 + step * d0, b1 + step * d1
        current = loss(b0, b1)
        if max(abs(step * d0), abs(step * d1)) < tol:
            h00, h01, h11 = hessian(b0, b1)
            det = h00 * h11 - h01 * h01
            if det <= 1e-300:
                return None
            return b0, b1, [[h11 / det, -h01 / det], [-h01 / det, h00 / det]]
    return None


SEPARATION_PENALTY = 1 / 2.5 ** 2  # a N(0, 2.5^2) prior on the slope (Gelman et al. 2008), under separation only


def length_controlled_win_rate(labels: list[float], len_a: list[float], len_b: list[float],
                               z: float = Z95) -> dict:
    """A's win rate over B at equal response length, as AlpacaEval 2 controls for length (Dubois et al. 2024,
    "Length-Controlled AlpacaEval", alpaca_eval's ``glm_winrate``): a logistic regression of each judgment
    ``labels`` (n,; A won 1, B won 0, a tie 0.5 as a fractional label) on tanh(d / sd(d)), d = ``len_a`` -
    ``len_b`` (n,) and sd(d) its sample standard deviation, read at d = 0: sigmoid(intercept). The 95%
    interval is the delta method's on the intercept, sigmoid(b0 -+ z se(b0)) with se from the inverse Hessian
    (the binomial variance: a tie's true variance is smaller, so the interval errs wide). Swapping A and B gives
    exactly 1 - the rate. Edges, each said in ``method``:

    - every length difference 0: nothing to control for; the length term is dropped and the rate and its
      interval are the raw rate's exactly (its Wilson interval);
    - every pair the same nonzero difference (one judgment included): length and model cannot be told apart,
      so the rate is None with the reason;
    - every judgment A (or every one B): the MLE's intercept is infinite; the rate is the raw 1 (or 0), the
      interval the raw Wilson interval, and the slope None (no variation in the judgments to explain);
    - the judgments separated by length (A wins exactly where longer, say): the unpenalised slope is infinite,
      so the fit takes a weakly informative N(0, 2.5^2) prior on the slope (an L2 penalty of 0.16), which keeps
      every number finite."""
    n = len(labels)
    out = {"n": n, "win_rate": None, "ci_low": None, "ci_high": None, "intercept": None, "slope": None,
           "length_diff_sd": None}
    if not n:
        return {**out, "method": "no judgments"}
    raw = sum(labels) / n
    d = [a - b for a, b in zip(len_a, len_b)]
    if all(di == 0 for di in d):
        lo, hi = wilson_interval(raw, n)
        return {**out, "win_rate": raw, "ci_low": lo, "ci_high": hi, "length_diff_sd": 0.0,
                "method": "every pair has equal length: the length term is dropped; the raw rate and Wilson interval"}
    if len(set(d)) == 1:
        return {**out, "method": f"every pair differs in length by the same {d[0]:g}: length and model cannot be "
                                  "told apart"}
    sd = math.sqrt(sum((di - sum(d) / n) ** 2 for di in d) / (n - 1))
    out["length_diff_sd"] = sd
    if all(y == 1 for y in labels) or all(y == 0 for y in labels):
        lo, hi = wilson_interval(raw, n)
        return {**out, "win_rate": raw, "ci_low": lo, "ci_high": hi,
                "method": "every judgment went one way: the raw rate and its Wilson interval (the fit's limit)"}
    x = [math.tanh(di / sd) for di in d]
    method = "logistic regression on tanh(length difference / sd), read at equal length; delta-method interval"
    fit = logistic_fit(x, labels)
    if fit is None:
        fit = logistic_fit(x, labels, SEPARATION_PENALTY)
        method += "; judgments separated by length: N(0, 2.5^2) prior (L2 penalty) on the slope"
    if fit is None:  # not reached for labels in [0, 1]: the penalised loss is strictly convex and bounded below
        return {**out, "method": "the regression did not converge"}
    b0, b1, cov = fit
    se = math.sqrt(max(cov[0][0], 0.0))
    return {**out, "win_rate": sigmoid(b0), "ci_low": sigmoid(b0 - z * se), "ci_high": sigmoid(b0 + z * se),
            "intercept": b0, "slope": b1, "method": method}
