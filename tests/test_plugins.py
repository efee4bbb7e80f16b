"""Plugin manager and registries: built-ins, duplicates, unknown names, broken plugins,
entry-point selection by environment variables, the metrics' options models, and the
table of kinds (``stadebench.kinds.KINDS``) that the registries, hooks, resolve and
``stadebench list`` derive from."""

from __future__ import annotations

import importlib.metadata
import json
import types

import pytest

import stadebench
from stadebench import Metric, hookimpl, hookspecs
from stadebench.core.patterns import NM
from stadebench.errors import ConfigError, PluginError, UnknownNameError
from stadebench.hookspecs import hookspec
from stadebench.kinds import KINDS, Kind
from stadebench.plugins import DEFAULT_PLUGINS, Plugins, get_plugins, resolve, resolve_plugin

BUILTIN_METRICS = {"magnitude": "stadebench.core.metrics.basic", "random": "stadebench.core.metrics.basic",
                   "wanda": "stadebench.core.metrics.basic", "stade": "stadebench.core.metrics.stade",
                   "stade-w": "stadebench.core.metrics.stade", "sparsegpt": "stadebench.core.metrics.sparsegpt",
                   "gblm": "stadebench.core.metrics.gradient", "pruner-zero": "stadebench.core.metrics.gradient"}


# No installed entry points, and a fresh process-wide manager before and after each test.
pytestmark = pytest.mark.usefixtures("isolated_plugins")


def metric_class(name, version="1"):
    return type(f"Metric_{name.replace('-', '_')}", (Metric,), {"name": name, "version": version,
                                                               "score": lambda self, w, s: w.abs()})


def plugin_module(modname, *classes, fail=None):
    """A module with a register_metrics hook registering ``classes`` (then raising ``fail``)."""
    module = types.ModuleType(modname)

    @hookimpl
    def register_metrics(register):
        for cls in classes:
            register(cls)
        if fail is not None:
            raise fail

    module.register_metrics = register_metrics
    return module


# ----------------------------------------------------------------------------------------
# built-ins


def test_builtins_are_registered_as_plugins():
    plugins = get_plugins()
    for name, plugin in BUILTIN_METRICS.items():
        reg = plugins.metrics.get(name)
        assert (reg.name, reg.plugin, reg.kind) == (name, plugin, "metric")
        assert issubclass(reg.cls, Metric) and reg.cls.name == name and reg.version == reg.cls.version
    assert set(BUILTIN_METRICS) <= set(plugins.metrics.names())
    assert {"unstructured", "unstructured-layer"} <= set(plugins.patterns.names())
    for plugin in DEFAULT_PLUGINS:  # registered through the same hooks as third-party plugins
        assert plugin in plugins.info and plugins.info[plugin].hooks
    assert "metric wanda" in plugins.info["stadebench.core.metrics.basic"].registered
    assert plugins.problems() == []


@pytest.mark.parametrize("spec,n,m", [("2:4", 2, 4), ("4:8", 4, 8), ("1:4", 1, 4)])
def test_nm_specs_resolve_to_the_nm_pattern(spec, n, m):
    patterns = get_plugins().patterns
    assert spec in patterns
    reg = patterns.get(spec)
    assert reg.cls is NM
    pattern = reg.cls.from_spec(spec)
    assert (pattern.n, pattern.m, pattern.spec, pattern.group_size) == (n, m, spec, m)


@pytest.mark.parametrize("spec", ["unstructured", "unstructured-layer"])
def test_unstructured_specs_resolve_to_their_own_classes(spec):
    reg = get_plugins().patterns.get(spec)
    assert reg.cls.name == spec and reg.cls is not NM
    assert reg.cls.from_spec(spec).spec == spec


# ----------------------------------------------------------------------------------------
# duplicates, unknown names, broken plugins


def test_duplicate_name_second_registration_is_skipped_and_reported():
    from stadebench.core.metrics.basic import Wanda

    plugins = get_plugins()
    impostor = metric_class("wanda", version="9")
    plugins.register(plugin_module("impostor", impostor), name="impostor")
    reg = plugins.metrics.get("wanda")
    assert reg.cls is Wanda and reg.plugin == "stadebench.core.metrics.basic"  # the first one stays
    problems = dict(plugins.problems())
    assert set(problems) == {"impostor"}
    assert "wanda" in problems["impostor"] and "skipped" in problems["impostor"]


def test_duplicate_between_two_third_party_plugins_keeps_the_first():
    plugins = get_plugins()
    first, second = metric_class("twin"), metric_class("twin")
    plugins.register(plugin_module("first", first), name="first")
    plugins.register(plugin_module("second", second), name="second")
    assert plugins.metrics.get("twin").cls is first
    assert [name for name, _ in plugins.problems()] == ["second"]


def test_problems_are_reported_once_however_often_registries_are_rebuilt():
    plugins = get_plugins()
    plugins.register(plugin_module("dup", metric_class("twin"), metric_class("twin")), name="dup")
    plugins.metrics  # build the registries
    plugins.register(plugin_module("unrelated"), name="unrelated")  # forces a rebuild
    plugins.metrics
    (name, message), = plugins.problems()
    assert name == "dup"
    assert message.count("already registered") == 1


@pytest.mark.parametrize("kind,typo,suggestion", [("metrics", "wandaa", "wanda"), ("metrics", "stade_w", "stade-w"),
                                                  ("patterns", "unstructed", "unstructured")])
def test_unknown_names_suggest_close_ones(kind, typo, suggestion):
    with pytest.raises(UnknownNameError) as info:
        getattr(get_plugins(), kind).get(typo)
    message = str(info.value)
    assert f"did you mean '{suggestion}'" in message
    assert isinstance(info.value, ConfigError) and isinstance(info.value, KeyError)
    assert info.value.name == typo


def test_unknown_name_through_prune(tiny_llama):
    with pytest.raises(UnknownNameError, match="did you mean 'magnitude'"):
        stadebench.prune(tiny_llama, None, metric="magnitud")
    with pytest.raises(UnknownNameError, match="Known metrics: .*sparsegpt"):
        stadebench.prune(tiny_llama, None, metric="obs-something-else")


def test_a_plugin_whose_hook_raises_is_reported_not_fatal():
    plugins = get_plugins()
    survivor = metric_class("survivor")
    plugins.register(plugin_module("broken", survivor, fail=RuntimeError("boom")), name="broken")
    assert set(BUILTIN_METRICS) <= set(plugins.metrics.names())
    problems = dict(plugins.problems())
    assert "broken" in problems and "boom" in problems["broken"]
    assert plugins.patterns.get("2:4").cls is NM  # other kinds unaffected


def test_invalid_registrations_are_reported():
    plugins = get_plugins()
    nameless = type("Nameless", (Metric,), {})
    plugins.register(plugin_module("odd", object, nameless), name="odd")
    assert set(BUILTIN_METRICS) <= set(plugins.metrics.names())
    (name, message), = plugins.problems()
    assert name == "odd" and "not a Metric subclass" in message and "has no name" in message


# ----------------------------------------------------------------------------------------
# entry points


class FakeDist:
    def __init__(self, name, version):
        self.name, self.version = name, version


class FakeEntryPoint:
    def __init__(self, name, target, dist="stadebench-fake", version="0.3"):
        self.name, self._target, self.dist = name, target, FakeDist(dist, version)
        self.loaded = False

    def load(self):
        self.loaded = True
        if isinstance(self._target, Exception):
            raise self._target
        return self._target


@pytest.fixture
def fake_entry_points(monkeypatch):
    points = {
        "alpha": FakeEntryPoint("alpha", plugin_module("alpha_mod", metric_class("alpha-metric"))),
        "beta": FakeEntryPoint("beta", plugin_module("beta_mod", metric_class("beta-metric")), dist="beta-dist"),
    }
    groups = []

    def entry_points(**kwargs):
        groups.append(kwargs.get("group"))
        return list(points.values())

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    return points, groups


@pytest.mark.parametrize("load,block,expected", [
    (None, None, {"alpha", "beta"}),
    ("alpha", None, {"alpha"}),
    (" alpha , beta ", None, {"alpha", "beta"}),
    ("", None, set()),
    (None, "beta", {"alpha"}),
    ("alpha,beta", "beta", {"alpha"}),
    (None, "alpha,beta", set()),
])
def test_entry_points_allow_and_block_lists(monkeypatch, fake_entry_points, load, block, expected):
    points, groups = fake_entry_points
    for var, value in (("STADEBENCH_LOAD_PLUGINS", load), ("STADEBENCH_BLOCK_PLUGINS", block)):
        if value is None:
            monkeypatch.delenv(var, raising=False)
        else:
            monkeypatch.setenv(var, value)
    plugins = Plugins()
    assert groups == ["stadebench"]
    assert {name for name, ep in points.items() if ep.loaded} == expected  # blocked ones are not even imported
    names = set(plugins.metrics.names())
    for name in ("alpha", "beta"):
        assert (f"{name}-metric" in names) == (name in expected)
        if name in expected:
            info = plugins.info[name]
            assert info.distribution == points[name].dist.name and info.version == "0.3"
            assert info.registered == [f"metric {name}-metric"]
    assert plugins.problems() == []


def test_a_broken_entry_point_is_reported_and_skipped(monkeypatch, fake_entry_points):
    points, _ = fake_entry_points
    points["gamma"] = FakeEntryPoint("gamma", ImportError("no module named gamma_dep"))
    monkeypatch.delenv("STADEBENCH_LOAD_PLUGINS")
    plugins = Plugins()
    assert {"alpha-metric", "beta-metric"} <= set(plugins.metrics.names())
    problems = dict(plugins.problems())
    assert set(problems) == {"gamma"} and "gamma_dep" in problems["gamma"]


def test_an_entry_point_name_used_twice_loads_once(monkeypatch, fake_entry_points):
    points, _ = fake_entry_points
    points["alpha2"] = FakeEntryPoint("alpha", plugin_module("alpha_again", metric_class("alpha-again")),
                                      dist="other-dist")
    monkeypatch.delenv("STADEBENCH_LOAD_PLUGINS")
    plugins = Plugins()
    names = set(plugins.metrics.names())
    assert "alpha-metric" in names and "alpha-again" not in names
    assert not points["alpha2"].loaded
    assert any("used twice" in message for _, message in plugins.problems())


# ----------------------------------------------------------------------------------------
# options


@pytest.mark.parametrize("name", sorted(BUILTIN_METRICS))
def test_metric_options_reject_unknown_keys(name, tiny_llama):
    cls = get_plugins().metrics.get(name).cls
    with pytest.raises(ConfigError, match="nope"):
        cls({"nope": 1})
    with pytest.raises(ConfigError, match="nope"):
        stadebench.prune(tiny_llama, None, metric=name, metric_options={"nope": 1})


def test_metric_option_defaults():
    metrics = get_plugins().metrics
    assert metrics.get("stade").cls().options.bias_correction is True
    assert metrics.get("stade-w").cls().options.bias_correction is True
    opts = metrics.get("sparsegpt").cls().options
    assert (opts.blocksize, opts.percdamp, opts.update) == (128, 0.01, True)
    assert metrics.get("random").cls().options.seed == 0
    for name in ("magnitude", "wanda"):
        assert metrics.get(name).cls().options.model_dump() == {}


@pytest.mark.parametrize("name,options", [
    ("sparsegpt", {"blocksize": 0}), ("sparsegpt", {"percdamp": 0.0}), ("sparsegpt", {"percdamp": -1}),
    ("sparsegpt", {"update": "sometimes"}), ("stade", {"bias_correction": "maybe"}), ("random", {"seed": "x"}),
])
def test_metric_options_reject_bad_values(name, options):
    with pytest.raises(ConfigError, match=name):
        get_plugins().metrics.get(name).cls(options)


def test_metric_options_are_recorded_and_frozen():
    metric = get_plugins().metrics.get("sparsegpt").cls({"blocksize": 64, "update": False})
    assert metric.options.model_dump() == {"blocksize": 64, "percdamp": 0.01, "update": False, "damping_retries": 3,
                                             "order": "fused"}
    with pytest.raises(Exception):
        metric.options.blocksize = 32


# ----------------------------------------------------------------------------------------
# the table of kinds: everything derives from KINDS


def test_hookspecs_have_one_documented_register_hook_per_kind():
    specs = {name: fn for name, fn in vars(hookspecs).items() if hasattr(fn, "stadebench_spec")}
    assert sorted(specs) == sorted(kind.hook for kind in KINDS.values())
    for name, fn in specs.items():
        assert (fn.__doc__ or "").strip(), f"hookspec {name} has no docstring"
        assert name in hookspecs.__all__


@pytest.mark.parametrize("name", list(KINDS))
def test_each_kind_names_its_base_class_registry_and_suite(name):
    kind = KINDS[name]
    base = kind.base_class()
    assert isinstance(base, type) and base.kind == name and kind.hook == f"register_{kind.plural}"
    registry = get_plugins().registries[name]
    assert registry.base is base and registry.kind == name
    assert getattr(get_plugins(), kind.plural) is registry
    assert all(issubclass(reg.cls, base) for reg in registry) and registry.names()
    suite = kind.conformance_class()
    assert (suite is None) == (name in ("dataset", "evaluator"))
    if suite is not None:
        assert suite.__name__ == f"{base.__name__}Conformance"


def test_resolve_plugin_builds_names_and_passes_instances_through():
    metric = resolve_plugin("metric", "sparsegpt", {"blocksize": 64})
    assert type(metric).name == "sparsegpt" and metric.options.blocksize == 64
    pattern = resolve_plugin("pattern", "2:4")  # built from its spec
    assert isinstance(pattern, NM) and (pattern.n, pattern.m) == (2, 4)
    assert resolve_plugin("metric", metric) is metric and resolve_plugin("pattern", pattern, {}) is pattern
    assert resolve("wanda", "unstructured")[1].spec == "unstructured"


@pytest.mark.parametrize("kind,item,message", [
    ("metric", "wanda", "metric_options go with a metric name, not a Metric instance"),
    ("pattern", "2:4", "pattern_options go with a pattern spec, not a Pattern instance"),
    ("allocator", "uniform", "allocation_options go with an allocator name, not an Allocator instance"),
])
def test_options_with_an_instance_are_refused_with_the_same_words(kind, item, message):
    instance = resolve_plugin(kind, item)
    with pytest.raises(ConfigError) as info:
        resolve_plugin(kind, instance, {"x": 1})
    assert str(info.value) == message


class Widget:
    """Base class of a throw-away kind (the tests' stand-in for a new kind)."""

    kind = "widget"
    version = "1"
    Options = stadebench.Options

    def __init__(self, options=None):
        self.options = self.Options.model_validate(dict(options or {}))


class GizmoOptions(stadebench.Options):
    size: int = 1


class Gizmo(Widget):
    """A widget that does nothing."""

    name = "gizmo"
    Options = GizmoOptions


def test_adding_a_kind_is_one_entry_plus_its_hookspec(monkeypatch):
    from typer.testing import CliRunner

    from stadebench.cli import app
    from stadebench.cli import registry as cli_registry

    # the one entry ...
    monkeypatch.setitem(KINDS, "widget", Kind("widget", "widgets", f"{__name__}:Widget",
                                              "widget options go with a widget name, not a Widget instance"))

    # ... and its hook, which stadebench.hookspecs would declare (with its documentation)
    class WidgetSpecs:
        @hookspec
        def register_widgets(self, register):
            """Register widgets."""

    plugins = get_plugins()
    plugins.pm.add_hookspecs(WidgetSpecs)

    @hookimpl
    def register_widgets(register):
        register(Gizmo)

    plugins.register(types.SimpleNamespace(register_widgets=register_widgets), name="widget-plugin")

    assert plugins.registries["widget"].get("gizmo").cls is Gizmo and plugins.widgets.names() == ["gizmo"]
    assert plugins.info["widget-plugin"].registered == ["widget gizmo"] and plugins.problems() == []
    assert resolve_plugin("widget", "gizmo", {"size": 3}).options.size == 3
    with pytest.raises(UnknownNameError, match="stadebench list widgets"):
        resolve_plugin("widget", "gizmoo")

    # the command's choices are built from KINDS when the CLI is imported: build them again
    monkeypatch.setattr(cli_registry, "KindName", cli_registry.kind_names())
    r = CliRunner().invoke(app, ["list", "widgets", "--format", "json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    (row,) = json.loads(r.stdout)
    assert (row["name"], row["plugin"], row["options"], row["statistics"]) == ("gizmo", "widget-plugin", "size", None)
    assert row["description"] == "A widget that does nothing."


def test_a_kind_without_its_hookspec_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(KINDS, "widget", Kind("widget", "widgets", f"{__name__}:Widget", "-"))
    with pytest.raises(PluginError, match="register_widgets"):
        Plugins(load_entry_points=False).registries  # noqa: B018
