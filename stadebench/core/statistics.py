"""Streaming input statistics of linear layers, gathered with forward hooks.

Accumulated over tokens whatever the model dtype: sums in float64, the Gram matrix in
float32. When the mean is asked for, each batch is centred on its own mean and batches
are merged with Chan's parallel update, so the variance stays accurate for channels
whose mean dwarfs their spread (where Σx² − (Σx)²/n would cancel). Layers that read the
very same input tensor (q/k/v, gate/up) share one accumulator, found on the first batch,
so each input is reduced once. Each statistic is computed one way whatever else is
collected with it, so statistics gathered once for several metrics (one-shot grids)
give each metric exactly what its own pass would. ``ReleasedAccumulator`` instead
reproduces the reference releases' float32 running updates (``calibration.accumulate``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..base import INPUT_STATISTICS, LayerInfo, LayerStats
from .models import norm_modules


class Accumulator:
    """Σx, Σx², XᵀX of one input tensor stream, only those asked for."""

    def __init__(self, needs: frozenset[str]):
        self.needs = needs
        self.count = self.windows = 0
        self.mean = self.m2 = self.sumsq = self.gram = self.window_m2 = None

    def add_within(self, x: torch.Tensor) -> None:
        """Σ_w Σ_t (x − μ_w)² of the windows in ``x`` (``[windows, tokens, in]`` or one window)."""
        if "window_var" in self.needs:
            windows = x.reshape(-1, x.shape[-2], x.shape[-1]).float()
            m2 = (windows - windows.mean(1, keepdim=True)).square().sum((0, 1)).double()
            self.window_m2 = m2 if self.window_m2 is None else self.window_m2.add_(m2)

    def add(self, x: torch.Tensor) -> None:
        self.add_within(x)
        self.windows += x.shape[0] if x.ndim > 2 else 1
        x = x.reshape(-1, x.shape[-1]).float()
        n, nb = self.count, x.shape[0]
        # (x * x).sum(0): ~10x faster on a CPU than vector_norm over dim 0 (a strided reduction)
        if "sum" in self.needs:
            mean_b = x.mean(0)
            centred = x - mean_b
            m2_b = (centred * centred).sum(0).double()
            mean_b = mean_b.double()
            if self.mean is None:
                self.mean, self.m2 = mean_b, m2_b
            else:
                delta = mean_b - self.mean
                self.mean.add_(delta, alpha=nb / (n + nb))
                self.m2.add_(m2_b).add_(delta.square_(), alpha=n * nb / (n + nb))
        if "sumsq" in self.needs:
            q = (x * x).sum(0).double()
            self.sumsq = q if self.sumsq is None else self.sumsq.add_(q)
        if "gram" in self.needs:
            if self.gram is None:
                self.gram = x.t() @ x
            else:
                self.gram.addmm_(x.t(), x)
        self.count = n + nb

    def stats(self, layer: LayerInfo) -> LayerStats:
        total = None if self.mean is None else self.mean * self.count
        return LayerStats(layer, self.count, total, self.sumsq, self.gram, self.m2, self.windows,
                          window_m2=self.window_m2)


class ReleasedAccumulator(Accumulator):
    """The releases' accumulation (``accumulate: released``): float32 running statistics
    updated one window at a time, as locuslab/wanda (a running mean of ‖x_j‖², a running
    (2/n)·XᵀX) and Coello-dev/STADE (a running mean and a one-pass variance) do.

    Less accurate than ``Accumulator`` (float64 sums, Chan's variance merge) by
    construction; it exists to reproduce the releases' numbers, which this rounding moves
    by up to a few percent of perplexity under the sequential protocol. Bit for bit with
    the releases at ``batch_size: 1`` (a batch's kernels may round activations otherwise).
    """

    def __init__(self, needs: frozenset[str]):
        super().__init__(needs)
        self.windows = 0
        self.var = None

    def add(self, x: torch.Tensor) -> None:
        self.add_within(x)
        for window in x.reshape(-1, *x.shape[-2:]) if x.ndim > 2 else [x]:
            self._add_window(window.reshape(-1, x.shape[-1]).t().float())

    def _add_window(self, inp: torch.Tensor) -> None:
        n, tokens = self.windows, inp.shape[1]
        if "sumsq" in self.needs:
            self.sumsq = torch.zeros(inp.shape[0], device=inp.device) if self.sumsq is None else self.sumsq
            self.sumsq *= n / (n + 1)
            self.sumsq += torch.norm(inp, p=2, dim=1) ** 2 / (n + 1)
        if "gram" in self.needs:
            if self.gram is None:
                self.gram = torch.zeros(inp.shape[0], inp.shape[0], device=inp.device)
            self.gram *= n / (n + 1)
            scaled = math.sqrt(2 / (n + 1)) * inp
            self.gram += scaled.matmul(scaled.t())
        if "sum" in self.needs:
            t, new = self.count, self.count + tokens
            if t:
                mean = self.mean * t / new + torch.sum(inp, dim=1) / new
                self.var = ((t - 1) * self.var / (new - 1) + t * self.mean ** 2 / (new - 1)
                            - new * mean ** 2 / (new - 1) + torch.sum(inp ** 2, dim=1) / (new - 1))
            else:
                mean = torch.sum(inp, dim=1) / new
                self.var = torch.sum((inp - mean.reshape(-1, 1)) ** 2, dim=1) / (new - 1)
            self.mean = mean
        self.windows, self.count = n + 1, self.count + tokens

    def stats(self, layer: LayerInfo) -> LayerStats:
        # LayerStats holds sums: Σx² = windows · (running mean of a window's Σx²), XᵀX = (windows/2) · (2/windows)XᵀX;
        # exact rescalings when windows and tokens per window are powers of two, as in the releases' defaults
        sumsq = None if self.sumsq is None else self.sumsq * self.windows  # float32, as the releases keep it
        gram = None if self.gram is None else self.gram * (self.windows / 2)
        total = m2 = None
        if self.mean is not None:
            total, m2 = self.mean.double() * self.count, self.var.double() * (self.count - 1)
        return LayerStats(layer, self.count, total, sumsq, gram, m2, self.windows, window_m2=self.window_m2)


ACCUMULATORS = {"float64": Accumulator, "released": ReleasedAccumulator}
"""``calibration.accumulate``: how input statistics are summed (a recorded key field)."""


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two live tensors are views of the same memory (e.g. a reshape)."""
    return a.data_ptr() == b.data_ptr() and a.numel() == b.numel()


class BlockCollector:
    """Forward hooks on one block's linears (and norms, to find each layer's role).

    Use as a context manager around the block's calibration forward passes; then
    ``stats(name, info)`` gives each layer's statistics and ``roles`` each layer's role
    (``"normed"`` when its input is a normalisation layer's output, else ``"internal"``).
    The ``observed`` layers (those left dense) get a role too, from the first batch only,
    and no statistics.
    """

    def __init__(self, layers: list[tuple[str, nn.Module]], block: nn.Module, needs: frozenset[str],
                 accumulate: str = "float64", observed: list[tuple[str, nn.Module]] = ()):
        self.layers, self.block, self.needs = layers, block, needs & INPUT_STATISTICS
        self.observed = list(observed)
        self._seen: dict[str, torch.Tensor] = {}
        self.accumulator = ACCUMULATORS[accumulate]
        self.acc: dict[str, Accumulator] = {}
        self.roles: dict[str, str] = {}
        self._first: dict[str, torch.Tensor] | None = {}
        self._norm_outputs: list[torch.Tensor] = []
        self._handles: list = []

    def __enter__(self) -> BlockCollector:
        for name, layer in self.layers:
            self._handles.append(layer.register_forward_hook(self._hook(name)))
        for name, layer in self.observed:
            self._handles.append(layer.register_forward_hook(self._observe(name)))
        for norm in norm_modules(self.block):
            self._handles.append(norm.register_forward_hook(lambda m, i, o: self._norm_outputs.append(o)))
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._norm_outputs.clear()

    def _hook(self, name: str):
        def hook(module, inputs, output):
            x = inputs[0]
            if self._first is not None:
                # First batch: find which layers share an input; hold the tensors so
                # their memory cannot be reused while we compare pointers.
                for other, seen in self._first.items():
                    if seen is x:
                        self.acc[name] = self.acc[other]
                        self._first[name] = x
                        return
                self._first[name] = x
                self.acc[name] = self.accumulator(self.needs)
            self.acc[name].add(x)
        return hook

    def _observe(self, name: str):
        def hook(module, inputs, output):
            self._seen.setdefault(name, inputs[0])
        return hook

    def end_first_batch(self, block_input: torch.Tensor, block_output: torch.Tensor,
                        input_normed: bool = False) -> bool:
        """Fix roles and shared accumulators after the first batch; keep only leaders hooked.

        ``input_normed`` says the block's input is a normalisation output (post-LN models
        such as OPT-350m end each block with a norm); layers reading the block input then
        count as normed. Returns whether this block's output is a normalisation output.
        """
        norms = [o for o in self._norm_outputs if isinstance(o, torch.Tensor)]
        for name, x in (*self._first.items(), *self._seen.items()):
            fed_by_norm = any(_same(o, x) for o in norms) or (input_normed and _same(block_input, x))
            self.roles[name] = "normed" if fed_by_norm else "internal"
        output_normed = any(_same(o, block_output) for o in norms)
        leaders = {}
        for name, _ in self.layers:
            leaders.setdefault(id(self.acc.get(name)), name)
        keep = set(leaders.values())
        for h in self._handles:
            h.remove()
        self._handles = [layer.register_forward_hook(self._hook(name))
                         for name, layer in self.layers if name in keep]
        self._first = None
        self._seen.clear()
        self._norm_outputs.clear()
        return output_normed

    def stats(self, name: str, info: LayerInfo) -> LayerStats:
        return self.acc[name].stats(info)


__all__ = ["ACCUMULATORS", "Accumulator", "BlockCollector", "ReleasedAccumulator"]
