"""Score + mask of one linear layer, as the engine does it for every layer: the metric's
``score`` then the pattern's ``select`` (SparseGPT: its own ``prune_layer``), on Llama-7B shapes.

The weights and statistics are built once per module: a seeded W and the statistics of
2048 random tokens whose channels have non-zero means (so that STADE's variance and
Wanda's norm differ). The score and select phases are also timed on their own
(``extra_info["phase_min_s"]``): the mask selection dominates, and would hide a slowdown
of a metric's score.
"""

from __future__ import annotations

import math

import pytest
import torch

from stadebench import LayerInfo

from .conftest import Accumulator, is_solver, resolve, solve

TOKENS = 2048

# Llama-7B layers with in_features 4096, and the layer each shape stands for: its role
# picks stade-w's branch (internal: STADE, normed: Wanda).
SHAPES = {
    "4096x4096": ((4096, 4096), "self_attn.o_proj", "internal"),
    "11008x4096": ((11008, 4096), "mlp.up_proj", "normed"),
}

CASES = [  # (id, metric, pattern, shapes)
    *[(m, m, "unstructured", SHAPES) for m in ("magnitude", "random", "wanda", "stade", "stade-w")],
    ("wanda-unstructured-layer", "wanda", "unstructured-layer", SHAPES),
    ("wanda-2:4", "wanda", "2:4", SHAPES),
    # One SparseGPT layer at 4096x4096 takes ~3 s on one CPU thread: cheap enough to keep the real shape.
    ("sparsegpt", "sparsegpt", "unstructured", ["4096x4096"]),
]
PARAMS = [pytest.param(metric, pattern, shape, id=f"{case}-{shape}")
          for case, metric, pattern, shapes in CASES for shape in shapes]


@pytest.fixture(scope="module")
def accumulated() -> Accumulator:
    """Σx, Σx², XᵀX of 2048 tokens x 4096 channels with per-channel means and scales."""
    gen = torch.Generator().manual_seed(0)
    cols = 4096
    scale = torch.rand(cols, generator=gen) * 2 + 0.1
    mean = torch.randn(cols, generator=gen)
    acc = Accumulator(frozenset({"sum", "sumsq", "gram"}))
    acc.add(torch.randn(TOKENS, cols, generator=gen) * scale + mean)
    return acc


@pytest.fixture(scope="module")
def layers(accumulated) -> dict:
    """Shape id -> (W, stats), W float32 seeded."""
    out = {}
    for i, (key, (shape, short, role)) in enumerate(SHAPES.items()):
        weight = torch.randn(shape, generator=torch.Generator().manual_seed(100 + i))
        info = LayerInfo(f"model.layers.0.{short}", 0, short, role)
        out[key] = (weight, accumulated.stats(info))
    return out


def _check(mask: torch.Tensor, pattern, sparsity: float) -> None:
    """The realised sparsity is exactly what the pattern's rule names."""
    rows, cols = mask.shape
    if pattern.spec == "unstructured":
        assert bool((mask.sum(1) == math.floor(cols * sparsity)).all())
    elif pattern.spec == "unstructured-layer":
        assert int(mask.sum()) == math.floor(mask.numel() * sparsity)
    else:
        assert bool((mask.view(rows, -1, pattern.m).sum(-1) == pattern.n).all())


@pytest.mark.parametrize(("metric_name", "pattern_name", "shape"), PARAMS)
def test_score_mask(benchmark, phases, layers, metric_name, pattern_name, shape):
    weight, stats = layers[shape]
    metric, pattern = resolve(metric_name, pattern_name)
    sparsity = pattern.resolve_sparsity(None)
    benchmark.group = f"score+mask {shape}"
    benchmark.extra_info.update(metric=metric_name, pattern=pattern.spec, shape=shape)

    if is_solver(metric):
        def run():
            return solve(metric, weight, stats, pattern, sparsity)
    else:
        def run():
            with phases("score"):
                scores = metric.score(weight, stats)
            with phases("select"):
                return pattern.select(scores, sparsity), None

    mask, new_weight = benchmark.pedantic(run, rounds=5, iterations=1)
    assert mask.shape == weight.shape and mask.dtype == torch.bool
    _check(mask, pattern, sparsity)
    if new_weight is not None:
        assert not bool(new_weight[mask].any())
