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
masking.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ..base import STATISTICS, LayerInfo, LayerStats, Metric, Pattern
from ..errors import ConfigError, NumericalError
from .models import enable_bias_flags, find_blocks, module_device, move_outside, prunable_layers, set_weight, weight_of
from ..plugins import get_plugins
from .statistics import BlockCollector


@dataclass
class LayerReport:
    """Realised sparsity of one layer."""

    name: str
    block: int
    role: str | None
    shape: tuple[int, int]
    pruned: int
    sparsity: float
    bias_added: bool = False
    details: dict[str, Any] = field(default_factory=dict)
    """What a solver reported for this layer, e.g. ``{"percdamp": 0.1}`` after a retry."""


@dataclass
class BlockReport:
    """One block: reconstruction error of its outputs on the calibration inputs."""

    index: int
    mse: float | None
    """Mean squared error between dense and pruned block outputs (None: no forward pass)."""
    cosine: float | None
    """Mean over tokens of the cosine similarity of dense and pruned outputs."""
    seconds: float


@dataclass
class PruneReport:
    """What ``prune`` did: realised sparsity, reconstruction error, time, memory."""

    metric: str
    metric_version: str
    metric_options: dict[str, Any]
    pattern: str
    target_sparsity: float
    sparsity: float
    """Realised sparsity over all prunable layers (pruned / total weights)."""
    sequential: bool
    n_windows: int
    seqlen: int
    batch_size: int
    device: str
    seconds: float
    """Wall time of the whole call."""
    timings: dict[str, float]
    """Seconds by phase: capture (block-0 inputs), stats (pass 1), prune, forward (pass 2)."""
    block_passes: int
    """Forward passes of blocks over the calibration batches (0 for data-free metrics)."""
    peak_memory_bytes: int
    """Peak CUDA memory allocated on a GPU; peak process RSS on a CPU."""
    layers: list[LayerReport] = field(default_factory=list)
    blocks: list[BlockReport] = field(default_factory=list)
    offloaded: bool = False
    """Whether block activations were kept in CPU memory between passes."""
    config_flags: list[str] = field(default_factory=list)
    """Config flags turned on so that added biases survive save and reload."""
    shared_statistics: bool = False
    """Statistics came from ``collect_statistics`` (its passes and seconds are counted
    there, not here) and no reconstruction error was measured."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CalibrationStatistics:
    """Input statistics of every prunable layer of a dense model (one-shot protocol).

    Built by ``collect_statistics``; pass it to ``prune(..., statistics=...)`` for
    each metric whose ``statistics`` it covers. Held in CPU memory.
    """

    needs: frozenset[str]
    """The statistics collected (a union of metrics' ``statistics``)."""
    layers: dict[str, LayerStats]
    """By full layer name, with each layer's role."""
    n_windows: int
    seqlen: int
    batch_size: int
    seconds: float
    """Wall time of the collection (capture and one pass of every block)."""
    block_passes: int
    nbytes: int
    """Memory the statistics take."""


def resolve(metric: str | Metric, pattern: str | Pattern, metric_options: dict | None = None,
            pattern_options: dict | None = None) -> tuple[Metric, Pattern]:
    """Look up and instantiate a metric and a pattern by name."""
    plugins = get_plugins()
    if isinstance(metric, str):
        metric = plugins.metrics.get(metric).cls(metric_options)
    elif metric_options:
        raise ConfigError("metric_options go with a metric name, not a Metric instance")
    if isinstance(pattern, str):
        pattern = plugins.patterns.get(pattern).cls.from_spec(pattern, pattern_options)
    return metric, pattern


def _device(device: str | torch.device | None, model: nn.Module) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda") if torch.cuda.is_available() else module_device(model)


class _Stop(Exception):
    pass


def capture_inputs(model: nn.Module, blocks: nn.ModuleList, batches: list[torch.Tensor],
                   device: torch.device) -> list[tuple[torch.Tensor, tuple, dict]]:
    """Block 0's inputs and every argument it receives, one entry per batch."""
    captured = []

    def hook(module, args, kwargs):
        captured.append((args[0], args[1:], kwargs))
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def _block_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple | list) else out


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _finite(t: torch.Tensor) -> bool:
    if t.is_floating_point() and t.numel():
        # min and max carry any NaN or Inf: one read, no boolean copy of the tensor
        return bool(torch.isfinite(torch.stack(torch.aminmax(t))).all())
    return bool(torch.isfinite(t).all())


def _check_finite(t: torch.Tensor, what: str, layer: str, metric: str | None) -> None:
    if not _finite(t):
        by = f" (metric {metric})" if metric else ""
        raise NumericalError(f"{what} of layer {layer} contain NaN or Inf{by}")


def _check_stats(stats: LayerStats, metric: str | None) -> None:
    for key in ("sum", "sumsq", "gram"):
        value = getattr(stats, key)
        if value is not None:
            _check_finite(value, f"input statistics ({key})", stats.layer.name, metric)


def prune(
    model: nn.Module,
    calibration: torch.Tensor | None = None,
    metric: str | Metric = "wanda",
    pattern: str | Pattern = "unstructured",
    sparsity: float | None = None,
    metric_options: dict[str, Any] | None = None,
    sequential: bool = True,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    reconstruction: bool = True,
    offload: bool | None = None,
    progress: Callable[[int, int], None] | None = None,
    statistics: CalibrationStatistics | None = None,
) -> PruneReport:
    """Prune every linear layer of ``model``'s decoder blocks in place.

    Args:
        model: a Hugging Face decoder-only causal LM (any family).
        calibration: LongTensor ``[n, seqlen]`` of token windows; unused (may be None)
            for data-free metrics.
        metric: a registered metric name (or a ``Metric`` instance).
        pattern: a registered pattern spec: ``unstructured``, ``unstructured-layer``,
            ``2:4`` …
        sparsity: fraction of weights to prune; None means the pattern's own (N/M for
            N:M, 0.5 otherwise). N:M with any other sparsity is an error.
        metric_options: options of the metric (validated by its ``Options`` model).
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
    """
    t_start = time.perf_counter()
    metric, pattern = resolve(metric, pattern, metric_options)
    target = pattern.resolve_sparsity(sparsity)
    dev = _device(device, model)
    prefix, blocks = find_blocks(model)
    layers_per_block = [prunable_layers(b) for b in blocks]
    for block_layers in layers_per_block:
        for name, layer in block_layers:
            pattern.check_shape(tuple(weight_of(layer).shape))

    data_free = not metric.statistics and not metric.solver
    shared = statistics is not None and not data_free
    if shared:
        if sequential:
            raise ConfigError("shared statistics are the dense model's (one-shot): use sequential=False")
        missing = set(metric.statistics) - statistics.needs
        if missing:
            raise ConfigError(f"metric {metric.name!r} needs statistics {sorted(missing)}, which were not "
                              f"collected (have {sorted(statistics.needs)})")
        n, seqlen, batch_size = statistics.n_windows, statistics.seqlen, statistics.batch_size
    else:
        if not data_free and (calibration is None or calibration.ndim != 2 or calibration.dtype != torch.long):
            raise ConfigError(f"metric {metric.name!r} needs calibration windows: a LongTensor [n, seqlen]")
        n, seqlen = (tuple(calibration.shape) if calibration is not None and not data_free else (0, 0))
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    report = PruneReport(
        metric=metric.name, metric_version=metric.version, metric_options=metric.options.model_dump(),
        pattern=pattern.spec, target_sparsity=target, sparsity=0.0, sequential=sequential,
        n_windows=n, seqlen=seqlen, batch_size=batch_size, device=str(dev), seconds=0.0,
        timings={"capture": 0.0, "stats": 0.0, "prune": 0.0, "forward": 0.0}, block_passes=0,
        peak_memory_bytes=0, shared_statistics=shared,
    )
    with _eval_mode(model):
        if data_free or shared:
            _prune_without_passes(prefix, blocks, layers_per_block, metric, pattern, target, dev, report,
                                  statistics if shared else None, progress)
        else:
            _prune_calibrated(model, prefix, blocks, layers_per_block, metric, pattern, target, dev, report,
                              calibration, batch_size, sequential, reconstruction, offload, progress)
    if any(layer.bias_added for layer in report.layers):
        report.config_flags = enable_bias_flags(model)
    total = sum(l.shape[0] * l.shape[1] for l in report.layers)
    report.sparsity = sum(l.pruned for l in report.layers) / max(total, 1)
    report.peak_memory_bytes = _peak_memory(dev)
    report.seconds = time.perf_counter() - t_start
    return report


def _prune_layer(block_index: int, short: str, layer: nn.Module, full_name: str, stats: LayerStats,
                 metric: Metric, pattern: Pattern, sparsity: float, report: PruneReport) -> None:
    weight = weight_of(layer)
    dense = weight.detach().float()
    details: dict[str, Any] = {}
    had_bias = getattr(layer, "bias", None) is not None
    _check_finite(dense, "weights", full_name, metric.name)
    if metric.solver:
        mask, new_weight, *extra = metric.solve(dense, stats, pattern, sparsity)
        details = extra[0] if extra else {}
        _check_finite(new_weight, "updated weights", full_name, metric.name)
        set_weight(layer, new_weight)
    else:
        scores = metric.score(dense, stats)
        if scores.shape != dense.shape:
            raise NumericalError(f"metric {metric.name} returned scores of shape {tuple(scores.shape)} "
                                 f"for layer {full_name} of shape {tuple(dense.shape)}")
        _check_finite(scores, "scores", full_name, metric.name)
        mask = pattern.select(scores, sparsity)
        if type(metric).update is Metric.update:
            weight.masked_fill_(mask, 0)
        else:
            dense = dense.clone() if dense.data_ptr() == weight.data_ptr() else dense
            weight.masked_fill_(mask, 0)
            metric.update(layer, dense, mask, stats)
            weight = weight_of(layer)
            weight.masked_fill_(mask, 0)  # an update may change kept weights, never revive pruned ones
    pruned = int(mask.count_nonzero())
    report.layers.append(LayerReport(
        name=full_name, block=block_index, role=stats.layer.role, shape=tuple(weight.shape),
        pruned=pruned, sparsity=pruned / mask.numel(),
        bias_added=not had_bias and getattr(layer, "bias", None) is not None, details=details,
    ))


def _prune_without_passes(prefix, blocks, layers_per_block, metric, pattern, sparsity, dev, report,
                          statistics, progress):
    """Data-free metrics (no statistics at all), or one-shot metrics from shared statistics."""
    for i, (block, block_layers) in enumerate(zip(blocks, layers_per_block)):
        t0 = time.perf_counter()
        home = module_device(block)
        block.to(dev)
        on_device: dict[int, torch.Tensor] = {}
        for short, layer in block_layers:
            name = f"{prefix}.{i}.{short}"
            if statistics is None:
                stats = LayerStats(LayerInfo(name, i, short))
            else:
                if name not in statistics.layers:
                    raise ConfigError(f"layer {name} has no shared statistics: they were collected on "
                                      "another model")
                stats = _moved(statistics.layers[name], dev, on_device)
            _prune_layer(i, short, layer, name, stats, metric, pattern, sparsity, report)
        block.to(home)
        seconds = time.perf_counter() - t0
        report.timings["prune"] += seconds
        report.blocks.append(BlockReport(i, None, None, seconds))
        if progress:
            progress(i + 1, len(blocks))


def _moved(stats: LayerStats, device: torch.device, done: dict[int, torch.Tensor] | None = None) -> LayerStats:
    """``stats`` with its tensors on ``device``; ``done`` maps tensors already moved (by id),
    so layers that share statistics (q/k/v) share one copy there too."""
    done = {} if done is None else done
    moved = {}
    for key in ("sum", "sumsq", "gram", "m2"):
        t = getattr(stats, key)
        if t is not None and id(t) not in done:
            done[id(t)] = t.to(device)
        moved[key] = None if t is None else done[id(t)]
    return replace(stats, **moved)


def _capture(model, blocks, calibration, batch_size, dev, offload):
    """Block 0's inputs, on the device or (offloaded) in CPU memory, and its other arguments."""
    home = module_device(model)
    move_outside(model, blocks, dev)
    try:
        captured = capture_inputs(model, blocks, list(calibration.split(batch_size)), dev)
    finally:
        move_outside(model, blocks, home)
    extras = [(c[1], c[2]) for c in captured]
    # Two activation buffers (inputs, outputs); on a GPU they stay there only when they fit.
    if offload is None:
        need = 2 * sum(c[0].numel() * c[0].element_size() for c in captured)
        offload = dev.type == "cuda" and need > 0.5 * torch.cuda.mem_get_info(dev)[0]
    store = torch.device("cpu") if offload else dev
    return [c[0].to(store) for c in captured], extras, store, bool(offload)


def _statistics_pass(block, block_layers, needs, inputs, extras, dev, store, input_normed):
    """Pass 1 of one block over every batch, dense weights: the collector holding the
    layers' statistics and roles, the block's outputs, and whether they are normalised."""
    collector = BlockCollector(block_layers, block, needs)
    outputs = []
    with collector:
        for b, (x, (args, kwargs)) in enumerate(zip(inputs, extras)):
            x = x.to(dev, non_blocking=True)
            out = _block_output(block(x, *args, **kwargs))
            if b == 0:
                input_normed = collector.end_first_batch(x, out, input_normed)
            outputs.append(out.to(store, non_blocking=True))
    return collector, outputs, input_normed


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Eval mode and no KV cache while blocks run on calibration windows; both restored."""
    was_training, use_cache = model.training, getattr(model.config, "use_cache", None)
    model.eval()
    if use_cache is not None:
        model.config.use_cache = False
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
        if use_cache is not None:
            model.config.use_cache = use_cache


def collect_statistics(
    model: nn.Module,
    calibration: torch.Tensor,
    needs: Iterable[str],
    batch_size: int = 8,
    device: str | torch.device | None = None,
    offload: bool | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> CalibrationStatistics:
    """One dense pass of every block over ``calibration``, gathering the statistics
    named in ``needs`` (the union of the metrics' ``statistics``) for every prunable
    layer, as the one-shot protocol of ``prune`` would; the model is not changed.

    Statistics go to CPU memory block by block, so the device holds one block's.
    """
    t_start = time.perf_counter()
    needs = frozenset(needs)
    if not needs or not needs <= STATISTICS:
        raise ConfigError(f"needs must be a non-empty subset of {sorted(STATISTICS)}, got {sorted(needs)}")
    if calibration is None or calibration.ndim != 2 or calibration.dtype != torch.long:
        raise ConfigError("collect_statistics needs calibration windows: a LongTensor [n, seqlen]")
    dev = _device(device, model)
    prefix, blocks = find_blocks(model)
    layers: dict[str, LayerStats] = {}
    with _eval_mode(model):
        inputs, extras, store, _ = _capture(model, blocks, calibration, batch_size, dev, offload)
        input_normed = False
        for i, block in enumerate(blocks):
            block_layers = prunable_layers(block)
            block_home = module_device(block)
            block.to(dev)
            collector, outputs, input_normed = _statistics_pass(block, block_layers, needs, inputs, extras,
                                                                dev, store, input_normed)
            block.to(block_home)
            cpu: dict[int, LayerStats] = {}  # layers sharing an input share the copies
            for short, _ in block_layers:
                info = LayerInfo(f"{prefix}.{i}.{short}", i, short, collector.roles.get(short))
                if short not in collector.acc:
                    raise ConfigError(f"layer {info.name} received no input during calibration")
                key = id(collector.acc[short])
                if key not in cpu:
                    cpu[key] = _moved(collector.stats(short, info), torch.device("cpu"))
                    _check_stats(cpu[key], None)
                layers[info.name] = replace(cpu[key], layer=info)
            inputs = outputs
            if progress:
                progress(i + 1, len(blocks))
    tensors = {id(t): t for stats in layers.values() for t in (stats.sum, stats.sumsq, stats.gram, stats.m2)
               if t is not None}
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return CalibrationStatistics(needs=needs, layers=layers, n_windows=calibration.shape[0],
                                 seqlen=calibration.shape[1], batch_size=batch_size,
                                 seconds=time.perf_counter() - t_start, block_passes=len(blocks), nbytes=nbytes)


def _prune_calibrated(model, prefix, blocks, layers_per_block, metric, pattern, sparsity, dev, report,
                      calibration, batch_size, sequential, reconstruction, offload, progress):
    t0 = time.perf_counter()
    inputs, extras, store, report.offloaded = _capture(model, blocks, calibration, batch_size, dev, offload)
    report.timings["capture"] = time.perf_counter() - t0
    input_normed = False  # block 0 reads the embeddings

    for i, (block, block_layers) in enumerate(zip(blocks, layers_per_block)):
        t_block = time.perf_counter()
        block_home = module_device(block)
        block.to(dev)

        t0 = time.perf_counter()
        collector, dense_out, input_normed = _statistics_pass(block, block_layers, metric.statistics, inputs,
                                                              extras, dev, store, input_normed)
        report.block_passes += 1
        t1 = time.perf_counter()
        report.timings["stats"] += t1 - t0

        for short, layer in block_layers:
            info = LayerInfo(f"{prefix}.{i}.{short}", i, short, collector.roles.get(short))
            if short not in collector.acc:
                raise ConfigError(f"layer {info.name} received no input during calibration")
            stats = collector.stats(short, info)
            _check_stats(stats, metric.name)
            _prune_layer(i, short, layer, info.name, stats, metric, pattern, sparsity, report)
        del collector
        t2 = time.perf_counter()
        report.timings["prune"] += t2 - t1

        mse = cosine = None
        if sequential or reconstruction:
            sq = torch.zeros((), dtype=torch.float64, device=dev)
            cos = torch.zeros((), dtype=torch.float64, device=dev)
            count = tokens = 0
            for b, (x, (args, kwargs)) in enumerate(zip(inputs, extras)):
                pruned = _block_output(block(x.to(dev, non_blocking=True), *args, **kwargs))
                d, p = dense_out[b].to(dev).float(), pruned.float()
                sq += (d - p).square().sum(dtype=torch.float64)
                cos += torch.nn.functional.cosine_similarity(d, p, dim=-1).sum(dtype=torch.float64)
                count += d.numel()
                tokens += d.numel() // d.shape[-1]
                if sequential:
                    dense_out[b] = pruned.to(store, non_blocking=True)
            report.block_passes += 1
            mse, cosine = (sq / count).item(), (cos / tokens).item()
        report.timings["forward"] += time.perf_counter() - t2
        inputs = dense_out
        block.to(block_home)
        report.blocks.append(BlockReport(i, mse, cosine, time.perf_counter() - t_block))
        if progress:
            progress(i + 1, len(blocks))
