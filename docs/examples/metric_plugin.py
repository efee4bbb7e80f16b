"""A metric plugin: Wanda's score plus STADE's mean-compensating bias, as an ablation.

Does Wanda gain from the bias correction that STADE applies? ``wanda-bc`` scores like
Wanda, |W_ij|·‖X_j‖₂, and after masking adds the pruned weights' mean contribution to
the bias, b_i += Σ_j M_ij·W_ij·μ_j, with W before zeroing. Run it:
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

    def update(self, layer, dense_weight, mask, stats) -> None:
        delta = (dense_weight * mask) @ stats.mean  # [out]: what the pruned weights added on average
        if layer.bias is None:  # Llama's linears have none: give the layer one
            layer.bias = torch.nn.Parameter(torch.zeros_like(delta, dtype=layer.weight.dtype), requires_grad=False)
        layer.bias.data += delta.to(layer.bias.dtype)


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
