"""stadebench-alpha: the ``magnitude-share`` layer-wise sparsity allocator.

A data-free cousin of OWL (Yin et al. 2023): blocks whose weights hold a larger share of
large-magnitude entries keep more weights. For each decoder block b,

    r_b = #{ |W| > M · mean_b |W| } / #W          (over every pruned layer of the block)

r is mapped linearly onto [0, 2·lambda] (the block with the smallest share at 0, the
largest at 2·lambda), re-centred so that the size-weighted mean density is 1 − target,
and every layer of block b gets sparsity 1 − density_b. Equal shares everywhere give the
uniform allocation. No calibration statistics are read.
"""

from __future__ import annotations

from pydantic import ConfigDict, Field

import stadebench

__version__ = "0.1.0"


class MagnitudeShare(stadebench.Allocator):
    """Data-free OWL: blocks with a larger share of large-magnitude weights are pruned less."""

    name = "magnitude-share"
    version = "1"

    class Options(stadebench.Options):
        # `lambda` is a Python keyword: the field is `lambda_`, spelled `lambda` in YAML/JSON,
        # accepted under either name and dumped as `lambda` (so results record `lambda`).
        model_config = ConfigDict(validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)

        M: float = Field(3.0, gt=0)
        """A weight is large when |W| exceeds M times its block's mean |W|."""

        lambda_: float = Field(0.05, ge=0, lt=0.5, alias="lambda")
        """Half the spread of densities: shares map linearly onto [0, 2·lambda]."""

    def block_shares(self, layers: list[stadebench.AllocationLayer]) -> dict[int, float]:
        """r_b for every block: the fraction of its |W| entries above M times its mean |W|."""
        by_block: dict[int, list[stadebench.AllocationLayer]] = {}
        for entry in layers:
            by_block.setdefault(entry.layer.block, []).append(entry)
        shares = {}
        for block, entries in by_block.items():
            count = sum(entry.numel for entry in entries)
            total = sum(float(entry.weight.detach().abs().double().sum()) for entry in entries)
            threshold = self.options.M * total / count if count else 0.0
            large = sum(int((entry.weight.detach().abs() > threshold).sum()) for entry in entries)
            shares[block] = large / count if count else 0.0
        return shares

    def allocate(self, layers: list[stadebench.AllocationLayer], sparsity: float) -> list[float]:
        if not layers:
            return []
        shares = self.block_shares(layers)
        low, high = min(shares.values()), max(shares.values())
        spread = 2 * self.options.lambda_
        lift = {b: (spread * (r - low) / (high - low) if high > low else 0.0) for b, r in shares.items()}
        total = sum(entry.numel for entry in layers)
        centre = sum(lift[entry.layer.block] * entry.numel for entry in layers) / total
        # density_b = (1 − target) + lift_b − centre, so sparsity_b = target − lift_b + centre
        values = [sparsity - lift[entry.layer.block] + centre for entry in layers]
        if min(values) < 0 or max(values) >= 1:
            raise stadebench.ConfigError(
                f"magnitude-share: a lambda of {self.options.lambda_:g} around a target of {sparsity:g} "
                f"gives sparsities from {min(values):.4g} to {max(values):.4g}, outside [0, 1); "
                f"lower lambda or move the target away from 0 and 1")
        return values


@stadebench.hookimpl
def register_allocators(register):
    register(MagnitudeShare)
