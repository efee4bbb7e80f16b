"""The gradient pass (``core.gradients``) of a 2-block SmolLM2-shaped Llama (the whole
model: embeddings, 2 blocks, the 49152-word head) on 4 windows x 512 random tokens,
against its floor: one plain forward pass of the model over the same windows, one window
at a time as the gradient pass runs them. A forward and a backward cost about three
forwards; ``ratio_to_forward`` says how close the pass comes. ``ratio_to_pass`` of the
cache read is what a second metric or run pays instead of the pass. The pass's peak
memory, measured in a fresh process, is in ``extra_info`` as a multiple of the model's
size (not gated: memory, not time).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from .conftest import random_ids, record, smollm2_shaped

gradients = pytest.importorskip("stadebench.core.gradients")  # absent before the gradient metrics

N, SEQLEN = 4, 512


@pytest.fixture(scope="module")
def model():
    return smollm2_shaped(layers=2)


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    return random_ids(N, SEQLEN, seed=0)


def test_gradient_forward_reference(benchmark, minima, model, windows):
    """One plain forward pass of the model per window (labels given: the loss is part of it)."""
    benchmark.group = "gradients"

    def forward():
        with torch.no_grad():
            return [model(input_ids=w[None], labels=w[None]).loss for w in windows]

    losses = benchmark.pedantic(forward, rounds=3, warmup_rounds=1)
    assert len(losses) == N and all(torch.isfinite(loss) for loss in losses)
    record(benchmark, minima, "gradients:forward")


def test_gradient_pass(benchmark, minima, model, windows):
    benchmark.group = "gradients"
    stats = benchmark.pedantic(lambda: gradients.gradient_statistics(model, windows, device="cpu"),
                               rounds=3, warmup_rounds=1)
    assert len(stats.layers) == 14 and all(bool(torch.isfinite(l2).all()) for _, l2 in stats.layers.values())
    record(benchmark, minima, "gradients:pass", ratio_to_forward="gradients:forward")


def test_gradient_cache_read(benchmark, minima, model, windows, tmp_path, monkeypatch):
    """Reading the pass's statistics back from the on-disk cache."""
    from stadebench.runner import gradients as cache

    benchmark.group = "gradients"
    monkeypatch.setenv("STADEBENCH_CACHE", str(tmp_path))
    stats = gradients.gradient_statistics(model, windows, device="cpu")
    key = cache.entry_key("{}", {"revision": "bench", "fingerprint": None}, windows, 100.0, "float64",
                          torch.device("cpu"))
    cache.store(key, stats)
    shapes = {name: tuple(l1.shape) for name, (l1, _) in stats.layers.items()}
    again = benchmark.pedantic(lambda: cache.load(key, shapes), rounds=5, warmup_rounds=1)
    assert again.cached and all(torch.equal(again.layers[k][1], v[1]) for k, v in stats.layers.items())
    record(benchmark, minima, "gradients:cache-read", ratio_to_pass="gradients:pass")


_PEAK = """
import json, resource, sys, torch
sys.path.insert(0, {here!r})
from conftest_free import build
model, windows = build()
from stadebench.core.gradients import gradient_statistics
model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
before = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()  # resident now
stats = gradient_statistics(model, windows, device="cpu")
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({{"model_bytes": model_bytes, "pass_peak_bytes": after - before, "statistics_bytes": stats.nbytes}}))
"""


def test_gradient_pass_memory(benchmark, tmp_path):
    """Peak resident memory the pass adds to a fresh process holding the model (not timed):
    the process's peak after the pass less its resident memory before it."""
    benchmark.group = "gradients"
    (tmp_path / "conftest_free.py").write_text(
        "import torch\nfrom transformers import LlamaForCausalLM\n"
        f"from tests.benchmarks.conftest import random_ids, smollm2_config\n"
        f"def build():\n    torch.manual_seed(0)\n"
        f"    return LlamaForCausalLM(smollm2_config(2)).eval(), random_ids({N}, {SEQLEN}, seed=0)\n")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    # the gate's PYTHONPATH (which stadebench) first; the repository for tests.benchmarks
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), root]))}
    done = subprocess.run([sys.executable, "-c", _PEAK.format(here=str(tmp_path))], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    benchmark.extra_info.update(figures)
    benchmark.extra_info["pass_peak_over_model"] = round(figures["pass_peak_bytes"] / figures["model_bytes"], 2)
    assert figures["statistics_bytes"] > 0
    benchmark.pedantic(lambda: None, rounds=1)
