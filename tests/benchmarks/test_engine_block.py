"""One decoder block through the engine: ``prune()`` of a 1-block SmolLM2-shaped Llama on
16 windows x 512 random tokens (batch 8), against the floor any calibrated method has
to pay, two plain forward passes of the block over the same windows (statistics pass
and pruned-output pass). ``extra_info["ratio_to_two_passes"]`` is that overhead; for
magnitude (no forward pass) ``ratio_to_wanda`` is what skipping the passes saves.
"""

from __future__ import annotations

import copy

import pytest
import torch

from stadebench import prune

from .conftest import capture_inputs, find_blocks, record

BATCH = 8


def test_engine_block_reference(benchmark, minima, one_block, block_windows):
    """Two plain forward passes of the block over the captured block inputs."""
    benchmark.group = "engine block"
    _, blocks = find_blocks(one_block)
    with torch.no_grad():
        captured = capture_inputs(one_block, blocks, list(block_windows.split(BATCH)), torch.device("cpu"))

    def two_passes():
        with torch.no_grad():
            for _ in range(2):
                for x, args, kwargs in captured:
                    out = blocks[0](x, *args, **kwargs)
        return out

    out = benchmark.pedantic(two_passes, rounds=3, warmup_rounds=1)
    out = out[0] if isinstance(out, tuple) else out
    assert out.shape == (BATCH, 512, 576) and bool(torch.isfinite(out).all())
    record(benchmark, minima, "engine:two-passes")


# wanda first: magnitude's ratio_to_wanda needs its time.
@pytest.mark.parametrize("metric", ["wanda", "stade", "magnitude", "sparsegpt"])
def test_engine_block(benchmark, minima, one_block, block_windows, metric):
    benchmark.group = "engine block"
    report = benchmark.pedantic(
        lambda model: prune(model, block_windows, metric=metric, batch_size=BATCH, device="cpu"),
        setup=lambda: ((copy.deepcopy(one_block),), {}), rounds=3, warmup_rounds=1)
    assert report.sparsity == 0.5
    assert report.block_passes == (0 if metric == "magnitude" else 2)
    benchmark.extra_info["timings"] = {k: round(v, 4) for k, v in report.timings.items()}
    ratios = {"ratio_to_two_passes": "engine:two-passes"}
    if metric == "magnitude":
        ratios["ratio_to_wanda"] = "engine:wanda"
    record(benchmark, minima, f"engine:{metric}", **ratios)
