"""Built-in metrics that need at most ‖X_j‖: magnitude, random, Wanda."""

from __future__ import annotations

import zlib

import torch
from pydantic import Field

from ...base import LayerStats, Metric, Options
from ...hookspecs import hookimpl


class Magnitude(Metric):
    """|W_ij|: data-free, runs no forward pass."""

    name = "magnitude"
    version = "1"

    def score(self, weight: torch.Tensor, stats: LayerStats) -> torch.Tensor:
        return weight.abs()


class RandomOptions(Options):
    seed: int = Field(0, ge=0, le=(1 << 32) - 1)
    """Seed of the draws (each layer's generator mixes it with the layer's name)."""


class Random(Metric):
    """I.i.d. N(0, 1) scores: the data-free floor every metric must beat.

    Each layer draws from its own generator seeded by ``seed`` and the layer's name,
    on the CPU, so the mask does not depend on the device or on layer order.
    """

    name = "random"
    version = "1"
    Options = RandomOptions

    def score(self, weight: torch.Tensor, stats: LayerStats) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.options.seed * 1_000_003 + zlib.crc32(stats.layer.name.encode()))
        return torch.randn(weight.shape, generator=gen).to(weight.device)


class Wanda(Metric):
    """|W_ij| · ‖X_j‖₂ (Sun et al., 2023)."""

    name = "wanda"
    version = "1"
    statistics = frozenset({"sumsq"})

    def score(self, weight: torch.Tensor, stats: LayerStats) -> torch.Tensor:
        return weight.abs() * stats.norm.unsqueeze(0)


@hookimpl
def register_metrics(register):
    register(Magnitude)
    register(Random)
    register(Wanda)


__all__ = ["Magnitude", "Random", "RandomOptions", "Wanda"]
