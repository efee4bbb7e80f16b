"""Paired bootstrap comparisons (stadebench.results.paired): the aggregates, exact zero for
identical results, coverage and power on synthetic paired data, seed resampling, pairing by
seed and by id, the errors and the one-line description."""

from __future__ import annotations

import copy
import math
import random

import numpy as np
import pytest

from stadebench.errors import ConfigError
from stadebench.results.paired import (AGGREGATES, DEFAULT_LEVEL, DEFAULT_RESAMPLES, Interval, PairingError,
                                       aggregate, paired_bootstrap)


def items(values, weights=None, ids=None):
    """Item mappings from parallel lists; ids default to 0..n-1."""
    weights = [1.0] * len(values) if weights is None else weights
    ids = range(len(values)) if ids is None else ids
    return [{"id": int(i), "value": float(v), "weight": float(w)} for i, v, w in zip(ids, values, weights)]


def test_constants():
    assert AGGREGATES == ("mean", "exp_mean")
    assert DEFAULT_RESAMPLES == 2000 and DEFAULT_LEVEL == 0.95
    assert issubclass(PairingError, ConfigError)


def test_aggregate_perplexity_and_accuracy():
    # Three windows: total NLL and token counts, as a perplexity evaluator would sum them.
    total_nll = [250.0, 90.0, 310.5]
    tokens = [100, 40, 120]
    ppl = math.exp(sum(total_nll) / sum(tokens))
    windows = items([t / n for t, n in zip(total_nll, tokens)], tokens)
    assert aggregate(windows, "exp_mean") == pytest.approx(ppl, rel=1e-12)
    # An unweighted mean of per-window perplexity would differ: the weights matter.
    assert aggregate(items([t / n for t, n in zip(total_nll, tokens)]), "exp_mean") != pytest.approx(ppl)
    correct = [1, 0, 1, 1, 0, 1, 1, 0]
    assert aggregate(items(correct), "mean") == pytest.approx(5 / 8)


def test_identical_results_give_exact_zero():
    rng = np.random.default_rng(1)
    side = {s: items(rng.normal(3, 1, 50), rng.integers(10, 200, 50)) for s in (0, 1, 2)}
    for rule in AGGREGATES:
        iv = paired_bootstrap(side, copy.deepcopy(side), rule, resamples=500)
        assert (iv.difference, iv.low, iv.high) == (0.0, 0.0, 0.0)
        assert not iv.detectable()
        assert iv.verdict("x", "y", higher_is_better=True) == "no detectable difference"
        assert (iv.seeds, iv.items, iv.resamples) == (3, 50, 500)
    none = {None: side[0]}
    iv = paired_bootstrap(none, copy.deepcopy(none), "exp_mean", resamples=200)
    assert (iv.low, iv.high, iv.seeds) == (0.0, 0.0, 1)


def _simulate(rng, n, shift, rule):
    """One replication: B's per-item values spread widely across items, A = B + shift + small
    noise on the same items, with token-count weights; returns the two sides."""
    weights = rng.integers(50, 150, n)
    base = rng.normal(2.0 if rule == "exp_mean" else 0.0, 1.0, n)
    a = base + shift + rng.normal(0.0, 0.2, n)
    return {None: items(a, weights)}, {None: items(base, weights)}


def test_coverage_of_the_true_difference():
    rng = np.random.default_rng(7)
    shift, reps, n = 0.05, 300, 60
    covered = widths = 0
    for r in range(reps):
        a, b = _simulate(rng, n, shift, "mean")
        iv = paired_bootstrap(a, b, "mean", resamples=1000, seed=r)
        covered += iv.low <= shift <= iv.high
        widths += iv.high - iv.low
    # The noise is independent of the weights, so the population difference of the weighted means is the shift.
    assert covered / reps >= 0.90
    # An unpaired bootstrap (items of A and B drawn apart) would be far too wide and cover ~100%.
    assert covered / reps <= 0.99
    expected_width = 2 * 1.96 * 0.2 / math.sqrt(n)
    assert widths / reps == pytest.approx(expected_width, rel=0.25)


def test_coverage_exp_mean():
    rng = np.random.default_rng(8)
    shift, reps, n = -0.05, 150, 80
    # Population perplexities: B's NLL has mean 2.0, A's 2.0 + shift (weights independent of values).
    truth = math.exp(2.0 + shift) - math.exp(2.0)
    covered = sum(
        iv.low <= truth <= iv.high
        for iv in (paired_bootstrap(*_simulate(rng, n, shift, "exp_mean"), "exp_mean", resamples=1000, seed=r)
                   for r in range(reps)))
    assert covered / reps >= 0.88


def test_large_difference_is_detected_in_the_right_direction():
    rng = np.random.default_rng(3)
    # Item spread (sd 1) swamps the shift; only pairing sees it (paired SE ~0.026).
    a, b = _simulate(rng, 60, 0.15, "mean")
    iv = paired_bootstrap(a, b, "mean", resamples=1000)
    assert iv.detectable() and iv.low > 0
    assert iv.verdict("A", "B", higher_is_better=True) == "A better"
    assert iv.verdict("A", "B", higher_is_better=False) == "B better"
    assert paired_bootstrap(b, a, "mean", resamples=1000).verdict("B", "A", higher_is_better=True) == "A better"
    # Perplexity: A has lower NLL, lower is better.
    a, b = _simulate(rng, 60, -0.15, "exp_mean")
    iv = paired_bootstrap(a, b, "exp_mean", resamples=1000)
    assert iv.high < 0 and iv.difference < 0
    assert iv.verdict("A", "B", higher_is_better=False) == "A better"
    assert paired_bootstrap(b, a, "exp_mean", resamples=1000).verdict("B", "A", False) == "A better"


def test_zero_difference_is_rarely_detected():
    rng = np.random.default_rng(11)
    reps = 300
    found = sum(paired_bootstrap(*_simulate(rng, 60, 0.0, "mean"), "mean", resamples=1000, seed=r).detectable()
                for r in range(reps))
    assert found / reps <= 0.10


def _seeded(rng, seeds, n, spread):
    """A for several calibration seeds, each seed off by its own offset (sd ``spread``), and a
    dense B that does not depend on calibration."""
    base = rng.normal(0.0, 1.0, n)
    offsets = rng.normal(0.0, spread, len(seeds))
    a = {s: items(base + 0.1 + o + rng.normal(0, 0.02, n)) for s, o in zip(seeds, offsets)}
    return a, base


def test_seed_spread_widens_the_interval():
    rng = np.random.default_rng(5)
    a, base = _seeded(rng, [0, 1, 2, 3, 4], 40, spread=0.3)
    b = {s: items(base) for s in a}
    five = paired_bootstrap(a, b, "mean", resamples=1000)
    one = paired_bootstrap({0: a[0]}, {0: b[0]}, "mean", resamples=1000)
    assert five.seeds == 5 and one.seeds == 1
    assert five.high - five.low > 3 * (one.high - one.low)
    per_seed = [aggregate(a[s], "mean") - aggregate(b[s], "mean") for s in a]
    assert five.difference == pytest.approx(np.mean(per_seed), abs=1e-12)


def test_none_side_pairs_with_every_seed():
    rng = np.random.default_rng(6)
    a, base = _seeded(rng, [3, 5, 9], 30, spread=0.1)
    dense = {None: items(base)}
    iv = paired_bootstrap(a, dense, "mean", resamples=300)
    assert (iv.seeds, iv.items) == (3, 30)
    per_seed = [aggregate(a[s], "mean") - aggregate(dense[None], "mean") for s in a]
    assert iv.difference == pytest.approx(np.mean(per_seed), abs=1e-12)
    # The same as giving the dense result under every seed.
    assert paired_bootstrap(a, {s: dense[None] for s in a}, "mean", resamples=300) == iv
    back = paired_bootstrap(dense, a, "mean", resamples=300)
    assert back.seeds == 3 and back.difference == pytest.approx(-iv.difference)


def test_seeds_pair_by_intersection_and_items_by_shared_id():
    rng = np.random.default_rng(9)
    a = {s: items(rng.normal(0, 1, 20)) for s in (1, 2, 3)}
    b = {s: items(rng.normal(0, 1, 25)) for s in (2, 3, 4)}
    b[3] = b[3][:18]  # one seed of B lacks two windows: they leave the comparison
    iv = paired_bootstrap(a, b, "mean", resamples=200)
    assert (iv.seeds, iv.items) == (2, 18)
    trimmed = {s: a[s][:18] for s in (2, 3)}
    expected = np.mean([aggregate(trimmed[s], "mean") - aggregate(b[s][:18], "mean") for s in (2, 3)])
    assert iv.difference == pytest.approx(expected, abs=1e-12)


def test_pairing_is_by_id_not_position():
    rng = np.random.default_rng(4)
    weights = rng.integers(5, 50, 30)
    base = {s: rng.normal(2, 1, 30) for s in (0, 1)}
    a = {s: items(base[s] - 0.1 + rng.normal(0, 0.02, 30), weights) for s in (0, 1)}
    b = {s: items(base[s], weights) for s in (0, 1)}
    before = paired_bootstrap(a, b, "exp_mean", resamples=400, seed=3)
    shuffled = copy.deepcopy(b)
    for s in shuffled:
        random.Random(s).shuffle(shuffled[s])
    assert [it["id"] for it in shuffled[0]] != list(range(30))
    assert paired_bootstrap(a, shuffled, "exp_mean", resamples=400, seed=3) == before
    # Pairing by position would pair different windows: the item spread no longer cancels.
    relabelled = {s: [dict(it, id=i) for i, it in enumerate(shuffled[s])] for s in shuffled}
    wrong = paired_bootstrap(a, relabelled, "exp_mean", resamples=400, seed=3)
    assert wrong.high - wrong.low > 5 * (before.high - before.low)


def test_reproducible_with_seed():
    rng = np.random.default_rng(2)
    a, b = _simulate(rng, 40, 0.1, "mean")
    assert paired_bootstrap(a, b, "mean", resamples=300, seed=1) == paired_bootstrap(a, b, "mean", resamples=300,
                                                                                     seed=1)
    assert paired_bootstrap(a, b, "mean", resamples=300, seed=1) != paired_bootstrap(a, b, "mean", resamples=300,
                                                                                     seed=2)


GOOD = items([1.0, 2.0, 3.0])


@pytest.mark.parametrize("a, b, kwargs, pattern", [
    ({1: GOOD, 2: GOOD}, {3: GOOD}, {}, r"share no calibration seed \(A has seeds \[1, 2\], B has seeds \[3\]\)"),
    ({0: GOOD}, {0: items([1.0], ids=[7])}, {}, r"share no evaluation items \(different windows or documents\)"),
    ({0: GOOD + items([4.0], ids=[1])}, {0: GOOD}, {}, r"result A, seed 0: duplicate item id 1"),
    ({0: GOOD}, {0: items([1.0, math.nan, 3.0])}, {}, r"result B, seed 0: item 1 has a non-finite value"),
    ({None: GOOD}, {0: items([1.0, 2.0, 3.0], [1.0, 0.0, 1.0])}, {}, r"item 1 has weight 0.0; weights must be > 0"),
    ({0: GOOD}, {0: items([1.0, 2.0, 3.0], [1.0, math.inf, 1.0])}, {}, r"non-finite weight"),
    ({0: GOOD}, {0: []}, {}, r"result B, seed 0: no items"),
    ({0: GOOD}, {0: GOOD}, {"rule": "median"}, r"unknown aggregate 'median'"),
    ({0: GOOD}, {0: GOOD}, {"level": 0.5}, r"level must be a number strictly between 0.5 and 1"),
    ({0: GOOD}, {0: GOOD}, {"level": 1.0}, r"level must be"),
    ({0: GOOD}, {0: GOOD}, {"resamples": 50}, r"resamples must be an integer in \[100, 1000000\]"),
    ({0: GOOD}, {0: GOOD}, {"resamples": 1000.0}, r"resamples must be an integer"),
    ({None: GOOD, 1: GOOD}, {0: GOOD}, {}, r"result A mixes the key None"),
    ({0: GOOD}, {"0": GOOD}, {}, r"result B has seed '0'; seeds must be integers"),
    ({0: GOOD}, {0: [{"id": 0, "value": 1.0}]}, {}, r"item 0 has no 'weight'"),
])
def test_errors_name_the_problem(a, b, kwargs, pattern):
    kwargs = {"rule": "mean", **kwargs}
    rule = kwargs.pop("rule")
    with pytest.raises(PairingError, match=pattern):
        paired_bootstrap(a, b, rule, **kwargs)


def test_aggregate_errors():
    with pytest.raises(PairingError, match="unknown aggregate"):
        aggregate(GOOD, "sum")
    with pytest.raises(PairingError, match="no items"):
        aggregate([], "mean")
    with pytest.raises(PairingError, match="weights must be > 0"):
        aggregate(items([1.0], [-2.0]), "mean")


def test_describe_exact_text():
    iv = Interval(difference=-0.41, low=-0.62, high=-0.19, level=0.95, resamples=2000, seeds=5, items=8)
    assert iv.describe("stade", "wanda", "wikitext2 ppl", higher_is_better=False, unit="windows") == (
        "stade \u2212 wanda on wikitext2 ppl: \u22120.41 (95% CI \u22120.62 \u2026 \u22120.19), "
        "5 seeds \u00d7 8 windows: stade better")
    one = Interval(difference=0.012344, low=-0.001, high=0.0254, level=0.9, resamples=500, seeds=1, items=100)
    assert one.describe("a", "b", "arc_easy acc", True, unit="documents") == (
        "a \u2212 b on arc_easy acc: 0.01234 (90% CI \u22120.001 \u2026 0.0254), "
        "1 seed \u00d7 100 documents: no detectable difference")


def test_describe_from_a_bootstrap():
    rng = np.random.default_rng(12)
    nll = rng.normal(2.5, 0.4, 8)
    tokens = rng.integers(900, 1100, 8)
    stade = {s: items(nll - 0.2 + rng.normal(0, 0.01, 8), tokens) for s in range(5)}
    wanda = {s: items(nll + rng.normal(0, 0.01, 8), tokens) for s in range(5)}
    iv = paired_bootstrap(stade, wanda, "exp_mean")
    text = iv.describe("stade", "wanda", "wikitext2 ppl", higher_is_better=False, unit="windows")
    assert text.startswith("stade \u2212 wanda on wikitext2 ppl: \u2212")
    assert "(95% CI \u2212" in text and " \u2026 \u2212" in text
    assert "5 seeds \u00d7 8 windows" in text
    assert text.endswith(": stade better")
    assert f"{abs(iv.difference):.4g}" in text
