"""Hostile environments, through the real command in a subprocess (issue #31, classes 3, 5, 8):
read-only or unusable caches, `prune --out --force` pointed at what it must not replace,
Ray addresses of any form, a Ray head that never answers, `$RAY_ADDRESS` on a local run,
layer regexes that backtrack catastrophically, and non-finite plugin options. Every refusal
is exit 2 with one `error:` line naming the culprit, quickly, with nothing written.

Tests run as root, whom permission bits do not stop, so a read-only cache is a read-only
bind mount made in a user and mount namespace (`unshare -rm`): writes there fail with
EROFS, as on a cluster's read-only share, for root too. Where `unshare` is not allowed
those tests skip, and a cache folder below a regular file (every mkdir fails) stands in
for a cache that cannot be written at all.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from stadebench.results import store as lb
from stadebench.runner import save
from tinymodel import shared_assets, suite_dict, write_suite

EXE = shutil.which("stadebench") or str(Path(sys.executable).with_name("stadebench"))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return shared_assets(tmp_path_factory)


def cli(*args, cache: Path, timeout: float = 120, wrap: str | None = None, **env_extra):
    """Run `stadebench ARGS`; ``wrap`` is a shell prefix run first (``{cmd}`` is the command)."""
    env = {**os.environ, "COLUMNS": "1000", "STADEBENCH_CACHE": str(cache), **env_extra}
    for key in ("STADEBENCH_DEBUG", "RAY_ADDRESS", "STADEBENCH_EXECUTOR"):
        if key not in env_extra:
            env.pop(key, None)
    cmd = [EXE, *map(str, args)]
    if wrap:
        cmd = ["sh", "-c", wrap.format(cmd=shlex.join(cmd))]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, stdin=subprocess.DEVNULL)
    return done, time.perf_counter() - t0


def refused(done, *words: str) -> str:
    assert done.returncode == 2, (done.returncode, done.stderr)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr
    assert "Traceback" not in done.stderr
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def warnings_in(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning:")]


def tiny_suite(assets, folder: Path, **extra) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return write_suite(folder / "suite.yaml", suite_dict(assets, leaderboard=folder / "lb", metrics=("magnitude",),
                                                         **extra))


def values(folder: Path) -> dict:
    return {(r["cell_key"], r["task"], r["score"]): r["value"] for r in lb.read(folder).to_pylist()}


# --- 3. read-only caches ---------------------------------------------------------------


def _can_unshare() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


needs_unshare = pytest.mark.skipif(not _can_unshare(), reason="no user/mount namespaces (unshare -rm) here")


def read_only(cache: Path) -> str:
    """A ``cli(wrap=...)`` prefix: ``cache`` bind-mounted read-only for that command only."""
    c = shlex.quote(str(cache))
    return f"mount --bind {c} {c} && mount -o remount,bind,ro {c} {c} && exec {{cmd}}"


def ro(cache: Path) -> str:
    return "unshare -rm sh -c " + shlex.quote(read_only(cache))


def test_a_local_run_with_a_cache_that_cannot_be_made_completes_with_one_warning(assets, tmp_path):
    (tmp_path / "not-a-folder").write_text("x")
    cache = tmp_path / "not-a-folder" / "cache"  # every mkdir below a regular file fails
    done, _ = cli("run", tiny_suite(assets, tmp_path), "--no-show", cache=cache)
    assert done.returncode == 0, done.stderr
    [warning] = warnings_in(done.stderr)
    assert "caching is off" in warning and str(cache) in warning and "STADEBENCH_CACHE" in warning
    assert len(values(tmp_path / "lb")) >= 2  # the dense and the pruned cell's perplexity


@needs_unshare
def test_a_read_only_cache_is_read_and_the_run_completes_with_a_warning(assets, tmp_path):
    cache = tmp_path / "cache"
    first, _ = cli("run", tiny_suite(assets, tmp_path / "a"), "--no-show", cache=cache)
    assert first.returncode == 0 and not warnings_in(first.stderr), first.stderr
    before = sorted(p.relative_to(cache) for p in cache.rglob("*"))
    done, _ = cli("run", tiny_suite(assets, tmp_path / "b"), "--no-show", cache=cache, wrap=ro(cache))
    assert done.returncode == 0, done.stderr
    [warning] = warnings_in(done.stderr)
    assert "caching is off" in warning and "Read-only" not in done.stderr.replace(warning, "")
    assert values(tmp_path / "b" / "lb").values() and sorted(values(tmp_path / "a" / "lb").values()) == sorted(
        values(tmp_path / "b" / "lb").values())
    assert sorted(p.relative_to(cache) for p in cache.rglob("*")) == before


@needs_unshare
def test_an_empty_read_only_cache_still_runs_a_local_model(assets, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    done, _ = cli("run", tiny_suite(assets, tmp_path), "--no-show", cache=cache, wrap=ro(cache))
    assert done.returncode == 0, done.stderr
    [warning] = warnings_in(done.stderr)
    assert "caching is off" in warning and str(cache) in warning
    assert list(cache.iterdir()) == []


@needs_unshare
def test_an_asset_that_must_be_written_to_a_read_only_cache_is_one_error(tmp_path):
    cache = tmp_path / "cache"
    (cache / "assets").mkdir(parents=True)
    listed, _ = cli("assets", "list", "--format", "json", cache=cache, wrap=ro(cache))
    assert listed.returncode == 0 and not any(a["cached"] for a in json.loads(listed.stdout)), listed.stderr
    done, seconds = cli("assets", "fetch", "enwiki-2016", cache=cache, wrap=ro(cache), timeout=60)
    line = refused(done, str(cache / "assets"), "enwiki-2016", "STADEBENCH_CACHE", "cannot be written")
    assert "Read-only file system" in line and done.stdout == "" and seconds < 30
    assert list((cache / "assets").iterdir()) == []


# --- 5. prune --out --force ------------------------------------------------------------


def prune(assets, out, leaderboard, *extra, model=None, cache):
    return cli("prune", model or assets["model"], "--out", out, "--leaderboard", leaderboard, "--device", "cpu",
               "--metric", "magnitude", "--calibration", f"{assets['corpus']}:4x16", "--eval", "none", *extra,
               cache=cache)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _saved(assets, tmp_path) -> Path:
    """A folder `stadebench prune` saved."""
    out = tmp_path / "saved"
    done, _ = prune(assets, out, tmp_path / "lb0", cache=tmp_path / "cache")
    assert done.returncode == 0, done.stderr
    assert save.is_saved_folder(out)
    return out


@pytest.mark.parametrize("case", ["the model's own folder", "a folder holding the model", "the leaderboard",
                                  "a folder holding the leaderboard", "a folder stadebench did not save"])
def test_force_never_replaces_what_it_was_not_asked_to(assets, tmp_path, case):
    model = tmp_path / "work" / "model"
    shutil.copytree(assets["model"], model)
    board = tmp_path / "board"
    board.mkdir()
    (board / "rows.parquet").write_bytes(b"not really")
    out, words = {
        "the model's own folder": (model, ("is the model being pruned",)),
        "a folder holding the model": (tmp_path / "work", ("holds the model being pruned",)),
        "the leaderboard": (board, ("is the leaderboard folder",)),
        "a folder holding the leaderboard": (tmp_path, ("holds the leaderboard folder",)),
        "a folder stadebench did not save": (tmp_path / "mine", ("not a model stadebench saved",)),
    }[case]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    before = snapshot(tmp_path)
    done, _ = prune(assets, out, board, "--force", model=model, cache=tmp_path.parent / f"{tmp_path.name}-cache")
    refused(done, str(out), "--out", *words)
    assert done.stdout == "" and snapshot(tmp_path) == before


def test_force_refuses_a_link_before_pruning(assets, tmp_path):
    saved = _saved(assets, tmp_path)
    link = tmp_path / "link"
    link.symlink_to(saved, target_is_directory=True)
    before = snapshot(saved)
    done, _ = prune(assets, link, tmp_path / "lb", "--force", cache=tmp_path / "cache")
    refused(done, str(link), "is a link", "--out")
    assert not (tmp_path / "lb").exists()  # nothing ran
    assert link.is_symlink() and snapshot(saved) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "lb0", "link", "saved"]


def test_force_replaces_a_saved_folder_and_leaves_nothing_stale_beside_it(assets, tmp_path):
    saved = _saved(assets, tmp_path)
    (saved / "stale.txt").write_text("from before")
    killed = tmp_path / ".saved.old-0badcafe"  # what a save killed between its two renames leaves
    shutil.copytree(saved, killed)
    done, _ = prune(assets, saved, tmp_path / "lb", "--force", "--sparsity", "0.25", cache=tmp_path / "cache")
    assert done.returncode == 0, done.stderr
    assert save.verify(saved) == [] and not (saved / "stale.txt").exists()
    assert json.loads((saved / save.SPARSITY_FILE).read_text())["target_sparsity"] == 0.25
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no .saved.old-*/.tmp-*


# --- 8. clusters and environments ------------------------------------------------------


@pytest.mark.parametrize("address", [
    "x" * 100_000 + ":6379",  # a host name no resolver takes
    "127.0.0.1:99999999999999999999",  # a port no socket takes
    "127.0.0.1:70000",
    "a" * 64 + ".example:6379",  # a DNS label over 63 characters
    "ray://[::1:6379",
    "héad\nnode:6379",
], ids=["100k-char host", "20-digit port", "port 70000", "64-char label", "open bracket", "newline"])
def test_any_ray_address_is_one_exit_2_line(assets, tmp_path, address):
    done, seconds = cli("run", tiny_suite(assets, tmp_path), "--executor", "ray", "--address", address,
                        cache=tmp_path / "cache", timeout=60)
    line = refused(done, "Ray address", "--address")
    assert len(line) < 400 and seconds < 30
    assert not (tmp_path / "lb").exists()


def test_a_ray_head_that_never_answers_is_given_up_within_seconds(assets, tmp_path):
    from stadebench.runner.ray_executor import PROBE_SECONDS

    with socket.socket() as server:  # accepts connections (the kernel's backlog), never answers
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        address = f"127.0.0.1:{server.getsockname()[1]}"
        try:
            done, seconds = cli("run", tiny_suite(assets, tmp_path), "--executor", "ray", "--address", address,
                                cache=tmp_path / "cache", timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("the run still waited for the mute head after 60 s")
    refused(done, address, "did not answer within", f"{PROBE_SECONDS:g} s")
    assert seconds < PROBE_SECONDS + 25
    assert not list((tmp_path / "lb").glob("**/*.parquet"))


def test_ray_address_in_the_environment_does_not_stop_a_local_run(assets, tmp_path):
    done, _ = cli("run", tiny_suite(assets, tmp_path), "--no-show", cache=tmp_path / "cache",
                  RAY_ADDRESS="127.0.0.1:1")
    assert done.returncode == 0, done.stderr
    assert {r["executor"] for r in lb.read(tmp_path / "lb").to_pylist()} == {"local"}


HOSTILE = r"^(?:[\w.]|[\w.]{2}|[\w.]{3})+[0-9]$"  # 3-way overlapping repeat: ~1e8 paths per layer name


def test_a_catastrophic_layer_regex_is_refused_by_validate_within_seconds(assets, tmp_path):
    path = tiny_suite(assets, tmp_path, targets=[HOSTILE])
    try:
        done, seconds = cli("validate", path, cache=tmp_path / "cache", timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("validate still matched the regex after 60 s")
    refused(done, "targets[0]", "backtracks", "0.5 s")
    assert seconds < 30


LONG_NAMES = """
import sys, time
import torch
sys.path.insert(0, sys.argv[1])
from tinymodel import build_model
from stadebench.core.models import select_layers
from stadebench.errors import ConfigError

model = build_model(32)
model.add_module("a" * 60 + "_head", torch.nn.Linear(4, 4))  # a long layer name
t0 = time.perf_counter()
try:
    select_layers(model, targets=[r"^(a|aa)+$"])
except ConfigError as exc:
    print(f"{time.perf_counter() - t0:.3f}", exc)
"""


def test_a_catastrophic_regex_on_long_layer_names_is_answered_in_under_a_second(tmp_path):
    try:  # in a subprocess, so that a regex engine that does backtrack forever is stopped
        done = subprocess.run([sys.executable, "-c", LONG_NAMES, str(Path(__file__).parent)], capture_output=True,
                              text=True, timeout=60, cwd=tmp_path)
    except subprocess.TimeoutExpired:
        pytest.fail("select_layers still matched the regex after 60 s")
    assert done.returncode == 0, done.stderr
    seconds, message = done.stdout.split(" ", 1)
    assert float(seconds) < 1.0 and "targets[0]" in message and "backtracks" in message


def test_an_overlong_layer_regex_is_refused_by_validate(assets, tmp_path):
    path = tiny_suite(assets, tmp_path, ignore=["lm_head|" + "x" * 5000])
    done, _ = cli("validate", path, cache=tmp_path / "cache", timeout=60)
    line = refused(done, "ignore", "5008 characters", "1000")
    assert len(line) < 400


@pytest.mark.parametrize("entry, where", [
    ("allocations: [{name: owl, options: {M: .inf}}]", "allocations[0].options.M"),
    ("evaluations: [{name: perplexity, options: {dataset: {name: text, options: {path: c.txt, x: [1, .nan]}}}}]",
     "options.x[1] is nan"),
], ids=["owl M .inf", "nested .nan"])
def test_non_finite_plugin_options_are_refused_by_validate(tmp_path, entry, where):
    (tmp_path / "c.txt").write_text("Some text.\n")
    suite = {"models": ["org/model"], "metrics": ["magnitude"], "patterns": ["unstructured"], "sparsities": [0.5]}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(suite, sort_keys=False) + entry + "\n", encoding="utf-8")
    done, _ = cli("validate", path, cache=tmp_path / "cache", timeout=60)
    refused(done, where, "finite")
    assert done.stdout == ""


def test_every_options_model_refuses_non_finite_numbers_naming_the_option():
    from typing import Any

    from stadebench.base import Options
    from stadebench.errors import ConfigError
    from stadebench.plugins import get_plugins, resolve_plugin

    class Mine(Options):
        x: float = 1.0
        xs: list[float] = []
        extra: dict[str, Any] = {}

    for options, where in [({"x": float("inf")}, "x"), ({"x": "nan"}, "x"), ({"xs": [1.0, float("nan")]}, "xs"),
                           ({"extra": {"a": {"b": [1, float("-inf")]}}}, "a.b[1]")]:
        with pytest.raises(ValueError, match=r"finite") as info:
            Mine.model_validate(options)
        assert where in str(info.value)
    assert Mine.model_validate({"x": 2.5, "extra": {"a": [1e308]}}).x == 2.5
    checked = []
    for kind, registry in get_plugins().registries.items():  # every registered plugin's float options
        for reg in registry:
            for name, field in reg.cls.Options.model_fields.items():
                if "float" in str(field.annotation):
                    key = field.alias or name
                    with pytest.raises(ConfigError, match=rf"{reg.name}.*{key}: must be a finite number"):
                        resolve_plugin(kind, reg.name, {key: float("inf")})
                    checked.append(f"{reg.name}.{key}")
    assert "owl.M" in checked and "sparsegpt.percdamp" in checked
