"""Schema upgrades: a leaderboard table stored under an older schema version, brought to
the current one (``UPGRADES``), and any table conformed to the current columns."""

from __future__ import annotations

import json
from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc

from ..util import canonical_json
from .row import KEY_FIELDS, SCHEMA, cell_key


def _rekeyed(table: pa.Table) -> pa.Table:
    """``table`` with ``cell_key`` recomputed from its key fields (after an upgrade filled them)."""
    keys = [cell_key(fields) for fields in table.select(list(KEY_FIELDS)).to_pylist()]
    return table.set_column(0, SCHEMA.field("cell_key"), pa.array(keys, pa.string()))


def _filled(table: pa.Table, where: pa.ChunkedArray, values: dict[str, str]) -> pa.Table:
    """``table`` with each string column of ``values`` set to its value on the rows ``where``
    holds, null elsewhere."""
    for name, value in values.items():
        table = table.set_column(table.schema.get_field_index(name), SCHEMA.field(name),
                                 pc.if_else(where, pa.scalar(value), pa.scalar(None, pa.string())))
    return table


def _upgrade_from_1(table: pa.Table) -> pa.Table:
    """Schema 1 -> 2: the new knobs are null, the requested revision is the stored one, and
    ``cell_key`` is recomputed from the upgraded key fields."""
    columns = {name: table[name] for name in table.column_names}
    if "model_revision" in columns:
        columns["model_revision_requested"] = columns["model_revision"]
    return _rekeyed(conform(pa.table(columns)))


def _upgrade_from_2(table: pa.Table) -> pa.Table:
    """Schema 2 -> 3: every pruned row was pruned uniformly over all prunable layers (the
    built-in ``uniform`` allocator, recorded as such); ``cell_key`` is recomputed."""
    table = conform(table)
    return _rekeyed(_filled(table, pc.is_valid(table["pattern"]),
                            {"allocation": "uniform", "allocation_version": "1", "allocation_options": "{}",
                             "allocation_plugin": "stadebench"}))


def _upgrade_from_3(table: pa.Table) -> pa.Table:
    """Schema 3 -> 4: every row that read calibration data summed its statistics in float64
    (``calib_accumulate: float64``, the only way before); ``cell_key`` is recomputed."""
    table = conform(table)
    return _rekeyed(_filled(table, pc.is_valid(table["calib_n"]), {"calib_accumulate": "float64"}))


def _stock(options: str | None) -> str | None:
    """lm-eval options with ``fast: false``; what is not a JSON object is left as it is."""
    try:
        value = json.loads(options) if options else None
    except ValueError:
        return options
    return canonical_json({**value, "fast": False}) if isinstance(value, dict) else options


def _upgrade_from_4(table: pa.Table) -> pa.Table:
    """Schema 4 -> 5: every lm-eval row was scored on lm-eval's own log-likelihood path
    (its option ``fast: false``, the only way before); ``cell_key`` is recomputed."""
    table = conform(table)
    evaluators, options = table["evaluator"].to_pylist(), table["eval_options"].to_pylist()
    fixed = [_stock(o) if e == "lm-eval" else o for e, o in zip(evaluators, options)]
    return _rekeyed(table.set_column(table.schema.get_field_index("eval_options"), SCHEMA.field("eval_options"),
                                     pa.array(fixed, pa.string())))


def _upgrade_from_5(table: pa.Table) -> pa.Table:
    """Schema 5 -> 6: rows made before per-item evidence have no ``items`` (null); keys are unchanged."""
    return conform(table)


def _upgrade_from_6(table: pa.Table) -> pa.Table:
    """Schema 6 -> 7: no row was refined or reconstructed by a stage (``refine`` and
    ``reconstruct`` null, new key fields); ``cell_key`` is recomputed."""
    return _rekeyed(conform(table))


UPGRADES: dict[str, Callable[[pa.Table], pa.Table]] = {"1": _upgrade_from_1, "2": _upgrade_from_2,
                                                        "3": _upgrade_from_3, "4": _upgrade_from_4,
                                                        "5": _upgrade_from_5, "6": _upgrade_from_6}
"""``UPGRADES[v]`` takes a table stored under schema version v and returns it under v + 1,
with the same rows in the same order (compaction splits files by row position)."""


def conform(table: pa.Table, schema: pa.Schema = SCHEMA) -> pa.Table:
    """``table`` with exactly ``schema``'s columns, in order: missing ones null, extras dropped."""
    if table.schema.equals(schema):  # the common case; casting every column costs more than reading
        return table.replace_schema_metadata(schema.metadata)
    columns = [table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(len(table), f.type)
               for f in schema]
    return pa.Table.from_arrays(columns, schema=schema)


__all__ = ["UPGRADES", "conform"]
