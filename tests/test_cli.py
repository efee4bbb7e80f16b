"""The `stadebench` command line: run/validate/schema/list/plugins/leaderboard/assets.

Results go to stdout, progress and errors to stderr; exit codes are ``ExitCode``. Most
tests drive the typer app in-process (``CliRunner``) on the tiny random Llama of
tests/tinymodel.py; a few run the real `stadebench` executable, and one (slow) runs the
real smoke suite on SmolLM2.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
from typer.testing import CliRunner

import stadebench
from stadebench.results import store as lb
from stadebench.results.paired import paired_bootstrap
from stadebench.cli import ExitCode, app
from stadebench.plugins import DEFAULT_PLUGINS
from tinymodel import shared_assets, suite_dict, write_suite

REPO = Path(__file__).resolve().parents[1]
WIDE = "1000"  # rich wraps at the console width; keep messages and tables on one line
CSV_HEADER = ["model", "metric", "task", "score", "column", "value", "stderr", "sd", "n", "dense", "relative"]


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    return shared_assets(tmp_path_factory)


def invoke(*args: str, cache: Path | None = None):
    """Run the CLI in-process; ``cache`` isolates the token cache."""
    env = {"COLUMNS": WIDE, "STADEBENCH_DEBUG": None}
    if cache is not None:
        env["STADEBENCH_CACHE"] = str(cache)
    return CliRunner().invoke(app, [str(a) for a in args], env=env, catch_exceptions=False)


def flat(text: str) -> str:
    return " ".join(text.split())


def parquet_count(folder: Path) -> int:
    return len(list(folder.glob("*.parquet"))) if folder.is_dir() else 0


# --- a leaderboard made by `stadebench run`, shared by the read-only tests ------------


@pytest.fixture(scope="module")
def board(tmp_path_factory, assets):
    """`run` three times over one leaderboard: first, again (all skipped), then --force."""
    root = tmp_path_factory.mktemp("cli-board")
    suite = write_suite(root / "tiny.yaml", suite_dict(assets, name="tiny", leaderboard=root / "unused"))
    folder, cache = root / "lb", root / "cache"
    first = invoke("run", suite, "--leaderboard", folder, cache=cache)
    files_after_first = parquet_count(folder)
    second = invoke("run", suite, "--leaderboard", folder, cache=cache)
    files_after_second = parquet_count(folder)
    forced = invoke("run", suite, "--leaderboard", folder, "--force", cache=cache)
    table = lb.read(folder)
    run_ids = sorted(set(lb.read(folder, history=True)["run_id"].to_pylist()))
    return types.SimpleNamespace(root=root, suite=suite, folder=folder, cache=cache, first=first, second=second,
                                 forced=forced, files=(files_after_first, files_after_second,
                                                       parquet_count(folder)),
                                 rows=lb.current(table).to_pylist(), run_ids=run_ids, model=str(assets["model"]))


def test_run_prints_the_table_on_stdout_and_progress_on_stderr(board):
    r = board.first
    assert r.exit_code == ExitCode.OK, r.output
    assert "text · ppl ↓" in r.stdout
    for text in ("magnitude", "wanda", "unstructured 0.5", "dense"):
        assert text in r.stdout
    # results only on stdout; progress and the summary only on stderr
    assert "cell(s) ran" not in r.stdout and "[1/3]" not in r.stdout
    assert "3 cell(s) ran, 0 skipped, 0 failed" in r.stderr
    for i, label in enumerate(["dense", "magnitude · unstructured · 0.5", "wanda · unstructured · 0.5"], 1):
        assert f"[{i}/3] {label} … ok" in r.stderr
    assert "ppl" not in r.stderr and "┃" not in r.stderr
    assert board.files[0] == 3


def test_second_run_skips_finished_cells(board):
    r = board.second
    assert r.exit_code == ExitCode.OK, r.output
    assert "3 cell(s) already in the leaderboard: skipped" in r.stderr
    assert "0 cell(s) ran, 3 skipped, 0 failed" in r.stderr
    assert board.files[1] == board.files[0]  # nothing written
    assert "text · ppl ↓" in r.stdout  # the leaderboard is still shown


def test_force_redoes_finished_cells(board):
    r = board.forced
    assert r.exit_code == ExitCode.OK, r.output
    assert "3 cell(s) ran, 0 skipped, 0 failed" in r.stderr
    assert board.files[2] == 3  # the current view; the superseded files moved under _history/
    assert parquet_count(board.folder / "_history") == 3
    assert len(board.run_ids) == 2 and len(set(lb.read(board.folder)["run_id"].to_pylist())) == 1


def test_history_lists_the_superseded_rows(board):
    r = invoke("leaderboard", "--dir", board.folder, "--history", "--format", "json")
    assert r.exit_code == ExitCode.OK, r.output
    rows = json.loads(r.stdout)
    assert len(rows) == 3 and {row["metric"] for row in rows} == {"dense", "magnitude", "wanda"}
    assert len({row["run_id"] for row in rows}) == 1
    current = set(lb.read(board.folder)["run_id"].to_pylist())
    assert {row["run_id"] for row in rows} == set(board.run_ids) - current  # the first run, superseded
    r = invoke("leaderboard", "--dir", board.folder, "--history")
    assert r.exit_code == ExitCode.OK and "superseded results" in r.stdout


def test_dry_run_lists_cells_and_runs_nothing(board, tmp_path):
    fresh = tmp_path / "lb"
    r = invoke("run", board.suite, "--dry-run", "--leaderboard", fresh)
    assert r.exit_code == ExitCode.OK, r.output
    assert "3 cell(s) to run, 0 already done" in r.stdout
    for label in ("dense", "magnitude · unstructured · 0.5", "wanda · unstructured · 0.5"):
        assert label in r.stdout
    assert parquet_count(fresh) == 0

    r = invoke("run", board.suite, "--dry-run", "--leaderboard", board.folder)
    assert r.exit_code == ExitCode.OK and "0 cell(s) to run, 3 already done" in r.stdout
    r = invoke("run", board.suite, "--dry-run", "--force", "--only", "metric=wanda", "--leaderboard", board.folder)
    assert r.exit_code == ExitCode.OK and "1 cell(s) to run" in r.stdout and "magnitude" not in r.stdout
    assert parquet_count(board.folder) == 3


# --- exit codes -----------------------------------------------------------------




def test_exit_code_1_when_a_cell_failed(assets, tmp_path, exploding):
    suite = write_suite(tmp_path / "s.yaml", suite_dict(assets, metrics=["magnitude", "explode"]))
    r = invoke("run", suite, "--leaderboard", tmp_path / "lb", cache=tmp_path / "cache")
    assert r.exit_code == ExitCode.CELLS_FAILED, r.output
    assert "2 cell(s) ran, 0 skipped, 1 failed" in r.stderr
    assert "failed: explode · unstructured · 0.5: metric 'explode' (explode-plugin): RuntimeError: boom in the score" in r.stderr
    assert "Traceback" not in r.output
    assert "magnitude" in r.stdout  # the finished cells are still shown
    assert "failed row(s) not shown" in r.stderr
    statuses = sorted(row["status"] for row in lb.read(tmp_path / "lb").to_pylist())
    assert statuses == ["failed", "ok", "ok"]


def test_exit_code_1_when_a_model_fails_to_load(assets, tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    suite = write_suite(tmp_path / "s.yaml", suite_dict(assets, metrics=["magnitude"],
                                                        models=[{"id": str(broken)}]))
    r = invoke("run", suite, "--leaderboard", tmp_path / "lb", cache=tmp_path / "cache")
    assert r.exit_code == ExitCode.CELLS_FAILED, r.output
    assert "could not load model" in r.stderr and "Traceback" not in r.output


def _typo(s):
    s["metrcs"] = s.pop("metrics")


def _unknown_metric(s):
    s["metrics"] = ["magnitude", "wandaa"]


def _sparsity_one_and_half(s):
    s["sparsities"] = [1.5]


def _nm_with_other_sparsity(s):
    s["patterns"], s["sparsities"] = ["2:4"], [0.6]


def _missing_model(s):
    s["models"] = [{"id": "/nonexistent/models/tiny"}]


BAD = {
    "typo": (_typo, "metrcs", ["unknown key 'metrcs'", "did you mean 'metrics'"]),
    "unknown-metric": (_unknown_metric, "metrics[1]", ["unknown metric 'wandaa'", "did you mean 'wanda'"]),
    "sparsity-1.5": (_sparsity_one_and_half, "sparsities[0]", ["less than 1", "1.5"]),
    "2:4-at-0.6": (_nm_with_other_sparsity, "sparsities[0]", ["'2:4'", "0.6"]),
    "missing-model": (_missing_model, "models[0].id", ["/nonexistent/models/tiny", "does not exist"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_suite_exits_2_naming_file_and_field(assets, tmp_path, case):
    edit, field, fragments = BAD[case]
    suite = suite_dict(assets, leaderboard=tmp_path / "suite-lb")
    edit(suite)
    path = write_suite(tmp_path / "bad.yaml", suite)
    folder = tmp_path / "lb"
    for command in (["run", path, "--leaderboard", folder], ["run", path], ["validate", path]):
        r = invoke(*command, cache=tmp_path / "cache")
        assert r.exit_code == ExitCode.USAGE, (command, r.output)
        message = flat(r.stderr)
        assert message.startswith(f"error: {path}:"), message
        assert f": {field}: " in message
        for fragment in fragments:
            assert fragment in message
        assert "Traceback" not in r.output and r.stdout == ""
    assert not folder.exists() and not (tmp_path / "suite-lb").exists()


def test_missing_suite_file_and_unknown_only_field_exit_2(board, tmp_path):
    r = invoke("run", tmp_path / "nope.yaml")
    assert r.exit_code == ExitCode.USAGE and "no such suite file" in r.stderr
    r = invoke("run", board.suite, "--only", "metrc=wanda", "--leaderboard", tmp_path / "lb")
    assert r.exit_code == ExitCode.USAGE and "did you mean 'metric'" in flat(r.stderr)
    assert "Traceback" not in r.output and parquet_count(tmp_path / "lb") == 0


def test_run_help_names_every_only_field():
    from stadebench.suite.schema import SELECT_FIELDS
    text = " ".join(invoke("run", "--help").stdout.replace("│", " ").split())
    assert [f for f in SELECT_FIELDS if f not in text] == []


def test_unwritable_leaderboard_exits_2_before_running(board, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x\n")
    r = invoke("run", board.suite, "--leaderboard", blocker / "lb", cache=tmp_path / "cache")
    assert r.exit_code == ExitCode.USAGE, r.output
    assert "not writable" in r.stderr and str(blocker / "lb") in r.stderr
    assert "[1/3]" not in r.stderr and "Traceback" not in r.output


@pytest.mark.parametrize("seqlen, short_text, fragment", [
    (128, False, "calibration.seqlen=128 is longer than the model's context (max_position_embeddings=64)"),
    (32, True, "cannot cut calibration windows"),  # two sentences: no document holds a 32-token window
])
def test_calibration_the_model_or_text_cannot_hold_exits_2_before_running(assets, tmp_path, seqlen, short_text,
                                                                          fragment):
    suite = suite_dict(assets, metrics=["wanda"])
    suite["calibration"]["seqlen"] = seqlen
    if short_text:
        (tmp_path / "short.txt").write_text("The river rose.\n\nThe mill stood.\n")
        suite["calibration"]["dataset"] = {"name": "text", "options": {"path": str(tmp_path / "short.txt")}}
    path = write_suite(tmp_path / "s.yaml", suite)
    r = invoke("run", path, "--leaderboard", tmp_path / "lb", cache=tmp_path / "cache")
    assert r.exit_code == ExitCode.USAGE, r.output
    assert fragment in flat(r.stderr) and "model" in r.stderr and "Traceback" not in r.output
    assert "[1/" not in r.stderr and parquet_count(tmp_path / "lb") == 0


def test_a_tokenizer_the_model_cannot_embed_exits_2_before_running(assets, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets["model"])
    tokenizer.add_tokens([f"extra{i}" for i in range(500)])
    tokenizer.save_pretrained(tmp_path / "big-tokenizer")
    suite = suite_dict(assets)
    suite["models"][0]["tokenizer"] = str(tmp_path / "big-tokenizer")
    path = write_suite(tmp_path / "s.yaml", suite)
    r = invoke("run", path, "--leaderboard", tmp_path / "lb", cache=tmp_path / "cache")
    assert r.exit_code == ExitCode.USAGE, r.output
    assert "but the model embeds only" in flat(r.stderr) and "Traceback" not in r.output
    assert parquet_count(tmp_path / "lb") == 0


def test_a_pattern_the_layer_widths_cannot_take_exits_2_before_running(assets, tmp_path):
    # The tiny model's widths are 32 and 64: no multiple of 7.
    suite = suite_dict(assets, metrics=["magnitude"], patterns=["3:7"])
    del suite["sparsities"]  # N:M implies its own
    path = write_suite(tmp_path / "s.yaml", suite)
    r = invoke("run", path, "--leaderboard", tmp_path / "lb", cache=tmp_path / "cache")
    assert r.exit_code == ExitCode.USAGE, r.output
    assert "needs the input width to be a multiple of 7" in flat(r.stderr) and "layer self_attn.o_proj [32, 32]" in r.stderr
    assert "[1/" not in r.stderr and parquet_count(tmp_path / "lb") == 0


# --- validate, schema, list, plugins ---------------------------------------------


def test_validate_ok(board):
    r = invoke("validate", board.suite)
    assert r.exit_code == ExitCode.OK, r.output
    assert flat(r.stdout) == f"{board.suite}: ok — 3 cell(s) over 1 model(s), 1 evaluation(s) each"


def test_schema_is_json_schema_of_a_suite():
    r = invoke("schema")
    assert r.exit_code == ExitCode.OK and r.stderr == ""
    schema = json.loads(r.stdout)
    assert "$schema" in schema
    for key in ("models", "metrics", "patterns", "sparsities", "calibration", "evaluations"):
        assert key in schema["properties"]
    assert "models" in schema["required"]


BUILT_INS = {
    "metrics": {"magnitude", "random", "wanda", "stade", "stade-w", "sparsegpt", "gblm", "pruner-zero"},
    "patterns": {"unstructured", "unstructured-layer", "N:M"},
    "allocators": {"uniform", "owl"},
    "datasets": {"wikitext2", "c4", "text", "enwiki-2016"},
    "evaluators": {"perplexity", "speed", "diagnostics", "fidelity"},
}


@pytest.mark.parametrize("kind", list(BUILT_INS))
def test_list_shows_each_item_with_plugin_and_version(kind):
    r = invoke("list", kind, "--format", "json")
    assert r.exit_code == ExitCode.OK, r.output
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert BUILT_INS[kind] <= set(rows)
    for name in BUILT_INS[kind]:
        row = rows[name]
        assert row["plugin"] == "stadebench" and row["plugin_version"] == stadebench.__version__
        assert row["version"] and row["description"]
    if kind == "metrics":
        assert rows["wanda"]["statistics"] == "sumsq" and rows["magnitude"]["statistics"] == ""
        assert "bias_correction" in rows["stade"]["options"]

    r = invoke("list", kind)
    assert r.exit_code == ExitCode.OK
    lines = r.stdout.splitlines()
    for name in BUILT_INS[kind]:
        line = next((ln for ln in lines if f"│ {name} " in ln), None)
        assert line is not None, name
        assert f"stadebench {stadebench.__version__}" in line


def test_list_unknown_kind_is_a_usage_error():
    r = invoke("list", "metricz")
    assert r.exit_code == ExitCode.USAGE


def test_plugins_lists_the_built_ins():
    r = invoke("plugins", "--format", "json")
    assert r.exit_code == ExitCode.OK, r.output
    rows = {row["plugin"]: row for row in json.loads(r.stdout)}
    assert set(DEFAULT_PLUGINS) <= set(rows)
    for name in DEFAULT_PLUGINS:
        assert rows[name]["distribution"] == "stadebench"
        assert rows[name]["version"] == stadebench.__version__
        assert rows[name]["problem"] is None and rows[name]["registered"]
    assert "metric wanda" in rows["stadebench.core.metrics.basic"]["registered"]
    assert "evaluator perplexity" in rows["stadebench.evaluation.perplexity"]["registered"]
    r = invoke("plugins")
    assert r.exit_code == ExitCode.OK
    assert all(name in r.stdout for name in DEFAULT_PLUGINS)


# --- leaderboard -------------------------------------------------------------------


def _value(rows, metric, pattern="unstructured"):
    (value,) = [r["value"] for r in rows if r["metric"] == metric and r["pattern"] == pattern]
    return value


def test_leaderboard_table(board):
    r = invoke("leaderboard", "--dir", board.folder)
    assert r.exit_code == ExitCode.OK, r.output
    assert "text · ppl ↓" in r.stdout
    header = next(ln for ln in r.stdout.splitlines() if "unstructured 0.5" in ln)
    assert [c.strip() for c in header.strip("┃ ").split("┃")] == ["model", "metric", "dense", "unstructured 0.5"]
    for metric in ("magnitude", "wanda"):
        line = next(ln for ln in r.stdout.splitlines() if f"│ {metric} " in ln)
        assert board.model in line and f"{_value(board.rows, metric):.4g}" in line
        assert f"{_value(board.rows, 'dense', None):.4g}" in line


def test_leaderboard_json_matches_the_parquet_rows(board):
    r = invoke("leaderboard", "--dir", board.folder, "--long", "--format", "json")
    assert r.exit_code == ExitCode.OK, r.output
    rows = json.loads(r.stdout)
    assert sorted(row["metric"] for row in rows) == ["magnitude", "wanda"]
    dense = _value(board.rows, "dense", None)
    for row in rows:
        assert row["model"] == board.model and row["task"] == "text" and row["score"] == "ppl"
        assert row["column"] == "unstructured 0.5"
        assert row["value"] == pytest.approx(_value(board.rows, row["metric"]), rel=1e-12)
        assert row["dense"] == pytest.approx(dense, rel=1e-12)
        assert row["relative"] == pytest.approx(row["value"] / dense - 1, rel=1e-9)


def test_leaderboard_long_csv_is_the_tidy_rows(board):
    r = invoke("leaderboard", "--dir", board.folder, "--long", "--format", "csv")
    assert r.exit_code == ExitCode.OK, r.output
    parsed = list(csv.DictReader(io.StringIO(r.stdout)))
    assert r.stdout.splitlines()[0].split(",") == CSV_HEADER
    assert sorted(row["metric"] for row in parsed) == ["magnitude", "wanda"]
    assert float(next(row for row in parsed if row["metric"] == "wanda")["value"]) == \
        pytest.approx(_value(board.rows, "wanda"), rel=1e-12)


def test_leaderboard_exports_are_the_table_shown(board):
    wanda, dense = _value(board.rows, "wanda"), _value(board.rows, "dense", None)
    r = invoke("leaderboard", "--dir", board.folder, "--format", "markdown", "--precision", "3")
    assert r.exit_code == ExitCode.OK, r.output
    lines = r.stdout.splitlines()
    assert lines[0] == "**text · ppl ↓**" and lines[2] == "| model | metric | dense | unstructured 0.5 |"
    assert lines[3] == "|---|---|---:|---:|" and len(lines) == 6
    row = next(ln for ln in lines if "| wanda |" in ln)
    items = {m: next(r["items"] for r in board.rows if r["metric"] == m) for m in ("wanda", "dense")}
    noise = not paired_bootstrap({None: items["wanda"]}, {None: items["dense"]}, "exp_mean").detectable()
    assert f"| {dense:.3g} | {wanda:.3g} ({'~' if noise else ''}{wanda / dense - 1:+.0%}) |" in row

    r = invoke("leaderboard", "--dir", board.folder, "--format", "latex")
    assert r.exit_code == ExitCode.OK, r.output
    assert "\\begin{tabular}{llrr}" in r.stdout and "model & metric & dense & unstructured 0.5 \\\\" in r.stdout
    assert r.stdout.count("\\\\") == 3  # header and two rows

    r = invoke("leaderboard", "--dir", board.folder, "--format", "csv", "--precision", "5")
    assert r.exit_code == ExitCode.OK, r.output
    parsed = {row["metric"]: row for row in csv.DictReader(io.StringIO(r.stdout))}
    assert float(parsed["wanda"]["unstructured 0.5"]) == float(f"{wanda:.5g}")
    assert float(parsed["wanda"]["unstructured 0.5 Δ"]) == pytest.approx(wanda / dense - 1, abs=1e-4)


@pytest.mark.parametrize(("option", "match"), [
    ("--suite", "tiny"), ("--model", None), ("--task", "text"),
])
def test_leaderboard_filters(board, option, match):
    match = match or board.model
    r = invoke("leaderboard", "--dir", board.folder, option, match, "--format", "json")
    assert r.exit_code == ExitCode.OK, r.output
    assert len(json.loads(r.stdout)) == 2
    r = invoke("leaderboard", "--dir", board.folder, option, "nothing-like-this", "--format", "json")
    assert r.exit_code == ExitCode.USAGE and r.stdout == ""
    assert f"no results in {board.folder} for {option} nothing-like-this; it holds suites: tiny" in flat(r.stderr)


@pytest.mark.parametrize(("option", "value", "metrics"), [
    ("--metric", "wanda", ["wanda"]), ("--pattern", "unstructured", ["magnitude", "wanda"]),
    ("--sparsity", "0.5", ["magnitude", "wanda"]),
])
def test_leaderboard_metric_pattern_sparsity_filters_keep_the_dense_baseline(board, option, value, metrics):
    r = invoke("leaderboard", "--dir", board.folder, option, value, "--format", "json")
    assert r.exit_code == ExitCode.OK, r.output
    rows = json.loads(r.stdout)
    assert sorted(row["metric"] for row in rows) == metrics
    assert all(row["dense"] == pytest.approx(_value(board.rows, "dense", None), rel=1e-3) for row in rows)


def test_leaderboard_compare_metrics_side_by_side(board):
    r = invoke("leaderboard", "compare", "wanda", "magnitude", "--dir", board.folder, "--format", "json")
    assert r.exit_code == ExitCode.OK, r.output
    (row,) = json.loads(r.stdout)
    wanda, magnitude = _value(board.rows, "wanda"), _value(board.rows, "magnitude")
    assert (row["pattern"], row["sparsity"], row["task"], row["score"]) == ("unstructured", 0.5, "text", "ppl")
    assert row["wanda"] == pytest.approx(wanda, rel=1e-12)
    assert row["magnitude"] == pytest.approx(magnitude, rel=1e-12)
    assert row["delta"] == pytest.approx(magnitude - wanda, rel=1e-9)
    # the verdict is the paired bootstrap's over the windows both cells were evaluated on
    items = {m: next(r["items"] for r in board.rows if r["metric"] == m and r["score"] == "ppl")
             for m in ("wanda", "magnitude")}
    interval = paired_bootstrap({None: items["magnitude"]}, {None: items["wanda"]}, "exp_mean")
    assert (row["ci_low"], row["ci_high"], row["items"], row["seeds"]) == (interval.low, interval.high, 4, 1)
    assert row["ci_low"] <= row["delta"] <= row["ci_high"]
    expected = "~" if not interval.detectable() else "wanda" if wanda < magnitude else "magnitude"
    assert row["better"] == expected  # perplexity: lower is better
    assert row["evaluation"] == "perplexity(text, test, seqlen=16)" and row["allocation"] == "uniform"

    r = invoke("leaderboard", "compare", "wanda", "magnitude", "--dir", board.folder)
    assert r.exit_code == ExitCode.OK, r.output
    assert "wanda vs magnitude" in r.stdout
    header = next(ln for ln in r.stdout.splitlines() if "delta" in ln)
    assert header.index("wanda") < header.index("magnitude") < header.index("delta")

    r = invoke("leaderboard", "compare", "wanda", "nope", "--dir", board.folder)
    assert r.exit_code == ExitCode.USAGE and "no results with metric = 'nope'" in r.stderr
    r = invoke("leaderboard", "compare", "wandaa", "magnitude", "--dir", board.folder)
    assert r.exit_code == ExitCode.USAGE and "did you mean 'wanda'?" in flat(r.stderr)
    assert "metrics: dense, magnitude, wanda" in flat(r.stderr)


def test_leaderboard_compare_two_runs(board):
    first, forced = board.run_ids
    r = invoke("leaderboard", "compare", first, forced, "--by", "run", "--dir", board.folder,
               "--format", "json")
    assert r.exit_code == ExitCode.OK, r.output
    rows = json.loads(r.stdout)
    assert sorted(row["metric"] for row in rows) == ["dense", "magnitude", "wanda"]
    for row in rows:
        assert row[first] == pytest.approx(row[forced], rel=1e-9)  # the same cells, deterministic
        assert row["delta"] == pytest.approx(0.0, abs=1e-6)

    r = invoke("leaderboard", "compare", first, forced, "--by", "run", "--dir", board.folder)
    assert r.exit_code == ExitCode.OK, r.output
    assert f"{first} vs {forced}" in r.stdout


def test_assets_list_shows_smollm2_cached():
    from stadebench.data import assets

    assets.fetch("smollm2-135m")  # a no-op when cached; the slow smoke test needs it anyway
    r = invoke("assets", "list", "--format", "json")
    assert r.exit_code == ExitCode.OK, r.output
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert rows["smollm2-135m"]["cached"] is True and rows["smollm2-135m"]["kind"] == "model"


# --- the real executable --------------------------------------------------------


def _stadebench(*args, cache: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("stadebench") or str(Path(sys.executable).with_name("stadebench"))
    env = {**os.environ, "STADEBENCH_CACHE": str(cache), "COLUMNS": WIDE}
    env.pop("STADEBENCH_DEBUG", None)
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


def test_executable_separates_stdout_and_stderr_and_sets_exit_codes(assets, tmp_path):
    folder = tmp_path / "lb"
    suite = write_suite(tmp_path / "tiny.yaml", suite_dict(assets, metrics=["wanda"]))
    done = _stadebench("run", suite, "--leaderboard", folder, cache=tmp_path / "cache")
    assert done.returncode == 0, done.stderr
    assert "text · ppl ↓" in done.stdout and "wanda" in done.stdout
    assert "cell(s) ran" not in done.stdout and "[1/2]" not in done.stdout
    assert "2 cell(s) ran, 0 skipped, 0 failed" in done.stderr
    assert "[2/2] wanda · unstructured · 0.5 … ok" in done.stderr
    assert "ppl" not in done.stderr

    bad = suite_dict(assets, metrics=["wanda"])
    bad["metrcs"] = bad.pop("metrics")
    path = write_suite(tmp_path / "bad.yaml", bad)
    done = _stadebench("run", path, "--leaderboard", tmp_path / "lb2", cache=tmp_path / "cache")
    assert done.returncode == 2
    assert done.stdout == ""
    assert flat(done.stderr).startswith(f"error: {path}:") and "metrcs" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "lb2").exists()


# --- the real smoke suite -----------------------------------------------------------


@pytest.mark.slow
def test_smoke_suite_on_smollm2_wanda_beats_magnitude(tmp_path):
    suite, folder = REPO / "suites" / "smoke.yaml", tmp_path / "lb"
    # 50% unstructured only: the comparison the STADE/Wanda papers lead with, in 2 cells
    only = ["--only", "metric=magnitude,wanda", "--only", "pattern=unstructured", "--leaderboard", folder]
    r = invoke("run", suite, *only)  # the default cache: SmolLM2 lives there
    assert r.exit_code == ExitCode.OK, r.output
    assert "2 cell(s) ran, 0 skipped, 0 failed" in r.stderr

    header = next(ln for ln in r.stdout.splitlines() if "unstructured 0.5" in ln)
    columns = [c.strip() for c in header.strip("┃ ").split("┃")]
    assert columns == ["model", "metric", "dense", "unstructured 0.5"]
    ppl = {}
    for line in r.stdout.splitlines():
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        if len(cells) == len(columns) and cells[1] in ("magnitude", "wanda"):
            assert cells[0] == "smollm2-135m"
            # "12.34 (+56%)": the value, then its change from dense when dense ran
            ppl[cells[1]] = float(cells[columns.index("unstructured 0.5")].split()[0])
    assert set(ppl) == {"magnitude", "wanda"}
    assert ppl["wanda"] < ppl["magnitude"]
    rows = lb.read(folder).to_pylist()
    assert _value(rows, "wanda") < _value(rows, "magnitude")
    assert ppl == {m: pytest.approx(_value(rows, m), rel=1e-3) for m in ppl}

    again = invoke("run", suite, *only)
    assert again.exit_code == ExitCode.OK, again.output
    assert "2 cell(s) already in the leaderboard: skipped" in again.stderr
    assert "0 cell(s) ran, 2 skipped, 0 failed" in again.stderr
    assert len(list(folder.glob("*.parquet"))) == 2


SHIPPED = sorted((REPO / "suites").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_suite_validates_with_the_cells_it_states(path):
    """`stadebench validate` passes every suite in suites/ (names and options only, no model
    is fetched), and a header that says "N cells" says what the suite expands to."""
    r = invoke("validate", path)
    assert r.exit_code == ExitCode.OK, r.output
    cells = int(re.search(r"ok — (\d+) cell", r.stdout).group(1))
    header = path.read_text(encoding="utf-8").split("\nname:")[0]
    for stated in re.findall(r"(?<![\w-])(\d+) cells\b", header):  # not "seed-0 cells"
        assert int(stated) == cells, f"{path.name} says {stated} cells, validates to {cells}"
