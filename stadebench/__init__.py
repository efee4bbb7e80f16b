"""stadebench: a fair, cheap benchmark for pruning LLMs without retraining."""

from .base import Dataset, Evaluator, LayerInfo, LayerStats, Metric, Options, Pattern, Score
from .errors import ConfigError, NumericalError, PluginError, StadebenchError, UnknownNameError
from .hookspecs import hookimpl
from .plugins import get_plugins
from .version import __version__



def prune(*args, **kwargs):
    """Prune a causal LM in place; see ``stadebench.core.engine.prune``."""
    from .core.engine import prune as _prune

    return _prune(*args, **kwargs)


def collect_statistics(*args, **kwargs):
    """One-shot statistics shared by several ``prune`` calls; see ``stadebench.core.engine.collect_statistics``."""
    from .core.engine import collect_statistics as _collect

    return _collect(*args, **kwargs)


__all__ = [
    "ConfigError", "Dataset", "Evaluator", "LayerInfo", "LayerStats", "Metric", "NumericalError",
    "Options", "Pattern", "PluginError", "Score", "StadebenchError", "UnknownNameError",
    "__version__", "collect_statistics", "get_plugins", "hookimpl", "prune",
]
