"""Layer-wise sparsity: the built-in allocators (uniform, OWL) and the check of an allocation.

An allocator turns one target sparsity into a sparsity per layer (``stadebench.Allocator``).
``checked`` is the host's side of that contract: whatever a plugin returns, the engine
only sees a list of floats in [0, 1) whose mean, weighted by the layers' sizes, is the
target.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import ConfigDict, Field

from ..base import AllocationLayer, Allocator, LayerInfo, Options
from ..errors import ConfigError, PluginError
from ..hookspecs import hookimpl

#: How far the size-weighted mean of an allocation may stray from the target.
MEAN_TOLERANCE = 1e-6


class Uniform(Allocator):
    """Every layer at the target sparsity (the protocol of Wanda, SparseGPT and STADE)."""

    name = "uniform"
    version = "1"
    uniform = True

    def allocate(self, layers: list[AllocationLayer], sparsity: float) -> list[float]:
        return [sparsity] * len(layers)


class OWLOptions(Options):
    model_config = ConfigDict(serialize_by_alias=True, validate_by_alias=True, validate_by_name=False)

    M: float = Field(5.0, gt=0)
    """Outlier threshold: a score counts as an outlier above M times its block's mean score."""
    lambda_: float = Field(0.08, ge=0, lt=0.5, alias="lambda")
    """Spread: blocks' sparsities range over the target ± lambda."""


class OWL(Allocator):
    """Outlier-weighed layer-wise sparsity (Yin et al. 2023): blocks with more outliers keep more weights.

    For each decoder block, the outlier ratio is the share of its Wanda scores
    |W_ij|·‖x_j‖ (over all the block's pruned layers together) above M times their
    mean. Ratios are rescaled to [0, 2λ], centred on 1 − target as densities, and every
    layer of a block gets its block's sparsity (1 − density), as the released code does.
    The centring is weighted by the blocks' sizes (the released code's plain mean is the
    same when blocks are of equal size, as in every decoder LLM), so the model's overall
    sparsity is the target. Equal ratios everywhere give the uniform allocation.
    """

    name = "owl"
    version = "1"
    statistics = frozenset({"sumsq"})
    Options = OWLOptions

    def outlier_ratios(self, layers: list[AllocationLayer]) -> dict[int, float]:
        """Share of each block's Wanda scores above M times their mean, by block index."""
        counts: dict[int, list[float]] = {}
        for entry in layers:
            scores = entry.weight.abs() * entry.stats.norm.to(entry.weight.device).unsqueeze(0)
            block = counts.setdefault(entry.layer.block, [0.0, 0.0, 0.0])  # score sum, numel, (later) outliers
            block[0] += float(scores.sum(dtype=torch.float64))
            block[1] += scores.numel()
        for entry in layers:
            scores = entry.weight.abs() * entry.stats.norm.to(entry.weight.device).unsqueeze(0)
            total, numel, _ = counts[entry.layer.block]
            counts[entry.layer.block][2] += int((scores > self.options.M * (total / numel)).sum())
        return {block: outliers / numel for block, (_, numel, outliers) in counts.items()}

    def allocate(self, layers: list[AllocationLayer], sparsity: float) -> list[float]:
        ratios = self.outlier_ratios(layers)
        sizes: dict[int, int] = {}
        for entry in layers:
            sizes[entry.layer.block] = sizes.get(entry.layer.block, 0) + entry.numel
        low, high = min(ratios.values()), max(ratios.values())
        if high == low:
            return [sparsity] * len(layers)
        spread = {b: (r - low) / (high - low) * 2 * self.options.lambda_ for b, r in ratios.items()}
        centre = sum(spread[b] * sizes[b] for b in spread) / sum(sizes.values())
        density = {b: v - centre + (1 - sparsity) for b, v in spread.items()}
        values = [1 - density[entry.layer.block] for entry in layers]
        for entry, value in zip(layers, values):
            if not 0.0 <= value < 1.0:
                raise outside(f"allocator {self.name!r}", entry.layer.name, value, sparsity)
        return values


def outside(who: str, layer: str, value: float, sparsity: float) -> ConfigError:
    """The error for an allocation that leaves [0, 1)."""
    return ConfigError(f"{who} would prune layer {layer} at sparsity {value:.4g}, outside [0, 1), for a target "
                       f"of {sparsity:g}; lower the target or the allocator's spread (e.g. owl's lambda)")


def checked(allocator: Allocator, layers: list[AllocationLayer], sparsity: float, who: str | None = None
            ) -> list[float]:
    """``allocator.allocate(layers, sparsity)``, checked: one finite value per layer, each in
    [0, 1) (ConfigError naming the layer and the fix otherwise), and a size-weighted mean
    equal to the target (PluginError otherwise: that is the allocator's bug)."""
    who = who or f"allocator {allocator.name!r}"
    values: Any = allocator.allocate(layers, sparsity)
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        raise PluginError(f"{who} returned {type(values).__name__}, not one number per layer") from None
    if len(values) != len(layers):
        raise PluginError(f"{who} returned {len(values)} sparsities for {len(layers)} layers")
    for entry, value in zip(layers, values):
        if not math.isfinite(value):
            raise PluginError(f"{who} gave layer {entry.layer.name} sparsity {value}")
        if not 0.0 <= value < 1.0:
            raise outside(who, entry.layer.name, value, sparsity)
    total = sum(entry.numel for entry in layers)
    mean = sum(v * entry.numel for entry, v in zip(layers, values)) / max(total, 1)
    if layers and abs(mean - sparsity) > MEAN_TOLERANCE:
        raise PluginError(f"{who} allocated a mean sparsity of {mean:.6g} over the pruned layers (weighted by "
                          f"their sizes), not the target {sparsity:g}")
    return values


def allocation_layers(model: torch.nn.Module, names: list[str], statistics: Any = None) -> list[AllocationLayer]:
    """What an allocator sees of the layers ``names`` of ``model``: each module with its
    block and, when given, its statistics from a ``CalibrationStatistics``."""
    from .models import find_blocks, transposed

    prefix, _ = find_blocks(model)
    out = []
    for name in names:
        block, _, short = name[len(prefix) + 1:].partition(".")
        stats = None
        if statistics is not None:
            if name not in statistics.layers:
                raise ConfigError(f"layer {name} has no statistics: they were collected on another model")
            stats = statistics.layers[name]
        info = stats.layer if stats is not None else LayerInfo(name, int(block), short)
        module = model.get_submodule(name)
        out.append(AllocationLayer(info, module, stats, transposed(module)))
    return out


def allocate(model: torch.nn.Module, allocator: Allocator, sparsity: float, names: list[str],
             statistics: Any = None, who: str | None = None) -> dict[str, float]:
    """The sparsity of each layer in ``names`` by full name: ``allocator``'s answer, checked.
    ``statistics`` (a ``CalibrationStatistics`` of the dense model covering
    ``allocator.statistics``) is required unless the allocator is data-free."""
    if not allocator.data_free():
        missing = set(allocator.statistics) - (statistics.needs if statistics is not None else set())
        if missing:
            raise ConfigError(f"allocator {allocator.name!r} needs the dense model's statistics {sorted(missing)}")
    layers = allocation_layers(model, names, None if allocator.data_free() else statistics)
    return dict(zip(names, checked(allocator, layers, sparsity, who)))


def layer_sparsities(model: torch.nn.Module, allocator: Allocator, pattern: Any, sparsity: float | None, *,
                     targets: list[str] = (), ignore: list[str] = (), windows: torch.Tensor | None = None,
                     statistics: Any = None, who: str | None = None, **collect: Any) -> dict[str, float] | None:
    """The ``sparsities`` argument of ``engine.prune``: None when every layer is pruned at the
    target, else each pruned layer's sparsity. An allocator that reads statistics uses
    ``statistics`` when they cover it, else one dense pass over ``windows``
    (``collect``, e.g. ``calibration`` and ``device``, goes to ``collect_statistics``)."""
    from .passes import collect_statistics
    from .models import layer_names, select_layers

    target = pattern.resolve_sparsity(sparsity)
    names = select_layers(model, targets, ignore) if targets or ignore else layer_names(model)
    if allocator.uniform:
        return None if not (targets or ignore) else dict.fromkeys(names, target)
    if not pattern.per_layer_sparsity:
        raise ConfigError(f"allocator {allocator.name!r} gives layers sparsities of their own, but pattern "
                          f"{pattern.spec!r} prunes every layer at {target:g}; use it with an unstructured pattern")
    if not allocator.data_free() and (statistics is None or not allocator.statistics <= statistics.needs):
        if windows is None:
            raise ConfigError(f"allocator {allocator.name!r} reads the dense model's statistics "
                              f"{sorted(allocator.statistics)}: give calibration windows")
        statistics = collect_statistics(model, windows, allocator.statistics, **collect)
    return allocate(model, allocator, target, names, statistics, who)


@hookimpl
def register_allocators(register):
    register(Uniform)
    register(OWL)


__all__ = ["MEAN_TOLERANCE", "OWL", "OWLOptions", "Uniform", "allocate", "allocation_layers", "checked",
           "layer_sparsities", "outside"]
