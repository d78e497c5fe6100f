"""Statistics of the latency benchmark: percentile summaries, bootstrap confidence intervals on a ratio of
medians, and the regression gate's decision rule.

The rule, stated once (the CLI's `--help` and the pytest plugin quote it):
    ratio = median(current) / median(baseline); its confidence interval comes from a percentile bootstrap
    (both sample sets resampled with replacement, `RESAMPLES` times, seeded so the verdict is reproducible;
    interleaved runs resample the pairs jointly). A metric regresses only when the interval's lower bound
    exceeds 1 + max_regression: the slowdown is larger than the tolerance *and* larger than the noise.
Equal samples therefore pass however noisy they are (the interval straddles 1), and a real slowdown of
less than the tolerance passes too; only a slowdown beyond the tolerance that the repetitions resolve fails.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from r1c.errors import BenchError

RESAMPLES = 2000
CONFIDENCE = 0.95
MIN_SAMPLES = 3  # fewer than this and a median has no usable interval
GATE_RULE = ("ratio = median(current) / median(baseline) with a 95% percentile-bootstrap confidence interval; "
             "a metric fails only if the interval's lower bound exceeds 1 + max_regression")


@dataclasses.dataclass(frozen=True)
class Summary:
    """Order statistics of one metric's samples (seconds, or tokens/s for throughput)."""

    n: int
    mean: float
    p50: float
    p90: float
    p99: float
    min: float
    max: float

    @classmethod
    def of(cls, samples: Sequence[float]) -> Summary:
        x = np.asarray(samples, dtype=np.float64)
        if x.size == 0:
            raise BenchError("benchmark: no samples to summarize")
        p50, p90, p99 = np.percentile(x, [50, 90, 99])
        return cls(n=int(x.size), mean=float(x.mean()), p50=float(p50), p90=float(p90), p99=float(p99),
                   min=float(x.min()), max=float(x.max()))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class RatioCI:
    """median(a) / median(b) and its bootstrap confidence interval [low, high]."""

    ratio: float
    low: float
    high: float
    n_a: int
    n_b: int
    confidence: float = CONFIDENCE
    paired: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        return f"{self.ratio:.3f} [{self.low:.3f}, {self.high:.3f}]"


def _samples(name: str, values: Sequence[float]) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size < MIN_SAMPLES:
        raise BenchError(f"benchmark: {name} needs at least {MIN_SAMPLES} samples, got {x.size}")
    if not np.all(np.isfinite(x)) or np.any(x <= 0):
        raise BenchError(f"benchmark: {name} holds non-positive or non-finite samples")
    return x


def ratio_of_medians(a: Sequence[float], b: Sequence[float], *, paired: bool = False, resamples: int = RESAMPLES,
                     confidence: float = CONFIDENCE, seed: int = 0) -> RatioCI:
    """median(a) / median(b) with a percentile-bootstrap interval.

    paired: a[i] and b[i] were measured back to back (interleaved runs), so one resampled index picks both;
    the drift they share then cancels in the interval as it does in the ratio. Needs len(a) == len(b).
    """
    xa, xb = _samples("the current series", a), _samples("the reference series", b)
    if paired and xa.size != xb.size:
        raise BenchError(f"benchmark: paired series differ in length ({xa.size} vs {xb.size})")
    rng = np.random.default_rng(seed)
    ia = rng.integers(0, xa.size, size=(resamples, xa.size))
    ib = ia if paired else rng.integers(0, xb.size, size=(resamples, xb.size))
    boot = np.median(xa[ia], axis=1) / np.median(xb[ib], axis=1)
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(boot, [tail, 100.0 - tail])
    return RatioCI(ratio=float(np.median(xa) / np.median(xb)), low=float(low), high=float(high),
                   n_a=int(xa.size), n_b=int(xb.size), confidence=confidence, paired=paired)


def _resampled_medians(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return np.median(x[idx], axis=1)


def _interval(boot: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (100.0 - 100.0 * confidence) / 2.0  # 0.95: exactly 2.5
    low, high = np.percentile(boot, [tail, 100.0 - tail])
    return float(low), float(high)


def median_ci(samples: Sequence[float], *, resamples: int = RESAMPLES, confidence: float = CONFIDENCE,
              seed: int = 0) -> tuple[float, float, float]:
    """(median, low, high): the median of `samples` with its percentile-bootstrap interval (`resamples` resamples
    with replacement, seeded; `confidence` 0.95: the 2.5th and 97.5th percentiles of the resampled medians).
    Samples in any unit, of any sign (e.g. a time outside a call, which noise can make negative). BenchError
    when there are none."""
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise BenchError("benchmark: a median interval needs at least one sample")
    boot = _resampled_medians(x, np.random.default_rng(seed).integers(0, x.size, size=(resamples, x.size)))
    return (float(np.median(x)), *_interval(boot, confidence))


def paired_diff_ci(a: Sequence[float], b: Sequence[float], *, resamples: int = RESAMPLES,
                   confidence: float = CONFIDENCE, seed: int = 0) -> tuple[float, float, float]:
    """(difference, low, high): median(a) - median(b) with a percentile-bootstrap interval in which a[i] and b[i]
    (measured back to back in round i) are resampled as a pair, as `ratio_of_medians(paired=True)` does for a
    ratio (e.g. a path's overhead over a bare call: its median minus the bare call's). Units of the samples.
    BenchError when the series are empty or differ in length."""
    xa, xb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if xa.ndim != 1 or xa.size == 0 or xa.shape != xb.shape:
        raise BenchError(f"benchmark: paired series must be non-empty and of one length ({xa.size} vs {xb.size})")
    idx = np.random.default_rng(seed).integers(0, xa.size, size=(resamples, xa.size))
    boot = _resampled_medians(xa, idx) - _resampled_medians(xb, idx)
    return (float(np.median(xa) - np.median(xb)), *_interval(boot, confidence))


def parse_int_list(option: str, text: str) -> list[int]:
    """'1,8' or '1 8' -> [1, 8]: a comma- (or space-) separated option value; BenchError naming `option` for a
    word or an empty list (the range of each value is the caller's to check)."""
    try:
        values = [int(t) for t in text.replace(" ", ",").split(",") if t]
    except ValueError:
        raise BenchError(f"{option} takes integers separated by commas, got {text!r}") from None
    if not values:
        raise BenchError(f"{option} is empty")
    return values


def median_rel_halfwidth(samples: Sequence[float], *, resamples: int = 500, seed: int = 0) -> float:
    """Half the width of the median's 95% bootstrap interval, relative to the median (inf below MIN_SAMPLES)."""
    x = np.asarray(samples, dtype=np.float64)
    if x.size < MIN_SAMPLES:
        return math.inf
    rng = np.random.default_rng(seed)
    boot = np.median(x[rng.integers(0, x.size, size=(resamples, x.size))], axis=1)
    low, high = np.percentile(boot, [2.5, 97.5])
    return float((high - low) / 2.0 / np.median(x))


def is_regression(ci: RatioCI, max_regression: float) -> bool:
    """The gate's rule: the slowdown is beyond the tolerance even at the interval's optimistic end."""
    return ci.low > 1.0 + max_regression


def is_improvement(ci: RatioCI, max_regression: float) -> bool:
    """The mirror image of `is_regression` (reported, never fatal)."""
    return ci.high < 1.0 / (1.0 + max_regression)


def parse_fraction(text: str) -> float:
    """'10%' -> 0.10, '0.1' -> 0.1; a bare number above 1 is refused as ambiguous."""
    s = text.strip()
    try:
        value = float(s[:-1]) / 100.0 if s.endswith("%") else float(s)
    except ValueError:
        raise BenchError(f"--max-regression must be a percentage like 10% or a fraction like 0.1, got {text!r}"
                         ) from None
    if not s.endswith("%") and value > 1.0:
        raise BenchError(f"--max-regression {text} is ambiguous: write {value:g}% or {value / 100:g}")
    if not 0.0 <= value < 10.0:
        raise BenchError(f"--max-regression must be between 0% and 1000%, got {text!r}")
    return value
