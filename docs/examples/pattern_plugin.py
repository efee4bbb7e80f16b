"""A pattern plugin: ``rows`` prunes whole output rows (neurons).

The ⌊out·s⌋ rows with the lowest summed score lose all their weights (ties: the lower
row). Run it: ``python docs/examples/pattern_plugin.py``.
"""

from __future__ import annotations

import math

import torch

import stadebench


class Rows(stadebench.Pattern):
    """Prune whole output rows: the ⌊out·s⌋ with the lowest summed score."""

    name = "rows"
    version = "1"

    def select(self, scores: torch.Tensor, sparsity: float) -> torch.Tensor:
        k = math.floor(scores.shape[0] * sparsity)
        order = torch.sort(scores.double().sum(1), stable=True).indices  # stable: ties go to the lower row
        mask = torch.zeros_like(scores, dtype=torch.bool)
        mask[order[:k]] = True
        return mask


@stadebench.hookimpl
def register_patterns(register):
    register(Rows)


if __name__ == "__main__":
    import sys

    from stadebench.testing import make_tiny_model, make_windows

    stadebench.get_plugins().register(sys.modules[__name__], name="rows_example")

    model = make_tiny_model()
    report = stadebench.prune(model, make_windows(), metric="wanda", pattern="rows", sparsity=0.25)
    up = model.model.layers[0].mlp.up_proj.weight  # [64, 32]: 16 whole rows pruned
    print(f"{report.pattern}: sparsity {report.sparsity:.2f}, up_proj rows pruned {int((up == 0).all(1).sum())}")
    assert report.sparsity == 0.25 and int((up == 0).all(1).sum()) == 16
