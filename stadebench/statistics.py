"""Streaming input statistics of linear layers, gathered with forward hooks.

Accumulated over tokens whatever the model dtype: sums in float64, the Gram matrix in
float32. Layers that read the very same input tensor (q/k/v, gate/up) share one
accumulator, found on the first batch, so each input is reduced once.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import STATISTICS, LayerInfo, LayerStats
from .models import norm_modules


class Accumulator:
    """Σx, Σx², XᵀX of one input tensor stream, only those asked for."""

    def __init__(self, needs: frozenset[str]):
        self.needs = needs
        self.count = 0
        self.sum = self.sumsq = self.gram = None

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.count += x.shape[0]
        if "sum" in self.needs:
            s = x.sum(0, dtype=torch.float64)
            self.sum = s if self.sum is None else self.sum.add_(s)
        if "sumsq" in self.needs:
            q = torch.linalg.vector_norm(x, dim=0).double().square_()
            self.sumsq = q if self.sumsq is None else self.sumsq.add_(q)
        if "gram" in self.needs:
            if self.gram is None:
                self.gram = x.t() @ x
            else:
                self.gram.addmm_(x.t(), x)

    def stats(self, layer: LayerInfo) -> LayerStats:
        return LayerStats(layer, self.count, self.sum, self.sumsq, self.gram)


class BlockCollector:
    """Forward hooks on one block's linears (and norms, to find each layer's role).

    Use as a context manager around the block's calibration forward passes; then
    ``stats(name, info)`` gives each layer's statistics and ``roles`` each layer's role
    (``"normed"`` when its input is a normalisation layer's output, else ``"internal"``).
    """

    def __init__(self, layers: list[tuple[str, nn.Module]], block: nn.Module, needs: frozenset[str]):
        assert needs <= STATISTICS, needs
        self.layers, self.block, self.needs = layers, block, needs
        self.acc: dict[str, Accumulator] = {}
        self.roles: dict[str, str] = {}
        self._first: dict[str, torch.Tensor] | None = {}
        self._norm_outputs: list[torch.Tensor] = []
        self._handles: list = []

    def __enter__(self) -> BlockCollector:
        for name, layer in self.layers:
            self._handles.append(layer.register_forward_hook(self._hook(name)))
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
                self.acc[name] = Accumulator(self.needs)
            self.acc[name].add(x)
        return hook

    def end_first_batch(self) -> None:
        """Fix roles and shared accumulators after the first batch; keep only leaders hooked."""
        if self._first is None:
            return
        for name, x in self._first.items():
            fed_by_norm = any(
                o.data_ptr() == x.data_ptr() and o.numel() == x.numel() for o in self._norm_outputs
                if isinstance(o, torch.Tensor)
            )
            self.roles[name] = "normed" if fed_by_norm else "internal"
        leaders = {}
        for name, _ in self.layers:
            leaders.setdefault(id(self.acc.get(name)), name)
        keep = set(leaders.values())
        for h in self._handles:
            h.remove()
        self._handles = [layer.register_forward_hook(self._hook(name))
                         for name, layer in self.layers if name in keep]
        self._first = None
        self._norm_outputs.clear()

    def stats(self, name: str, info: LayerInfo) -> LayerStats:
        return self.acc[name].stats(info)
