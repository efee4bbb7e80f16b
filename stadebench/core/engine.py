"""Layer-wise pruning, block by block.

For each decoder block: move it to the device, run the calibration batches through
it while hooks gather the input statistics the metric needs (pass 1, dense weights),
prune every linear of the block, then run the batches again with pruned weights
(pass 2): the pruned outputs feed the next block (``sequential=True``, the
Wanda/SparseGPT/STADE default) or the dense outputs do (``sequential=False``), and
dense vs pruned outputs give the block's reconstruction error. Data-free metrics
(magnitude, random) run no forward pass at all.

One-shot statistics depend only on the dense model and the calibration windows, so
``collect_statistics`` gathers them once for several metrics (the union of what they
need) and ``prune(..., statistics=...)`` then prunes from them with no forward pass:
a one-shot grid of metrics × patterns × sparsities costs one statistics pass plus
masking. The passes over blocks live in ``core.passes``, the reports in ``core.reports``.

The engine takes ``Metric`` and ``Pattern`` instances and never looks names up (that is
``stadebench.prune`` and ``stadebench.plugins.resolve_plugin``). Each layer is decided by one
call, ``metric.prune_layer``, and the ``LayerResult`` it returns is applied here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ..base import LayerInfo, LayerResult, LayerStats, Metric, Pattern, check_finite
from ..errors import ConfigError
from .stages import Stages
from .models import (add_bias, enable_bias_flags, find_blocks, module_device, prunable_layers,
                     set_weight, weight_of)
from .gradients import GradientStatistics, gradient_statistics
from .passes import (Flow, capture, check_stats, checked_accumulate, collect_statistics, eval_mode, moved,
                     peak_memory, pruned_pass, received, statistics_pass, target_device)
from .reports import BlockReport, Calibration, CalibrationStatistics, LayerReport, PruneReport


# --- pruning ------------------------------------------------------------------------


def prune(
    model: nn.Module,
    windows: torch.Tensor | None,
    metric: Metric,
    pattern: Pattern,
    sparsity: float | None = None,
    *,
    calibration: Calibration = Calibration(),
    device: str | torch.device | None = None,
    reconstruction: bool = True,
    offload: bool | None = None,
    progress: Callable[[int, int], None] | None = None,
    statistics: CalibrationStatistics | None = None,
    sparsities: Mapping[str, float] | None = None,
    gradients: GradientStatistics | None = None,
    stages: Stages | None = None,
) -> PruneReport:
    """Prune every linear layer of ``model``'s decoder blocks in place with ``metric`` and
    ``pattern`` (instances: ``stadebench.prune`` takes registered names and documents
    every option).

    Each layer is decided by one call, ``metric.prune_layer``, whose ``LayerResult`` is
    applied to the layer (``_Pruning.apply``). Data-free metrics and shared one-shot
    ``statistics`` run no forward pass; other metrics run the calibrated protocol.
    ``windows`` is a LongTensor ``[n, seqlen]`` of calibration token windows, fed as
    ``calibration`` says (a ``Calibration``, or anything with its fields, such as the
    suite's ``CalibrationSpec``). ``sparsities`` maps the full name of each layer to prune
    to its sparsity (an allocator's answer); layers it does not name stay dense. None
    prunes every layer at the target ``sparsity``. A metric that reads ``gradient`` gets
    ``gradients`` (computed once for several metrics with ``gradient_statistics``), else
    the gradient pass runs here first, over ``windows``. ``stages``: a refiner and a
    reconstructor applied to each layer after the metric (``core.stages``); the
    statistics collected are the union of what the metric and the stages declare.
    """
    t_start = time.perf_counter()
    if not isinstance(metric, Metric) or not isinstance(pattern, Pattern):
        raise TypeError("the engine takes Metric and Pattern instances; stadebench.prune also takes "
                        f"registered names (got {type(metric).__name__}, {type(pattern).__name__})")
    sequential, batch_size = calibration.sequential, calibration.batch_size
    run = _Pruning.begin(model, metric, pattern, sparsity, device, progress, sparsities=sparsities,
                         accumulate=calibration.accumulate, stages=stages)
    shared = statistics if statistics is not None and run.needs else None
    if shared is not None and shared.accumulate != run.accumulate:
        raise ConfigError(f"shared statistics were accumulated {shared.accumulate!r}, not {run.accumulate!r}")
    n, seqlen, batch_size = _protocol(metric, run.needs, windows, shared, sequential, batch_size)
    run.gradients = _gradients(model, windows, metric, gradients, run)
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    run.open_report(sequential, n, seqlen, batch_size, shared=shared is not None)
    _report_gradients(run.report, run.gradients, shared=gradients is not None)
    with eval_mode(model):
        if shared is not None or not run.needs:
            run.without_passes(shared)
        else:
            run.calibrated(windows, batch_size, sequential, reconstruction, offload)
    return run.finish(t_start)


def _protocol(metric: Metric, needs: frozenset[str], windows: torch.Tensor | None,
              shared: CalibrationStatistics | None, sequential: bool, batch_size: int) -> tuple[int, int, int]:
    """``(n, seqlen, batch_size)`` of a ``prune`` call, checked: shared statistics
    must be one-shot and cover ``needs`` (the metric's and its stages'); a calibrated metric
    needs token windows."""
    if shared is not None:
        if sequential:
            raise ConfigError("shared statistics are the dense model's (one-shot): use sequential=False")
        missing = set(needs) - shared.needs - {"gradient"}
        if missing:
            who = f"metric {metric.name!r}" + ("" if missing <= set(metric.statistics) else " with its stages")
            raise ConfigError(f"{who} needs statistics {sorted(missing)}, which were not "
                              f"collected (have {sorted(shared.needs)})")
        return shared.n, shared.seqlen, shared.batch_size
    if not needs:
        return 0, 0, batch_size
    if windows is None or windows.ndim != 2 or windows.dtype != torch.long:
        raise ConfigError(f"metric {metric.name!r} needs calibration windows: a LongTensor [n, seqlen]")
    n, seqlen = windows.shape
    return n, seqlen, batch_size


def _gradients(model: nn.Module, windows: torch.Tensor | None, metric: Metric, given: GradientStatistics | None,
               run: _Pruning) -> GradientStatistics | None:
    """The gradient statistics ``metric`` reads: ``given`` when they match its scale and the
    accumulation, else computed now; None when it reads none."""
    if "gradient" not in metric.statistics:
        return None
    scale = metric.gradient_scale()
    if given is not None:
        if not given.matches(scale, run.accumulate):
            raise ConfigError(f"the gradient statistics given were computed at scale {given.scale:g}, accumulate "
                              f"{given.accumulate!r}; metric {metric.name!r} needs scale {scale:g}, accumulate "
                              f"{run.accumulate!r}")
        return given
    if windows is None:
        raise ConfigError(f"metric {metric.name!r} reads gradients: it needs calibration windows")
    return gradient_statistics(model, windows, scale=scale, accumulate=run.accumulate, device=run.device)


def _report_gradients(report: PruneReport, gradients: GradientStatistics | None, shared: bool) -> None:
    """Record the gradient statistics a metric read; a pass run here counts in the timings."""
    if gradients is not None:
        report.gradients = gradients.summary(shared)
        report.timings["gradients"] = 0.0 if shared else gradients.seconds


@dataclass
class _Pruning:
    """The state of one ``prune`` call: the model's blocks and their prunable layers, the
    metric and pattern, the target sparsity, the device, the report being filled, and
    the progress callback. Its methods are the protocols and the per-layer step."""

    model: nn.Module
    prefix: str
    blocks: nn.ModuleList
    layers: list[list[tuple[str, nn.Module]]]
    """Per block: ``(name inside the block, module)`` of every prunable linear."""
    metric: Metric
    pattern: Pattern
    sparsity: float
    device: torch.device
    sparsities: dict[str, float]
    """Sparsity of every layer to prune, by full name; the others stay dense."""
    progress: Callable[[int, int], None] | None = None
    report: PruneReport | None = None
    accumulate: str = "float64"
    gradients: GradientStatistics | None = None
    stages: Stages = field(default_factory=Stages)
    needs: frozenset[str] = frozenset()
    """The statistics collected: the metric's and its stages'."""

    @classmethod
    def begin(cls, model: nn.Module, metric: Metric, pattern: Pattern, sparsity: float | None,
              device: str | torch.device | None, progress: Callable[[int, int], None] | None, *,
              sparsities: Mapping[str, float] | None = None, accumulate: str = "float64",
              stages: Stages | None = None) -> _Pruning:
        """Check the sparsity, the allocation, the accumulation and every pruned layer's
        shape against the pattern before anything runs; ``needs`` is what the metric and
        the ``stages`` read."""
        target = pattern.resolve_sparsity(sparsity)
        accumulate = checked_accumulate(accumulate)
        dev = target_device(device, model)
        prefix, blocks = find_blocks(model)
        layers = [prunable_layers(b) for b in blocks]
        names = {f"{prefix}.{i}.{short}": layer for i, block_layers in enumerate(layers)
                 for short, layer in block_layers}
        sparsities = dict.fromkeys(names, target) if sparsities is None else _checked(sparsities, names, pattern,
                                                                                      target)
        for name in sparsities:
            pattern.check_shape(tuple(weight_of(names[name]).shape))
        stages = stages if stages is not None else Stages()
        return cls(model, prefix, blocks, layers, metric, pattern, target, dev, sparsities, progress,
                   accumulate=accumulate, stages=stages, needs=stages.needs(metric))

    def open_report(self, sequential: bool, n: int, seqlen: int, batch_size: int, *, shared: bool) -> None:
        """The empty report this pruning fills in."""
        metric = self.metric
        self.report = PruneReport(
            metric=metric.name, metric_version=metric.version, metric_options=metric.options.model_dump(),
            pattern=self.pattern.spec, target_sparsity=self.sparsity, sparsity=0.0, sequential=sequential,
            n=n, seqlen=seqlen, batch_size=batch_size, device=str(self.device), seconds=0.0,
            timings={"capture": 0.0, "stats": 0.0, "prune": 0.0, "forward": 0.0}, block_passes=0,
            peak_memory_bytes=0, shared_statistics=shared, accumulate=self.accumulate, stages=self.stages.describe(),
        )

    def pruned(self, i: int) -> list[tuple[str, nn.Module]]:
        """The layers of block ``i`` to prune."""
        return [(short, layer) for short, layer in self.layers[i] if f"{self.prefix}.{i}.{short}" in self.sparsities]

    def leave_dense(self, i: int, roles: Mapping[str, str] | None = None) -> None:
        """Report the layers of block ``i`` that stay dense."""
        for short, layer in self.layers[i]:
            name = f"{self.prefix}.{i}.{short}"
            if name not in self.sparsities:
                self.report.layers.append(LayerReport(name=name, block=i, role=(roles or {}).get(short),
                                                      shape=tuple(weight_of(layer).shape), pruned=0, sparsity=0.0,
                                                      dense=True))

    def prune_layer(self, layer: nn.Module, stats: LayerStats) -> None:
        """Decide one layer with the metric, apply the result and report it."""
        name = stats.layer.name
        dense = weight_of(layer).detach().float()
        check_finite(dense, "weights", name, self.metric.name)
        had_bias = getattr(layer, "bias", None) is not None
        sparsity = self.sparsities[name]
        if self.gradients is not None:
            if name not in self.gradients.layers:
                raise ConfigError(f"layer {name} has no gradient statistics: they were computed on another model")
            l1, l2 = self.gradients.layers[name]
            stats = replace(stats, grad_l1=l1.to(dense.device), grad_l2=l2.to(dense.device))
        result = self.stages.apply(self.metric, dense, self.metric.prune_layer(dense, stats, self.pattern, sparsity),
                                   stats, self.pattern, sparsity)
        error = _output_mse(dense, result, stats)
        self.apply(layer, name, result)
        pruned = int(result.mask.count_nonzero())
        self.report.layers.append(LayerReport(
            name=name, block=stats.layer.block, role=stats.layer.role, shape=tuple(weight_of(layer).shape),
            pruned=pruned, sparsity=pruned / result.mask.numel(),
            bias_added=not had_bias and getattr(layer, "bias", None) is not None, details=result.details,
            allocated=sparsity, output_mse=error,
        ))

    def apply(self, layer: nn.Module, name: str, result: LayerResult) -> None:
        """Write ``result`` into ``layer``: the bias delta, then the new weight (or the dense
        one, in place), with the mask's weights zeroed either way."""
        if result.bias_delta is not None:
            add_bias(layer, result.bias_delta)
        if result.weight is not None:
            check_finite(result.weight, "updated weights", name, self.metric.name)
            set_weight(layer, result.weight)
        # A metric may change kept weights, never revive pruned ones.
        weight_of(layer).masked_fill_(result.mask, 0)

    def block_done(self, block: BlockReport) -> None:
        self.report.blocks.append(block)
        if self.progress:
            self.progress(block.index + 1, len(self.blocks))

    def without_passes(self, shared: CalibrationStatistics | None) -> None:
        """Data-free metrics (no statistics at all), or one-shot metrics from shared statistics."""
        for i, block in enumerate(self.blocks):
            t0 = time.perf_counter()
            home = module_device(block)
            block.to(self.device)
            on_device: dict[int, torch.Tensor] = {}
            self.leave_dense(i)
            for short, layer in self.pruned(i):
                name = f"{self.prefix}.{i}.{short}"
                if shared is None:
                    stats = LayerStats(LayerInfo(name, i, short))
                elif name not in shared.layers:
                    raise ConfigError(f"layer {name} has no shared statistics: they were collected on "
                                      "another model")
                else:
                    stats = moved(shared.layers[name], self.device, on_device)
                self.prune_layer(layer, stats)
            block.to(home)
            seconds = time.perf_counter() - t0
            self.report.timings["prune"] += seconds
            self.block_done(BlockReport(i, None, None, seconds))

    def calibrated(self, calibration: torch.Tensor, batch_size: int, sequential: bool, reconstruction: bool,
                   offload: bool | None) -> None:
        """The calibrated protocol: capture block 0's inputs, then each block in turn."""
        t0 = time.perf_counter()
        flow, self.report.offloaded = capture(self.model, self.blocks, calibration, batch_size, self.device,
                                               offload)
        self.report.timings["capture"] = time.perf_counter() - t0
        for i in range(len(self.blocks)):
            self.calibrated_block(i, flow, sequential, reconstruction)

    def calibrated_block(self, i: int, flow: Flow, sequential: bool, reconstruction: bool) -> None:
        """Pass 1 (statistics), pruning of every layer, pass 2 (pruned outputs, reconstruction
        error); ``flow`` then holds the next block's inputs."""
        t_block = time.perf_counter()
        block, timings = self.blocks[i], self.report.timings
        home = module_device(block)
        block.to(self.device)
        t0 = time.perf_counter()
        pruned = self.pruned(i)
        dense = [(short, layer) for short, layer in self.layers[i] if (short, layer) not in pruned]
        collector, dense_out, flow.input_normed = statistics_pass(block, pruned, self.needs, flow,
                                                                   self.accumulate, dense)
        self.report.block_passes += 1
        t1 = time.perf_counter()
        timings["stats"] += t1 - t0
        self.leave_dense(i, collector.roles)
        for short, layer in pruned:
            info = LayerInfo(f"{self.prefix}.{i}.{short}", i, short, collector.roles.get(short))
            received(collector, short, info.name)
            stats = collector.stats(short, info)
            check_stats(stats, self.metric.name)
            self.prune_layer(layer, stats)
        del collector
        t2 = time.perf_counter()
        timings["prune"] += t2 - t1
        mse = cosine = None
        if sequential or reconstruction:
            mse, cosine = pruned_pass(block, flow, dense_out, sequential)
            self.report.block_passes += 1
        timings["forward"] += time.perf_counter() - t2
        flow.inputs = dense_out
        block.to(home)
        self.block_done(BlockReport(i, mse, cosine, time.perf_counter() - t_block))

    def finish(self, t_start: float) -> PruneReport:
        """Bias flags, realised sparsity, peak memory and wall time: the finished report."""
        report = self.report
        if any(layer.bias_added for layer in report.layers):
            report.config_flags = enable_bias_flags(self.model)
        pruned = [l for l in report.layers if not l.dense]
        total = sum(l.shape[0] * l.shape[1] for l in pruned)
        report.sparsity = sum(l.pruned for l in pruned) / max(total, 1)
        report.peak_memory_bytes = peak_memory(self.device)
        report.seconds = time.perf_counter() - t_start
        return report


def _checked(sparsities: Mapping[str, float], names: Mapping[str, nn.Module], pattern: Pattern,
             target: float) -> dict[str, float]:
    """Per-layer sparsities (an allocation) checked against the model's layers and the pattern."""
    unknown = sorted(set(sparsities) - set(names))
    if unknown:
        raise ConfigError(f"the allocation names {unknown[0]!r}, which is not a prunable layer of this model "
                          f"(they look like {next(iter(names), '?')!r})")
    if not sparsities:
        raise ConfigError("the allocation selects no layer: nothing would be pruned")
    out = {}
    for name in names:  # model order
        if name not in sparsities:
            continue
        value = float(sparsities[name])
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"layer {name}: allocated sparsity {value:g} is outside [0, 1)")
        if not pattern.per_layer_sparsity and not math.isclose(value, target, abs_tol=1e-9):
            raise ConfigError(f"pattern {pattern.spec!r} prunes every layer at sparsity {target:g}, but the "
                              f"allocation gives layer {name} {value:.4g}: use a uniform allocation with "
                              f"{pattern.spec}, or an unstructured pattern with a non-uniform one")
        out[name] = value
    return out


def _output_mse(dense: torch.Tensor, result: LayerResult, stats: LayerStats) -> float | None:
    """Mean squared output error of the decided layer on the calibration inputs, from their
    Gram matrix (exact, no activations kept): E‖ΔW x − b‖² / out over tokens, with ΔW the
    weight change and b the bias delta. None without a Gram matrix (or without the mean,
    when a bias delta must be accounted for)."""
    if stats.gram is None or (result.bias_delta is not None and stats.sum is None):
        return None
    new = dense.masked_fill(result.mask, 0) if result.weight is None else result.weight.masked_fill(result.mask, 0)
    delta = (dense - new).to(stats.gram.dtype)
    second = ((delta @ stats.gram) * delta).sum(dtype=torch.float64) / stats.count
    if result.bias_delta is not None:
        b = result.bias_delta.double()
        second = second - 2 * (b * (delta.double() @ (stats.sum.double() / stats.count))).sum() + b.square().sum()
    return max(float(second), 0.0) / dense.shape[0]


__all__ = ["BlockReport", "Calibration", "CalibrationStatistics", "LayerReport", "PruneReport", "collect_statistics",
           "prune"]
