"""Every hook a stadebench plugin can implement.

A plugin is a module (or object) with functions decorated by ``@stadebench.hookimpl``
whose names match the specs below. Built-in metrics and patterns are plugins too
(see ``stadebench.plugins.DEFAULT_PLUGINS``). Each ``register_*`` hook receives a
``register`` callback; call it once per item. The host validates each item, rejects
duplicate names and records which plugin registered it.

There is one ``register_<plural>`` hook per kind of ``stadebench.kinds.KINDS``, and
nothing else (``tests/test_plugins.py`` checks it).
"""

import pluggy

hookspec = pluggy.HookspecMarker("stadebench")
hookimpl = pluggy.HookimplMarker("stadebench")


@hookspec
def register_metrics(register):
    """Register pruning metrics: call ``register(MetricSubclass)`` for each one.

    A metric scores every weight of a linear layer (lower = pruned first); see
    ``stadebench.Metric``.
    """


@hookspec
def register_refiners(register):
    """Register mask refiners: call ``register(RefinerSubclass)`` for each one.

    A refiner changes which weights a metric's mask prunes, never how many per row or
    group (DSnoT regrows and prunes to lower the expected reconstruction error); see
    ``stadebench.Refiner``.
    """


@hookspec
def register_reconstructors(register):
    """Register weight reconstructors: call ``register(ReconstructorSubclass)`` for each one.

    A reconstructor gives the kept weights (and bias) new values for a fixed mask (OBS,
    ADMM, STADE's mean-bias correction); see ``stadebench.Reconstructor``.
    """


@hookspec
def register_patterns(register):
    """Register sparsity patterns: call ``register(PatternSubclass)`` for each one.

    A pattern turns a score matrix into a boolean mask (True = pruned); see
    ``stadebench.Pattern``.
    """


@hookspec
def register_allocators(register):
    """Register layer-wise sparsity allocators: call ``register(AllocatorSubclass)`` for each.

    An allocator turns the target sparsity into one sparsity per layer (OWL gives layers
    with more outlier activations fewer pruned weights); see ``stadebench.Allocator``.
    """


@hookspec
def register_datasets(register):
    """Register text datasets: call ``register(DatasetSubclass)`` for each one.

    A dataset yields token windows for calibration and text for evaluation; see
    ``stadebench.Dataset``.
    """


@hookspec
def register_evaluators(register):
    """Register evaluators: call ``register(EvaluatorSubclass)`` for each one.

    An evaluator measures an in-memory model and returns scores; see
    ``stadebench.Evaluator``.
    """


__all__ = ["hookimpl", "hookspec", "register_allocators", "register_datasets", "register_evaluators",
           "register_metrics", "register_patterns", "register_reconstructors", "register_refiners"]
