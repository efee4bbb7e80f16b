"""Verdicts with uncertainty on a leaderboard: cells that differ only in the calibration
seed compared as one, paired window by window and seed by seed (`leaderboard compare`)."""

from __future__ import annotations

import json
import math
import random
import statistics
from datetime import datetime, timezone

import pytest
from typer.testing import CliRunner

from stadebench.cli import ExitCode, app
from stadebench.results import store
from stadebench.results.paired import paired_bootstrap
from stadebench.results.row import Row

WINDOWS = 8


def _items(nll: list[float]) -> list[dict]:
    return [{"id": i, "value": v, "weight": 511} for i, v in enumerate(nll)]


def _row(metric: str, nll: list[float] | None, *, seed: int | None = None, dataset: str = "enwiki-2016",
         value: float | None = None, **extra) -> Row:
    calibration = {} if seed is None else {"calib_dataset": dataset, "calib_options": "{}", "calib_n": 16,
                                           "calib_seqlen": 256, "calib_seed": seed, "sequential": True,
                                           "batch_size": 8, "calib_accumulate": "float64"}
    pruned = {} if metric == "dense" else {"pattern": "unstructured", "allocation": "uniform"}
    ppl = value if nll is None else math.exp(sum(nll) / len(nll))
    items = {} if nll is None else {"items": _items(nll), "item_aggregate": "exp_mean"}
    return Row(model="m", dtype="float32", metric=metric, metric_options="{}", sparsity=0.0 if metric == "dense"
               else 0.5, evaluator="perplexity", eval_options='{"seqlen": 512}', eval_dataset="enwiki-2016",
               eval_seqlen=512, task="enwiki-2016", score="ppl", value=ppl, higher_is_better=False, status="ok",
               run_id="r", created_at=datetime.now(timezone.utc), **pruned, **calibration, **items, **extra)


def _windows(base: float, shift: float, rng: random.Random, noise: float = 0.0) -> list[float]:
    return [base + 0.1 * i + shift + rng.gauss(0, noise) for i in range(WINDOWS)]


@pytest.fixture
def board(tmp_path):
    """dense; magnitude (no data); wanda and stade on 5 seeds of two calibration datasets, stade
    better than wanda on enwiki by a clear margin and the same as wanda on shakespeare."""
    rng = random.Random(0)
    rows = [_row("dense", _windows(2.0, 0, rng)), _row("magnitude", _windows(2.0, 0.5, rng))]
    for seed in range(5):
        seed_shift = rng.gauss(0, 0.02)
        for dataset, gap in (("enwiki-2016", -0.1), ("shakespeare", 0.0)):
            wanda = _windows(2.0, 0.2 + seed_shift, rng, 0.01)
            rows.append(_row("wanda", wanda, seed=seed, dataset=dataset))
            stade = [v + gap for v in wanda] if gap == 0 else _windows(2.0, 0.2 + gap + seed_shift, rng, 0.01)
            rows.append(_row("stade", stade, seed=seed, dataset=dataset))
    store.write_rows(tmp_path, rows)
    return tmp_path


def compare(folder, *args):
    return CliRunner().invoke(app, ["leaderboard", "compare", *args, "--dir", str(folder), "--format", "json"],
                              catch_exceptions=False)


def test_seeds_are_averaged_and_paired(board):
    r = compare(board, "wanda", "stade")
    assert r.exit_code == ExitCode.OK, r.output
    rows = {row["calibration"]: row for row in json.loads(r.stdout)}
    assert set(rows) == {"enwiki-2016 16×256", "shakespeare 16×256"}  # two protocols, never pooled
    table = store.read(board).to_pylist()
    for name, row in rows.items():
        dataset = name.split()[0]
        side = {m: {r["calib_seed"]: r for r in table if r["metric"] == m and r["calib_dataset"] == dataset}
                for m in ("wanda", "stade")}
        assert row["seeds"] == 5 and row["items"] == WINDOWS and row["level"] == 0.95
        for m in ("wanda", "stade"):
            assert row[m] == pytest.approx(sum(r["value"] for r in side[m].values()) / 5, rel=1e-12)
        interval = paired_bootstrap({s: r["items"] for s, r in side["stade"].items()},
                                    {s: r["items"] for s, r in side["wanda"].items()}, "exp_mean")
        assert (row["ci_low"], row["ci_high"]) == (interval.low, interval.high)
    enwiki, shakespeare = rows["enwiki-2016 16×256"], rows["shakespeare 16×256"]
    assert enwiki["delta"] < 0 and enwiki["ci_high"] < 0 and enwiki["better"] == "stade"
    # identical windows on every seed: exactly no difference
    assert (shakespeare["delta"], shakespeare["ci_low"], shakespeare["ci_high"]) == (0.0, 0.0, 0.0)
    assert shakespeare["better"] == "~"


def test_a_metric_without_data_pairs_with_every_calibration(board):
    r = compare(board, "magnitude", "wanda")
    assert r.exit_code == ExitCode.OK, r.output
    rows = json.loads(r.stdout)
    assert sorted(row["calibration"] for row in rows) == ["enwiki-2016 16×256", "shakespeare 16×256"]
    assert all(row["seeds"] == 5 and row["better"] == "wanda" for row in rows)


def test_seeds_only_one_metric_has_are_left_out(board, tmp_path):
    store.write_rows(board, [_row("wanda", _windows(9.0, 0, random.Random(1)), seed=7)])
    (row,) = [r for r in json.loads(compare(board, "wanda", "stade").stdout) if r["calibration"].startswith("en")]
    table = store.read(board).to_pylist()
    means = sum(r["value"] for r in table if r["metric"] == "wanda" and r["calib_dataset"] == "enwiki-2016"
                and r["calib_seed"] != 7) / 5
    assert row["seeds"] == 5 and row["wanda"] == pytest.approx(means, rel=1e-12)


def test_results_with_no_shared_windows_are_refused(tmp_path):
    shifted = [{**item, "id": item["id"] + 100} for item in _items([2.0] * WINDOWS)]
    store.write_rows(tmp_path, [_row("wanda", [2.0] * WINDOWS, seed=0),
                                _row("stade", [2.1] * WINDOWS, seed=0).replace(items=shifted)])
    r = compare(tmp_path, "wanda", "stade")
    assert r.exit_code == ExitCode.USAGE
    assert "share no evaluation items" in " ".join(r.stderr.split()) and r.stdout == ""


def test_rows_without_items_compare_without_an_interval(tmp_path):
    store.write_rows(tmp_path, [_row("wanda", None, seed=0, value=20.0), _row("stade", None, seed=0, value=19.0)])
    (row,) = json.loads(compare(tmp_path, "wanda", "stade").stdout)
    assert row["ci_low"] is None and row["items"] is None and row["delta"] == -1.0 and row["better"] == "stade"


def test_interval_options_are_recorded_and_checked(board):
    r = compare(board, "wanda", "stade", "--resamples", "500", "--level", "0.9")
    assert r.exit_code == ExitCode.OK and {row["level"] for row in json.loads(r.stdout)} == {0.9}
    r = compare(board, "wanda", "stade", "--level", "1.5")
    assert r.exit_code == ExitCode.USAGE


def test_the_table_names_the_interval(board):
    r = CliRunner().invoke(app, ["leaderboard", "compare", "wanda", "stade", "--dir", str(board)],
                           env={"COLUMNS": "200"}, catch_exceptions=False)
    assert r.exit_code == ExitCode.OK, r.output
    assert "95% CI" in r.stdout and "no detectable difference" in r.stdout and "calibration" in r.stdout


def test_the_table_averages_seeds_and_keeps_calibrations_apart(board):
    from stadebench.results.grid import pivot

    grid = pivot(store.read(board), "enwiki-2016", "ppl")
    rows = {row.label: row for row in grid.rows}
    assert set(rows) == {"magnitude", "wanda calib_dataset=enwiki-2016", "wanda calib_dataset=shakespeare",
                         "stade calib_dataset=enwiki-2016", "stade calib_dataset=shakespeare"}
    cell = rows["wanda calib_dataset=enwiki-2016"].values["unstructured 0.5"]
    table = store.read(board).to_pylist()
    values = {r["calib_seed"]: r["value"] for r in table if r["metric"] == "wanda"
              and r["calib_dataset"] == "enwiki-2016"}
    assert cell.n == 5 and dict(cell.seeds) == values and cell.stderr is None
    assert cell.value == pytest.approx(sum(values.values()) / 5, rel=1e-12)
    assert cell.sd == pytest.approx(statistics.stdev(values.values()), rel=1e-12)
    assert cell.significant is True  # 0.2 nats per token worse than dense on every window
    # one flag away: a row per seed
    per_seed = pivot(store.read(board), "enwiki-2016", "ppl", seeds=True)
    assert len(per_seed.rows) == 1 + 4 * 5 and all(c.n == 1 for r in per_seed.rows for c in r.values.values())

    r = CliRunner().invoke(app, ["leaderboard", "--dir", str(board), "--format", "markdown"],
                           catch_exceptions=False)
    assert r.exit_code == ExitCode.OK and "(n=5)" in r.stdout
    r = CliRunner().invoke(app, ["leaderboard", "--dir", str(board), "--seeds", "--format", "markdown"],
                           catch_exceptions=False)
    assert r.exit_code == ExitCode.OK and "(n=5)" not in r.stdout and "calib_seed=4" in r.stdout


def test_a_leaderboard_written_before_items_and_stages_reads_and_compares_without_intervals(tmp_path):
    """A schema 5 file (no items, no stage columns, its own keys) reads under the keys a new
    run computes, so a run resumes it, and compares without an interval."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import pandas

    from stadebench.results.row import cell_key

    new = [_row("wanda", None, seed=0, value=20.0), _row("stade", None, seed=0, value=19.0)]
    added = {"items", "item_aggregate", "refine", "refine_version", "refine_options", "refine_plugin",
             "refine_plugin_version", "reconstruct", "reconstruct_version", "reconstruct_options",
             "reconstruct_plugin", "reconstruct_plugin_version"}
    v5 = pa.schema([f for f in store.SCHEMA if f.name not in added], metadata={store.VERSION_KEY: "5"})
    rows = [{n: r[n] for n in v5.names} | {"cell_key": "c" * 64} for r in store._to_table(new).to_pylist()]
    pq.write_table(pa.Table.from_pylist(rows, schema=v5), tmp_path / "v5.parquet")
    table = store.read(tmp_path)
    assert sorted(table["cell_key"].to_pylist()) == sorted(cell_key(r.__dict__) for r in new)
    assert store.finished_cells(tmp_path) == {r.key() for r in new}  # a run resumes: nothing to redo
    (row,) = json.loads(compare(tmp_path, "wanda", "stade").stdout)
    assert row["ci_low"] is None and row["better"] == "stade"
    store.compact(tmp_path, upgrade=True)
    assert len(pandas.read_parquet(tmp_path)) == 2


def test_the_report_shows_seed_means_with_their_spread(board, tmp_path):
    from stadebench.report import build_report

    page = build_report(board, tmp_path / "report").read_text(encoding="utf-8")
    assert "(n=5)" in page and "± 0" in page


def test_without_items_the_verdict_is_on_the_seed_means(tmp_path):
    """Old rows, several seeds: the better side is the one with the better mean, not the one
    that wins on the first seed."""
    rows = [_row("wanda", None, seed=0, value=10.0), _row("wanda", None, seed=1, value=30.0),
            _row("stade", None, seed=0, value=12.0), _row("stade", None, seed=1, value=14.0)]
    store.write_rows(tmp_path, rows)
    (row,) = json.loads(compare(tmp_path, "wanda", "stade").stdout)
    assert (row["wanda"], row["stade"], row["seeds"], row["ci_low"]) == (20.0, 13.0, 2, None)
    assert row["better"] == "stade"  # lower perplexity on average, though wanda wins seed 0


def test_a_side_run_with_two_option_sets_gives_an_entry_each_named(tmp_path):
    """`stade` with and without its bias correction are two sides' worth of results under one
    name: each is compared with wanda and named by its options, neither silently dropped."""
    rows = [_row("wanda", [2.2] * WINDOWS, seed=0),
            _row("stade", [2.1] * WINDOWS, seed=0).replace(metric_options='{"bias_correction": true}'),
            _row("stade", [2.3] * WINDOWS, seed=0).replace(metric_options='{"bias_correction": false}')]
    store.write_rows(tmp_path, rows)
    entries = json.loads(compare(tmp_path, "wanda", "stade").stdout)
    assert sorted((e["side_b"], round(e["delta"], 6)) for e in entries) == [
        ("stade", round(math.exp(2.1) - math.exp(2.2), 6)),
        ("stade (bias_correction=false)", round(math.exp(2.3) - math.exp(2.2), 6))]
    assert {e["side_a"] for e in entries} == {"wanda"}
    table = CliRunner().invoke(app, ["leaderboard", "compare", "wanda", "stade", "--dir", str(tmp_path)],
                               env={"COLUMNS": "300"}, catch_exceptions=False).stdout
    assert "stade (bias_correction=false)" in table and "side_b" in table


def test_two_versions_with_the_same_options_are_told_apart(tmp_path):
    rows = [_row("wanda", [2.2] * WINDOWS, seed=0), _row("stade", [2.1] * WINDOWS, seed=0, metric_version="1"),
            _row("stade", [2.0] * WINDOWS, seed=0, metric_version="2")]
    store.write_rows(tmp_path, rows)
    sides = sorted(e["side_b"] for e in json.loads(compare(tmp_path, "wanda", "stade").stdout))
    assert len(sides) == 2 and sides[0].startswith("stade [v1,") and sides[1].startswith("stade [v2,")
