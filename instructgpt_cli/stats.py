"""Statistics igpt reports: proportions with confidence intervals. Pure Python, no torch."""
from __future__ import annotations

import math

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(p: float, n: int, z: float = Z95) -> tuple[float, float]:
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


def rm_accuracy(correct: int, pairs: int, rankings: int) -> dict:
    """A reward model's held-out pairwise accuracy with its 95% Wilson interval; it is above chance when
    the interval's lower bound is above 0.5. Empty when nothing was held out.

    The interval is taken over the ``rankings`` held out, not the ``pairs``: the C(K,2) pairs of one
    ranking share a prompt and responses, so they are not independent; with equal K, the design effect
    1 + (K(K-1)/2 - 1) rho is at most C(K,2), so the effective sample size is at least the number of
    rankings and this interval errs on the wide side (the honest side for "has it learned anything?")."""
    if not pairs or not rankings:
        return {}
    acc = correct / pairs
    low, high = wilson_interval(acc, rankings)
    return {"accuracy": acc, "accuracy_ci_low": low, "accuracy_ci_high": high, "pairs": pairs,
            "rankings": rankings}


def describe_rm_accuracy(record: dict | None) -> tuple[str, str | None]:
    """(what to print about a reward model's held-out accuracy, a warning or None) from the
    ``eval/``-prefixed stats train-rm saves with the model (``rm_accuracy`` under ``eval/``)."""
    record = record or {}
    acc = record.get("eval/accuracy")
    if acc is None:
        return ("unknown accuracy (no held-out record saved with the reward model)",
                "the reward model's held-out accuracy is unknown, so nothing shows it learned your rankings; "
                "train it with igpt train-rm and --val-fraction > 0 to measure it")
    low, high, n = (record.get(k) for k in ("eval/accuracy_ci_low", "eval/accuracy_ci_high", "eval/rankings"))
    if low is None or high is None or not n:
        return f"held-out accuracy {acc:.1%} (no confidence interval recorded)", None
    text = (f"held-out accuracy {acc:.1%} (95% CI {low:.1%} - {high:.1%}, Wilson over {n} held-out rankings, "
            f"{record.get('eval/pairs', '?')} pairs)")
    if low > 0.5:
        return text, None
    return text, (f"the reward model is not above chance: its held-out accuracy {acc:.1%} has a 95% interval "
                  f"reaching down to {low:.1%} (<= 50%), so PPO against it may optimise noise. Retrain it (igpt "
                  "train-rm) with more epochs (--epochs), a higher learning rate (--lr) or --lora, or more rankings "
                  "(more held out also narrows the interval)")
