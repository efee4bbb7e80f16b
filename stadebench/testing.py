"""The conformance kit: tests a metric or pattern plugin against stadebench's contract.

Plugin authors subclass a suite in their own tests and name what they registered::

    from .testing import MetricConformance, PatternConformance

    class TestRIA(MetricConformance):
        metric = "ria"              # a registered name (or the Metric class itself)
        options = {"a": 0.5}        # optional: the options to test with

    class TestColumns(PatternConformance):
        pattern = "columns"
        def expected_pruned(self, shape, sparsity):   # optional: the exact count rule
            return shape[0] * math.floor(shape[1] * sparsity)

    class TestDepth(AllocatorConformance):
        allocator = "depth"

Each test checks one rule of ``RULES``; a failure starts with the rule's name, e.g.
``conformance rule 'score-shape': ria returned [40, 24] for a weight of [24, 40]``.
Set ``plugin = my_module`` to have the suite register your plugin for its tests when it
is not installed (or when installed plugins are not loaded).

This module is also a pytest plugin (entry point ``pytest11: stadebench``) with the
fixtures ``tiny_model``, ``calibration_windows`` and ``isolated_plugins``. The suites do
not need it: they build what they use themselves. Everything heavy (torch,
transformers) is imported inside functions, so loading the plugin costs nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest

from .base import STATISTICS, Allocator, LayerInfo, LayerResult, LayerStats, Metric, Pattern
from .errors import ConfigError, StadebenchError
from .plugins import get_plugins

#: Every rule the suites check: name -> what it requires.
RULES: dict[str, str] = {
    # metrics
    "registered": "the name is registered by a plugin, resolves to the class under test, and "
                  "stadebench.plugins.resolve builds it",
    "metadata": "name and version are non-empty strings; the class has a docstring (its first line is "
                "what `stadebench list` shows); a metric implements score or prune_layer, a pattern select, an "
                "allocator allocate",
    "statistics-declared": "statistics is a set of names drawn from {'sum', 'sumsq', 'gram'}",
    "options-unknown-key": "an unknown option key raises stadebench.ConfigError (subclass stadebench.Options)",
    "options-roundtrip": "options survive JSON: the class rebuilt from options.model_dump(mode='json') has "
                         "equal options (results record them, the runner rebuilds from them)",
    "score-shape": "score (a metric that overrides prune_layer: its LayerResult's mask and weight) has the "
                   "weight's shape",
    "score-dtype": "scores are floating point (prune_layer: a bool mask and a float weight or None), on the "
                   "weight's device",
    "score-finite": "scores are finite, also for a zero weight row or column and an input that is always 0",
    "score-deterministic": "the same inputs give the same scores, whatever the global RNG state (seed a "
                           "torch.Generator from the options and stats.layer.name, as the 'random' metric does)",
    "statistics-unrequested": "score, bias_delta and prune_layer (an allocator: allocate) read no statistic the "
                              "plugin did not declare: the engine leaves those None",
    "no-mutation": "score, bias_delta and prune_layer (a pattern: select; an allocator: allocate) leave their "
                   "input tensors (weight, statistics, mask; scores) unchanged",
    "update-shape": "the layer update is well-formed: a bias delta (bias_delta, or prune_layer's) is None or a "
                    "finite float [out] on the weight's device; prune_layer's details is a dict",
    "update-mask": "prune_layer's new weight, when it returns one, is zero wherever its mask prunes: an update "
                   "may change kept weights, never revive pruned ones",
    "realised-sparsity": "stadebench.prune on a tiny Llama prunes exactly the pattern's count in every layer",
    # patterns (also: registered, metadata, options-*, no-mutation, realised-sparsity)
    "mask-shape": "select returns a bool mask of the scores' shape and device",
    "check-shape": "check_shape raises ConfigError (nothing else) for a shape it cannot take, and select "
                   "handles every shape check_shape accepts",
    "exact-count": "select prunes exactly expected_pruned(shape, sparsity) weights; without that rule, a "
                   "count that depends only on shape and sparsity, within one row or column of numel·s",
    "ties-deterministic": "tied scores give the same mask every time, whatever the global RNG state",
    "scores-used": "select prunes the low scores: on random scores the pruned weights score lower on average than "
                   "the kept ones, and negating the scores changes the mask",
    "allocated-sparsity": "stadebench.prune with a non-uniform allocation prunes, in every layer, the pattern's "
                          "count at that layer's own sparsity (N:M refuses it with a ConfigError)",
    # allocators (also: registered, metadata, statistics-declared, statistics-unrequested, options-*, no-mutation)
    "allocation-length": "allocate returns one number per layer it was given, in order",
    "allocation-range": "every allocated sparsity lies in [0, 1), or allocate raises ConfigError for a target it "
                        "cannot serve",
    "allocation-mean": "the allocation's mean weighted by each layer's size is the target (within 1e-6): the "
                       "model is pruned as much as asked",
    "allocation-deterministic": "the same model, statistics and target give the same allocation, whatever the "
                                "global RNG state",
    "uniform-declared": "an allocator that declares uniform = True gives every layer the target",
    "allocation-realised": "stadebench.prune with the allocator prunes each layer at its allocated sparsity; over "
                           "the model the realised sparsity is the target within one weight per layer "
                           "(unstructured-layer)",
}

# Which declared statistic fills each LayerStats field (m2 comes with the mean).
_FIELD_STATISTIC = {"sum": "sum", "sumsq": "sumsq", "gram": "gram", "m2": "sum"}
BUILTIN_PATTERNS = ("unstructured", "unstructured-layer", "2:4", "4:8")
VOCAB = 128


def fail(rule: str, message: str) -> None:
    """Fail the current test, naming the rule it broke."""
    assert rule in RULES, rule
    pytest.fail(f"conformance rule '{rule}': {message}", pytrace=False)


class ConformanceError(AssertionError):
    """The plugin raised while a rule was checked; the message names the rule, the cause is chained."""


def _checks(cls: type) -> type:
    """Wrap each ``test_<rule>`` method so that an exception from the plugin names the rule."""
    for attr, fn in list(vars(cls).items()):
        if attr.startswith("test_") and callable(fn):
            rule = attr[len("test_"):].replace("_", "-")
            assert rule in RULES, rule

            def test(*args, _fn=fn, _rule=rule, **kwargs):
                try:
                    return _fn(*args, **kwargs)
                except Exception as exc:  # pytest's fail/skip are BaseExceptions and pass through
                    raise ConformanceError(f"conformance rule '{_rule}': {type(exc).__name__}: {exc}") from exc

            setattr(cls, attr, functools.wraps(fn)(test))
    return cls


def _check_metadata(cls: type, base: type, *methods: str, what: str | None = None) -> None:
    """The metadata rule: non-empty name and version, a docstring, one of ``methods`` implemented."""
    for attr in ("name", "version"):
        value = getattr(cls, attr, None)
        if not isinstance(value, str) or not value:
            fail("metadata", f"{cls.__qualname__}.{attr} must be a non-empty string, got {value!r}")
    if not (cls.__doc__ or "").strip():
        fail("metadata", f"{cls.__qualname__} has no docstring; its first line is what `stadebench list` shows")
    if all(getattr(cls, m) is getattr(base, m) for m in methods):
        fail("metadata", f"{cls.__qualname__} must implement {what or methods[0] + '()'}")


def _check_unknown_key(build: Any, options: dict[str, Any], who: str) -> None:
    """The options-unknown-key rule: ``build(options)`` with an extra key raises ConfigError."""
    try:
        build({**options, "no_such_option_xyz": 1})
    except ConfigError:
        return
    except Exception as exc:  # noqa: BLE001 - anything else is the failure being reported
        fail("options-unknown-key", f"{who} raised {type(exc).__name__} for an unknown option key, "
                                    f"not stadebench.ConfigError; make its Options subclass stadebench.Options")
    fail("options-unknown-key", f"{who} accepted the unknown option 'no_such_option_xyz'; make its "
                                f"Options subclass stadebench.Options (extra keys forbidden)")


def _shape(t: Any) -> str:
    return str(list(t.shape)) if hasattr(t, "shape") else type(t).__name__


# --- inputs ----------------------------------------------------------------------


def make_tiny_model(seed: int = 0, layers: int = 2):
    """A random ``LlamaForCausalLM`` built from a config (no download).

    Hidden 32, 4 heads (2 key/value heads), MLP 64, vocab 128: its linears are
    [32, 32], [16, 32], [64, 32] and [32, 64], all multiples of 8 wide.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()


def make_windows(n: int = 4, seqlen: int = 16, seed: int = 0):
    """LongTensor ``[n, seqlen]`` of random token ids for ``make_tiny_model``."""
    import torch

    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


class UnrequestedStatistic(Exception):
    """A metric read a statistic it did not declare in ``Metric.statistics``."""


class StrictLayerStats(LayerStats):
    """LayerStats that raises ``UnrequestedStatistic`` when an undeclared statistic is read.

    Reads are also logged in ``_reads``, so a metric that swallows the exception is caught.
    """

    def __getattribute__(self, name: str) -> Any:
        stat = _FIELD_STATISTIC.get(name)
        if stat is not None and stat not in object.__getattribute__(self, "_allowed"):
            object.__getattribute__(self, "_reads").append(name)
            raise UnrequestedStatistic(f"stats.{name} (statistic {stat!r}) was read but not declared")
        return object.__getattribute__(self, name)

    def __repr__(self) -> str:
        return f"StrictLayerStats({object.__getattribute__(self, 'layer').name}, allowed={self._allowed})"


def layer_inputs(shape: tuple[int, int] = (24, 40), *, statistics=STATISTICS, role: str | None = "internal",
                 tokens: int = 64, seed: int = 0, degenerate: bool = False, strict: bool = False,
                 device: str = "cpu"):
    """A float32 weight ``[out, in]`` and the ``LayerStats`` of random inputs, as the engine gives them.

    Inputs have per-channel means and scales. ``degenerate`` zeroes weight row 1 and column 0
    and makes input 2 always 0. Fields of undeclared statistics are None; ``strict`` makes
    reading them raise ``UnrequestedStatistic``.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    out, inp = shape
    weight = torch.randn(shape, generator=g)
    x = (torch.randn(tokens, inp, generator=g, dtype=torch.float64) * (0.5 + 2 * torch.rand(inp, generator=g))
         + torch.randn(inp, generator=g) * 0.5)
    if degenerate:
        weight[1, :] = 0
        weight[:, 0] = 0
        x[:, 2] = 0
    info = LayerInfo(f"model.layers.0.conformance.{role or 'layer'}", 0, f"conformance.{role or 'layer'}", role)
    statistics = frozenset(statistics)
    values: dict[str, Any] = {"sum": x.sum(0), "sumsq": x.square().sum(0), "gram": (x.t() @ x).float(),
                              "m2": (x - x.mean(0)).square().sum(0)}
    names = {f.name for f in dataclasses.fields(LayerStats)}
    kwargs = {k: v.to(device) for k, v in values.items() if k in names and _FIELD_STATISTIC[k] in statistics}
    cls = StrictLayerStats if strict else LayerStats
    stats = cls(info, tokens if statistics else 0, **kwargs)
    if strict:
        object.__setattr__(stats, "_allowed", statistics)
        object.__setattr__(stats, "_reads", [])
    return weight.to(device), stats


def _stat_tensors(stats: LayerStats) -> dict[str, Any]:
    import torch

    return {f.name: object.__getattribute__(stats, f.name) for f in dataclasses.fields(LayerStats)
            if isinstance(object.__getattribute__(stats, f.name), torch.Tensor)}


def _same(a, b) -> bool:
    """Equal shape, dtype and values, NaN equal to NaN."""
    import torch

    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())
    return bool(torch.equal(a, b))


def _same_output(a, b) -> bool:
    """Two scores, or two ``LayerResult`` s, are the same (NaN equal to NaN)."""
    if not isinstance(a, LayerResult):
        return not isinstance(b, LayerResult) and _same(a, b)
    if not isinstance(b, LayerResult) or a.details != b.details:
        return False
    pairs = ((a.mask, b.mask), (a.weight, b.weight), (a.bias_delta, b.bias_delta))
    return all(x is None and y is None or x is not None and y is not None and _same(x, y) for x, y in pairs)


def documented_count(pattern: Pattern, shape: tuple[int, int], sparsity: float) -> int | None:
    """The count the built-in patterns document; None for any other pattern."""
    from .core.patterns import NM, Unstructured, UnstructuredLayer

    rows, cols = shape
    if type(pattern) is Unstructured:
        return rows * math.floor(cols * sparsity)
    if type(pattern) is UnstructuredLayer:
        return math.floor(rows * cols * sparsity)
    if type(pattern) is NM:
        return rows * (cols // pattern.m) * pattern.n
    return None


def expected_count(pattern: Pattern, shape: tuple[int, int], sparsity: float) -> int:
    """Weights ``pattern`` prunes in a ``shape`` matrix: the documented rule, else what it
    selects on random scores (the exact-count rule makes that independent of the scores)."""
    import torch

    count = documented_count(pattern, shape, sparsity)
    if count is None:
        count = int(pattern.select(torch.rand(shape, generator=torch.Generator().manual_seed(0)), sparsity).sum())
    return count


def _patterns_to_test(explicit: tuple[str, ...] | None) -> list[str]:
    if explicit is not None:
        return list(explicit)
    specs = list(BUILTIN_PATTERNS)
    for reg in get_plugins().patterns:
        if reg.name not in specs and reg.cls.matches(reg.name):
            specs.append(reg.name)
    return specs


def _prune_cases(specs: list[str], sparsities: tuple[float, ...]) -> Iterator[Any]:
    for spec in specs:
        try:
            pattern = get_plugins().patterns.get(spec).cls.from_spec(spec)
            fixed = pattern.resolve_sparsity(None) if pattern.default_sparsity is None else None
        except StadebenchError:
            fixed = None
        if fixed is not None:
            yield pytest.param((spec, None), id=spec)
        else:
            for s in sparsities:
                yield pytest.param((spec, s), id=f"{spec}-{s:g}")


def _check_realised(report, model, pattern: Pattern, sparsity: float, who: str, expected_fn) -> None:
    from .core.models import weight_of

    if not report.layers:
        fail("realised-sparsity", f"{who}: prune reported no layers")
    total = pruned_total = 0
    for layer in report.layers:
        shape = tuple(layer.shape)
        want = expected_fn(shape, sparsity)
        zeros = int((weight_of(model.get_submodule(layer.name)) == 0).sum())
        if layer.pruned != want:
            fail("realised-sparsity", f"{who}: layer {layer.name} {list(shape)} pruned {layer.pruned} weights; "
                                      f"pattern {pattern.spec!r} at sparsity {sparsity:g} prunes exactly {want}")
        if zeros < want:
            fail("realised-sparsity", f"{who}: layer {layer.name} reports {layer.pruned} pruned weights but only "
                                      f"{zeros} of its weights are zero")
        total += shape[0] * shape[1]
        pruned_total += want
    if not math.isclose(report.sparsity, pruned_total / total, rel_tol=1e-9, abs_tol=1e-12):
        fail("realised-sparsity", f"{who}: report.sparsity is {report.sparsity}, expected {pruned_total / total}")


class _Conformance:
    plugin: ClassVar[Any] = None
    """A plugin (module or object) to register for these tests when it is not registered yet."""
    options: ClassVar[dict[str, Any]] = {}
    """Options the plugin is tested with."""
    device: ClassVar[str] = "cpu"
    """Where tensors live in the tests (set "cuda" to also test on a GPU)."""

    @pytest.fixture(autouse=True, scope="class")
    @classmethod
    def _stadebench_plugin(cls):
        plugin = cls.plugin
        plugins = get_plugins()
        if plugin is None or plugins.pm.is_registered(plugin):
            yield
            return
        name = plugins.register(plugin, name=getattr(plugin, "__name__", type(plugin).__name__))
        try:
            yield
        finally:
            if get_plugins() is plugins and plugins.pm.has_plugin(name):
                plugins.unregister(name)


# --- metrics ---------------------------------------------------------------------


def _registered(kind: str, item: str | type) -> type:
    """The class a registered name stands for (a class is returned as it is)."""
    if not isinstance(item, str):
        return item
    try:
        return get_plugins().registries[kind].get(item).cls
    except ConfigError as exc:
        fail("registered", str(exc))


@_checks
class MetricConformance(_Conformance):
    """Subclass as ``TestMyMetric`` and set ``metric``: every method checks one rule.

    Attributes to set: ``metric`` (registered name or class), optionally ``options``,
    ``plugin``, ``patterns`` (specs to prune with; default the built-in four plus every
    other registered pattern), ``sparsities`` (for patterns without a fixed one),
    ``shape`` (of the test weights; keep it non-square), ``device``.
    """

    metric: ClassVar[str | type[Metric]]
    patterns: ClassVar[tuple[str, ...] | None] = None
    sparsities: ClassVar[tuple[float, ...]] = (0.3, 0.5)
    shape: ClassVar[tuple[int, int]] = (24, 40)

    def pytest_generate_tests(self, metafunc):
        if "prune_case" in metafunc.fixturenames:
            cls = metafunc.cls
            metafunc.parametrize("prune_case", list(_prune_cases(_patterns_to_test(cls.patterns), cls.sparsities)))

    # helpers

    @property
    def name(self) -> str:
        return self.metric if isinstance(self.metric, str) else self.metric.name

    def metric_class(self) -> type[Metric]:
        return _registered("metric", self.metric)

    def make(self) -> Metric:
        """A fresh instance with ``options``."""
        try:
            return self.metric_class()(self.options)
        except ConfigError as exc:
            fail("options-roundtrip", f"{self.name} rejects the options under test {self.options}: {exc}")

    def roles(self, metric: Metric) -> list[str | None]:
        # Data-free pruning runs no forward pass, so the engine knows no role.
        return [None] if metric.data_free() else ["normed", "internal"]

    @staticmethod
    def scored(metric: Metric) -> bool:
        """Whether the metric is decided by its scores (the default ``prune_layer``), not by
        a ``prune_layer`` of its own (a solver)."""
        return type(metric).prune_layer is Metric.prune_layer

    @staticmethod
    def unstructured() -> Pattern:
        return get_plugins().patterns.get("unstructured").cls.from_spec("unstructured")

    def run(self, metric: Metric, weight, stats):
        """Scores, or the ``LayerResult`` of a metric's own ``prune_layer`` under per-row 50% sparsity."""
        if self.scored(metric):
            return metric.score(weight, stats)
        return metric.prune_layer(weight, stats, self.unstructured(), 0.5)

    def layer_result(self, metric: Metric, weight, stats) -> LayerResult:
        """What the engine gets for the layer: ``prune_layer`` under per-row 50% sparsity
        (a scored metric's scores are checked first, to name the rule they break)."""
        if self.scored(metric):
            self.mask(metric, weight, stats)
        return metric.prune_layer(weight, stats, self.unstructured(), 0.5)

    def outputs(self, role: str | None, **kw):
        metric = self.make()
        weight, stats = layer_inputs(self.shape, statistics=STATISTICS, role=role, device=self.device, **kw)
        return metric, weight, stats, self.run(metric, weight, stats)

    def mask(self, metric: Metric, weight, stats):
        """The per-row 50% mask of the metric's scores (score-shape checked first)."""
        scores = metric.score(weight, stats)
        if getattr(scores, "shape", None) != weight.shape:
            fail("score-shape", f"{self.name} returned {_shape(scores)} for a weight of {list(weight.shape)}")
        return self.unstructured().select(scores.float(), 0.5)

    def each_output(self, **kw):
        for role in self.roles(self.make()):
            yield (role, *self.outputs(role, **kw))

    # rules

    def test_registered(self):
        plugins = get_plugins()
        try:
            reg = plugins.metrics.get(self.name)
        except ConfigError as exc:
            fail("registered", f"{exc} Register it in a `register_metrics(register)` hook of an installed plugin, "
                               f"or set `plugin = <your module>` on this test class.")
        if not isinstance(self.metric, str) and reg.cls is not self.metric:
            fail("registered", f"metric {self.name!r} resolves to {reg.cls.__qualname__} registered by {reg.plugin}, "
                               f"not to {self.metric.__qualname__}")
        from .plugins import resolve

        metric, _ = resolve(self.name, "unstructured", dict(self.options))
        if not isinstance(metric, reg.cls):
            fail("registered", f"resolve({self.name!r}) built a {type(metric).__name__}, not a {reg.cls.__name__}")

    def test_metadata(self):
        _check_metadata(self.metric_class(), Metric, "score", "prune_layer",
                        what="score(), or prune_layer() (a solver)")

    def test_statistics_declared(self):
        declared = self.metric_class().statistics
        if not isinstance(declared, (set, frozenset)) or not all(isinstance(s, str) for s in declared):
            fail("statistics-declared", f"{self.name}.statistics must be a frozenset of names, got {declared!r}")
        unknown = set(declared) - STATISTICS
        if unknown:
            fail("statistics-declared", f"{self.name} declares unknown statistics {sorted(unknown)}; the engine "
                                        f"collects only {sorted(STATISTICS)}")

    def test_options_unknown_key(self):
        _check_unknown_key(self.metric_class(), self.options, self.name)

    def test_options_roundtrip(self):
        metric = self.make()
        try:
            dumped = json.loads(json.dumps(metric.options.model_dump(mode="json")))
            again = type(metric)(dumped)
        except Exception as exc:  # noqa: BLE001
            fail("options-roundtrip", f"{self.name} options {metric.options!r} do not survive JSON: {exc}")
        if again.options != metric.options:
            fail("options-roundtrip", f"{self.name} options {metric.options!r} came back as {again.options!r}")

    def test_score_shape(self):
        for role, metric, weight, _, out in self.each_output():
            if not self.scored(metric):
                if not isinstance(out, LayerResult):
                    fail("score-shape", f"{self.name}.prune_layer returned {type(out).__name__}, not a "
                                        "stadebench.LayerResult")
                for what, t in (("mask", out.mask), ("weight", out.weight)):
                    if (t is not None or what == "mask") and getattr(t, "shape", None) != weight.shape:
                        fail("score-shape", f"{self.name}.prune_layer returned a {what} of {_shape(t)} for a "
                                            f"weight of {list(weight.shape)}")
            elif getattr(out, "shape", None) != weight.shape:
                fail("score-shape", f"{self.name} returned {_shape(out)} for a weight of {list(weight.shape)} "
                                    f"(role {role})")

    def test_score_dtype(self):
        import torch

        for _, metric, weight, _, out in self.each_output():
            if isinstance(out, LayerResult):
                mask, new = out.mask, out.weight
                if mask.dtype != torch.bool or (new is not None and not new.is_floating_point()):
                    got = "no" if new is None else f"a {new.dtype}"
                    fail("score-dtype", f"{self.name}.prune_layer returned a {mask.dtype} mask and {got} weight; "
                                        f"expected torch.bool and a float dtype (or None)")
                tensors = [t for t in (mask, new) if t is not None]
            else:
                if not out.is_floating_point():
                    fail("score-dtype", f"{self.name} returned {out.dtype} scores; expected a float dtype")
                tensors = [out]
            for t in tensors:
                if t.device != weight.device:
                    fail("score-dtype", f"{self.name} returned a tensor on {t.device} for a weight on {weight.device}")

    def test_score_finite(self):
        import torch

        for degenerate in (False, True):
            for role, metric, _, _, out in self.each_output(degenerate=degenerate):
                tensors = [out.weight] if isinstance(out, LayerResult) else [out]
                for t in tensors:
                    if t is not None and t.is_floating_point() and not torch.isfinite(t).all():
                        bad = int((~torch.isfinite(t)).sum())
                        case = ("a zero weight row and column and an input that is always 0" if degenerate
                                else "random inputs")
                        fail("score-finite", f"{self.name} returned {bad} NaN/Inf values on {case} (role {role})")

    def test_score_deterministic(self):
        import torch

        for role in self.roles(self.make()):
            runs = []
            for seed in (0, 12345):
                torch.manual_seed(seed)
                runs.append(self.outputs(role)[3])
            if not _same_output(*runs):
                fail("score-deterministic", f"{self.name} gave different results for the same inputs in two runs "
                                            f"(role {role}); derive any randomness from a torch.Generator seeded "
                                            f"from the options and stats.layer.name, never the global RNG")

    def test_statistics_unrequested(self):
        metric = self.make()
        for role in self.roles(metric):
            weight, stats = layer_inputs(self.shape, statistics=metric.statistics, role=role, strict=True,
                                         device=self.device)
            try:
                out = self.run(metric, weight, stats)
                if self.scored(metric) and getattr(out, "shape", None) == weight.shape:
                    metric.bias_delta(weight, self.unstructured().select(out.float(), 0.5), stats)
            except UnrequestedStatistic as exc:
                fail("statistics-unrequested", f"{self.name}: {exc}; add it to {type(metric).__name__}.statistics "
                                               f"(declared: {sorted(metric.statistics)})")
            reads = object.__getattribute__(stats, "_reads")
            if reads:
                fail("statistics-unrequested", f"{self.name} read stats.{reads[0]}, which it did not declare "
                                               f"(declared: {sorted(metric.statistics)})")

    def test_no_mutation(self):
        import torch

        for role in self.roles(self.make()):
            metric = self.make()
            weight, stats = layer_inputs(self.shape, role=role, device=self.device)
            w0, s0 = weight.clone(), {k: v.clone() for k, v in _stat_tensors(stats).items()}
            self.run(metric, weight, stats)
            self._unchanged(weight, w0, stats, s0, "score" if self.scored(metric) else "prune_layer")
            if not self.scored(metric):
                continue
            mask = self.mask(self.make(), weight, stats)
            m0 = mask.clone()
            metric.bias_delta(weight, mask, stats)
            self._unchanged(weight, w0, stats, s0, "bias_delta")
            if not torch.equal(mask, m0):
                fail("no-mutation", f"{self.name}.bias_delta changed the mask it was given")

    def _unchanged(self, weight, w0, stats, s0, what):
        if not _same(weight, w0):
            fail("no-mutation", f"{self.name}.{what} changed the weight it was given (the engine passes the "
                                f"layer's own storage: this would change the model); work on a copy")
        for key, before in s0.items():
            if not _same(object.__getattribute__(stats, key), before):
                fail("no-mutation", f"{self.name}.{what} changed stats.{key} (statistics are shared between "
                                    f"layers that read the same input)")

    def _updates(self):
        """``(role, weight, LayerResult)`` for each role, as the engine would apply them."""
        metric = self.make()
        for role in self.roles(metric):
            weight, stats = layer_inputs(self.shape, role=role, device=self.device)
            yield role, weight, self.layer_result(metric, weight, stats)

    def test_update_shape(self):
        import torch

        what = "bias_delta" if self.scored(self.make()) else "prune_layer"
        for role, weight, result in self._updates():
            delta, rows = result.bias_delta, weight.shape[0]
            if delta is not None and not (isinstance(delta, torch.Tensor) and tuple(delta.shape) == (rows,)
                                          and delta.is_floating_point() and delta.device == weight.device
                                          and bool(torch.isfinite(delta).all())):
                got = f"{_shape(delta)} {getattr(delta, 'dtype', '')} on {getattr(delta, 'device', '?')}"
                fail("update-shape", f"{self.name}.{what} (role {role}) returned a bias delta of {got}; expected "
                                     f"None or a finite float [{rows}] on {weight.device}")
            if not isinstance(result.details, dict):
                fail("update-shape", f"{self.name}.prune_layer (role {role}) returned details of type "
                                     f"{type(result.details).__name__}; expected a dict")

    def test_update_mask(self):
        for role, weight, result in self._updates():
            new, mask = result.weight, result.mask
            if new is None or getattr(new, "shape", None) != weight.shape or mask.shape != weight.shape:
                continue  # no new weight (or one score-shape fails)
            alive = int((new[mask] != 0).sum())
            if alive:
                fail("update-mask", f"{self.name}.prune_layer returned a weight with {alive} pruned weights "
                                    f"non-zero (role {role})")

    def test_realised_sparsity(self, prune_case):
        import stadebench

        spec, sparsity = prune_case
        pattern = get_plugins().patterns.get(spec).cls.from_spec(spec)
        model = make_tiny_model()
        from .core.models import find_blocks, prunable_layers, weight_of

        for block in find_blocks(model)[1]:
            for _, layer in prunable_layers(block):
                try:
                    pattern.check_shape(tuple(weight_of(layer).shape))
                except ConfigError as exc:
                    pytest.skip(f"pattern {spec!r} does not fit the tiny model: {exc}")
        try:
            report = stadebench.prune(model, make_windows(), metric=self.name, pattern=spec, sparsity=sparsity,
                                      metric_options=dict(self.options), batch_size=2, device=self.device)
        except Exception as exc:  # noqa: BLE001 - reported under the rule's name
            fail("realised-sparsity", f"stadebench.prune(metric={self.name!r}, pattern={spec!r}) raised "
                                      f"{type(exc).__name__}: {exc}")
        s = pattern.resolve_sparsity(sparsity)
        _check_realised(report, model, pattern, s, f"{self.name} with {spec}",
                        lambda shape, s: expected_count(pattern, shape, s))


# --- patterns --------------------------------------------------------------------


@_checks
class PatternConformance(_Conformance):
    """Subclass as ``TestMyPattern`` and set ``pattern``: every method checks one rule.

    Attributes to set: ``pattern`` (spec as written in suites, or the class), optionally
    ``options``, ``plugin``, ``sparsities``, ``shapes`` (``[out, in]`` score matrices;
    shapes ``check_shape`` rejects are skipped), ``device``; override ``expected_pruned``
    with the pattern's exact count rule.
    """

    pattern: ClassVar[str | type[Pattern]]
    sparsities: ClassVar[tuple[float, ...]] = (0.0, 0.1, 0.25, 0.5, 0.7, 0.9)
    shapes: ClassVar[tuple[tuple[int, int], ...]] = ((16, 32), (8, 64), (5, 40), (3, 7), (1, 1))

    def expected_pruned(self, shape: tuple[int, int], sparsity: float) -> int | None:
        """How many weights ``select`` prunes in a ``shape`` matrix at ``sparsity``; None: not stated.

        The default knows the built-in patterns. Override it for yours.
        """
        return documented_count(self.make(), shape, sparsity)

    # helpers

    @property
    def spec(self) -> str:
        return self.pattern if isinstance(self.pattern, str) else self.pattern.name

    def pattern_class(self) -> type[Pattern]:
        return _registered("pattern", self.pattern)

    def make(self) -> Pattern:
        try:
            return self.pattern_class().from_spec(self.spec, dict(self.options))
        except ConfigError as exc:
            fail("options-roundtrip", f"pattern {self.spec!r} rejects the options under test {self.options}: {exc}")

    def cases(self, pattern: Pattern) -> Iterator[tuple[tuple[int, int], float]]:
        """(shape, sparsity) pairs the pattern accepts."""
        sparsities = []
        if pattern.default_sparsity is None:
            sparsities.append(pattern.resolve_sparsity(None))
        for s in self.sparsities:
            try:
                value = pattern.resolve_sparsity(s)
            except ConfigError:
                continue
            if value not in sparsities:
                sparsities.append(value)
        for shape in self.shapes:
            try:
                pattern.check_shape(shape)
            except ConfigError:
                continue
            for s in sparsities:
                yield shape, s

    def scores(self, shape, seed: int = 0, kind: str = "random"):
        import torch

        g = torch.Generator().manual_seed(seed)
        if kind == "ties":
            t = torch.randint(0, 3, shape, generator=g).float()
        elif kind == "equal":
            t = torch.ones(shape)
        else:
            t = torch.rand(shape, generator=g)
        return t.to(self.device)

    def select(self, pattern: Pattern, scores, sparsity: float, rule: str):
        try:
            return pattern.select(scores, sparsity)
        except Exception as exc:  # noqa: BLE001 - reported under the rule's name
            fail(rule, f"{pattern.spec}.select on {_shape(scores)} scores at sparsity {sparsity:g} raised "
                       f"{type(exc).__name__}: {exc}")

    def expected(self, pattern: Pattern, shape, sparsity: float) -> int:
        want = self.expected_pruned(shape, sparsity)
        return expected_count(pattern, shape, sparsity) if want is None else want

    # rules

    def test_registered(self):
        try:
            reg = get_plugins().patterns.get(self.spec)
        except ConfigError as exc:
            fail("registered", f"{exc} Register it in a `register_patterns(register)` hook of an installed plugin, "
                               f"or set `plugin = <your module>` on this test class.")
        if not isinstance(self.pattern, str) and reg.cls is not self.pattern:
            fail("registered", f"pattern {self.spec!r} resolves to {reg.cls.__qualname__} registered by "
                               f"{reg.plugin}, not to {self.pattern.__qualname__}")
        pattern = self.make()
        if pattern.spec not in get_plugins().patterns or get_plugins().patterns.get(pattern.spec).cls is not reg.cls:
            fail("registered", f"the spec {pattern.spec!r} recorded in results does not resolve back to "
                               f"{reg.cls.__qualname__}")

    def test_metadata(self):
        _check_metadata(self.pattern_class(), Pattern, "select")

    def test_options_unknown_key(self):
        _check_unknown_key(lambda options: self.pattern_class().from_spec(self.spec, options), self.options,
                           f"pattern {self.spec!r}")

    def test_options_roundtrip(self):
        pattern = self.make()
        dumped = json.loads(json.dumps(pattern.options.model_dump(mode="json")))
        try:
            again = get_plugins().patterns.get(pattern.spec).cls.from_spec(pattern.spec, dumped)
        except Exception as exc:  # noqa: BLE001
            fail("options-roundtrip", f"pattern {pattern.spec!r} cannot be rebuilt from its spec and options "
                                      f"{dumped}: {exc}")
        if again.spec != pattern.spec or again.options != pattern.options:
            fail("options-roundtrip", f"pattern {pattern.spec!r} {pattern.options!r} came back as {again.spec!r} "
                                      f"{again.options!r}")

    def test_mask_shape(self):
        import torch

        pattern = self.make()
        for shape, s in self.cases(pattern):
            scores = self.scores(shape)
            mask = self.select(pattern, scores, s, "mask-shape")
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != shape \
                    or mask.device != scores.device:
                got = f"{mask.dtype} {_shape(mask)} on {mask.device}" if isinstance(mask, torch.Tensor) else repr(mask)
                fail("mask-shape", f"{pattern.spec}.select returned {got} for scores of {list(shape)} on "
                                   f"{scores.device}; expected a torch.bool mask of the same shape and device")

    def test_check_shape(self):
        pattern = self.make()
        accepted = 0
        for shape in self.shapes:
            try:
                pattern.check_shape(shape)
            except ConfigError:
                continue
            except Exception as exc:  # noqa: BLE001
                fail("check-shape", f"{pattern.spec}.check_shape({shape}) raised {type(exc).__name__}, "
                                    f"not ConfigError: {exc}")
            accepted += 1
            for s in (0.5, 0.9):
                try:
                    s = pattern.resolve_sparsity(s)
                except ConfigError:
                    s = pattern.resolve_sparsity(None)
                self.select(pattern, self.scores(shape), s, "check-shape")
        if not accepted:
            fail("check-shape", f"{pattern.spec}.check_shape rejects every test shape {list(self.shapes)}; "
                                f"set `shapes` on the test class")

    def test_exact_count(self):
        pattern = self.make()
        for shape, s in self.cases(pattern):
            counts = [int(self.select(pattern, self.scores(shape, seed, kind), s, "exact-count").sum())
                      for seed, kind in ((0, "random"), (1, "random"), (2, "ties"), (3, "equal"))]
            want = self.expected_pruned(shape, s)
            if want is not None:
                if any(c != want for c in counts):
                    fail("exact-count", f"{pattern.spec} pruned {counts} weights of {list(shape)} at sparsity {s:g} "
                                        f"(random, random, tied, equal scores); the rule says exactly {want}")
                continue
            if len(set(counts)) > 1:
                fail("exact-count", f"{pattern.spec} pruned {counts} weights of {list(shape)} at sparsity {s:g} "
                                    f"for different scores; the count must depend only on shape and sparsity")
            rows, cols = shape
            if abs(counts[0] / (rows * cols) - s) >= max(1 / rows, 1 / cols) and counts[0] != math.floor(
                    rows * cols * s):
                fail("exact-count", f"{pattern.spec} pruned {counts[0]} of {rows * cols} weights at sparsity {s:g}, "
                                    f"more than a row or column away; override expected_pruned to state the rule")

    def test_no_mutation(self):
        pattern = self.make()
        for shape, s in self.cases(pattern):
            scores = self.scores(shape, kind="ties")
            before = scores.clone()
            self.select(pattern, scores, s, "no-mutation")
            if not _same(scores, before):
                fail("no-mutation", f"{pattern.spec}.select changed the scores it was given ({list(shape)}, "
                                    f"sparsity {s:g})")

    def test_scores_used(self):
        pattern = self.make()
        for shape, s in self.cases(pattern):
            scores = self.scores(shape, seed=7)
            mask = self.select(pattern, scores, s, "scores-used")
            if not 0 < int(mask.sum()) < mask.numel():
                continue
            pruned, kept = float(scores[mask].mean()), float(scores[~mask].mean())
            if not pruned < kept:
                fail("scores-used", f"{pattern.spec} on random scores of {list(shape)} at sparsity {s:g}: the "
                                    f"pruned weights' mean score {pruned:.3f} is not below the kept ones' "
                                    f"{kept:.3f}; prune the lowest scores")
            if bool((self.select(pattern, -scores, s, "scores-used") == mask).all()):
                fail("scores-used", f"{pattern.spec} picked the same mask of {list(shape)} at sparsity {s:g} for "
                                    f"negated scores: the mask must follow the scores")

    def test_allocated_sparsity(self):
        import stadebench

        from .core.models import layer_names

        pattern = self.make()
        model = make_tiny_model(layers=2)
        names = layer_names(model)
        shares = {name: (0.25, 0.5, 0.75)[i % 3] for i, name in enumerate(names)}
        if not pattern.per_layer_sparsity:
            from .core import engine
            from .plugins import resolve_metric

            try:
                engine.prune(model, None, resolve_metric("magnitude"), pattern, allocation=shares)
            except ConfigError:
                return
            fail("allocated-sparsity", f"{pattern.spec} declares per_layer_sparsity = False but pruned layers at "
                                       f"sparsities other than its own without a ConfigError")
        from .core import engine
        from .plugins import resolve_metric

        try:
            report = engine.prune(model, None, resolve_metric("magnitude"), pattern, 0.5, allocation=shares,
                                  device=self.device)
        except ConfigError as exc:
            pytest.skip(f"pattern {pattern.spec!r} does not fit the tiny model: {exc}")
        for layer in report.layers:
            want = self.expected(pattern, tuple(layer.shape), shares[layer.name])
            if layer.pruned != want:
                fail("allocated-sparsity", f"{pattern.spec}: layer {layer.name} {list(layer.shape)} allocated "
                                           f"{shares[layer.name]:g} pruned {layer.pruned} weights; at that "
                                           f"sparsity the pattern prunes {want}")
        del stadebench

    def test_ties_deterministic(self):
        import torch

        pattern = self.make()
        for shape, s in self.cases(pattern):
            for kind in ("ties", "equal"):
                masks = []
                for seed in (0, 12345):
                    torch.manual_seed(seed)
                    masks.append(self.select(pattern, self.scores(shape, kind=kind), s, "ties-deterministic"))
                if not torch.equal(*masks):
                    what = "tied" if kind == "ties" else "all-equal"
                    fail("ties-deterministic", f"{pattern.spec} picked different masks for the same {what} scores "
                                               f"of {list(shape)} at sparsity {s:g}; break ties by position")

    @pytest.mark.parametrize("metric", ["magnitude", "wanda"])
    def test_realised_sparsity(self, metric):
        import stadebench

        pattern = self.make()
        sparsities = [pattern.resolve_sparsity(None)] if pattern.default_sparsity is None else [0.3, 0.5]
        for s in sparsities:
            model = make_tiny_model()
            try:
                report = stadebench.prune(model, make_windows(), metric=metric, pattern=pattern, sparsity=s,
                                          batch_size=2, device=self.device)
            except ConfigError as exc:
                pytest.skip(f"pattern {pattern.spec!r} does not fit the tiny model: {exc}")
            except Exception as exc:  # noqa: BLE001
                fail("realised-sparsity", f"stadebench.prune(metric={metric!r}, pattern={pattern.spec!r}) raised "
                                          f"{type(exc).__name__}: {exc}")
            _check_realised(report, model, pattern, s, f"{pattern.spec} with {metric}",
                            lambda shape, s: self.expected(pattern, shape, s))


# --- allocators --------------------------------------------------------------------


@_checks
class AllocatorConformance(_Conformance):
    """Subclass as ``TestMyAllocator`` and set ``allocator``: every method checks one rule.

    Attributes to set: ``allocator`` (a registered name or the class), optionally
    ``options``, ``plugin``, ``sparsities`` (targets to test) and ``blocks`` (decoder blocks
    of the tiny Llama the allocations are computed on; OWL needs several to differ).
    """

    allocator: ClassVar[str | type[Allocator]]
    sparsities: ClassVar[tuple[float, ...]] = (0.1, 0.5, 0.7)
    blocks: ClassVar[int] = 4

    @property
    def name(self) -> str:
        return self.allocator if isinstance(self.allocator, str) else self.allocator.name

    def allocator_class(self) -> type[Allocator]:
        return _registered("allocator", self.allocator)

    def make(self) -> Allocator:
        try:
            return self.allocator_class()(dict(self.options))
        except ConfigError as exc:
            fail("options-roundtrip", f"allocator {self.name!r} rejects the options under test {self.options}: {exc}")

    def layers(self, allocator: Allocator, strict: bool = True):
        """The tiny model's layers as an allocator sees them, with strict statistics."""
        from .core import allocation
        from .core.engine import collect_statistics
        from .core.models import layer_names

        model = make_tiny_model(layers=self.blocks)
        statistics = None
        if not allocator.data_free():
            statistics = collect_statistics(model, make_windows(8, 32), STATISTICS, batch_size=4)
            if strict:
                for stats in statistics.layers.values():
                    object.__setattr__(stats, "__class__", StrictLayerStats)
                    object.__setattr__(stats, "_allowed", allocator.statistics)
                    object.__setattr__(stats, "_reads", [])
        return model, allocation.allocation_layers(model, layer_names(model), statistics)

    def allocate(self, allocator: Allocator, layers, sparsity: float, rule: str):
        try:
            return allocator.allocate(layers, sparsity)
        except ConfigError:
            raise
        except UnrequestedStatistic as exc:
            fail("statistics-unrequested", f"allocator {self.name!r}: {exc}")
        except Exception as exc:  # noqa: BLE001
            fail(rule, f"allocator {self.name!r}.allocate at sparsity {sparsity:g} raised {type(exc).__name__}: {exc}")

    def each(self, rule: str, strict: bool = True):
        """(layers, sparsity, values) for every target the allocator serves."""
        allocator = self.make()
        _, layers = self.layers(allocator, strict)
        for s in self.sparsities:
            try:
                values = self.allocate(allocator, layers, s, rule)
            except ConfigError:
                continue
            yield layers, s, values

    # rules

    def test_registered(self):
        try:
            reg = get_plugins().allocators.get(self.name)
        except ConfigError as exc:
            fail("registered", f"{exc} Register it in a `register_allocators(register)` hook of an installed "
                               f"plugin, or set `plugin = <your module>` on this test class.")
        if not isinstance(self.allocator, str) and reg.cls is not self.allocator:
            fail("registered", f"allocator {self.name!r} resolves to {reg.cls.__qualname__} registered by "
                               f"{reg.plugin}, not to {self.allocator.__qualname__}")

    def test_metadata(self):
        _check_metadata(self.allocator_class(), Allocator, "allocate")

    def test_statistics_declared(self):
        declared = getattr(self.allocator_class(), "statistics", None)
        if not isinstance(declared, frozenset | set) or not set(declared) <= STATISTICS:
            fail("statistics-declared", f"allocator {self.name!r} declares statistics {declared!r}; use a set drawn "
                                        f"from {sorted(STATISTICS)}")

    def test_statistics_unrequested(self):
        for layers, _, _ in self.each("statistics-unrequested"):
            reads = sorted({r for entry in layers if entry.stats is not None
                            for r in object.__getattribute__(entry.stats, "_reads")})
            if reads:
                fail("statistics-unrequested", f"allocator {self.name!r} read {reads} without declaring them "
                                               f"in statistics")

    def test_options_unknown_key(self):
        _check_unknown_key(self.allocator_class(), self.options, f"allocator {self.name!r}")

    def test_options_roundtrip(self):
        allocator = self.make()
        dumped = json.loads(json.dumps(allocator.options.model_dump(mode="json")))
        again = self.allocator_class()(dumped)
        if again.options != allocator.options:
            fail("options-roundtrip", f"allocator {self.name!r} {allocator.options!r} came back as {again.options!r}")

    def test_no_mutation(self):
        allocator = self.make()
        _, layers = self.layers(allocator, strict=False)
        before = [(entry.module.weight.detach().clone(), {k: v.clone() for k, v in _stat_tensors(entry.stats).items()}
                   if entry.stats is not None else {}) for entry in layers]
        for s in self.sparsities:
            try:
                self.allocate(allocator, layers, s, "no-mutation")
            except ConfigError:
                continue
        for entry, (weight, stats) in zip(layers, before):
            now = _stat_tensors(entry.stats) if entry.stats is not None else {}
            if not _same(entry.module.weight.detach(), weight) or any(not _same(now[k], v) for k, v in stats.items()):
                fail("no-mutation", f"allocator {self.name!r} changed the weight or statistics of {entry.layer.name}")

    def test_allocation_length(self):
        for layers, s, values in self.each("allocation-length"):
            if not isinstance(values, list | tuple) or len(values) != len(layers) or not all(
                    isinstance(v, int | float) and not isinstance(v, bool) for v in values):
                fail("allocation-length", f"allocator {self.name!r} at sparsity {s:g} returned {values!r:.80}; "
                                          f"expected a list of {len(layers)} numbers")

    def test_allocation_range(self):
        for layers, s, values in self.each("allocation-range"):
            bad = [(entry.layer.name, v) for entry, v in zip(layers, values) if not 0.0 <= float(v) < 1.0]
            if bad:
                fail("allocation-range", f"allocator {self.name!r} at sparsity {s:g} gave {bad[0][0]} "
                                         f"{bad[0][1]!r}, outside [0, 1); raise ConfigError for a target it cannot "
                                         f"serve")

    def test_allocation_mean(self):
        served = 0
        for layers, s, values in self.each("allocation-mean"):
            served += 1
            total = sum(entry.numel for entry in layers)
            mean = sum(float(v) * entry.numel for entry, v in zip(layers, values)) / total
            if abs(mean - s) > 1e-6:
                fail("allocation-mean", f"allocator {self.name!r}: size-weighted mean {mean:.6g} for a target of "
                                        f"{s:g}")
        if not served:
            fail("allocation-mean", f"allocator {self.name!r} refused every target {list(self.sparsities)}")

    def test_allocation_deterministic(self):
        import torch

        allocator = self.make()
        _, layers = self.layers(allocator, strict=False)
        for s in self.sparsities:
            runs = []
            for seed in (0, 12345):
                torch.manual_seed(seed)
                try:
                    runs.append([float(v) for v in self.allocate(allocator, layers, s, "allocation-deterministic")])
                except ConfigError:
                    break
            if len(runs) == 2 and runs[0] != runs[1]:
                fail("allocation-deterministic", f"allocator {self.name!r} gave two allocations at sparsity {s:g}")

    def test_uniform_declared(self):
        if not getattr(self.allocator_class(), "uniform", False):
            return
        for _, s, values in self.each("uniform-declared"):
            if any(float(v) != s for v in values):
                fail("uniform-declared", f"allocator {self.name!r} declares uniform = True but gave "
                                         f"{sorted(set(map(float, values)))[:3]} at sparsity {s:g}")

    def test_allocation_realised(self):
        import stadebench

        allocator = self.make()
        for s in self.sparsities:
            model = make_tiny_model(layers=self.blocks)
            try:
                report = stadebench.prune(model, make_windows(8, 32), "wanda", "unstructured-layer", s,
                                          allocation=allocator, batch_size=4, device=self.device)
            except ConfigError:
                continue
            total = 0
            for layer in report.layers:
                want = math.floor(layer.shape[0] * layer.shape[1] * layer.allocated)
                if layer.pruned != want:
                    fail("allocation-realised", f"allocator {self.name!r}: layer {layer.name} allocated "
                                                f"{layer.allocated:g} pruned {layer.pruned}, not {want}")
                total += layer.shape[0] * layer.shape[1]
            pruned = sum(layer.pruned for layer in report.layers)
            if abs(pruned - s * total) > len(report.layers) + 1e-6 * total:
                fail("allocation-realised", f"allocator {self.name!r}: {pruned} of {total} weights pruned for a "
                                            f"target of {s:g}, more than one weight per layer away")


# --- pytest plugin: fixtures -----------------------------------------------------


@pytest.fixture
def tiny_model():
    """A fresh random 2-block ``LlamaForCausalLM`` (same weights every time); see ``make_tiny_model``."""
    return make_tiny_model()


@pytest.fixture
def calibration_windows():
    """LongTensor ``[4, 16]`` of random token ids for ``tiny_model``."""
    return make_windows()


@pytest.fixture
def isolated_plugins(monkeypatch):
    """A fresh plugin manager holding only the built-ins (no installed plugin loads); restored after."""
    from .plugins import reset_plugins

    monkeypatch.setenv("STADEBENCH_LOAD_PLUGINS", "")
    monkeypatch.delenv("STADEBENCH_BLOCK_PLUGINS", raising=False)
    reset_plugins()
    yield get_plugins()
    reset_plugins()


def pytest_report_header(config):
    """Which stadebench and which installed stadebench plugins this run sees (nothing is imported)."""
    import importlib.metadata

    from .version import __version__

    names = sorted({ep.name for ep in importlib.metadata.entry_points(group="stadebench")})
    return f"stadebench {__version__}; installed plugins: {', '.join(names) or 'none'}"


__all__ = [
    "AllocatorConformance", "BUILTIN_PATTERNS", "RULES", "MetricConformance", "PatternConformance", "StrictLayerStats",
    "UnrequestedStatistic", "calibration_windows", "documented_count", "expected_count", "fail",
    "isolated_plugins", "layer_inputs", "make_tiny_model", "make_windows", "tiny_model",
]
