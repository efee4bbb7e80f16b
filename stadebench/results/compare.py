"""Two runs or two metrics side by side, matched on everything else, each difference judged
by a paired bootstrap over the evaluation items both share and, where a metric was
calibrated on several seeds, over the seeds too (``results.paired``).

Two metrics are matched on model, pattern, sparsity, allocation and evaluation. Cells that
differ only in the calibration seed are one entry, their values averaged over the seeds
both metrics have; cells calibrated otherwise (another dataset, n, seqlen, ...) are
separate entries, never pooled. A metric that reads no data (magnitude) has no seeds and
pairs with every calibration of the other metric.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from typing import Any, Literal

import pyarrow as pa

from .paired import DEFAULT_LEVEL, DEFAULT_RESAMPLES, Interval, paired_bootstrap
from .row import KEY_FIELDS, meta

CALIBRATION = tuple(f for f in KEY_FIELDS if meta(f, "group") == "calibration")
"""The key fields that say how a cell was calibrated (null for a cell that reads no data)."""
PROTOCOL = tuple(f for f in CALIBRATION if f != "calib_seed")
"""The calibration fields other than the seed: cells that share them are seeds of one protocol."""
_PLUGIN_FIELDS = ("", "_version", "_options", "_plugin")
BY = {"metric": ("metric", tuple(f"metric{x}" for x in _PLUGIN_FIELDS)),
      "refine": ("refine", tuple(f"refine{x}" for x in _PLUGIN_FIELDS)),
      "reconstruct": ("reconstruct", tuple(f"reconstruct{x}" for x in _PLUGIN_FIELDS)),
      "run": ("run_id", ("run_id",))}
"""What a comparison sets side by side: the row field naming each side, and the key fields
that may differ between the sides (the rest must match)."""
NONE = "none"

Side = dict[tuple, dict[tuple, dict[tuple | None, dict[int | None, dict]]]]
"""match key -> variant (the compared plugin's version, options and distribution) ->
calibration protocol (None: reads no data) -> seed (None: one row) -> row."""


def _protocol(r: Mapping[str, Any]) -> tuple | None:
    return None if r["calib_n"] is None else tuple(str(r[f]) for f in PROTOCOL)


def side_of(r: Mapping[str, Any], by: str) -> str | None:
    """Which side row ``r`` can be on in a comparison ``by`` (a stage's absence is ``none``;
    the dense baseline has no stages)."""
    field = BY[by][0]
    if by in ("refine", "reconstruct"):
        return None if r["metric"] == "dense" else (r[field] or NONE)
    return None if r[field] is None else str(r[field])


def _sides(table: pa.Table, by: str, names: tuple[str, str], match: list[str]) -> dict[str, Side]:
    """Each name's ok rows, grouped by match key, protocol and seed."""
    sides: dict[str, Side] = {name: {} for name in names}
    for r in table.to_pylist():
        side = side_of(r, by)
        if side in sides and r["status"] == "ok":
            protocol = _protocol(r) if by != "run" else None
            seed = r["calib_seed"] if protocol is not None else None
            key = tuple(str(r[f]) for f in match)
            variant = tuple(str(r[f]) for f in BY[by][1][1:])
            sides[side].setdefault(key, {}).setdefault(variant, {}).setdefault(protocol, {})[seed] = r
    return sides


def side_label(r: Mapping[str, Any], by: str, detailed: bool = False) -> str:
    """A side as the entry names it: ``dsnot``, ``dsnot (update_threshold=0.0125)``, ``stade
    (bias_correction=false)`` (options that differ from the plugin's defaults); ``detailed``
    adds the version and distribution (when options alone do not tell two variants apart)."""
    from .grid import plugin_label

    name = side_of(r, by)
    if by == "run" or name == NONE:
        return str(name)
    field = BY[by][0]
    kind = {"metric": "metric", "refine": "refiner", "reconstruct": "reconstructor"}[by]
    label = plugin_label(kind, name, r[f"{field}_options"])
    if detailed:
        label += f" [v{r[f'{field}_version']}, {r[f'{field}_plugin']}]"
    return label


def _pairs(a: dict, b: dict) -> list[tuple[tuple | None, dict, dict]]:
    """The protocols of two sides that pair: equal ones, or any with a side that reads no data."""
    if None in a or None in b:
        return [(pa_ if pa_ is not None else pb, sa, sb) for pa_, sa in a.items() for pb, sb in b.items()
                if pa_ is None or pb is None]
    return [(p, a[p], b[p]) for p in a.keys() & b.keys()]


def _paired_seeds(a: dict, b: dict) -> tuple[dict, dict]:
    """The seeds both sides have (all of one side when the other has a single unseeded row)."""
    if None in a or None in b:
        return a, b
    shared = a.keys() & b.keys()
    return {s: a[s] for s in shared}, {s: b[s] for s in shared}


def _interval(a: dict, b: dict, resamples: int, level: float) -> Interval | None:
    """The paired bootstrap interval of b − a, or None when a row has no items (older rows)."""
    rows = [*a.values(), *b.values()]
    rules = {r["item_aggregate"] for r in rows}
    if any(r["items"] is None for r in rows) or len(rules) != 1:
        return None
    return paired_bootstrap({s: r["items"] for s, r in b.items()}, {s: r["items"] for s, r in a.items()},
                            rules.pop(), resamples=resamples, level=level)


def _better(rows_a: dict, rows_b: dict, names: tuple[str, str], interval: Interval | None) -> str:
    """Which side scores better; ``~`` when the difference is not detectable (the interval
    holds 0, or, without items, single values inside their combined standard error)."""
    va, vb = _mean(rows_a), _mean(rows_b)
    if va is None or vb is None:
        return "="
    ra, rb = next(iter(rows_a.values())), next(iter(rows_b.values()))
    higher, (a, b) = bool(ra["higher_is_better"]), names
    if interval is not None:
        return "~" if not interval.detectable() else (b if (interval.difference > 0) == higher else a)
    if va == vb:
        return "="
    single = len(rows_a) == len(rows_b) == 1
    if single and (ra["stderr"] is not None or rb["stderr"] is not None):
        if abs(va - vb) <= ((ra["stderr"] or 0.0) ** 2 + (rb["stderr"] or 0.0) ** 2) ** 0.5:
            return "~"
    return b if (vb > va) == higher else a


def _mean(rows: dict) -> float | None:
    values = [r["value"] for r in rows.values()]
    return None if None in values else statistics.fmean(values)


def _calibration_label(r: Mapping[str, Any]) -> str:
    if r["calib_n"] is None:
        return "—"
    label = f"{r['calib_dataset']} {r['calib_n']}×{r['calib_seqlen']}"
    return label + ("" if r["sequential"] else " one-shot")


def compare_rows(table: pa.Table, a: str, b: str, by: Literal["metric", "refine", "reconstruct", "run"] = "metric",
                 *, resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL) -> list[dict[str, Any]]:
    """One entry per result ``a`` and ``b`` share: the two sides as named (``side_a``,
    ``side_b``: the name with its non-default options; a side run with several option sets
    gives an entry per set, never one of them silently), their values (means over paired seeds),
    ``delta`` = b − a, its paired bootstrap interval (``ci_low``, ``ci_high``; null for rows
    stored without items), the seeds and items it pairs, and which side is ``better``
    (``~``: no detectable difference). ``by``: two metrics, two refiners or two
    reconstructors (``none``: without that stage), everything else matched; or two runs
    (same cells). Empty when the two share nothing; ``PairingError`` when results that match
    share no evaluation items."""
    ignore = {*BY[by][1], *CALIBRATION} if by != "run" else {"run_id"}
    match = [f for f in (*KEY_FIELDS, "task", "score") if f not in ignore]
    if by == "run":
        match.insert(0, "cell_key")
    sides = _sides(table, by, (a, b), match)
    out = []
    for key in sorted(sides[a].keys() & sides[b].keys()):
        detailed = (_ambiguous(sides[a][key], by), _ambiguous(sides[b][key], by))
        for va, vb in [(va, vb) for va in sorted(sides[a][key]) for vb in sorted(sides[b][key])]:
            for _, rows_a, rows_b in sorted(_pairs(sides[a][key][va], sides[b][key][vb]), key=lambda p: str(p[0])):
                rows_a, rows_b = _paired_seeds(rows_a, rows_b)
                if rows_a and rows_b:
                    out.append(_entry(rows_a, rows_b, (a, b), by, resamples, level, detailed))
    return out


def _ambiguous(variants: dict[tuple, dict], by: str) -> bool:
    """Whether two variants of a side have one plain label (other versions, same options)."""
    labels = [side_label(_first(protocols), by) for protocols in variants.values()]
    return len(set(labels)) < len(labels)


def _first(protocols: dict) -> dict:
    return next(iter(next(iter(protocols.values())).values()))


def _entry(rows_a: dict, rows_b: dict, names: tuple[str, str], by: str, resamples: int, level: float,
           detailed: tuple[bool, bool]) -> dict[str, Any]:
    """One comparison: the paired seeds' rows of each side, judged."""
    a, b = names
    ra, rb = next(iter(rows_a.values())), next(iter(rows_b.values()))
    interval = _interval(rows_a, rows_b, resamples, level)
    va, vb = _mean(rows_a), _mean(rows_b)
    return {
        "model": ra["model"], "metric": ra["metric"] if by != "metric" else None, "pattern": ra["pattern"],
        "sparsity": ra["sparsity"], "allocation": ra["allocation"],
        **{stage: ra[stage] for stage in ("refine", "reconstruct") if by != stage},
        "calibration": _calibration_label(ra if ra["calib_n"] is not None else rb),
        "evaluation": evaluation_label(ra), "task": ra["task"], "score": ra["score"],
        "side_a": side_label(ra, by, detailed[0]), "side_b": side_label(rb, by, detailed[1]), a: va, b: vb,
        "delta": None if None in (va, vb) else vb - va, "ci_low": interval and interval.low,
        "ci_high": interval and interval.high, "level": interval and interval.level,
        "seeds": max(len(rows_a), len(rows_b)), "items": interval and interval.items,
        "better": _better(rows_a, rows_b, names, interval)}


def evaluation_label(r: Mapping[str, Any]) -> str:
    """What tells two evaluations of one task apart: ``perplexity(enwiki-2016, seqlen=512)``."""
    parts = [p for p in (r["eval_dataset"], r["eval_split"]) if p]
    if r["eval_seqlen"] is not None:
        parts.append(f"seqlen={r['eval_seqlen']}")
    return f"{r['evaluator']}({', '.join(parts)})" if parts else str(r["evaluator"])


__all__ = ["BY", "CALIBRATION", "NONE", "PROTOCOL", "compare_rows", "evaluation_label", "side_label", "side_of"]
