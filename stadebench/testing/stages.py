"""The refiner and reconstructor conformance suites: pruning stages against the engine's contract.

A refiner gets a metric's mask and returns another that prunes as many weights in every row
(every group of ``pattern.group_size`` columns); a reconstructor gets the final mask and
returns new kept weights. The engine calls both once per layer, with the layer's statistics,
as it calls a metric; these suites make the same calls on small layers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from ..base import INPUT_STATISTICS, Pattern, Reconstruction, Reconstructor, Refiner
from ..errors import ConfigError
from ..kinds import KINDS
from ..plugins import get_plugins, resolve_plugin
from ..suite.schema import NONE
from .kit import (Conformance, UnrequestedStatistic, check_metadata, check_unknown_key, fail, layer_inputs,
                  registered, rule_checks, same_tensor, shape_text, stat_tensors)

NO_STAGE = NONE
"""What a suite writes for no stage (``refine: [none, dsnot]``): no plugin may take the name."""


@dataclass
class Case:
    """One call of a stage: what it is given, and how failures name the case."""

    label: str
    weight: Any
    mask: Any
    stats: Any
    pattern: Pattern
    sparsity: float


SOURCES = {
    "magnitude": "mask of |w|",
    "random": "mask of random scores",
    "solved": "mask of |w|, weight as a solver leaves it",
    "degenerate": "mask of |w|, a zero weight row and column, an input always 0",
    "edge": "mask of |w| with row 3 pruned entirely and row 4 not at all, a zero weight row and column, an input "
            "always 0",
}
"""The inputs a case is built from (``_StageConformance.make_case``), as failures describe them."""


def pattern_of(spec: str) -> Pattern:
    """The registered pattern a spec names, with its default options."""
    return get_plugins().patterns.get(spec).cls.from_spec(spec)


def sparsities_of(pattern: Pattern, sparsities: tuple[float, ...]) -> list[float]:
    """The pattern's own sparsity when it fixes one (N:M), else each of ``sparsities``."""
    fixed = pattern.fixed_sparsity
    return [fixed[0]] if fixed is not None else [pattern.resolve_sparsity(s) for s in sparsities]


@rule_checks
class _StageConformance(Conformance):
    """The rules refiners and reconstructors share; a subclass names its kind and its calls."""

    stage_kind: ClassVar[str]
    method: ClassVar[str]
    shape: ClassVar[tuple[int, int]] = (24, 40)

    # helpers

    @property
    def item(self) -> str | type:
        """What the test class names: ``refiner`` or ``reconstructor``."""
        return getattr(self, self.stage_kind)

    @property
    def name(self) -> str:
        """The registered name under test."""
        return self.item if isinstance(self.item, str) else self.item.name

    @property
    def who(self) -> str:
        """How failures name the plugin: ``refiner 'swap'``."""
        return f"{self.stage_kind} {self.name!r}"

    def stage_class(self) -> type:
        """The registered class (``registered`` fails when there is none)."""
        return registered(self.stage_kind, self.item)

    def make(self) -> Any:
        """A fresh instance with ``options``."""
        try:
            return self.stage_class()(dict(self.options))
        except ConfigError as exc:
            fail("options-roundtrip", f"{self.who} rejects the options under test {self.options}: {exc}")

    def make_case(self, spec: str, sparsity: float, source: str, statistics=INPUT_STATISTICS,
                  strict: bool = False) -> Case:
        """A weight, its statistics and a mask of ``spec`` at ``sparsity``.

        ``source``: ``magnitude`` or ``random`` scores pick the mask; ``solved`` hands over
        the weight as a solver metric leaves it (pruned weights 0, kept ones updated);
        ``degenerate`` zeroes a weight row and column and an input; ``edge`` does too, and
        prunes row 3 entirely and nothing of row 4 (``unstructured-layer`` can).
        """
        import torch

        pattern = pattern_of(spec)
        weight, stats = layer_inputs(self.shape, statistics=statistics, strict=strict, device=self.device,
                                     degenerate=source in ("degenerate", "edge"))
        if source == "random":
            scores = torch.rand(weight.shape, generator=torch.Generator().manual_seed(1)).to(self.device)
        else:
            scores = weight.abs()
        mask = pattern.select(scores, sparsity)
        if source == "solved":
            weight = weight.masked_fill(mask, 0) * 1.25
        if source == "edge" and mask.shape[0] > 4:
            mask[3], mask[4] = True, False
        return Case(f"{spec} at sparsity {sparsity:g}, {SOURCES[source]}", weight, mask, stats, pattern, sparsity)

    def cases(self, stage: Any, everything: bool = False, **kw) -> Iterator[Case]:
        """The calls to make; ``everything`` adds the degenerate ones."""
        raise NotImplementedError

    def run(self, stage: Any, case: Case) -> Any:
        """What the stage returns for one case."""
        raise NotImplementedError

    def same(self, a: Any, b: Any) -> bool:
        """Whether two answers of the stage are the same."""
        raise NotImplementedError

    # rules

    def test_registered(self):
        hook = KINDS[self.stage_kind].hook
        try:
            reg = get_plugins().registries[self.stage_kind].get(self.name)
        except ConfigError as exc:
            fail("registered", f"{exc} Register it in a `{hook}(register)` hook of an installed plugin, or set "
                               f"`plugin = <your module>` on this test class.")
        if not isinstance(self.item, str) and reg.cls is not self.item:
            fail("registered", f"{self.who} resolves to {reg.cls.__qualname__} registered by {reg.plugin}, not to "
                               f"{self.item.__qualname__}")
        built = resolve_plugin(self.stage_kind, self.name, dict(self.options))
        if not isinstance(built, reg.cls):
            fail("registered", f"resolve_plugin({self.stage_kind!r}, {self.name!r}) built a {type(built).__name__}, "
                               f"not a {reg.cls.__name__}")

    def test_metadata(self):
        cls = self.stage_class()
        check_metadata(cls, KINDS[self.stage_kind].base_class(), self.method)
        if cls.name == NO_STAGE:
            fail("metadata", f"{cls.__qualname__}.name is {NO_STAGE!r}, what a suite writes for no "
                             f"{self.stage_kind}; choose another name")

    def test_statistics_declared(self):
        declared = getattr(self.stage_class(), "statistics", None)
        if not isinstance(declared, frozenset | set) or not set(declared) <= INPUT_STATISTICS:
            fail("statistics-declared", f"{self.who} declares statistics {declared!r}; use a set drawn from "
                                        f"{sorted(INPUT_STATISTICS)} (a {self.stage_kind} reads no gradients)")

    def test_options_unknown_key(self):
        check_unknown_key(self.stage_class(), self.options, self.who)

    def test_options_roundtrip(self):
        stage = self.make()
        try:
            dumped = json.loads(json.dumps(stage.options.model_dump(mode="json")))
            again = type(stage)(dumped)
        except Exception as exc:  # noqa: BLE001 - reported under the rule's name
            fail("options-roundtrip", f"{self.who} options {stage.options!r} do not survive JSON: {exc}")
        if again.options != stage.options:
            fail("options-roundtrip", f"{self.who} options {stage.options!r} came back as {again.options!r}")

    def test_statistics_unrequested(self):
        stage = self.make()
        declared = sorted(stage.statistics)
        for case in self.cases(stage, everything=True, statistics=stage.statistics, strict=True):
            try:
                self.run(stage, case)
            except UnrequestedStatistic as exc:
                fail("statistics-unrequested", f"{self.who} ({case.label}): {exc}; add it to "
                                               f"{type(stage).__name__}.statistics (declared: {declared})")
            reads = object.__getattribute__(case.stats, "_reads")
            if reads:
                fail("statistics-unrequested", f"{self.who} read stats.{reads[0]}, which it did not declare "
                                               f"(declared: {declared})")

    def test_no_mutation(self):
        stage = self.make()
        for case in self.cases(stage, everything=True):
            weight, mask = case.weight.clone(), case.mask.clone()
            stats = {k: v.clone() for k, v in stat_tensors(case.stats).items()}
            self.run(stage, case)
            where = f"{self.who}.{self.method} ({case.label})"
            if not same_tensor(case.weight, weight):
                fail("no-mutation", f"{where} changed the weight it was given (the engine passes the layer's own "
                                    f"storage: this would change the model); work on a copy")
            if not same_tensor(case.mask, mask):
                fail("no-mutation", f"{where} changed the mask it was given; work on a copy")
            for key, before in stats.items():
                if not same_tensor(object.__getattribute__(case.stats, key), before):
                    fail("no-mutation", f"{where} changed stats.{key} (statistics are shared between layers that "
                                        f"read the same input)")

    def test_stage_deterministic(self):
        import torch

        stage = self.make()
        runs = []
        for seed in (0, 12345):
            torch.manual_seed(seed)
            runs.append([(case.label, self.run(stage, case)) for case in self.cases(stage)])
        for (label, a), (_, b) in zip(*runs):
            if not self.same(a, b):
                fail("stage-deterministic", f"{self.who} gave two answers for the same inputs ({label}); derive any "
                                            f"randomness from a torch.Generator seeded from the options and "
                                            f"stats.layer.name, and keep no state between calls")


@rule_checks
class RefinerConformance(_StageConformance):
    """Subclass as ``TestMyRefiner`` and set ``refiner``: every method checks one rule.

    Attributes to set: ``refiner`` (a registered name or the class), optionally ``options``,
    ``plugin``, ``patterns`` (specs whose masks are refined; those ``supports`` refuses are
    skipped), ``sparsities`` (for patterns without a fixed one), ``shape`` (of the test
    weights; keep it non-square, its columns a multiple of every N:M group), ``device``.
    """

    refiner: ClassVar[str | type[Refiner]]
    patterns: ClassVar[tuple[str, ...]] = ("unstructured", "unstructured-layer", "2:4", "4:8")
    sparsities: ClassVar[tuple[float, ...]] = (0.3, 0.5, 0.7)
    stage_kind = "refiner"
    method = "refine"
    sources: ClassVar[tuple[str, ...]] = tuple(SOURCES)

    def refusal(self, refiner: Refiner, pattern: Pattern) -> str | None:
        """Why ``refiner`` cannot refine ``pattern``'s masks (None: it can), checked."""
        reason = refiner.supports(pattern)
        if reason is not None and (not isinstance(reason, str) or not reason.strip()):
            fail("refine-pattern", f"{self.who}.supports({pattern.spec!r}) returned {reason!r}; expected None (it "
                                   f"can refine the pattern) or a non-empty reason why not")
        return reason

    def cases(self, stage: Refiner, everything: bool = False, **kw) -> Iterator[Case]:
        for spec in self.patterns:
            pattern = pattern_of(spec)
            if self.refusal(stage, pattern) is not None:
                continue
            for s in sparsities_of(pattern, self.sparsities):
                for source in self.sources:
                    if source != "edge" or not pattern.group_size:  # a whole row pruned breaks N:M
                        yield self.make_case(spec, s, source, **kw)

    def run(self, stage: Refiner, case: Case) -> Any:
        return stage.refine(case.weight, case.mask, case.stats, case.pattern, case.sparsity)

    def same(self, a: Any, b: Any) -> bool:
        return same_tensor(a, b)

    def refined(self, refiner: Refiner, case: Case):
        """The refined mask, checked to be a bool mask of the input's shape and device."""
        import torch

        out = self.run(refiner, case)
        if not isinstance(out, torch.Tensor) or out.dtype != torch.bool or out.shape != case.mask.shape \
                or out.device != case.weight.device:
            got = f"a {out.dtype} {shape_text(out)} on {out.device}" if isinstance(out, torch.Tensor) else repr(out)
            fail("refine-mask", f"{self.who} returned {got:.120} for a mask of {list(case.mask.shape)} on "
                                f"{case.weight.device} ({case.label}); expected a torch.bool mask of the same "
                                f"shape and device")
        return out

    # rules

    def test_refine_mask(self):
        refiner = self.make()
        tried = 0
        for case in self.cases(refiner):
            self.refined(refiner, case)
            tried += 1
        if not tried:
            fail("refine-mask", f"{self.who}.supports() refuses every pattern tested {list(self.patterns)}; set "
                                f"`patterns` on the test class")

    def test_refine_count(self):
        from ..core.stages import pruned_counts

        refiner = self.make()
        for case in self.cases(refiner):
            if case.pattern.group_size:
                continue
            out = self.refined(refiner, case)
            got, want = (pruned_counts(m)[:, 0] for m in (out, case.mask))
            rows = (got != want).nonzero().flatten()
            if rows.numel():
                r = int(rows[0])
                fail("refine-count", f"{self.who} ({case.label}): row {r}: {int(got[r])} pruned, "
                                     f"{int(want[r])} in the metric's mask; a refiner changes which weights are "
                                     f"pruned, never how many")

    def test_refine_pattern(self):
        from ..core.stages import pruned_counts

        refiner = self.make()
        for spec in self.patterns:
            self.refusal(refiner, pattern_of(spec))
        for case in self.cases(refiner):
            group = case.pattern.group_size
            if not group:
                continue
            out = self.refined(refiner, case)
            got, want = (pruned_counts(m, group) for m in (out, case.mask))
            bad = (got != want).nonzero()
            if bad.numel():
                r, g = (int(v) for v in bad[0])
                first = g * group
                fail("refine-pattern", f"{self.who} ({case.label}): row {r}, columns {first}-{first + group - 1}: "
                                       f"{int(got[r, g])} pruned, {int(want[r, g])} in the metric's mask; pattern "
                                       f"{case.pattern.spec!r} fixes the count in every group of {group} columns")


@rule_checks
class ReconstructorConformance(_StageConformance):
    """Subclass as ``TestMyReconstructor`` and set ``reconstructor``: every method checks one rule.

    Attributes to set: ``reconstructor`` (a registered name or the class), optionally
    ``options``, ``plugin``, ``patterns`` and ``sparsities`` (the masks reconstructed for),
    ``shape`` (of the test weights; keep it non-square), ``device``.
    """

    reconstructor: ClassVar[str | type[Reconstructor]]
    patterns: ClassVar[tuple[str, ...]] = ("unstructured", "unstructured-layer", "2:4", "4:8")
    sparsities: ClassVar[tuple[float, ...]] = (0.5, 0.8)
    stage_kind = "reconstructor"
    method = "reconstruct"
    #: Layer sizes ``memory_bytes`` is asked about: tiny, the test layers', and a 7B model's.
    layer_sizes: ClassVar[tuple[tuple[int, int], ...]] = ((1, 1), (24, 40), (4096, 4096), (11008, 4096),
                                                          (4096, 11008))

    def cases(self, stage: Reconstructor, everything: bool = False, **kw) -> Iterator[Case]:
        sources = ("magnitude", "random", "degenerate", "edge") if everything else ("magnitude", "random")
        for spec in self.patterns:
            pattern = pattern_of(spec)
            for s in sparsities_of(pattern, self.sparsities):
                for source in sources:
                    yield self.make_case(spec, s, source, **kw)

    def run(self, stage: Reconstructor, case: Case) -> Any:
        return stage.reconstruct(case.weight, case.mask, case.stats)

    def same(self, a: Any, b: Any) -> bool:
        if not (isinstance(a, Reconstruction) and isinstance(b, Reconstruction)) or a.details != b.details:
            return False
        pairs = ((a.weight, b.weight), (a.bias_delta, b.bias_delta))
        return all(x is None and y is None or x is not None and y is not None and same_tensor(x, y) for x, y in pairs)

    def reconstructed(self, stage: Reconstructor, case: Case) -> Reconstruction:
        """What the stage returns, checked to be a well-formed Reconstruction."""
        import torch

        out = self.run(stage, case)
        where = f"{self.who} ({case.label})"
        if not isinstance(out, Reconstruction):
            fail("reconstruct-shape", f"{where} returned {type(out).__name__}, not a stadebench.Reconstruction")
        rows, cols = case.weight.shape
        for what, t, shape in (("weight", out.weight, (rows, cols)), ("bias delta", out.bias_delta, (rows,))):
            if t is None:
                continue
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or not t.is_floating_point() \
                    or t.device != case.weight.device:
                got = f"a {t.dtype} {shape_text(t)} on {t.device}" if isinstance(t, torch.Tensor) else repr(t)
                fail("reconstruct-shape", f"{where} returned a {what} of {got:.120}; expected None or a float "
                                          f"{list(shape)} tensor on {case.weight.device}")
        if not isinstance(out.details, dict):
            fail("reconstruct-shape", f"{where} returned details of type {type(out.details).__name__}; expected "
                                      f"a dict")
        try:
            json.dumps(out.details, allow_nan=False)
        except (TypeError, ValueError) as exc:
            fail("reconstruct-shape", f"{where} returned details that are not JSON-serialisable ({exc}); the "
                                      f"report records them")
        return out

    # rules

    def test_reconstruct_shape(self):
        stage = self.make()
        for case in self.cases(stage):
            self.reconstructed(stage, case)

    def test_reconstruct_finite(self):
        import torch

        stage = self.make()
        for case in self.cases(stage, everything=True):
            out = self.reconstructed(stage, case)
            for what, t in (("weight", out.weight), ("bias delta", out.bias_delta)):
                if t is not None and not bool(torch.isfinite(t).all()):
                    bad = int((~torch.isfinite(t)).sum())
                    fail("reconstruct-finite", f"{self.who} returned a {what} with {bad} NaN/Inf values "
                                               f"({case.label})")

    def test_reconstruct_mask(self):
        stage = self.make()
        for case in self.cases(stage, everything=True):
            out = self.reconstructed(stage, case)
            if out.weight is None:
                continue
            alive = int((out.weight[case.mask] != 0).sum())
            if alive:
                fail("reconstruct-mask", f"{self.who} returned a weight with {alive} of the {int(case.mask.sum())} "
                                         f"pruned weights non-zero ({case.label}); a reconstructor updates the kept "
                                         f"weights and never revives a pruned one")

    def test_memory_estimate(self):
        stage = self.make()
        for rows, cols in self.layer_sizes:
            value = stage.memory_bytes(rows, cols)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                fail("memory-estimate", f"{self.who}.memory_bytes({rows}, {cols}) returned {value!r}; expected a "
                                        f"non-negative int (bytes)")


__all__ = ["Case", "NO_STAGE", "ReconstructorConformance", "RefinerConformance", "SOURCES", "pattern_of",
           "sparsities_of"]
