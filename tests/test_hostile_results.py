"""Hostile leaderboard folders and arguments, through the real `stadebench` executable in a
subprocess (issue #31, classes 1, 2 and 9):

- a damaged file (one readers skip) never displaces a good row in compaction, and is
  named once;
- a foreign file (another tool's, an old schema without ``created_at``) does not stop a
  run: it is skipped and named like the readers do, and the run's own rows are written;
- `diff`, `leaderboard show` and `leaderboard compare` cut very long arguments in their
  messages; `diagnose` names a model it cannot load and writes no rows for it; editing a
  saved model's card or other documentation leaves its identity (the cells' keys) alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tinymodel import shared_assets, suite_dict, write_suite

EXE = shutil.which("stadebench") or str(Path(sys.executable).with_name("stadebench"))
REPO = Path(__file__).resolve().parents[1]
LONG = "x" * 5000


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return shared_assets(tmp_path_factory)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = {**os.environ, "STADEBENCH_CACHE": str(tmp_path_factory.mktemp("cache")), "COLUMNS": "1000"}
    base.pop("STADEBENCH_DEBUG", None)
    return base


def stadebench(env: dict, *args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, env=env, timeout=300, cwd=cwd,
                          check=False)


def error_lines(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in done.stderr.splitlines() if line.startswith("error:")]


def refused(done: subprocess.CompletedProcess, *words: str) -> str:
    """Exit 2, one `error:` line holding ``words``, no traceback; returns the line."""
    assert done.returncode == 2, done.stderr
    errors = error_lines(done)
    assert len(errors) == 1, done.stderr
    for word in words:
        assert word in errors[0], errors[0]
    assert "Traceback" not in done.stderr
    return errors[0]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, assets, env):
    """A leaderboard of dense + magnitude on the tiny model, made by `stadebench run`."""
    root = tmp_path_factory.mktemp("baseline")
    suite = write_suite(root / "tiny.yaml", suite_dict(assets, metrics=["magnitude"], leaderboard=root / "lb"))
    done = stadebench(env, "run", suite, "--no-show")
    assert done.returncode == 0, done.stderr
    return root / "lb"


@pytest.fixture
def board(tmp_path, baseline):
    """A copy of the baseline leaderboard to spoil."""
    shutil.copytree(baseline, tmp_path / "lb")
    return tmp_path / "lb"


def dense_file(folder: Path) -> Path:
    return next(p for p in sorted(folder.glob("*.parquet")) if pq.read_table(p)["metric"][0].as_py() == "dense")


def skip_warnings(stderr: str, name: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning: skipping leaderboard file")
            and name in line]


# --- 1. a damaged file never displaces a good row -----------------------------------------


def test_a_damaged_file_never_displaces_a_good_row(tmp_path, assets, env, board):
    good = dense_file(board)
    table = pq.read_table(good)
    i = table.column_names.index("sparsity")
    damaged = table.set_column(i, pa.field("sparsity", pa.string()), pa.array(["none"] * len(table)))
    later = datetime.now(timezone.utc) + timedelta(hours=1)  # newer than the good row it duplicates
    i = damaged.column_names.index("created_at")
    damaged = damaged.set_column(i, damaged.schema.field(i), pa.array([later] * len(table),
                                                                      damaged.schema.field(i).type))
    bad = board / "damaged.parquet"
    pq.write_table(damaged.replace_schema_metadata(table.schema.metadata), bad)
    before = bad.read_bytes()

    suite = write_suite(tmp_path / "tiny.yaml", suite_dict(assets, metrics=["magnitude"], leaderboard=board))
    done = stadebench(env, "run", suite)  # a resumed run: every cell is done, then the board is shown
    assert done.returncode == 0, done.stderr
    assert "0 cell(s) ran, 2 skipped" in done.stderr
    assert len(skip_warnings(done.stderr, "damaged.parquet")) == 1, done.stderr  # named once
    assert good.exists() and bad.read_bytes() == before  # neither moved
    assert not list(board.glob("_history/*.parquet"))

    shown = stadebench(env, "leaderboard", "--dir", board, "--format", "json")
    assert shown.returncode == 0, shown.stderr
    rows = json.loads(shown.stdout)
    assert rows and all(r["dense"] is not None for r in rows), rows  # the dense baseline is still there
    assert len(skip_warnings(shown.stderr, "damaged.parquet")) == 1, shown.stderr


# --- 2. a foreign file does not stop a run ------------------------------------------------


def test_a_foreign_file_does_not_stop_a_run(tmp_path, assets, env, board):
    table = pq.read_table(dense_file(board))
    foreign = board / "foreign.parquet"  # another tool's: an old schema version, no created_at
    pq.write_table(table.drop_columns(["created_at"]).replace_schema_metadata(
        {"stadebench.schema_version": "3"}), foreign)
    before = foreign.read_bytes()

    suite = write_suite(tmp_path / "more.yaml", suite_dict(assets, metrics=["magnitude", "wanda"], leaderboard=board))
    done = stadebench(env, "run", suite)
    assert done.returncode == 0, done.stderr
    assert not error_lines(done), done.stderr
    assert "1 cell(s) ran, 2 skipped, 0 failed" in done.stderr
    assert len(skip_warnings(done.stderr, "foreign.parquet")) == 1, done.stderr
    assert foreign.read_bytes() == before  # left where it is, as it is

    shown = stadebench(env, "leaderboard", "--dir", board, "--format", "json")
    assert shown.returncode == 0, shown.stderr
    assert {r["metric"] for r in json.loads(shown.stdout)} == {"magnitude", "wanda"}  # the run's row is written
    assert len(skip_warnings(shown.stderr, "foreign.parquet")) == 1, shown.stderr


# --- 9. the rest of the new commands ---------------------------------------------------------


COMMANDS = {
    "leaderboard show": lambda board: ["leaderboard", "show", LONG, "--dir", board],
    "leaderboard compare": lambda board: ["leaderboard", "compare", LONG, "magnitude", "--dir", board],
    "diff": lambda board: ["diff", LONG, "magnitude", "--dir", board],
    "diff published file": lambda board: ["diff", f"published:{LONG}:1", "magnitude", "--dir", board,
                                          "--published", REPO / "published"],
    "diff published row": lambda board: ["diff", f"published:wanda-llama2:{LONG}", "magnitude", "--dir", board,
                                         "--published", REPO / "published"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_very_long_arguments_are_cut_in_messages(command, env, baseline, tmp_path):
    done = stadebench(env, *COMMANDS[command](baseline), cwd=tmp_path)
    line = refused(done, "x" * 40 + "…")
    assert LONG not in done.stderr and len(line) < 600, line
    assert done.stdout == ""


@pytest.mark.parametrize("command", ["leaderboard", "report"])
def test_a_path_no_file_system_takes_is_one_exit_2_line(command, env, tmp_path):
    path = tmp_path / ("x" * 5000)
    args = ["leaderboard", "--dir", path] if command == "leaderboard" else ["report", path, "-o", tmp_path / "out"]
    done = stadebench(env, *args, cwd=tmp_path)
    line = refused(done, "File name too long", "shorter path")
    assert str(path) not in done.stderr and len(line) < 300, line


def _diagnose(env: dict, model: Path, assets: dict, board: Path) -> subprocess.CompletedProcess:
    return stadebench(env, "diagnose", model, "--metrics", "magnitude", "--device", "cpu", "--leaderboard", board,
                      "--calibration", f"{assets['corpus']}:4x16", "--windows", "4x16", cwd=board.parent)


def _unknown_architecture(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "no-such-architecture"}))


def _no_tokenizer(folder: Path) -> None:
    for path in folder.glob("tokenizer*"):
        path.unlink()


@pytest.mark.parametrize("spoil", [_unknown_architecture, _no_tokenizer], ids=["unknown architecture",
                                                                               "no tokenizer"])
def test_diagnose_names_a_model_it_cannot_load_and_writes_no_rows(spoil, tmp_path, assets, env):
    model = tmp_path / "broken-model"
    shutil.copytree(assets["model"], model)
    spoil(model)
    board = tmp_path / "lb"
    done = _diagnose(env, model, assets, board)
    refused(done, "broken-model", "cannot load")
    assert not board.exists()  # nothing written, not even the folder


def test_editing_a_saved_models_card_keeps_its_identity(tmp_path, assets, env):
    saved, board = tmp_path / "saved", tmp_path / "lb"
    done = stadebench(env, "prune", assets["model"], "--metric", "magnitude", "--out", saved, "--device", "cpu",
                      "--calibration", f"{assets['corpus']}:4x16", "--eval", "none", "--leaderboard",
                      tmp_path / "prune-lb")
    assert done.returncode == 0, done.stderr
    assert (saved / "README.md").is_file() and (saved / "sparsity.json").is_file()
    suite = write_suite(tmp_path / "saved.yaml", suite_dict(assets, metrics=["magnitude"], leaderboard=board,
                                                            models=[{"id": str(saved)}]))
    first = stadebench(env, "run", suite, "--no-show")
    assert first.returncode == 0 and "2 cell(s) ran, 0 skipped" in first.stderr, first.stderr

    with open(saved / "README.md", "a", encoding="utf-8") as fh:  # the card, edited
        fh.write("\n## Notes\n\nEvaluated again on our own data.\n")
    (saved / "LICENSE").write_text("Apache-2.0\n")  # other documentation, added
    (saved / "USAGE.md").write_text("Load it with transformers.\n")
    again = stadebench(env, "run", suite, "--no-show")
    assert again.returncode == 0 and "0 cell(s) ran, 2 skipped" in again.stderr, again.stderr


def test_a_folder_without_documentation_keeps_its_fingerprint(baseline):
    """The tiny model has no card: the fingerprint `run` recorded for it is still sha256 over
    every file's name and content hash, as before documentation was left out."""
    def part(data: bytes) -> bytes:
        return len(data).to_bytes(8, "little") + data

    folder = Path(pq.read_table(dense_file(baseline))["model"][0].as_py())
    h = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        h.update(part(path.name.encode()) + part(hashlib.sha256(path.read_bytes()).hexdigest().encode()))
    prints = {r["model_fingerprint"] for r in pq.read_table(baseline).to_pylist()}
    assert prints == {h.hexdigest()[:32]}
