"""The metric conformance suite: a registered metric against the engine's contract."""

from __future__ import annotations

import json
from typing import ClassVar

import pytest

from ..base import STATISTICS, LayerResult, Metric, Pattern
from ..errors import ConfigError
from ..plugins import get_plugins
from .kit import (Conformance, UnrequestedStatistic, check_metadata, check_realised, check_unknown_key, expected_count,
                  fail, layer_inputs, make_tiny_model, make_windows, patterns_to_test, prune_cases, registered,
                  same_output, same_tensor, shape_text, stat_tensors)


class MetricConformance(Conformance):
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
            metafunc.parametrize("prune_case", list(prune_cases(patterns_to_test(cls.patterns), cls.sparsities)))

    # helpers

    @property
    def name(self) -> str:
        return self.metric if isinstance(self.metric, str) else self.metric.name

    def metric_class(self) -> type[Metric]:
        return registered("metric", self.metric)

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
            fail("score-shape", f"{self.name} returned {shape_text(scores)} for a weight of {list(weight.shape)}")
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
        from ..plugins import resolve

        metric, _ = resolve(self.name, "unstructured", dict(self.options))
        if not isinstance(metric, reg.cls):
            fail("registered", f"resolve({self.name!r}) built a {type(metric).__name__}, not a {reg.cls.__name__}")

    def test_metadata(self):
        check_metadata(self.metric_class(), Metric, "score", "prune_layer",
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
        check_unknown_key(self.metric_class(), self.options, self.name)

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
                        fail("score-shape", f"{self.name}.prune_layer returned a {what} of {shape_text(t)} for a "
                                            f"weight of {list(weight.shape)}")
            elif getattr(out, "shape", None) != weight.shape:
                fail("score-shape", f"{self.name} returned {shape_text(out)} for a weight of {list(weight.shape)} "
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
            if not same_output(*runs):
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
            w0, s0 = weight.clone(), {k: v.clone() for k, v in stat_tensors(stats).items()}
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
        if not same_tensor(weight, w0):
            fail("no-mutation", f"{self.name}.{what} changed the weight it was given (the engine passes the "
                                f"layer's own storage: this would change the model); work on a copy")
        for key, before in s0.items():
            if not same_tensor(object.__getattribute__(stats, key), before):
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
                got = f"{shape_text(delta)} {getattr(delta, 'dtype', '')} on {getattr(delta, 'device', '?')}"
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
        from ..core.models import find_blocks, prunable_layers, weight_of

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
        check_realised(report, model, pattern, s, f"{self.name} with {spec}",
                        lambda shape, s: expected_count(pattern, shape, s))


__all__ = ["MetricConformance"]
