"""Faults at run time, through the real `stadebench` executable in subprocesses on the tiny
model: untrusted text reaching the terminal, damaged files we read, plugins that
misbehave, and an environment that cannot hold the cache.

Every case checks the exit code, what is said (one `error:` line naming the culprit, or
the failed cell naming the plugin), that no traceback is printed, that nothing is written
outside the leaderboard and the cache, and that the rows saved before are still there,
unchanged.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from stadebench.results import store as lb
from tinymodel import shared_assets, suite_dict, write_suite

EXE = shutil.which("stadebench") or str(Path(sys.executable).with_name("stadebench"))
PLUGIN = Path(__file__).parent / "hostile_plugin" / "stadebench_hostile.py"
RAW_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # what must never reach the terminal raw


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return shared_assets(tmp_path_factory)


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory):
    """A folder on PYTHONPATH that holds the hostile plugin as an installed distribution,
    and a second one whose module calls sys.exit when it is imported."""
    root = tmp_path_factory.mktemp("site")
    shutil.copy(PLUGIN, root / PLUGIN.name)
    (root / "stadebench_exit_on_import.py").write_text("import sys\nsys.exit(3)\n")
    for dist, entry in (("stadebench_hostile-1.0", "hostile = stadebench_hostile"),
                        ("stadebench_exit_on_import-0.1", "exit-on-import = stadebench_exit_on_import")):
        info = root / f"{dist}.dist-info"
        info.mkdir()
        name, version = dist.rsplit("-", 1)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\n"
                                       f"Version: {version}\n")
        (info / "entry_points.txt").write_text(f"[stadebench]\n{entry}\n")
    return root


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, assets, plugin_path):
    """A leaderboard holding a finished run of the tiny suite (dense + magnitude), made once."""
    root = tmp_path_factory.mktemp("baseline")
    world = World(root / "work", _env(root, plugin_path), assets)
    world.work.mkdir()
    done = world.run("run", world.suite("before.yaml", metrics=["magnitude"]), "--no-show")
    assert done.returncode == 0, done.stderr
    return world.boards


def _env(root: Path, plugin_path: Path) -> dict:
    env = {**os.environ, "COLUMNS": "200", "STADEBENCH_CACHE": str(root / "cache"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(plugin_path), os.environ.get("PYTHONPATH")])),
           "HOSTILE_MARKER": str(root / "cache" / "in-plugin")}
    env.pop("STADEBENCH_DEBUG", None)
    return env


@pytest.fixture
def world(tmp_path, assets, plugin_path, baseline):
    """A working folder with its own cache, the plugin installed, and a copy of the baseline
    leaderboard: the rows no fault may touch."""
    world = World(tmp_path / "work", _env(tmp_path, plugin_path), assets)
    world.work.mkdir()
    (tmp_path / "cache").mkdir()
    shutil.copytree(baseline, world.boards)
    world.saved = world.rows()
    world.files = world.outside()
    return world


class World:
    def __init__(self, work: Path, env: dict, assets: dict):
        self.work, self.env, self.assets = work, env, assets
        self.boards = work / "boards"  # every leaderboard a test makes lives here
        self.board = self.boards / "lb"

    def suite(self, name: str, **kwargs) -> Path:
        kwargs.setdefault("leaderboard", self.board)
        return write_suite(self.work / name, suite_dict(self.assets, **kwargs))

    def run(self, *args, env: dict | None = None, **popen) -> subprocess.CompletedProcess:
        return subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, cwd=self.work,
                              env={**self.env, **(env or {})}, timeout=300, **popen)

    def rows(self) -> dict[tuple, tuple]:
        with warnings.catch_warnings():  # damaged files are the point of some tests
            warnings.simplefilter("ignore", lb.LeaderboardWarning)
            table = lb.read(self.board, history=True)
        return {(r["cell_key"], r["task"], r["score"], r["created_at"]): (r["value"], r["status"], r["run_id"])
                for r in table.to_pylist()}

    def outside(self) -> set[Path]:
        """Every file in the working folder outside the leaderboard."""
        return {p for p in self.work.rglob("*") if p.is_file() and self.boards not in p.parents}

    def check(self, done: subprocess.CompletedProcess, code: int, *words: str, error_line: bool = True) -> None:
        """Exit ``code``; with ``error_line`` exactly one ``error:`` line, holding ``words``;
        no traceback, nothing raw on the terminal, no file written outside the leaderboard
        and the suites, every row saved before still there and unchanged."""
        assert done.returncode == code, done.stderr
        assert "Traceback" not in done.stderr + done.stdout
        assert not RAW_CONTROL.search(done.stderr.replace("\n", "") + done.stdout.replace("\n", "")), done.stderr
        if error_line:
            errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
            assert len(errors) == 1, done.stderr
            for word in words:
                assert word in errors[0], errors[0]
        new = {p for p in self.outside() - self.files if p.suffix != ".yaml"}
        assert not new, new
        rows = self.rows()
        assert {k: rows.get(k) for k in self.saved} == self.saved


def failed_cells(board: Path) -> dict[str, str]:
    return {r["metric"]: r["error"] for r in lb.current(lb.read(board)).to_pylist() if r["status"] == "failed"}


def ok_metrics(board: Path) -> set[str]:
    return {r["metric"] for r in lb.current(lb.read(board)).to_pylist() if r["status"] == "ok"}


# --- untrusted text reaching the terminal ----------------------------------------------


def test_markup_and_escapes_in_a_metric_label_are_printed_as_plain_text(world):
    label = "mag[/]\x1b[2J\x07[bold]"
    done = world.run("run", world.suite("label.yaml", metrics=[{"name": "magnitude", "label": label}]), "--force")
    world.check(done, 0, error_line=False)
    assert "mag[/]\\x1b[2J\\x07[bold]" in done.stderr  # the progress line shows it, escaped
    shown = world.run("leaderboard", "--dir", world.board)
    world.check(shown, 0, error_line=False)


def test_a_model_folder_with_markup_in_its_name_runs_and_is_shown(world, tmp_path):
    folder = tmp_path / "m[/]x" / "tiny[red]"
    shutil.copytree(world.assets["model"], folder)
    suite = write_suite(world.work / "path.yaml", {**suite_dict(world.assets, leaderboard=world.board),
                                                   "models": [{"id": str(folder)}]})
    done = world.run("run", suite)
    world.check(done, 0, error_line=False)
    assert f"{folder}" in done.stdout


def test_control_characters_stored_in_a_shared_leaderboard_never_reach_the_terminal(world):
    table = lb.read(world.board)
    hostile = "org/\x1b]0;owned\x07model\x9b31m\u202e[/]"
    columns = {n: table[n] for n in table.column_names}
    columns["model"] = pa.array([hostile] * table.num_rows)
    columns["error"] = pa.array(["\x1b[2J[/] wiped"] * table.num_rows)
    columns["cell_key"] = pa.array([f"{i:064x}" for i in range(table.num_rows)])
    shared = pa.Table.from_pydict(columns, schema=table.schema)
    pq.write_table(shared.replace_schema_metadata(lb.SCHEMA.metadata), world.board / "shared.parquet")
    for fmt in ("table", "markdown", "csv", "json"):
        done = world.run("leaderboard", "--dir", world.board, "--format", fmt)
        world.check(done, 0, error_line=False)
        assert "owned" in done.stdout
    assert "\\x1b]0;owned\\x07model\\x9b31m\\u202e[/]" in world.run("leaderboard", "--dir", world.board).stdout


def test_an_error_message_with_markup_and_escapes_is_shown_escaped(world):
    suite = world.suite("shout.yaml", evaluations=[{"name": "shouting"}], dense=True, metrics=["magnitude"])
    done = world.run("run", suite, "--no-show", "--force")
    world.check(done, 1, error_line=False)
    shown = "evaluator 'shouting' (stadebench-hostile 1.0): ValueError: [/] [bold]closed\\x1b]0;owned\\x07"
    assert shown in done.stderr


# --- damaged files we read ------------------------------------------------------------


def _token_files(world) -> list[Path]:
    return sorted((Path(world.env["STADEBENCH_CACHE"]) / "tokens").glob("*.pt"))


def _damage(path: Path, how: str) -> None:
    if how == "garbage":
        path.write_bytes(b"\x00not a torch file")
        return
    blob = torch.load(path, weights_only=True)
    blob["ids"] = blob["ids"][:-3] if how == "wrong length" else blob["ids"].flip(0)
    torch.save(blob, path)


def test_a_damaged_token_cache_entry_is_rebuilt_with_a_warning(world):
    suite = world.suite("wanda.yaml", metrics=["wanda"], leaderboard=world.boards / "first")
    assert world.run("run", suite, "--no-show").returncode == 0
    first = {r["metric"]: r["value"] for r in lb.read(world.boards / "first").to_pylist()}
    files = _token_files(world)
    assert [p.name.split("-")[0] for p in files] == ["stream", "windows"]
    # wrong length, not a torch file, another entry's ids (right length, wrong content)
    for damage in (("wrong length", "garbage"), ("another entry's ids", "wrong length"), ("garbage", "garbage")):
        for path, how in zip(files, damage, strict=True):
            _damage(path, how)
        again = world.run("run", suite, "--no-show", "--leaderboard", world.board, "--force")
        world.check(again, 0, error_line=False)
        warned = [line for line in again.stderr.splitlines() if line.startswith("warning: token cache file")]
        assert {Path(line.split()[4]) for line in warned} == set(files), damage
        assert {r["metric"]: r["value"] for r in lb.current(lb.read(world.board)).to_pylist()
                if r["run_id"] not in {v[2] for v in world.saved.values()}} == first
        world.saved = world.rows()  # the rows this run saved must survive the next one too


def _gguf(path: Path) -> bytes:
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def _unsafe_bin(folder: Path) -> None:
    import argparse

    from safetensors.torch import load_file

    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save({**weights, "extra": argparse.Namespace(trusted=False)}, folder / "pytorch_model.bin")


def _truncated_safetensors(folder: Path) -> None:
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:-1000])


@pytest.mark.parametrize("damage", ["truncated GGUF", "GGUF cut in its header", "pickle with a class",
                                    "truncated safetensors"])
def test_damaged_weights_are_named_before_any_cell_runs(world, tmp_path, damage):
    folder = tmp_path / "model"
    if "GGUF" in damage:
        folder.mkdir()
        data = _gguf(tmp_path / "whole.gguf")
        bad = folder / "m.gguf"
        bad.write_bytes(data[: len(data) // 2] if damage == "truncated GGUF" else data[:40])
        model, words = {"id": str(bad), "tokenizer": str(world.assets["model"])}, (str(bad), "truncated")
    else:
        shutil.copytree(world.assets["model"], folder)
        if damage == "pickle with a class":
            _unsafe_bin(folder)
            words = ("refused", str(folder / "pytorch_model.bin"), "argparse.Namespace", "weights_only=True")
        else:
            _truncated_safetensors(folder)
            words = (str(folder / "model.safetensors"), "truncated")
        model = {"id": str(folder)}
    suite = write_suite(world.work / "weights.yaml", {**suite_dict(world.assets, leaderboard=world.board),
                                                      "models": [model]})
    for command in ("validate", "run"):
        world.check(world.run(command, suite), 2, "models[0]", *words)


@pytest.mark.filterwarnings("ignore::stadebench.results.store.LeaderboardWarning")
def test_damaged_leaderboard_files_are_skipped_by_name_and_the_good_rows_shown(world):
    good = sorted(world.board.glob("*.parquet"))[0]
    table = pq.read_table(good)
    pq.write_table(table.drop_columns(["created_at", "status"]).replace_schema_metadata(table.schema.metadata),
                   world.board / "partial.parquet")
    status = table.set_column(table.column_names.index("status"), "status", pa.array(["done"] * len(table)))
    pq.write_table(status.replace_schema_metadata(table.schema.metadata), world.board / "status.parquet")
    (world.board / "junk.parquet").write_bytes(b"PAR1 not really")
    shown = world.run("leaderboard", "--dir", world.board)
    world.check(shown, 0, error_line=False)
    for name in ("partial", "status", "junk"):
        assert any(line.startswith("warning: skipping leaderboard file") and f"{name}.parquet" in line
                   for line in shown.stderr.splitlines()), shown.stderr
    assert "magnitude" in shown.stdout
    # a run beside them neither trips on them nor touches them
    before = {p: p.read_bytes() for p in world.board.glob("*.parquet") if p.stem in ("partial", "status", "junk")}
    done = world.run("run", world.suite("more.yaml", metrics=["magnitude", "wanda"]), "--no-show")
    world.check(done, 0, error_line=False)
    assert {p: p.read_bytes() for p in before} == before
    assert ok_metrics(world.board) == {"dense", "magnitude", "wanda"}


# --- plugins that misbehave -------------------------------------------------------------


@pytest.mark.parametrize(("metric", "raised"), [("exit-zero", "SystemExit(0)"),
                                                ("fake-interrupt", "KeyboardInterrupt")])
def test_a_metric_that_exits_or_interrupts_fails_its_cell_and_the_grid_goes_on(world, metric, raised):
    suite = world.suite("bad-metric.yaml", metrics=[metric, "magnitude", "wanda"])
    done = world.run("run", suite, "--no-show", "--force")
    world.check(done, 1, error_line=False)
    assert failed_cells(world.board) == {metric: failed_cells(world.board)[metric]}
    assert failed_cells(world.board)[metric].startswith(f"metric {metric!r} (stadebench-hostile 1.0): {raised}")
    assert ok_metrics(world.board) == {"dense", "magnitude", "wanda"}
    assert f"failed: {metric} · unstructured · 0.5: metric {metric!r}" in done.stderr


@pytest.mark.parametrize(("evaluator", "words"), [("set-details", "details that cannot be stored"),
                                                  ("text-value", "'high', not a number")])
def test_an_evaluator_returning_what_a_row_cannot_hold_fails_the_cell_not_the_run(world, evaluator, words):
    suite = world.suite("bad-eval.yaml", evaluations=[{"name": evaluator}], metrics=["magnitude"],
                        leaderboard=world.boards / "bad-eval")
    done = world.run("run", suite, "--no-show")
    world.check(done, 1, error_line=False)
    errors = failed_cells(world.boards / "bad-eval")
    assert set(errors) == {"dense", "magnitude"}
    assert all(f"evaluator {evaluator!r}" in e and words in e for e in errors.values()), errors


def test_a_dataset_that_raises_fails_the_cells_that_read_it_and_the_others_finish(world):
    suite = world.suite("bad-data.yaml", metrics=["magnitude", "wanda"], leaderboard=world.boards / "bad-data",
                        calibration={"dataset": "broken-text", "n": 4, "seqlen": 16})
    done = world.run("run", suite, "--no-show")
    world.check(done, 1, error_line=False)
    assert failed_cells(world.boards / "bad-data") == {
        "wanda": "dataset 'broken-text' (stadebench-hostile 1.0): RuntimeError: disk on fire"}
    assert ok_metrics(world.boards / "bad-data") == {"dense", "magnitude"}


def test_a_plugin_that_exits_on_import_is_reported_and_the_others_work(world):
    listed = world.run("plugins")
    world.check(listed, 0, error_line=False)
    assert "exit-on-import" in listed.stdout and "SystemExit" in listed.stdout
    done = world.run("run", world.suite("others.yaml", metrics=["magnitude", "wanda"]), "--no-show")
    world.check(done, 0, error_line=False)


def test_ctrl_c_inside_plugin_code_still_stops_the_run(world):
    suite = world.suite("slow.yaml", metrics=["magnitude", "slow"], leaderboard=world.boards / "slow")
    proc = subprocess.Popen([EXE, "run", str(suite), "--no-show"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=world.work, env=world.env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    marker = Path(world.env["HOSTILE_MARKER"])
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "timeout"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted: 2 cell(s) finished and saved" in stderr  # dense and magnitude; slow never recorded
    assert ok_metrics(world.boards / "slow") == {"dense", "magnitude"} and not failed_cells(world.boards / "slow")


# --- environment faults ----------------------------------------------------------------


@pytest.mark.parametrize("where", ["a file", "under a file", "in /proc"])
def test_a_cache_folder_that_cannot_be_created_is_named_with_its_variable(world, tmp_path, where):
    # a local model needs no asset: the run completes, with one warning that caching is off
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    cache = {"a file": blocker, "under a file": blocker / "cache", "in /proc": Path("/proc/stadebench-cache")}[where]
    done = world.run("run", world.suite("env.yaml", metrics=["wanda"], leaderboard=world.boards / "env"),
                     env={"STADEBENCH_CACHE": str(cache)})
    world.check(done, 0, error_line=False)
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(cache) in warnings[0] and "STADEBENCH_CACHE" in warnings[0], done.stderr
    assert "caching is off" in warnings[0]
    assert list((world.boards / "env").glob("*.parquet"))


def test_a_leaderboard_path_that_is_a_file_is_refused_before_any_cell(world):
    world.boards.mkdir(exist_ok=True)
    (world.boards / "taken").write_text("not a folder")
    done = world.run("run", world.suite("taken.yaml", leaderboard=world.boards / "taken"))
    world.check(done, 2, "taken", "leaderboard")
