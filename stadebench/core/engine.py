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

The engine takes ``Metric`` and ``Pattern`` instances and never looks names up (that is
``stadebench.prune`` and ``stadebench.plugins.resolve``). Each layer is decided by one
call, ``metric.prune_layer``, and the ``LayerResult`` it returns is applied here.
"""

from __future__ import annotations

import contextlib
import math
import resource
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ..base import STATISTICS, LayerInfo, LayerResult, LayerStats, Metric, Pattern, check_finite
from ..errors import ConfigError
from .models import (add_bias, enable_bias_flags, find_blocks, module_device, move_outside, prunable_layers,
                     set_weight, weight_of)
from .statistics import ACCUMULATORS, BlockCollector


@dataclass(frozen=True)
class Calibration:
    """How calibration windows feed the blocks: the suite's ``calibration`` knobs that the
    engine reads, under the same names (a suite's ``CalibrationSpec`` is passed as it is).

    Attributes:
        sequential: each block sees the pruned outputs of the previous one (True), or
            the dense ones (False, one-shot).
        batch_size: calibration windows per forward pass.
        accumulate: how input statistics are summed (``core.statistics.ACCUMULATORS``:
            ``float64``, or the reference releases' ``released``).
    """

    sequential: bool = True
    batch_size: int = 8
    accumulate: str = "float64"


@dataclass
class LayerReport:
    """What happened to one prunable layer."""

    name: str
    block: int
    role: str | None
    shape: tuple[int, int]
    pruned: int
    """Weights pruned (0 for a layer left dense)."""
    sparsity: float
    """Realised sparsity: pruned / weights."""
    bias_added: bool = False
    details: dict[str, Any] = field(default_factory=dict)
    """What a solver reported for this layer, e.g. ``{"percdamp": 0.1}`` after a retry."""
    allocated: float | None = None
    """The sparsity this layer was asked for (the target, or its allocator's share); None
    for a layer left dense."""
    dense: bool = False
    """Left dense: outside the layers selected for pruning (``targets`` / ``ignore``)."""
    output_mse: float | None = None
    """Mean squared error of the layer's outputs, pruned against dense, on the calibration
    inputs, computed exactly from their Gram matrix when the metric collected it; else None."""


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
    """Realised sparsity over the pruned layers (pruned / their weights); layers left dense
    by an allocation are not counted."""
    sequential: bool
    n: int
    """Calibration windows (``calibration.n``); 0 for a data-free metric."""
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
    accumulate: str = "float64"
    """How input statistics were summed (``calibration.accumulate``)."""
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
    n: int
    """Calibration windows (``calibration.n``)."""
    seqlen: int
    batch_size: int
    seconds: float
    """Wall time of the collection (capture and one pass of every block)."""
    block_passes: int
    nbytes: int
    """Memory the statistics take."""
    accumulate: str = "float64"
    """How they were summed (``core.statistics.ACCUMULATORS``)."""


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


def _check_stats(stats: LayerStats, metric: str | None) -> None:
    for key in ("sum", "sumsq", "gram"):
        value = getattr(stats, key)
        if value is not None:
            check_finite(value, f"input statistics ({key})", stats.layer.name, metric)


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


# --- block activations --------------------------------------------------------------


@dataclass
class _Flow:
    """The calibration activations entering the current block, batch by batch."""

    inputs: list[torch.Tensor]
    """The block's input hidden states, on the device or (offloaded) in CPU memory."""
    extras: list[tuple[tuple, dict]]
    """The other arguments block 0 received per batch (masks, positions), reused by every block."""
    store: torch.device
    """Where activations wait between passes."""
    device: torch.device
    """Where the block runs."""
    input_normed: bool = False
    """Whether the inputs are a normalisation layer's output (block 0 reads the embeddings)."""


def _capture(model: nn.Module, blocks: nn.ModuleList, calibration: torch.Tensor, batch_size: int,
             dev: torch.device, offload: bool | None) -> tuple[_Flow, bool]:
    """Block 0's inputs, on the device or (offloaded) in CPU memory, and whether they were offloaded."""
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
    return _Flow([c[0].to(store) for c in captured], extras, store, dev), bool(offload)


def _statistics_pass(block: nn.Module, block_layers: list[tuple[str, nn.Module]], needs: frozenset[str],
                     flow: _Flow, accumulate: str, observed: list[tuple[str, nn.Module]] = ()
                     ) -> tuple[BlockCollector, list[torch.Tensor], bool]:
    """Pass 1 of one block over every batch, dense weights: the collector holding the
    layers' statistics and roles (the ``observed`` layers' roles only), the block's
    outputs, and whether they are normalised."""
    collector = BlockCollector(block_layers, block, needs, accumulate, observed)
    outputs = []
    output_normed = flow.input_normed
    with collector:
        for b, (x, (args, kwargs)) in enumerate(zip(flow.inputs, flow.extras)):
            x = x.to(flow.device, non_blocking=True)
            out = _block_output(block(x, *args, **kwargs))
            if b == 0:
                output_normed = collector.end_first_batch(x, out, flow.input_normed)
            outputs.append(out.to(flow.store, non_blocking=True))
    return collector, outputs, output_normed


def _pruned_pass(block: nn.Module, flow: _Flow, dense_out: list[torch.Tensor],
                 sequential: bool) -> tuple[float, float]:
    """Pass 2 of one block, pruned weights: mean squared error and mean cosine of its
    outputs against ``dense_out``; in sequential mode the pruned outputs replace them."""
    dev = flow.device
    sq = torch.zeros((), dtype=torch.float64, device=dev)
    cos = torch.zeros((), dtype=torch.float64, device=dev)
    count = tokens = 0
    for b, (x, (args, kwargs)) in enumerate(zip(flow.inputs, flow.extras)):
        pruned = _block_output(block(x.to(dev, non_blocking=True), *args, **kwargs))
        d, p = dense_out[b].to(dev).float(), pruned.float()
        sq += (d - p).square().sum(dtype=torch.float64)
        cos += torch.nn.functional.cosine_similarity(d, p, dim=-1).sum(dtype=torch.float64)
        count += d.numel()
        tokens += d.numel() // d.shape[-1]
        if sequential:
            dense_out[b] = pruned.to(flow.store, non_blocking=True)
    return (sq / count).item(), (cos / tokens).item()


def _received(collector: BlockCollector, short: str, name: str) -> None:
    if short not in collector.acc:
        raise ConfigError(f"layer {name} received no input during calibration")


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
    prunes every layer at the target ``sparsity``.
    """
    t_start = time.perf_counter()
    if not isinstance(metric, Metric) or not isinstance(pattern, Pattern):
        raise TypeError("the engine takes Metric and Pattern instances; stadebench.prune also takes "
                        f"registered names (got {type(metric).__name__}, {type(pattern).__name__})")
    sequential, batch_size = calibration.sequential, calibration.batch_size
    run = _Pruning.begin(model, metric, pattern, sparsity, device, progress, sparsities, calibration.accumulate)
    shared = statistics if statistics is not None and not metric.data_free() else None
    if shared is not None and shared.accumulate != run.accumulate:
        raise ConfigError(f"shared statistics were accumulated {shared.accumulate!r}, not {run.accumulate!r}")
    n, seqlen, batch_size = _protocol(metric, windows, shared, sequential, batch_size)
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    run.report = PruneReport(
        metric=metric.name, metric_version=metric.version, metric_options=metric.options.model_dump(),
        pattern=pattern.spec, target_sparsity=run.sparsity, sparsity=0.0, sequential=sequential,
        n=n, seqlen=seqlen, batch_size=batch_size, device=str(run.device), seconds=0.0,
        timings={"capture": 0.0, "stats": 0.0, "prune": 0.0, "forward": 0.0}, block_passes=0,
        peak_memory_bytes=0, shared_statistics=shared is not None, accumulate=run.accumulate,
    )
    with _eval_mode(model):
        if shared is not None or metric.data_free():
            run.without_passes(shared)
        else:
            run.calibrated(windows, batch_size, sequential, reconstruction, offload)
    return run.finish(t_start)


def _accumulate(accumulate: str) -> str:
    if accumulate not in ACCUMULATORS:
        raise ConfigError(f"accumulate must be one of {sorted(ACCUMULATORS)}, got {accumulate!r}")
    return accumulate


def _protocol(metric: Metric, windows: torch.Tensor | None, shared: CalibrationStatistics | None,
              sequential: bool, batch_size: int) -> tuple[int, int, int]:
    """``(n, seqlen, batch_size)`` of a ``prune`` call, checked: shared statistics
    must be one-shot and cover the metric; a calibrated metric needs token windows."""
    if shared is not None:
        if sequential:
            raise ConfigError("shared statistics are the dense model's (one-shot): use sequential=False")
        missing = set(metric.statistics) - shared.needs
        if missing:
            raise ConfigError(f"metric {metric.name!r} needs statistics {sorted(missing)}, which were not "
                              f"collected (have {sorted(shared.needs)})")
        return shared.n, shared.seqlen, shared.batch_size
    if metric.data_free():
        return 0, 0, batch_size
    if windows is None or windows.ndim != 2 or windows.dtype != torch.long:
        raise ConfigError(f"metric {metric.name!r} needs calibration windows: a LongTensor [n, seqlen]")
    n, seqlen = windows.shape
    return n, seqlen, batch_size


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

    @classmethod
    def begin(cls, model: nn.Module, metric: Metric, pattern: Pattern, sparsity: float | None,
              device: str | torch.device | None, progress: Callable[[int, int], None] | None,
              sparsities: Mapping[str, float] | None = None, accumulate: str = "float64") -> _Pruning:
        """Check the sparsity, the allocation, the accumulation and every pruned layer's
        shape against the pattern before anything runs."""
        target = pattern.resolve_sparsity(sparsity)
        accumulate = _accumulate(accumulate)
        dev = _device(device, model)
        prefix, blocks = find_blocks(model)
        layers = [prunable_layers(b) for b in blocks]
        names = {f"{prefix}.{i}.{short}": layer for i, block_layers in enumerate(layers)
                 for short, layer in block_layers}
        sparsities = dict.fromkeys(names, target) if sparsities is None else _checked(sparsities, names, pattern,
                                                                                      target)
        for name in sparsities:
            pattern.check_shape(tuple(weight_of(names[name]).shape))
        return cls(model, prefix, blocks, layers, metric, pattern, target, dev, sparsities, progress,
                   accumulate=accumulate)

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
        result = self.metric.prune_layer(dense, stats, self.pattern, sparsity)
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
                    stats = _moved(shared.layers[name], self.device, on_device)
                self.prune_layer(layer, stats)
            block.to(home)
            seconds = time.perf_counter() - t0
            self.report.timings["prune"] += seconds
            self.block_done(BlockReport(i, None, None, seconds))

    def calibrated(self, calibration: torch.Tensor, batch_size: int, sequential: bool, reconstruction: bool,
                   offload: bool | None) -> None:
        """The calibrated protocol: capture block 0's inputs, then each block in turn."""
        t0 = time.perf_counter()
        flow, self.report.offloaded = _capture(self.model, self.blocks, calibration, batch_size, self.device,
                                               offload)
        self.report.timings["capture"] = time.perf_counter() - t0
        for i in range(len(self.blocks)):
            self.calibrated_block(i, flow, sequential, reconstruction)

    def calibrated_block(self, i: int, flow: _Flow, sequential: bool, reconstruction: bool) -> None:
        """Pass 1 (statistics), pruning of every layer, pass 2 (pruned outputs, reconstruction
        error); ``flow`` then holds the next block's inputs."""
        t_block = time.perf_counter()
        block, timings = self.blocks[i], self.report.timings
        home = module_device(block)
        block.to(self.device)
        t0 = time.perf_counter()
        pruned = self.pruned(i)
        dense = [(short, layer) for short, layer in self.layers[i] if (short, layer) not in pruned]
        collector, dense_out, flow.input_normed = _statistics_pass(block, pruned, self.metric.statistics,
                                                                   flow, self.accumulate, dense)
        self.report.block_passes += 1
        t1 = time.perf_counter()
        timings["stats"] += t1 - t0
        self.leave_dense(i, collector.roles)
        for short, layer in pruned:
            info = LayerInfo(f"{self.prefix}.{i}.{short}", i, short, collector.roles.get(short))
            _received(collector, short, info.name)
            stats = collector.stats(short, info)
            _check_stats(stats, self.metric.name)
            self.prune_layer(layer, stats)
        del collector
        t2 = time.perf_counter()
        timings["prune"] += t2 - t1
        mse = cosine = None
        if sequential or reconstruction:
            mse, cosine = _pruned_pass(block, flow, dense_out, sequential)
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
        report.peak_memory_bytes = _peak_memory(self.device)
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


# --- one-shot statistics shared by several prune calls -------------------------------


def collect_statistics(
    model: nn.Module,
    windows: torch.Tensor,
    needs: Iterable[str],
    *,
    calibration: Calibration = Calibration(),
    device: str | torch.device | None = None,
    offload: bool | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> CalibrationStatistics:
    """One dense pass of every block over ``windows``, fed as ``calibration`` says (its
    ``batch_size`` and ``accumulate``; one-shot whatever its ``sequential``), gathering the statistics
    named in ``needs`` (the union of the metrics' ``statistics``) for every prunable
    layer, as the one-shot protocol of ``prune`` would; the model is not changed.

    Statistics go to CPU memory block by block, so the device holds one block's.
    """
    t_start = time.perf_counter()
    needs, accumulate = frozenset(needs), _accumulate(calibration.accumulate)
    batch_size = calibration.batch_size
    if not needs or not needs <= STATISTICS:
        raise ConfigError(f"needs must be a non-empty subset of {sorted(STATISTICS)}, got {sorted(needs)}")
    if windows is None or windows.ndim != 2 or windows.dtype != torch.long:
        raise ConfigError("collect_statistics needs calibration windows: a LongTensor [n, seqlen]")
    dev = _device(device, model)
    prefix, blocks = find_blocks(model)
    layers: dict[str, LayerStats] = {}
    with _eval_mode(model):
        flow, _ = _capture(model, blocks, windows, batch_size, dev, offload)
        for i, block in enumerate(blocks):
            block_layers = prunable_layers(block)
            block_home = module_device(block)
            block.to(dev)
            collector, outputs, normed = _statistics_pass(block, block_layers, needs, flow, accumulate)
            block.to(block_home)
            layers.update(_on_cpu(collector, block_layers, prefix, i))
            flow.inputs, flow.input_normed = outputs, normed
            if progress:
                progress(i + 1, len(blocks))
    tensors = {id(t): t for stats in layers.values() for t in (stats.sum, stats.sumsq, stats.gram, stats.m2)
               if t is not None}
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return CalibrationStatistics(needs=needs, layers=layers, n=windows.shape[0],
                                 seqlen=windows.shape[1], batch_size=batch_size,
                                 seconds=time.perf_counter() - t_start, block_passes=len(blocks), nbytes=nbytes,
                                 accumulate=accumulate)


def _on_cpu(collector: BlockCollector, block_layers: list[tuple[str, nn.Module]], prefix: str,
            i: int) -> dict[str, LayerStats]:
    """Block ``i``'s statistics by full layer name, checked and copied to CPU memory;
    layers that share an input share the copies."""
    cpu: dict[int, LayerStats] = {}
    out = {}
    for short, _ in block_layers:
        info = LayerInfo(f"{prefix}.{i}.{short}", i, short, collector.roles.get(short))
        _received(collector, short, info.name)
        key = id(collector.acc[short])
        if key not in cpu:
            cpu[key] = _moved(collector.stats(short, info), torch.device("cpu"))
            _check_stats(cpu[key], None)
        out[info.name] = replace(cpu[key], layer=info)
    return out


__all__ = ["BlockReport", "Calibration", "CalibrationStatistics", "LayerReport", "PruneReport", "capture_inputs",
           "collect_statistics", "prune"]
