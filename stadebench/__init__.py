"""stadebench: a fair, cheap benchmark for pruning LLMs without retraining."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from .base import (AllocationLayer, Allocator, Dataset, Evaluator, LayerInfo, LayerResult, LayerStats, Metric,
                   Options, Pattern, Reconstruction, Reconstructor, Refiner, Score)
from .errors import ConfigError, NumericalError, PluginError, StadebenchError, UnknownNameError
from .hookspecs import hookimpl
from .plugins import get_plugins
from .version import __version__

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .core.engine import CalibrationStatistics, PruneReport


def prune(
    model: nn.Module,
    calibration: torch.Tensor | None = None,
    metric: str | Metric = "wanda",
    pattern: str | Pattern = "unstructured",
    sparsity: float | None = None,
    *,
    metric_options: dict[str, Any] | None = None,
    pattern_options: dict[str, Any] | None = None,
    sequential: bool = True,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    reconstruction: bool = True,
    offload: bool | None = None,
    progress: Callable[[int, int], None] | None = None,
    statistics: CalibrationStatistics | None = None,
    allocation: str | Allocator = "uniform",
    allocation_options: dict[str, Any] | None = None,
    targets: Iterable[str] = (),
    ignore: Iterable[str] = (),
    accumulate: str = "float64",
    refine: str | Refiner | None = None,
    refine_options: dict[str, Any] | None = None,
    reconstruct: str | Reconstructor | None = None,
    reconstruct_options: dict[str, Any] | None = None,
) -> PruneReport:
    """Prune the linear layers of ``model``'s decoder blocks in place; returns a ``PruneReport``.

    Args:
        model: a Hugging Face decoder-only causal LM (any family).
        calibration: LongTensor ``[n, seqlen]`` of token windows; unused (may be None)
            for data-free metrics.
        metric: a registered metric name, or a ``Metric`` instance.
        pattern: a registered pattern spec (``unstructured``, ``unstructured-layer``,
            ``2:4`` …), or a ``Pattern`` instance.
        sparsity: fraction of weights to prune; None means the pattern's own (N/M for
            N:M, 0.5 otherwise). N:M with any other sparsity is an error.
        metric_options, pattern_options: options of a metric name / pattern spec
            (validated by its ``Options`` model); an instance carries its own.
        sequential: feed each block the pruned outputs of the previous one (True) or
            the dense outputs (False, one-shot).
        batch_size: calibration windows per forward pass.
        device: where blocks are pruned, one at a time; default CUDA when available,
            else the model's device. The model's weights stay where they are.
        reconstruction: run pass 2 in one-shot mode too, to measure the blocks'
            reconstruction error (sequential mode always runs it).
        offload: keep the block activations in CPU memory between passes; None keeps
            them on the device when both buffers fit in half its free memory.
        progress: called as ``progress(done_blocks, total_blocks)``.
        statistics: one-shot statistics from ``collect_statistics`` on this (dense)
            model, used instead of calibration passes (``sequential`` must be False; no
            reconstruction error is measured). Data-free metrics ignore them.
        allocation: a registered allocator name (``uniform``, ``owl``) or an
            ``Allocator`` instance: how the target is shared out among the layers.
            One that reads statistics gets them from ``statistics`` when they cover
            it, else from one dense pass over ``calibration``.
        allocation_options: options of an allocator name.
        targets, ignore: regexes over module paths (``re.search``): prune only the
            layers a ``targets`` regex finds (default: all), minus those an ``ignore``
            regex finds; the others stay dense and the target is over the pruned ones.
        accumulate: how input statistics are summed: ``float64`` (accurate), or
            ``released``, the reference releases' float32 running updates window by
            window (to reproduce their numbers; the suite's ``calibration.accumulate``).
        refine, reconstruct: a refiner (``dsnot``) that moves each layer's mask within the
            pattern, then a reconstructor (``obs``, ``admm``, ``mean-bias``) of its kept
            weights; names or instances, ``*_options`` as for ``metric``. A data-free
            metric with a data-reading stage needs ``calibration``.
    """
    from .core import allocation as allocating
    from .core import engine
    from .core.stages import Stages
    from .plugins import resolve, resolve_plugin

    metric, pattern = resolve(metric, pattern, metric_options, pattern_options)
    allocator = resolve_plugin("allocator", allocation, allocation_options)
    stages = Stages.resolve(pattern, refine, refine_options, reconstruct, reconstruct_options)
    settings = engine.Calibration(sequential=sequential, batch_size=batch_size, accumulate=accumulate)
    sparsities = allocating.layer_sparsities(model, allocator, pattern, sparsity, targets=list(targets),
                                             ignore=list(ignore), windows=calibration, statistics=statistics,
                                             calibration=settings, device=device)
    return engine.prune(model, calibration, metric, pattern, sparsity, calibration=settings, device=device,
                        reconstruction=reconstruction, offload=offload, progress=progress, statistics=statistics,
                        sparsities=sparsities, stages=stages)


def collect_statistics(
    model: nn.Module,
    calibration: torch.Tensor,
    needs: Iterable[str] = (),
    *,
    metrics: Iterable[str | Metric] = (),
    batch_size: int = 8,
    device: str | torch.device | None = None,
    offload: bool | None = None,
    progress: Callable[[int, int], None] | None = None,
    accumulate: str = "float64",
) -> CalibrationStatistics:
    """One dense pass of every block over ``calibration`` that gathers input statistics for
    every prunable layer, shared by several one-shot ``prune(..., statistics=...)`` calls;
    the model is not changed.

    Args:
        needs: statistic names, a subset of ``{"sum", "sumsq", "gram", "window_var"}``.
        metrics: metrics (registered names or instances) whose ``statistics`` are
            collected too; the union with ``needs`` must not be empty.
        batch_size, device, offload, progress, accumulate: as for ``prune``.
    """
    from .core import engine
    from .plugins import resolve_plugin

    union = set(needs).union(*(resolve_plugin("metric", m).statistics for m in metrics))
    settings = engine.Calibration(sequential=False, batch_size=batch_size, accumulate=accumulate)
    return engine.collect_statistics(model, calibration, union, calibration=settings, device=device,
                                     offload=offload, progress=progress)


__all__ = [
    "AllocationLayer", "Allocator", "ConfigError", "Dataset", "Evaluator", "LayerInfo", "LayerResult", "LayerStats",
    "Metric", "NumericalError", "Options", "Pattern", "PluginError", "Reconstruction", "Reconstructor", "Refiner",
    "Score", "StadebenchError", "UnknownNameError",
    "__version__", "collect_statistics", "get_plugins", "hookimpl", "prune",
]
