"""A refiner plugin: ``swap`` trades pruned weights that matter for kept ones that do not.

In every row (every group of M columns under N:M), the pruned weight of the highest
saliency |w_ij|·‖X_j‖₂ (Wanda's) is swapped with the kept weight of the lowest, when the
pruned one is the more salient; ``swaps`` rounds of that. Each swap moves one pruned
position, so the count per row or group never changes. Run it:
``python docs/examples/refiner_plugin.py``.
"""

from __future__ import annotations

import torch
from pydantic import Field

import stadebench


class Swap(stadebench.Refiner):
    """Swap each row's most salient pruned weight with its least salient kept one (|w|·‖x‖)."""

    name = "swap"
    version = "1"
    statistics = frozenset({"sumsq"})

    class Options(stadebench.Options):
        swaps: int = Field(1, ge=0, le=1024)
        """Rounds of swaps in every row (in every group, under N:M)."""

    def supports(self, pattern: stadebench.Pattern) -> str | None:
        if pattern.group_size or pattern.spec in ("unstructured", "unstructured-layer"):
            return None
        return "swap keeps counts per row or N:M group; this pattern may constrain more than that"

    def refine(self, weight: torch.Tensor, mask: torch.Tensor, stats: stadebench.LayerStats,
               pattern: stadebench.Pattern, sparsity: float) -> torch.Tensor:
        width = pattern.group_size or weight.shape[1]
        saliency = (weight.abs() * stats.norm.to(weight.device)).reshape(-1, width)
        refined = mask.reshape(-1, width).clone()  # the metric's mask is not ours to change
        units = torch.arange(refined.shape[0], device=mask.device)
        for _ in range(self.options.swaps):
            pruned = saliency.masked_fill(~refined, -torch.inf).max(1)
            kept = saliency.masked_fill(refined, torch.inf).min(1)
            swap = pruned.values > kept.values  # False where a unit has nothing pruned or nothing kept
            refined[units[swap], pruned.indices[swap]] = False
            refined[units[swap], kept.indices[swap]] = True
        return refined.reshape(mask.shape)


@stadebench.hookimpl
def register_refiners(register):
    register(Swap)


def output_error(weight: torch.Tensor, mask: torch.Tensor, gram: torch.Tensor) -> float:
    """Σ_t ‖(W − Ŵ)x_t‖² when the mask's weights are zeroed: tr(ΔW G ΔWᵀ)."""
    removed = weight * mask
    return float(((removed @ gram) * removed).sum())


if __name__ == "__main__":
    import sys

    from stadebench.plugins import resolve_plugin
    from stadebench.testing import layer_inputs

    stadebench.get_plugins().register(sys.modules[__name__], name="swap_example")

    refiner = resolve_plugin("refiner", "swap", {"swaps": 8})
    weight, stats = layer_inputs((64, 128), statistics={"sumsq", "gram"}, tokens=512)
    for spec in ("unstructured", "2:4"):
        pattern = resolve_plugin("pattern", spec)
        mask = pattern.select(weight.abs(), 0.5)  # magnitude's mask: blind to the inputs
        refined = refiner.refine(weight, mask, stats, pattern, 0.5)
        before, after = output_error(weight, mask, stats.gram), output_error(weight, refined, stats.gram)
        print(f"{spec}: {int((refined & ~mask).sum())} weights swapped; output error {before:.0f} -> {after:.0f}")
        assert torch.equal(refined.sum(1), mask.sum(1)) and after < before
