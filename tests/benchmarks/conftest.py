"""Shared pieces of the benchmarks: SmolLM2-shaped random models, per-phase timers, the
minima that in-run ratios are computed from, and what the gate reads from the JSON
(where ``stadebench`` was imported from, which benchmarks failed).

Plain ``pytest`` runs each body once as a correctness check (``--benchmark-disable`` is
in the addopts); ``tests/benchmarks/gate.py`` (``nox -s bench``) times them.
"""

from __future__ import annotations

import contextlib
import math
import os
import time

import pytest
import torch

import stadebench

# The gate runs these files against the working tree and against the package of an older
# commit (tests/benchmarks/BASELINE), so they use the public API and the names below, which
# serve both: the older package had the core at its top level and solvers with solve().
try:
    from stadebench.core.passes import capture_inputs
    from stadebench.core.models import find_blocks
    from stadebench.core.statistics import Accumulator
except ImportError:  # the flat layout, before stadebench/core/
    from stadebench.engine import capture_inputs
    from stadebench.models import find_blocks
    from stadebench.statistics import Accumulator

__all__ = ["Accumulator", "capture_inputs", "find_blocks"]


#: Torch threads for the benchmarks: ``$STADEBENCH_BENCH_THREADS``, default 1; 0 keeps
#: torch's default (all cores).
THREADS = int(os.environ.get("STADEBENCH_BENCH_THREADS", "1"))


@pytest.fixture(scope="package", autouse=True)
def bench_threads():
    """One torch thread unless told otherwise: on a shared machine a second intra-op
    thread competing with other processes makes small ops many times slower (SparseGPT's
    column loop 2.7 s on one thread, 33 s on two under load), and the gate needs figures
    that noise cannot multiply."""
    before = torch.get_num_threads()
    if THREADS > 0:
        torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


def smollm2_config(layers: int):
    """SmolLM2-135M's dimensions with ``layers`` decoder blocks."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
        vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True, num_hidden_layers=layers,
        max_position_embeddings=8192,
    )


def smollm2_shaped(layers: int, seed: int = 0):
    """A float32 Llama with SmolLM2-135M's shapes and seeded random weights."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(smollm2_config(layers)).eval()


def random_ids(n: int, seqlen: int, seed: int, vocab: int = 49152) -> torch.Tensor:
    """LongTensor ``[n, seqlen]`` of seeded random token ids."""
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def one_block():
    """The engine and stage benchmarks' model: a 1-block SmolLM2-shaped Llama (copy it
    before pruning)."""
    return smollm2_shaped(layers=1)


@pytest.fixture(scope="module")
def block_windows() -> torch.Tensor:
    """The engine and stage benchmarks' calibration: 16 windows x 512 random tokens."""
    return random_ids(16, 512, seed=0)


def resolve(metric: str, pattern: str):
    """A metric and a pattern with default options, from registered names (the public registry)."""
    plugins = stadebench.get_plugins()
    return plugins.metrics.get(metric).cls(), plugins.patterns.get(pattern).cls.from_spec(pattern)


def is_solver(metric) -> bool:
    """Whether the metric picks its mask itself: its own ``prune_layer`` (before: ``solver = True``)."""
    if hasattr(stadebench.Metric, "prune_layer"):
        return type(metric).prune_layer is not stadebench.Metric.prune_layer
    return bool(getattr(metric, "solver", False))


def solve(metric, weight: torch.Tensor, stats, pattern, sparsity: float):
    """A solver's ``(mask, new_weight)``: ``prune_layer``'s result (before: ``solve``'s tuple)."""
    if hasattr(stadebench.Metric, "prune_layer"):
        result = metric.prune_layer(weight, stats, pattern, sparsity)
        return result.mask, result.weight
    mask, new_weight, *_ = metric.solve(weight, stats, pattern, sparsity)
    return mask, new_weight


class Phases:
    """Shortest time of each named phase over a benchmark's rounds.

    pytest-benchmark times the whole body; a phase that is a small part of it (a metric's
    score next to the mask selection) needs its own figure for a 2x slowdown of it to show.
    """

    def __init__(self):
        self.best: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        yield
        seconds = time.perf_counter() - t0
        self.best[name] = min(seconds, self.best.get(name, math.inf))


@pytest.fixture
def phases(benchmark):
    """A ``Phases`` whose minima land in ``extra_info["phase_min_s"]`` (read by the gate)."""
    recorder = Phases()
    yield recorder
    if recorder.best:
        benchmark.extra_info["phase_min_s"] = dict(recorder.best)


@pytest.fixture(scope="session")
def minima() -> dict[str, float]:
    """Fastest round (seconds) of each benchmark run so far in this process, by key."""
    return {}


def record(benchmark, minima: dict[str, float], key: str, **ratios: str) -> None:
    """Store this benchmark's fastest round under ``key``; for each ``ratio_x=other`` whose
    ``other`` was measured earlier in the process, put min(this) / min(other) in extra_info.
    Does nothing when benchmarks are disabled (no timings)."""
    if benchmark.stats is None:
        return
    minima[key] = benchmark.stats.stats.min
    for name, other in ratios.items():
        if other in minima:
            benchmark.extra_info[name] = round(minima[key] / minima[other], 4)


# --- what the gate reads ------------------------------------------------------------------

_failed: list[str] = []


def pytest_runtest_logreport(report):
    if report.failed:
        _failed.append(report.nodeid)


def pytest_collectreport(report):
    if report.failed:  # a module that cannot be imported: its benchmarks are missing, not new
        _failed.append(report.nodeid)


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["stadebench"] = {"file": stadebench.__file__, "version": stadebench.__version__}
    machine_info["torch"] = {"version": torch.__version__, "threads": THREADS or torch.get_num_threads()}


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["failed"] = list(_failed)


def pytest_terminal_summary(terminalreporter):
    session = getattr(terminalreporter.config, "_benchmarksession", None)
    rows = []
    for bench in getattr(session, "benchmarks", []):
        ratios = {k: v for k, v in bench.extra_info.items() if "ratio" in k}
        if ratios:
            rows.append(f"{bench.name}: " + ", ".join(f"{k}={v:.3f}" for k, v in ratios.items()))
    if rows:
        terminalreporter.write_sep("-", "in-run ratios (fastest round / fastest round)")
        for row in rows:
            terminalreporter.write_line(row)
