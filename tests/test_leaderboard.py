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

from stadebench.bench import leaderboard as lb

T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)


def _row(**over):
    row = {
        "model": "tiny-llama", "model_source": "asset", "metric": "wanda", "metric_version": "1",
        "metric_options": {}, "pattern": "unstructured", "sparsity": 0.5,
        "calib_dataset": "c4", "calib_n": 8, "calib_seqlen": 64, "calib_seed": 0,
        "sequential": True, "batch_size": 4, "dtype": "float32",
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
    assert {n for n in names if not n.startswith(".")} == {
        p.name for p in tmp_path.glob("*.parquet")} | {"manifest.json"}


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken(table, fh):
        fh.write(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(lb.pq, "write_table", broken)
    with pytest.raises(OSError, match="disk full"):
        lb.write_rows(tmp_path, [_row()])
    assert not [n for n in _names(tmp_path) if not n.startswith(".manifest.lock")]


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
    monkeypatch.setitem(lb._UPGRADES, "0", lambda t: t.rename_columns(
        ["value" if n == "val" else n for n in t.column_names]))
    assert lb.read(tmp_path)["value"].to_pylist() == [3.0]


def test_schema_metadata_is_readable_by_plain_pyarrow(tmp_path):
    path = lb.write_rows(tmp_path, [_row()], metadata={"suite_yaml": "grid: {}", "n": 1})
    table = pq.read_table(path)
    assert table.schema.metadata[b"stadebench.schema_version"] == b"1"
    assert table.schema.metadata[b"suite_yaml"] == b"grid: {}"
    assert table.schema.metadata[b"n"] == b"1"
    assert table.schema.field("created_at").type == pa.timestamp("us", tz="UTC")
    assert all(f.metadata and f.metadata[b"doc"] for f in table.schema)
    assert not table.schema.field("cell_key").nullable
    assert ds.dataset(tmp_path, format="parquet", exclude_invalid_files=True).count_rows() == 1


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


def test_manifest_lists_the_files_on_disk(tmp_path):
    first = lb.write_rows(tmp_path, [_row(), _row(task="c4")])
    second = lb.write_rows(tmp_path, [_row(sparsity=0.6)])
    first.unlink()  # deleted by hand: the next write forgets it
    (tmp_path / "manifest.json").write_text("{broken")  # and a broken index is rebuilt
    third = lb.write_rows(tmp_path, [_row(sparsity=0.7)])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["schema_version"] == "1"
    assert {f["name"]: f["rows"] for f in manifest["files"]} == {second.name: 1, third.name: 1}


def _write_many(folder: str, worker: int, n: int, barrier, read_back: bool = False) -> None:
    barrier.wait()  # both processes start writing together, after the child's slow imports
    for i in range(n):
        lb.write_rows(folder, [_row(run_id=f"w{worker}", model=f"m{i}", task=task, value=float(i))
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

    table = lb.read(tmp_path)
    assert table.num_rows == 200
    assert len(set(zip(*(table[c].to_pylist() for c in ("run_id", "model", "task"))))) == 200
    files = {p.name for p in tmp_path.glob("*.parquet")}
    assert len(files) == 100 and not [n for n in _names(tmp_path) if n.endswith(".tmp")]
    mtimes = [[p.stat().st_mtime_ns for p in tmp_path.glob(f"w{w}-*")] for w in (1, 2)]
    assert max(map(min, mtimes)) < min(map(max, mtimes))  # the two writers did overlap
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert {f["name"] for f in manifest["files"]} == files
    assert sum(f["rows"] for f in manifest["files"]) == 200


_STR_KEYS = [f for f in lb.KEY_FIELDS
             if lb.SCHEMA.field(f).type == pa.string() and not f.endswith("_options")]
_key_values = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                        st.text(max_size=8), st.floats(allow_nan=False, allow_infinity=False))


@given(st.permutations(lb.KEY_FIELDS), st.dictionaries(st.sampled_from(_STR_KEYS), st.text()),
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
    grid = lb.pivot(lb.read(tmp_path), "wikitext2", "perplexity")
    assert grid["columns"] == ["2:4 0.5", "unstructured 0.5"]
    assert grid["higher_is_better"] is False
    rows = {r["label"]: r for r in grid["rows"]}
    assert set(rows) == {"wanda", "stade (bias_correction=false)"}
    wanda = rows["wanda"]
    assert wanda["model"] == "tiny-llama" and wanda["dense"] == 10.0
    assert wanda["values"]["unstructured 0.5"] == {"value": 11.0, "stderr": None,
                                                   "relative": pytest.approx(0.1)}
    assert wanda["values"]["2:4 0.5"]["relative"] == pytest.approx(0.5)
    assert list(rows["stade (bias_correction=false)"]["values"]) == ["unstructured 0.5"]
    json.dumps(grid)  # plain data, ready for any renderer


def test_pivot_labels_what_varies_and_handles_no_baseline():
    rows = [_row(calib_n=8, value=12.0), _row(calib_n=128, value=11.0)]
    grid = lb.pivot(lb._to_table(rows), "wikitext2", "perplexity")
    assert [r["label"] for r in grid["rows"]] == ["wanda calib_n=128", "wanda calib_n=8"]
    assert all(r["dense"] is None and r["values"]["unstructured 0.5"]["relative"] is None
               for r in grid["rows"])
    assert lb.pivot(lb.SCHEMA.empty_table(), "x", "y")["rows"] == []
