"""Forward passes of decoder blocks over calibration batches: block 0's inputs captured
with every argument it receives, the dense pass that gathers input statistics (pass 1),
the pruned pass that measures reconstruction error (pass 2), and ``collect_statistics``,
one dense pass whose statistics several one-shot ``prune`` calls share."""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..base import INPUT_STATISTICS, STATISTICS, LayerInfo, LayerStats, check_finite
from ..errors import ConfigError
from .models import find_blocks, module_device, move_outside, prunable_layers
from .reports import Calibration, CalibrationStatistics
from .statistics import ACCUMULATORS, BlockCollector


def target_device(device: str | torch.device | None, model: nn.Module) -> torch.device:
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


def block_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple | list) else out


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def check_stats(stats: LayerStats, metric: str | None) -> None:
    for key in ("sum", "sumsq", "gram", "window_m2"):
        value = getattr(stats, key)
        if value is not None:
            check_finite(value, f"input statistics ({key})", stats.layer.name, metric)


def moved(stats: LayerStats, device: torch.device, done: dict[int, torch.Tensor] | None = None) -> LayerStats:
    """``stats`` with its tensors on ``device``; ``done`` maps tensors already moved (by id),
    so layers that share statistics (q/k/v) share one copy there too."""
    done = {} if done is None else done
    moved = {}
    for key in ("sum", "sumsq", "gram", "m2", "window_m2"):
        t = getattr(stats, key)
        if t is not None and id(t) not in done:
            done[id(t)] = t.to(device)
        moved[key] = None if t is None else done[id(t)]
    return replace(stats, **moved)


@contextlib.contextmanager
def eval_mode(model: nn.Module):
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
class Flow:
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


def capture(model: nn.Module, blocks: nn.ModuleList, calibration: torch.Tensor, batch_size: int,
             dev: torch.device, offload: bool | None) -> tuple[Flow, bool]:
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
    return Flow([c[0].to(store) for c in captured], extras, store, dev), bool(offload)


def statistics_pass(block: nn.Module, block_layers: list[tuple[str, nn.Module]], needs: frozenset[str],
                     flow: Flow, accumulate: str, observed: list[tuple[str, nn.Module]] = ()
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
            out = block_output(block(x, *args, **kwargs))
            if b == 0:
                output_normed = collector.end_first_batch(x, out, flow.input_normed)
            outputs.append(out.to(flow.store, non_blocking=True))
    return collector, outputs, output_normed


def pruned_pass(block: nn.Module, flow: Flow, dense_out: list[torch.Tensor],
                 sequential: bool) -> tuple[float, float]:
    """Pass 2 of one block, pruned weights: mean squared error and mean cosine of its
    outputs against ``dense_out``; in sequential mode the pruned outputs replace them."""
    dev = flow.device
    sq = torch.zeros((), dtype=torch.float64, device=dev)
    cos = torch.zeros((), dtype=torch.float64, device=dev)
    count = tokens = 0
    for b, (x, (args, kwargs)) in enumerate(zip(flow.inputs, flow.extras)):
        pruned = block_output(block(x.to(dev, non_blocking=True), *args, **kwargs))
        d, p = dense_out[b].to(dev).float(), pruned.float()
        sq += (d - p).square().sum(dtype=torch.float64)
        cos += torch.nn.functional.cosine_similarity(d, p, dim=-1).sum(dtype=torch.float64)
        count += d.numel()
        tokens += d.numel() // d.shape[-1]
        if sequential:
            dense_out[b] = pruned.to(flow.store, non_blocking=True)
    return (sq / count).item(), (cos / tokens).item()


def received(collector: BlockCollector, short: str, name: str) -> None:
    if short not in collector.acc:
        raise ConfigError(f"layer {name} received no input during calibration")


def checked_accumulate(accumulate: str) -> str:
    if accumulate not in ACCUMULATORS:
        raise ConfigError(f"accumulate must be one of {sorted(ACCUMULATORS)}, got {accumulate!r}")
    return accumulate


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
    ``batch_size`` and ``accumulate``; one-shot whatever its ``sequential``), gathering the input
    statistics named in ``needs`` (the union of the metrics' ``statistics``; ``gradient``
    is left to ``core.gradients``) for every prunable layer, as the one-shot protocol of
    ``prune`` would; the model is not changed.

    Statistics go to CPU memory block by block, so the device holds one block's.
    """
    t_start = time.perf_counter()
    needs, accumulate = frozenset(needs), checked_accumulate(calibration.accumulate)
    batch_size = calibration.batch_size
    if not needs or not needs <= STATISTICS:
        raise ConfigError(f"needs must be a non-empty subset of {sorted(STATISTICS)}, got {sorted(needs)}")
    needs &= INPUT_STATISTICS
    if windows is None or windows.ndim != 2 or windows.dtype != torch.long:
        raise ConfigError("collect_statistics needs calibration windows: a LongTensor [n, seqlen]")
    dev = target_device(device, model)
    prefix, blocks = find_blocks(model)
    layers: dict[str, LayerStats] = {}
    with eval_mode(model):
        flow, _ = capture(model, blocks, windows, batch_size, dev, offload)
        for i, block in enumerate(blocks):
            block_layers = prunable_layers(block)
            block_home = module_device(block)
            block.to(dev)
            collector, outputs, normed = statistics_pass(block, block_layers, needs, flow, accumulate)
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
        received(collector, short, info.name)
        key = id(collector.acc[short])
        if key not in cpu:
            cpu[key] = moved(collector.stats(short, info), torch.device("cpu"))
            check_stats(cpu[key], None)
        out[info.name] = replace(cpu[key], layer=info)
    return out


__all__ = ["Flow", "block_output", "capture", "capture_inputs", "check_stats", "checked_accumulate",
           "collect_statistics", "eval_mode", "moved", "peak_memory", "pruned_pass", "received", "statistics_pass",
           "target_device"]
