"""The stages after a metric's mask, through the engine: ``wanda`` then each built-in refiner
or reconstructor on a 1-block SmolLM2-shaped Llama, 16 windows x 512 random tokens (batch 8),
against the same block pruned by ``wanda`` alone. ``extra_info["ratio_to_wanda"]`` is what a
stage costs on top of the cell's Wanda prune (the two forward passes and the masking); the
stage's own seconds are in ``stage_s``, and ``memory_bytes`` is what the stage says one layer
needs, for SmolLM2's largest layer and for a LLaMA-7B MLP layer (what ``stadebench
validate`` compares with the device's memory).
"""

from __future__ import annotations

import copy

import pytest

from .conftest import record

stages = pytest.importorskip("stadebench.core.stages")  # absent before the stages
engine = pytest.importorskip("stadebench.core.engine")

BATCH = 8
SMOLLM2_MLP = (576, 1536)  # down_proj: [out, in]
LLAMA_7B_MLP = (4096, 11008)


def _prune(model, windows, stage: tuple[str, str, dict] | None):
    from stadebench.plugins import resolve_plugin

    staged = stages.Stages()
    if stage is not None:
        kind, name, options = stage
        setattr(staged, kind, resolve_plugin("refiner" if kind == "refiner" else "reconstructor", name, options))
    return engine.prune(model, windows, resolve_plugin("metric", "wanda"), resolve_plugin("pattern", "unstructured"),
                        0.5, calibration=engine.Calibration(batch_size=BATCH), device="cpu", stages=staged)


# wanda first: every stage's ratio_to_wanda needs its time.
STAGES = {"wanda": None,
          "dsnot": ("refiner", "dsnot", {}),
          "dsnot-all-layers": ("refiner", "dsnot", {"skip_layer": "no_skip"}),
          "mean-bias": ("reconstructor", "mean-bias", {}),
          "obs": ("reconstructor", "obs", {}),
          "admm": ("reconstructor", "admm", {})}


@pytest.mark.parametrize("name", list(STAGES))
def test_stage(benchmark, minima, one_block, block_windows, name):
    benchmark.group = "stages"
    stage = STAGES[name]
    report = benchmark.pedantic(lambda model: _prune(model, block_windows, stage),
                                setup=lambda: ((copy.deepcopy(one_block),), {}), rounds=3, warmup_rounds=1)
    assert report.sparsity == 0.5 and report.block_passes == 2
    if stage is not None:
        role = "refine" if stage[0] == "refiner" else "reconstruct"
        assert report.stages[role]["name"] == stage[1]
        benchmark.extra_info["stage_s"] = round(report.stages["seconds"][role], 4)
        plugin = report.stages[role]
        if role == "reconstruct":
            from stadebench.plugins import resolve_plugin

            instance = resolve_plugin("reconstructor", plugin["name"], plugin["options"])
            benchmark.extra_info["memory_bytes"] = {"smollm2_mlp": instance.memory_bytes(*SMOLLM2_MLP),
                                                    "llama7b_mlp": instance.memory_bytes(*LLAMA_7B_MLP)}
    record(benchmark, minima, f"stages:{name}", ratio_to_wanda="stages:wanda")
