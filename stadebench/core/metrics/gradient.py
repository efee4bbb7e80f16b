"""Gradient-informed metrics: GBLM-Pruner and Pruner-Zero.

Both read the ``gradient`` statistic (``core.gradients``): per weight, G = sqrt(Σ_w
(s·g_w)²) over calibration windows w (``l2``, the releases' default) or Σ_w |s·g_w|
(``l1``), at scale s = ``scale``. Where they read the input norm, it is the releases'
``scaler_row``: Σ_t x_t² averaged over calibration windows (``sumsq / windows``), not
summed, which matters once it is added to another term.

- Das et al., 2023, "Beyond Size: How Gradients Shape Pruning Decisions in Large Language
  Models", arXiv 2311.04902 (VILA-Lab/GBLM-Pruner, ``prune_gblm`` / ``prune_gradient``).
- Dong et al., 2024, "Pruner-Zero: Evolving Symbolic Pruning Metric from Scratch for
  Large Language Models", ICML 2024 (pprp/Pruner-Zero, ``prune_pruner_zero``, ``GPTree``).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from ...base import LayerStats, Metric, Options
from ...hookspecs import hookimpl


class _GradientOptions(Options):
    gradient: Literal["l2", "l1"] = "l2"
    """Which gradient statistic G is: l2, sqrt(Σ_w (s·g_w)²) (the releases' default), or
    l1, Σ_w |s·g_w|."""
    scale: float = Field(100.0, gt=0, le=1e6)
    """Scale s of the per-window gradients before they are summed (the releases' --scale,
    100); it weighs the gradient term against the Wanda term."""


def _scaler_row(stats: LayerStats) -> torch.Tensor:
    """The releases' ``scaler_row``: Σ_t x_t² averaged over windows, float32 ``[1, in]``."""
    return (stats.sumsq / stats.windows).float().reshape(1, -1)


class _GradientMetric(Metric):
    """What both metrics share: they read the input norms and the gradient statistic, at
    their option ``scale``, the ``gradient`` their options name."""

    statistics = frozenset({"sumsq", "gradient"})

    def gradient_scale(self) -> float:
        return self.options.scale

    def gradient(self, stats: LayerStats) -> torch.Tensor:
        return stats.grad_l2 if self.options.gradient == "l2" else stats.grad_l1


class GblmOptions(_GradientOptions):
    wanda: bool = True
    """Add the Wanda term: |W|·sqrt(scaler_row) + |W|·|G| (the release's ``gblm``);
    false scores |W|·|G| alone (the release's ``gradient`` method)."""
    inverse: bool = False
    """Divide instead of adding: |W|·sqrt(scaler_row) / (|G| + 1e-8) (``--gradient_inv``;
    |W| / (|G| + 1e-8) without the Wanda term). 1e-8 is taken in G's dtype, so it is 0
    with float16 gradients (``accumulate: released``), as in the release."""


class Gblm(_GradientMetric):
    """GBLM-Pruner: |W|·(‖X‖ + |G|), Wanda plus the scaled gradient (Das et al., 2023).

    With the defaults, score = |W_ij|·sqrt(scaler_row_j) + |W_ij|·G_ij with G the l2
    gradient statistic at scale 100, as ``prune_gblm`` computes it (both terms float32).
    """

    name = "gblm"
    version = "1"
    Options = GblmOptions

    def score(self, weight: torch.Tensor, stats: LayerStats) -> torch.Tensor:
        g = self.gradient(stats)
        magnitude = weight.abs()
        if self.options.inverse:
            small = torch.tensor(1e-8, dtype=g.dtype, device=g.device)
            factor = (1 / (g.abs() + small)).float()
            base = magnitude * torch.sqrt(_scaler_row(stats)) if self.options.wanda else magnitude
            return base * factor
        term = magnitude * g.abs().float()
        return magnitude * torch.sqrt(_scaler_row(stats)) + term if self.options.wanda else term


# --- Pruner-Zero's symbolic metrics ----------------------------------------------------


def _div(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x, y = torch.broadcast_tensors(x, y)
    return x / torch.norm(y)  # the release divides by the norm of the whole (broadcast) tensor


def _binary(op):
    def apply(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, y = torch.broadcast_tensors(x, y)
        return op(x, y)
    return apply


#: The released grammar (``lib/gptree.py``): what each label computes, as the release does.
UNARY = {
    "sqr": lambda x: x * x,
    "neg": lambda x: -x,
    "abs": torch.abs,
    "log": lambda x: torch.log(torch.abs(x) + 0.001),
    "exp": lambda x: torch.exp(x.clamp(max=100)),
    "sqrt": lambda x: torch.sqrt(torch.abs(x)),
    "tanh": torch.tanh,
    "pow": lambda x: torch.pow(x, 2),
    "skp": lambda x: x,
    "mms": lambda x: (x - x.min()) / (x.max() - x.min()),
    "zsn": lambda x: (x - x.mean()) / x.std(),
}
BINARY = {
    "add": _binary(torch.add),
    "sub": _binary(torch.sub),
    "mul": _binary(torch.mul),
    "div": _div,
}
TERMINALS = ("W", "G", "X")
MAX_NODES = 63
MAX_DEPTH = 12

#: ``data/best_tree.json`` of pprp/Pruner-Zero @ db70134: |W·W| · mms(G) (W is already |W|).
BEST_TREE = {"data": "mul", "left": {"data": "abs", "left": {"data": "mul", "left": {"data": "W"},
                                                                 "right": {"data": "W"}}},
             "right": {"data": "mms", "left": {"data": "G"}}}


def check_tree(tree: Any, depth: int = 0, count: list[int] | None = None, where: str = "tree") -> None:
    """ValueError naming the node when ``tree`` is not a tree of the released grammar."""
    count = [0] if count is None else count
    count[0] += 1
    if count[0] > MAX_NODES or depth > MAX_DEPTH:
        raise ValueError(f"the tree is too large (at most {MAX_NODES} nodes, {MAX_DEPTH} levels)")
    if not isinstance(tree, dict) or not isinstance(tree.get("data"), str):
        raise ValueError(f"{where} must be a mapping with a 'data' label, got {tree!r:.60}")
    extra = set(tree) - {"data", "left", "right"}
    if extra:
        raise ValueError(f"{where} has unknown keys {sorted(extra)} (a node has data, left and right)")
    label = tree["data"]
    if label in TERMINALS:
        children = ()
    elif label in UNARY:
        children = ("left",)
    elif label in BINARY:
        children = ("left", "right")
    else:
        raise ValueError(f"{where}.data is {label!r}, not in the released grammar: terminals "
                         f"{', '.join(TERMINALS)}; unary {', '.join(UNARY)}; binary {', '.join(BINARY)}")
    for side in ("left", "right"):
        if side in children and side not in tree:
            raise ValueError(f"{where} ({label}) needs a {side} operand")
        if side not in children and tree.get(side) is not None:
            raise ValueError(f"{where} ({label}) takes no {side} operand")
    for side in children:
        check_tree(tree[side], depth + 1, count, f"{where}.{side}")


def evaluate(tree: dict[str, Any], terminals: dict[str, torch.Tensor]) -> torch.Tensor:
    """The value of ``tree`` on ``terminals`` (W, G, X), as the release's ``compute_tree``."""
    label = tree["data"]
    if label in TERMINALS:
        return terminals[label]
    if label in UNARY:
        return UNARY[label](evaluate(tree["left"], terminals))
    return BINARY[label](evaluate(tree["left"], terminals), evaluate(tree["right"], terminals))


def tree_text(tree: dict[str, Any]) -> str:
    """The tree as a formula, e.g. ``mul(abs(mul(W, W)), mms(G))``."""
    label = tree["data"]
    if label in TERMINALS:
        return label
    operands = [tree[side] for side in ("left", "right") if tree.get(side) is not None]
    return f"{label}({', '.join(tree_text(t) for t in operands)})"


class PrunerZeroOptions(_GradientOptions):
    tree: dict[str, Any] = Field(default_factory=lambda: BEST_TREE)
    """The symbolic metric, as the release's JSON trees (``{"data": label, "left": …,
    "right": …}``): terminals W (|W|), G (the gradient statistic), X (the input's
    ``scaler_row``); the release's unary and binary operators. Default: its best tree,
    ``mul(abs(mul(W, W)), mms(G))``."""

    @field_validator("tree")
    @classmethod
    def _grammar(cls, tree: dict[str, Any]) -> dict[str, Any]:
        check_tree(tree)
        return tree


class PrunerZero(_GradientMetric):
    """Pruner-Zero: a symbolic metric of |W|, G and X (default its best: |W|²·mms(G)).

    Evaluated in float32 as the release's ``GPTree.compute_tree`` with W = |W|, G the
    gradient statistic and X = ``scaler_row`` (Σ_t x_t² averaged over windows), ``[1, in]``.
    A tree whose value does not cover the weight (one of X alone) is broadcast to it.
    """

    name = "pruner-zero"
    version = "1"
    Options = PrunerZeroOptions

    def score(self, weight: torch.Tensor, stats: LayerStats) -> torch.Tensor:
        terminals = {"W": weight.abs(), "G": self.gradient(stats).float(), "X": _scaler_row(stats)}
        value = evaluate(self.options.tree, terminals)
        return value.expand_as(weight).contiguous() if value.shape != weight.shape else value


@hookimpl
def register_metrics(register):
    register(Gblm)
    register(PrunerZero)


__all__ = ["BEST_TREE", "BINARY", "TERMINALS", "UNARY", "Gblm", "GblmOptions", "PrunerZero", "PrunerZeroOptions",
           "check_tree", "evaluate", "tree_text"]
