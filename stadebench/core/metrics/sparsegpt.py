"""SparseGPT (Frantar & Alistarh, 2023): OBS mask selection with weight reconstruction."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ...base import LayerResult, LayerStats, Metric, Options, Pattern
from ...errors import ConfigError
from ...hookspecs import hookimpl
from ..reconstructors import hessian_inverse_factor, obs_sweep


class SparseGPTOptions(Options):
    blocksize: int = Field(128, ge=1, le=65_536)
    """Columns per lazy-update block; the mask is picked block by block."""
    percdamp: float = Field(0.01, gt=0)
    """Dampening λ as a fraction of mean(diag H)."""
    update: bool = True
    """Reconstruct the kept weights; false keeps the same mask but only zeroes weights."""
    damping_retries: int = Field(3, ge=0, le=10)
    """When H + λI is not positive definite, retry this many times with λ ten times larger
    (the damping used is recorded with the layer); then fail."""
    order: Literal["fused", "released"] = "fused"
    """Float order of the column loop, the same algorithm either way. ``fused``: on Wᵀ (a weight
    column is a contiguous row) with fused multiply-adds, ~2x faster on a CPU. ``released``: on W,
    each product rounded before it is subtracted, as the released SparseGPT code does; the error
    feedback turns the other rounding into other masks block after block (docs/parity.md)."""


class SparseGPT(Metric):
    """A solver: picks the mask and updates the kept weights column by column (``prune_layer``).

    H = (2/N)·XᵀX + λI with λ = percdamp·mean(diag H). Saliency w²/[H⁻¹]_jj², where
    [H⁻¹]_jj is the diagonal of the upper Cholesky factor of H⁻¹. The pattern decides
    which saliencies are pruned: once per ``blocksize`` columns over the whole block,
    or, when the pattern decides small column groups on their own (N:M), group by group
    as the error feedback reaches them — as the released SparseGPT does. With
    ``unstructured-layer`` this is the released code's per-block threshold; with the
    per-row ``unstructured`` pattern each row prunes its share of every block. Shares are
    rounded cumulatively (block j prunes count(first j blocks) − count(first j−1)), so a
    layer prunes exactly the pattern's count for the whole layer at any sparsity; version
    1 rounded every block down, pruning up to one weight per block and row too few (0.6
    on 576 columns: 342 per row, not 345).
    """

    name = "sparsegpt"
    version = "2"
    Options = SparseGPTOptions
    statistics = frozenset({"gram"})

    def inverse_hessian_factor(self, weight: torch.Tensor, stats: LayerStats) -> tuple[torch.Tensor, float]:
        """Upper Cholesky factor of the damped H⁻¹ and the percdamp it took; zeroes
        ``weight``'s dead columns."""
        hinv, percdamp, dead = hessian_inverse_factor(
            stats.gram, stats.count, percdamp=self.options.percdamp, retries=self.options.damping_retries,
            what=f"sparsegpt: the Hessian of {stats.layer.name}")
        weight[:, dead] = 0.0
        return hinv, percdamp

    def prune_layer(self, weight: torch.Tensor, stats: LayerStats, pattern: Pattern,
                    sparsity: float) -> LayerResult:
        """The OBS mask and the reconstructed weight (``update: false``: the dense weight,
        masked); ``details`` holds the percdamp when it had to be raised."""
        opts = self.options
        group = pattern.group_size
        if group and opts.blocksize % group:
            raise ConfigError(f"sparsegpt: blocksize {opts.blocksize} must be a multiple of {pattern.spec}'s M")
        w = weight.clone()
        if group:
            def pick(wc: torch.Tensor, d: torch.Tensor, start: int) -> torch.Tensor:
                return pattern.select(wc.square() / d.square(), sparsity)
        else:
            shares = block_sparsities(pattern, w.shape[0], w.shape[1], opts.blocksize, sparsity)

            def pick(wc: torch.Tensor, d: torch.Tensor, start: int) -> torch.Tensor:
                return pattern.select(wc.square() / d.square(), shares[start // opts.blocksize])
        hinv, percdamp = self.inverse_hessian_factor(w, stats)
        mask, w = obs_sweep(w, hinv, pick, blocksize=opts.blocksize, span=group or 0, order=opts.order)
        if not opts.update:
            w = weight.masked_fill(mask, 0.0)
        details = {"percdamp": percdamp} if percdamp != opts.percdamp else {}
        return LayerResult(mask, w, None, details)


def _count(pattern: Pattern, rows: int, cols: int, sparsity: float) -> int:
    # counts depend only on shape and sparsity (the kit's exact-count rule): equal scores will do
    return int(pattern.select(torch.zeros(rows, cols), sparsity).count_nonzero())


def block_sparsities(pattern: Pattern, rows: int, cols: int, blocksize: int, sparsity: float) -> list[float]:
    """The sparsity to select each ``blocksize``-column block at, so that the blocks together
    prune the pattern's count for the whole ``rows × cols`` layer: block j gets
    count(first j blocks) − count(first j − 1), found by bisection on the pattern's own
    count. ``sparsity`` everywhere when that already adds up (e.g. 0.5 on 128-wide blocks)."""
    edges = list(range(0, cols, blocksize)) + [cols]
    widths = [b - a for a, b in zip(edges, edges[1:])]
    plain = [sparsity] * len(widths)
    total = _count(pattern, rows, cols, sparsity)
    if sum(_count(pattern, rows, w, sparsity) for w in widths) == total:
        return plain
    shares, done = [], 0
    for end, width in zip(edges[1:], widths):
        want = _count(pattern, rows, end, sparsity) - done
        lo, hi = 0.0, min(1.0 - 1e-12, 0.999999)
        if _count(pattern, rows, width, hi) < want:
            return plain  # this pattern cannot prune that share of a block: keep the plain rounding
        for _ in range(60):  # the smallest sparsity whose count reaches the share
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if _count(pattern, rows, width, mid) < want else (lo, mid)
        if _count(pattern, rows, width, hi) != want:
            return plain
        shares.append(hi)
        done += want
    return shares


@hookimpl
def register_metrics(register):
    register(SparseGPT)


__all__ = ["SparseGPT", "SparseGPTOptions", "block_sparsities"]
