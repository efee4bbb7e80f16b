"""A plugin that misbehaves on purpose, installed for the fault tests as a real
distribution (``stadebench-hostile``, found through its dist-info on PYTHONPATH).

Each item fails one way a third-party plugin can: leaving the process, raising
KeyboardInterrupt with no Ctrl-C behind it, returning what a row cannot store, or
printing markup and terminal escapes in its error, or killing its own process (for the
Ray executor's retries).
"""

from __future__ import annotations

import os
import sys
import time

import stadebench


class ExitZero(stadebench.Metric):
    """Calls sys.exit(0) while scoring."""

    name = "exit-zero"

    def score(self, weight, stats):
        sys.exit(0)


class FakeInterrupt(stadebench.Metric):
    """Raises KeyboardInterrupt while scoring, though nobody pressed Ctrl-C."""

    name = "fake-interrupt"

    def score(self, weight, stats):
        raise KeyboardInterrupt


class Slow(stadebench.Metric):
    """Writes a marker file, then sleeps in the score: a real Ctrl-C lands in plugin code."""

    name = "slow"

    def score(self, weight, stats):
        open(os.environ["HOSTILE_MARKER"], "w").close()
        time.sleep(60)
        return weight.abs()


class SetDetails(stadebench.Evaluator):
    """Returns a score whose details hold a set (not JSON)."""

    name = "set-details"

    def evaluate(self, model, tokenizer, device=None):
        return [stadebench.Score(task="t", name="s", value=1.0, details={"seen": {1, 2}})]


class TextValue(stadebench.Evaluator):
    """Returns a score whose value is text."""

    name = "text-value"

    def evaluate(self, model, tokenizer, device=None):
        return [stadebench.Score(task="t", name="s", value="high")]


class Shouting(stadebench.Evaluator):
    """Raises an error whose text holds rich markup and terminal escapes."""

    name = "shouting"

    def evaluate(self, model, tokenizer, device=None):
        raise ValueError("[/] [bold]closed\x1b]0;owned\x07\x1b[2J\x9b31m")


@stadebench.hookimpl
def register_metrics(register):
    for cls in (ExitZero, FakeInterrupt, Slow, DieOnce, DieAlways, Boom):
        register(cls)


@stadebench.hookimpl
def register_evaluators(register):
    for cls in (SetDetails, TextValue, Shouting):
        register(cls)


class BrokenText(stadebench.Dataset):
    """A dataset whose documents cannot be read."""

    name = "broken-text"

    def documents(self, split):
        raise RuntimeError("disk on fire")


@stadebench.hookimpl
def register_datasets(register):
    register(BrokenText)


class DieOnce(stadebench.Metric):
    """Kills its own process the first time it scores (as the OOM killer would), then works."""

    name = "die-once"

    def score(self, weight, stats):
        try:  # only the first process to get here creates the marker, and dies
            os.close(os.open(os.environ["HOSTILE_MARKER"] + ".died", os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return weight.abs()
        os._exit(137)


class DieAlways(stadebench.Metric):
    """Kills its own process every time it scores."""

    name = "die-always"

    def score(self, weight, stats):
        os._exit(137)


class Boom(stadebench.Metric):
    """Raises an ordinary error while scoring."""

    name = "boom"

    def score(self, weight, stats):
        raise RuntimeError("boom in the score")
