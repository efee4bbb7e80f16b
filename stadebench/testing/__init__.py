"""The conformance kit: tests a metric, pattern, allocator, refiner or reconstructor plugin
against stadebench's contract.

Plugin authors subclass a suite in their own tests and name what they registered::

    from stadebench.testing import (AllocatorConformance, MetricConformance, PatternConformance,
                                    ReconstructorConformance, RefinerConformance)

    class TestRIA(MetricConformance):
        metric = "ria"              # a registered name (or the Metric class itself)
        options = {"a": 0.5}        # optional: the options to test with

    class TestColumns(PatternConformance):
        pattern = "columns"
        def expected_pruned(self, shape, sparsity):   # optional: the exact count rule
            return shape[0] * math.floor(shape[1] * sparsity)

    class TestDepth(AllocatorConformance):
        allocator = "depth"

    class TestSwap(RefinerConformance):
        refiner = "swap"            # N:M masks are checked group by group

    class TestRefit(ReconstructorConformance):
        reconstructor = "refit"

Each test checks one rule of ``RULES``; a failure starts with the rule's name, e.g.
``conformance rule 'score-shape': ria returned [40, 24] for a weight of [24, 40]``.
Set ``plugin = my_module`` to have the suite register your plugin for its tests when it
is not installed (or when installed plugins are not loaded).

This module is also a pytest plugin (entry point ``pytest11: stadebench``) with the
fixtures ``tiny_model``, ``calibration_windows`` and ``isolated_plugins``. The suites do
not need it: they build what they use themselves. Everything heavy (torch,
transformers) is imported inside functions, so loading the plugin costs nothing.
"""

from __future__ import annotations

import pytest

from ..plugins import get_plugins
from .allocators import AllocatorConformance
from .kit import (BUILTIN_PATTERNS, RULES, ConformanceError, StrictLayerStats, UnrequestedStatistic, documented_count,
                  expected_count, fail, layer_inputs, make_tiny_model, make_windows)
from .metrics import MetricConformance
from .patterns import PatternConformance
from .stages import ReconstructorConformance, RefinerConformance


@pytest.fixture
def tiny_model():
    """A fresh random 2-block ``LlamaForCausalLM`` (same weights every time); see ``make_tiny_model``."""
    return make_tiny_model()


@pytest.fixture
def calibration_windows():
    """LongTensor ``[4, 16]`` of random token ids for ``tiny_model``."""
    return make_windows()


@pytest.fixture
def isolated_plugins(monkeypatch):
    """A fresh plugin manager holding only the built-ins (no installed plugin loads); restored after."""
    from ..plugins import reset_plugins

    monkeypatch.setenv("STADEBENCH_LOAD_PLUGINS", "")
    monkeypatch.delenv("STADEBENCH_BLOCK_PLUGINS", raising=False)
    reset_plugins()
    yield get_plugins()
    reset_plugins()


def pytest_report_header(config):
    """Which stadebench and which installed stadebench plugins this run sees (nothing is imported)."""
    import importlib.metadata

    from ..version import __version__

    names = sorted({ep.name for ep in importlib.metadata.entry_points(group="stadebench")})
    return f"stadebench {__version__}; installed plugins: {', '.join(names) or 'none'}"


__all__ = [
    "AllocatorConformance", "BUILTIN_PATTERNS", "RULES", "ConformanceError", "MetricConformance", "PatternConformance",
    "ReconstructorConformance", "RefinerConformance", "StrictLayerStats", "UnrequestedStatistic", "calibration_windows",
    "documented_count", "expected_count", "fail", "isolated_plugins", "layer_inputs", "make_tiny_model", "make_windows",
    "tiny_model",
]
