"""Mask refinement without training: DSnoT (Zhang et al., "Dynamic Sparse No Training",
ICLR 2024), reproducing its released code (zyxxmu/DSnoT @ 4c029df, ``prune_DSnoT`` in
``lib/prune.py``, statistics from ``WrappedGPT`` in ``lib/layerwrapper.py``).

DSnoT swaps weights of a pruned layer, one pair per output row and cycle: it regrows one
pruned weight and prunes one kept weight, so as to shrink the row's *expected*
reconstruction error

    e_i = Σ_{j pruned} W_ij · s_j,        s_j = Σ_t x_tj / windows

(the dense output minus the sparse output, summed over a window's tokens and averaged over
the windows). Each cycle, a row with e_i > 0 regrows the pruned weight of largest
W_ij·s_j / var_j^p, a row with e_i ≤ 0 the one of smallest (p: ``pow_of_var_regrowing``;
var_j the input's variance, which steers the regrowth to stable channels). The pruned
weight is then chosen

- per row (unstructured): among the kept weights whose W_ij·s_j has the sign that moves
  e_i back towards 0 (positive when e_i < 0, negative when e_i ≥ 0), the one of lowest
  pruning score (the Wanda score |W_ij|·sqrt(Σ_t x_tj² / windows), whatever mask the
  refinement starts from);
- N:M: in the regrown weight's own group of M, the kept weight of lowest initial score
  (Wanda's, magnitude's, ...), so every group keeps its count.

A row stops when |e_i| ≤ ``update_threshold`` (and, with ``same_sign``, when the swap would
flip the sign of e_i from its initial sign), and the whole layer after ``max_cycles``
cycles. Each row walks the two candidate lists from their ends: nothing is re-sorted
between cycles.

The release's options (``main.py``) and where they are here: ``--max_cycle_time`` 50
(``max_cycles``), ``--update_threshold`` 0.1, ``--pow_of_var_regrowing`` 1 (0 skips the
division), ``--without_same_sign`` (``same_sign``, below). The rest choose what is refined
and from what, and are the caller's: ``--initial_method`` wanda / magnitude / sparsegpt
(the initial mask; for N:M also ``score``), ``--skip_layer`` (default ``mlp``: the MLP
linears keep their initial mask, only attention's are refined; ``self_attn``; ``no_skip``),
``--skip_sub_layer`` (default ``no_skip``; or one linear's name, e.g. ``o_proj``),
``--without_DSnoT`` (refine nothing, unstructured only). ``--pow_of_var_pruning`` is
parsed and never read. The release's ``sparsegpt`` initial method is broken:
``WrappedGPT`` creates its Hessian as zeros and never adds to it, so the SparseGPT score
is 0 everywhere and the initial mask is the first half of each row's columns (N:M: the
sort's order of ties); it never uses SparseGPT's weight updates either.

What the release does and ``dsnot`` reproduces (all of it changes masks):

- ``same_sign`` is off for unstructured, on for N:M: the release's ``--without_same_sign``
  is ``type=bool, default=True``, so no command line can turn the check on for
  unstructured, and its N:M branch always checks.
- The cursors of a row that stopped keep moving, and its candidates are still written to
  the mask (pruned where the candidate was pruned, kept where it was kept): a no-op as long
  as each cursor stays in its own sign's part of its list.
- Kept weights with W_ij·s_j exactly 0 (or NaN) stand, in the per-row pruning list, for
  its first entry (the kept weight of lowest Wanda score): ``return_reorder_indice`` maps
  them to index 0.
- N:M: a weight pruned by a swap, and every originally pruned weight (regrown or not), get
  the score ``max(row) + 1`` = inf, so they are never chosen again; the score is marked
  even on rows that stopped.
- When a cursor runs past its list (more cycles than candidates), the release indexes out
  of range and fails; here that row stops and writes nothing more.

Counts. A swap prunes one weight and regrows one, so every row (every group for N:M) keeps
its count as long as each cursor stays among its candidates of the right sign. A row that
needs more swaps on one side than it has pruned weights of that sign reaches the kept
weights (0 in the regrowth list): it then "regrows" a kept weight and prunes another, or,
stopped, prunes the kept weight outright, and its count changes, as the release's does
(on 32 inputs and 16 cycles, most rows of a random layer). On SmolLM2 (576 and 1536
inputs, 50 cycles) no row's count changes. ``keep_counts=True`` stops such a row instead
and leaves stopped rows alone: the counts are then exact, and the masks are the release's
wherever the release kept every count by valid swaps.

Statistics. The release keeps float32 running averages over windows (one window per
forward call): ``sum_metric_row`` = Σx / windows, ``scaler_row`` = Σx² / windows, and
``var``, the token-weighted mean of each window's own variance (``unbiased=False``).
``dsnot`` takes these tensors, so fed the release's own it gives the release's mask bit
for bit. ``refine_dsnot`` computes them from stadebench's float64 sums (``LayerStats``):
Σx / windows and Σx² / windows differ from the release's only by rounding (measured on
SmolLM2: no mask entry changes). The variance is not the release's: ``LayerStats`` keeps
``m2`` about the mean of all tokens, so ``m2 / count`` adds to the release's
within-window variance the spread of the window means (Σ_w n_w (μ_w − μ)² / n). The two
agree with one window and when the windows' means agree; they do not on attention
outputs (o_proj's input: up to 2× on SmolLM2, 8×128 windows), where 2% of the mask
then differs. ``refine_dsnot(var=...)`` takes the within-window variance where a caller
has it (Σ_w Σ_{t∈w} (x_t − μ_w)² / n, each window centred on its own mean), which gives
the release's masks up to rounding.

``update_threshold`` is in units of a window's summed output, so its effect depends on
the tokens per window (the release's default 0.1 was set at 2048 tokens a window).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from ..base import LayerStats, Options, Pattern, Refiner
from ..hookspecs import hookimpl


class _Cursors:
    """Two cursors into each row of a candidate list ``order`` [rows, width]: one walks
    forward from 0, one backward from ``last`` (the last valid column of each row)."""

    def __init__(self, order: Tensor, last: Tensor):
        self.order, self.last = order, last.reshape(-1, 1)
        self.pos = torch.cat([torch.zeros_like(self.last), self.last], dim=1)
        self.step = torch.tensor([[1, -1]], device=order.device).expand_as(self.pos)

    def take(self, back: Tensor) -> tuple[Tensor, Tensor]:
        """Each row's candidate at its front (``back`` 0) or back (1) cursor, which then
        moves on; and whether the cursor was inside the row's list."""
        pos = self.pos.gather(1, back)
        inside = (pos >= 0) & (pos <= self.last)
        index = self.order.gather(1, pos.clamp(0, self.order.shape[1] - 1))
        self.pos.scatter_(1, back, pos + self.step.gather(1, back))
        return index, inside


def _pruning_order(metric: Tensor, score: Tensor, mask: Tensor, kept: Tensor) -> Tensor:
    """Each row's kept weights ordered for pruning, the release's way: those with a
    negative ``metric`` first, by ascending ``score``; those with a positive one last, the
    lowest score at the row's last kept position; the rest (0, NaN) in between, each
    standing for the lowest-score kept weight."""
    by_score = torch.sort(score.masked_fill(mask, float("inf")), dim=1, stable=True).indices
    value = metric.gather(1, by_score)
    rows, width = by_score.shape
    valid = torch.arange(width, device=mask.device).reshape(1, -1) < kept.reshape(-1, 1)
    negative, positive = valid & (value < 0), valid & (value > 0)
    slot = torch.full_like(by_score, width)  # width: a spare column, dropped
    slot = torch.where(negative, negative.long().cumsum(1) - 1, slot)
    slot = torch.where(positive, kept.reshape(-1, 1) - positive.long().cumsum(1), slot)
    order = torch.cat([by_score[:, :1].expand(rows, width), by_score[:, :1]], dim=1).contiguous()
    return order.scatter_(1, slot, by_score)[:, :width]


def _write(mask: Tensor, index: Tensor, value: Tensor, live: Tensor) -> None:
    mask.scatter_(1, index, torch.where(live, value, mask.gather(1, index)))


def _cycles(mask: Tensor, metric: Tensor, error: Tensor, regrow: _Cursors, prune: Callable, live: Tensor,
            *, max_cycles: int, threshold: float, same_sign: bool, keep_counts: bool) -> None:
    """The release's swap loop, in place on ``mask`` and ``error``."""
    sign = torch.sign(error)
    update = live.clone()
    for _ in range(max_cycles):
        if not bool(update.any()):
            break
        regrow_index, inside = regrow.take((error > 0).long())
        prune_index, prune_inside = prune(error, regrow_index)
        live &= inside & prune_inside
        if keep_counts:  # a swap must turn one pruned weight kept and one kept weight pruned
            live &= mask.gather(1, regrow_index) & ~mask.gather(1, prune_index)
        regrow_value = metric.gather(1, regrow_index)
        prune_value = metric.gather(1, prune_index)
        after = error + prune_value - regrow_value
        update = update & live & (error.abs() > threshold)
        if same_sign:
            update &= sign == torch.sign(after)
        writes = update if keep_counts else live
        _write(mask, prune_index, update, writes)
        _write(mask, regrow_index, ~update, writes)
        error += torch.where(update, prune_value, torch.zeros_like(prune_value))
        error -= torch.where(update, regrow_value, torch.zeros_like(regrow_value))


def _nm_pruner(score: Tensor, mask: Tensor, m: int) -> Callable:
    work = score.masked_fill(mask, float("inf"))
    ceiling = work.max(dim=1, keepdim=True).values + 1  # inf: the release takes it after marking
    offsets = torch.arange(m, device=score.device).reshape(1, -1)

    def prune(error: Tensor, regrow_index: Tensor) -> tuple[Tensor, Tensor]:
        start = regrow_index - regrow_index % m
        group = work.gather(1, start + offsets)
        index = torch.topk(group, 1, dim=1, largest=False).indices + start
        work.scatter_(1, index, ceiling)
        return index, torch.ones_like(index, dtype=torch.bool)

    return prune


def _check(weight: Tensor, mask: Tensor, window_sum: Tensor, var: Tensor, score: Tensor,
           nm: tuple[int, int] | None, max_cycles: int) -> None:
    if weight.ndim != 2 or mask.shape != weight.shape or score.shape != weight.shape:
        raise ValueError(f"weight, mask and score must be [out, in] alike: {tuple(weight.shape)}, "
                         f"{tuple(mask.shape)}, {tuple(score.shape)}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool (True = pruned), not {mask.dtype}")
    for name, t in (("window_sum", window_sum), ("var", var)):
        if t.numel() != weight.shape[1]:
            raise ValueError(f"{name} has {t.numel()} entries for {weight.shape[1]} inputs")
    if nm is not None and (nm[1] <= 0 or not 0 < nm[0] <= nm[1] or weight.shape[1] % nm[1]):
        raise ValueError(f"N:M {nm[0]}:{nm[1]} does not fit {weight.shape[1]} inputs")
    if max_cycles < 0:
        raise ValueError(f"max_cycles must be >= 0, not {max_cycles}")


def dsnot(weight: Tensor, mask: Tensor, window_sum: Tensor, var: Tensor, score: Tensor, *,
          nm: tuple[int, int] | None = None, max_cycles: int = 50, update_threshold: float = 0.1,
          pow_of_var_regrowing: float = 1.0, same_sign: bool | None = None, keep_counts: bool = False) -> Tensor:
    """DSnoT's refinement of one layer's mask, as the release computes it.

    Args:
        weight: the dense weight, float32 ``[out, in]``.
        mask: the initial mask, bool ``[out, in]``, True where pruned.
        window_sum: Σ_t x_tj / windows, float32 ``[in]`` (the release's ``sum_metric_row``).
        var: each input's variance, float32 ``[in]`` (the release's ``var``).
        score: pruning score, lower pruned first, ``[out, in]``: unstructured, the Wanda score
            |W|·sqrt(Σx²/windows) whatever the initial method (as the release); N:M, the
            initial method's score (Wanda's or |W|).
        nm: (N, M) to refine within groups of M consecutive inputs; None per row.
        max_cycles: most swaps per row (the release's ``--max_cycle_time``); 0 returns the mask.
        update_threshold: a row stops once |e_i| is at most this (``--update_threshold``).
        pow_of_var_regrowing: p in W·s / var^p for regrowing; 0 ranks by W·s alone.
        same_sign: also stop a row before a swap that would flip e_i's initial sign; None as
            the release: off per row, on for N:M.
        keep_counts: False as the release. True: a row stops at its first candidate pair that
            is not (pruned, kept) in the current mask, and a stopped row writes nothing, so
            every row (every group for N:M) keeps its count; the release's masks wherever its
            cursors stay among their candidates (see the module docstring).

    Returns:
        A new bool mask; the inputs are not modified.
    """
    _check(weight, mask, window_sum, var, score, nm, max_cycles)
    out = mask.clone()
    if max_cycles == 0 or weight.numel() == 0:
        return out
    metric = weight * window_sum.reshape(1, -1)
    regrowth = torch.where(out, metric, torch.zeros_like(metric))
    error = regrowth.sum(dim=1, keepdim=True)
    if pow_of_var_regrowing:
        regrowth = regrowth / torch.pow(var.reshape(1, -1), pow_of_var_regrowing)
    order = torch.sort(regrowth, dim=1, stable=True).indices
    rows, width = weight.shape
    regrow = _Cursors(order, torch.full((rows,), width - 1, device=weight.device))
    kept = (~out).sum(dim=1)
    live = ((kept > 0) & (kept < width)).reshape(-1, 1)
    if nm is None:
        cursors = _Cursors(_pruning_order(metric, score, out, kept), kept - 1)

        def prune(error: Tensor, regrow_index: Tensor) -> tuple[Tensor, Tensor]:
            return cursors.take((error < 0).long())
    else:
        prune = _nm_pruner(score, out, nm[1])
    same_sign = nm is not None if same_sign is None else same_sign
    _cycles(out, metric, error, regrow, prune, live, max_cycles=max_cycles, threshold=update_threshold,
            same_sign=same_sign, keep_counts=keep_counts)
    return out


def dsnot_statistics(stats: LayerStats) -> tuple[Tensor, Tensor, Tensor]:
    """(window_sum, var, sq_window_sum): the release's ``sum_metric_row`` (Σx / windows),
    ``var`` and ``scaler_row`` (Σx² / windows), float32, from stadebench's sums. The
    variance is the release's, within windows (``window_var``), when it was collected, else
    over all tokens (``m2 / count``; see the module docstring)."""
    if stats.sum is None or stats.sumsq is None or not stats.count or not stats.windows:
        raise ValueError(f"DSnoT needs the sum and sumsq statistics of {stats.layer}")
    if stats.window_m2 is not None:
        var = stats.window_m2 / stats.count
    else:
        m2 = stats.m2 if stats.m2 is not None else stats.sumsq - stats.sum * stats.sum / stats.count
        var = (m2 / stats.count).clamp_min(0)
    return (stats.sum / stats.windows).float(), var.float(), (stats.sumsq / stats.windows).float()


def dsnot_score(weight: Tensor, sq_window_sum: Tensor, method: str = "wanda") -> Tensor:
    """The release's initial score: ``wanda`` |W|·sqrt(Σx²/windows) or ``magnitude`` |W|."""
    if method == "wanda":
        return weight.abs() * torch.sqrt(sq_window_sum.reshape(1, -1))
    if method == "magnitude":
        return weight.abs()
    raise ValueError(f"DSnoT's initial score is 'wanda' or 'magnitude', not {method!r} (pass score= for another)")


def refine_dsnot(weight: Tensor, mask: Tensor, stats: LayerStats, *, initial_method: str = "wanda",
                 score: Tensor | None = None, var: Tensor | None = None, nm: tuple[int, int] | None = None,
                 max_cycles: int = 50, update_threshold: float = 0.1, pow_of_var_regrowing: float = 1.0,
                 same_sign: bool | None = None, keep_counts: bool = False) -> Tensor:
    """``dsnot`` fed from a layer's ``LayerStats`` (``sum``, ``sumsq``, ``m2``, ``windows``).

    ``score`` (lower pruned first) defaults to the release's: per row Wanda's, whatever
    ``initial_method``; for N:M the ``initial_method``'s (``wanda``, ``magnitude``; pass
    ``score`` for any other). ``var`` replaces the variance over all tokens, e.g. by the
    release's within-window one.
    """
    window_sum, all_tokens_var, sq_window_sum = dsnot_statistics(stats)
    var = all_tokens_var if var is None else var
    weight = weight.float()
    if score is None:
        score = dsnot_score(weight, sq_window_sum, initial_method if nm is not None else "wanda")
    return dsnot(weight, mask, window_sum, var, score, nm=nm, max_cycles=max_cycles,
                 update_threshold=update_threshold, pow_of_var_regrowing=pow_of_var_regrowing, same_sign=same_sign,
                 keep_counts=keep_counts)


class DSnoT(Refiner):
    """DSnoT (Zhang et al., ICLR 2024): prune-and-regrow swaps that lower each row's expected
    reconstruction error, no training; exact against zyxxmu/DSnoT @ 4c029df."""

    name = "dsnot"
    version = "1"
    statistics = frozenset({"sum", "sumsq", "window_var"})

    class Options(Options):
        max_cycles: int = Field(50, ge=0, le=100_000, description="swap cycles per layer (--max_cycle_time)")
        update_threshold: float = Field(0.1, ge=0, description="a row stops once its expected error is this "
                                                               "small (--update_threshold; in a window's summed "
                                                               "output, tuned at 2048 tokens a window)")
        pow_of_var_regrowing: float = Field(1.0, ge=0, description="regrow by W·s / var^p (--pow_of_var_regrowing; "
                                                                   "0: no division)")
        initial_method: Literal["wanda", "magnitude"] = Field(
            "wanda", description="the score that picks the weight pruned in an N:M group (per row DSnoT uses "
                                 "Wanda's, as released)")
        skip_layer: Literal["mlp", "self_attn", "no_skip"] = Field(
            "mlp", description="layers whose path contains this keep the metric's mask (--skip_layer; the release's "
                               "default leaves the MLP unrefined)")
        same_sign: bool | None = Field(None, description="stop a row whose error would change sign (default as "
                                                         "released: off per row, on for N:M)")
        keep_counts: bool = Field(True, description="stop a row rather than let a cursor leave its candidates "
                                                    "(the release would change the row's count, or fail)")

    def supports(self, pattern: Pattern) -> str | None:
        """Per-row patterns, and N:M within its groups."""
        if pattern.group_size is not None and getattr(pattern, "n", None) is None:
            return f"it swaps within a row or within N:M groups, not within {pattern.spec!r} groups"
        return None

    def refine(self, weight: Tensor, mask: Tensor, stats: LayerStats, pattern: Pattern, sparsity: float) -> Tensor:
        """The layer's mask after DSnoT's swaps (its own mask on a skipped layer)."""
        o = self.options
        if o.skip_layer != "no_skip" and o.skip_layer in stats.layer.short_name:
            return mask.clone()
        nm = (pattern.n, pattern.group_size) if pattern.group_size is not None else None
        return refine_dsnot(weight, mask, stats, initial_method=o.initial_method, nm=nm, max_cycles=o.max_cycles,
                            update_threshold=o.update_threshold, pow_of_var_regrowing=o.pow_of_var_regrowing,
                            same_sign=o.same_sign, keep_counts=o.keep_counts)


@hookimpl
def register_refiners(register):
    register(DSnoT)


__all__ = ["DSnoT", "dsnot", "dsnot_score", "dsnot_statistics", "refine_dsnot"]
