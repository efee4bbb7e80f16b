"""The suite driver (stadebench.runner.run: plan, local executor, model session): cells → one Parquet file each, model loaded once,
dense weights restored in memory, re-runs skip finished cells, failures are recorded.

Runs suites over a tiny random Llama saved as a local folder (tests/tinymodel.py), so a
whole grid takes a couple of seconds on a CPU.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

import stadebench
from stadebench.results import store as lb
from stadebench.errors import ConfigError
from stadebench.runner.executor import Events
from stadebench.runner.run import run_suite
from tinymodel import load_tiny_suite, shared_assets, suite_dict

GRID_METRICS = ["magnitude", "wanda", "stade", "sparsegpt"]
GRID_PATTERNS = ["unstructured", "2:4"]


# --- helpers ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    return shared_assets(tmp_path_factory)


@pytest.fixture(autouse=True)
def token_cache(tmp_path, monkeypatch):
    """Tokenised text goes to a per-test cache, not the user's."""
    monkeypatch.setenv("STADEBENCH_CACHE", str(tmp_path / "cache"))


class LoadSpy:
    """Counts model loads, through stadebench and through transformers."""

    def __init__(self, mp: pytest.MonkeyPatch):
        import stadebench.data.loading as loading
        from transformers import AutoModelForCausalLM

        self.ids: list[str] = []
        self.models: list[torch.nn.Module] = []
        self.from_pretrained = 0
        real_load, real_fp = loading.load_model, AutoModelForCausalLM.from_pretrained

        def load_model(spec, device="cpu"):
            self.ids.append(spec.id)
            loaded = real_load(spec, device)
            self.models.append(loaded.model)
            return loaded

        def from_pretrained(*args, **kwargs):
            self.from_pretrained += 1
            return real_fp(*args, **kwargs)

        mp.setattr(loading, "load_model", load_model)
        mp.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)


@pytest.fixture
def loads(monkeypatch) -> LoadSpy:
    return LoadSpy(monkeypatch)


class Recorder(Events):
    """Remembers every progress event."""

    def __init__(self, interrupt_at: int | None = None):
        self.planned, self.started, self.ended, self.block_calls = None, [], [], 0
        self.interrupt_at = interrupt_at

    def plan(self, todo, skipped):
        self.planned = (todo, skipped)

    def cell_start(self, cell, index, total):
        if index == self.interrupt_at:
            raise KeyboardInterrupt
        self.started.append((cell.label, index, total))

    def blocks(self, done, total):
        self.block_calls += 1

    def cell_end(self, cell, error):
        self.ended.append((cell.label, error))


def rows_of(folder: Path) -> list[dict]:
    return lb.read(folder).to_pylist()


def parquet_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.parquet"))


def value_of(rows: list[dict], metric: str, pattern: str | None = None) -> float:
    found = [r["value"] for r in rows if r["metric"] == metric and r["pattern"] == pattern and r["status"] == "ok"]
    assert len(found) == 1, (metric, pattern, found)
    return found[0]


def cell_label(metric: str, pattern: str) -> str:
    return f"{metric} · {pattern} · 0.5"


# --- the grid: dense + 4 metrics × 2 patterns, run once for this module -----------


@pytest.fixture(scope="module")
def grid(tmp_path_factory, assets):
    root = tmp_path_factory.mktemp("grid")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STADEBENCH_CACHE", str(root / "cache"))
        spy = LoadSpy(mp)
        suite = load_tiny_suite(root, assets, name="grid", metrics=GRID_METRICS, patterns=GRID_PATTERNS)
        events = Recorder()
        summary = run_suite(suite, events=events)
    folder = root / "lb"
    return types.SimpleNamespace(root=root, folder=folder, suite=suite, summary=summary, spy=spy, events=events,
                                 rows=rows_of(folder))


def test_grid_runs_every_cell_and_writes_one_parquet_file_per_cell(grid):
    expected = ["dense"] + [cell_label(m, p) for m in GRID_METRICS for p in GRID_PATTERNS]
    assert grid.summary.finished == expected
    assert grid.summary.failed == [] and grid.summary.skipped == 0 and grid.summary.cells == 9
    files = parquet_files(grid.folder)
    assert sorted(grid.summary.files) == files and len(files) == 9
    keys = []
    for file in files:
        table = pq.read_table(file)
        assert table.num_rows == 1  # one evaluation, one score per cell
        assert table.schema.metadata[lb.VERSION_KEY.encode()] == lb.SCHEMA_VERSION.encode()
        keys += table["cell_key"].to_pylist()
    assert len(set(keys)) == 9
    # a plain Parquet dataset: nothing but the cells' files is visible in the folder
    assert sorted(p.name for p in grid.folder.iterdir() if not p.name.startswith(("_", "."))) == \
        [f.name for f in files]
    # progress events: planned 9, each cell started once in order and ended without error
    assert grid.events.planned == (9, 0)
    assert [s[0] for s in grid.events.started] == expected
    assert [s[1:] for s in grid.events.started] == [(i, 9) for i in range(1, 10)]
    assert grid.events.ended == [(label, None) for label in expected]
    assert grid.events.block_calls > 0


ALWAYS = ("cell_key", "model", "model_source", "metric", "metric_options", "sparsity", "dtype", "evaluator",
          "evaluator_version", "eval_options", "eval_dataset", "eval_seqlen", "task", "score", "value",
          "higher_is_better", "status", "run_id", "created_at", "suite", "stadebench_version", "torch_version",
          "transformers_version", "git_commit", "device", "actual_sparsity", "prune_seconds", "eval_seconds",
          "details")
PRUNED_ONLY = ("metric_version", "pattern", "calib_dataset", "calib_options", "calib_n", "calib_seqlen",
               "calib_seed", "sequential", "batch_size", "metric_plugin", "metric_plugin_version")
CALIBRATION = ("calib_dataset", "calib_options", "calib_n", "calib_seqlen", "calib_seed", "sequential",
               "batch_size")


def _git_head() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(Path(stadebench.__file__).parent), "rev-parse", "HEAD"],
                              capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def test_every_row_records_protocol_knobs_versions_and_provenance(grid, assets):
    import transformers

    head = _git_head()
    assert len(grid.rows) == 9
    for r in grid.rows:
        data_free = r["metric"] in ("dense", "magnitude")  # no calibration in their key or row
        must = ALWAYS + (() if r["metric"] == "dense" else
                         tuple(c for c in PRUNED_ONLY if not (data_free and c in CALIBRATION)))
        missing = [c for c in must if r[c] is None]
        if head is None:
            missing = [c for c in missing if c != "git_commit"]
        assert not missing, (r["metric"], r["pattern"], missing)
        assert r["status"] == "ok" and r["error"] is None
        assert r["model"] == str(assets["model"]) and r["model_source"] == "local" and r["dtype"] == "float32"
        assert r["evaluator"] == "perplexity" and r["evaluator_version"] == "1"
        assert r["eval_dataset"] == "text" and r["eval_seqlen"] == 16 and r["task"] == "text"
        assert r["score"] == "ppl" and r["higher_is_better"] is False
        assert 1 < r["value"] < 1e4
        eval_options = json.loads(r["eval_options"])
        assert eval_options["seqlen"] == 16 and eval_options["max_windows"] == 4
        assert eval_options["dataset"] == {"name": "text", "options": {"path": str(assets["corpus"])}}
        assert r["run_id"] == grid.summary.run_id and r["suite"] == "grid"
        assert r["stadebench_version"] == stadebench.__version__
        assert r["torch_version"] == torch.__version__
        assert r["transformers_version"] == transformers.__version__
        try:
            lm_eval = importlib.metadata.version("lm_eval")
        except importlib.metadata.PackageNotFoundError:
            lm_eval = None
        assert r["lm_eval_version"] == lm_eval
        assert r["device"].startswith("cpu")
        if head is not None:
            assert r["git_commit"].startswith(head)
        assert r["eval_seconds"] > 0 and r["prune_seconds"] >= 0
        if r["metric"] == "dense":
            assert r["pattern"] is None and r["sparsity"] == 0.0 and r["actual_sparsity"] == 0.0
            assert all(r[c] is None for c in CALIBRATION), "the dense baseline has no calibration"
        else:
            assert r["pattern"] in GRID_PATTERNS and r["sparsity"] == 0.5
            if data_free:
                assert all(r[c] is None for c in CALIBRATION), "a data-free metric reads no calibration"
            else:
                assert r["calib_dataset"] == "text"
                assert json.loads(r["calib_options"])["path"] == str(assets["corpus"])
                assert (r["calib_n"], r["calib_seqlen"], r["calib_seed"], r["sequential"], r["batch_size"]) == \
                    (4, 16, 0, True, 2)
            assert r["metric_plugin"] == "stadebench" and r["metric_plugin_version"] == stadebench.__version__
            assert r["prune_seconds"] > 0
            assert isinstance(json.loads(r["metric_options"]), dict)
    stade = [r for r in grid.rows if r["metric"] == "stade"]
    assert all(json.loads(r["metric_options"]) == {"bias_correction": True} for r in stade)
    sparsegpt = [r for r in grid.rows if r["metric"] == "sparsegpt"]
    assert all("blocksize" in json.loads(r["metric_options"]) for r in sparsegpt)


def test_rows_record_the_evaluated_split(grid):
    # the evaluation dataset, split and seqlen are in every row (and in the key).
    # The perplexity evaluator evaluates the dataset's default split ("test") when none is
    # given, and says so in details; the eval_split column must say it too.
    for r in grid.rows:
        assert json.loads(r["details"])["eval"]["split"] == "test"
        assert r["eval_split"] == "test", "eval_split is null when the suite relies on the default split"


def test_rows_are_readable_with_plain_pyarrow(grid):
    code = (
        "import sys, json, pyarrow.dataset as ds\n"
        "t = ds.dataset(sys.argv[1], format='parquet', exclude_invalid_files=True).to_table()\n"
        "rows = t.select(['metric', 'pattern', 'value', 'status']).to_pylist()\n"
        "assert not [m for m in sys.modules if m.startswith('stadebench')]\n"
        "print(json.dumps(rows))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(grid.folder)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    plain = json.loads(done.stdout)
    assert len(plain) == 9 and {r["status"] for r in plain} == {"ok"}
    mine = {(r["metric"], r["pattern"]): r["value"] for r in grid.rows}
    assert {(r["metric"], r["pattern"]): r["value"] for r in plain} == mine


def test_actual_sparsity_is_the_target(grid):
    for r in grid.rows:
        target = 0.0 if r["metric"] == "dense" else 0.5
        assert r["actual_sparsity"] == pytest.approx(target, abs=1e-6), (r["metric"], r["pattern"])


def test_model_is_loaded_once_for_the_whole_grid(grid, assets):
    assert grid.spy.ids == [str(assets["model"])]
    assert grid.spy.from_pretrained == 1


def test_dense_baseline_is_evaluated_once(grid):
    dense = [r for r in grid.rows if r["metric"] == "dense"]
    assert len(dense) == 1  # not once per metric or pattern
    # pruning changed the model: every pruned cell differs from the dense baseline
    assert all(r["value"] != dense[0]["value"] for r in grid.rows if r["metric"] != "dense")


# --- dense weights restored in memory ------------------------------------------------


@pytest.mark.parametrize(("metric", "pattern"), [
    ("wanda", "unstructured"),     # ran after magnitude · 2:4
    ("sparsegpt", "unstructured"),  # ran after stade · 2:4, which added biases
    ("magnitude", "2:4"),           # ran after magnitude · unstructured
])
def test_a_cell_gives_the_same_result_as_when_run_alone(grid, tmp_path, metric, pattern):
    summary = run_suite(grid.suite, leaderboard_dir=tmp_path / "alone", only=[f"metric={metric}", f"pattern={pattern}"])
    assert summary.finished == [cell_label(metric, pattern)]
    value = value_of(rows_of(tmp_path / "alone"), metric, pattern)
    assert value == pytest.approx(value_of(grid.rows, metric, pattern), rel=1e-9, abs=0)


ONE_SHOT_METRICS = ["magnitude", "wanda", "stade", "stade-w", "sparsegpt"]


@pytest.fixture(scope="module")
def one_shot(tmp_path_factory, assets):
    """A one-shot grid (5 metrics × 2 patterns), with every call to the engine counted."""
    import stadebench.core.engine as engine

    root = tmp_path_factory.mktemp("one-shot")
    calls = {"collect": [], "prune": []}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STADEBENCH_CACHE", str(root / "cache"))
        real_collect, real_prune = engine.collect_statistics, engine.prune

        def collect(*args, **kwargs):
            calls["collect"].append(sorted(args[2]))
            return real_collect(*args, **kwargs)

        def prune(*args, **kwargs):
            report = real_prune(*args, **kwargs)
            calls["prune"].append((report.metric, report.shared_statistics, report.block_passes))
            return report

        mp.setattr(engine, "collect_statistics", collect)
        mp.setattr(engine, "prune", prune)
        suite_data = suite_dict(assets, name="one-shot", metrics=ONE_SHOT_METRICS, patterns=GRID_PATTERNS)
        suite_data["calibration"]["sequential"] = False
        suite = load_tiny_suite(root, assets, **{k: v for k, v in suite_data.items() if k != "leaderboard"})
        summary = run_suite(suite)
    return types.SimpleNamespace(folder=root / "lb", suite=suite, summary=summary, calls=calls,
                                 rows=rows_of(root / "lb"))


def test_a_one_shot_grid_collects_statistics_once_for_all_its_metrics(one_shot):
    assert len(one_shot.summary.finished) == 11 and not one_shot.summary.failed
    assert one_shot.calls["collect"] == [["gram", "sum", "sumsq"]]
    assert sorted(one_shot.calls["prune"]) == sorted(
        [("magnitude", False, 0)] * 2 + [(m, True, 0) for m in ONE_SHOT_METRICS[1:] for _ in GRID_PATTERNS])
    shared = [json.loads(r["details"])["prune"]["shared_statistics"] for r in one_shot.rows
              if r["metric"] not in ("magnitude", "dense")]
    assert len(shared) == 8 and all(s["block_passes"] == 2 and s["needs"] == ["gram", "sum", "sumsq"] for s in shared)


@pytest.mark.parametrize("metric", ["wanda", "stade-w", "sparsegpt"])
def test_a_one_shot_cell_gives_the_very_same_result_as_with_its_own_passes(one_shot, tmp_path, metric):
    # a single cell shares with nobody
    summary = run_suite(one_shot.suite, leaderboard_dir=tmp_path / "alone", only=[f"metric={metric}", "pattern=2:4"])
    assert summary.finished == [cell_label(metric, "2:4")]
    row = [r for r in rows_of(tmp_path / "alone") if r["status"] == "ok"][0]
    details = json.loads(row["details"])["prune"]
    assert "shared_statistics" not in details and details["block_passes"] == 4  # stats + reconstruction, 2 blocks
    assert row["value"] == value_of(one_shot.rows, metric, "2:4")


def test_restore_drops_stade_biases_and_puts_back_dense_weights(assets, tmp_path, loads):
    from transformers import AutoModelForCausalLM

    from stadebench import prune
    from stadebench.core.models import iter_layers

    suite = load_tiny_suite(tmp_path, assets, metrics=["stade", "magnitude"], dense=False)
    summary = run_suite(suite)
    assert summary.finished == [cell_label("stade", "unstructured"), cell_label("magnitude", "unstructured")]
    stade = next(r for r in rows_of(tmp_path / "lb") if r["metric"] == "stade")
    assert json.loads(stade["details"])["prune"]["bias_added"] > 0, "STADE should have added biases"

    (model,) = loads.models
    assert all(layer.bias is None for _, _, layer in iter_layers(model)), "STADE's biases survived the restore"
    # the model now holds magnitude pruning of the dense checkpoint, not of STADE's result
    expected = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32)
    prune(expected, None, metric="magnitude", pattern="unstructured", sparsity=0.5, device="cpu")
    got, want = model.state_dict(), expected.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


# --- one load per model, re-runs, --force, --only -----------------------------------


def test_each_model_is_loaded_once(assets, tmp_path, loads):
    twin = tmp_path / "twin"
    shutil.copytree(assets["model"], twin)
    suite = load_tiny_suite(tmp_path, assets, metrics=["magnitude", "wanda"],
                       models=[{"id": str(assets["model"])}, {"id": str(twin)}])
    summary = run_suite(suite)
    assert len(summary.finished) == 6 and not summary.failed
    assert loads.ids == [str(assets["model"]), str(twin)]
    assert loads.from_pretrained == 2


def test_dense_is_evaluated_once_per_model_and_evaluation_config(assets, tmp_path, monkeypatch):
    from stadebench.evaluation.perplexity import Perplexity

    calls = []  # eval seqlen of every perplexity evaluation
    real = Perplexity.evaluate

    def evaluate(self, *args, **kwargs):
        calls.append(self.options.seqlen)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Perplexity, "evaluate", evaluate)
    base = suite_dict(assets, metrics=["wanda"])
    ppl8 = json.loads(json.dumps(base["evaluations"][0]))
    ppl8["options"]["seqlen"] = 8
    two_evals = [*base["evaluations"], ppl8]
    suite = load_tiny_suite(tmp_path, assets, metrics=["wanda"], evaluations=two_evals)
    summary = run_suite(suite)
    assert summary.finished == ["dense", cell_label("wanda", "unstructured")]
    assert sorted(calls) == [8, 8, 16, 16]  # 2 cells × 2 evaluations
    dense = [r for r in rows_of(tmp_path / "lb") if r["metric"] == "dense"]
    assert sorted(r["eval_seqlen"] for r in dense) == [8, 16]

    # another calibration: the pruned cell is new, the dense baseline does not depend on it
    calls.clear()
    other = load_tiny_suite(tmp_path, assets, file="other.yaml", metrics=["wanda"], evaluations=two_evals,
                       calibration={**base["calibration"], "n": 2})
    summary = run_suite(other)
    assert summary.skipped == 1 and summary.finished == [cell_label("wanda", "unstructured")]
    assert sorted(calls) == [8, 16]


@pytest.fixture
def small(assets, tmp_path):
    """A 3-cell suite (dense, magnitude, wanda) already run once."""
    suite = load_tiny_suite(tmp_path, assets)
    first = run_suite(suite)
    assert first.finished == ["dense", cell_label("magnitude", "unstructured"), cell_label("wanda", "unstructured")]
    return types.SimpleNamespace(suite=suite, folder=tmp_path / "lb", first=first)


def test_rerun_skips_every_finished_cell_without_loading_the_model(small, monkeypatch):
    files = parquet_files(small.folder)
    spy = LoadSpy(monkeypatch)
    events = Recorder()
    summary = run_suite(small.suite, events=events)
    assert (summary.cells, summary.skipped, summary.finished, summary.failed) == (3, 3, [], [])
    assert spy.ids == [] and spy.from_pretrained == 0
    assert events.planned == (0, 3) and events.started == []
    assert parquet_files(small.folder) == files


def test_a_run_moves_rows_left_superseded_by_a_killed_run_out_of_view(small):
    # A run killed between writing a cell's new file and moving the old one out leaves
    # both in view; the next run (here with nothing left to do) moves the old one out.
    old = parquet_files(small.folder)[0]
    stale = small.folder / ("0-" + old.name)
    stale.write_bytes(old.read_bytes())  # a duplicate of the same rows, as a crash can leave
    summary = run_suite(small.suite)
    assert summary.finished == [] and len(parquet_files(small.folder)) == 3
    assert len(parquet_files(small.folder / "_history")) == 1
    assert len(lb.read(small.folder)) == 3


def test_force_redoes_finished_cells(small):
    before = rows_of(small.folder)
    summary = run_suite(small.suite, force=True)
    assert summary.skipped == 0 and len(summary.finished) == 3
    # the folder holds the current view; the superseded files moved under _history/
    assert len(parquet_files(small.folder)) == 3
    assert len(parquet_files(small.folder / "_history")) == 3
    current = lb.current(lb.read(small.folder)).to_pylist()
    assert len(current) == 3 and {r["run_id"] for r in current} == {summary.run_id}
    assert summary.run_id != small.first.run_id
    for metric, pattern in [("dense", None), ("magnitude", "unstructured"), ("wanda", "unstructured")]:
        assert value_of(current, metric, pattern) == pytest.approx(value_of(before, metric, pattern), rel=1e-9)


def test_only_selects_cells_and_a_later_run_fills_in_the_rest(assets, tmp_path):
    suite = load_tiny_suite(tmp_path, assets)
    summary = run_suite(suite, only=["metric=wanda"])
    assert summary.cells == 1 and summary.finished == [cell_label("wanda", "unstructured")]
    assert {r["metric"] for r in rows_of(tmp_path / "lb")} == {"wanda"}

    summary = run_suite(suite, only=["dense"])  # a bare part of a label
    assert summary.finished == ["dense"]

    summary = run_suite(suite)
    assert summary.skipped == 2 and summary.finished == [cell_label("magnitude", "unstructured")]
    with pytest.raises(ConfigError, match="did you mean 'metric'"):
        run_suite(suite, only=["metrc=wanda"])


def test_an_interrupted_run_keeps_finished_cells_and_resumes(assets, tmp_path):
    suite = load_tiny_suite(tmp_path, assets)
    with pytest.raises(KeyboardInterrupt):
        run_suite(suite, events=Recorder(interrupt_at=3))
    assert {r["metric"] for r in rows_of(tmp_path / "lb")} == {"dense", "magnitude"}
    summary = run_suite(suite)
    assert summary.skipped == 2 and summary.finished == [cell_label("wanda", "unstructured")]


# --- failures ------------------------------------------------------------------------




def test_a_failing_cell_is_recorded_and_the_others_finish(assets, tmp_path, exploding):
    suite = load_tiny_suite(tmp_path, assets, metrics=["magnitude", "explode", "wanda"])
    events = Recorder()
    summary = run_suite(suite, events=events)
    bad = cell_label("explode", "unstructured")
    assert summary.finished == ["dense", cell_label("magnitude", "unstructured"), cell_label("wanda", "unstructured")]
    assert [label for label, _ in summary.failed] == [bad]
    assert summary.failed[0][1] == "metric 'explode' (explode-plugin): RuntimeError: boom in the score"
    assert (bad, "metric 'explode' (explode-plugin): RuntimeError: boom in the score") in events.ended

    rows = rows_of(tmp_path / "lb")
    (failed,) = [r for r in rows if r["status"] == "failed"]
    assert failed["metric"] == "explode" and failed["metric_version"] == "7" and failed["pattern"] == "unstructured"
    assert "boom in the score" in failed["error"] and failed["value"] is None
    assert failed["run_id"] == summary.run_id and failed["stadebench_version"] == stadebench.__version__
    assert all(r["status"] == "ok" and math.isfinite(r["value"]) for r in rows if r is not failed)
    # the failed cell did not leave the model half pruned for the next one
    alone = run_suite(suite, leaderboard_dir=tmp_path / "alone", only=["metric=wanda"])
    assert alone.finished == [cell_label("wanda", "unstructured")]
    assert value_of(rows_of(tmp_path / "alone"), "wanda", "unstructured") == \
        pytest.approx(value_of(rows, "wanda", "unstructured"), rel=1e-9)

    # a failed cell is not "finished": the next run retries it, and only it
    again = run_suite(suite)
    assert again.skipped == 3 and [label for label, _ in again.failed] == [bad]


def test_rows_name_the_plugin_that_registered_the_metric(assets, tmp_path, exploding):
    # `stadebench list metrics` attributes `explode` to the plugin `explode-plugin`; a row
    # must not claim that the stadebench distribution provided it.
    suite = load_tiny_suite(tmp_path, assets, metrics=["explode"], dense=False)
    run_suite(suite)
    (row,) = rows_of(tmp_path / "lb")
    assert row["metric_plugin"] == "explode-plugin"


def test_unwritable_leaderboard_is_detected_before_any_cell_runs(assets, tmp_path, loads):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, so nothing can be created below it\n")
    suite = load_tiny_suite(tmp_path, assets, leaderboard=blocker / "lb")
    events = Recorder()
    with pytest.raises(ConfigError, match="not writable") as info:
        run_suite(suite, events=events)
    assert str(blocker / "lb") in str(info.value)
    assert loads.ids == [] and events.planned is None and events.started == []


def test_a_model_that_fails_to_load_fails_its_cells_only(assets, tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()  # exists, so the suite validates, but holds no model
    suite = load_tiny_suite(tmp_path, assets, metrics=["magnitude"],
                       models=[{"id": str(broken)}, {"id": str(assets["model"])}])
    events = Recorder()
    summary = run_suite(suite, events=events)
    assert [label for label, _ in summary.failed] == ["dense", cell_label("magnitude", "unstructured")]
    assert all("could not load model" in message and str(broken) in message for _, message in summary.failed)
    assert summary.finished == ["dense", cell_label("magnitude", "unstructured")]
    assert [s[1:] for s in events.started] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    rows = rows_of(tmp_path / "lb")
    assert {(r["model"], r["status"]) for r in rows} == {(str(broken), "failed"), (str(assets["model"]), "ok")}
    assert all("could not load model" in r["error"] for r in rows if r["status"] == "failed")


def test_solver_cells_run_their_own_passes_when_gram_matrices_do_not_fit(assets, tmp_path, monkeypatch):
    import stadebench.runner.session as session
    import stadebench.core.engine as engine

    collected, pruned = [], []
    real_collect, real_prune = engine.collect_statistics, engine.prune
    monkeypatch.setattr(session, "_free_memory", lambda: 0)  # no room for any Gram matrix
    monkeypatch.setattr(engine, "collect_statistics",
                        lambda *a, **k: collected.append(sorted(a[2])) or real_collect(*a, **k))

    def prune(*args, **kwargs):
        report = real_prune(*args, **kwargs)
        pruned.append((report.metric, report.shared_statistics))
        return report

    monkeypatch.setattr(engine, "prune", prune)
    data = suite_dict(assets, metrics=["wanda", "stade", "sparsegpt"], patterns=["unstructured"])
    data["calibration"]["sequential"] = False
    suite = load_tiny_suite(tmp_path, assets, **{k: v for k, v in data.items() if k != "leaderboard"})
    summary = run_suite(suite)
    assert len(summary.finished) == 4 and not summary.failed
    assert collected == [["sum", "sumsq"]]  # shared by wanda and stade, without the Gram
    assert sorted(pruned) == [("sparsegpt", False), ("stade", True), ("wanda", True)]
