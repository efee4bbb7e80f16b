"""Hostile suite files, through the real command in a subprocess: oversized, deeply nested
or alias-expanding documents, and integer knobs no storage or computation can hold, are
refused by `stadebench validate` with exit 2 and one `error:` line naming the limit,
quickly and in little memory, with nothing written.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

EXE = shutil.which("stadebench") or str(Path(sys.executable).with_name("stadebench"))

BASE = """\
models: [org/model]
metrics: [wanda]
patterns: [unstructured]
sparsities: [0.5]
"""


# A fresh wrapper process runs the command, so its RUSAGE_CHILDREN peak is that command's alone.
WRAPPER = """import resource, subprocess, sys
code = subprocess.call(sys.argv[2:])
open(sys.argv[1], "w").write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(code)"""


def validate(path: Path, tmp_path: Path) -> tuple[subprocess.CompletedProcess, float, int]:
    """Run `stadebench validate PATH`; the result, its wall time and its peak RSS in MB."""
    env = {**os.environ, "COLUMNS": "1000", "STADEBENCH_CACHE": str(tmp_path / "cache")}
    env.pop("STADEBENCH_DEBUG", None)
    peak_file = tmp_path / "cache" / "peak"
    peak_file.parent.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", WRAPPER, str(peak_file), EXE, "validate", str(path)],
                          capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    seconds = time.perf_counter() - t0
    return done, seconds, int(peak_file.read_text()) // 1024


def assert_refused(done: subprocess.CompletedProcess, *words: str) -> None:
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr
    for word in words:
        assert word in errors[0], errors[0]
    assert "Traceback" not in done.stderr and done.stdout == ""


def alias_bomb(levels: int = 9) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, levels)]
    return BASE + "extra:\n" + "\n".join("  " + line for line in lines) + "\n"


RESOURCE_CASES = {
    "50 MB file": lambda: BASE + "# " + "x" * (50 << 20) + "\n",
    "alias bomb (10^9 values)": alias_bomb,
    "nested 10,000 deep": lambda: BASE.replace("[org/model]", "[" * 10_000 + "org/model" + "]" * 10_000),
    "alias bomb inside models": lambda: "x: &x [" + ", ".join(["org/m"] * 400) + "]\n" + "y: &y [" + ", ".join(
        ["*x"] * 400) + "]\nmodels: [*y, *y]\nmetrics: [wanda]\npatterns: [unstructured]\n",
}
LIMIT_WORDS = {"50 MB file": ("bytes", "limit"), "alias bomb (10^9 values)": ("expands to more than",),
               "nested 10,000 deep": ("nested deeper than",), "alias bomb inside models": ("expands to more than",)}


@pytest.mark.parametrize("case", list(RESOURCE_CASES))
def test_oversized_suites_are_refused_quickly_in_little_memory(case, tmp_path):
    path = tmp_path / "hostile.yaml"
    path.write_text(RESOURCE_CASES[case](), encoding="utf-8")
    done, seconds, peak_mb = validate(path, tmp_path)
    assert_refused(done, str(path), *LIMIT_WORDS[case])
    # The process as a whole (interpreter and imports included) stays small; the refusal
    # itself is measured in the closing note, not asserted as a time.
    assert peak_mb < 100, peak_mb
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == ["hostile.yaml"]


INTEGER_CASES = {
    "calibration seed 1e30": ("calibration: {seed: 1000000000000000000000000000000}\n", "calibration.seed"),
    "calibration n 3e9": ("calibration: {n: 3000000000}\n", "calibration.n"),
    "calibration seqlen 3e9": ("calibration: {seqlen: 3000000000}\n", "calibration.seqlen"),
    "negative seed": ("calibration: {seed: -1}\n", "calibration.seed"),
    "evaluation seqlen 3e9": ("evaluations: [{name: perplexity, options: {seqlen: 3000000000}}]\n",
                              "evaluations[0].options.seqlen"),
    "device index 99999": ("device: 'cuda:99999'\n", "device"),
    "random seed 1e30": ("metrics: [{name: random, options: {seed: 1000000000000000000000000000000}}]\n",
                         "metrics[0].options.seed"),
    "N:M with a huge M": ("patterns: ['1:99999999999']\n", "patterns[0]"),
}


@pytest.mark.parametrize("case", list(INTEGER_CASES))
def test_integer_knobs_out_of_range_are_refused_by_the_schema(case, tmp_path):
    extra, field = INTEGER_CASES[case]
    text = BASE
    for line in extra.splitlines(keepends=True):  # an override replaces the base's line of that key
        key = line.split(":", 1)[0]
        text = "".join(k for k in text.splitlines(keepends=True) if not k.startswith(key + ":")) + line
    path = tmp_path / "hostile.yaml"
    path.write_text(text, encoding="utf-8")
    done, _, _ = validate(path, tmp_path)
    assert_refused(done, str(path), field)


# --- checks that must happen before the first cell --------------------------------------


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from tinymodel import shared_assets

    return shared_assets(tmp_path_factory)


def _text(path: str) -> dict:
    return {"name": "text", "options": {"path": path}}


def _perplexity(**options) -> list[dict]:
    return [{"name": "perplexity", "options": {"dataset": "CORPUS", "seqlen": 16, "max_windows": 2, **options}}]


# (suite changes, words of the error). "CORPUS" stands for the tiny corpus; the model's
# context is 64 tokens and its layers are 32 and 64 wide.
LATE_CASES = {
    "evaluation seqlen over the context": ({"evaluations": _perplexity(seqlen=128)},
                                           ("evaluations[0].options.seqlen=128", "context", "64")),
    "evaluation text file misspelt": ({"evaluations": _perplexity(dataset=_text("corpsu.txt"))},
                                      ("evaluations[0].options", "corpsu.txt", "not a file")),
    "evaluation glob matching nothing": ({"evaluations": _perplexity(dataset=_text("texts/*.md"))},
                                         ("evaluations[0].options", "no file matches", "texts/*.md")),
    "calibration text file misspelt": ({"calibration": {"dataset": _text("corpsu.txt"), "n": 4, "seqlen": 16}},
                                       ("calibration.dataset.options", "corpsu.txt")),
    "calibration seqlen over the context": ({"calibration": {"dataset": "CORPUS", "n": 2, "seqlen": 96}},
                                            ("calibration.seqlen=96", "context")),
    "N:M width that does not divide a layer": ({"patterns": ["2:3"]}, ("layer", "3")),
}


def _late_suite(tmp_path: Path, assets: dict, change: dict) -> Path:
    from tinymodel import suite_dict, write_suite

    suite = suite_dict(assets, metrics=["wanda"], leaderboard=tmp_path / "lb")
    corpus = {"name": "text", "options": {"path": str(assets["corpus"])}}
    for key, value in change.items():
        if key == "patterns":
            suite.pop("sparsities")
        suite[key] = _replace(value, corpus)
    return write_suite(tmp_path / "late.yaml", suite)


def _replace(value, corpus):
    if value == "CORPUS":
        return corpus
    if isinstance(value, dict):
        return {k: _replace(v, corpus) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace(v, corpus) for v in value]
    return value


@pytest.mark.parametrize("case", list(LATE_CASES))
def test_what_would_fail_every_cell_is_refused_by_validate_and_before_the_first_cell(case, tmp_path, assets):
    change, words = LATE_CASES[case]
    path = _late_suite(tmp_path, assets, change)
    done, _, _ = validate(path, tmp_path)
    assert_refused(done, *words)
    env = {**os.environ, "COLUMNS": "1000", "STADEBENCH_CACHE": str(tmp_path / "cache")}
    env.pop("STADEBENCH_DEBUG", None)
    ran = subprocess.run([EXE, "run", str(path)], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert_refused(ran, *words)
    assert not (tmp_path / "lb").exists() or not list((tmp_path / "lb").glob("*.parquet"))
