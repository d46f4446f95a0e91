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
