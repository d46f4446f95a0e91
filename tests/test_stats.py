"""Proportions and their intervals: at the edges (0 wins, all wins, one item, no items), and how often they
cover the truth, for independent trials (Wilson) and for trials clustered in rankings of mixed K."""
import json
import math

import numpy as np
import pytest

from instructgpt_cli.stats import (Z95, clustered_rate, paired_rate_difference, rm_accuracy, t_quantile,
                                   wilson_interval, win_rate)


def test_wilson_clean_sweeps_are_exact_at_the_bound():
    for n in range(1, 101):
        lo, hi = wilson_interval(0.0, n)
        # the upper bound at 0 wins is z^2 / (n + z^2), by hand; at n wins the lower bound n / (n + z^2)
        assert lo == 0.0 and hi == pytest.approx(Z95 ** 2 / (n + Z95 ** 2))
        lo, hi = wilson_interval(1.0, n)
        assert hi == 1.0 and lo == pytest.approx(n / (n + Z95 ** 2))


@pytest.mark.parametrize("n", [10, 30, 100])
def test_wilson_covers_95_percent_of_binomial_draws(n):
    """The exact coverage of the 95% Wilson interval, summed over every count k of Binomial(n, p): 94-96% on
    average over p in 0.05..0.95 and never below 90% (a Wald interval covers 40% at n = 10, p = 0.05)."""
    def coverage(p):
        return sum(math.comb(n, k) * p ** k * (1 - p) ** (n - k) for k in range(n + 1)
                   if wilson_interval(k / n, n)[0] <= p <= wilson_interval(k / n, n)[1])

    covered = [coverage(p / 100) for p in range(5, 96)]
    assert 0.94 <= sum(covered) / len(covered) <= 0.96 and min(covered) >= 0.90


def test_one_item_and_no_items():
    one = win_rate(1, 0, 0)
    assert (one["win_rate"], one["ci_high"]) == (1.0, 1.0)
    assert one["ci_low"] == pytest.approx(1 / (1 + Z95 ** 2))
    empty = win_rate(0, 0, 0)
    assert empty["n"] == 0 and empty["win_rate"] is None
    json.loads(json.dumps(empty), parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert wilson_interval(0.5, 0) == (0.0, 1.0)
    assert not math.isnan(wilson_interval(0.5, 1)[0])


# --- rates over clustered trials: a reward model's pairs in rankings, judgments of prompts sharing a message ------


def test_t_quantiles_match_the_tables():
    table = {1: 12.706204736, 2: 4.302652730, 3: 3.182446305, 10: 2.228138852, 30: 2.042272456, 120: 1.979930405}
    for df, t in table.items():
        assert t_quantile(0.975, df) == pytest.approx(t, rel=1e-8)
    assert t_quantile(0.975, 2) > t_quantile(0.975, 2.5) > t_quantile(0.975, 3)  # a real df, between the tables
    assert t_quantile(0.975, 1e7) == pytest.approx(Z95)


def simulated_rankings(rng, reps: int, n: int, ks: list[int], signal: list[float]):
    """``reps`` held-out sets of ``n`` rankings: each ranking's K from ``ks``, K true qualities q ~ N(0, 1), and
    reward-model scores a q + N(0, 1) with a per-ranking ``a`` from ``signal`` (a < 0: the model has that prompt
    backwards), so its pairs' correctness is correlated and rankings differ in how well the model does. A pair is
    right with probability 1/2 + atan(a)/pi, the same at every K, so the pair-level accuracy the interval
    estimates is the mean of that over ``signal``. Returns correct pairs and pairs per ranking, (reps, n) each."""
    k = rng.choice(ks, size=(reps, n))
    a = rng.choice(signal, size=(reps, n))
    correct = np.zeros((reps, n))
    for kk in set(ks):
        at = k == kk
        q = rng.standard_normal((int(at.sum()), kk))
        s = a[at][:, None] * q + rng.standard_normal(q.shape)
        i, j = np.triu_indices(kk, 1)
        correct[at] = ((q[:, i] > q[:, j]) == (s[:, i] > s[:, j])).sum(1)
    return correct, k * (k - 1) / 2


BACKWARDS_WEAK_STRONG = [-1.0, 0.5, 4.0]  # per ranking, the model has the prompt backwards, weakly or strongly right
ALL_OR_NOTHING = [-6.0, 6.0, 6.0]  # a ranking is (nearly) all right or all wrong: its pairs are one verdict


@pytest.mark.parametrize("ks, signal", [([2, 9], BACKWARDS_WEAK_STRONG), ([4, 5, 6, 7, 8, 9], BACKWARDS_WEAK_STRONG),
                                        ([2, 9], ALL_OR_NOTHING)],
                         ids=["K in {2,9}", "K in 4..9", "K in {2,9}, all or nothing"])
def test_rm_accuracy_interval_covers_95_percent_with_mixed_k(ks, signal):
    """2000 seeded held-out sets of 30 rankings: the 95% interval clustered by ranking contains the true pair
    accuracy 93-97% of the time. A Wilson interval over the pairs, as if they were independent, covers far less,
    and where a ranking's pairs are one verdict, so does the one over the rankings igpt used before (issue 29):
    this check can fail."""
    truth = float(np.mean([0.5 + math.atan(a) / math.pi for a in signal]))
    correct, pairs = simulated_rankings(np.random.default_rng(0), 2000, 30, ks, signal)
    covered = over_pairs = over_rankings = 0
    for c, m in zip(correct.tolist(), pairs.tolist()):
        r = rm_accuracy(c, m)
        covered += r["accuracy_ci_low"] <= truth <= r["accuracy_ci_high"]
        lo, hi = wilson_interval(sum(c) / sum(m), sum(m))
        over_pairs += lo <= truth <= hi
        lo, hi = wilson_interval(sum(c) / sum(m), len(m))
        over_rankings += lo <= truth <= hi
    assert 0.93 <= covered / 2000 <= 0.97
    assert over_pairs / 2000 < 0.85
    if signal is ALL_OR_NOTHING:
        assert over_rankings / 2000 < 0.91


def test_clustered_rate_by_hand_and_its_invariances():
    # equal clusters: df is n - 1 and the CR2 variance is sum(e_i^2) / (1 - 1/n) / M^2 (the CR1 one)
    r = clustered_rate([4, 0, 2, 2], [4, 4, 4, 4])
    assert r["rate"] == 0.5 and r["df"] == pytest.approx(3)
    var = (4 + 4 + 0 + 0) / (1 - 1 / 4) / 16 ** 2  # residuals 2, -2, 0, 0
    assert r["effective_n"] == pytest.approx(0.25 / var)
    n_adj = r["effective_n"] * (Z95 / t_quantile(0.975, 3)) ** 2
    assert (r["ci_low"], r["ci_high"]) == pytest.approx(wilson_interval(0.5, n_adj))
    # the order of the clusters does not matter; one large cluster among small ones costs degrees of freedom
    assert clustered_rate([2, 4, 2, 0], [4, 4, 4, 4]) == pytest.approx(r)
    uneven = clustered_rate([30, 1, 0, 1, 1], [36, 1, 1, 1, 1])
    assert uneven["df"] < 2 < 4
    # pairs that all agree within their ranking (one ranking = one verdict) are worth one trial per ranking,
    # not one per pair: the interval is as wide as Wilson's over rankings or wider
    whole = clustered_rate([6] * 12 + [0] * 8, [6] * 20)
    assert whole["effective_n"] == pytest.approx(20 * 19 / 20, rel=0.02)
    assert whole["ci_high"] - whole["ci_low"] >= wilson_interval(0.6, 20)[1] - wilson_interval(0.6, 20)[0]
    # pairs as independent as coin flips within rankings: close to Wilson over all the pairs
    flips = clustered_rate([3, 3, 2, 4] * 10, [6] * 40)
    assert flips["effective_n"] > 100


def paired_rankings(rng, reps: int, n: int, ks: list[int], shared: float):
    """Two reward models on the same ``reps`` x ``n`` held-out rankings (K from ``ks``, K true qualities q ~ N(0,
    1)): model A scores a q + e, model B (a - 0.8) q + ``shared`` e + sqrt(1 - shared^2) e' (its noise partly A's:
    models from one base err alike), a per ranking from BACKWARDS_WEAK_STRONG. Returns each model's correct
    pairs and the pairs per ranking, (reps, n) each."""
    k = rng.choice(ks, size=(reps, n))
    a = rng.choice(BACKWARDS_WEAK_STRONG, size=(reps, n))
    ca, cb = np.zeros((reps, n)), np.zeros((reps, n))
    for kk in set(ks):
        at = k == kk
        q = rng.standard_normal((int(at.sum()), kk))
        e, e2 = rng.standard_normal(q.shape), rng.standard_normal(q.shape)
        sa = a[at][:, None] * q + e
        sb = (a[at][:, None] - 0.8) * q + shared * e + math.sqrt(1 - shared ** 2) * e2
        i, j = np.triu_indices(kk, 1)
        ca[at] = ((q[:, i] > q[:, j]) == (sa[:, i] > sa[:, j])).sum(1)
        cb[at] = ((q[:, i] > q[:, j]) == (sb[:, i] > sb[:, j])).sum(1)
    return ca, cb, k * (k - 1) / 2


@pytest.mark.parametrize("shared", [0.0, 0.8])
def test_the_paired_difference_of_two_accuracies_covers_95_percent(shared):
    """2000 seeded held-out sets of 30 rankings of K in {2, 9} scored by two models: the paired interval of the
    difference of their accuracies contains the true difference (from 200,000 rankings) 93-97% of the time, and
    where the models err alike it is narrower than the difference of two independent intervals would be."""
    ca, cb, pairs = paired_rankings(np.random.default_rng(1), 200, 1000, [2, 9], shared)
    truth = (ca.sum() - cb.sum()) / pairs.sum()
    assert truth > 0.03  # A is the better model
    ca, cb, pairs = paired_rankings(np.random.default_rng(2), 2000, 30, [2, 9], shared)
    covered, widths, unpaired = 0, [], []
    for x, y, m in zip(ca.tolist(), cb.tolist(), pairs.tolist()):
        r = paired_rate_difference(x, y, m)
        covered += r["ci_low"] <= truth <= r["ci_high"]
        widths.append(r["ci_high"] - r["ci_low"])
        ra, rb = rm_accuracy(x, m), rm_accuracy(y, m)
        unpaired.append(math.hypot(ra["accuracy_ci_high"] - ra["accuracy_ci_low"],
                                   rb["accuracy_ci_high"] - rb["accuracy_ci_low"]))
    assert 0.93 <= covered / 2000 <= 0.97
    if shared:
        assert np.median(widths) < 0.8 * np.median(unpaired)


def test_the_paired_difference_by_hand_and_at_the_edges():
    # equal clusters of 4 pairs: d = (7 - 3) / 16; residuals (a - b) - d t: 2 - 1, 2 - 1, 0 - 1, 0 - 1
    r = paired_rate_difference([4, 3, 0, 0], [2, 1, 0, 0], [4, 4, 4, 4])
    assert r["difference"] == pytest.approx(0.25) and r["df"] == pytest.approx(3)
    se = math.sqrt(4 / (1 - 1 / 4)) / 16
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((0.25 - t_quantile(0.975, 3) * se,
                                                         0.25 + t_quantile(0.975, 3) * se))
    # swapping the models negates it; the clusters' order does not matter
    back = paired_rate_difference([2, 1, 0, 0], [4, 3, 0, 0], [4, 4, 4, 4])
    assert (back["difference"], back["ci_low"], back["ci_high"]) == pytest.approx((-0.25, -r["ci_high"], -r["ci_low"]))
    assert paired_rate_difference([0, 4, 0, 3], [0, 2, 0, 1], [4, 4, 4, 4]) == pytest.approx(r)
    # two models that agree on every pair: 0, with the rule of three over the clusters
    same = paired_rate_difference([3, 1, 6, 0] * 5, [3, 1, 6, 0] * 5, [6] * 20)
    assert same["difference"] == 0.0 and (same["ci_low"], same["ci_high"]) == pytest.approx((-3 / 20, 3 / 20))
    # a clean sweep (A right, B wrong on every pair): 1, the interval never past 1
    sweep = paired_rate_difference([6] * 10, [0] * 10, [6] * 10)
    assert sweep["difference"] == 1.0 and sweep["ci_high"] == 1.0 and 0.5 < sweep["ci_low"] < 1.0
    # one cluster: nothing measures how clusters vary; none: nothing at all; a cluster with no pairs is dropped
    one = paired_rate_difference([2], [1], [3])
    assert one["difference"] == pytest.approx(1 / 3) and (one["ci_low"], one["ci_high"]) == (-1.0, 1.0)
    assert paired_rate_difference([], [], [])["difference"] is None
    assert paired_rate_difference([0, 2], [0, 1], [0, 3]) == pytest.approx({**one, "df": None})
    json.dumps(paired_rate_difference([1, 2, 0], [0, 2, 1], [3, 3, 1]), allow_nan=False)


def test_rm_accuracy_at_the_edges():
    assert rm_accuracy([], []) == {} and rm_accuracy([0, 0], [0, 0]) == {}  # nothing held out, or no pairs
    one = rm_accuracy([2], [3])  # one ranking: nothing measures how rankings differ
    assert one["accuracy"] == pytest.approx(2 / 3) and (one["accuracy_ci_low"], one["accuracy_ci_high"]) == (0, 1)
    assert (one["pairs"], one["rankings"]) == (3, 1)
    # every pair wrong, or every pair right: no spread between rankings, so each ranking counts as one trial
    zero, full = rm_accuracy([0] * 10, [6] * 10), rm_accuracy([6, 1, 36] * 10, [6, 1, 36] * 10)
    assert zero["accuracy"] == 0.0 and zero["accuracy_ci_low"] == 0.0 and 0 < zero["accuracy_ci_high"] < 0.5
    assert full["accuracy"] == 1.0 and full["accuracy_ci_high"] == 1.0 and 0.5 < full["accuracy_ci_low"] < 1
    df = clustered_rate([0] * 10, [6] * 10)["df"]
    assert zero["accuracy_ci_high"] == pytest.approx(wilson_interval(0, 10 * (Z95 / t_quantile(0.975, df)) ** 2)[1])
    # a ranking with no pairs (all tied) is no cluster
    assert rm_accuracy([3, 0], [3, 0]) == {**rm_accuracy([3], [3])}
    json.dumps(rm_accuracy([1, 2, 0], [3, 3, 1]), allow_nan=False)


def test_grouped_win_rate_clusters_by_group_at_the_edges():
    from instructgpt_cli.stats import grouped_win_rate

    # 2 messages x 4 framings: message a won all 4 (4), message b 1 win, 2 ties, 1 loss (2): rate 6/8
    winners, groups = ["A"] * 4 + ["A", "tie", "tie", "B"], ["a"] * 4 + ["b"] * 4
    r = grouped_win_rate(winners, groups)
    assert (r["wins"], r["ties"], r["losses"], r["n"], r["groups"]) == (5, 2, 1, 8, 2)
    assert r["win_rate"] == 0.75
    c = clustered_rate([4.0, 2.0], [4, 4])
    assert (r["ci_low"], r["ci_high"]) == (c["ci_low"], c["ci_high"])
    assert r["ci_iid"] == list(wilson_interval(0.75, 8)) and r["design_effect"] == pytest.approx(8 / c["effective_n"])
    # a clean sweep: rate 1, the interval reaches 1, each message one trial (wider than Wilson over 8 prompts)
    sweep = grouped_win_rate(["A"] * 8, groups)
    assert sweep["win_rate"] == 1.0 and sweep["ci_high"] == 1.0 and sweep["ci_low"] < wilson_interval(1.0, 8)[0]
    # one message: nothing measures how messages differ
    one = grouped_win_rate(["A", "B", "tie"], ["a"] * 3)
    assert one["win_rate"] == 0.5 and (one["ci_low"], one["ci_high"]) == (0.0, 1.0) and one["design_effect"] is None
    # no judgments
    empty = grouped_win_rate([], [])
    assert empty["win_rate"] is None and empty["ci_low"] is None and empty["n"] == 0
    json.dumps([r, sweep, one, empty], allow_nan=False)


def test_the_mean_s_t_interval_at_its_edges_and_its_coverage():
    """stats.mean_interval (eval's toxicity and the watch's gold): none below two values or without an sd; at two
    values Student's t with 1 degree of freedom (12.706); a spread of 0 gives the mean itself; and over
    simulated studies of 5 normal values it covers the true mean 95% of the time."""
    from instructgpt_cli.stats import mean_interval

    assert mean_interval(0.4, 0.1, 1) is None and mean_interval(0.4, 0.1, 0) is None
    assert mean_interval(None, 0.1, 5) is None and mean_interval(0.4, None, 5) is None
    low, high = mean_interval(1.0, 2.0, 2)  # two values 1 +- sqrt(2): sd 2
    assert (low, high) == pytest.approx((1.0 - 12.7062 * 2.0 / math.sqrt(2), 1.0 + 12.7062 * 2.0 / math.sqrt(2)),
                                        rel=1e-4)
    assert mean_interval(0.7, 0.0, 10) == [0.7, 0.7]
    rng = np.random.default_rng(0)
    draws = rng.normal(3.0, 2.0, size=(4000, 5))
    covered = sum(lo <= 3.0 <= hi for lo, hi in (mean_interval(float(d.mean()), float(d.std(ddof=1)), 5)
                                                 for d in draws))
    assert 0.94 <= covered / 4000 <= 0.96
