"""The pattern conformance suite: a registered pattern against the mask contract."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import ClassVar

import pytest

from ..base import Pattern
from ..errors import ConfigError
from ..plugins import get_plugins
from .kit import (Conformance, check_metadata, check_realised, check_unknown_key, documented_count, expected_count,
                  fail, make_tiny_model, make_windows, registered, rule_checks, same_tensor, shape_text)


@rule_checks
class PatternConformance(Conformance):
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
        return registered("pattern", self.pattern)

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
            fail(rule, f"{pattern.spec}.select on {shape_text(scores)} scores at sparsity {sparsity:g} raised "
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
        check_metadata(self.pattern_class(), Pattern, "select")

    def test_options_unknown_key(self):
        check_unknown_key(lambda options: self.pattern_class().from_spec(self.spec, options), self.options,
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
                got = (f"{mask.dtype} {shape_text(mask)} on {mask.device}" if isinstance(mask, torch.Tensor)
                       else repr(mask))
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
            if not same_tensor(scores, before):
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

        from ..core.models import layer_names

        pattern = self.make()
        model = make_tiny_model(layers=2)
        names = layer_names(model)
        shares = {name: (0.25, 0.5, 0.75)[i % 3] for i, name in enumerate(names)}
        if not pattern.per_layer_sparsity:
            from ..core import engine
            from ..plugins import resolve_plugin

            try:
                engine.prune(model, None, resolve_plugin("metric", "magnitude"), pattern, sparsities=shares)
            except ConfigError:
                return
            fail("allocated-sparsity", f"{pattern.spec} declares per_layer_sparsity = False but pruned layers at "
                                       f"sparsities other than its own without a ConfigError")
        from ..core import engine
        from ..plugins import resolve_plugin

        try:
            report = engine.prune(model, None, resolve_plugin("metric", "magnitude"), pattern, 0.5, sparsities=shares,
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
            check_realised(report, model, pattern, s, f"{pattern.spec} with {metric}",
                            lambda shape, s: self.expected(pattern, shape, s))


__all__ = ["PatternConformance"]
