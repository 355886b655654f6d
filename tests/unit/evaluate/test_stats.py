"""stats: McNemar and Wilson match published values; the bootstrap matches exact enumerations and
theory, keeps pairs together, and never touches global RNG state."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from fledge.evaluate.stats import (binomial_two_sided, bootstrap_interval, compare_sentence, format_p, mcnemar_exact,
                                   paired_bootstrap, ratio_of_sums, wilson_interval)


def pairs(both: int, a_only: int, b_only: int, neither: int) -> tuple[list[bool], list[bool]]:
    """Pass/fail lists of two systems with the given 2x2 table."""
    a = [True] * both + [True] * a_only + [False] * b_only + [False] * neither
    b = [True] * both + [False] * a_only + [True] * b_only + [False] * neither
    return a, b


# --- McNemar ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("a_only, b_only, p", [
    (5, 0, 2 / 32),                       # all 5 discordant rows favour a: 2 * 0.5^5 = 0.0625
    (8, 2, 2 * (1 + 10 + 45) / 1024),     # R: binom.test(2, 10)$p.value = 0.109375
    (10, 2, 2 * (1 + 12 + 66) / 4096),    # R: binom.test(2, 12)$p.value = 0.03857422
    (3, 3, 1.0),                          # 2 * P[X <= 3 | n = 6] = 1.31, capped at 1
    (0, 0, 1.0),                          # no discordant rows: no evidence either way
])
def test_mcnemar_exact_matches_binomial_test(a_only, b_only, p):
    a, b = pairs(7, a_only, b_only, 4)
    b01, b10, value = mcnemar_exact(a, b)
    assert (b01, b10) == (b_only, a_only)
    assert value == pytest.approx(p, rel=1e-12)
    assert mcnemar_exact(b, a) == (a_only, b_only, value)          # two-sided: symmetric


def test_mcnemar_user_3_planted_result_is_significant():
    # 38/45 valid DOT tuned vs 16/45 base: both valid on 14, tuned only on 24, base only on 2.
    a, b = pairs(14, 24, 2, 5)
    assert (sum(a), sum(b), len(a)) == (38, 16, 45)
    b01, b10, p = mcnemar_exact(a, b)
    assert (b01, b10) == (2, 24)
    assert p == 2 * (1 + 26 + 325) / 2 ** 26 and p < 0.001          # 1.05e-05


def test_mcnemar_exact_with_many_rows_stays_exact():
    # 3000 discordant rows: integers throughout, no underflow to 0 or overflow to inf.
    p = binomial_two_sided(1400, 3000)
    assert 0 < p < 0.001
    assert binomial_two_sided(1500, 3000) == 1.0


def test_mcnemar_refuses_unjudged_rows_and_unequal_lengths():
    with pytest.raises(ValueError, match="could not be judged"):
        mcnemar_exact([True, None], [True, False])
    with pytest.raises(ValueError, match="one result per row"):
        mcnemar_exact([True], [True, False])


# --- Wilson ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("k, n, lo, hi", [
    # Newcombe (1998), Statistics in Medicine 17:857, table I, method 3 (score, no continuity correction)
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0000, 0.1611),
    (1, 29, 0.0061, 0.1718),
    (29, 29, 0.8830, 1.0000),
])
def test_wilson_interval_matches_newcombe(k, n, lo, hi):
    got = wilson_interval(k, n)
    assert got == pytest.approx((lo, hi), abs=5e-5)


def test_wilson_interval_properties():
    lo95, hi95 = wilson_interval(38, 45)
    lo99, hi99 = wilson_interval(38, 45, level=0.99)
    assert lo99 < lo95 < 38 / 45 < hi95 < hi99
    assert wilson_interval(0, 1)[0] == 0.0 and wilson_interval(1, 1)[1] == 1.0
    for bad in ((1, 0), (3, 2), (-1, 5)):
        with pytest.raises(ValueError):
            wilson_interval(*bad)
    with pytest.raises(ValueError, match="between 0 and 1"):
        wilson_interval(1, 2, level=95)


# --- bootstrap -------------------------------------------------------------------------------------

def test_paired_bootstrap_two_rows_matches_exact_enumeration():
    # Differences [1, 0]: a resample's mean difference is 0, 0.5 or 1 with probability 1/4, 1/2, 1/4,
    # so the 2.5% and 97.5% quantiles are exactly 0 and 1.
    diff, lo, hi = paired_bootstrap([1, 0], [0, 0])
    assert (diff, lo, hi) == (0.5, 0.0, 1.0)


def test_paired_bootstrap_keeps_rows_paired():
    rng = np.random.default_rng(7)
    a = rng.normal(size=200)
    assert paired_bootstrap(a, a) == (0.0, 0.0, 0.0)
    diff, lo, hi = paired_bootstrap(a, a + 0.25)   # every resample differs by exactly -0.25
    assert (diff, lo, hi) == pytest.approx((-0.25, -0.25, -0.25), abs=1e-12)


def test_paired_bootstrap_matches_normal_theory():
    # For a mean difference, the bootstrap interval is close to d +- z * sd(d) / sqrt(m).
    rng = np.random.default_rng(3)
    a = rng.normal(1.0, 1.0, size=400)
    b = a - rng.normal(0.3, 0.5, size=400)
    d = a - b
    diff, lo, hi = paired_bootstrap(a, b, n=20_000)
    half = 1.959964 * d.std() / math.sqrt(len(d))
    assert diff == pytest.approx(d.mean())
    assert lo == pytest.approx(d.mean() - half, abs=0.1 * half)
    assert hi == pytest.approx(d.mean() + half, abs=0.1 * half)


def test_bootstrap_has_its_own_generator():
    a, b = [1, 0, 1, 1, 0, 1], [0, 0, 1, 0, 0, 1]
    np.random.seed(123)
    random.seed(123)
    first = paired_bootstrap(a, b, n=500, seed=5)
    drawn = (np.random.random(), random.random())
    np.random.seed(123)
    random.seed(123)
    assert drawn == (np.random.random(), random.random())      # global streams not advanced
    np.random.seed(999)                                         # nor read
    assert paired_bootstrap(a, b, n=500, seed=5) == first
    x = np.linspace(0, 1, 30) ** 2
    assert bootstrap_interval(x, n=500, seed=6) != bootstrap_interval(x, n=500, seed=5)


def test_bootstrap_interval_of_a_ratio_of_sums():
    # (known words, words) per row: the micro average weights rows by their words.
    rows = [(3, 4), (1, 1), (0, 5), (10, 10)]
    value, lo, hi = bootstrap_interval(rows, statistic=ratio_of_sums)
    assert value == pytest.approx(14 / 20)
    assert 0 <= lo < value < hi <= 1
    diff, _, _ = paired_bootstrap(rows, [(4, 4), (1, 1), (5, 5), (10, 10)], statistic=ratio_of_sums)
    assert diff == pytest.approx(14 / 20 - 1)


def test_bootstrap_refuses_empty_and_unequal_inputs():
    with pytest.raises(ValueError, match="at least one row"):
        bootstrap_interval([])
    with pytest.raises(ValueError, match="one result per row"):
        paired_bootstrap([1, 2], [1])
    with pytest.raises(ValueError, match="resample"):
        paired_bootstrap([1], [1], n=0)


# --- sentences -------------------------------------------------------------------------------------

def test_compare_sentence_wording():
    assert compare_sentence("dot validity", (38, 45), (16, 45), 1.05e-5) == \
        "tuned is better on dot validity: 38/45 vs 16/45, p < 0.001"
    assert compare_sentence("exact match", (12, 45), (10, 45), 0.617) == \
        "no significant difference on exact match: 12/45 vs 10/45, p = 0.62"
    assert compare_sentence("json validity", (5, 20), (18, 20), 0.0002, names=("lora", "base")) == \
        "base is better on json validity: 5/20 vs 18/20, p < 0.001"
    assert compare_sentence("adherence", 0.91, 0.74, interval=(0.1, 0.24)) == \
        "tuned is better on adherence: 0.91 vs 0.74 (difference +0.17, 95% bootstrap interval +0.10 to +0.24)"
    assert compare_sentence("adherence", 0.75, 0.74, interval=(-0.02, 0.04)).startswith("no significant difference")
    assert [format_p(p) for p in (0.00099, 0.049, 0.62, 1.0)] == ["p < 0.001", "p = 0.049", "p = 0.62", "p = 1"]


def test_the_report_authors_case_23_of_30_vs_15_of_30_says_both_and_follows_mcnemar():
    """Tuned only right on 12 rows, the baseline only on 4: the bootstrap interval of the difference
    leaves out 0 while the exact test gives p = 0.077. The sentence keeps McNemar's verdict and says
    that the interval disagrees, so the table and the sentence never contradict each other silently."""
    a, b = pairs(11, 12, 4, 3)
    assert (sum(a), sum(b), len(a)) == (23, 15, 30)
    _, _, p = mcnemar_exact(a, b)
    assert p == pytest.approx(2 * (1 + 16 + 120 + 560 + 1820) / 2 ** 16)       # 0.0768
    # The lower bound sits on 0 (seeds 0 and 1) or just above it (+3.3 points, seeds 2 to 7).
    diff, lo, hi = paired_bootstrap(np.array(a, float), np.array(b, float), seed=2)
    assert lo > 0                                                              # the interval leaves out 0
    sentence = compare_sentence("json validity", (23, 30), (15, 30), p, interval=(lo, hi))
    assert sentence.startswith("no significant difference on json validity: 23/30 vs 15/30, p = 0.077; the 95% "
                               "bootstrap interval of the difference, +")
    assert sentence.endswith("points, leaves out 0, but the verdict follows the exact McNemar test")
    # When both agree, the sentence stays short.
    assert compare_sentence("json validity", (18, 20), (5, 20), 0.0002, interval=(0.4, 0.85)) == \
        "tuned is better on json validity: 18/20 vs 5/20, p < 0.001"
