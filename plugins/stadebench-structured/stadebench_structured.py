"""Structured sparsity patterns for stadebench: ``columns`` prunes whole input channels.

``columns`` aggregates each input column's scores over all output rows (``reduce``:
sum, l2 (signed by the sum) or max) and prunes every weight of the ⌊in·s⌋ columns with
the lowest aggregate, ties to the lower column index. Every row then loses the same
inputs, so a layer's input channel can be dropped (and the layer feeding it shrunk)
after pruning.

The spec carries the reduction, so it is recorded with every result and survives a
round trip through a suite: ``columns`` (sum), ``columns:l2``, ``columns:max``; writing
``{name: columns, options: {reduce: l2}}`` in a suite gives the same pattern.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

import stadebench

__version__ = "0.1.0"

REDUCTIONS = ("sum", "l2", "max")


class ColumnsOptions(stadebench.Options):
    reduce: Literal["sum", "l2", "max"] = "sum"
    """How a column's scores over all rows become one number: Σ, sqrt(Σ s²) signed by Σ (so
    that lower scores still mean pruned first when scores can be negative), or max."""


class Columns(stadebench.Pattern):
    """Prune whole input columns: the ⌊in·s⌋ with the lowest aggregated score (ties: lower index)."""

    name = "columns"
    version = "2"  # 2: l2 carries the sign of the column's sum (1 pruned negated scores like the originals)
    Options = ColumnsOptions

    @classmethod
    def matches(cls, spec: str) -> bool:
        head, _, reduce = spec.partition(":")
        return head == cls.name and (not reduce or reduce in REDUCTIONS)

    @classmethod
    def from_spec(cls, spec: str, options=None) -> Columns:
        head, sep, reduce = spec.partition(":")
        if head != cls.name or (sep and reduce not in REDUCTIONS):
            raise stadebench.ConfigError(
                f"pattern {spec!r}: write columns or columns:<reduce> with reduce one of {', '.join(REDUCTIONS)}")
        options = dict(options or {})
        if sep and options.setdefault("reduce", reduce) != reduce:
            raise stadebench.ConfigError(
                f"pattern {spec!r} says reduce={reduce} but its options say reduce={options['reduce']}")
        return cls(options)

    @property
    def spec(self) -> str:
        reduce = self.options.reduce
        return self.name if reduce == "sum" else f"{self.name}:{reduce}"

    def column_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """One score per input column (float64, so sums do not depend on the row order)."""
        s = scores.double()
        reduce = self.options.reduce
        if reduce == "sum":
            return s.sum(0)
        if reduce == "l2":
            return torch.sign(s.sum(0)) * torch.linalg.vector_norm(s, dim=0)
        return s.amax(0)

    def select(self, scores: torch.Tensor, sparsity: float) -> torch.Tensor:
        k = math.floor(scores.shape[-1] * sparsity)
        order = torch.sort(self.column_scores(scores), stable=True).indices
        pruned = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
        pruned[order[:k]] = True
        return pruned.expand_as(scores).clone()


@stadebench.hookimpl
def register_patterns(register):
    register(Columns)
