"""Errors a user can cause. Each carries one paragraph that says what to do next."""

from __future__ import annotations

from collections.abc import Iterable

from .util import suggestion


class StadebenchError(Exception):
    """Base class of the errors stadebench reports without a traceback."""


class ConfigError(StadebenchError, ValueError):
    """A bad suite, option or argument (exit code 2)."""


class UnknownNameError(ConfigError, KeyError):
    """A metric, pattern, dataset or evaluator name that no plugin registered."""

    def __init__(self, kind: str, name: str, known: Iterable[str], hint: str = ""):
        self.kind, self.name, self.known = kind, name, sorted(known)
        close = suggestion(name, self.known, n=3, cutoff=0.5)
        msg = f"unknown {kind} {name!r}" + (f"; {close}" if close else ".")
        if len(self.known) <= 30:
            msg += f" Known {kind}s: {', '.join(self.known) or '(none)'}."
        if hint:
            msg += f" {hint}"
        super().__init__(msg)

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


class PluginError(StadebenchError):
    """A plugin that failed to load or registered something invalid."""


class NumericalError(StadebenchError, ArithmeticError):
    """NaN or Inf found in weights, statistics or scores."""


__all__ = ["ConfigError", "NumericalError", "PluginError", "StadebenchError", "UnknownNameError"]
