"""What a new user sees from the command line (issue #17): dry runs that plan without a
device, name each evaluation and estimate the cost; progress with an ETA and a live step,
a heartbeat when stderr is not a terminal, the libraries' chatter off stderr unless
``--verbose``; ``--version``; plain-text descriptions in ``stadebench list``.

The progress tests run the real `stadebench` executable (its stderr is a pipe: the
not-a-terminal case) on the tiny Llama of tests/tinymodel.py, with a plugin installed as a
distribution on PYTHONPATH: a metric that sleeps once while scoring, so that the prune
phase lasts long enough for heartbeats, and an evaluator that sleeps and chatters the way
lm-eval does (a default tqdm bar, lm-eval and transformers log records, and lm-eval's own
``Running loglikelihood requests`` bar through stadebench's lm-eval wrapper).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import stadebench
from stadebench.cli import ExitCode, app
from stadebench.cli.registry import summary
from tinymodel import shared_assets, suite_dict, write_suite

REPO = Path(__file__).resolve().parents[1]
EXE = shutil.which("stadebench") or str(Path(sys.executable).with_name("stadebench"))
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
CHATTER = ("chatty default bar", "lm-eval logger chatter", "transformers chatter", "Running loglikelihood requests")

PLUGIN = '''\
import logging, time

import torch
import stadebench
from tqdm import tqdm

_slept = []


class Sleepy(stadebench.Metric):
    """Magnitude, but the first score of a process sleeps a second."""

    name = "sleepy"

    def score(self, weight, stats):
        if not _slept:
            _slept.append(True)
            time.sleep(1.0)
        return weight.abs()


class Chatty(stadebench.Evaluator):
    """Chatters on stderr the way lm-eval does, sleeps a second, scores one loglikelihood."""

    name = "chatty"

    def evaluate(self, model, tokenizer, device=None):
        from lm_eval.api.instance import Instance
        from transformers.utils import logging as tf_logging

        from stadebench.evaluation.lmeval import harness_model

        for _ in tqdm(range(3), desc="chatty default bar"):
            pass
        logging.getLogger("lm_eval.chatty").warning("lm-eval logger chatter")
        tf_logging.get_logger("transformers.chatty").warning("transformers chatter")
        lm = harness_model(model, tokenizer, 2)
        requests = [Instance(request_type="loglikelihood", doc={}, arguments=("the harbour was", " quiet"), idx=0)]
        (logprob, _), = lm.loglikelihood(requests)
        time.sleep(1.0)
        return [stadebench.Score(task="chat", name="loglik", value=float(logprob))]


@stadebench.hookimpl
def register_metrics(register):
    register(Sleepy)


@stadebench.hookimpl
def register_evaluators(register):
    register(Chatty)
'''


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return shared_assets(tmp_path_factory)


def invoke(*args: str, env: dict | None = None):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False,
                              env={"COLUMNS": "1000", "STADEBENCH_DEBUG": None, **(env or {})})


@pytest.fixture(scope="module")
def world(tmp_path_factory, assets):
    """A folder with the plugin installed as a distribution, a suite (dense + sleepy, scored by
    chatty) and an environment for the `stadebench` executable."""
    root = tmp_path_factory.mktemp("polish")
    site = root / "site"
    site.mkdir()
    (site / "stadebench_polish.py").write_text(PLUGIN)
    info = site / "stadebench_polish-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: stadebench-polish\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[stadebench]\npolish = stadebench_polish\n")
    suite = write_suite(root / "chatty.yaml", suite_dict(
        assets, name="chatty", leaderboard=root / "lb", metrics=["sleepy"],
        evaluations=[{"name": "chatty"}]))
    env = {**os.environ, "COLUMNS": "200", "STADEBENCH_CACHE": str(root / "cache"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    for var in ("STADEBENCH_DEBUG", "CI", "FORCE_COLOR", "TQDM_DISABLE", "TRANSFORMERS_VERBOSITY"):
        env.pop(var, None)
    return root, suite, env


def stadebench_cli(world, *args: str, **env: str) -> subprocess.CompletedProcess:
    root, _, base = world
    return subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, cwd=root,
                          env={**base, **env}, timeout=300)


# --- dry runs ---------------------------------------------------------------------------


def test_dry_run_of_the_llama_suite_plans_on_a_cpu_without_touching_a_device(monkeypatch, tmp_path):
    """The README's own example: `device: cuda`, three Hub models, perplexity at 4096 and 2048."""
    def touched(*args, **kwargs):
        raise AssertionError("the dry run touched a device")

    for name in ("is_available", "init", "device_count", "current_device", "get_device_name"):
        monkeypatch.setattr(torch.cuda, name, touched)
    monkeypatch.setattr("stadebench.runner.run.resolve_device", touched)
    r = invoke("run", REPO / "suites" / "llama.yaml", "--dry-run", "--leaderboard", tmp_path / "lb",
               env={"HF_HUB_OFFLINE": "1"})  # the Hub out of reach: identities degrade to a note
    assert r.exit_code == ExitCode.OK, r.output
    assert "llama: 54 cell(s) to run, 0 already done" in r.stdout
    assert r.stdout.count("perplexity(seqlen=4096)") == 54 and r.stdout.count("perplexity(seqlen=2048)") == 54
    assert "batch_size" not in r.stdout  # seqlen alone tells the two apart
    assert "cost: no past runs of these cells in" in r.stdout
    assert "'meta-llama/Llama-2-7b-hf': its Hub revision is unknown here" in r.stderr
    assert not (tmp_path / "lb").exists()


def test_dry_run_estimates_the_cost_from_past_runs(assets, tmp_path):
    evaluations = [{"name": "perplexity", "options": {"dataset": {"name": "text", "options": {
        "path": str(assets["corpus"])}}, "seqlen": seqlen, "batch_size": 4, "max_windows": 2}} for seqlen in (16, 8)]
    suite = write_suite(tmp_path / "two.yaml", suite_dict(assets, name="two", leaderboard=tmp_path / "lb",
                                                          metrics=["magnitude"], evaluations=evaluations))
    r = invoke("run", suite, "--dry-run")
    assert r.exit_code == ExitCode.OK, r.output
    assert "cost: no past runs of these cells" in r.stdout
    assert "perplexity(seqlen=16)" in r.stdout and "perplexity(seqlen=8)" in r.stdout

    assert invoke("run", suite, "--no-show").exit_code == ExitCode.OK
    r = invoke("run", suite, "--dry-run", "--force")
    assert r.exit_code == ExitCode.OK, r.output
    line = next(x for x in r.stdout.splitlines() if x.startswith("cost:"))
    assert re.fullmatch(r"cost: about \d+ s for 2 of 2 cell\(s\), peak memory about [\d.]+ GiB \(medians of past "
                        r"runs in .+ on cpu \(.+\); model loading not counted\)", line), line
    rows = [x for x in r.stdout.splitlines() if "magnitude · unstructured · 0.5" in x or "│ dense" in x]
    assert len(rows) == 2 and all(re.search(r"│ \d+ s\s+│$", x) for x in rows), rows


# --- progress ---------------------------------------------------------------------------


def test_without_a_terminal_each_phase_has_a_line_and_long_ones_a_heartbeat(world):
    r = stadebench_cli(world, "run", world[1], "--no-show", "--force", STADEBENCH_HEARTBEAT="0.2")
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    cell = "[2/2] sleepy · unstructured · 0.5"
    for start in ("check the models, cut calibration windows …", "load ", "[1/2] dense: evaluate chatty …",
                  f"{cell}: prune …", f"{cell}: evaluate chatty …"):
        assert any(x.startswith(start) for x in lines), (start, r.stderr)
    # the metric sleeps a second while pruning, the evaluator a second: heartbeats every 0.2 s
    for phase in ("prune", "evaluate chatty"):
        beats = [x for x in lines if re.fullmatch(rf"{re.escape(cell)}: {phase} … \(\d+ s\)", x)]
        assert len(beats) >= 2, (phase, r.stderr)
    done = next(x for x in lines if x.startswith(f"{cell} … ok"))
    assert re.fullmatch(rf"{re.escape(cell)} … ok \([\d.]+ s: prune [\d.]+ s, evaluate chatty [\d.]+ s\)", done)


def test_library_chatter_stays_off_stderr_unless_verbose(world):
    quiet = stadebench_cli(world, "run", world[1], "--no-show", "--force", "--only", "metric=dense")
    assert quiet.returncode == 0, quiet.stderr
    for text in CHATTER:
        assert text not in quiet.stderr, (text, quiet.stderr)
    assert "Loading weights" not in quiet.stderr  # transformers' own bar

    loud = stadebench_cli(world, "run", world[1], "--no-show", "--force", "--only", "metric=dense", "--verbose")
    assert loud.returncode == 0, loud.stderr
    for text in CHATTER:
        assert text in loud.stderr, (text, loud.stderr)


def test_on_a_terminal_the_cell_bar_has_an_eta_and_evaluation_a_live_step(world):
    r = stadebench_cli(world, "run", world[1], "--no-show", "--force", FORCE_COLOR="1")
    assert r.returncode == 0, r.stderr
    frames = ANSI.sub("", r.stderr.replace("\r", "\n"))
    assert re.search(r"cells: sleepy · unstructured · 0\.5 .* 1/2 .* eta \d+ s", frames), frames
    assert re.search(r"^  evaluate chatty +━+ +0:00:0\d", frames, re.M), frames  # a pulsing bar, its own clock
    assert re.search(r"^  prune +━+", frames, re.M), frames
    for text in CHATTER:
        assert text not in frames


def test_quiet_libraries_puts_everything_back(assets, tmp_path):
    from transformers.utils import logging as tf_logging

    before = (os.environ.get("TQDM_DISABLE"), tf_logging.get_verbosity(), logging.getLogger("lm_eval").level)
    suite = write_suite(tmp_path / "s.yaml", suite_dict(assets, leaderboard=tmp_path / "lb", metrics=["magnitude"]))
    assert invoke("run", suite, "--no-show").exit_code == ExitCode.OK
    assert (os.environ.get("TQDM_DISABLE"), tf_logging.get_verbosity(), logging.getLogger("lm_eval").level) == before


# --- version and listings ------------------------------------------------------------------


def test_version():
    r = invoke("--version")
    assert r.exit_code == ExitCode.OK, r.output
    first, second = r.stdout.splitlines()
    assert first == f"stadebench {stadebench.__version__}"
    assert second.startswith(f"torch {torch.__version__}, transformers ")


def test_list_datasets_shows_whole_plain_sentences():
    r = invoke("list", "datasets", "--format", "json")
    assert r.exit_code == ExitCode.OK, r.output
    descriptions = {row["name"]: row["description"] for row in json.loads(r.stdout)}
    assert descriptions["c4"] == ("C4 (English), first shards: train = c4-train.00000-of-01024, validation = "
                                  "c4-validation.00000-of-00008, from the Hugging Face dataset allenai/c4.")
    table = invoke("list", "datasets").stdout
    assert "allenai/c4." in table
    for kind in ("datasets", "metrics", "patterns", "allocators", "evaluators"):
        rows = json.loads(invoke("list", kind, "--format", "json").stdout)
        for row in rows:
            text = row["description"]
            assert "`" not in text and not re.search(r":\w+:", text) and "**" not in text, (kind, text)
            assert text.endswith((".", ")")), (kind, text)


@pytest.mark.parametrize(("doc", "plain"), [
    ("Uses ``prune_layer`` and\n    :class:`~stadebench.base.Metric`.\n\nMore.", "Uses prune_layer and Metric."),
    ("See :func:`the run <stadebench.run>` and `the docs <https://x.org>`_ or `Wanda`_.",
     "See the run and the docs or Wanda."),
    ("**Bold**, *emphasis*, `code` and [a link](https://x.org); |W_ij| · 2*3*4 stays.",
     "Bold, emphasis, code and a link; |W_ij| · 2*3*4 stays."),
    (None, ""),
])
def test_descriptions_lose_their_markup(doc, plain):
    assert summary(doc) == plain
