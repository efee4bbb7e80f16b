"""The results store: a folder of Parquet files plus ``manifest.json``.

Every write adds one new Parquet file (one per finished cell or batch of rows); no file is
ever rewritten, so a killed run loses at most the file it was writing. Files appear under
their final name only once complete (temporary, dot-prefixed name, fsync, ``os.replace``),
so readers never see half a file. The files on disk are the truth; ``manifest.json`` is an
index of them (schema version, names, row counts) that every write rebuilds under a lock.

Plain pyarrow reads a leaderboard without stadebench::

    pyarrow.dataset.dataset("leaderboard", format="parquet", exclude_invalid_files=True)

(``exclude_invalid_files`` skips ``manifest.json``; dot-prefixed files are ignored anyway).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import numbers
import os
import re
import uuid
import warnings
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from filelock import FileLock

from ..errors import StadebenchError

SCHEMA_VERSION = "1"
VERSION_KEY = "stadebench.schema_version"
MANIFEST = "manifest.json"
STATUSES = ("ok", "failed")


class LeaderboardError(StadebenchError, ValueError):
    """Rows that do not fit the schema, or a leaderboard file this version cannot read."""


class LeaderboardWarning(UserWarning):
    """A leaderboard file was skipped because it could not be read."""


def _field(name: str, type_: pa.DataType, doc: str, nullable: bool = True) -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={"doc": doc})


_str, _f64, _i32, _i64, _bool = pa.string(), pa.float64(), pa.int32(), pa.int64(), pa.bool_()

SCHEMA = pa.schema(
    [
        # --- key: what was measured ---
        _field("cell_key", _str, "sha256 hex of the canonical JSON of KEY_FIELDS.", nullable=False),
        _field("model", _str, "Model id: hub repo id, local model name or asset name."),
        _field("model_revision", _str, "Hub commit or revision of the weights, if any."),
        _field("model_source", _str, "Where the weights came from: hub, local, gguf or asset."),
        _field("metric", _str, "Pruning metric name; 'dense' for the unpruned baseline."),
        _field("metric_version", _str, "Version the metric plugin declares."),
        _field("metric_options", _str, "Metric options, defaults included, as canonical JSON."),
        _field("pattern", _str, "Sparsity pattern (unstructured, 2:4, ...); null for dense."),
        _field("pattern_options", _str, "Pattern options as canonical JSON; null when it has none."),
        _field("sparsity", _f64, "Target sparsity in [0, 1); 0 for dense."),
        _field("calib_dataset", _str, "Calibration dataset name."),
        _field("calib_options", _str, "Calibration dataset options as canonical JSON."),
        _field("calib_n", _i32, "Number of calibration windows."),
        _field("calib_seqlen", _i32, "Tokens per calibration window."),
        _field("calib_seed", _i64, "Seed that picked the calibration windows."),
        _field("sequential", _bool, "True: blocks calibrated on pruned outputs; false: one-shot."),
        _field("batch_size", _i32, "Windows per forward pass."),
        _field("dtype", _str, "Model dtype while pruning and evaluating, e.g. bfloat16."),
        _field("evaluator", _str, "Evaluator name, e.g. perplexity or lm-eval."),
        _field("evaluator_version", _str, "Version the evaluator plugin declares."),
        _field("eval_options", _str, "Evaluator options (limit, tasks, ...) as canonical JSON."),
        _field("eval_dataset", _str, "Dataset the evaluator read, e.g. wikitext2 or c4."),
        _field("eval_split", _str, "Split of eval_dataset, e.g. test or validation."),
        _field("eval_seqlen", _i32, "Tokens per evaluation window."),
        _field("task", _str, "Task of the evaluation (wikitext2, boolq, ...); null if none ran."),
        _field("score", _str, "Score name (perplexity, acc, acc_norm, ...); no ',none' suffix."),
        # --- values ---
        _field("value", _f64, "The score."),
        _field("stderr", _f64, "Standard error of the score, when the evaluator reports one."),
        _field("higher_is_better", _bool, "Whether a larger value is a better result."),
        _field("status", _str, "'ok', or 'failed' when the cell raised (then see error)."),
        _field("error", _str, "The error message of a failed cell."),
        # --- provenance ---
        _field("run_id", _str, "Id of the run (one `stadebench run`) that wrote the row."),
        _field("created_at", pa.timestamp("us", "UTC"), "When the row was written; newest wins."),
        _field("suite", _str, "Name of the suite the run executed."),
        _field("stadebench_version", _str, "stadebench version that produced the row."),
        _field("torch_version", _str, "torch version that produced the row."),
        _field("transformers_version", _str, "transformers version that produced the row."),
        _field("lm_eval_version", _str, "lm-eval version, when lm-eval ran."),
        _field("metric_plugin", _str, "Distribution that registered the metric."),
        _field("metric_plugin_version", _str, "Version of that distribution."),
        _field("git_commit", _str, "Git commit of the stadebench checkout, if it is one."),
        _field("device", _str, "Device name, e.g. 'NVIDIA H200' or 'cpu'."),
        _field("actual_sparsity", _f64, "Fraction of prunable weights that are zero once pruned."),
        _field("prune_seconds", _f64, "Wall time spent pruning this cell, incl. its own calibration passes "
               "(a one-shot statistics pass shared by several cells is in details.prune.shared_statistics)."),
        _field("eval_seconds", _f64, "Wall time spent evaluating."),
        _field("peak_memory_bytes", _i64, "Peak accelerator memory during the cell."),
        _field("details", _str, "Extra output (per-block errors, task versions, ...) as JSON."),
    ],
    metadata={VERSION_KEY: SCHEMA_VERSION},
)
"""One row per (cell_key, task, score); every field's ``metadata[b"doc"]`` says what it holds."""

KEY_FIELDS = (
    "model", "model_revision", "model_source", "metric", "metric_version", "metric_options",
    "pattern", "pattern_options", "sparsity", "calib_dataset", "calib_options", "calib_n", "calib_seqlen",
    "calib_seed", "sequential", "batch_size", "dtype", "evaluator", "evaluator_version",
    "eval_options", "eval_dataset", "eval_split", "eval_seqlen",
)
"""The fields hashed into ``cell_key``: model, metric + options, pattern, sparsity,
calibration, dtype and the evaluation config. The evaluation belongs to the key because
each evaluation of a pruned model is skipped or re-run on its own: adding an evaluator to
a suite runs only that evaluator. Metric and evaluator versions are in the key (a new
version is a new measurement); library versions are provenance, so upgrading torch does
not re-run finished cells. Changing this tuple changes every key: bump SCHEMA_VERSION."""

_JSON_FIELDS = frozenset({"metric_options", "pattern_options", "calib_options", "eval_options", "details"})
_NAMES = frozenset(SCHEMA.names)


def canonical_json(value: Any) -> str:
    """``value`` as JSON with sorted keys and no whitespace, so equal values give equal text."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise LeaderboardError(f"cannot store {value!r} as JSON: {exc}") from None


def _plain(value: Any) -> Any:
    """``value`` ready for JSON: numpy scalars as Python numbers, NaN and infinities as null."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):  # a NaN in details must not fail the cell it describes
        return float(value) if math.isfinite(value) else None
    return value


def _coerce(name: str, value: Any) -> Any:
    """One value normalised so that equal settings hash and store alike (0 and 0.0, JSON text)."""
    if value is None:
        return None
    kind = SCHEMA.field(name).type
    if name in _JSON_FIELDS:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise LeaderboardError(f"{name} is not valid JSON: {value!r}") from None
        return canonical_json(_plain(value))
    if pa.types.is_floating(kind) and isinstance(value, numbers.Real) \
            and not isinstance(value, bool):
        return float(value)
    if pa.types.is_integer(kind):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise LeaderboardError(f"{name} must be an integer, not {value!r}")  # pyarrow truncates
        return int(value)
    if pa.types.is_timestamp(kind) and isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)  # naive times are taken as UTC
    return value


def cell_key(fields: Mapping[str, Any]) -> str:
    """sha256 hex of the KEY_FIELDS of ``fields`` (others ignored, missing ones null)."""
    key = {name: _coerce(name, fields.get(name)) for name in KEY_FIELDS}
    return hashlib.sha256(canonical_json(key).encode()).hexdigest()


# --- writing -------------------------------------------------------------------------


def _clean_row(row: Any, i: int, now: datetime) -> dict[str, Any]:
    if not isinstance(row, Mapping):
        raise LeaderboardError(f"row {i} is a {type(row).__name__}, not a dict")
    unknown = sorted(set(row) - _NAMES)
    if unknown:
        hints = [f"{u!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(u, _NAMES, 1))
                 else repr(u) for u in unknown]
        raise LeaderboardError(f"row {i}: unknown column(s) {', '.join(hints)}; "
                               "see stadebench.bench.leaderboard.SCHEMA for the columns.")
    out = {name: _coerce(name, row.get(name)) for name in SCHEMA.names}
    out["created_at"] = out["created_at"] or now
    if out["status"] not in STATUSES:
        raise LeaderboardError(f"row {i}: status must be 'ok' or 'failed', not {out['status']!r}")
    key = cell_key(out)
    if out["cell_key"] not in (None, key):
        raise LeaderboardError(f"row {i}: cell_key {out['cell_key']!r} does not match its key "
                               f"fields ({key}); leave it out and it is computed.")
    out["cell_key"] = key
    return out


def _to_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    now = datetime.now(timezone.utc)  # one time for the whole batch: it is one attempt
    clean = [_clean_row(row, i, now) for i, row in enumerate(rows)]
    if not clean:
        raise LeaderboardError("no rows to write")
    arrays = []
    for field in SCHEMA:
        try:
            arrays.append(pa.array([r[field.name] for r in clean], type=field.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
            raise LeaderboardError(f"column {field.name!r}: {exc}") from None
    return pa.Table.from_arrays(arrays, schema=SCHEMA)


def _safe_id(values: list[Any], fallback: str) -> str:
    """A file-name part: the one shared value reduced to ASCII letters and digits."""
    distinct = set(values)
    if len(distinct) != 1 or None in distinct:
        return fallback
    return re.sub(r"[^A-Za-z0-9]", "", str(distinct.pop()))[:40] or fallback


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows cannot open a directory; its renames are journalled anyway
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write) -> None:
    """Call ``write(file)`` on a hidden temporary file, fsync it, then rename it to ``path``."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def write_rows(folder: str | os.PathLike, rows: Iterable[Mapping[str, Any]], *,
               metadata: Mapping[str, Any] | None = None) -> Path:
    """Validate ``rows`` against SCHEMA and store them as one new Parquet file in ``folder``.

    Unknown keys are an error; missing ones are null, except ``cell_key`` (computed),
    ``created_at`` (now) and ``status`` (required: 'ok' or 'failed'). ``metadata`` goes
    into the file's key-value metadata (non-string values as JSON). Returns the new file.
    """
    folder = Path(folder)
    table = _to_table(rows)
    extra = {str(k): v if isinstance(v, str) else canonical_json(v)
             for k, v in (metadata or {}).items()}
    if VERSION_KEY in extra:
        raise LeaderboardError(f"metadata key {VERSION_KEY!r} is reserved")
    table = table.replace_schema_metadata({**extra, VERSION_KEY: SCHEMA_VERSION})
    run = _safe_id(table["run_id"].to_pylist(), "run")
    cell = _safe_id(table["cell_key"].to_pylist(), "batch")[:12]
    path = folder / f"{run}-{cell}-{uuid.uuid4().hex[:8]}.parquet"
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda fh: pq.write_table(table, fh))
    update_manifest(folder)
    return path


def _data_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.parquet") if not p.name.startswith(".") and p.is_file())


def update_manifest(folder: str | os.PathLike) -> None:
    """Rebuild manifest.json from the files on disk, keeping what it already knew of them.

    Listing the folder, rather than appending one name, also records files whose writer
    was killed between its rename and this update, and forgets files deleted by hand.
    """
    folder = Path(folder)
    # Writers hold the lock for milliseconds; filelock's default 50 ms poll would dominate.
    with FileLock(folder / ".manifest.lock").acquire(poll_interval=0.002):
        path = folder / MANIFEST
        try:
            old = json.loads(path.read_text())
            known = {f["name"]: f for f in old["files"]}
        except (OSError, ValueError, KeyError, TypeError):
            old, known = {}, {}
        now = datetime.now(timezone.utc).isoformat()
        files = []
        for file in _data_files(folder):
            entry = known.get(file.name)
            if entry is None:
                try:
                    entry = {"name": file.name, "rows": pq.read_metadata(file).num_rows,
                             "created_at": now}
                except (OSError, pa.ArrowException):
                    continue  # unreadable: read() warns about it, the index leaves it out
            files.append(entry)
        manifest = {"schema_version": SCHEMA_VERSION, "created_at": old.get("created_at", now),
                    "updated_at": now, "files": files}
        _atomic_write(path, lambda fh: fh.write(json.dumps(manifest, indent=2).encode()))


# --- reading -------------------------------------------------------------------------

# Each step takes a table written under schema version v and returns it under v + 1.
_UPGRADES: dict[str, Any] = {}


def _conform(table: pa.Table) -> pa.Table:
    """``table`` with exactly SCHEMA's columns, in order: missing ones null, extras dropped."""
    if table.schema.equals(SCHEMA):  # the common case; casting every column costs more than reading
        return table.replace_schema_metadata(SCHEMA.metadata)
    columns = [
        table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(len(table), f.type)
        for f in SCHEMA
    ]
    return pa.Table.from_arrays(columns, schema=SCHEMA)


def _upgrade(table: pa.Table, from_version: str) -> pa.Table:
    """Bring a table stored under schema ``from_version`` to SCHEMA_VERSION.

    When SCHEMA changes, bump SCHEMA_VERSION and add ``_UPGRADES[old] = step``; old files
    then stay readable without being rewritten.
    """
    version = from_version
    while version != SCHEMA_VERSION:
        if version not in _UPGRADES:
            raise LeaderboardError(f"schema version {version!r} is unknown to this stadebench "
                                   f"(which writes {SCHEMA_VERSION!r}); upgrade stadebench")
        table, version = _UPGRADES[version](table), str(int(version) + 1)
    return _conform(table)


def _read_file(path: Path) -> pa.Table:
    with pq.ParquetFile(path) as file:
        table = file.read()
    version = (table.schema.metadata or {}).get(VERSION_KEY.encode())
    if version is None:
        raise LeaderboardError(f"no {VERSION_KEY!r} in its metadata; not a stadebench file")
    return _upgrade(table, version.decode())


def read(folder: str | os.PathLike, *, suite: str | Iterable[str] | None = None,
         model: str | Iterable[str] | None = None, task: str | Iterable[str] | None = None,
         metric: str | Iterable[str] | None = None) -> pa.Table:
    """Every row of every file in ``folder`` (filtered as in ``query``), as one SCHEMA table.

    Temporary files are ignored; an unreadable file is skipped with a LeaderboardWarning.
    """
    tables = []
    for path in _data_files(Path(folder)):
        try:
            tables.append(_read_file(path))
        except Exception as exc:  # one bad file must not hide the rest of the leaderboard
            warnings.warn(f"skipping leaderboard file {path}: {exc}", LeaderboardWarning,
                          stacklevel=2)
    table = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
    return query(table, suite=suite, model=model, task=task, metric=metric)


def query(table: pa.Table, suite: str | Iterable[str] | None = None,
          model: str | Iterable[str] | None = None, task: str | Iterable[str] | None = None,
          metric: str | Iterable[str] | None = None) -> pa.Table:
    """Rows of ``table`` whose columns equal the given value (or one of the given values)."""
    for name, wanted in (("suite", suite), ("model", model), ("task", task), ("metric", metric)):
        if wanted is not None:
            values = pa.array([wanted] if isinstance(wanted, str) else list(wanted), pa.string())
            table = table.filter(pc.is_in(table[name], value_set=values))
    return table


def current(table: pa.Table) -> pa.Table:
    """The newest row per (cell_key, task, score), from the newest outcome of each cell.

    A row is dropped when its cell has a strictly newer row with another status: a failed
    cell that later finished shows its ok rows only, and vice versa. Rows written together
    share created_at, so a partly failed evaluation keeps both its ok and failed rows.
    """
    cells = table["cell_key"].to_pylist()
    tasks, scores = table["task"].to_pylist(), table["score"].to_pylist()
    statuses = table["status"].to_pylist()
    times = pc.fill_null(table["created_at"].cast(pa.int64()), 0).to_pylist()
    newest: dict[tuple, int] = {}  # (cell, status) -> newest time
    for c, s, t in zip(cells, statuses, times):
        newest[c, s] = max(t, newest.get((c, s), t))
    best: dict[tuple, int] = {}  # (cell, task, score) -> row index
    for i, (c, task, score, s, t) in enumerate(zip(cells, tasks, scores, statuses, times)):
        if any(t < newest.get((c, other), t) for other in (*STATUSES, None) if other != s):
            continue
        k = (c, task, score)
        if k not in best or t >= times[best[k]]:
            best[k] = i
    return table.take(pa.array(sorted(best.values()), pa.int64()))


def finished_cells(folder: str | os.PathLike) -> set[str]:
    """Cell keys whose newest outcome is ok: the cells a re-run can skip."""
    table = current(read(folder))
    cells, statuses = table["cell_key"].to_pylist(), table["status"].to_pylist()
    return set(cells) - {c for c, s in zip(cells, statuses) if s != "ok"}


# --- display -------------------------------------------------------------------------

_ROW_FIELDS = tuple(f for f in KEY_FIELDS if f not in ("pattern", "sparsity"))
# A dense baseline matches pruned rows on these; it has no calibration to compare.
_BASELINE_FIELDS = ("model", "model_revision", "model_source", "dtype", "evaluator",
                    "evaluator_version", "eval_options", "eval_dataset", "eval_split",
                    "eval_seqlen")


def _options_label(options: str | None) -> str:
    parsed = json.loads(options) if options else {}
    if not isinstance(parsed, dict):
        return options or ""
    return ", ".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in parsed.items())


def pivot(table: pa.Table, task: str, score: str) -> dict[str, Any]:
    """A metrics × "pattern sparsity" grid of the current ok values of one task and score.

    Returns ``{"task", "score", "higher_is_better", "columns": [str], "rows": [row]}``,
    each row ``{"model", "metric", "label", "dense", "values": {column: cell}}`` and each
    cell ``{"value", "stderr", "relative"}`` (relative = value / dense - 1). The label is
    the metric, its options, and any other key field that varies between rows.
    """
    picked = [r for r in query(current(table), task=task).to_pylist()
              if r["score"] == score and r["status"] == "ok"]
    dense, pruned = {}, []
    for r in sorted(picked, key=lambda r: r["created_at"]):
        if r["metric"] == "dense":
            dense[tuple(r[f] for f in _BASELINE_FIELDS)] = r["value"]
        else:
            pruned.append(r)
    varying = [f for f in _ROW_FIELDS if f not in ("model", "metric", "metric_options")
               and len({r[f] for r in pruned}) > 1]
    columns, rows = {}, {}
    for r in pruned:
        sparsity = r["sparsity"] or 0.0
        column = f"{r['pattern'] or '-'} {sparsity:g}"
        columns[column] = (r["pattern"] or "", sparsity)
        row = rows.setdefault(tuple(r[f] for f in _ROW_FIELDS), {
            "model": r["model"],
            "metric": r["metric"],
            "label": " ".join(filter(None, [
                r["metric"],
                f"({o})" if (o := _options_label(r["metric_options"])) else "",
                *(f"{f}={r[f]}" for f in varying),
            ])),
            "dense": dense.get(tuple(r[f] for f in _BASELINE_FIELDS)),
            "values": {},
        })
        base, value = row["dense"], r["value"]
        relative = value / base - 1 if None not in (base, value) and base != 0 else None
        row["values"][column] = {"value": value, "stderr": r["stderr"], "relative": relative}
    higher = {r["higher_is_better"] for r in picked} - {None}
    return {
        "task": task,
        "score": score,
        "higher_is_better": higher.pop() if len(higher) == 1 else None,
        "columns": sorted(columns, key=columns.get),
        "rows": sorted(rows.values(), key=lambda r: (r["model"] or "", r["label"])),
    }


__all__ = [
    "KEY_FIELDS", "SCHEMA", "SCHEMA_VERSION", "LeaderboardError", "LeaderboardWarning",
    "canonical_json", "cell_key", "current", "finished_cells", "pivot", "query", "read",
    "update_manifest", "write_rows",
]
