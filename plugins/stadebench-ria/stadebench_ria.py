"""RIA, Relative Importance and Activations, as a stadebench metric.

Zhang et al., "Plug-and-Play: An Efficient Post-training Pruning Method for Large
Language Models", ICLR 2024:

    score_ij = (|W_ij| / Σ_i |W_ij|  +  |W_ij| / Σ_j |W_ij|) · ‖X_j‖₂^a

the weight's share of its input column plus its share of its output row, times the
input's L2 norm over the calibration tokens to the power ``a`` (0.5 in the paper).
"""

from __future__ import annotations

import torch
from pydantic import Field

import stadebench

__version__ = "0.1.0"


class RIAOptions(stadebench.Options):
    a: float = Field(0.5, ge=0)
    """Exponent of the input norm ‖X_j‖₂: 0.5 in the paper; 0 leaves relative importance alone."""


class RIA(stadebench.Metric):
    """Relative importance (|W| over its column and row sums) times ‖X_j‖₂^a (Zhang et al., 2024)."""

    name = "ria"
    version = "1"
    Options = RIAOptions
    statistics = frozenset({"sumsq"})

    def score(self, weight: torch.Tensor, stats: stadebench.LayerStats) -> torch.Tensor:
        w = weight.abs()
        # A zero column or row has relative importance 0, not 0/0.
        tiny = torch.finfo(w.dtype).tiny
        relative = w / w.sum(0, keepdim=True).clamp_min(tiny) + w / w.sum(1, keepdim=True).clamp_min(tiny)
        return relative * stats.norm.pow(self.options.a).unsqueeze(0)


@stadebench.hookimpl
def register_metrics(register):
    register(RIA)
