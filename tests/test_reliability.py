"""Crash safety of `stadebench run`: SIGKILL and resume, two runs at once, Ctrl-C.

Every test runs the real `stadebench` executable on the tiny local Llama of
tests/tinymodel.py. Its cells take milliseconds, far too little to land a signal inside
one, so the subprocess gets a ``sitecustomize`` shim (on PYTHONPATH) that sleeps inside
``util.atomic_write`` after a Parquet file's temporary copy is written and before it is
renamed, and at the end of each leaderboard compaction, while it holds the lock: every
write then holds a visible ``.NAME.xxxx.tmp`` for ``WRITE_DELAY`` seconds, every
compaction the lock, and the tests kill the process while a chosen one is in flight. The
shim changes timing only; what is written, and how, is the library's own code.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from filelock import FileLock, Timeout

from stadebench.results import store as lb
from stadebench.runner.plan import make_plan
from stadebench.suite import load_suite
from tinymodel import shared_assets, suite_dict, write_suite

WRITE_DELAY = 0.15  # seconds each Parquet write stays in flight, and each compaction holds the lock
EXE = shutil.which("stadebench") or str(Path(sys.executable).with_name("stadebench"))

SHIM = """\
import os, time
from stadebench import util as _util
from stadebench.results import store as _lb

_write, _compact = _util.atomic_write, _lb._compact
_delay = float(os.environ["STADEBENCH_TEST_WRITE_DELAY"])

def _slow_atomic_write(path, data):
    if not str(path).endswith(".parquet"):
        return _write(path, data)
    def slow(fh):
        fh.write(data) if isinstance(data, (bytes, bytearray)) else data(fh)
        fh.flush()
        time.sleep(_delay)  # the temporary file is on disk, not yet renamed
    return _write(path, slow)

def _slow_compact(folder):
    _compact(folder)
    time.sleep(_delay)  # the compaction lock is held

_util.atomic_write = _slow_atomic_write
_lb._compact = _slow_compact
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    shim = tmp_path_factory.mktemp("shim")
    (shim / "sitecustomize.py").write_text(SHIM)
    cache = tmp_path_factory.mktemp("cache")
    base = {**os.environ, "STADEBENCH_CACHE": str(cache), "COLUMNS": "1000",
            "STADEBENCH_TEST_WRITE_DELAY": str(WRITE_DELAY),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(shim), os.environ.get("PYTHONPATH")]))}
    base.pop("STADEBENCH_DEBUG", None)
    return base


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """dense + magnitude/wanda/stade × unstructured/2:4, minus magnitude 2:4: 6 cells."""
    assets = shared_assets(tmp_path_factory)
    root = tmp_path_factory.mktemp("reliability")
    return write_suite(root / "tiny.yaml", suite_dict(
        assets, name="tiny", leaderboard=root / "unused", metrics=["magnitude", "wanda", "stade"],
        patterns=["unstructured", "2:4"], exclude=[{"metric": "magnitude", "pattern": "2:4"}]))


@pytest.fixture(scope="module")
def expected(suite, tmp_path_factory):
    """The cell keys the suite should produce, computed in-process as the runner does."""
    plan = make_plan(load_suite(suite), tmp_path_factory.mktemp("empty"))
    keys = {p.key for cell in plan.todo for p in cell.pending}
    assert len(keys) == 6
    return keys


def _default_sigint() -> None:
    # A test run started in the background (`pytest &`) inherits an ignored SIGINT, and a
    # Python started with SIGINT ignored never raises KeyboardInterrupt: give the child
    # the default disposition, as a terminal would.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(suite: Path, folder: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([EXE, "run", str(suite), "--leaderboard", str(folder), "--no-show"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=_default_sigint)


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    stdout, stderr = proc.communicate(timeout=timeout)
    return proc.returncode, stdout, stderr


def run_to_end(suite: Path, folder: Path, env: dict) -> str:
    rc, _, stderr = finish(start(suite, folder, env))
    assert rc == 0, stderr
    return stderr


def parquets(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.parquet")) if folder.is_dir() else []


def temps(folder: Path, suffix: str) -> set[str]:
    """Names of in-flight temporary files of ``suffix``."""
    return {p.name for p in folder.glob(f".*{suffix}.*.tmp")} if folder.is_dir() else set()


def wait_for(proc: subprocess.Popen, condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc {proc.returncode}) before {what}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def write_in_flight(folder: Path, files: int, suffix: str, seen: set[str]):
    """A condition: ``files`` Parquet files are final and a new ``suffix`` temp file is open."""
    return lambda: len(parquets(folder)) == files and bool(temps(folder, suffix) - seen)


def lock_held(folder: Path) -> bool:
    """Whether some process holds the leaderboard's compaction lock."""
    lock = FileLock(folder / lb.LOCK)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    lock.release()
    return False


def read_clean(folder: Path, **options):
    """``lb.read`` with every warning an error: no file may be skipped as unreadable."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return lb.read(folder, **options)


def check_store(folder: Path) -> None:
    """The folder holds only complete Parquet files that plain pyarrow reads (bookkeeping is
    under names it skips), and each (cell_key, task, score) once."""
    files = parquets(folder)
    assert {p.name for p in folder.iterdir() if not p.name.startswith((".", "_"))} == {p.name for p in files}
    for path in files:
        pq.read_table(path)
    if not files:
        return
    plain = pq.read_table(folder)  # the folder as a dataset, no stadebench involved
    assert plain.num_rows == sum(pq.read_metadata(p).num_rows for p in files)
    assert set(counts(plain).values()) <= {1}, [k for k, n in counts(plain).items() if n > 1]


def counts(table) -> Counter:
    return Counter(zip(table["cell_key"].to_pylist(), table["task"].to_pylist(), table["score"].to_pylist()))


def assert_complete(table, expected: set[str], *, exactly_once: bool) -> None:
    c = counts(table)
    assert {key for key, _, _ in c} == expected
    assert set(table["status"].to_pylist()) == {"ok"}
    if exactly_once:
        assert set(c.values()) == {1}, [k for k, n in c.items() if n > 1]


# --- 1. SIGKILL at several points, resume each time ---------------------------------------

# (Parquet files already final, what is in flight when the SIGKILL lands)
KILL_POINTS = [
    (0, ".parquet"),    # inside the very first write: nothing final yet
    (3, "compaction"),  # cell 3's file renamed, the compaction after it holding the lock
    (4, ".parquet"),    # inside the 5th cell's write
]


def test_sigkill_then_resume_never_reruns_or_duplicates_a_cell(suite, expected, env, tmp_path):
    folder = tmp_path / "lb"
    for final, what in KILL_POINTS:
        seen = temps(folder, ".parquet")  # temp files left by earlier kills
        before = {p.name for p in parquets(folder)}
        proc = start(suite, folder, env)
        if what == "compaction":
            wait_for(proc, lambda final=final: len(parquets(folder)) == final and lock_held(folder),
                     f"{final} file(s) + a compaction")
        else:
            wait_for(proc, write_in_flight(folder, final, what, seen), f"{final} file(s) + a {what} write")
        proc.send_signal(signal.SIGKILL)
        rc, _, _ = finish(proc)
        assert rc == -signal.SIGKILL
        after = parquets(folder)
        assert len(after) == final
        assert before <= {p.name for p in after}  # nothing already written was touched
        if what == "compaction":
            assert not lock_held(folder)  # a dead process's lock is released by the kernel
        else:
            assert temps(folder, what) - seen  # the in-flight temp file is left behind...
        table = read_clean(folder)  # ...and invisible to readers: no warning, no failure
        check_store(folder)
        c = counts(table)
        assert len(c) == final and all(n == 1 for n in c.values())
        assert lb.finished_cells(folder) == {key for key, _, _ in c} < expected

    stderr = run_to_end(suite, folder, env)
    assert "2 cell(s) ran, 4 skipped, 0 failed" in stderr  # only the cells not yet final ran
    assert len(parquets(folder)) == 6  # one file per cell: no cell ever ran twice
    assert lb.finished_cells(folder) == expected
    assert_complete(read_clean(folder), expected, exactly_once=True)
    check_store(folder)


# --- 2. two runs at once --------------------------------------------------------------------


def test_two_concurrent_runs_leave_a_consistent_store(suite, expected, env, tmp_path):
    folder = tmp_path / "lb"
    procs = [start(suite, folder, env) for _ in range(2)]
    results = [finish(p) for p in procs]
    for rc, _, stderr in results:
        assert rc == 0, stderr
    check_store(folder)
    table = read_clean(folder, history=True)
    # Both runs plan from the same (empty) leaderboard, so both may run a cell: all rows
    # may hold a cell twice, once per run_id, but never twice from one run...
    raw = Counter(zip(table["run_id"].to_pylist(), table["cell_key"].to_pylist(),
                      table["task"].to_pylist(), table["score"].to_pylist()))
    assert set(raw.values()) == {1}
    assert_complete(table, expected, exactly_once=False)
    # ...and the older of two is in _history/: the top level holds the current rows only.
    assert_complete(read_clean(folder), expected, exactly_once=True)
    assert_complete(lb.current(table), expected, exactly_once=True)
    assert lb.finished_cells(folder) == expected


# --- 3. Ctrl-C -------------------------------------------------------------------------------


def test_ctrl_c_saves_finished_cells_and_a_rerun_finishes_the_rest(suite, expected, env, tmp_path):
    folder = tmp_path / "lb"
    proc = start(suite, folder, env)
    # the first result file is final (and recorded) once the second cell's write is in flight
    wait_for(proc, write_in_flight(folder, 1, ".parquet", set()), "the first result file")
    proc.send_signal(signal.SIGINT)
    rc, stdout, stderr = finish(proc)
    assert rc == 130, stderr
    assert "interrupted: 1 cell(s) finished and saved in" in " ".join(stderr.split())
    assert "Traceback" not in stderr and stdout == ""
    assert len(parquets(folder)) == 1
    assert not temps(folder, ".parquet")  # an interrupted write removes its temp file
    check_store(folder)

    stderr = run_to_end(suite, folder, env)
    assert "1 cell(s) already in the leaderboard: skipped" in stderr
    assert "5 cell(s) ran, 1 skipped, 0 failed" in stderr
    assert len(parquets(folder)) == 6
    assert lb.finished_cells(folder) == expected
    assert_complete(read_clean(folder), expected, exactly_once=True)
    check_store(folder)
