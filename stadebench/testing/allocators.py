"""The allocator conformance suite: a registered allocator against the allocation contract."""

from __future__ import annotations

import json
import math
from typing import ClassVar


from ..base import INPUT_STATISTICS, Allocator
from ..errors import ConfigError
from ..plugins import get_plugins
from .kit import (Conformance, StrictLayerStats, UnrequestedStatistic, check_metadata, check_unknown_key, fail,
                  make_tiny_model, make_windows, registered, rule_checks, same_tensor, stat_tensors)


@rule_checks
class AllocatorConformance(Conformance):
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
        return registered("allocator", self.allocator)

    def make(self) -> Allocator:
        try:
            return self.allocator_class()(dict(self.options))
        except ConfigError as exc:
            fail("options-roundtrip", f"allocator {self.name!r} rejects the options under test {self.options}: {exc}")

    def layers(self, allocator: Allocator, strict: bool = True):
        """The tiny model's layers as an allocator sees them, with strict statistics."""
        from ..core import allocation
        from ..core.engine import Calibration, collect_statistics
        from ..core.models import layer_names

        model = make_tiny_model(layers=self.blocks)
        statistics = None
        if not allocator.data_free():
            statistics = collect_statistics(model, make_windows(8, 32), INPUT_STATISTICS,
                                            calibration=Calibration(batch_size=4))
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
        check_metadata(self.allocator_class(), Allocator, "allocate")

    def test_statistics_declared(self):
        declared = getattr(self.allocator_class(), "statistics", None)
        if not isinstance(declared, frozenset | set) or not set(declared) <= INPUT_STATISTICS:
            fail("statistics-declared", f"allocator {self.name!r} declares statistics {declared!r}; use a set drawn "
                                        f"from {sorted(INPUT_STATISTICS)} (an allocator reads no gradients)")

    def test_statistics_unrequested(self):
        for layers, _, _ in self.each("statistics-unrequested"):
            reads = sorted({r for entry in layers if entry.stats is not None
                            for r in object.__getattribute__(entry.stats, "_reads")})
            if reads:
                fail("statistics-unrequested", f"allocator {self.name!r} read {reads} without declaring them "
                                               f"in statistics")

    def test_options_unknown_key(self):
        check_unknown_key(self.allocator_class(), self.options, f"allocator {self.name!r}")

    def test_options_roundtrip(self):
        allocator = self.make()
        dumped = json.loads(json.dumps(allocator.options.model_dump(mode="json")))
        again = self.allocator_class()(dumped)
        if again.options != allocator.options:
            fail("options-roundtrip", f"allocator {self.name!r} {allocator.options!r} came back as {again.options!r}")

    def test_no_mutation(self):
        allocator = self.make()
        _, layers = self.layers(allocator, strict=False)
        before = [(entry.module.weight.detach().clone(), {k: v.clone() for k, v in stat_tensors(entry.stats).items()}
                   if entry.stats is not None else {}) for entry in layers]
        for s in self.sparsities:
            try:
                self.allocate(allocator, layers, s, "no-mutation")
            except ConfigError:
                continue
        for entry, (weight, stats) in zip(layers, before):
            now = stat_tensors(entry.stats) if entry.stats is not None else {}
            changed = any(not same_tensor(now[k], v) for k, v in stats.items())
            if not same_tensor(entry.module.weight.detach(), weight) or changed:
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


__all__ = ["AllocatorConformance"]
