"""wanda-alpha: |W_ij| · ‖X_j‖₂^alpha, a stadebench metric plugin.

alpha = 1 ranks like Wanda, alpha = 0 like magnitude; anything between or beyond asks
how much the input norm should count.
"""

import torch
from pydantic import Field

import stadebench


class WandaAlphaOptions(stadebench.Options):
    alpha: float = Field(1.0, ge=0)
    """Exponent of the input norm: 1 is Wanda, 0 is magnitude."""


class WandaAlpha(stadebench.Metric):
    """|W_ij| · ‖X_j‖₂^alpha: Wanda with a tunable weight on the input norm."""

    name = "wanda-alpha"
    version = "1"
    Options = WandaAlphaOptions
    statistics = frozenset({"sumsq"})  # ‖X_j‖₂ = sqrt(Σ_t x_tj²): one forward pass, like Wanda

    def score(self, weight: torch.Tensor, stats: stadebench.LayerStats) -> torch.Tensor:
        return weight.abs() * stats.norm.pow(self.options.alpha).unsqueeze(0)


@stadebench.hookimpl
def register_metrics(register):
    register(WandaAlpha)
