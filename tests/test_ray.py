"""The Ray executor on a real local Ray instance (num_cpus=2) and tiny models: the same
leaderboard values as the local executor, an actor killed mid-cell retried, a cell that
raises recorded as failed, and a killed driver resumed without loss or duplicates.

The misbehaving metrics come from tests/hostile_plugin, put on PYTHONPATH before Ray
starts so that the actors can unpickle them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter, deque
from pathlib import Path

import pytest
import ray
from tinymodel import build_model, shared_assets, suite_dict, write_suite

from stadebench.plugins import get_plugins, reset_plugins
from stadebench.results import store as lb
from stadebench.runner.plan import make_plan
from stadebench.runner.ray_executor import RayExecutor
from stadebench.runner.run import run_suite
from stadebench.runner.scheduler import pick, simulate, units
from stadebench.suite import load_suite

PLUGIN_DIR = Path(__file__).parent / "hostile_plugin"
EXE = shutil.which("stadebench") or str(Path(sys.executable).with_name("stadebench"))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """The tiny model and a second one (other random weights, same tokenizer)."""
    base = shared_assets(tmp_path_factory)
    from transformers import AutoTokenizer

    other = tmp_path_factory.mktemp("other") / "tiny-b"
    tokenizer = AutoTokenizer.from_pretrained(base["model"])
    build_model(len(tokenizer), seed=1).save_pretrained(other)
    tokenizer.save_pretrained(other)
    return {**base, "other": other}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One local Ray instance for the module; its workers can import the hostile plugin."""
    marker = tmp_path_factory.mktemp("markers") / "m"
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "HOSTILE_MARKER")}
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PLUGIN_DIR), saved["PYTHONPATH"]]))
    os.environ["HOSTILE_MARKER"] = str(marker)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    sys.path.insert(0, str(PLUGIN_DIR))
    import stadebench_hostile

    reset_plugins()
    get_plugins().register(stadebench_hostile, name="stadebench-hostile")
    yield marker
    reset_plugins()
    sys.path.remove(str(PLUGIN_DIR))
    ray.shutdown()
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def grid(tmp_path: Path, assets: dict, metrics=("magnitude", "wanda", "stade"), **kwargs):
    """Two models × metrics, one-shot calibration (wanda and stade share statistics)."""
    data = suite_dict(assets, metrics=list(metrics), leaderboard=tmp_path / "lb", **kwargs)
    data["models"] = [{"id": str(assets["model"])}, {"id": str(assets["other"])}]
    data["calibration"]["sequential"] = False
    return load_suite(write_suite(tmp_path / "grid.yaml", data))


def values(folder: Path) -> dict[tuple, float]:
    return {(r["cell_key"], r["task"], r["score"]): r["value"]
            for r in lb.current(lb.read(folder)).to_pylist() if r["status"] == "ok"}


def test_the_grid_gives_the_local_executors_keys_and_values(cluster, assets, tmp_path):
    import torch

    suite = grid(tmp_path, assets)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each 1-CPU actor: the same float reduction order
    try:
        local = run_suite(suite, leaderboard_dir=tmp_path / "local")
    finally:
        torch.set_num_threads(threads)
    executor = RayExecutor()
    remote = run_suite(suite, leaderboard_dir=tmp_path / "ray", executor=executor)
    assert not local.failed and not remote.failed
    assert values(tmp_path / "ray") == values(tmp_path / "local") and len(values(tmp_path / "local")) == 8
    assert executor.last["actors"] == 2 and executor.last["deaths"] == 0
    assert {r["executor"] for r in lb.read(tmp_path / "ray").to_pylist()} == {"ray"}


def test_units_keep_sharing_groups_together_and_cover_every_cell(assets, tmp_path):
    plan = make_plan(grid(tmp_path, assets, metrics=("magnitude", "wanda", "stade", "stade-w")), tmp_path / "lb")
    queues = units(plan)
    assert [len(q) for q in queues.values()] == [3, 3]  # dense, magnitude, the one-shot group of three
    for q in queues.values():
        for u in q:
            groups = {c.group for c in u.model.cells}
            assert len(groups) == 1 and (len(u.model.cells) == 3) == (None not in groups)
    assert sorted(c.cell.label for q in queues.values() for u in q for c in u.model.cells) == sorted(
        c.cell.label for c in plan.todo)


def test_an_idle_actor_keeps_its_model_then_helps_the_model_with_most_work_per_actor(assets, tmp_path):
    queues = {"a": deque([1]), "b": deque([1, 2, 3, 4]), "c": deque([1, 2, 3])}
    assert pick(queues, "a", Counter()) == "a"
    assert pick(queues, None, Counter({"b": 3, "c": 0})) == "c"  # 4/4 < 3/1
    assert pick({"a": deque()}, "a", Counter()) is None


def test_the_simulated_schedule_spreads_two_models_over_four_slots(assets, tmp_path):
    plan = make_plan(grid(tmp_path, assets, metrics=("magnitude", "random")), tmp_path / "lb")  # 3 cells each
    one = simulate(plan, 1, lambda c: 10.0, lambda m: 1.0)
    assert one == {"makespan": 62.0, "cell_seconds": 60.0, "load_seconds": 2.0, "efficiency": 60 / 62}
    four = simulate(plan, 4, lambda c: 10.0, lambda m: 1.0)
    assert four["makespan"] == 21.0 and four["load_seconds"] == 4.0  # 6 cells, 4 actors: two rounds


def test_an_actor_killed_mid_cell_is_retried_and_the_grid_completes(cluster, assets, tmp_path):
    Path(str(cluster) + ".died").unlink(missing_ok=True)
    suite = grid(tmp_path, assets, metrics=("magnitude", "die-once"))
    executor = RayExecutor()
    summary = run_suite(suite, executor=executor)
    assert not summary.failed and len(summary.finished) == 6
    assert executor.last["deaths"] == 1 and executor.last["actors"] in (2, 3)  # the retry: fresh or idle actor
    assert Path(str(cluster) + ".died").exists()


def test_a_cell_whose_actor_always_dies_is_failed_after_the_retries_and_the_rest_finish(cluster, assets, tmp_path):
    suite = grid(tmp_path, assets, metrics=("magnitude", "die-always"))
    executor = RayExecutor(max_retries=1)
    summary = run_suite(suite, executor=executor)
    assert sorted(label for label, _ in summary.failed) == ["die-always · unstructured · 0.5"] * 2
    assert all("the Ray worker died 2 time(s) running this cell" in error for _, error in summary.failed)
    assert sorted(summary.finished) == sorted(["dense", "magnitude · unstructured · 0.5"] * 2)


def test_a_cell_that_raises_is_recorded_failed_and_the_rest_finish(cluster, assets, tmp_path):
    summary = run_suite(grid(tmp_path, assets, metrics=("magnitude", "boom", "fake-interrupt")),
                        executor=RayExecutor())
    assert sorted(error for _, error in summary.failed) == [
        "metric 'boom' (stadebench-hostile): RuntimeError: boom in the score"] * 2 + [
        "metric 'fake-interrupt' (stadebench-hostile): KeyboardInterrupt"] * 2
    assert len(summary.finished) == 4
    failed = [r for r in lb.read(tmp_path / "lb").to_pylist() if r["status"] == "failed"]
    assert len(failed) == 4 and {r["metric"] for r in failed} == {"boom", "fake-interrupt"}


def test_a_killed_driver_resumes_without_losing_or_duplicating_a_cell(assets, tmp_path):
    """``stadebench run --executor ray`` killed (driver and its local Ray, as a lost machine
    would be) once a cell is saved; the same command then finishes the rest, exactly once."""
    suite = grid(tmp_path, assets)
    path = tmp_path / "grid.yaml"
    env = {**os.environ, "STADEBENCH_CACHE": str(tmp_path / "cache"), "COLUMNS": "200"}
    command = [EXE, "run", str(path), "--executor", "ray", "--no-show"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    folder = Path(suite.leaderboard)
    deadline = time.monotonic() + 240
    while not list(folder.glob("*.parquet")):
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "no cell saved in time"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    saved = {r["cell_key"]: r["created_at"] for r in lb.read(folder).to_pylist()}
    assert 1 <= len(saved) < 8
    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr
    rows = lb.read(folder, history=True).to_pylist()
    keys = Counter(r["cell_key"] for r in rows)
    assert len(keys) == 8 and set(keys.values()) == {1}  # every cell once, none run twice
    assert {r["cell_key"]: r["created_at"] for r in rows if r["cell_key"] in saved} == saved


def test_asking_for_ray_without_it_installed_says_what_to_install(assets, tmp_path):
    shadow = tmp_path / "shadow" / "ray"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    path = write_suite(tmp_path / "s.yaml", suite_dict(assets, leaderboard=tmp_path / "lb"))
    env = {**os.environ, "PYTHONPATH": str(shadow.parent), "STADEBENCH_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([EXE, "run", str(path), "--executor", "ray"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: ") and "pip install 'stadebench[ray]'" in done.stderr
    assert not (tmp_path / "lb").exists()


def test_the_core_never_imports_ray():
    code = "import sys, stadebench, stadebench.runner.run, stadebench.cli; print('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_an_address_where_nothing_answers_is_one_error_before_any_cell(assets, tmp_path):
    path = write_suite(tmp_path / "s.yaml", suite_dict(assets, leaderboard=tmp_path / "lb"))
    env = {**os.environ, "STADEBENCH_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([EXE, "run", str(path), "--executor", "ray", "--address", "127.0.0.1:1"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "127.0.0.1:1" in errors[0] and "ray start --head" in errors[0]
    assert not list((tmp_path / "lb").glob("*.parquet"))
