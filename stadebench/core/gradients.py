"""Per-weight gradient statistics of the language-modelling loss (GBLM-Pruner's).

For each calibration window w, one forward and one backward pass of the whole model give
g_w = ∂L_w/∂W, with L_w the window's mean next-token loss (labels = the window itself).
Every prunable weight then has

    l1 = Σ_w |s·g_w|        l2 = sqrt(Σ_w (s·g_w)²)

with s the metric's gradient scale (100 in the releases). The sums are kept in one pair of
buffers per prunable weight, filled by a hook as each weight's gradient arrives, which then
drops the gradient: no per-window gradient is kept, and at most one weight's gradient is
alive at a time besides the activations.

``accumulate: float64`` (the default) keeps both sums in float32 (float64 would double
memory of the model's size); ``released`` reproduces VILA-Lab/GBLM-Pruner's
``gradient_computation.py``: l1 summed in float16, l2 summed in float32, both stored as
float16. The pass runs in eval mode (no dropout; the releases call ``model.train()``, the
same for LLaMA, whose dropout is 0).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError, NumericalError
from .models import find_blocks, module_device, named_layers, transposed
from .passes import checked_accumulate, peak_memory, target_device

VERSION = "1"
"""Version of the gradient statistic: part of every cache key, bumped when its values change."""


@dataclass
class GradientStatistics:
    """The gradient statistics of every prunable weight of a dense model.

    Built by ``gradient_statistics``; pass it to ``prune(..., gradients=...)`` for each
    metric that reads ``"gradient"`` with the same ``scale``.
    """

    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]
    """``(l1, l2)`` per full layer name, each ``[out, in]`` like the layer's weight."""
    n: int
    """Calibration windows (one backward pass each)."""
    seqlen: int
    scale: float
    accumulate: str
    seconds: float = 0.0
    nbytes: int = 0
    peak_memory_bytes: int = 0
    cached: bool = False
    """Read from the on-disk cache rather than computed."""

    def matches(self, scale: float, accumulate: str) -> bool:
        return self.scale == float(scale) and self.accumulate == accumulate

    def summary(self, shared: bool) -> dict[str, Any]:
        """What a ``PruneReport`` records of them (``shared``: given to ``prune``, not computed there)."""
        return {"seconds": self.seconds, "cached": self.cached, "shared": shared, "scale": self.scale,
                "megabytes": round(self.nbytes / 2**20, 1)}


def _grad_view(layer: nn.Module, grad: torch.Tensor) -> torch.Tensor:
    """A gradient as ``[out, in]`` (Conv1D stores its weight transposed)."""
    return grad.t() if transposed(layer) else grad


def needed_bytes(model: nn.Module, seqlen: int, accumulators_on_device: bool, checkpointing: bool) -> int:
    """An upper estimate of the device memory of the gradient pass: the model, one weight's
    gradient, the accumulators if they stay on the device, and the activations of one window
    (every block's when not checkpointed, one block's and the block inputs when it is)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    prunable = [layer.weight for layer in named_layers(model).values()]
    biggest = max((w.numel() * w.element_size() for w in prunable), default=0)
    accumulators = 8 * sum(w.numel() for w in prunable) if accumulators_on_device else 0
    config = model.config
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0)
    inner = getattr(config, "intermediate_size", None) or 4 * hidden
    vocab = getattr(config, "vocab_size", 0)
    n_blocks = len(find_blocks(model)[1])
    itemsize = next(model.parameters()).element_size()
    # per block and token: ~16 hidden-sized tensors and ~4 of the MLP's width are kept for backward
    per_block = seqlen * (16 * hidden + 4 * inner) * itemsize
    activations = (n_blocks * seqlen * hidden * itemsize + 2 * per_block) if checkpointing else n_blocks * per_block
    logits = 3 * seqlen * vocab * 4  # logits, their float32 copy and the softmax's gradient
    return params + biggest + accumulators + activations + logits


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: do not refuse


@contextlib.contextmanager
def _checkpointed(blocks: nn.ModuleList, on: bool) -> Iterator[None]:
    """Each block's forward recomputed in the backward pass (activation checkpointing), in
    eval mode too (transformers' own checkpointing needs train mode)."""
    if not on:
        yield
        return
    originals = []
    for block in blocks:
        forward = block.forward
        originals.append((block, forward))

        def wrapped(*args, _forward=forward, **kwargs):
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = wrapped
    try:
        yield
    finally:
        for block, _ in originals:
            del block.forward  # the instance attribute; the class's forward shows again


@contextlib.contextmanager
def _only_weights_train(model: nn.Module, weights: list[nn.Parameter]) -> Iterator[None]:
    """requires_grad on the prunable weights only, eval mode and no KV cache; all restored."""
    before = [(p, p.requires_grad) for p in model.parameters()]
    was_training, use_cache = model.training, getattr(model.config, "use_cache", None)
    model.eval()
    if use_cache is not None:
        model.config.use_cache = False
    for p, _ in before:
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in before:
            p.grad = None
            p.requires_grad_(flag)
        model.train(was_training)
        if use_cache is not None:
            model.config.use_cache = use_cache


def check_language_model(model: nn.Module, what: str = "gradient statistics") -> None:
    """ConfigError unless ``model`` computes a language-modelling loss (has an LM head)."""
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if head is None:
        raise ConfigError(f"{what} need the language-modelling loss, but {type(model).__name__} has no "
                          "language-modelling head: load the model with its head (AutoModelForCausalLM)")


class _Sums:
    """The two running sums of every prunable weight, filled by a hook on each weight as
    its gradient arrives (the gradient is dropped then); ``missing`` names the layers that
    have not received one since it was last filled."""

    def __init__(self, layers: dict[str, nn.Module], scale: float, store: torch.device, accumulate: str):
        self.scale, self.store, self.accumulate = scale, store, accumulate
        self.low = torch.float16 if accumulate == "released" else torch.float32
        self.sums = {name: (torch.zeros(tuple(_grad_view(layer, layer.weight).shape), dtype=self.low, device=store),
                            torch.zeros(tuple(_grad_view(layer, layer.weight).shape), dtype=torch.float32,
                                        device=store))
                     for name, layer in layers.items()}
        self.missing: set[str] = set()

    def hook(self, name: str, layer: nn.Module) -> Callable[[torch.Tensor], None]:
        def add(param: torch.Tensor) -> None:
            g = _grad_view(layer, param.grad.detach()).float() * self.scale
            l1, l2 = self.sums[name]
            l1.add_(g.abs().to(self.store, self.low))
            l2.add_(g.square().to(self.store))
            self.missing.discard(name)
            param.grad = None
        return add

    def results(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``(l1, l2)`` by layer in CPU memory, l2 square-rooted (float16 under ``released``)."""
        out = {}
        for name, (l1, l2) in self.sums.items():
            l2 = l2.sqrt_()
            out[name] = (l1.cpu(), (l2.half() if self.accumulate == "released" else l2).cpu())
        return out


def _checked(model: nn.Module, windows: torch.Tensor, scale: float) -> tuple[int, int]:
    """``(n, seqlen)`` of ``windows``; ConfigError for what no pass could serve."""
    if not (isinstance(scale, int | float) and math.isfinite(scale) and scale > 0):
        raise ConfigError(f"the gradient scale must be a positive finite number, got {scale!r}")
    if windows is None or windows.ndim != 2 or windows.dtype != torch.long:
        raise ConfigError("gradient statistics need calibration windows: a LongTensor [n, seqlen]")
    n, seqlen = windows.shape
    if n < 1 or seqlen < 2:
        raise ConfigError(f"gradient statistics need at least one calibration window of 2 or more tokens "
                          f"(a next-token loss), got {n} windows of {seqlen}")
    check_language_model(model)
    return n, seqlen


def _store(model: nn.Module, dev: torch.device, seqlen: int, checkpointing: bool) -> torch.device:
    """Where the sums go: the device when the pass with them there needs less than half its
    free memory, else CPU memory; ConfigError when the pass cannot fit at all."""
    free = _free_bytes(dev)
    on_device = needed_bytes(model, seqlen, True, checkpointing) < 0.5 * free
    need = needed_bytes(model, seqlen, on_device, checkpointing)
    if need > free:
        raise ConfigError(f"the gradient pass needs about {_size(need)} on {dev} (the model, one window's "
                          f"activations of {seqlen} tokens{'' if checkpointing else ' without checkpointing'}), "
                          f"which has {_size(free)} free: use shorter calibration windows (calibration.seqlen) "
                          "or a larger device")
    return dev if on_device else torch.device("cpu")


def _backward(model: nn.Module, windows: torch.Tensor, dev: torch.device, layers: dict[str, nn.Module],
              sums: _Sums, progress: Callable[[int, int], None] | None) -> None:
    """One forward and backward pass per window, the hooks of ``sums`` collecting."""
    handles = [layer.weight.register_post_accumulate_grad_hook(sums.hook(name, layer))
               for name, layer in layers.items()]
    try:
        for w, window in enumerate(windows):
            sums.missing.update(layers)
            ids = window.unsqueeze(0).to(dev)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            if loss is None:
                raise ConfigError(f"{type(model).__name__} returned no loss for labelled input: gradient "
                                  "statistics need a causal language model")
            if not torch.isfinite(loss):
                raise NumericalError(f"the language-modelling loss of calibration window {w} is {loss.item()}")
            loss.backward()
            if sums.missing:
                raise NumericalError(f"layer {sorted(sums.missing)[0]} received no gradient from calibration "
                                     f"window {w}: it does not take part in the loss")
            if progress:
                progress(w + 1, len(windows))
    finally:
        for h in handles:
            h.remove()


def gradient_statistics(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    scale: float = 100.0,
    accumulate: str = "float64",
    device: str | torch.device | None = None,
    checkpointing: bool | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> GradientStatistics:
    """One forward and backward pass of ``model`` per window of ``windows`` (a LongTensor
    ``[n, seqlen]``), accumulating ``scale``-scaled l1 and l2 gradient statistics for every
    prunable weight; the model's weights are not changed.

    The model runs on ``device`` (default: CUDA when available, else where the model is)
    and goes back where it was. ``checkpointing`` (default: on for CUDA) recomputes each
    block's activations in the backward pass. The accumulators stay on the device when
    they fit in half of its free memory next to the pass, else in CPU memory. A pass that
    cannot fit at all is a ConfigError before any backward pass.
    """
    t_start = time.perf_counter()
    accumulate = checked_accumulate(accumulate)
    n, seqlen = _checked(model, windows, scale)
    dev = target_device(device, model)
    checkpointing = dev.type == "cuda" if checkpointing is None else checkpointing
    layers = named_layers(model)
    sums = _Sums(layers, scale, _store(model, dev, seqlen, checkpointing), accumulate)
    home = module_device(model)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    try:
        model.to(dev)
        with _only_weights_train(model, [layer.weight for layer in layers.values()]), \
                _checkpointed(find_blocks(model)[1], checkpointing):
            _backward(model, windows, dev, layers, sums, progress)
    finally:
        model.to(home)
    out = sums.results()
    nbytes = sum(t.numel() * t.element_size() for pair in out.values() for t in pair)
    return GradientStatistics(out, n=n, seqlen=seqlen, scale=float(scale), accumulate=accumulate,
                              seconds=time.perf_counter() - t_start, nbytes=nbytes,
                              peak_memory_bytes=peak_memory(dev))


__all__ = ["VERSION", "GradientStatistics", "check_language_model", "gradient_statistics", "needed_bytes"]
