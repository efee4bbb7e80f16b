"""A reconstructor plugin: ``refit`` re-fits each row's kept weights to the dense output.

For a row w with kept columns K and pruned columns P, the kept weights that minimise the
output error Σ_t (wᵀx_t − ŵᵀx_t)² with ŵ_P = 0 are ŵ_K = w_K + (G_KK + λI)⁻¹ G_KP w_P,
G = Σ_t x_t x_tᵀ the Gram matrix of the layer's inputs and λ = ``damping`` · mean(diag G).
A loop over rows, one solve each: clear, not fast. Run it:
``python docs/examples/reconstructor_plugin.py``.
"""

from __future__ import annotations

import torch
from pydantic import Field

import stadebench


class Refit(stadebench.Reconstructor):
    """Least-squares re-fit of every row's kept weights to the dense layer's output (damped)."""

    name = "refit"
    version = "1"
    statistics = frozenset({"gram"})

    class Options(stadebench.Options):
        damping: float = Field(0.01, gt=0, le=1)
        """Added to the Gram matrix's diagonal, relative to the diagonal's mean."""

    def memory_bytes(self, rows: int, columns: int) -> int:
        # float64: the damped Gram, one row's system, the dense weight and the new one
        return 8 * (2 * columns * columns + 2 * rows * columns)

    def reconstruct(self, weight: torch.Tensor, mask: torch.Tensor,
                    stats: stadebench.LayerStats) -> stadebench.Reconstruction:
        gram = stats.gram.to(weight.device, torch.float64)
        mean = float(gram.diagonal().mean())
        damping = self.options.damping * (mean if mean > 0 else 1.0)
        gram = gram + damping * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        dense = weight.double()
        new = dense.masked_fill(mask, 0)
        for row in range(dense.shape[0]):
            kept, pruned = (~mask[row]).nonzero().flatten(), mask[row].nonzero().flatten()
            if kept.numel() and pruned.numel():
                shift = torch.linalg.solve(gram[kept][:, kept], gram[kept][:, pruned] @ dense[row, pruned])
                new[row, kept] += shift
        return stadebench.Reconstruction(new.float(), details={"damping": damping})


@stadebench.hookimpl
def register_reconstructors(register):
    register(Refit)


if __name__ == "__main__":
    import sys

    from stadebench.plugins import resolve_plugin
    from stadebench.testing import layer_inputs

    stadebench.get_plugins().register(sys.modules[__name__], name="refit_example")

    reconstructor = resolve_plugin("reconstructor", "refit")
    weight, stats = layer_inputs((64, 128), statistics={"sumsq", "gram"}, tokens=512)
    for spec in ("unstructured", "2:4"):
        mask = resolve_plugin("metric", "wanda").prune_layer(weight, stats, resolve_plugin("pattern", spec), 0.5).mask
        new = reconstructor.reconstruct(weight, mask, stats).weight
        errors = [float((((weight - w) @ stats.gram) * (weight - w)).sum()) for w in (weight * ~mask, new)]
        print(f"{spec}: output error {errors[0]:.0f} zeroed, {errors[1]:.0f} refit")
        assert errors[1] < errors[0] and not new[mask].any()
