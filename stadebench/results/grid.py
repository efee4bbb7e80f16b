"""The display grid: current leaderboard values of one task and score as metrics × "pattern
sparsity", each against its dense baseline, with labels that name only what varies."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
import statistics
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ..util import canonical_json
from .row import BASELINE_FIELDS, KEY_FIELDS, LABEL_FIELDS, SCHEMA, meta
from .store import current, identity, is_value

_COLUMN_FIELDS = ("pattern", "pattern_version", "pattern_options", "pattern_plugin", "sparsity")
_ROW_FIELDS = tuple(f for f in KEY_FIELDS if f not in _COLUMN_FIELDS)
_STAGES = ("refine", "refine_options", "reconstruct", "reconstruct_options")
_NAMED = ("model", "metric", "metric_options", *_STAGES)  # always in a row's label
_ALLOCATION = ("allocation", "allocation_options")  # in the label unless uniform
# Fields shown when they vary, calibration and the like first, then the rest of the key.
_VARYING = (*LABEL_FIELDS, *(f for f in _ROW_FIELDS if f not in LABEL_FIELDS and f not in (*_NAMED, *_ALLOCATION)))
_SEED = "calib_seed"
_UNSEEDED = tuple(f for f in _ROW_FIELDS if f != _SEED)  # a row's fields when seeds are averaged


def plugin_defaults(kind: str, name: str | None) -> dict[str, Any]:
    """The default options of a registered plugin (canonical JSON values); {} when unknown."""
    import json

    from ..plugins import get_plugins

    try:
        registry = get_plugins().registries[kind]
        if name is None or name not in registry:
            return {}
        cls = registry.get(name).cls
        options = cls.from_spec(name).options if kind == "pattern" else cls().options
        return json.loads(canonical_json(options.model_dump(mode="json")))
    except Exception:  # noqa: BLE001 -- a plugin that cannot be built bare: show every option
        return {}


def options_label(options: str | None, defaults: Mapping[str, Any] | None = None) -> str:
    """``k=v, ...`` of the options that differ from ``defaults`` (all of them without)."""
    import json

    parsed = json.loads(options) if options else {}
    if not isinstance(parsed, dict):
        return options or ""
    defaults = defaults or {}
    return ", ".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in parsed.items()
                     if k not in defaults or defaults[k] != v)


def _allocation_label(name: str | None, options: str | None) -> str:
    """``· owl`` or ``· owl(lambda=0.1)`` (non-default options only); nothing for uniform."""
    if name is None or name == "uniform":
        return ""
    text = options_label(options, plugin_defaults("allocator", name))
    return f"· {name}({text})" if text else f"· {name}"


def model_label(model: str | None, source: str | None) -> str:
    """The model as results name it, with what an asset really is: ``smollm2-135m
    (SmolLM2-135M-Instruct, Q4_1 GGUF → float32)``."""
    if source == "asset" and model:
        from ..data.assets import CATALOGUE

        asset = CATALOGUE.get(model)
        if asset is not None and asset.label:
            return f"{model} ({asset.label})"
    return model or ""


@dataclass(frozen=True)
class GridCell:
    """One value of the grid: a pruned result in one row and column, or the mean of the
    results that differ only in their calibration seed.

    ``value``: the score, or its mean over ``n`` seeds (None when a row holds none);
    ``stderr``: its standard error, None when unknown or when seeds are averaged; ``sd``:
    the standard deviation over the seeds (None for one); ``n``: the seeds averaged (1 for a
    single result); ``relative``: ``value / dense - 1`` against the row's dense baseline,
    None without a baseline or a value (or with a dense value of 0); ``significant``:
    whether the value differs detectably from that baseline: by a paired bootstrap over
    the evaluation items (and seeds) where the rows carry items, else by more than their
    combined standard error; None when there is nothing to judge by; ``cell_key``: the
    result key of the (first) leaderboard row the value comes from; ``seeds``: the
    per-seed values by seed, empty for a single result.
    """

    value: float | None
    stderr: float | None
    relative: float | None
    significant: bool | None
    cell_key: str
    n: int = 1
    sd: float | None = None
    seeds: Mapping[int, float | None] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """``{"value", "stderr", "relative", "significant", "cell_key", "n", "sd", "seeds"}``:
        the cell as plain data."""
        return {"value": self.value, "stderr": self.stderr, "relative": self.relative,
                "significant": self.significant, "cell_key": self.cell_key, "n": self.n, "sd": self.sd,
                "seeds": dict(self.seeds)}


@dataclass(frozen=True)
class GridRow:
    """One row of the grid: one setting of the key fields other than the pattern's and the sparsity.

    ``model``: the model id as results name it; ``model_label``: that id with what an asset
    really is (see ``model_label``), the id itself for other models; ``metric``: the metric's
    name; ``label``: the metric, its options that differ from the defaults, a non-uniform
    allocation and any other key field that varies between rows of the same model, metric,
    options and allocation (``wanda calib_n=128 · owl``); ``dense`` and ``dense_stderr``: the
    value and standard error of the newest dense row with the same BASELINE_FIELDS (None
    without one); ``values``: the row's cells by column name, only the columns it has.
    """

    model: str | None
    model_label: str
    metric: str | None
    label: str
    dense: float | None
    dense_stderr: float | None
    values: Mapping[str, GridCell]

    def to_dict(self) -> dict[str, Any]:
        """The row as plain data, its cells as ``GridCell.to_dict``."""
        return {"model": self.model, "model_label": self.model_label, "metric": self.metric, "label": self.label,
                "dense": self.dense, "dense_stderr": self.dense_stderr,
                "values": {column: cell.to_dict() for column, cell in self.values.items()}}


@dataclass(frozen=True)
class Grid:
    """The current ok values of one task and score as rows × "pattern sparsity" columns.

    ``task`` and ``score``: what the values are; ``higher_is_better``: the score's direction,
    None when its rows do not agree or say nothing; ``columns``: the column names in display
    order, ``pattern(options) sparsity`` (non-default pattern options), with ``[plugin
    version]`` where those alone tell two columns apart; ``rows``: ordered by model id then
    label. A grid without rows has nothing to show.
    """

    task: str
    score: str
    higher_is_better: bool | None
    columns: tuple[str, ...]
    rows: tuple[GridRow, ...]

    def cells(self, row: GridRow) -> Iterator[tuple[str, GridCell | None]]:
        """``(column, cell)`` for every column in order; the cell is None where ``row`` has none."""
        for column in self.columns:
            yield column, row.values.get(column)

    def models(self) -> list[str | None]:
        """The distinct model ids of the rows, sorted as text."""
        return sorted({row.model for row in self.rows}, key=str)

    def model_labels(self) -> list[str]:
        """The distinct model labels that say more than their model id, sorted (a table's caption)."""
        return sorted({row.model_label for row in self.rows if row.model_label != row.model})

    def to_dict(self) -> dict[str, Any]:
        """``{"task", "score", "higher_is_better", "columns": [str], "rows": [row]}``: the grid
        as plain data (``GridRow.to_dict``), ready for JSON."""
        return {"task": self.task, "score": self.score, "higher_is_better": self.higher_is_better,
                "columns": list(self.columns), "rows": [row.to_dict() for row in self.rows]}


def pivot(table: pa.Table, task: str, score: str, *, seeds: bool = False) -> Grid:
    """A metrics × "pattern sparsity" grid of the current ok values of one task and score.

    Each cell's relative change is against the newest dense row of the same BASELINE_FIELDS;
    a row is one setting of the key fields other than the pattern's, the sparsity and the
    calibration seed (results that differ only in it are one cell: their mean, sd and n;
    ``seeds=True``: a row per seed instead); its label is the metric, its options that
    differ from the defaults, a non-uniform allocation, and any other key field that
    varies between rows of the same model, metric, options and allocation (see ``Grid``,
    ``GridRow`` and ``GridCell``).
    """
    table = current(table)
    picked = table.filter(pc.and_(pc.and_(is_value(table["task"], task), is_value(table["score"], score)),
                                  is_value(table["status"], "ok")))
    higher = pc.unique(picked["higher_is_better"].drop_null()).to_pylist()
    is_dense = is_value(picked["metric"], "dense")
    evidence = _evidence(picked, is_dense)
    picked = picked.drop_columns([f.name for f in SCHEMA if pa.types.is_list(f.type)])
    pruned = _against_dense(picked.filter(pc.invert(is_dense)), picked.filter(is_dense), seeds)
    columns, rows = _collect(pruned, evidence, seeds)
    names = _column_names(columns)
    order = sorted(columns, key=lambda c: (columns[c]["pattern"] or "", columns[c]["pattern_options"] or "",
                                           columns[c]["sparsity"] or 0.0, names[c]))
    built = [GridRow(**{**row, "values": {names[c]: cell for c, cell in row["values"].items()}})
             for row in rows.values()]
    return Grid(task=task, score=score, higher_is_better=higher[0] if len(higher) == 1 else None,
                columns=tuple(names[c] for c in order),
                rows=tuple(sorted(built, key=lambda r: (r.model or "", r.label))))


def _evidence(picked: pa.Table, is_dense: pa.ChunkedArray) -> dict[str, tuple]:
    """The items behind each row: ``cell_key`` -> (items, aggregate), and for the dense
    baselines ``"dense:" + baseline identity`` -> those of the newest dense row."""
    evidence: dict[str, tuple] = {}
    rows = picked.append_column("_base", identity(picked, BASELINE_FIELDS)).append_column("_dense", is_dense)
    for r in sorted(rows.select(["cell_key", "_base", "_dense", "created_at", "items", "item_aggregate"]).to_pylist(),
                    key=lambda r: r["created_at"]):
        evidence["dense:" + r["_base"] if r["_dense"] else r["cell_key"]] = (r["items"], r["item_aggregate"])
    return evidence


def _against_dense(pruned: pa.Table, dense: pa.Table, seeds: bool = True) -> pa.Table:
    """``pruned`` with its row and column identities, the value and standard error of the
    newest dense row of its BASELINE_FIELDS (``dense``, ``dense_stderr``) and ``relative``."""
    base = pa.table({"_base": identity(dense, BASELINE_FIELDS), "dense": dense["value"],
                     "dense_stderr": dense["stderr"], "t": dense["created_at"],
                     "i": pa.array(range(dense.num_rows), pa.int64())})
    last = pc.ScalarAggregateOptions(skip_nulls=False)
    base = base.sort_by([("t", "ascending"), ("i", "ascending")]).group_by("_base", use_threads=False) \
        .aggregate([("dense", "last", last), ("dense_stderr", "last", last)]) \
        .rename_columns({"dense_last": "dense", "dense_stderr_last": "dense_stderr"})
    pruned = pruned.append_column("_base", identity(pruned, BASELINE_FIELDS)) \
        .append_column("_row", identity(pruned, _ROW_FIELDS if seeds else _UNSEEDED)) \
        .append_column("_column", identity(pruned, _COLUMN_FIELDS))
    pruned = pruned.join(base, "_base", join_type="left outer")
    usable = pc.and_(pc.is_valid(pruned["value"]), pc.fill_null(pc.not_equal(pruned["dense"], 0.0), False))
    ratio = pc.subtract(pc.divide(pruned["value"], pc.if_else(usable, pruned["dense"], None)), 1.0)
    return pruned.append_column("relative", ratio)


def _collect(pruned: pa.Table, evidence: Mapping[str, tuple], seeds: bool = True
             ) -> tuple[dict[str, dict], dict[str, dict]]:
    """The columns (identity -> pattern fields) and the rows (identity -> ``GridRow`` fields,
    ``values`` by column identity) of ``_against_dense`` rows, in the order first met;
    results that differ only in their seed share a row and a cell unless ``seeds``."""
    group = [*_NAMED, *_ALLOCATION]
    varying_fields = _VARYING if seeds else tuple(f for f in _VARYING if f != _SEED)
    distinct = pruned.group_by(group).aggregate(
        [(f, "count_distinct", pc.CountOptions(mode="all")) for f in varying_fields]).to_pylist()
    # a field names a row only where it varies among the rows of its model, metric and allocation
    varies = {tuple(d[g] for g in group): _naming([f for f in varying_fields if d[f"{f}_count_distinct"] > 1])
              for d in distinct}
    varying = sorted({f for fields in varies.values() for f in fields}, key=_VARYING.index)

    columns: dict[str, dict] = {}  # column identity -> its fields
    rows: dict[str, dict] = {}
    members: dict[tuple[str, str], list[dict]] = {}  # (row, column) -> its results, one per seed
    defaults: dict[str | None, dict[str, Any]] = {}
    for r in pruned.select(["_row", "_column", "_base", "cell_key", "model", "model_source", "metric",
                            "metric_options", *_STAGES, "value", "stderr", "dense", "dense_stderr", "relative", _SEED,
                            *_ALLOCATION, *_COLUMN_FIELDS, *varying]).to_pylist():
        columns.setdefault(r["_column"], {f: r[f] for f in _COLUMN_FIELDS})
        if r["metric"] not in defaults:
            defaults[r["metric"]] = plugin_defaults("metric", r["metric"])
        rows.setdefault(r["_row"], {
            "model": r["model"], "model_label": model_label(r["model"], r["model_source"]), "metric": r["metric"],
            "label": " ".join(filter(None, [
                _method_label(r, defaults[r["metric"]]), _allocation_label(r["allocation"], r["allocation_options"]),
                *(f"{f}={r[f]}" for f in varies[tuple(r[g] for g in group)])])),
            "dense": r["dense"], "dense_stderr": r["dense_stderr"], "values": {}})
        members.setdefault((r["_row"], r["_column"]), []).append(r)
    for (row, column), results in members.items():
        rows[row]["values"][column] = _cell(results, evidence)
    return columns, rows


def _naming(fields: list[str]) -> list[str]:
    """The varying fields a label names: a field that does not change the protocol (a
    fingerprint, a version) only when no field that does varies with it."""
    counted = [f for f in fields if meta(f, "counted")]
    return counted or fields


def plugin_label(kind: str, name: str, options: str | None, defaults: Mapping[str, Any] | None = None) -> str:
    """``dsnot`` or ``dsnot (skip_layer=no_skip)``: a plugin's name with the options that
    differ from its defaults (``defaults``, else the registered plugin's)."""
    text = options_label(options, plugin_defaults(kind, name) if defaults is None else defaults)
    return f"{name} ({text})" if text else name


def stage_labels(r: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """The refiner and the reconstructor of row ``r`` as labels name them (None: no such stage)."""
    return tuple(None if r[f] is None else plugin_label(kind, r[f], r[f"{f}_options"])
                 for f, kind in (("refine", "refiner"), ("reconstruct", "reconstructor")))


def _method_label(r: Mapping[str, Any], metric_defaults: Mapping[str, Any]) -> str:
    """``wanda``, ``stade (bias_correction=false)``, ``wanda → dsnot → admm (iterations=10)``:
    the metric and its stages, each with its options that differ from the defaults."""
    metric = plugin_label("metric", r["metric"], r["metric_options"], metric_defaults)
    return " → ".join([metric, *filter(None, stage_labels(r))])


def _cell(results: list[dict], evidence: Mapping[str, tuple]) -> GridCell:
    """One result as it is, or the mean (sd, n) of results that differ only in their seed."""
    first = results[0]
    if len(results) == 1:
        return GridCell(value=first["value"], stderr=first["stderr"], relative=first["relative"],
                        significant=_judged(results, evidence), cell_key=first["cell_key"])
    values = [r["value"] for r in results]
    mean = None if None in values else statistics.fmean(values)
    dense = first["dense"]
    relative = mean / dense - 1 if mean is not None and dense not in (None, 0.0) else None
    return GridCell(value=mean, stderr=None, relative=relative, significant=_judged(results, evidence),
                    cell_key=first["cell_key"], n=len(results), sd=None if mean is None else statistics.stdev(values),
                    seeds={r[_SEED]: r["value"] for r in results})


def _judged(results: list[dict], evidence: Mapping[str, tuple]) -> bool | None:
    """Whether the results differ detectably from their dense baseline: a paired bootstrap
    over items and seeds where all have items, else the standard-error rule (one result)."""
    from .paired import paired_bootstrap

    dense_items, dense_rule = evidence.get("dense:" + results[0]["_base"], (None, None))
    mine = [evidence.get(r["cell_key"], (None, None)) for r in results]
    if dense_items is not None and all(items is not None and rule == dense_rule for items, rule in mine):
        side = {r[_SEED]: items for r, (items, _) in zip(results, mine)}
        return paired_bootstrap(side if len(results) > 1 else {None: mine[0][0]}, {None: dense_items},
                                dense_rule).detectable()
    return _significant(results[0]) if len(results) == 1 else None


def _significant(r: Mapping[str, Any]) -> bool | None:
    """Whether a value differs from its dense baseline by more than their combined standard
    error; None when neither has one (nothing to judge by). For rows stored without items."""
    if r["value"] is None or r["dense"] is None or (r["stderr"] is None and r["dense_stderr"] is None):
        return None
    spread = ((r["stderr"] or 0.0) ** 2 + (r["dense_stderr"] or 0.0) ** 2) ** 0.5
    return abs(r["value"] - r["dense"]) > spread


def _column_names(columns: dict[str, dict]) -> dict[str, str]:
    """'pattern(options) sparsity' per column, plus version and plugin where those alone differ."""
    def name(c: dict, extra: bool) -> str:
        options = options_label(c["pattern_options"], plugin_defaults("pattern", c["pattern"]))
        text = f"{c['pattern'] or '-'}{f'({options})' if options else ''} {c['sparsity'] or 0.0:g}"
        return f"{text} [{c['pattern_plugin']} {c['pattern_version']}]" if extra else text

    short = {k: name(c, False) for k, c in columns.items()}
    clash = {n for n in short.values() if list(short.values()).count(n) > 1}
    return {k: name(c, short[k] in clash) for k, c in columns.items()}


__all__ = ["Grid", "GridCell", "GridRow", "model_label", "options_label", "pivot", "plugin_defaults", "plugin_label",
           "stage_labels"]
