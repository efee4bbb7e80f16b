"""The results store: a plain Parquet dataset, one file per write, superseded rows kept aside.

A leaderboard folder's top-level ``*.parquet`` files are its current rows, which plain
pandas, pyarrow, polars or DuckDB read directly; ``write_rows`` adds one file atomically,
then compaction (under ``_stadebench.lock``) moves superseded files into ``_history/``.
The layout, writing, compaction, kill safety and concurrency are described in
docs/design.md ("Leaderboard"); the columns in docs/leaderboard.md.
"""

from __future__ import annotations

import os
import re
import uuid
import warnings
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from filelock import FileLock

from .. import util
from ..errors import StadebenchError
from ..util import canonical_json
from .row import (
    SCHEMA,
    SCHEMA_VERSION,
    STATUSES,
    VERSION_KEY,
    RecordError,
    Row,
    cell_key,
    normalise,
)
from .upgrade import UPGRADES, conform

HISTORY = "_history"
LOCK = "_stadebench.lock"
_KEY_COLUMNS = ("cell_key", "task", "score", "status", "created_at")
_NAMES = frozenset(SCHEMA.names)


class LeaderboardError(StadebenchError, ValueError):
    """Rows that do not fit the schema, or a leaderboard file this version cannot read."""


class LeaderboardWarning(UserWarning):
    """A leaderboard file was skipped because it could not be read."""


# --- writing -------------------------------------------------------------------------


def _clean_row(row: Any, i: int, now: datetime) -> dict[str, Any]:
    if isinstance(row, Row):
        fields = row.as_dict()
    elif isinstance(row, Mapping):
        unknown = sorted(set(row) - _NAMES)
        if unknown:
            hints = ", ".join(f"{u!r}{util.did_you_mean(str(u), _NAMES)}" for u in unknown)
            raise LeaderboardError(f"row {i}: unknown column(s) {hints}; "
                                   "see stadebench.results.row.Row for the columns.")
        fields = row
    else:
        raise LeaderboardError(f"row {i} is a {type(row).__name__}, not a dict or a Row")
    try:
        out = {name: normalise(name, fields.get(name)) for name in SCHEMA.names}
    except RecordError as exc:
        raise LeaderboardError(f"row {i}: {exc}") from None
    out["created_at"] = out["created_at"] or now
    if out["status"] not in STATUSES:
        raise LeaderboardError(f"row {i}: status must be 'ok' or 'failed', not {out['status']!r}")
    key = cell_key(out)
    if out["cell_key"] not in (None, key):
        raise LeaderboardError(f"row {i}: cell_key {out['cell_key']!r} does not match its key "
                               f"fields ({key}); leave it out and it is computed.")
    out["cell_key"] = key
    return out


def _to_table(rows: Iterable[Row | Mapping[str, Any]]) -> pa.Table:
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


def write_rows(folder: str | os.PathLike, rows: Iterable[Row | Mapping[str, Any]], *,
               metadata: Mapping[str, Any] | None = None) -> Path:
    """Validate ``rows`` (``Row``s or dicts) and store them as one new Parquet file in ``folder``.

    In a dict, unknown keys are an error; missing ones are null, except ``cell_key``
    (computed; a given one must match), ``created_at`` (now, one time for the batch) and
    ``status`` (required: 'ok' or 'failed'). ``metadata`` goes into the file's key-value
    metadata (non-string values as JSON). The folder is then compacted (see the module
    docstring). Returns the new file. A LeaderboardError is raised before anything is
    written.
    """
    folder = Path(folder)
    table = _to_table(rows)
    try:
        extra = {str(k): v if isinstance(v, str) else canonical_json(v) for k, v in (metadata or {}).items()}
    except (TypeError, ValueError) as exc:
        raise LeaderboardError(f"metadata: {exc}") from None
    if VERSION_KEY in extra:
        raise LeaderboardError(f"metadata key {VERSION_KEY!r} is reserved")
    table = table.replace_schema_metadata({**extra, VERSION_KEY: SCHEMA_VERSION})
    run = _safe_id(table["run_id"].to_pylist(), "run")
    cell = _safe_id(table["cell_key"].to_pylist(), "batch")[:12]
    path = folder / f"{run}-{cell}-{uuid.uuid4().hex[:8]}.parquet"
    folder.mkdir(parents=True, exist_ok=True)
    util.atomic_write(path, lambda fh: pq.write_table(table, fh))
    compact(folder)
    return path


# --- reading -------------------------------------------------------------------------


def _check_version(version: str | None) -> None:
    if version is None:
        raise LeaderboardError(f"no {VERSION_KEY!r} in its metadata; not a stadebench file")
    v = version
    while v != SCHEMA_VERSION:
        if v not in UPGRADES:
            raise LeaderboardError(f"schema version {version!r} is unknown to this stadebench (which "
                                   f"writes {SCHEMA_VERSION!r}): it was written by a newer one; "
                                   "upgrade stadebench to read it")
        v = str(int(v) + 1)


_REQUIRED = ("cell_key", "status", "created_at")
"""Columns every row written by ``write_rows`` has; a file without them is not ours."""


def _check_required(table: pa.Table) -> pa.Table:
    for name in _REQUIRED:
        if name in table.column_names and table[name].null_count:
            raise LeaderboardError(f"{table[name].null_count} row(s) have no {name!r}: not written by "
                                   "stadebench (or damaged)")
    if "status" in table.column_names:
        bad = pc.invert(pc.is_in(table["status"], pa.array(STATUSES)))
        if pc.any(bad).as_py():
            first = table.filter(bad)["status"][0].as_py()
            raise LeaderboardError(f"status must be 'ok' or 'failed', not {first!r}")
    return table


def _read_file(path: Path, columns: Iterable[str] | None = None) -> pa.Table:
    """One file under the current schema (only ``columns``, if given). FileNotFoundError
    when it is gone (moved by a compaction); LeaderboardError when it is not readable.

    Asking for some ``columns`` never makes a file readable that is not readable whole:
    only a file stored under exactly the current schema reads just those columns; any
    other is read and conformed whole, so a column of the wrong type elsewhere in it (say
    ``sparsity`` as text) refuses it here too, and compaction skips what readers skip."""
    with open(path, "rb") as fh:  # once open, the file reads to the end even if it is moved
        try:
            file = pq.ParquetFile(fh)
            schema = file.schema_arrow  # a property that rebuilds the schema on every access
        except (pa.ArrowException, OSError) as exc:
            raise LeaderboardError(f"not a Parquet file: {exc}") from None
        raw = (schema.metadata or {}).get(VERSION_KEY.encode())
        version = raw.decode() if raw is not None else None
        _check_version(version)
        if columns is not None and version == SCHEMA_VERSION and schema.equals(SCHEMA):
            wanted = pa.schema([SCHEMA.field(n) for n in columns])
            return _check_required(conform(file.read(columns=[n for n in wanted.names if n in schema.names]),
                                            wanted))
        table = file.read()
    while version != SCHEMA_VERSION:
        table, version = UPGRADES[version](table), str(int(version) + 1)
    table = _check_required(conform(table))
    return table.select(list(columns)) if columns is not None else table


def _data_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return [p for p in folder.glob("*.parquet") if not p.name.startswith((".", "_")) and p.is_file()]


def _try_read(path: Path, columns: Iterable[str] | None) -> pa.Table | Exception:
    try:
        return _read_file(path, columns)
    except Exception as exc:  # noqa: BLE001 -- FileNotFoundError included: the caller tells them apart
        return exc


_KEY_CACHE: dict[str, tuple[tuple[int, int, int], pa.Table | Exception]] = {}
"""The key columns of files this process has read, by path. A file is never modified, so
while its (inode, size, mtime) stay the same so do its rows: a compaction after each write
reads only the files that are new since the last one."""


def _read_keys(path: Path) -> pa.Table | Exception:
    try:
        st = path.stat()
    except FileNotFoundError as exc:
        return exc
    signature = (st.st_ino, st.st_size, st.st_mtime_ns)
    hit = _KEY_CACHE.get(str(path))
    if hit is not None and hit[0] == signature:
        return hit[1]
    result = _try_read(path, _KEY_COLUMNS)
    if not isinstance(result, FileNotFoundError):
        _KEY_CACHE[str(path)] = (signature, result)
    return result


_NAMED: dict[str, str] = {}
"""The skipped files this process has named, by path, with what was said of them: a
command that reads a folder several times (plan, compaction, the table shown) names each
once; a file is named again when what is wrong with it changes."""


def _name_skipped(path: Path, exc: Exception) -> None:
    message = f"skipping leaderboard file {path}: {exc}"
    if _NAMED.get(str(path)) != message:
        _NAMED[str(path)] = message
        warnings.warn(message, LeaderboardWarning, stacklevel=4)


def _read_folders(folders: list[Path], columns: Iterable[str] | None = None, *,
                  warn: bool = True) -> list[tuple[Path, pa.Table]]:
    """(path, table) of every readable data file in ``folders``, sorted by file name.

    A file that vanishes between listing and opening was moved by a compaction, which
    wrote any rows it still needed elsewhere first: list again and read what is new.
    Files are read on a few threads (Parquet decoding releases the GIL).
    """
    got: dict[str, tuple[Path, pa.Table | None]] = {}
    columns = None if columns is None else tuple(columns)
    read_one = _read_keys if columns == _KEY_COLUMNS else lambda p: _try_read(p, columns)
    for _ in range(20):
        todo = [p for folder in folders for p in _data_files(folder) if p.name not in got]
        if len(todo) > 8:
            with ThreadPoolExecutor(8) as pool:
                results = list(pool.map(read_one, todo))
        else:
            results = [read_one(p) for p in todo]
        vanished = False
        for path, result in zip(todo, results):
            if isinstance(result, FileNotFoundError):
                vanished = True
            elif isinstance(result, Exception):  # one bad file must not hide the rest of the leaderboard
                got[path.name] = (path, None)
                if warn:
                    _name_skipped(path, result)
            else:
                got[path.name] = (path, result)
        if not vanished:
            break
    if read_one is _read_keys:  # forget the files that are gone
        listed, parents = {str(p) for p, _ in got.values()}, {str(f) for f in folders}
        for gone in [k for k in _KEY_CACHE if k not in listed and str(Path(k).parent) in parents]:
            del _KEY_CACHE[gone]
    return [(p, t) for _, (p, t) in sorted(got.items()) if t is not None]


def _concat(tables: list[pa.Table], schema: pa.Schema = SCHEMA) -> pa.Table:
    # one chunk per column: compute kernels pay per chunk, and there is one per file
    return pa.concat_tables(tables).combine_chunks() if tables else schema.empty_table()


def read(folder: str | os.PathLike, *, history: bool = False, suite=None, model=None, task=None,
         metric=None, pattern=None, sparsity=None) -> pa.Table:
    """Every row of the data files in ``folder`` (and in ``_history/`` with ``history``),
    filtered as in ``query``, as one SCHEMA table in file-name order.

    Temporary files are ignored; an unreadable file (not Parquet, no stadebench version, a
    version newer than this stadebench, a column of the wrong type) is skipped with a
    LeaderboardWarning, once per process for each file and fault. Older files
    are upgraded as they are read: schema-1 rows get null for the knobs that version did
    not record and a ``cell_key`` recomputed from their upgraded fields, so a stored key
    always matches its fields. Those keys generally do not match the cells of a new run
    (the old identity lacked knobs), so a suite re-runs them once.
    """
    folder = Path(folder)
    folders = [folder, folder / HISTORY] if history else [folder]
    table = _concat([t for _, t in _read_folders(folders)])
    return query(table, suite=suite, model=model, task=task, metric=metric, pattern=pattern, sparsity=sparsity)


def superseded(folder: str | os.PathLike, **filters: Any) -> pa.Table:
    """The rows moved into ``_history/`` by newer writes (filtered as in ``query``).

    Left out: the rows of a split file that are still current (their copy is at the top).
    """
    folder = Path(folder)
    old = _concat([t for _, t in _read_folders([folder / HISTORY])])
    top = _concat([t for _, t in _read_folders([folder], warn=False)])
    scalars = [f.name for f in SCHEMA if not pa.types.is_list(f.type)]  # a row's copy matches on these alone
    copies = pc.is_in(identity(old, scalars), value_set=identity(top, scalars).combine_chunks())
    return query(old.filter(pc.invert(copies)), **filters)


def query(table: pa.Table, *, suite=None, model=None, task=None, metric=None, pattern=None,
          sparsity=None, refine=None, reconstruct=None) -> pa.Table:
    """Rows of ``table`` whose columns equal the given value (or one of the given values);
    for the stages ``refine`` and ``reconstruct``, ``none`` matches the rows without one."""
    wanted = {"suite": suite, "model": model, "task": task, "metric": metric, "pattern": pattern,
              "sparsity": sparsity, "refine": refine, "reconstruct": reconstruct}
    for name, values in wanted.items():
        if values is None:
            continue
        if isinstance(values, str) or not isinstance(values, Iterable):
            values = [values]
        kind = table.schema.field(name).type
        values = [float(v) if pa.types.is_floating(kind) else v for v in values]
        keep = pc.is_in(table[name], value_set=pa.array(values, kind))
        if name in ("refine", "reconstruct") and "none" in values:
            keep = pc.or_(pc.fill_null(keep, False), pc.is_null(table[name]))
        table = table.filter(keep)
    return table


# --- the current view ------------------------------------------------------------------


def identity(table: pa.Table, fields: Iterable[str]) -> pa.ChunkedArray:
    """One string per row that is equal exactly when ``fields`` are (nulls equal nulls):
    each value length-prefixed, so no value can imitate another field's."""
    parts = []
    for f in fields:
        text = pc.cast(table[f], pa.string())
        parts.append(pc.fill_null(pc.binary_join_element_wise(
            pc.cast(pc.utf8_length(text), pa.string()), text, ":"), "-"))
    return pc.binary_join_element_wise(*parts, "|")


def is_value(column, value: str):
    return pc.fill_null(pc.equal(column, value), False)


def current(table: pa.Table) -> pa.Table:
    """The current rows of ``table``: the newest outcome of each cell, one row per
    (cell_key, task, score) (nulls count as one value), in table order.

    A row is dropped when its cell has a strictly newer row with another status (a failed
    cell that later finished shows its ok rows only, and vice versa; rows written together
    share created_at, so a partly failed evaluation keeps both its ok and failed rows), or
    when a newer row of the same (cell_key, task, score) is kept. Equal times go to the
    row later in the table (``read`` orders by file name).
    """
    n = table.num_rows
    if n == 0:
        return table
    keys = table.select(list(_KEY_COLUMNS)).combine_chunks()
    t = pc.fill_null(keys["created_at"].cast(pa.int64()), 0)
    ok, failed = is_value(keys["status"], "ok"), is_value(keys["status"], "failed")
    other = pc.invert(pc.or_(ok, failed))
    none = pa.nulls(n, pa.int64())
    work = pa.table({"cell": keys["cell_key"], "task": keys["task"], "score": keys["score"],
                     "i": pa.array(range(n), pa.int64()), "t": t,
                     "ok": ok, "failed": failed, "t_ok": pc.if_else(ok, t, none),
                     "t_failed": pc.if_else(failed, t, none), "t_other": pc.if_else(other, t, none)})
    newest = work.group_by("cell").aggregate([(c, "max") for c in ("t_ok", "t_failed", "t_other")])
    work = work.join(newest, "cell")
    t_ok, t_failed, t_other = (work[f"{c}_max"] for c in ("t_ok", "t_failed", "t_other"))
    # the newest row of the cell with another status than this row's
    threshold = pc.if_else(work["ok"], pc.max_element_wise(t_failed, t_other),
                           pc.if_else(work["failed"], pc.max_element_wise(t_ok, t_other),
                                      pc.max_element_wise(t_ok, t_failed)))
    work = work.filter(pc.or_kleene(pc.is_null(threshold), pc.greater_equal(work["t"], threshold)))
    work = work.sort_by([("t", "descending"), ("i", "descending")])
    newest = work.group_by(["cell", "task", "score"], use_threads=False).aggregate([("i", "first")])
    return table.take(_sorted(newest["i_first"]))


def _sorted(values) -> pa.ChunkedArray:
    return pc.take(values, pc.sort_indices(values))


def finished_cells(folder: str | os.PathLike) -> set[str]:
    """Cell keys whose newest outcome is ok: the cells a re-run can skip."""
    table = current(_concat([t for _, t in _read_folders([Path(folder)], _KEY_COLUMNS)],
                            pa.schema([SCHEMA.field(n) for n in _KEY_COLUMNS])))
    by_cell = pa.table({"cell": table["cell_key"], "ok": is_value(table["status"], "ok")}) \
        .group_by("cell").aggregate([("ok", "all")])
    return set(by_cell.filter(by_cell["ok_all"])["cell"].to_pylist())


# --- compaction ------------------------------------------------------------------------


def compact(folder: str | os.PathLike, *, upgrade: bool = False) -> None:
    """Move superseded rows out of the top level of ``folder`` into ``_history/``; with
    ``upgrade``, first rewrite files of an older schema in the current one (the old file
    moves to ``_history/``), so plain readers see one schema.

    Safe to run at any time, from any number of processes (they take turns under the
    lock), and to kill at any point; see the module docstring. A missing folder is left
    missing.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return
    # Writers hold the lock for milliseconds; filelock's default 50 ms poll would dominate.
    with FileLock(folder / LOCK).acquire(poll_interval=0.002):
        if upgrade:
            _upgrade_files(folder)
        _compact(folder)


def _upgrade_files(folder: Path) -> None:
    """Rewrite every readable file of an older schema version under the current one. A
    kill between the write and the move leaves identical rows twice, which the next
    compaction resolves like any duplicate. A file readers skip (another tool's, say,
    without ``created_at``) is left as it is, as compaction leaves it: readers name it."""
    for path in _data_files(folder):
        try:
            raw = (pq.read_schema(path).metadata or {}).get(VERSION_KEY.encode())
        except (OSError, pa.ArrowException):
            continue
        if raw is None or raw.decode() == SCHEMA_VERSION or raw.decode() not in UPGRADES:
            continue
        table = _try_read(path, None)
        if isinstance(table, Exception):
            continue
        upgraded = path.with_name(f"{path.stem}_v{SCHEMA_VERSION}.parquet")
        util.atomic_write(upgraded, lambda fh, table=table: pq.write_table(table, fh))
        _move_to_history(folder, path)


def _compact(folder: Path) -> None:
    files = _read_folders([folder], _KEY_COLUMNS, warn=False)  # unreadable files stay as they are
    if not files:
        return
    tables = [t.append_column("_file", pa.array([k] * t.num_rows, pa.int32()))
               .append_column("_row", pa.array(range(t.num_rows), pa.int64()))
              for k, (_, t) in enumerate(files)]
    kept = current(pa.concat_tables(tables).combine_chunks()).select(["_file", "_row"])
    counts = kept.group_by("_file").aggregate([("_row", "count")])
    count = dict(zip(counts["_file"].to_pylist(), counts["_row_count"].to_pylist()))
    for k, (path, table) in enumerate(files):
        n = count.get(k, 0)
        if n == table.num_rows:
            continue
        if n:
            _write_remainder(folder, path, _sorted(kept.filter(pc.equal(kept["_file"], k))["_row"]))
        _move_to_history(folder, path)


def _write_remainder(folder: Path, path: Path, rows: pa.ChunkedArray) -> Path:
    """Write the rows ``rows`` of ``path`` as they are stored (schema, metadata) to a new
    file whose name sorts after ``path``'s."""
    with open(path, "rb") as fh:
        raw = pq.read_table(fh)
    base, generation = re.fullmatch(r"(.*?)(?:_r(\d+))?", path.stem).groups()
    generation = int(generation or 0)
    while True:
        generation += 1
        name = f"{base}_r{generation:03d}.parquet"
        if not (folder / name).exists() and not (folder / HISTORY / name).exists():
            break
    remainder = raw.take(rows)
    util.atomic_write(folder / name, lambda fh: pq.write_table(remainder, fh))
    return folder / name


def _move_to_history(folder: Path, path: Path) -> None:
    history = folder / HISTORY
    history.mkdir(exist_ok=True)
    target = history / path.name
    if target.exists():  # never overwrite history (a file copied back by hand, say)
        target = history / f"{path.stem}-{uuid.uuid4().hex[:8]}.parquet"
    os.replace(path, target)
    util.fsync_dir(history)
    util.fsync_dir(folder)


__all__ = [
    "HISTORY", "LOCK", "LeaderboardError", "LeaderboardWarning", "compact", "current", "finished_cells", "identity",
    "is_value", "query", "read", "superseded", "write_rows",
]
