"""Paired bootstrap comparisons of two leaderboard results.

A row's score aggregates evaluation *items* (perplexity windows, lm-eval documents), each a
mapping ``{"id": int, "value": float, "weight": float}``, under one of two rules:

- ``"mean"``: ``Σ wᵢ vᵢ / Σ wᵢ`` (accuracy, KL per token);
- ``"exp_mean"``: ``exp(Σ wᵢ vᵢ / Σ wᵢ)`` (perplexity from mean NLL per token).

Two results are compared on the items they share, matched by ``id``: every bootstrap
resample draws the items once, with replacement, and scores both sides on that same draw,
so the difference between documents (one text is hard for every model) cancels and only
the difference between the models is left. When the results exist for several calibration
seeds the seeds are resampled too, so the interval also holds the spread that comes from
the calibration draw. Each side is a mapping ``seed -> items``; the single key ``None``
marks a result that does not depend on calibration and pairs with every seed of the other.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from .row import AGGREGATES

DEFAULT_RESAMPLES = 2000
DEFAULT_LEVEL = 0.95

_MIN_RESAMPLES, _MAX_RESAMPLES = 100, 1_000_000
# Bounds the memory of one chunk of item multiplicities (resamples × items, as float64).
_CHUNK_CELLS = 1 << 22
_MINUS = "\u2212"


class PairingError(ConfigError):
    """Two results that cannot be paired: no shared seeds or no shared items, an unknown aggregate,
    empty items, non-finite values, weights <= 0."""


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_rule(rule: object) -> str:
    if rule not in AGGREGATES:
        raise PairingError(f"unknown aggregate {rule!r}; expected one of {', '.join(AGGREGATES)}.")
    return rule  # type: ignore[return-value]


def _field(item: object, key: str, where: str, index: int) -> object:
    if not isinstance(item, Mapping):
        raise PairingError(f"{where}: item {index} is a {type(item).__name__}, not a mapping with "
                           f"'id', 'value' and 'weight'.")
    if key not in item:
        raise PairingError(f"{where}: item {index} has no {key!r}.")
    return item[key]


def _number(x: object, key: str, where: str, index: int) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise PairingError(f"{where}: item {index} has a non-numeric {key} {x!r}.")
    f = float(x)
    if not math.isfinite(f):
        raise PairingError(f"{where}: item {index} has a non-finite {key} ({f}).")
    if key == "weight" and f <= 0:
        raise PairingError(f"{where}: item {index} has weight {f}; weights must be > 0.")
    return f


def _columns(items: Sequence[Mapping], where: str, ids: bool) -> tuple[list[int], np.ndarray, np.ndarray]:
    """(ids, values, weights) of ``items``, validated; ids are empty when ``ids`` is False."""
    if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Sequence):
        raise PairingError(f"{where}: items must be a list of mappings, got {type(items).__name__}.")
    if not items:
        raise PairingError(f"{where}: no items, so there is no score to compare.")
    keys: list[int] = []
    values = np.empty(len(items))
    weights = np.empty(len(items))
    for i, item in enumerate(items):
        if ids:
            key = _field(item, "id", where, i)
            if not _is_int(key):
                raise PairingError(f"{where}: item {i} has id {key!r}; ids must be integers.")
            keys.append(int(key))
        values[i] = _number(_field(item, "value", where, i), "value", where, i)
        weights[i] = _number(_field(item, "weight", where, i), "weight", where, i)
    if ids and len(set(keys)) != len(keys):
        seen: set[int] = set()
        dup = next(k for k in keys if k in seen or seen.add(k))
        raise PairingError(f"{where}: duplicate item id {dup}; each window or document must appear once.")
    return keys, values, weights


def _score(values: np.ndarray, weights: np.ndarray, rule: str) -> float:
    mean = float(np.dot(weights, values) / np.sum(weights))
    return math.exp(mean) if rule == "exp_mean" else mean


def aggregate(items: Sequence[Mapping], rule: str) -> float:
    """The score ``items`` give under ``rule``: the weighted mean of the values, or its exponential
    for ``"exp_mean"`` (perplexity from NLL per token). Items need ``value`` and ``weight``."""
    rule = _check_rule(rule)
    _, values, weights = _columns(items, "items", ids=False)
    return _score(values, weights, rule)


def _number_text(x: float) -> str:
    # The sign is written apart so that a negative number reads with a true minus sign.
    return (_MINUS if x < 0 else "") + f"{abs(x):.4g}"


@dataclass(frozen=True)
class Interval:
    """A paired bootstrap estimate of ``score(A) − score(B)`` with its percentile interval."""

    difference: float
    """Point estimate: mean over the paired seeds of the per-seed difference on all shared items."""
    low: float
    """Lower end of the percentile bootstrap interval."""
    high: float
    """Upper end of the percentile bootstrap interval."""
    level: float
    """Confidence level of the interval, e.g. 0.95."""
    resamples: int
    """Number of bootstrap resamples drawn."""
    seeds: int
    """Number of paired calibration seeds (1 when neither side has several)."""
    items: int
    """Number of shared evaluation items (windows or documents)."""

    def detectable(self) -> bool:
        """Whether the interval excludes 0 (strictly), so the two results differ detectably."""
        return self.low > 0 or self.high < 0

    def verdict(self, a: str, b: str, higher_is_better: bool) -> str:
        """``"<a> better"``, ``"<b> better"`` or ``"no detectable difference"``; ``a`` and ``b`` name
        the two sides, ``higher_is_better`` says which way the score improves."""
        if not self.detectable():
            return "no detectable difference"
        a_higher = self.low > 0
        return f"{a if a_higher == higher_is_better else b} better"

    def describe(self, a: str, b: str, what: str, higher_is_better: bool, unit: str = "items") -> str:
        """One line such as ``"stade − wanda on wikitext2 ppl: −0.41 (95% CI −0.62 … −0.19),
        5 seeds × 8 windows: stade better"``; ``unit`` names the items (``"windows"``, ...)."""
        pct = f"{round(self.level * 100, 6):g}%"
        seeds = f"{self.seeds} seed" + ("" if self.seeds == 1 else "s")
        return (f"{a} {_MINUS} {b} on {what}: {_number_text(self.difference)} "
                f"({pct} CI {_number_text(self.low)} \u2026 {_number_text(self.high)}), "
                f"{seeds} \u00d7 {self.items} {unit}: {self.verdict(a, b, higher_is_better)}")


def _seed_keys(side: Mapping, name: str) -> list[int | None]:
    if not isinstance(side, Mapping) or not side:
        raise PairingError(f"result {name} must be a non-empty mapping seed -> items.")
    keys = list(side)
    if None in keys:
        if len(keys) != 1:
            raise PairingError(f"result {name} mixes the key None (no calibration) with seeds "
                               f"{sorted(k for k in keys if k is not None)}; use one or the other.")
        return keys
    bad = [k for k in keys if not _is_int(k)]
    if bad:
        raise PairingError(f"result {name} has seed {bad[0]!r}; seeds must be integers or the single key None.")
    return sorted(keys)


def _pair_seeds(a: Mapping, b: Mapping) -> list[tuple[int | None, int | None]]:
    """The (seed of A, seed of B) pairs to compare."""
    ka, kb = _seed_keys(a, "A"), _seed_keys(b, "B")
    if ka == [None] or kb == [None]:
        return [(x, y) for x in ka for y in kb]
    shared = sorted(set(ka) & set(kb))
    if not shared:
        raise PairingError(f"the two results share no calibration seed (A has seeds {ka}, B has seeds {kb}), "
                           f"so they cannot be paired.")
    return [(s, s) for s in shared]


def _aligned(side: Mapping, seeds: list, name: str) -> tuple[list[dict[int, int]], list[tuple]]:
    """Per seed: the position of each id, and the validated (values, weights)."""
    positions, columns = [], []
    for s in seeds:
        where = f"result {name}" + ("" if s is None else f", seed {s}")
        ids, values, weights = _columns(side[s], where, ids=True)
        positions.append({k: i for i, k in enumerate(ids)})
        columns.append((values, weights))
    return positions, columns


def _matrices(a: Mapping, b: Mapping, pairs: list) -> tuple[np.ndarray, int]:
    """Values and weights of both sides on the shared ids, sorted, as one (2k, 2n) matrix
    (rows: A's k seeds then B's; columns: n values then n weights), with n."""
    sa = list(dict.fromkeys(x for x, _ in pairs))
    sb = list(dict.fromkeys(y for _, y in pairs))
    pa, ca = _aligned(a, sa, "A")
    pb, cb = _aligned(b, sb, "B")
    shared = set(pa[0])
    for pos in pa[1:] + pb:
        shared &= pos.keys()
    if not shared:
        raise PairingError("the two results share no evaluation items (different windows or documents), "
                           "so they cannot be compared.")
    ids = sorted(shared)
    rows = []
    for seeds, pos, cols, pick in ((sa, pa, ca, 0), (sb, pb, cb, 1)):
        for x in (pair[pick] for pair in pairs):
            j = seeds.index(x)
            take = np.fromiter((pos[j][k] for k in ids), dtype=np.intp, count=len(ids))
            rows.append(np.concatenate([cols[j][0][take], cols[j][1][take]]))
    return np.stack(rows), len(ids)


def _check_options(resamples: object, level: object, seed: object) -> None:
    if not _is_int(resamples) or not _MIN_RESAMPLES <= resamples <= _MAX_RESAMPLES:  # type: ignore[operator]
        raise PairingError(f"resamples must be an integer in [{_MIN_RESAMPLES}, {_MAX_RESAMPLES}], "
                           f"got {resamples!r}.")
    if isinstance(level, bool) or not isinstance(level, numbers.Real) or not 0.5 < float(level) < 1:
        raise PairingError(f"level must be a number strictly between 0.5 and 1 (e.g. 0.95), got {level!r}.")
    if not _is_int(seed):
        raise PairingError(f"seed must be an integer, got {seed!r}.")


def _differences(unique: np.ndarray, inverse: np.ndarray, k: int, rule: str, counts: np.ndarray) -> np.ndarray:
    """Per resample (rows of ``counts``, item multiplicities) and seed: score(A) − score(B)."""
    n = unique.shape[1] // 2
    values, weights = unique[:, :n], unique[:, n:]
    mean = (counts @ (weights * values).T) / (counts @ weights.T)
    scores = np.exp(mean) if rule == "exp_mean" else mean
    scores = scores[:, inverse]
    return scores[:, :k] - scores[:, k:]


def paired_bootstrap(a: Mapping[int | None, Sequence[Mapping]], b: Mapping[int | None, Sequence[Mapping]],
                     rule: str, *, resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL,
                     seed: int = 0) -> Interval:
    """The paired bootstrap interval of ``score(A) − score(B)`` under ``rule``.

    ``a`` and ``b`` map a calibration seed to its items (``{"id", "value", "weight"}``); a side
    ``{None: items}`` pairs with every seed of the other. Seeds pair by key, items by ``id``
    (only ids present in every list involved count). Each resample draws the items with
    replacement, the same draw for both sides and every seed, and, with several paired seeds,
    the seeds too. ``seed`` seeds the generator, so equal inputs give equal intervals.
    Raises ``PairingError`` when the two cannot be paired or an input is invalid.
    """
    rule = _check_rule(rule)
    _check_options(resamples, level, seed)
    pairs = _pair_seeds(a, b)
    matrix, n = _matrices(a, b, pairs)
    k = len(pairs)
    # Equal rows share one column of the products, so identical inputs give exactly equal
    # scores whatever order the BLAS sums in; a None side also costs one row, not k.
    unique, inverse = np.unique(matrix, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    point = _differences(unique, inverse, k, rule, np.ones((1, n)))
    difference = float(point.mean())

    rng = np.random.default_rng(seed)
    item_p, seed_p = np.full(n, 1.0 / n), np.full(k, 1.0 / k)
    chunk = max(1, _CHUNK_CELLS // n)
    stats = np.empty(resamples)
    for start in range(0, resamples, chunk):
        r = min(chunk, resamples - start)
        diffs = _differences(unique, inverse, k, rule, rng.multinomial(n, item_p, size=r).astype(float))
        if k > 1:
            diffs = diffs * rng.multinomial(k, seed_p, size=r)
        stats[start:start + r] = diffs.sum(axis=1) / k
    if not (math.isfinite(difference) and np.all(np.isfinite(stats))):
        raise PairingError("the scores overflow (exp of a mean above ~709); check that the values are "
                           "NLL per token for 'exp_mean'.")
    tail = (1.0 - float(level)) / 2
    low, high = np.quantile(stats, [tail, 1.0 - tail])
    return Interval(difference=difference, low=float(low), high=float(high), level=float(level),
                    resamples=int(resamples), seeds=k, items=n)


__all__ = ["AGGREGATES", "DEFAULT_LEVEL", "DEFAULT_RESAMPLES", "Interval", "PairingError", "aggregate",
           "paired_bootstrap"]
