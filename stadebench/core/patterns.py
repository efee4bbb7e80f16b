"""Built-in sparsity patterns: per-row and per-layer unstructured, and N:M.

Every pattern prunes exactly the number of weights its rule names, lowest scores
first, ties broken by the lower (flattened) index: a stable sort, so results do not
depend on the sort kernel. Two options reproduce released code instead (docs/parity.md):
N:M ``ties: topk`` and unstructured-layer ``threshold: inclusive``.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch

from ..base import NM_RE, Options, Pattern
from ..errors import ConfigError
from ..hookspecs import hookimpl


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the ``k`` lowest entries along the last dim; ties go to the lower index.

    Same result as a stable sort, in linear time: everything below the k-th smallest
    value, plus the first of the entries equal to it until ``k`` are taken.
    """
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if scores.ndim == 1:
        return _lowest(scores.unsqueeze(0), k).squeeze(0)
    kth = torch.kthvalue(scores, k, dim=-1, keepdim=True).values
    mask = scores <= kth
    # Rows where the k-th value is tied past k drop their last `excess` tied entries.
    excess = mask.count_nonzero(-1) - k
    over = excess > 0
    tied_rows = int(over.count_nonzero())
    if tied_rows:
        rows = slice(None) if 2 * tied_rows > len(over) else over.nonzero(as_tuple=True)
        tie = scores[rows] == kth[rows]
        rank = tie.cumsum(-1, dtype=torch.int32)
        mask[rows] ^= tie & (rank > rank[..., -1:] - excess[rows].unsqueeze(-1))
    return mask


class Unstructured(Pattern):
    """Each output row prunes exactly ⌊in·s⌋ weights (the Wanda/STADE comparison group)."""

    name = "unstructured"
    version = "1"

    def select(self, scores: torch.Tensor, sparsity: float) -> torch.Tensor:
        return _lowest(scores, math.floor(scores.shape[-1] * sparsity))


class UnstructuredLayerOptions(Options):
    threshold: Literal["exact", "inclusive"] = "exact"
    """``exact``: prune the ⌊numel·s⌋ lowest scores. ``inclusive``: prune every score ≤ the
    (⌊numel·s⌋+1)-th lowest, as the released Wanda-repo magnitude and SparseGPT code do
    (``sort(...)[int(numel·s)]``, then ``<=``): one weight more, plus any tie at the threshold,
    so the count depends on the scores (nothing at sparsity 0)."""


class UnstructuredLayer(Pattern):
    """One threshold for the whole matrix: prune the ⌊numel·s⌋ lowest scores."""

    name = "unstructured-layer"
    version = "1"
    Options = UnstructuredLayerOptions

    def select(self, scores: torch.Tensor, sparsity: float) -> torch.Tensor:
        k = math.floor(scores.numel() * sparsity)
        if self.options.threshold == "inclusive" and 0 < k < scores.numel():
            return scores <= torch.kthvalue(scores.reshape(-1), k + 1).values
        return _lowest(scores.reshape(-1), k).view_as(scores)


class NMOptions(Options):
    ties: Literal["lower-index", "topk"] = "lower-index"
    """Which of tied scores is pruned first: the lower column index, or the one
    ``torch.topk(largest=False)`` returns, as the released Wanda, SparseGPT and STADE code
    do. topk's order among ties is its kernel's (on a CPU, libstdc++'s ``nth_element``), so
    it may change with the device or the build; on de-quantised weights ties are common."""


class NM(Pattern):
    """In every group of M consecutive input columns of a row, prune the N lowest.

    N counts *pruned* weights, as in every reference implementation; the sparsity is
    N/M and cannot be set to anything else.
    """

    name = "N:M"
    version = "1"
    Options = NMOptions
    default_sparsity: ClassVar[None] = None
    per_layer_sparsity: ClassVar[bool] = False

    def __init__(self, options=None, n: int = 2, m: int = 4):
        super().__init__(options)
        if not 0 < n < m:
            raise ConfigError(f"pattern '{n}:{m}': N:M needs 0 < N < M (N weights pruned in every M)")
        if m > 65_536:
            raise ConfigError(f"pattern '{n}:{m}': M over 65536 is wider than any layer's group; use N:M with "
                              "a small M (2:4, 4:8) or unstructured")
        self.n, self.m = n, m
        self.group_size = m

    @classmethod
    def matches(cls, spec: str) -> bool:
        return bool(NM_RE.match(spec))

    @classmethod
    def from_spec(cls, spec: str, options=None) -> NM:
        match = NM_RE.match(spec)
        if not match:
            raise ConfigError(f"pattern {spec!r} is not of the form N:M (e.g. '2:4')")
        return cls(options, int(match[1]), int(match[2]))

    @property
    def spec(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def fixed_sparsity(self) -> tuple[float, str]:
        return self.n / self.m, f"prunes {self.n} of every {self.m} weights"

    def resolve_sparsity(self, sparsity: float | None) -> float:
        implied = self.n / self.m
        if sparsity is not None and not math.isclose(float(sparsity), implied, abs_tol=1e-9):
            raise ConfigError(
                f"pattern {self.spec!r} prunes {self.n} of every {self.m} weights (sparsity {implied:g}); "
                f"sparsity {sparsity} conflicts with it. Leave the sparsity unset or use {implied:g}."
            )
        return implied

    def check_shape(self, shape: tuple[int, int]) -> None:
        if shape[-1] % self.m:
            raise ConfigError(
                f"pattern {self.spec!r} needs the input width to be a multiple of {self.m}; got {shape[-1]}"
            )

    def select(self, scores: torch.Tensor, sparsity: float) -> torch.Tensor:
        rows, cols = scores.shape
        groups = scores.reshape(rows, cols // self.m, self.m)
        if self.options.ties == "topk":
            index = torch.topk(groups, self.n, dim=-1, largest=False).indices
            return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, index, True).view(rows, cols)
        return _lowest(groups, self.n).view(rows, cols)


@hookimpl
def register_patterns(register):
    register(Unstructured)
    register(UnstructuredLayer)
    register(NM)


__all__ = ["NM", "NMOptions", "Unstructured", "UnstructuredLayer", "UnstructuredLayerOptions"]
