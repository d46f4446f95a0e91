"""Issue 34: the over-optimisation watch's statistics. Gao et al.'s gold-vs-KL fit (recovery, its edges, its
peak interval's coverage), the watch's running best and its JSON round trip, and the stop rule."""
from __future__ import annotations

import json
import math
import random

import pytest

from instructgpt_cli.overopt import MIN_POINTS, WatchState, gao_fit, least_squares, should_stop, update

G0, ALPHA, BETA = 0.2, 1.0, 0.5  # a peak at d* = exp(alpha / beta - 1) = e, KL e^2 = 7.389, gold 0.2 + 0.5 e
DS = [0.0] + [0.5 * i for i in range(1, 10)]  # the SFT point and 9 watches, d = 0.5 .. 4.5: the peak inside


def curve(d, g0=G0, alpha=ALPHA, beta=BETA):
    return g0 + (d * (alpha - beta * math.log(d)) if d > 0 else 0.0)


def test_the_fit_recovers_the_curve_exactly_without_noise():
    fit = gao_fit([d * d for d in DS], [curve(d) for d in DS])
    json.dumps(fit, allow_nan=False)  # strict JSON
    assert fit["n"] == 10 and fit["dof"] == 7
    assert fit["g0"] == pytest.approx(G0, abs=1e-9) and fit["alpha"] == pytest.approx(ALPHA, abs=1e-9)
    assert fit["beta"] == pytest.approx(BETA, abs=1e-9) and fit["r2"] == pytest.approx(1.0, abs=1e-12)
    assert fit["peak"] == "inside" and fit["peak_d"] == pytest.approx(math.e, rel=1e-9)
    assert fit["peak_kl"] == pytest.approx(math.e ** 2, rel=1e-9)
    assert fit["peak_gold"] == pytest.approx(G0 + BETA * math.e, rel=1e-9)
    assert fit["peak_kl_ci"] == pytest.approx([math.e ** 2] * 2, rel=1e-6) and fit["no_turn_share"] == 0.0


def test_the_fit_recovers_the_curve_under_noise():
    rng = random.Random(3)
    gold = [curve(d) + rng.gauss(0, 0.03) for d in DS]
    fit = gao_fit([d * d for d in DS], gold)
    assert fit["alpha"] == pytest.approx(ALPHA, abs=3 * fit["alpha_se"]) and fit["alpha_se"] < 0.1
    assert fit["beta"] == pytest.approx(BETA, abs=3 * fit["beta_se"]) and fit["beta_se"] < 0.05
    assert fit["peak"] == "inside" and fit["peak_kl"] == pytest.approx(math.e ** 2, rel=0.25)
    low, high = fit["peak_kl_ci"]
    assert low < fit["peak_kl"] < high and low < math.e ** 2 < high
    assert fit["residual_sd"] == pytest.approx(0.03, rel=0.6) and 0.9 < fit["r2"] < 1


def test_the_fit_needs_min_points_and_three_distinct_positive_kls():
    assert MIN_POINTS == 4
    assert gao_fit([0, 1, 4], [curve(0), curve(1), curve(2)]) is None  # 3 points
    assert gao_fit([0, 0, 1, 4], [0.2, 0.21, curve(1), curve(2)]) is None  # 4 points, 2 distinct d > 0
    assert gao_fit([1, 1, 1, 4, 4, 4], [curve(1)] * 3 + [curve(2)] * 3) is None  # a degenerate design
    assert gao_fit([0, 1, 4, 9], [curve(d) for d in (0, 1, 2, 3)]) is not None
    assert gao_fit([0, 1, None, 4, 9], [0.2, curve(1), 5.0, curve(2), float("nan")]) is None  # 3 usable points
    # 3 distinct d > 0 always identify (g0, alpha, beta): c0 + c1 d + c2 d log d has a monotone derivative, so
    # at most 2 roots on d > 0. The least squares still refuses a singular design itself: a column twice another
    assert least_squares([[1, 1, 2], [1, 2, 4], [1, 3, 6], [1, 4, 8]], [1, 2, 3, 4]) is None
    assert least_squares([[1, 0], [1, 0], [1, 0]], [1, 2, 3]) is None
    coef, inv = least_squares([[1, 0], [1, 1], [1, 2]], [1, 2, 4])  # y = 5/6 + 3/2 x; (X'X)^-1 by hand
    assert coef == pytest.approx([5 / 6, 1.5]) and inv[0] + inv[1] == pytest.approx([5 / 6, -0.5, -0.5, 0.5])


def test_the_fit_at_zero_residual_degrees_of_freedom_has_no_errors():
    fit = gao_fit([1, 4, 9], [curve(d) for d in (1, 2, 3)], min_points=3)
    assert fit["dof"] == 0 and fit["alpha"] == pytest.approx(ALPHA) and fit["beta"] == pytest.approx(BETA)
    assert all(fit[k] is None for k in ("g0_se", "alpha_se", "beta_se", "residual_sd", "peak_kl_ci",
                                        "no_turn_share"))
    json.dumps(fit, allow_nan=False)


def test_a_rising_gold_has_no_turn_and_a_late_turn_is_beyond():
    rising = gao_fit([d * d for d in DS], [curve(d, 0.1, 0.3, -0.1) for d in DS])
    assert rising["beta"] < 0 and rising["peak"] == "none"
    assert rising["peak_d"] is rising["peak_kl"] is rising["peak_gold"] is None
    json.dumps(rising, allow_nan=False)
    late = gao_fit([d * d for d in DS], [curve(d, 0.1, 2.0, 0.5) for d in DS])  # d* = e^3 = 20.1 > 4.5
    assert late["peak"] == "beyond" and late["peak_d"] == pytest.approx(math.exp(3)) and late["d_max"] == 4.5
    rng = random.Random(0)  # noisy and barely bent: some draws have no turn, so the upper bound is open
    flat = gao_fit([d * d for d in DS], [curve(d, 0.1, 1.0, 0.02) + rng.gauss(0, 0.1) for d in DS])
    assert flat["no_turn_share"] > 0.025 and flat["peak_kl_ci"][1] is None
    json.dumps(flat, allow_nan=False)


def test_the_peak_interval_covers_the_true_peak_at_about_its_level():
    """300 simulated runs of 10 watches; the parametric bootstrap's 95% interval held 0.947 when written."""
    rng, true, covered = random.Random(1), math.e ** 2, 0
    for _ in range(300):
        fit = gao_fit([d * d for d in DS], [curve(d) + rng.gauss(0, 0.05) for d in DS])
        low, high = fit["peak_kl_ci"]
        covered += (low is not None and low <= true) and (high is None or true <= high)
    assert 0.85 <= covered / 300 <= 0.99


def test_the_first_watch_is_the_best_and_a_tie_is_not():
    s0 = WatchState()
    s1, best = update(s0, 10, 0.3, 0.5, (0.4, 0.6), [0.4, 0.6])
    assert best and s0 == WatchState()  # the old state is left alone
    assert (s1.best_gold, s1.best_iteration, s1.best_proxy, s1.best_gold_ci, s1.best_values) == (
        0.5, 10, 0.3, [0.4, 0.6], [0.4, 0.6])
    s2, best = update(s1, 20, 0.4, 0.5, (0.4, 0.6), [0.5, 0.5])  # a tie
    assert not best and s2.best_iteration == 10 and s2.since_best == 1 and s2.proxy_since_best == [0.4]
    s3, best = update(s2, 30, 0.45, 0.51, None, [0.5, 0.52])
    assert best and s3 == WatchState(0.51, 30, None, 0.45, [0.5, 0.52], 0, [])


def watches(proxies, golds=None):
    """The state after a best at iteration 40 (gold 0.612, proxy 0.41) and one watch per proxy after it."""
    state, _ = update(WatchState(), 40, 0.41, 0.612, [0.55, 0.67], [1.0] * 4)
    for i, p in enumerate(proxies):
        state, best = update(state, 50 + 10 * i, p, (golds or [0.6] * len(proxies))[i], None, [0.5] * 4)
        assert not best
    return state


def test_patience_fires_after_exactly_p_watches_while_the_proxy_rose():
    assert should_stop(watches([0.5, 0.6]), 3, False, [], []) is None  # P - 1
    assert should_stop(watches([0.5, 0.6, 0.77]), 3, False, [], []) == (
        "gold has not beaten its best (0.612 at iteration 40) for 3 watches while the proxy rose from 0.41 to 0.77")
    assert should_stop(watches([0.5, 0.6, 0.4]), 3, False, [], []) is None  # the proxy fell below its 0.41
    assert should_stop(watches([0.5, 0.6, 0.41]), 3, False, [], []) is None  # and level is not a rise
    assert should_stop(watches([0.5, 0.6, 0.77]), 0, False, [], []) is None  # off
    assert should_stop(watches([0.5, 0.6, 0.77, 0.8]), 3, False, [], []) is not None  # and still after
    assert should_stop(WatchState(), 3, False, [], []) is None


def test_significance_stops_only_on_a_drop_beyond_the_paired_interval():
    state = watches([0.5, 0.6, 0.77])
    # diffs 0.5 0.4 0.6 0.5: mean 0.5, sd sqrt(0.02 / 3) = 0.08165, se 0.040825, t(0.975, 3) = 3.18245,
    # half-width 0.12992: the interval 0.370 .. 0.630 lies above 0
    reason = should_stop(state, 3, True, [1, 1, 1, 1], [0.5, 0.6, 0.4, 0.5])
    assert reason.startswith("gold has not beaten its best (0.612 at iteration 40) for 3 watches")
    assert reason.endswith("the gold fell by 0.5 per prompt (95% CI 0.37 to 0.63, paired over 4 prompts), "
                           "beyond its noise")
    # diffs 0.5 -0.4 0.3 -0.2: mean 0.05, sd sqrt(0.53 / 3) = 0.42032, se 0.21016, half-width 0.66882:
    # the interval -0.619 .. 0.719 holds 0, so the same watches do not stop
    assert should_stop(state, 3, True, [1, 0, 1, 0], [0.5, 0.4, 0.7, 0.2]) is None
    assert should_stop(state, 3, True, ["A", "A", "A"], ["B", "B", "B"]) is not None  # a pairwise judge's
    assert should_stop(state, 3, True, [1.0], [0.0]) is None  # one prompt: no sd, no significance
    with pytest.raises(ValueError):
        should_stop(state, 3, True, [1, 1], [0.5])


def test_the_state_round_trips_through_json_exactly():
    state = watches([0.1 + 0.2, 1 / 3])
    state, _ = update(state, 70, 0.7, 0.1, None, ["A", "tie", "B", "A"])
    assert state.since_best == 3
    back = WatchState.from_dict(json.loads(json.dumps(state.to_dict())))
    assert back == state and back.proxy_since_best[0] == 0.1 + 0.2
    assert WatchState.from_dict(json.loads(json.dumps(WatchState().to_dict()))) == WatchState()
