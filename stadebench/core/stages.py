"""Pruning as stages: a metric's mask, then a mask refinement, then a weight reconstruction.

``Stages`` holds the optional refiner and reconstructor of one pruning and applies them to
each layer after the metric has decided it (``Stages.apply``), checking what each returns:

1. the metric: ``LayerResult`` (mask, and a solver's weight or a bias correction);
2. the refiner, on the current weight (the solver's, else the dense one) and that mask: a
   new mask with the same count in every row, or every group of an N:M pattern; when it
   changes the mask, a scoring metric's bias correction is recomputed for the new mask;
3. the reconstructor, on the dense weight and the final mask: new kept weights and bias,
   which replace a solver's update and a metric's bias correction.

The engine collects the statistics that the metric and both stages declare (``needs``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..base import LayerResult, LayerStats, Metric, Pattern, Reconstructor, Refiner, check_finite
from ..errors import ConfigError, PluginError


@dataclass
class Stages:
    """The refiner and the reconstructor applied after a metric (each None: no such stage),
    and the seconds each has taken so far."""

    refiner: Refiner | None = None
    reconstructor: Reconstructor | None = None
    seconds: dict[str, float] = field(default_factory=lambda: {"refine": 0.0, "reconstruct": 0.0})

    @classmethod
    def resolve(cls, pattern: Pattern, refine: str | Refiner | None = None,
                refine_options: dict[str, Any] | None = None, reconstruct: str | Reconstructor | None = None,
                reconstruct_options: dict[str, Any] | None = None) -> Stages:
        """The stages that registered names (or instances) name, for ``pattern``; a refiner
        that cannot keep ``pattern`` is a ConfigError saying why."""
        from ..plugins import resolve_plugin

        refiner = None if refine is None else resolve_plugin("refiner", refine, refine_options)
        if refiner is not None and (why := refiner.supports(pattern)):
            raise ConfigError(f"refiner {refiner.name!r} cannot refine pattern {pattern.spec!r}: {why}")
        reconstructor = None if reconstruct is None else resolve_plugin("reconstructor", reconstruct,
                                                                         reconstruct_options)
        return cls(refiner, reconstructor)

    def __bool__(self) -> bool:
        return self.refiner is not None or self.reconstructor is not None

    def needs(self, metric: Metric) -> frozenset[str]:
        """The statistics to collect: the metric's and the stages'."""
        stages = [s for s in (self.refiner, self.reconstructor) if s is not None]
        return frozenset(metric.statistics).union(*(s.statistics for s in stages))

    def describe(self) -> dict[str, Any] | None:
        """The stages as a report records them; None without stages."""
        if not self:
            return None
        out: dict[str, Any] = {"seconds": self.seconds}
        for role, stage in (("refine", self.refiner), ("reconstruct", self.reconstructor)):
            if stage is not None:
                out[role] = {"name": stage.name, "version": stage.version, "options": stage.options.model_dump()}
        return out

    def apply(self, metric: Metric, dense: torch.Tensor, result: LayerResult, stats: LayerStats, pattern: Pattern,
              sparsity: float) -> LayerResult:
        """``result`` (the metric's decision for one layer) after the refiner and the reconstructor."""
        if self.refiner is not None:
            result = self._refined(metric, dense, result, stats, pattern, sparsity)
        if self.reconstructor is not None:
            result = self._reconstructed(dense, result, stats)
        return result

    def _refined(self, metric: Metric, dense: torch.Tensor, result: LayerResult, stats: LayerStats,
                 pattern: Pattern, sparsity: float) -> LayerResult:
        t0 = time.perf_counter()
        current = dense if result.weight is None else result.weight
        mask = self.refiner.refine(current, result.mask, stats, pattern, sparsity)
        check_refined(self.refiner.name, stats.layer.name, result.mask, mask, pattern.group_size)
        self.seconds["refine"] += time.perf_counter() - t0
        if torch.equal(mask, result.mask):
            return result
        bias = None if result.bias_delta is None else metric.bias_delta(dense, mask, stats)
        return LayerResult(mask, result.weight, bias, {**result.details, "refined": int((mask != result.mask).sum())})

    def _reconstructed(self, dense: torch.Tensor, result: LayerResult, stats: LayerStats) -> LayerResult:
        t0 = time.perf_counter()
        name, layer = self.reconstructor.name, stats.layer.name
        out = self.reconstructor.reconstruct(dense, result.mask, stats)
        weight, bias = out.weight, out.bias_delta
        if weight is not None:
            if weight.shape != dense.shape or not weight.is_floating_point():
                raise PluginError(f"reconstructor {name!r} returned a weight of {tuple(weight.shape)} "
                                  f"{weight.dtype} for layer {layer} of {tuple(dense.shape)}")
            check_finite(weight, f"weights reconstructed by {name!r}", layer, None)
        if bias is not None:
            if tuple(bias.shape) != (dense.shape[0],):
                raise PluginError(f"reconstructor {name!r} returned a bias delta of {tuple(bias.shape)} for "
                                  f"layer {layer} with {dense.shape[0]} outputs")
            check_finite(bias, f"the bias delta of {name!r}", layer, None)
        self.seconds["reconstruct"] += time.perf_counter() - t0
        return LayerResult(result.mask, weight, bias, {**result.details, **out.details})


def pruned_counts(mask: torch.Tensor, group: int | None = None) -> torch.Tensor:
    """Pruned weights per row, ``[rows, 1]``, or per group of ``group`` columns, ``[rows, in / group]``:
    what a refiner must keep."""
    return mask.reshape(mask.shape[0], -1, group or mask.shape[1]).sum(-1)


def check_refined(refiner: str, layer: str, before: torch.Tensor, after: torch.Tensor, group: int | None) -> None:
    """PluginError unless ``after`` is a bool mask of ``before``'s shape pruning the same
    count in every row (in every group of ``group`` columns when given)."""
    if not isinstance(after, torch.Tensor) or after.dtype != torch.bool or after.shape != before.shape:
        got = f"{tuple(after.shape)} {after.dtype}" if isinstance(after, torch.Tensor) else type(after).__name__
        raise PluginError(f"refiner {refiner!r} returned {got} for layer {layer}; expected a bool mask of "
                          f"{tuple(before.shape)}")
    counts = [pruned_counts(m, group) for m in (before, after)]
    if not torch.equal(*counts):
        rows = (counts[0] != counts[1]).any(-1).nonzero().flatten()[:3].tolist()
        unit = f"group of {group} columns" if group else "row"
        raise PluginError(f"refiner {refiner!r} changed how many weights are pruned in a {unit} of layer "
                          f"{layer} (rows {rows}): a refiner may move pruned weights, not add or remove them")


__all__ = ["Stages", "check_refined", "pruned_counts"]
