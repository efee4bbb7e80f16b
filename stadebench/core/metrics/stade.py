"""STADE (W²·Var(x), plus a mean-compensating bias) and STADE-W.

Coello de Portugal Mecke et al., 2025, "STADE: Standard Deviation as a Pruning
Metric", arXiv 2503.22451.
"""

from __future__ import annotations

import torch

from ...base import LayerStats, Metric, Options
from ...errors import ConfigError
from ...hookspecs import hookimpl
from ..reconstructors import mean_bias


class StadeOptions(Options):
    bias_correction: bool = True
    """Add the pruned weights' mean contribution to the bias. The released STADE code
    computes it from already-zeroed weights, so its correction is always zero; false
    reproduces that."""


class Stade(Metric):
    """W_ij² · Var(x_j) (unbiased variance over tokens), with bias correction.

    After masking, b_i += Σ_j M_ij W_ij μ_j with the dense W, so that the layer's mean
    output over the calibration tokens is unchanged.
    """

    name = "stade"
    version = "1"
    Options = StadeOptions
    statistics = frozenset({"sum"})

    def score(self, weight: torch.Tensor, stats: LayerStats) -> torch.Tensor:
        return weight.square() * stats.var.unsqueeze(0)

    def bias_delta(self, dense_weight: torch.Tensor, mask: torch.Tensor, stats: LayerStats) -> torch.Tensor | None:
        """Σ_j M_ij W_ij μ_j, from the dense weights (None without ``bias_correction``)."""
        if not self.options.bias_correction:
            return None
        return mean_bias(dense_weight, mask, stats.mean)


class StadeW(Stade):
    """STADE where the input is an internal activation, Wanda where it is normalised.

    The rule is by layer role, found from the data flow (``LayerInfo.role``): a layer
    whose input is the output of a normalisation layer (q/k/v, gate/up, fc1 — inputs
    near zero mean, where Wanda is optimal) is scored with Wanda; a layer fed by an
    internal activation (attention output into o_proj/out_proj, MLP hidden state into
    down_proj/fc2) is scored and bias-corrected with STADE, as in the STADE code.
    """

    name = "stade-w"
    version = "1"
    statistics = frozenset({"sum", "sumsq"})

    def score(self, weight: torch.Tensor, stats: LayerStats) -> torch.Tensor:
        role = stats.layer.role
        if role == "internal":
            return super().score(weight, stats)
        if role == "normed":
            return weight.abs() * stats.norm.unsqueeze(0)
        raise ConfigError(f"stade-w needs the role of layer {stats.layer.name}, which is unknown")

    def bias_delta(self, dense_weight: torch.Tensor, mask: torch.Tensor, stats: LayerStats) -> torch.Tensor | None:
        """STADE's bias correction for internal layers only; Wanda's layers keep their bias."""
        if stats.layer.role != "internal":
            return None
        return super().bias_delta(dense_weight, mask, stats)


@hookimpl
def register_metrics(register):
    register(Stade)
    register(StadeW)


__all__ = ["Stade", "StadeOptions", "StadeW"]
