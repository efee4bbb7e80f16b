"""The kinds of plugin items (metric, pattern, …): one entry each in ``KINDS``.

Everything that differs between kinds lives in its entry: the base class an item
subclasses, the hook that registers it, how a name becomes an instance, and the
conformance suite that tests it. The plugin manager, ``resolve_plugin``, the
``stadebench list`` command and the tests derive from this table. Adding a kind is one
entry here plus its ``register_<plural>`` hookspec (with its documentation) in
``stadebench.hookspecs``.

Base classes and suites are named by dotted path, so importing this module stays cheap.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["KINDS", "Kind", "build_from_options", "build_from_spec", "load"]


def load(path: str) -> Any:
    """The object a ``"package.module:name"`` path names (imported on first use)."""
    module, _, name = path.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except AttributeError:  # an ImportError, so that no attribute lookup swallows it
        raise ImportError(f"cannot import {name!r} from {module!r} (kind table path {path!r})") from None


def build_from_options(cls: type, name: str, options: dict[str, Any] | None) -> Any:
    """An instance of a registered class, built from its options (``cls(options)``)."""
    return cls(options)


def build_from_spec(cls: type, spec: str, options: dict[str, Any] | None) -> Any:
    """An instance built from the spec that named it, e.g. ``"2:4"`` (``cls.from_spec(spec, options)``)."""
    return cls.from_spec(spec, options)


@dataclass(frozen=True)
class Kind:
    """One kind of plugin item and everything that is particular to it."""

    name: str
    """Singular, as in ``Registration.kind`` and the registries' keys: ``"metric"``."""
    plural: str
    """As in ``stadebench list <plural>`` and the hook ``register_<plural>``: ``"metrics"``."""
    base: str
    """Dotted path of the base class every item subclasses: ``"stadebench.base:Metric"``."""
    instance_options_error: str
    """The error when options are passed along with an instance instead of a name."""
    build: Callable[[type, str, dict[str, Any] | None], Any] = build_from_options
    """Turns ``(registered class, the name given, options)`` into an instance."""
    conformance: str | None = None
    """Dotted path of the conformance suite for this kind's plugins; None when there is none."""

    @property
    def hook(self) -> str:
        """The hook that registers items of this kind: ``register_<plural>``."""
        return f"register_{self.plural}"

    def base_class(self) -> type:
        """The base class, imported now."""
        return load(self.base)

    def conformance_class(self) -> type | None:
        """The conformance suite class, imported now (this imports pytest); None when there is none."""
        return None if self.conformance is None else load(self.conformance)


KINDS: dict[str, Kind] = {kind.name: kind for kind in (
    Kind("metric", "metrics", "stadebench.base:Metric",
         "metric_options go with a metric name, not a Metric instance",
         conformance="stadebench.testing:MetricConformance"),
    Kind("refiner", "refiners", "stadebench.base:Refiner",
         "refine options go with a refiner name, not a Refiner instance",
         conformance="stadebench.testing:RefinerConformance"),
    Kind("reconstructor", "reconstructors", "stadebench.base:Reconstructor",
         "reconstruct options go with a reconstructor name, not a Reconstructor instance",
         conformance="stadebench.testing:ReconstructorConformance"),
    Kind("pattern", "patterns", "stadebench.base:Pattern",
         "pattern_options go with a pattern spec, not a Pattern instance", build=build_from_spec,
         conformance="stadebench.testing:PatternConformance"),
    Kind("allocator", "allocators", "stadebench.base:Allocator",
         "allocation_options go with an allocator name, not an Allocator instance",
         conformance="stadebench.testing:AllocatorConformance"),
    Kind("dataset", "datasets", "stadebench.base:Dataset",
         "dataset options go with a dataset name, not a Dataset instance"),
    Kind("evaluator", "evaluators", "stadebench.base:Evaluator",
         "evaluator options go with an evaluator name, not an Evaluator instance"),
)}
"""Every kind, by singular name, in the order registries are collected and listed."""
