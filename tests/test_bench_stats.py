"""unit tier: the benchmark's statistics on synthetic samples (no bundle, milliseconds).

The gate's rule: fail only when the bootstrap CI of median(current) / median(baseline) lies wholly above
1 + tolerance. Noise model: log-normal multiplicative noise (sigma 0.15, i.e. ~15% spread, more than a quiet
machine shows), plus a heavy right tail of outliers where stated.
"""

from __future__ import annotations

import numpy as np
import pytest

from r1c.errors import BenchError
from r1c.runtime.bench.stats import (
    Summary,
    is_improvement,
    is_regression,
    median_ci,
    median_rel_halfwidth,
    paired_diff_ci,
    parse_fraction,
    parse_int_list,
    ratio_of_medians,
)

SEEDS = range(40)


def noisy(rng: np.random.Generator, median: float, n: int, sigma: float = 0.15, outliers: float = 0.0) -> np.ndarray:
    x = median * np.exp(rng.normal(0.0, sigma, n))
    hit = rng.random(n) < outliers
    x[hit] *= rng.uniform(2.0, 10.0, hit.sum())  # preemptions: 2-10x slower samples
    return x


def test_summary_percentiles() -> None:
    s = Summary.of(list(range(1, 101)))
    assert (s.n, s.min, s.max, s.mean) == (100, 1.0, 100.0, 50.5)
    assert s.p50 == pytest.approx(50.5) and s.p90 == pytest.approx(90.1) and s.p99 == pytest.approx(99.01)


@pytest.mark.parametrize("outliers", [0.0, 0.1])
def test_equal_distributions_pass(outliers: float) -> None:
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        ci = ratio_of_medians(noisy(rng, 1e-3, 12, outliers=outliers), noisy(rng, 1e-3, 12, outliers=outliers))
        assert ci.low <= ci.ratio <= ci.high
        assert not is_regression(ci, 0.10), (seed, ci)


def test_clear_slowdown_fails() -> None:
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        ci = ratio_of_medians(noisy(rng, 1.5e-3, 20), noisy(rng, 1e-3, 20))
        assert is_regression(ci, 0.10), (seed, ci)
        assert 1.2 < ci.ratio < 1.9


def test_slowdown_within_tolerance_passes() -> None:
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        ci = ratio_of_medians(noisy(rng, 1.04e-3, 30, sigma=0.05), noisy(rng, 1e-3, 30, sigma=0.05))
        assert not is_regression(ci, 0.10), (seed, ci)


def test_speedup_is_an_improvement_not_a_regression() -> None:
    rng = np.random.default_rng(0)
    ci = ratio_of_medians(noisy(rng, 0.5, 20), noisy(rng, 1.0, 20))
    assert is_improvement(ci, 0.10) and not is_regression(ci, 0.10)


def test_paired_bootstrap_cancels_shared_drift() -> None:
    """Interleaved rounds share the machine's drift; resampling pairs keeps it out of the interval."""
    rng = np.random.default_rng(3)
    drift = np.exp(np.linspace(0.0, 1.0, 20))  # the machine slows down 2.7x during the run
    base = drift * noisy(rng, 1.0, 20, sigma=0.01)
    cur = drift * noisy(rng, 1.15, 20, sigma=0.01)
    paired = ratio_of_medians(cur, base, paired=True)
    unpaired = ratio_of_medians(cur, base)
    assert paired.low > 1.10 and paired.high < 1.20
    assert unpaired.high - unpaired.low > 5 * (paired.high - paired.low)


def test_bootstrap_is_deterministic_and_needs_samples() -> None:
    a, b = [1.0, 1.1, 1.2, 0.9], [1.0, 1.05, 0.95]
    assert ratio_of_medians(a, b) == ratio_of_medians(a, b)
    with pytest.raises(BenchError, match="at least 3"):
        ratio_of_medians([1.0, 2.0], b)
    with pytest.raises(BenchError, match="non-positive"):
        ratio_of_medians([1.0, 0.0, 2.0], b)
    with pytest.raises(BenchError, match="differ in length"):
        ratio_of_medians(a, b, paired=True)


def test_median_halfwidth_shrinks_with_samples() -> None:
    rng = np.random.default_rng(0)
    assert median_rel_halfwidth([1.0, 2.0]) == float("inf")
    assert median_rel_halfwidth(noisy(rng, 1.0, 200)) < median_rel_halfwidth(noisy(rng, 1.0, 10))


def test_median_interval_covers_the_true_median() -> None:
    """N(5, 1) has median 5: the 95% interval of 51 samples holds it for (nearly) every seed, around np.median."""
    covered = 0
    for seed in SEEDS:
        x = np.random.default_rng(seed).normal(5.0, 1.0, 51)
        median, low, high = median_ci(x, seed=seed)
        assert median == np.median(x) and low <= median <= high
        covered += low <= 5.0 <= high
    assert covered >= 0.85 * len(SEEDS), covered
    assert median_ci([-2.0, -1.0, 3.0]) == median_ci([-2.0, -1.0, 3.0])  # seeded; any sign
    with pytest.raises(BenchError, match="at least one sample"):
        median_ci([])


def test_paired_difference_cancels_shared_drift() -> None:
    """cur = base + 0.3 with a common drift of 0..5 over the rounds: the paired interval of median(cur) -
    median(base) is tight around 0.3, while the two medians' own intervals are each wider than 1."""
    rng = np.random.default_rng(3)
    drift = np.linspace(0.0, 5.0, 20)
    base, cur = drift + rng.normal(0.0, 0.01, 20), drift + 0.3 + rng.normal(0.0, 0.01, 20)
    diff, low, high = paired_diff_ci(cur, base)
    assert diff == pytest.approx(np.median(cur) - np.median(base)) and 0.25 < low <= diff <= high < 0.35
    for series in (cur, base):
        _, lo, hi = median_ci(series)
        assert hi - lo > 1.0
    with pytest.raises(BenchError, match="one length"):
        paired_diff_ci([1.0, 2.0], [1.0])


@pytest.mark.parametrize(("text", "values"), [("1,8", [1, 8]), ("1 8", [1, 8]), ("4", [4]), ("2,,3,", [2, 3]),
                                              ("-1,0", [-1, 0])])
def test_parse_int_list(text: str, values: list[int]) -> None:
    assert parse_int_list("--batch", text) == values


@pytest.mark.parametrize(("text", "message"), [("1,x", "--batch takes integers separated by commas, got '1,x'"),
                                               ("1.5", "--batch takes integers"), (",", "--batch is empty")])
def test_parse_int_list_refuses(text: str, message: str) -> None:
    with pytest.raises(BenchError, match=message):
        parse_int_list("--batch", text)


@pytest.mark.parametrize(("text", "value"), [("10%", 0.10), ("0.1", 0.1), ("2.5%", 0.025), ("0", 0.0),
                                             ("150%", 1.5)])
def test_parse_fraction(text: str, value: float) -> None:
    assert parse_fraction(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["ten", "10", "-5%", "%"])
def test_parse_fraction_refuses(text: str) -> None:
    with pytest.raises(BenchError):
        parse_fraction(text)
