"""A metric plugin: Wanda's score plus STADE's mean-compensating bias, as an ablation.

Does Wanda gain from the bias correction that STADE applies? ``wanda-bc`` scores like
Wanda, |W_ij|·‖X_j‖₂, and its ``bias_delta`` moves the pruned weights' mean contribution
into the bias, b_i += Σ_j M_ij·W_ij·μ_j, with W before zeroing. Run it:
``python docs/examples/metric_plugin.py``.
"""

from __future__ import annotations

import torch

import stadebench


class WandaBC(stadebench.Metric):
    """Wanda's |W_ij|·‖X_j‖₂, then the pruned weights' mean contribution moved into the bias."""

    name = "wanda-bc"
    version = "1"
    statistics = frozenset({"sum", "sumsq"})  # ‖X_j‖₂ needs sumsq, the mean μ_j needs sum

    def score(self, weight: torch.Tensor, stats: stadebench.LayerStats) -> torch.Tensor:
        return weight.abs() * stats.norm.unsqueeze(0)

    def bias_delta(self, dense_weight: torch.Tensor, mask: torch.Tensor,
                   stats: stadebench.LayerStats) -> torch.Tensor:
        """[out]: what the pruned weights added on average. The engine adds it to the bias,
        giving a layer without one (Llama's) a zero bias first."""
        return (dense_weight * mask) @ stats.mean


@stadebench.hookimpl
def register_metrics(register):
    register(WandaBC)


if __name__ == "__main__":
    import sys

    from stadebench.testing import make_tiny_model, make_windows

    # An installed plugin is registered from its entry point; here we register this file.
    stadebench.get_plugins().register(sys.modules[__name__], name="wanda_bc_example")

    model = make_tiny_model()
    report = stadebench.prune(model, make_windows(), metric="wanda-bc", pattern="unstructured", sparsity=0.5)
    biased = sum(layer.bias_added for layer in report.layers)
    print(f"{report.metric}: sparsity {report.sparsity:.2f}, bias added to {biased} of {len(report.layers)} layers")
    assert report.sparsity == 0.5 and biased == len(report.layers)
