"""A one-shot grid as the runner does it: 5 metrics × 2 patterns on a 2-block SmolLM2-shaped
Llama, 16 windows × 512 random tokens (batch 8), against ten times one such cell pruned
with its own passes. ``collect_statistics`` runs the blocks once for the union of the
metrics' needs and every cell then only masks, so ``ratio_to_ten_cells`` is far below 1;
a change that made cells run their own passes again would bring it near 1.
"""

from __future__ import annotations

import copy

import pytest
import torch

from stadebench import collect_statistics, get_plugins, prune

from .conftest import random_ids, record, smollm2_shaped

METRICS = ["magnitude", "wanda", "stade", "stade-w", "sparsegpt"]
PATTERNS = ["unstructured", "2:4"]
BATCH = 8


@pytest.fixture(scope="module")
def dense():
    return smollm2_shaped(layers=2)


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    return random_ids(16, 512, seed=2)


def _sparsity(pattern: str) -> float | None:
    return None if ":" in pattern else 0.5


def test_one_shot_cell(benchmark, minima, dense, windows):
    """One wanda cell with its own statistics pass and reconstruction pass, as a lone cell runs."""
    benchmark.group = "one-shot grid"
    report = benchmark.pedantic(
        lambda model: prune(model, windows, metric="wanda", sequential=False, batch_size=BATCH, device="cpu"),
        setup=lambda: ((copy.deepcopy(dense),), {}), rounds=2, warmup_rounds=1)
    assert report.block_passes == 4 and report.sparsity == 0.5
    record(benchmark, minima, "grid:cell")


def test_one_shot_grid(benchmark, minima, dense, windows):
    benchmark.group = "one-shot grid"
    needs = set().union(*(get_plugins().metrics.get(m).cls.statistics for m in METRICS))
    models = []

    def setup():
        models[:] = [copy.deepcopy(dense) for _ in range(len(METRICS) * len(PATTERNS))]
        return (), {}

    def grid():
        shared = collect_statistics(dense, windows, needs, batch_size=BATCH, device="cpu")
        cells = zip(models, [(m, p) for m in METRICS for p in PATTERNS])
        return shared, [prune(model, None, metric=m, pattern=p, sparsity=_sparsity(p), sequential=False,
                              device="cpu", statistics=shared) for model, (m, p) in cells]

    shared, reports = benchmark.pedantic(grid, setup=setup, rounds=2, warmup_rounds=0)
    assert shared.block_passes == 2 and all(r.block_passes == 0 and r.sparsity == 0.5 for r in reports)
    benchmark.extra_info["statistics_megabytes"] = round(shared.nbytes / 2**20, 1)
    record(benchmark, minima, "grid:ten", ratio_to_ten_cells="grid:cell")
    if "ratio_to_ten_cells" in benchmark.extra_info:
        benchmark.extra_info["ratio_to_ten_cells"] = round(benchmark.extra_info["ratio_to_ten_cells"] / 10, 4)
