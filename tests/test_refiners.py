"""DSnoT's mask refinement (``stadebench.core.refiners``) on random tensors: counts kept,
the expected error it targets lowered, inputs untouched, and the vectorised loop against a
slow row-by-row model of the algorithm (the release itself: tests/reference/test_dsnot_parity.py)."""

from __future__ import annotations

import pytest
import torch

from stadebench.base import LayerInfo
from stadebench.core.patterns import NM, Unstructured
from stadebench.core.refiners import dsnot, dsnot_score, dsnot_statistics, refine_dsnot
from stadebench.core.statistics import Accumulator

ROWS, COLS = 48, 256


def layer(seed: int = 0, rows: int = ROWS, cols: int = COLS):
    """(weight, window_sum, var, Wanda score) of a random layer whose inputs have a mean."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=g)
    window_sum = 64 * (0.3 + torch.randn(cols, generator=g))  # a window's Σx: 64 tokens
    var = 0.5 + torch.rand(cols, generator=g)
    sq = 64 * (var + (window_sum / 64) ** 2)
    return weight, window_sum, var, dsnot_score(weight, sq)


def initial(score: torch.Tensor, nm=None) -> torch.Tensor:
    return (NM(n=nm[0], m=nm[1]) if nm else Unstructured()).select(score, 0.5)


def expected_error(weight, mask, window_sum) -> torch.Tensor:
    """DSnoT's target per row: Σ_{j pruned} W_ij s_j, the mean error of a window's summed output."""
    return (weight.double() * window_sum.double() * mask).sum(1)


@pytest.mark.parametrize("nm", [None, (2, 4), (4, 8)])
def test_counts_are_kept_and_the_expected_error_falls(nm):
    weight, window_sum, var, score = layer()
    mask = initial(score, nm)
    out = dsnot(weight, mask, window_sum, var, score, nm=nm)
    assert out.dtype == torch.bool and out.shape == mask.shape
    assert not torch.equal(out, mask)
    assert torch.equal(out.sum(1), mask.sum(1))
    if nm:
        groups = out.view(ROWS, -1, nm[1]).sum(-1)
        assert bool((groups == nm[0]).all())
    before = expected_error(weight, mask, window_sum).abs()
    after = expected_error(weight, out, window_sum).abs()
    assert after.mean() < 0.5 * before.mean(), (before.mean(), after.mean())


def test_zero_cycles_returns_the_input_mask_and_no_input_is_modified():
    weight, window_sum, var, score = layer(1)
    mask = initial(score)
    inputs = [t.clone() for t in (weight, mask, window_sum, var, score)]
    same = dsnot(weight, mask, window_sum, var, score, max_cycles=0)
    assert torch.equal(same, mask) and same is not mask
    for nm in (None, (2, 4)):
        m = initial(score, nm)
        m_copy = m.clone()
        dsnot(weight, m, window_sum, var, score, nm=nm)
        assert torch.equal(m, m_copy)
    for got, want in zip((weight, mask, window_sum, var, score), inputs):
        assert torch.equal(got, want)


def test_a_huge_threshold_changes_nothing():
    weight, window_sum, var, score = layer(2)
    mask = initial(score)
    assert torch.equal(dsnot(weight, mask, window_sum, var, score, update_threshold=1e30), mask)


def test_rows_that_cannot_swap_and_cursors_that_run_out():
    """A row with nothing pruned or nothing kept is left alone; more cycles than a row has
    candidates stops that row (the release would index out of range)."""
    weight, window_sum, var, score = layer(3, rows=6, cols=8)
    mask = initial(score)
    mask[0] = False
    mask[1] = True
    out = dsnot(weight, mask, window_sum, var, score, max_cycles=50, update_threshold=0.0)
    assert torch.equal(out[:2], mask[:2])
    assert out.shape == mask.shape


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_keep_counts_stops_rows_whose_cursors_pass_their_candidates(nm):
    """32 inputs, threshold 0 and 16 cycles: rows run through their pruned weights of one
    sign. As the release, the counts then change; with ``keep_counts`` they cannot."""
    weight, window_sum, var, score = layer(7, rows=32, cols=32)
    mask = initial(score, nm)
    options = dict(nm=nm, max_cycles=16, update_threshold=0.0)
    released = dsnot(weight, mask, window_sum, var, score, **options)
    assert not torch.equal(released.sum(1), mask.sum(1))
    kept = dsnot(weight, mask, window_sum, var, score, keep_counts=True, **options)
    assert not torch.equal(kept, mask)
    assert torch.equal(kept.sum(1), mask.sum(1))
    if nm:
        assert bool((kept.view(32, -1, nm[1]).sum(-1) == nm[0]).all())


def test_keep_counts_changes_nothing_where_the_cursors_stay_among_their_candidates():
    weight, window_sum, var, score = layer(8)
    for nm in (None, (2, 4)):
        mask = initial(score, nm)
        assert torch.equal(dsnot(weight, mask, window_sum, var, score, nm=nm, keep_counts=True),
                           dsnot(weight, mask, window_sum, var, score, nm=nm))


def test_bad_inputs_are_refused():
    weight, window_sum, var, score = layer(4, rows=4, cols=12)
    mask = initial(score)
    with pytest.raises(ValueError, match="bool"):
        dsnot(weight, mask.float(), window_sum, var, score)
    with pytest.raises(ValueError, match="N:M"):
        dsnot(weight, mask, window_sum, var, score, nm=(2, 5))
    with pytest.raises(ValueError, match="entries"):
        dsnot(weight, mask, window_sum[:-1], var, score)
    with pytest.raises(ValueError, match="max_cycles"):
        dsnot(weight, mask, window_sum, var, score, max_cycles=-1)


# --- a slow model of the algorithm, row by row ------------------------------------------


def slow_dsnot(weight, mask, window_sum, var, score, *, nm=None, max_cycles=50, threshold=0.1, power=1.0,
               same_sign=None):
    """DSnoT as the paper and the release describe it, one row at a time, with lists."""
    same_sign = nm is not None if same_sign is None else same_sign
    metric = weight * window_sum.reshape(1, -1)
    errors = torch.where(mask, metric, torch.zeros_like(metric)).sum(1)  # the same float32 sums
    ratio = torch.where(mask, metric, torch.zeros_like(metric))
    ratio = ratio / torch.pow(var.reshape(1, -1), power) if power else ratio
    out = mask.clone()
    for i in range(weight.shape[0]):
        regrow = torch.sort(ratio[i], stable=True).indices.tolist()
        kept = [j for j in torch.sort(score[i], stable=True).indices.tolist() if not mask[i, j]]
        negative = [j for j in kept if metric[i, j] < 0]
        positive = [j for j in kept if metric[i, j] > 0]
        work = score[i].masked_fill(mask[i], float("inf")).tolist()
        e, sign = errors[i], torch.sign(errors[i])
        for _ in range(max_cycles):
            r = regrow.pop() if e > 0 else regrow.pop(0)
            if nm is None:
                p = positive.pop(0) if e < 0 else negative.pop(0)
            else:
                start = r - r % nm[1]
                p = min(range(start, start + nm[1]), key=lambda j: work[j])
                work[p] = float("inf")
            after = e + metric[i, p] - metric[i, r]
            if not (e.abs() > threshold) or (same_sign and torch.sign(after) != sign):
                break
            out[i, p], out[i, r] = True, False
            e = e + metric[i, p] - metric[i, r]
    return out


@pytest.mark.parametrize(("nm", "power", "same_sign"), [(None, 1.0, None), (None, 0.0, None), (None, 2.0, True),
                                                        ((2, 4), 1.0, None), ((4, 8), 0.5, False)])
def test_the_vectorised_loop_is_the_row_by_row_algorithm(nm, power, same_sign):
    weight, window_sum, var, score = layer(5)
    mask = initial(score, nm)
    for threshold in (0.1, 5.0):
        got = dsnot(weight, mask, window_sum, var, score, nm=nm, pow_of_var_regrowing=power, same_sign=same_sign,
                    update_threshold=threshold)
        want = slow_dsnot(weight, mask, window_sum, var, score, nm=nm, threshold=threshold, power=power,
                          same_sign=same_sign)
        assert torch.equal(got, want), (threshold, (got != want).sum().item())


# --- from LayerStats ---------------------------------------------------------------------


def test_refine_dsnot_reads_the_release_statistics_from_layer_stats():
    g = torch.Generator().manual_seed(6)
    windows = 0.5 + torch.randn(4, 32, 64, generator=g)
    acc = Accumulator(frozenset({"sum", "sumsq"}))
    for w in windows:
        acc.add(w.unsqueeze(0))
    stats = acc.stats(LayerInfo("model.layers.0.mlp.down_proj", 0, "mlp.down_proj"))
    window_sum, var, sq = dsnot_statistics(stats)
    x = windows.reshape(-1, 64)
    torch.testing.assert_close(window_sum, x.sum(0) / 4)
    torch.testing.assert_close(sq, (x * x).sum(0) / 4)
    torch.testing.assert_close(var, x.var(0, unbiased=False))  # over all tokens, not the release's per window
    weight = torch.randn(16, 64, generator=g)
    score = dsnot_score(weight, sq)
    for nm, method, nm_score in ((None, "magnitude", score), ((2, 4), "magnitude", weight.abs()),
                                 ((2, 4), "wanda", score)):
        mask = initial(score, nm)
        want = dsnot(weight, mask, window_sum, var, nm_score, nm=nm, update_threshold=0.01)
        got = refine_dsnot(weight, mask, stats, initial_method=method, nm=nm, update_threshold=0.01)
        assert torch.equal(got, want)
    within = windows.var(1, unbiased=False).mean(0)
    want = dsnot(weight, initial(score), window_sum, within, score)
    assert torch.equal(refine_dsnot(weight, initial(score), stats, var=within), want)
    with pytest.raises(ValueError, match="sparsegpt"):
        refine_dsnot(weight, initial(score, (2, 4)), stats, initial_method="sparsegpt", nm=(2, 4))
