"""Which rows a report shows: the current rows of a leaderboard, filtered, with the dense
baselines of the pruned rows kept whatever the filters say."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from ..results import store as lb
from ..results.row import BASELINE_FIELDS
from ..errors import ConfigError


class EmptySelection(ConfigError):
    """The filters leave no rows; the message lists what the leaderboard holds."""


def _listed(values: str | Iterable[str] | None) -> list[str] | None:
    if values is None:
        return None
    values = [values] if isinstance(values, str) else [str(v) for v in values]
    return values or None


def _is_suite_file(value: str) -> bool:
    return value.endswith((".yaml", ".yml")) or Path(value).is_file()


def suite_cell_keys(path: str | os.PathLike) -> set[str]:
    """The result keys (``cell_key``) of every row a run of the suite file writes.

    Rows are selected by key rather than by their ``suite`` column because a cell that
    another suite already ran is skipped, not written again: its rows keep that suite's name.
    Identifying the suite's models may need the Hub for Hub models (as ``run --dry-run`` does).
    """
    from ..runner.plan import make_plan
    from ..suite import load_suite

    if not Path(path).is_file():
        raise ConfigError(f"{path}: no such suite file; give a suite name (its `name:`) or a suite YAML file")
    plan = make_plan(load_suite(path), os.devnull, force=True)
    return {pending.key for cell in plan.todo for pending in cell.pending}


def _in(column: pa.ChunkedArray, values: list) -> pa.ChunkedArray:
    return pc.fill_null(pc.is_in(column, value_set=pa.array(values, column.type)), False)


def _baseline(table: pa.Table) -> list[tuple]:
    return [tuple(r.values()) for r in table.select([*BASELINE_FIELDS, "task", "score"]).to_pylist()]


def _inventory(table: pa.Table) -> str:
    parts = []
    for name in ("suite", "model", "task", "metric", "pattern"):
        values = sorted({str(v) for v in table[name].to_pylist() if v is not None})
        if values:
            shown = ", ".join(values[:12]) + (f", … ({len(values)} in all)" if len(values) > 12 else "")
            parts.append(f"{name}s: {shown}")
    return "; ".join(parts)


def select(folder: str | os.PathLike, *, suite=None, model=None, task=None, metric=None, pattern=None,
           refine=None, reconstruct=None) -> pa.Table:
    """The current rows of the leaderboard ``folder`` that match every given filter.

    Each filter is a value or a list of values. ``suite`` takes suite names (the rows'
    ``suite`` column) or suite YAML files (the rows whose key the suite's cells write).
    ``metric``, ``pattern``, ``refine`` and ``reconstruct`` (``none``: without that stage)
    apply to pruned rows; the dense rows that are the baseline
    of a selected row (same model and evaluation) are always kept, whichever run wrote them.
    EmptySelection when nothing is left.
    """
    folder = Path(folder)
    current = lb.current(lb.read(folder))
    if current.num_rows == 0:
        raise EmptySelection(f"no results in {folder}: run a suite first (`stadebench run suites/smoke.yaml`)")
    suites, metrics, patterns = _listed(suite), _listed(metric), _listed(pattern)
    table = lb.query(current, model=_listed(model), task=_listed(task))
    keep = pa.chunked_array([pa.array([True] * table.num_rows, pa.bool_())])
    if suites:
        names = [s for s in suites if not _is_suite_file(s)]
        keys = set().union(*(suite_cell_keys(s) for s in suites if _is_suite_file(s)))
        keep = pc.and_(keep, pc.or_(_in(table["suite"], names), _in(table["cell_key"], sorted(keys))))
    dense = _in(table["metric"], ["dense"])
    if metrics:
        keep = pc.and_(keep, pc.or_(dense, _in(table["metric"], metrics)))
    if patterns:
        keep = pc.and_(keep, pc.or_(dense, _in(table["pattern"], patterns)))
    stages = {"refine": _listed(refine), "reconstruct": _listed(reconstruct)}
    for field, values in stages.items():
        if values:
            named = _in(table[field], values)
            if "none" in values:
                named = pc.or_(named, pc.is_null(table[field]))
            keep = pc.and_(keep, pc.or_(dense, named))
    picked = table.filter(keep)
    wanted = set(_baseline(picked.filter(pc.invert(_in(picked["metric"], ["dense"])))))
    others = table.filter(pc.and_(dense, pc.invert(keep)))
    extra = [i for i, b in enumerate(_baseline(others)) if b in wanted]
    if extra:
        picked = pa.concat_tables([picked, others.take(extra)])
    pruned_wanted = bool(patterns or stages["refine"] or stages["reconstruct"]) or bool(metrics and set(metrics)
                                                                                       - {"dense"})
    if picked.num_rows == 0 or (pruned_wanted and not pc.any(pc.invert(_in(picked["metric"], ["dense"]))).as_py()):
        given = ", ".join(f"{k}={'|'.join(v)}" for k, v in (("suite", suites), ("model", _listed(model)),
                                                             ("task", _listed(task)), ("metric", metrics),
                                                             ("pattern", patterns)) if v)
        raise EmptySelection(f"no results in {folder} for {given}; it holds {_inventory(current)}")
    return picked
