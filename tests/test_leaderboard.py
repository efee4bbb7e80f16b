"""The Parquet results store: schema, atomic writes, current view, pivot."""

from __future__ import annotations

import json
import multiprocessing
import re
import warnings
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from stadebench.results import grid, upgrade
from stadebench.results import store as lb
from stadebench.results.row import JSON_FIELDS, KEY_FIELDS

T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)


def _row(**over):
    row = {
        "model": "tiny-llama", "model_source": "asset", "metric": "wanda", "metric_version": "1",
        "metric_options": {}, "pattern": "unstructured", "sparsity": 0.5,
        "calib_dataset": "c4", "calib_n": 8, "calib_seqlen": 64, "calib_seed": 0,
        "sequential": True, "batch_size": 4, "calib_accumulate": "float64", "dtype": "float32",
        "evaluator": "perplexity", "evaluator_version": "1", "eval_dataset": "wikitext2",
        "eval_split": "test", "eval_seqlen": 64, "task": "wikitext2", "score": "perplexity",
        "value": 10.0, "higher_is_better": False, "status": "ok", "run_id": "run1",
        "suite": "smoke", "created_at": T0,
    }
    row.update(over)
    return row


def _names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_round_trip(tmp_path):
    options = {"b": 1, "a": [1, 2]}
    rows = [_row(value=12.5, stderr=0.1, metric_options=options, details={"x": 1}),
            _row(task="c4", value=15.0, metric_options=options)]
    path = lb.write_rows(tmp_path, rows)
    assert path.parent == tmp_path and path.exists()
    assert re.fullmatch(r"run1-[0-9a-f]{12}-[0-9a-f]{8}\.parquet", path.name)

    table = lb.read(tmp_path)
    assert table.schema == lb.SCHEMA
    got = sorted(table.to_pylist(), key=lambda r: r["task"])
    assert [r["value"] for r in got] == [15.0, 12.5]
    assert got[1]["metric_options"] == '{"a":[1,2],"b":1}'
    assert got[1]["details"] == '{"x":1}'
    assert got[1]["created_at"] == T0
    assert got[0]["stderr"] is None and got[0]["cell_key"] == lb.cell_key(rows[1])


def test_details_and_options_are_stored_as_plain_json(tmp_path):
    import numpy as np

    lb.write_rows(tmp_path, [_row(calib_options={"path": "x.txt"},
                                  details={"mse": [1.5, float("nan"), float("inf")],
                                           "n": np.int64(3), "t": np.float32(0.5)})])
    row = lb.read(tmp_path).to_pylist()[0]
    assert json.loads(row["details"]) == {"mse": [1.5, None, None], "n": 3, "t": 0.5}
    assert row["calib_options"] == '{"path":"x.txt"}'


def test_missing_created_at_is_now_and_shared_by_the_batch(tmp_path):
    before = datetime.now(timezone.utc)
    lb.write_rows(tmp_path, [_row(created_at=None), _row(task="c4", created_at=None)])
    times = set(lb.read(tmp_path)["created_at"].to_pylist())
    assert len(times) == 1 and times.pop() >= before - timedelta(milliseconds=1)


def test_read_of_missing_folder_is_empty_and_creates_nothing(tmp_path):
    table = lb.read(tmp_path / "nope")
    assert table.num_rows == 0 and table.schema == lb.SCHEMA
    assert not (tmp_path / "nope").exists()
    assert lb.finished_cells(tmp_path / "nope") == set()


def test_atomic_write_leaves_no_temp_files(tmp_path):
    for i in range(3):
        lb.write_rows(tmp_path, [_row(sparsity=i / 10)])
    names = _names(tmp_path)
    assert not [n for n in names if n.endswith(".tmp")]
    # a plain Parquet dataset: data files, and bookkeeping under names readers skip
    assert names == {p.name for p in tmp_path.glob("*.parquet")} | {lb.LOCK}
    assert len(names) == 4 and lb.LOCK.startswith("_")


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken(table, fh):
        fh.write(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(lb.pq, "write_table", broken)
    with pytest.raises(OSError, match="disk full"):
        lb.write_rows(tmp_path, [_row()])
    assert _names(tmp_path) == set()


def test_read_ignores_temp_files_and_skips_corrupt_ones(tmp_path):
    lb.write_rows(tmp_path, [_row()])
    (tmp_path / ".run1-abc-12345678.parquet.deadbeef.tmp").write_bytes(b"PAR1 still writing")
    (tmp_path / ".hidden.parquet").write_bytes(b"garbage")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    pq.write_table(pa.table({"x": [1]}), tmp_path / "foreign.parquet")
    with pytest.warns(lb.LeaderboardWarning) as caught:
        table = lb.read(tmp_path)
    assert table.num_rows == 1
    messages = " ".join(str(w.message) for w in caught)
    assert "bad.parquet" in messages and "foreign.parquet" in messages
    assert ".hidden" not in messages and ".tmp" not in messages


def test_newer_schema_version_is_skipped_with_a_warning(tmp_path):
    table = lb._to_table([_row()]).replace_schema_metadata({lb.VERSION_KEY: "99"})
    pq.write_table(table, tmp_path / "future.parquet")
    with pytest.warns(lb.LeaderboardWarning, match="'99'.*upgrade stadebench"):
        assert lb.read(tmp_path).num_rows == 0


def test_upgrade_hook_runs_registered_steps(tmp_path, monkeypatch):
    old = lb._to_table([_row(value=3.0)]).rename_columns(
        ["val" if n == "value" else n for n in lb.SCHEMA.names])
    pq.write_table(old.replace_schema_metadata({lb.VERSION_KEY: "0"}), tmp_path / "old.parquet")
    monkeypatch.setitem(upgrade.UPGRADES, "0", lambda t: t.rename_columns(
        ["value" if n == "val" else n for n in t.column_names]))
    assert lb.read(tmp_path)["value"].to_pylist() == [3.0]


def test_schema_metadata_is_readable_by_plain_pyarrow(tmp_path):
    path = lb.write_rows(tmp_path, [_row()], metadata={"suite_yaml": "grid: {}", "n": 1})
    table = pq.read_table(path)
    assert table.schema.metadata[b"stadebench.schema_version"] == lb.SCHEMA_VERSION.encode()
    assert table.schema.metadata[b"suite_yaml"] == b"grid: {}"
    assert table.schema.metadata[b"n"] == b"1"
    assert table.schema.field("created_at").type == pa.timestamp("us", tz="UTC")
    assert all(f.metadata and f.metadata[b"doc"] for f in table.schema)
    assert not table.schema.field("cell_key").nullable
    assert ds.dataset(tmp_path).count_rows() == 1


def test_reserved_metadata_key_is_rejected(tmp_path):
    with pytest.raises(lb.LeaderboardError, match="reserved"):
        lb.write_rows(tmp_path, [_row()], metadata={lb.VERSION_KEY: "2"})


@pytest.mark.parametrize(("row", "message"), [
    (_row(valeu=1.0), "unknown column.*'valeu'.*did you mean 'value'"),
    (_row(status="done"), "status must be 'ok' or 'failed'"),
    ({k: v for k, v in _row().items() if k != "status"}, "status must be"),
    (_row(calib_n=1.5), "calib_n must be an integer"),
    (_row(sparsity="half"), "column 'sparsity'"),
    (_row(metric_options="{not json"), "metric_options is not valid JSON"),
    (_row(cell_key="0" * 64), "cell_key .* does not match"),
    ("not a dict", "not a dict"),
])
def test_bad_rows_are_rejected_and_nothing_is_written(tmp_path, row, message):
    with pytest.raises(lb.LeaderboardError, match=message):
        lb.write_rows(tmp_path, [_row(), row])
    assert not list(tmp_path.glob("*.parquet"))


def test_no_rows_is_an_error(tmp_path):
    with pytest.raises(lb.LeaderboardError, match="no rows"):
        lb.write_rows(tmp_path, [])


def test_file_names_come_from_sanitised_ids_only(tmp_path):
    evil = _row(run_id="../../etc/passwd\x00 ;rm -rf", model="../x")
    path = lb.write_rows(tmp_path / "lb", [evil])
    assert path.parent == tmp_path / "lb"
    assert re.fullmatch(r"etcpasswdrmrf-[0-9a-f]{12}-[0-9a-f]{8}\.parquet", path.name)
    mixed = lb.write_rows(tmp_path / "lb", [_row(run_id="a"), _row(run_id="b", sparsity=0.6)])
    assert re.fullmatch(r"run-batch-[0-9a-f]{8}\.parquet", mixed.name)
    assert lb.write_rows(tmp_path / "lb", [_row(run_id="..")]).name.startswith("run-")
    assert lb.write_rows(tmp_path / "lb", [_row(run_id=None)]).name.startswith("run-")


def test_current_keeps_the_newest_row_per_key(tmp_path):
    lb.write_rows(tmp_path, [_row(value=9.0, created_at=T0 + timedelta(hours=1))])
    lb.write_rows(tmp_path, [_row(value=8.0), _row(task="c4", value=20.0)])
    got = {r["task"]: r["value"] for r in lb.current(lb.read(tmp_path)).to_pylist()}
    assert got == {"wikitext2": 9.0, "c4": 20.0}


def test_failed_then_ok_shows_ok_and_is_finished(tmp_path):
    failed = _row(task=None, score=None, value=None, status="failed", error="CUDA out of memory")
    lb.write_rows(tmp_path, [failed])
    key = lb.cell_key(failed)
    assert lb.finished_cells(tmp_path) == set()
    assert lb.current(lb.read(tmp_path))["status"].to_pylist() == ["failed"]

    lb.write_rows(tmp_path, [_row(created_at=T0 + timedelta(minutes=5))])
    table = lb.current(lb.read(tmp_path))
    assert table["status"].to_pylist() == ["ok"] and table["value"].to_pylist() == [10.0]
    assert lb.finished_cells(tmp_path) == {key}


def test_ok_then_failed_is_not_finished(tmp_path):
    lb.write_rows(tmp_path, [_row()])
    lb.write_rows(tmp_path, [_row(task=None, score=None, status="failed", error="boom",
                                  created_at=T0 + timedelta(days=1))])
    assert lb.current(lb.read(tmp_path))["status"].to_pylist() == ["failed"]
    assert lb.finished_cells(tmp_path) == set()


def test_partly_failed_evaluation_keeps_both_and_is_not_finished(tmp_path):
    lm = {"evaluator": "lm-eval", "eval_dataset": None, "score": "acc"}
    lb.write_rows(tmp_path, [_row(**lm, task="boolq", value=0.7),
                             _row(**lm, task="rte", status="failed", error="boom")])
    lb.write_rows(tmp_path, [_row(sparsity=0.6)])
    assert sorted(lb.current(lb.read(tmp_path))["status"].to_pylist()) == ["failed", "ok", "ok"]
    assert lb.finished_cells(tmp_path) == {lb.cell_key(_row(sparsity=0.6))}


def test_query_filters(tmp_path):
    lb.write_rows(tmp_path, [_row(), _row(metric="stade", suite="llama"), _row(task="c4")])
    table = lb.read(tmp_path)
    assert lb.query(table, metric="stade").num_rows == 1
    assert lb.query(table, suite="smoke", task="wikitext2").num_rows == 1
    assert lb.query(table, metric=["wanda", "stade"]).num_rows == 3
    assert lb.query(table, model="other").num_rows == 0
    assert lb.read(tmp_path, task="c4").num_rows == 1
    lb.write_rows(tmp_path, [_row(pattern="2:4", sparsity=0.6)])
    assert lb.read(tmp_path, pattern="2:4", sparsity=0.6).num_rows == 1
    assert lb.read(tmp_path, sparsity=[0.5, 0.6]).num_rows == 4 and lb.read(tmp_path, sparsity=0).num_rows == 0


def _write_many(folder: str, worker: int, n: int, barrier, read_back: bool = False) -> None:
    barrier.wait()  # both processes start writing together, after the child's slow imports
    for i in range(n):
        lb.write_rows(folder, [_row(run_id=f"w{worker}", model=f"m{i}", task=task, value=float(i), created_at=None)
                               for task in ("wikitext2", "c4")])
        if read_back and i % 10 == 0:
            with warnings.catch_warnings():
                warnings.simplefilter("error", lb.LeaderboardWarning)  # never half a file
                assert lb.read(folder).num_rows % 2 == 0


def test_two_processes_writing_at_once_lose_nothing(tmp_path):
    ctx = multiprocessing.get_context("spawn")  # fork after pyarrow started threads is unsafe
    barrier = ctx.Barrier(2)
    child = ctx.Process(target=_write_many, args=(str(tmp_path), 2, 50, barrier))
    child.start()
    _write_many(str(tmp_path), 1, 50, barrier, read_back=True)  # this process is the other writer
    child.join(timeout=60)
    assert child.exitcode == 0

    # The two writers measured the same 50 cells (run_id is not in the key): every row is
    # kept, the newer of each pair at the top and the older in _history/.
    everything = lb.read(tmp_path, history=True)
    assert everything.num_rows == 200
    assert len(set(zip(*(everything[c].to_pylist() for c in ("run_id", "model", "task"))))) == 200
    top = lb.read(tmp_path)
    assert top.num_rows == 100 and _once_per_key(pq.read_table(tmp_path).to_pylist())
    def ids(table):
        return set(zip(*(table[c].to_pylist() for c in ("run_id", "model", "task"))))

    assert ids(top) == ids(lb.current(everything))
    assert lb.superseded(tmp_path).num_rows == 100
    files = list(tmp_path.glob("*.parquet")) + list((tmp_path / lb.HISTORY).glob("*.parquet"))
    assert len(files) == 100 and not [n for n in _names(tmp_path) if n.endswith(".tmp")]
    mtimes = [[p.stat().st_mtime_ns for p in files if p.name.startswith(f"w{w}-")] for w in (1, 2)]
    assert max(map(min, mtimes)) < min(map(max, mtimes))  # the two writers did overlap


def _once_per_key(rows) -> bool:
    keys = [(r["cell_key"], r["task"], r["score"]) for r in rows]
    return len(keys) == len(set(keys))


# --- a plain Parquet dataset; superseded rows in _history/ -------------------------------


def _force_rerun(folder: Path) -> tuple[Path, Path]:
    """A cell with two tasks, then the same cell written again an hour later."""
    old = lb.write_rows(folder, [_row(value=12.0), _row(task="c4", value=20.0)])
    new = lb.write_rows(folder, [_row(value=11.0, run_id="run2", created_at=T0 + timedelta(hours=1)),
                                 _row(task="c4", value=19.0, run_id="run2", created_at=T0 + timedelta(hours=1))])
    return old, new


def test_plain_tools_read_the_folder(tmp_path):
    _force_rerun(tmp_path)
    lb.write_rows(tmp_path, [_row(sparsity=0.7)])
    (tmp_path / ".run1-abc-12345678.parquet.deadbeef.tmp").write_bytes(b"PAR1 still writing")
    assert (tmp_path / lb.HISTORY).is_dir() and (tmp_path / lb.LOCK).exists()

    pd = pytest.importorskip("pandas")
    frame = pd.read_parquet(tmp_path)
    assert len(frame) == 3 and sorted(frame["value"]) == [10.0, 11.0, 19.0]
    assert ds.dataset(tmp_path).count_rows() == 3
    assert pq.read_table(tmp_path).num_rows == 3


@pytest.mark.parametrize("tool", ["polars", "duckdb"])
def test_polars_and_duckdb_read_the_folder(tmp_path, tool):
    module = pytest.importorskip(tool)  # not a dependency: checked where installed
    _force_rerun(tmp_path)
    lb.write_rows(tmp_path, [_row(sparsity=0.7)])
    if tool == "polars":
        assert module.read_parquet(f"{tmp_path}/*.parquet").height == 3
    else:
        assert module.sql(f"select count(*) from read_parquet('{tmp_path}/*.parquet')").fetchall() == [(3,)]


def test_force_rerun_leaves_one_row_per_key_and_keeps_the_old_in_history(tmp_path):
    pd = pytest.importorskip("pandas")
    old, new = _force_rerun(tmp_path)
    frame = pd.read_parquet(tmp_path)
    assert len(frame) == 2 and set(frame.groupby(["cell_key", "task", "score"]).size()) == {1}
    assert sorted(frame["value"]) == [11.0, 19.0]
    assert sorted(tmp_path.glob("*.parquet")) == [new]
    assert not old.exists() and (tmp_path / lb.HISTORY / old.name).exists()

    assert sorted(lb.read(tmp_path)["value"].to_pylist()) == [11.0, 19.0]
    everything = lb.read(tmp_path, history=True)
    assert everything.schema == lb.SCHEMA  # nothing added
    assert sorted(everything["value"].to_pylist()) == [11.0, 12.0, 19.0, 20.0]
    gone = lb.superseded(tmp_path)
    assert sorted(gone["value"].to_pylist()) == [12.0, 20.0] and set(gone["run_id"].to_pylist()) == {"run1"}
    assert lb.superseded(tmp_path, task="c4")["value"].to_pylist() == [20.0]
    assert lb.finished_cells(tmp_path) == {lb.cell_key(_row())}
    lb.compact(tmp_path)  # nothing left to do
    assert sorted(tmp_path.glob("*.parquet")) == [new]


def test_a_partly_superseded_file_is_split(tmp_path):
    batch = lb.write_rows(tmp_path, [_row(), _row(task="c4", value=20.0), _row(sparsity=0.6, value=13.0)],
                          metadata={"suite_yaml": "grid: {}"})
    newer = lb.write_rows(tmp_path, [_row(value=9.0, created_at=T0 + timedelta(hours=1)),
                                     _row(task="c4", value=19.0, created_at=T0 + timedelta(hours=1))])
    remainder = tmp_path / f"{batch.stem}_r001.parquet"
    assert set(tmp_path.glob("*.parquet")) == {newer, remainder}
    assert sorted(p.name for p in (tmp_path / lb.HISTORY).iterdir()) == [batch.name]
    kept = pq.read_table(remainder)
    assert kept.schema.metadata[b"suite_yaml"] == b"grid: {}"  # rows and metadata as written
    assert kept.to_pylist() == [r for r in pq.read_table(tmp_path / lb.HISTORY / batch.name).to_pylist()
                                if r["sparsity"] == 0.6]
    assert kept["created_at"].to_pylist() == [T0]
    assert sorted(lb.read(tmp_path)["value"].to_pylist()) == [9.0, 13.0, 19.0]
    # the 0.6 row was copied, not superseded
    assert sorted(lb.superseded(tmp_path)["value"].to_pylist()) == [10.0, 20.0]

    lb.write_rows(tmp_path, [_row(sparsity=0.6, value=12.0, created_at=T0 + timedelta(hours=2))])
    assert not remainder.exists() and (tmp_path / lb.HISTORY / remainder.name).exists()
    assert sorted(lb.read(tmp_path)["value"].to_pylist()) == [9.0, 12.0, 19.0]


def test_a_crash_between_remainder_and_move_leaves_duplicates_that_the_next_compaction_removes(
        tmp_path, monkeypatch):
    pd = pytest.importorskip("pandas")
    batch = lb.write_rows(tmp_path, [_row(), _row(sparsity=0.6, value=13.0)])

    class Killed(BaseException):
        pass

    def killed(folder, path):
        raise Killed  # the process dies after writing the remainder, before moving the old file

    monkeypatch.setattr(lb, "_move_to_history", killed)
    with pytest.raises(Killed):
        lb.write_rows(tmp_path, [_row(value=9.0, created_at=T0 + timedelta(hours=1))])
    remainder = tmp_path / f"{batch.stem}_r001.parquet"
    assert batch.exists() and remainder.exists()
    frame = pd.read_parquet(tmp_path)  # a transient duplicate: identical rows, nothing lost
    assert sorted(frame["value"]) == [9.0, 10.0, 13.0, 13.0]
    assert sorted(lb.current(lb.read(tmp_path))["value"].to_pylist()) == [9.0, 13.0]

    monkeypatch.undo()
    lb.compact(tmp_path)
    assert not batch.exists() and remainder.exists()
    assert sorted(pd.read_parquet(tmp_path)["value"]) == [9.0, 13.0]
    assert sorted(lb.superseded(tmp_path)["value"].to_pylist()) == [10.0]


def test_a_file_moved_while_read_is_not_lost(tmp_path, monkeypatch):
    """A reader that lists a file which a compaction then moves lists the folder again."""
    first = lb.write_rows(tmp_path, [_row(), _row(sparsity=0.6, value=13.0)])
    listing = lb._data_files

    def stale(folder):  # the listing from before a split: the old file, not its remainder
        if folder == tmp_path and not calls:
            calls.append(folder)
            return [first]
        return listing(folder)

    calls: list = []
    lb.write_rows(tmp_path, [_row(value=9.0, created_at=T0 + timedelta(hours=1))])
    assert not first.exists()
    monkeypatch.setattr(lb, "_data_files", stale)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lb.LeaderboardWarning)
        assert sorted(lb.read(tmp_path)["value"].to_pylist()) == [9.0, 13.0]
    assert calls


def test_rows_can_be_typed_records(tmp_path):
    from stadebench.results.row import Row

    fields = {k: v for k, v in _row().items()}
    lb.write_rows(tmp_path, [Row(**fields), Row(**{**fields, "task": "c4"})])
    table = lb.read(tmp_path)
    assert table["cell_key"].to_pylist() == [lb.cell_key(fields)] * 2
    assert table["metric_options"].to_pylist() == ["{}"] * 2


def test_compact_of_a_missing_folder_creates_nothing(tmp_path):
    lb.compact(tmp_path / "nope")
    assert not (tmp_path / "nope").exists()


def test_compaction_leaves_unreadable_and_newer_files_alone(tmp_path):
    future = lb._to_table([_row(value=1.0)]).replace_schema_metadata({lb.VERSION_KEY: "99"})
    pq.write_table(future, tmp_path / "future.parquet")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    lb.write_rows(tmp_path, [_row(value=2.0)])
    lb.write_rows(tmp_path, [_row(value=3.0, created_at=T0 + timedelta(hours=1))])
    assert (tmp_path / "future.parquet").exists() and (tmp_path / "bad.parquet").exists()
    with pytest.raises(lb.LeaderboardError, match="'99'.*newer.*upgrade stadebench"):
        lb._read_file(tmp_path / "future.parquet")
    with pytest.warns(lb.LeaderboardWarning) as caught:
        assert lb.read(tmp_path)["value"].to_pylist() == [3.0]  # one bad file hides nothing
    messages = sorted(str(w.message) for w in caught)
    assert "bad.parquet" in messages[0] and "future.parquet" in messages[1] and "upgrade" in messages[1]


# --- old files -------------------------------------------------------------------------

_SCHEMA_1 = (  # the columns stadebench wrote under schema version 1
    "cell_key", "model", "model_revision", "model_source", "metric", "metric_version", "metric_options",
    "pattern", "pattern_options", "sparsity", "calib_dataset", "calib_options", "calib_n", "calib_seqlen",
    "calib_seed", "sequential", "batch_size", "dtype", "evaluator", "evaluator_version", "eval_options",
    "eval_dataset", "eval_split", "eval_seqlen", "task", "score", "value", "stderr", "higher_is_better",
    "status", "error", "run_id", "created_at", "suite", "stadebench_version", "torch_version",
    "transformers_version", "lm_eval_version", "metric_plugin", "metric_plugin_version", "git_commit",
    "device", "actual_sparsity", "prune_seconds", "eval_seconds", "peak_memory_bytes", "details",
)


def _schema_1_file(path: Path, **over) -> None:
    """A file as stadebench wrote it under schema 1: its column set, a key over fewer fields."""
    row = lb._to_table([_row(model_source="hub", model_revision="main", metric_plugin="stadebench",
                             **over)]).to_pylist()[0]
    row["cell_key"] = "0" * 64
    v1 = pa.schema([lb.SCHEMA.field(n) for n in _SCHEMA_1], metadata={lb.VERSION_KEY: "1"})
    pq.write_table(pa.Table.from_pylist([{n: row[n] for n in v1.names}], schema=v1), path)


def test_a_schema_1_file_is_upgraded_on_read_with_a_recomputed_key(tmp_path):
    _schema_1_file(tmp_path / "old.parquet", value=7.0)
    table = lb.read(tmp_path)
    assert table.schema == lb.SCHEMA
    row = table.to_pylist()[0]
    assert row["value"] == 7.0 and row["metric_plugin"] == "stadebench"
    assert row["model_revision_requested"] == row["model_revision"] == "main"
    upgraded = {"model_revision_requested", "allocation", "allocation_version", "allocation_options",
                "allocation_plugin", "calib_accumulate"}
    assert all(row[n] is None for n in set(lb.SCHEMA.names) - set(_SCHEMA_1) - upgraded)
    # a pruned row of schema 1 or 2 was pruned uniformly: the upgrade says so
    assert (row["allocation"], row["allocation_options"], row["allocation_plugin"]) == ("uniform", "{}", "stadebench")
    assert row["calib_accumulate"] == "float64"  # calibrated before schema 4: float64 sums, the only way
    assert {"model_file", "pattern_version", "calib_fingerprint", "executor"} <= set(lb.SCHEMA.names) - set(_SCHEMA_1)
    assert row["cell_key"] == lb.cell_key(row) != "0" * 64  # a stored key matches its fields
    assert lb.finished_cells(tmp_path) == {row["cell_key"]}

    # compaction works on upgraded keys; a split keeps the old file's own schema
    lb.write_rows(tmp_path, [{**row, "cell_key": None, "value": 6.0, "created_at": T0 + timedelta(hours=1)}])
    assert not (tmp_path / "old.parquet").exists()
    assert lb.read(tmp_path)["value"].to_pylist() == [6.0]
    assert lb.superseded(tmp_path)["value"].to_pylist() == [7.0]


def test_a_run_rewrites_old_schema_files_so_plain_readers_see_one_schema(tmp_path):
    import pandas as pd

    _schema_1_file(tmp_path / "old.parquet", value=7.0)
    lb.write_rows(tmp_path, [_row(model="other", value=1.0)])
    lb.compact(tmp_path, upgrade=True)
    files = sorted(tmp_path.glob("*.parquet"))
    assert [f.name for f in files if f.name.startswith("old")] == [f"old_v{lb.SCHEMA_VERSION}.parquet"]
    assert {pq.read_schema(f).metadata[lb.VERSION_KEY.encode()] for f in files} == {lb.SCHEMA_VERSION.encode()}
    frame = pd.read_parquet(tmp_path)
    assert sorted(frame["value"]) == [1.0, 7.0] and list(frame.columns) == lb.SCHEMA.names
    assert (tmp_path / "_history" / "old.parquet").exists()  # the original is kept, out of view
    lb.compact(tmp_path, upgrade=True)  # nothing left to upgrade
    assert sorted(tmp_path.glob("*.parquet")) == files


_STR_KEYS = [f for f in KEY_FIELDS
             if lb.SCHEMA.field(f).type == pa.string() and f not in JSON_FIELDS]
_key_values = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                        st.text(max_size=8), st.floats(allow_nan=False, allow_infinity=False))


@given(st.permutations(KEY_FIELDS), st.dictionaries(st.sampled_from(_STR_KEYS), st.text()),
       st.dictionaries(st.text(max_size=5), _key_values, max_size=4), st.floats(0, 1))
def test_cell_key_ignores_order_and_non_key_fields(order, strings, options, extra):
    fields = {**_row(), **strings, "metric_options": options}
    fields = {k: fields.get(k) for k in order}  # any dict order
    key = lb.cell_key(fields)
    assert re.fullmatch(r"[0-9a-f]{64}", key)
    shuffled_options = dict(reversed(list(options.items())))
    same = {**dict(reversed(list(fields.items()))), "metric_options": json.dumps(shuffled_options),
            "task": "boolq", "score": "acc", "value": extra, "run_id": "other"}
    assert lb.cell_key(same) == key


@given(st.dictionaries(st.text(max_size=5), _key_values, max_size=4),
       st.dictionaries(st.text(max_size=5), _key_values, max_size=4))
def test_cell_key_differs_for_different_options(a, b):
    same = lb.canonical_json(a) == lb.canonical_json(b)
    assert (lb.cell_key(_row(metric_options=a)) == lb.cell_key(_row(metric_options=b))) == same


def test_cell_key_normalises_numbers_and_separates_cells():
    assert lb.cell_key(_row(sparsity=0)) == lb.cell_key(_row(sparsity=0.0))
    assert lb.cell_key(_row()) != lb.cell_key(_row(sparsity=0.6))
    assert lb.cell_key(_row()) != lb.cell_key(_row(eval_seqlen=4096))
    assert lb.cell_key(_row()) != lb.cell_key(_row(evaluator_version="2"))
    assert lb.cell_key(_row()) != lb.cell_key(_row(calib_options={"path": "a.txt"}))
    assert lb.cell_key(_row()) == lb.cell_key(_row(torch_version="9.9", suite="other"))


def test_pivot_small_grid(tmp_path):
    dense = {"metric": "dense", "pattern": None, "sparsity": 0.0, "calib_dataset": None,
             "calib_n": None, "calib_seqlen": None, "calib_seed": None}
    later = T0 + timedelta(hours=1)
    lb.write_rows(tmp_path, [
        _row(**dense, value=10.0),
        _row(**dense, value=99.0, eval_seqlen=128),  # another protocol: not this baseline
        _row(value=12.0),
        _row(value=11.0, created_at=later),  # newer run of the same cell wins
        _row(pattern="2:4", value=15.0, stderr=0.5),
        _row(metric="stade", metric_options={"bias_correction": False}, value=11.5),
        _row(metric="magnitude", value=None, status="failed", error="boom"),
        _row(task="boolq", score="acc", value=0.7),
    ])
    shown = grid.pivot(lb.read(tmp_path), "wikitext2", "perplexity")
    assert shown.columns == ("2:4 0.5", "unstructured 0.5")
    assert shown.higher_is_better is False
    rows = {r.label: r for r in shown.rows}
    assert set(rows) == {"wanda", "stade (bias_correction=false)"}
    wanda = rows["wanda"]
    assert wanda.model == "tiny-llama" and wanda.dense == 10.0
    cell = wanda.values["unstructured 0.5"]
    assert cell.to_dict() == {"value": 11.0, "stderr": None, "relative": pytest.approx(0.1), "significant": None,
                              "cell_key": cell.cell_key, "n": 1, "sd": None, "seeds": {}}
    assert re.fullmatch(r"[0-9a-f]{64}", cell.cell_key)
    assert wanda.values["2:4 0.5"].relative == pytest.approx(0.5)
    assert list(rows["stade (bias_correction=false)"].values) == ["unstructured 0.5"]
    assert [c for c, cell in shown.cells(rows["stade (bias_correction=false)"]) if cell] == ["unstructured 0.5"]
    plain = shown.to_dict()  # plain data, ready for any renderer
    json.dumps(plain)
    assert plain["columns"] == list(shown.columns) and plain["rows"][0]["values"] == {
        c: v.to_dict() for c, v in shown.rows[0].values.items()}


def test_pivot_labels_what_varies_and_handles_no_baseline():
    rows = [_row(calib_n=8, value=12.0), _row(calib_n=128, value=11.0)]
    shown = grid.pivot(lb._to_table(rows), "wikitext2", "perplexity")
    assert [r.label for r in shown.rows] == ["wanda calib_n=128", "wanda calib_n=8"]
    assert all(r.dense is None and r.values["unstructured 0.5"].relative is None for r in shown.rows)
    assert shown.models() == ["tiny-llama"] and shown.model_labels() == []  # no asset label to add
    assert grid.pivot(lb.SCHEMA.empty_table(), "x", "y").rows == ()


def test_pivot_labels_only_what_varies_within_a_metric_and_names_pattern_options():
    wanda = {"calib_fingerprint": "abc"}
    magnitude = {"metric": "magnitude", "calib_dataset": None, "calib_n": None, "calib_seqlen": None,
                 "calib_seed": None, "sequential": None, "batch_size": None}
    rows = [_row(**wanda, value=12.0), _row(**magnitude, value=30.0, metric_plugin="other", metric_version="3"),
            _row(**wanda, pattern="n:m", pattern_options={"n": 2, "m": 4}, pattern_version="2", value=16.0),
            _row(**wanda, pattern="n:m", pattern_options={"n": 4, "m": 8}, pattern_version="2", value=14.0)]
    shown = grid.pivot(lb._to_table(rows), "wikitext2", "perplexity")
    # magnitude has no calibration and another plugin: that tells the metrics apart, not rows
    assert [r.label for r in shown.rows] == ["magnitude", "wanda"]
    assert shown.columns == ("n:m(m=4, n=2) 0.5", "n:m(m=8, n=4) 0.5", "unstructured 0.5")
    assert set(shown.rows[1].values) == set(shown.columns)  # one row across pattern versions


def test_a_schema_2_file_is_read_as_uniformly_pruned_under_the_same_key_a_new_run_computes(tmp_path):
    # what this release writes for a uniform cell over every layer ...
    now = _row(allocation="uniform", allocation_version="1", allocation_options={}, allocation_plugin="stadebench")
    dense = _row(metric="dense", pattern=None, sparsity=0.0, value=9.0)
    # ... as the previous release wrote it: no allocation columns, schema 2, its own key
    added = {"allocation", "allocation_version", "allocation_options", "allocation_plugin", "layer_targets",
             "layer_ignore", "allocation_plugin_version", "dense_layers", "layers", "calib_accumulate"}
    v2 = pa.schema([f for f in lb.SCHEMA if f.name not in added], metadata={lb.VERSION_KEY: "2"})
    rows = [{n: r[n] for n in v2.names} | {"cell_key": "f" * 64} for r in lb._to_table([now, dense]).to_pylist()]
    pq.write_table(pa.Table.from_pylist(rows, schema=v2), tmp_path / "v2.parquet")
    table = lb.read(tmp_path)
    assert sorted(table["cell_key"].to_pylist()) == sorted([lb.cell_key(now), lb.cell_key(dense)])
    by_metric = {r["metric"]: r for r in table.to_pylist()}
    assert by_metric["dense"]["allocation"] is None and by_metric["wanda"]["allocation"] == "uniform"


def test_a_schema_3_file_reads_as_float64_accumulation_under_the_key_a_new_run_computes(tmp_path):
    calibrated = _row(value=12.0)
    free = _row(metric="magnitude", calib_dataset=None, calib_n=None, calib_seqlen=None, calib_seed=None,
                sequential=None, batch_size=None, calib_accumulate=None, value=30.0)
    v3 = pa.schema([f for f in lb.SCHEMA if f.name != "calib_accumulate"], metadata={lb.VERSION_KEY: "3"})
    rows = [{n: r[n] for n in v3.names} | {"cell_key": "e" * 64} for r in lb._to_table([calibrated, free]).to_pylist()]
    pq.write_table(pa.Table.from_pylist(rows, schema=v3), tmp_path / "v3.parquet")
    by_metric = {r["metric"]: r for r in lb.read(tmp_path).to_pylist()}
    assert by_metric["wanda"]["calib_accumulate"] == "float64" and by_metric["magnitude"]["calib_accumulate"] is None
    assert by_metric["wanda"]["cell_key"] == lb.cell_key(calibrated)
    assert by_metric["magnitude"]["cell_key"] == lb.cell_key(free)
    # the releases' accumulation is another cell
    assert lb.cell_key({**calibrated, "calib_accumulate": "released"}) != lb.cell_key(calibrated)


def test_a_schema_4_lm_eval_row_reads_as_the_stock_path_under_the_key_a_new_run_computes(tmp_path):
    zero_shot = _row(evaluator="lm-eval", eval_options={"tasks": ["arc_easy"], "limit": 50}, task="arc_easy",
                     score="acc", value=0.5)
    perplexity = _row(value=12.0)
    table = lb._to_table([zero_shot, perplexity]).replace_schema_metadata({lb.VERSION_KEY: "4"})
    rows = [r | {"cell_key": "d" * 64} for r in table.to_pylist()]
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), tmp_path / "v4.parquet")
    by_evaluator = {r["evaluator"]: r for r in lb.read(tmp_path).to_pylist()}
    stock = {**zero_shot, "eval_options": {"tasks": ["arc_easy"], "limit": 50, "fast": False}}
    assert json.loads(by_evaluator["lm-eval"]["eval_options"]) == {"tasks": ["arc_easy"], "limit": 50, "fast": False}
    assert by_evaluator["lm-eval"]["cell_key"] == lb.cell_key(stock)
    assert by_evaluator["perplexity"]["cell_key"] == lb.cell_key(perplexity)
    # the shared-prefix path is another measurement
    assert lb.cell_key({**stock, "eval_options": {"tasks": ["arc_easy"], "limit": 50, "fast": True}}) != lb.cell_key(
        stock)


def test_a_schema_3_file_written_before_the_saved_columns_reads_them_as_null(tmp_path):
    early = pa.schema([f for f in lb.SCHEMA if f.name not in ("saved_path", "saved_sha256")],
                      metadata={lb.VERSION_KEY: lb.SCHEMA_VERSION})
    pq.write_table(lb._to_table([_row()]).select(early.names).cast(early), tmp_path / "early.parquet")
    lb.write_rows(tmp_path, [_row(metric="magnitude", saved_path="/m/x", saved_sha256="a" * 64)])
    rows = {r["metric"]: r for r in lb.read(tmp_path).to_pylist()}
    assert rows["wanda"]["saved_path"] is None and rows["wanda"]["saved_sha256"] is None
    assert rows["magnitude"]["saved_path"] == "/m/x" and rows["wanda"]["cell_key"] == lb.cell_key(_row())
    lb.compact(tmp_path, upgrade=True)
    assert lb.read(tmp_path).num_rows == 2


def test_pivot_marks_a_change_inside_the_standard_error_and_drops_default_options():
    acc = {"task": "arc_easy", "score": "acc", "higher_is_better": True, "evaluator": "lm-eval"}
    rows = [_row(metric="dense", pattern=None, sparsity=0.0, value=0.68, stderr=0.07, **acc),
            _row(metric="stade", metric_options={"bias_correction": True}, value=0.70, stderr=0.07, **acc),
            _row(metric="wanda", value=0.40, stderr=0.07, **acc),
            _row(metric="magnitude", value=0.5, stderr=None, sparsity=0.6, **acc)]
    shown = grid.pivot(lb._to_table(rows), "arc_easy", "acc")
    cells = {r.label: next(iter(r.values.values())) for r in shown.rows}
    assert set(cells) == {"stade", "wanda", "magnitude"}  # stade's default option is not in its label
    assert cells["stade"].significant is False and cells["wanda"].significant is True
    assert cells["magnitude"].significant is True  # the dense stderr alone: 0.18 away is outside 0.07
    assert grid.pivot(lb._to_table([_row(metric="stade", metric_options={"bias_correction": False})]), "wikitext2",
                      "perplexity").rows[0].label == "stade (bias_correction=false)"
