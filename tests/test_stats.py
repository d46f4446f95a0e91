"""Proportions and their intervals at the edges: 0 wins, all wins, one item, no items."""
import json
import math

import pytest

from instructgpt_cli.stats import Z95, wilson_interval, win_rate


@pytest.mark.parametrize("n", range(1, 101))
def test_wilson_clean_sweeps_are_exact_at_the_bound(n):
    lo, hi = wilson_interval(0.0, n)
    assert lo == 0.0 and 0.0 < hi < 1.0
    # the upper bound at 0 wins is z^2 / (n + z^2), by hand
    assert hi == pytest.approx(Z95 ** 2 / (n + Z95 ** 2))
    lo, hi = wilson_interval(1.0, n)
    assert hi == 1.0 and 0.0 < lo < 1.0
    assert lo == pytest.approx(n / (n + Z95 ** 2))


@pytest.mark.parametrize("n", range(1, 101))
def test_wilson_contains_the_rate_for_every_count(n):
    for k in range(n + 1):
        for ties in (0, 1) if k < n else (0,):
            r = win_rate(k, ties, n - k - ties)
            assert 0.0 <= r["ci_low"] <= r["win_rate"] <= r["ci_high"] <= 1.0


def test_one_item_and_no_items():
    one = win_rate(1, 0, 0)
    assert (one["win_rate"], one["ci_high"]) == (1.0, 1.0)
    assert one["ci_low"] == pytest.approx(1 / (1 + Z95 ** 2))
    empty = win_rate(0, 0, 0)
    assert empty["n"] == 0 and empty["win_rate"] is None
    json.loads(json.dumps(empty), parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert wilson_interval(0.5, 0) == (0.0, 1.0)
    assert not math.isnan(wilson_interval(0.5, 1)[0])
