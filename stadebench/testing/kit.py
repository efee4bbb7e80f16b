"""The kit shared by the conformance suites: the rules, failures, tiny inputs and counts."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest

from ..base import STATISTICS, LayerInfo, LayerResult, LayerStats, Pattern
from ..errors import ConfigError, StadebenchError
from ..plugins import get_plugins

#: Every rule the suites check: name -> what it requires.
RULES: dict[str, str] = {
    # metrics
    "registered": "the name is registered by a plugin, resolves to the class under test, and "
                  "stadebench.plugins.resolve builds it",
    "metadata": "name and version are non-empty strings; the class has a docstring (its first line is "
                "what `stadebench list` shows); a metric implements score or prune_layer, a pattern select, an "
                "allocator allocate, a refiner refine, a reconstructor reconstruct (neither named 'none', a suite's "
                "word for no stage)",
    "statistics-declared": "statistics is a set of names drawn from {'sum', 'sumsq', 'gram', 'window_var', "
                           "'gradient'} (an allocator, refiner or reconstructor: the input statistics only, no "
                           "gradients)",
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
    "statistics-unrequested": "score, bias_delta and prune_layer (an allocator: allocate; a refiner: refine; a "
                              "reconstructor: reconstruct) read no statistic the plugin did not declare: the engine "
                              "leaves those None",
    "no-mutation": "score, bias_delta and prune_layer (a pattern: select; an allocator: allocate; a refiner: "
                   "refine; a reconstructor: reconstruct) leave their input tensors (weight, statistics, mask; "
                   "scores) unchanged",
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
    # refiners and reconstructors (also: registered, metadata, statistics-declared, statistics-unrequested,
    # options-*, no-mutation)
    "refine-mask": "refine returns a bool mask of the input mask's shape, on the weight's device, for every pattern "
                   "supports() accepts (and it accepts one of those tested)",
    "refine-count": "the refined mask prunes as many weights in every row as the metric's mask (unstructured "
                    "patterns at several sparsities; dense, solver-updated and degenerate weights; masks of "
                    "magnitude and of random scores, and with a row pruned entirely)",
    "refine-pattern": "supports(pattern) returns None or a non-empty reason; for an N:M pattern it supports, the "
                      "refined mask prunes as many weights in every group of pattern.group_size columns as the "
                      "metric's: exactly N of every M",
    "reconstruct-shape": "reconstruct returns a stadebench.Reconstruction: weight None or a float [out, in] tensor, "
                         "bias_delta None or a float [out] tensor, both on the weight's device; details a "
                         "JSON-serialisable dict",
    "reconstruct-finite": "the returned weight and bias delta are finite, also for a zero weight row and column, an "
                          "input that is always 0, a row pruned entirely and a row not pruned at all",
    "reconstruct-mask": "the returned weight is exactly 0 wherever the mask prunes: a reconstructor updates kept "
                        "weights, never revives a pruned one",
    "memory-estimate": "memory_bytes(rows, columns) returns a non-negative int, for small and model-sized layers "
                       "(a suite whose largest layer would not fit is refused before anything runs)",
    "stage-deterministic": "the same inputs give the same mask (a reconstructor: the same weight, bias delta and "
                           "details), whatever the global RNG state and however often the instance ran before",
}

# Which declared statistic fills each LayerStats field (m2 comes with the mean).
FIELD_STATISTIC = {"sum": "sum", "sumsq": "sumsq", "gram": "gram", "m2": "sum", "grad_l1": "gradient",
                   "grad_l2": "gradient", "window_m2": "window_var"}
BUILTIN_PATTERNS = ("unstructured", "unstructured-layer", "2:4", "4:8")
VOCAB = 128


def fail(rule: str, message: str) -> None:
    """Fail the current test, naming the rule it broke."""
    assert rule in RULES, rule
    pytest.fail(f"conformance rule '{rule}': {message}", pytrace=False)


class ConformanceError(AssertionError):
    """The plugin raised while a rule was checked; the message names the rule, the cause is chained."""


def rule_checks(cls: type) -> type:
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


def check_metadata(cls: type, base: type, *methods: str, what: str | None = None) -> None:
    """The metadata rule: non-empty name and version, a docstring, one of ``methods`` implemented."""
    for attr in ("name", "version"):
        value = getattr(cls, attr, None)
        if not isinstance(value, str) or not value:
            fail("metadata", f"{cls.__qualname__}.{attr} must be a non-empty string, got {value!r}")
    if not (cls.__doc__ or "").strip():
        fail("metadata", f"{cls.__qualname__} has no docstring; its first line is what `stadebench list` shows")
    if all(getattr(cls, m) is getattr(base, m) for m in methods):
        fail("metadata", f"{cls.__qualname__} must implement {what or methods[0] + '()'}")


def check_unknown_key(build: Any, options: dict[str, Any], who: str) -> None:
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


def shape_text(t: Any) -> str:
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
        stat = FIELD_STATISTIC.get(name)
        if stat is not None and stat not in object.__getattribute__(self, "_allowed"):
            object.__getattribute__(self, "_reads").append(name)
            raise UnrequestedStatistic(f"stats.{name} (statistic {stat!r}) was read but not declared")
        return object.__getattribute__(self, name)

    def __repr__(self) -> str:
        return f"StrictLayerStats({object.__getattribute__(self, 'layer').name}, allowed={self._allowed})"


def _within(windows):
    """Σ_w Σ_t (x − μ_w)² of ``[windows, tokens, in]`` inputs."""
    return (windows - windows.mean(1, keepdim=True)).square().sum((0, 1))


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
    # 4 windows' gradients, scaled x100 as GBLM's; a weight whose input is always 0 gets none
    grads = torch.randn(4, out, inp, generator=g) * 1e-2 * x.abs().mean(0).float()
    values: dict[str, Any] = {"sum": x.sum(0), "sumsq": x.square().sum(0), "gram": (x.t() @ x).float(),
                              "m2": (x - x.mean(0)).square().sum(0), "grad_l1": grads.abs().sum(0) * 100,
                              "window_m2": _within(x.reshape(4, -1, inp)),
                              "grad_l2": grads.square().sum(0).sqrt() * 100}
    names = {f.name for f in dataclasses.fields(LayerStats)}
    kwargs = {k: v.to(device) for k, v in values.items() if k in names and FIELD_STATISTIC[k] in statistics}
    cls = StrictLayerStats if strict else LayerStats
    stats = cls(info, tokens if statistics else 0, **kwargs, windows=4 if statistics else 0)
    if strict:
        object.__setattr__(stats, "_allowed", statistics)
        object.__setattr__(stats, "_reads", [])
    return weight.to(device), stats


def stat_tensors(stats: LayerStats) -> dict[str, Any]:
    import torch

    return {f.name: object.__getattribute__(stats, f.name) for f in dataclasses.fields(LayerStats)
            if isinstance(object.__getattribute__(stats, f.name), torch.Tensor)}


def same_tensor(a, b) -> bool:
    """Equal shape, dtype and values, NaN equal to NaN."""
    import torch

    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())
    return bool(torch.equal(a, b))


def same_output(a, b) -> bool:
    """Two scores, or two ``LayerResult`` s, are the same (NaN equal to NaN)."""
    if not isinstance(a, LayerResult):
        return not isinstance(b, LayerResult) and same_tensor(a, b)
    if not isinstance(b, LayerResult) or a.details != b.details:
        return False
    pairs = ((a.mask, b.mask), (a.weight, b.weight), (a.bias_delta, b.bias_delta))
    return all(x is None and y is None or x is not None and y is not None and same_tensor(x, y) for x, y in pairs)


def documented_count(pattern: Pattern, shape: tuple[int, int], sparsity: float) -> int | None:
    """The count the built-in patterns document; None for any other pattern."""
    from ..core.patterns import NM, Unstructured, UnstructuredLayer

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


def patterns_to_test(explicit: tuple[str, ...] | None) -> list[str]:
    if explicit is not None:
        return list(explicit)
    specs = list(BUILTIN_PATTERNS)
    for reg in get_plugins().patterns:
        if reg.name not in specs and reg.cls.matches(reg.name):
            specs.append(reg.name)
    return specs


def prune_cases(specs: list[str], sparsities: tuple[float, ...]) -> Iterator[Any]:
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


def check_realised(report, model, pattern: Pattern, sparsity: float, who: str, expected_fn) -> None:
    from ..core.models import weight_of

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


def registered(kind: str, item: str | type) -> type:
    """The class a registered name stands for (a class is returned as it is)."""
    if not isinstance(item, str):
        return item
    try:
        return get_plugins().registries[kind].get(item).cls
    except ConfigError as exc:
        fail("registered", str(exc))


@rule_checks


class Conformance:
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


__all__ = ["BUILTIN_PATTERNS", "Conformance", "ConformanceError", "FIELD_STATISTIC", "RULES", "StrictLayerStats",
           "UnrequestedStatistic", "VOCAB", "check_metadata", "check_realised", "check_unknown_key", "documented_count",
           "expected_count", "fail", "layer_inputs", "make_tiny_model", "make_windows", "patterns_to_test",
           "prune_cases", "registered", "rule_checks", "same_output", "same_tensor", "shape_text", "stat_tensors"]
