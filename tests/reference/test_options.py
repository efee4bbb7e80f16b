"""The released-behaviour options, against the releases' formulas written out here (no clone
needed): N:M ``ties: topk`` and unstructured-layer ``threshold: inclusive``."""

from __future__ import annotations

import math

import pytest
import torch

from stadebench.core.metrics.sparsegpt import SparseGPT
from stadebench.core.patterns import NM, UnstructuredLayer
from stadebench.errors import ConfigError
from stadebench.testing import MetricConformance, PatternConformance

pytestmark = pytest.mark.usefixtures("single_thread")


def quantised(shape, levels: int = 5, seed: int = 0) -> torch.Tensor:
    """Scores with many exact ties, like |W| of de-quantised weights."""
    return torch.randint(0, levels, shape, generator=torch.Generator().manual_seed(seed)).float()


def released_nm(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The releases' N:M loop: topk of the n lowest in every m columns, scattered."""
    mask = torch.zeros_like(scores) == 1
    for ii in range(0, scores.shape[1], m):
        mask.scatter_(1, ii + torch.topk(scores[:, ii:ii + m].float(), n, dim=1, largest=False)[1], True)
    return mask


def released_threshold(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Wanda's magnitude and SparseGPT's per-block rule: everything ≤ sorted[int(numel·s)]."""
    return scores <= torch.sort(scores.flatten())[0][int(scores.numel() * sparsity)]


@pytest.mark.parametrize("spec", ["2:4", "4:8", "1:4"])
@pytest.mark.parametrize("kind", ["random", "tied"])
def test_nm_topk_is_the_released_selection(spec, kind):
    n, m = map(int, spec.split(":"))
    scores = torch.rand(64, 128) if kind == "random" else quantised((64, 128), 3)
    mask = NM.from_spec(spec, {"ties": "topk"}).select(scores, n / m)
    assert torch.equal(mask, released_nm(scores, n, m))
    default = NM.from_spec(spec).select(scores, n / m)
    if kind == "random":
        assert torch.equal(mask, default)
    else:  # the tie order is the only difference: each group prunes the same scores
        assert not torch.equal(mask, default)

        def pruned_scores(mask):
            return torch.sort(scores.masked_fill(~mask, -1).view(64, -1, m), -1).values

        assert torch.equal(pruned_scores(mask), pruned_scores(default))


def test_nm_rejects_an_unknown_tie_rule():
    with pytest.raises(ConfigError, match="ties"):
        NM.from_spec("2:4", {"ties": "random"})


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.7])
@pytest.mark.parametrize("kind", ["random", "tied"])
def test_inclusive_threshold_is_the_released_rule(sparsity, kind):
    scores = torch.rand(48, 40) if kind == "random" else quantised((48, 40))
    pattern = UnstructuredLayer({"threshold": "inclusive"})
    mask = pattern.select(scores, sparsity)
    assert torch.equal(mask, released_threshold(scores, sparsity))
    k = math.floor(scores.numel() * sparsity)
    if kind == "random":
        assert int(mask.sum()) == k + 1  # one weight more than ⌊numel·s⌋
    else:
        assert int(mask.sum()) > k + 1  # and every tie at the threshold
    exact = UnstructuredLayer().select(scores, sparsity)
    assert int(exact.sum()) == k and bool((mask | ~exact).all())  # the default's mask is inside it


def test_inclusive_threshold_prunes_nothing_at_sparsity_zero():
    assert not UnstructuredLayer({"threshold": "inclusive"}).select(torch.rand(8, 8), 0.0).any()


def test_sparsegpt_with_the_inclusive_threshold_prunes_one_more_per_block():
    from stadebench.base import LayerInfo, LayerStats

    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 96, generator=g, dtype=torch.float64)
    weight = torch.randn(24, 96, generator=g)
    stats = LayerStats(LayerInfo("l", 0, "l"), 512, None, None, (x.t() @ x).float())
    metric = SparseGPT({"blocksize": 32})
    blocks = 96 // 32
    for options, extra in (({}, 0), ({"threshold": "inclusive"}, 1)):
        result = metric.prune_layer(weight, stats, UnstructuredLayer(options), 0.5)
        for b in range(blocks):
            assert int(result.mask[:, 32 * b:32 * (b + 1)].sum()) == 24 * 32 // 2 + extra


@pytest.mark.parametrize("pattern", [UnstructuredLayer(), NM.from_spec("2:4")], ids=["unstructured-layer", "2:4"])
def test_sparsegpt_released_order_is_the_same_algorithm(pattern):
    """In float64 the two float orders agree to rounding: same mask, same weights."""
    from stadebench.base import LayerInfo, LayerStats

    g = torch.Generator().manual_seed(1)
    x = torch.randn(400, 64, generator=g, dtype=torch.float64)
    weight = torch.randn(16, 64, generator=g, dtype=torch.float64)
    stats = LayerStats(LayerInfo("l", 0, "l"), 400, None, None, x.t() @ x)
    fused = SparseGPT({"blocksize": 16}).prune_layer(weight, stats, pattern, 0.5)
    released = SparseGPT({"blocksize": 16, "order": "released"}).prune_layer(weight, stats, pattern, 0.5)
    assert torch.equal(fused.mask, released.mask)
    torch.testing.assert_close(fused.weight, released.weight, rtol=1e-10, atol=1e-10)


class TestSparseGPTReleasedOrder(MetricConformance):
    metric = "sparsegpt"
    options = {"order": "released", "blocksize": 16}


class TestNMTopkConformance(PatternConformance):
    """``ties: topk`` still prunes exactly N of every M and is deterministic on ties."""

    pattern = "2:4"
    options = {"ties": "topk"}


class Test4of8TopkConformance(PatternConformance):
    pattern = "4:8"
    options = {"ties": "topk"}


class TestInclusiveConformance(PatternConformance):
    """The inclusive threshold passes the kit except its exact count on tied scores: by design it
    prunes every tie at the threshold (on tie-free scores, ⌊numel·s⌋ + 1)."""

    pattern = "unstructured-layer"
    options = {"threshold": "inclusive"}

    def expected_pruned(self, shape, sparsity):
        k = math.floor(shape[0] * shape[1] * sparsity)
        return k + 1 if 0 < k < shape[0] * shape[1] else k

    def test_exact_count(self):
        pattern = self.make()
        for shape, s in self.cases(pattern):
            for seed in (0, 1):
                assert int(pattern.select(self.scores(shape, seed), s).sum()) == self.expected_pruned(shape, s)
            tied = self.scores(shape, 2, "ties")
            want = released_threshold(tied, s) if math.floor(tied.numel() * s) else torch.zeros_like(tied).bool()
            assert torch.equal(pattern.select(tied, s), want)
