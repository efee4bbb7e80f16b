"""Executors run a plan and yield typed cell results; only the driver writes them.

An executor decides where cells run. ``LocalExecutor`` runs them in this process, model
after model, one ``ModelSession`` each. A distributed executor implements the same
``run`` on remote workers that each host sessions; because sessions return plain
``CellResult`` objects and never touch the leaderboard, results do not depend on the
executor and a cluster needs no shared file system.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch

from ..errors import ConfigError
from .events import Events
from .plan import Plan
from .session import CellResult, ModelSession, Windows, describe


class Executor(Protocol):
    """Runs the cells of a plan and yields one result per cell, in any order."""

    name: str
    """Recorded in every row (``executor``)."""

    def run(self, plan: Plan, device: torch.device, windows: Windows, events: Events) -> Iterator[CellResult]:
        """Run every cell of ``plan`` on ``device``; ``windows`` are calibration windows
        the preflight already cut. Announce each cell with ``events.cell_start``."""
        ...


class LocalExecutor:
    """In this process: each model loaded once, its cells one after another."""

    name = "local"

    def run(self, plan: Plan, device: torch.device, windows: Windows, events: Events) -> Iterator[CellResult]:
        total, index = len(plan.todo), 0
        for model_plan in plan.models:
            try:
                session = ModelSession(model_plan, device, windows, progress=events.blocks)
            except Exception as exc:  # a model that cannot be loaded fails its cells, not the run
                for cell in model_plan.cells:
                    index += 1
                    events.cell_start(cell, index, total)
                    yield CellResult(cell, error=describe(exc))
                continue
            load = session.seconds["load"]
            for cell in model_plan.cells:
                index += 1
                events.cell_start(cell, index, total)
                result = session.run(cell)
                result.seconds["load"], load = load, 0.0
                yield result
            del session


EXECUTORS = ("local", "ray")


def executor_named(name: str, address: str | None = None, **options) -> Executor:
    """The executor ``name`` (``local`` or ``ray``); ``address`` and options go to Ray."""
    if name == "local":
        if address or options:
            raise ConfigError("--address and --workers are for the Ray executor; add --executor ray")
        return LocalExecutor()
    if name == "ray":
        from .ray_executor import RayExecutor, import_ray

        import_ray()  # say what to install before anything runs
        executor = RayExecutor(address, **options)
        executor.check()  # a malformed, absent or mute head: one error before anything is written
        return executor
    raise ConfigError(f"unknown executor {name!r}; use one of {', '.join(EXECUTORS)}")


__all__ = ["EXECUTORS", "Events", "Executor", "LocalExecutor", "executor_named"]
