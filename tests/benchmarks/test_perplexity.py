"""Batched perplexity: ``total_nll`` of a 2-block SmolLM2-shaped Llama on 8 windows x 512
random tokens (batch 4), against the plain batched forward over the same tokens. The
ratio (reference / total_nll) is the throughput the loss computation keeps: 1 is free.
"""

from __future__ import annotations

import math

import pytest
import torch

from stadebench.evaluation.perplexity import total_nll

from .conftest import random_ids, record, smollm2_shaped

BATCH = 4


@pytest.fixture(scope="module")
def model():
    return smollm2_shaped(layers=2)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return random_ids(8, 512, seed=1)


def test_perplexity_reference(benchmark, minima, model, ids):
    """``model(input_ids=batch, use_cache=False)`` for every batch, nothing else."""
    benchmark.group = "perplexity"

    def forward():
        with torch.inference_mode():
            for batch in ids.split(BATCH):
                logits = model(input_ids=batch, use_cache=False).logits
        return logits

    logits = benchmark.pedantic(forward, rounds=2)
    assert logits.shape == (BATCH, 512, 49152)
    record(benchmark, minima, "perplexity:reference")


def test_perplexity(benchmark, minima, model, ids):
    benchmark.group = "perplexity"
    nll = benchmark.pedantic(lambda: total_nll(model, ids, BATCH, torch.device("cpu")), rounds=2)
    # A random model predicts nearly uniformly: about ln(vocab) nats per predicted token.
    per_token = nll / (ids.shape[0] * (ids.shape[1] - 1))
    assert abs(per_token - math.log(49152)) < 1.0
    record(benchmark, minima, "perplexity:total_nll")
    if "perplexity:total_nll" in minima and "perplexity:reference" in minima:
        benchmark.extra_info["throughput_ratio"] = round(
            minima["perplexity:reference"] / minima["perplexity:total_nll"], 4)
