"""A third-party plugin works with no core change: RIA (plugins/stadebench-ria) and the
columns pattern (plugins/stadebench-structured) by name through ``stadebench.prune``,
suites, the runner and the CLI; loaded from an entry point as ``pip install`` would; and
without the plugin, a suite naming ``ria`` fails with a hint to install it.

The plugins are imported from their folders (or from site-packages when a nox session
installed them); entry points are faked by patching ``importlib.metadata.entry_points``,
which is what stadebench.plugins calls.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

import stadebench
from stadebench.results import store as lb
from stadebench.errors import ConfigError, UnknownNameError
from stadebench.plugins import ENTRY_POINT_GROUP, get_plugins, reset_plugins
from stadebench.runner.run import run_suite
from stadebench.suite import expand, parse_suite
from stadebench.testing import make_tiny_model, make_windows
from tinymodel import shared_assets, suite_dict

REPO = Path(__file__).resolve().parents[1]
PLUGINS = {"stadebench_ria": REPO / "plugins" / "stadebench-ria",
           "stadebench_structured": REPO / "plugins" / "stadebench-structured"}


@pytest.fixture(autouse=True)
def isolated(isolated_plugins, monkeypatch, tmp_path):
    """No installed plugin loads unless a test says so (a fresh manager before and after),
    and a private cache."""
    monkeypatch.setenv("STADEBENCH_CACHE", str(tmp_path / "cache"))


def plugin_module(monkeypatch, module: str):
    """The plugin module: installed, or else from its folder in plugins/."""
    try:
        importlib.util.find_spec(module) or monkeypatch.syspath_prepend(str(PLUGINS[module]))
    except ValueError:  # in sys.modules without a spec
        pass
    return importlib.import_module(module)


@pytest.fixture
def ria(monkeypatch):
    return plugin_module(monkeypatch, "stadebench_ria")


@pytest.fixture
def structured(monkeypatch):
    return plugin_module(monkeypatch, "stadebench_structured")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return shared_assets(tmp_path_factory)


@dataclass
class FakeDist:
    name: str
    version: str


@dataclass
class FakeEntryPoint:
    """What ``importlib.metadata.entry_points`` yields for an installed distribution."""

    name: str
    value: str
    dist: FakeDist
    group: str = ENTRY_POINT_GROUP

    def load(self):
        return importlib.metadata.EntryPoint(self.name, self.value, self.group).load()


def install(monkeypatch, *entry_points: FakeEntryPoint) -> None:
    """Make stadebench see ``entry_points`` as installed (and load them: no allow-list)."""
    def fake(**params):
        group = params.get("group")
        return [ep for ep in entry_points if group in (None, ep.group)]

    monkeypatch.setattr(importlib.metadata, "entry_points", fake)
    monkeypatch.delenv("STADEBENCH_LOAD_PLUGINS", raising=False)
    reset_plugins()


RIA_EP = FakeEntryPoint("ria", "stadebench_ria", FakeDist("stadebench-ria", "0.1.0"))
STRUCTURED_EP = FakeEntryPoint("structured", "stadebench_structured", FakeDist("stadebench-structured", "0.1.0"))

SUITE = """
models: [HuggingFaceTB/SmolLM2-135M]
metrics:
  - wanda
  - ria
  - {name: ria, options: {a: 0}, label: ria-a0}
patterns: [unstructured, "2:4"]
sparsities: [0.5]
"""


# --- registered in-process: usable by name ---------------------------------------


def test_register_metrics_plugin_prunes_by_name(ria):
    get_plugins().register(ria, name="stadebench_ria")
    model = make_tiny_model()
    report = stadebench.prune(model, make_windows(), metric="ria", pattern="unstructured", sparsity=0.5)
    assert (report.metric, report.metric_options, report.pattern) == ("ria", {"a": 0.5}, "unstructured")
    assert report.sparsity == 0.5 and report.block_passes > 0  # a calibrated metric: forward passes ran
    # RIA's masks, not another metric's: they differ from Wanda's on the same windows
    wanda = make_tiny_model()
    stadebench.prune(wanda, make_windows(), metric="wanda", pattern="unstructured", sparsity=0.5)
    q_ria, q_wanda = (m.model.layers[0].self_attn.q_proj.weight == 0 for m in (model, wanda))
    assert int(q_ria.sum()) == int(q_wanda.sum()) == q_ria.numel() // 2
    assert not (q_ria == q_wanda).all()


def test_register_patterns_plugin_prunes_by_name(structured):
    get_plugins().register(structured, name="stadebench_structured")
    model = make_tiny_model()
    report = stadebench.prune(model, make_windows(), metric="wanda", pattern="columns:max", sparsity=0.25)
    assert report.pattern == "columns:max" and report.sparsity == 0.25
    w = model.model.layers[1].mlp.down_proj.weight  # [32, 64]: 16 whole input columns
    assert int((w == 0).all(0).sum()) == 16


def test_suite_names_plugin_items(ria, structured):
    get_plugins().register(ria, name="stadebench_ria")
    get_plugins().register(structured, name="stadebench_structured")
    suite = parse_suite(SUITE.replace('"2:4"]', '"2:4", {name: columns, options: {reduce: l2}}]'), "ria.yaml")
    cells = [(c.metric_label, c.metric_options, c.pattern) for c in expand(suite) if not c.dense]
    assert ("ria", {"a": 0.5}, "2:4") in cells
    assert ("ria-a0", {"a": 0.0}, "columns:l2") in cells
    assert len(cells) == 9


def test_runner_records_the_plugin_that_scored(monkeypatch, ria, assets, tmp_path):
    install(monkeypatch, RIA_EP)
    suite = parse_suite(json.dumps(suite_dict(assets, metrics=("wanda", "ria"), dense=False,
                                              leaderboard=str(tmp_path / "lb"))), "ria.yaml")
    summary = run_suite(suite)
    assert summary.failed == [] and len(summary.finished) == 2
    rows = {r["metric"]: r for r in lb.read(tmp_path / "lb").to_pylist()}
    assert (rows["ria"]["metric_plugin"], rows["ria"]["metric_plugin_version"]) == ("stadebench-ria", "0.1.0")
    assert rows["wanda"]["metric_plugin"] == "stadebench"
    assert rows["ria"]["actual_sparsity"] == 0.5 and rows["ria"]["value"] != rows["wanda"]["value"]


# --- not installed: a clear error with a hint ------------------------------------


def test_without_the_plugin_the_suite_fails_with_a_hint():
    with pytest.raises(ConfigError) as info:
        parse_suite(SUITE, "ria.yaml")
    message = str(info.value)
    assert message.startswith("ria.yaml:5: metrics[1]") and "unknown metric 'ria'" in message
    assert "pip install" in message and "stadebench list metrics" in message


def test_without_the_plugin_prune_fails_with_a_hint():
    with pytest.raises(UnknownNameError, match=r"unknown metric 'ria'.*pip install"):
        stadebench.prune(make_tiny_model(), make_windows(), metric="ria")


def test_without_the_plugin_the_cli_exits_2_with_a_hint(tmp_path):
    from stadebench.cli import ExitCode, app

    path = tmp_path / "ria.yaml"
    path.write_text(SUITE, encoding="utf-8")
    result = CliRunner().invoke(app, ["validate", str(path)], env={"COLUMNS": "1000", "STADEBENCH_DEBUG": None})
    assert result.exit_code == ExitCode.USAGE
    output = " ".join(result.output.split())
    assert "unknown metric 'ria'" in output and "pip install" in output
    assert "Traceback" not in output


# --- installed: loaded from the entry point --------------------------------------


def test_entry_point_loads_the_plugin(monkeypatch, ria):
    install(monkeypatch, RIA_EP, STRUCTURED_EP)
    plugins = get_plugins()
    reg = plugins.metrics.get("ria")
    assert reg.cls.name == "ria" and reg.plugin == "ria"
    assert plugins.provenance(reg.plugin) == ("stadebench-ria", "0.1.0")
    assert plugins.info["ria"].hooks == ["register_metrics"] and plugins.info["ria"].registered == ["metric ria"]
    assert plugins.patterns.get("columns:l2").plugin == "structured"
    assert plugins.problems() == []
    parse_suite(SUITE, "ria.yaml")  # now valid


def test_entry_point_plugins_are_listed(monkeypatch, ria):
    from stadebench.cli import app

    install(monkeypatch, RIA_EP)
    result = CliRunner().invoke(app, ["list", "metrics", "--format", "json"], env={"COLUMNS": "1000"})
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert (rows["ria"]["plugin"], rows["ria"]["plugin_version"], rows["ria"]["options"]) == (
        "stadebench-ria", "0.1.0", "a")


@pytest.mark.parametrize("env,loaded", [({"STADEBENCH_BLOCK_PLUGINS": "ria"}, False),
                                        ({"STADEBENCH_LOAD_PLUGINS": "ria"}, True),
                                        ({"STADEBENCH_LOAD_PLUGINS": "structured"}, False)])
def test_entry_point_allow_and_block_lists(monkeypatch, ria, env, loaded):
    install(monkeypatch, RIA_EP, STRUCTURED_EP)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    reset_plugins()
    assert ("ria" in get_plugins().metrics) is loaded


def test_a_broken_entry_point_is_reported_not_fatal(monkeypatch, ria):
    install(monkeypatch, RIA_EP, FakeEntryPoint("ghost", "stadebench_ghost_not_installed", FakeDist("ghost", "1")))
    plugins = get_plugins()
    assert "ria" in plugins.metrics
    (name, message), = plugins.problems()
    assert name == "ghost" and "ModuleNotFoundError" in message
