"""Exact statistics for comparing two systems on the same rows: intervals, paired tests, a sentence.

    from fledge.evaluate.stats import paired_bootstrap, mcnemar_exact, wilson_interval, compare_sentence
    diff, lo, hi = paired_bootstrap(tuned_scores, base_scores)      # mean difference, 95% percentile interval
    tuned_only, base_only, p = mcnemar_exact(tuned_pass, base_pass)   # exact two-sided McNemar
    lo, hi = wilson_interval(38, 45)                                  # (0.712, 0.923)
    compare_sentence("dot validity", (38, 45), (16, 45), p)
    # "tuned is better on dot validity: 38/45 vs 16/45, p < 0.001"

Bootstrap. Rows are resampled with replacement, `n` times, with their own
`numpy.random.Generator(PCG64(seed))`: the global NumPy and Python RNG states are never read
or changed, so measuring cannot disturb anything else. A paired bootstrap draws one set of row
indices per resample and applies it to both systems, which keeps the pairing (the difference
between two systems that agree on hard rows has a narrow interval). The interval is the
percentile interval: the (1 - level)/2 and (1 + level)/2 quantiles of the resampled statistics
(NumPy's default linear interpolation). A statistic takes an array of shape (resamples, rows,
*per-row shape) and returns one value per resample: `mean` (the default) and `ratio_of_sums`
(a micro average of (numerator, denominator) rows).

McNemar. Of paired pass/fail results only the discordant rows carry information: b10 rows
where the first system passes and the second fails, b01 the reverse. Under "no difference" each
discordant row is a fair coin, so with X ~ Binomial(b01 + b10, 1/2) the exact two-sided p-value
is min(1, 2 P[X <= min(b01, b10)]), and 1 when there is no discordant row. It is computed with
integers (math.comb), then divided once: exact up to the final rounding to a float.

Wilson. The score interval for k passes in n rows, with z the (1 + level)/2 normal quantile:
centre (p + z^2/2n) / (1 + z^2/n), half-width z / (1 + z^2/n) * sqrt(p(1 - p)/n + z^2/4n^2),
p = k/n. Unlike p +- z sqrt(p(1-p)/n) it stays inside [0, 1] and is not empty at k = 0 or k = n.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from statistics import NormalDist

import numpy as np

Statistic = Callable[[np.ndarray], np.ndarray]
# Resampled values held at once: chunks of resamples keep memory near 16 MB whatever the row count.
_CELLS_PER_CHUNK = 2_000_000


def mean(values: np.ndarray) -> np.ndarray:
    """The mean over rows: (resamples, rows) -> (resamples,). The default statistic."""
    return values.mean(axis=1)


def ratio_of_sums(values: np.ndarray) -> np.ndarray:
    """Sum of numerators over sum of denominators: (resamples, rows, 2) -> (resamples,).

    A micro average (e.g. words in the vocabulary over all words); NaN where every denominator
    in a resample is 0."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return values[..., 0].sum(axis=1) / values[..., 1].sum(axis=1)


def bootstrap_interval(values: Sequence | np.ndarray, *, statistic: Statistic = mean, n: int = 10_000,
                       seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(statistic of `values`, lo, hi): the percentile bootstrap interval of one system's metric."""
    x = _rows(values, "values")
    value = float(statistic(x[None])[0])
    resampled = np.concatenate([statistic(x[idx]) for idx in _index_chunks(len(x), n, seed)])
    return (value, *_percentiles(resampled, level))


def paired_bootstrap(a: Sequence | np.ndarray, b: Sequence | np.ndarray, *, statistic: Statistic = mean,
                     n: int = 10_000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(statistic(a) - statistic(b), lo, hi) over the same rows, resampled jointly.

    a[i] and b[i] are two systems' results on row i (numbers, or (numerator, denominator) pairs
    for `ratio_of_sums`). The interval is the percentile interval of the resampled differences."""
    x, y = _rows(a, "a"), _rows(b, "b")
    if len(x) != len(y):
        raise ValueError(f"paired_bootstrap needs one result per row from each system: {len(x)} vs {len(y)}")
    diff = float(statistic(x[None])[0] - statistic(y[None])[0])
    resampled = np.concatenate([statistic(x[idx]) - statistic(y[idx]) for idx in _index_chunks(len(x), n, seed)])
    return (diff, *_percentiles(resampled, level))


def _rows(values: Sequence | np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim == 0 or len(x) == 0:
        raise ValueError(f"the bootstrap needs at least one row in {what}")
    return x


def _index_chunks(rows: int, n: int, seed: int):
    """Row indices of `n` resamples, (chunk, rows) at a time, from a generator of our own."""
    if n < 1:
        raise ValueError(f"the bootstrap needs at least one resample, got n={n}")
    rng = np.random.Generator(np.random.PCG64(seed))
    chunk = max(1, _CELLS_PER_CHUNK // rows)
    for start in range(0, n, chunk):
        yield rng.integers(0, rows, size=(min(chunk, n - start), rows))


def _percentiles(resampled: np.ndarray, level: float) -> tuple[float, float]:
    _check_level(level)
    finite = resampled[~np.isnan(resampled)]
    if not len(finite):
        return math.nan, math.nan
    lo, hi = np.quantile(finite, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def mcnemar_exact(a_pass: Sequence[bool], b_pass: Sequence[bool]) -> tuple[int, int, float]:
    """(b01, b10, p): rows only b passes, rows only a passes, exact two-sided McNemar p-value."""
    if len(a_pass) != len(b_pass):
        raise ValueError(f"mcnemar_exact needs one result per row from each system: {len(a_pass)} vs {len(b_pass)}")
    if any(v is None for v in (*a_pass, *b_pass)):
        raise ValueError("mcnemar_exact takes pass/fail results; leave out rows that could not be judged first")
    b01 = sum(1 for x, y in zip(a_pass, b_pass) if not x and y)
    b10 = sum(1 for x, y in zip(a_pass, b_pass) if x and not y)
    return b01, b10, binomial_two_sided(min(b01, b10), b01 + b10)


def binomial_two_sided(k: int, n: int) -> float:
    """min(1, 2 P[X <= k]) for X ~ Binomial(n, 1/2), k <= n/2; 1.0 when n == 0."""
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, 2 * tail / 2 ** n)      # int / int: one correctly rounded division


def wilson_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a pass rate k/n (formula in the module docstring)."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"wilson_interval needs 0 <= k <= n and n > 0, got k={k}, n={n}")
    _check_level(level)
    z = NormalDist().inv_cdf((1 + level) / 2)
    p = k / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise ValueError(f"a confidence level is between 0 and 1 (e.g. 0.95), got {level}")


def format_p(p: float) -> str:
    """'p < 0.001', else 'p = ' and two significant digits ('p = 0.62', 'p = 0.049', 'p = 1')."""
    return "p < 0.001" if p < 0.001 else f"p = {p:.2g}"


def compare_sentence(metric: str, tuned: tuple[int, int] | float, baseline: tuple[int, int] | float,
                     p: float | None = None, *, interval: tuple[float, float] | None = None,
                     names: tuple[str, str] = ("tuned", "baseline"), alpha: float = 0.05,
                     level: float = 0.95, higher_is_better: bool = True) -> str:
    """The comparison in plain words.

    tuned, baseline: (passes, rows) for a pass rate, or a number. With a p-value (pass rates: the
    exact McNemar test) the verdict is the test's: significant when p < alpha. Without one, it is
    the bootstrap's: significant when the `interval` of the difference (tuned - baseline, at
    confidence `level`) leaves out 0. The two can disagree on the same rows (the percentile
    bootstrap is approximate, and narrow when few rows differ; the exact test is conservative),
    so when both are given and they disagree, the sentence says so and that the verdict follows
    the test; the interval of a pass rate is then read in points (differences of shares x 100).
    Examples:
        "tuned is better on dot validity: 38/45 vs 16/45, p < 0.001"
        "no significant difference on exact match: 12/45 vs 10/45, p = 0.62"
        "no significant difference on json validity: 23/30 vs 15/30, p = 0.077; the 95% bootstrap
         interval of the difference, +3.3 to +50.0 points, leaves out 0, but the verdict follows
         the exact McNemar test"
        "baseline is better on adherence: 0.61 vs 0.74 (difference -0.13, 95% bootstrap interval
         -0.20 to -0.06)"
    """
    if p is None and interval is None:
        raise ValueError("compare_sentence needs a p-value or an interval of the difference")
    a, b = _as_value(tuned), _as_value(baseline)
    excludes_zero = None
    if interval is not None and not (math.isnan(interval[0]) or math.isnan(interval[1])):
        excludes_zero = not (interval[0] <= 0 <= interval[1])
    if p is not None:
        significant, evidence = p < alpha, format_p(p)
    else:
        lo, hi = interval
        significant = bool(excludes_zero)
        evidence = f"difference {a - b:+.2f}, {level:.0%} bootstrap interval {lo:+.2f} to {hi:+.2f}"
    values = f"{_show(tuned)} vs {_show(baseline)}"
    values += f", {evidence}" if p is not None else f" ({evidence})"
    if not significant or a == b:
        sentence = f"no significant difference on {metric}: {values}"
    else:
        better = names[0] if (a > b) == higher_is_better else names[1]
        sentence = f"{better} is better on {metric}: {values}"
    if p is not None and excludes_zero is not None and excludes_zero != significant:
        lo, hi = interval
        sentence += (f"; the {level:.0%} bootstrap interval of the difference, {100 * lo:+.1f} to {100 * hi:+.1f} "
                     f"points, {'leaves out' if excludes_zero else 'includes'} 0, but the verdict follows the exact "
                     f"McNemar test")
    return sentence


def _as_value(x: tuple[int, int] | float) -> float:
    if isinstance(x, tuple):
        k, n = x
        return k / n if n else math.nan
    return float(x)


def _show(x: tuple[int, int] | float) -> str:
    return f"{x[0]}/{x[1]}" if isinstance(x, tuple) else f"{x:.2f}"
