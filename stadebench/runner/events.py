"""Progress callbacks from an executor to whoever shows the run (the CLI draws bars)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .plan import PlannedCell


class Events:
    """Progress callbacks; the CLI overrides them to draw progress bars."""

    def plan(self, todo: int, skipped: int) -> None:
        """The run starts: ``todo`` cells to run, ``skipped`` already finished."""

    def cell_start(self, cell: PlannedCell, index: int, total: int) -> None:
        """Cell number ``index`` of ``total`` starts."""

    def blocks(self, done: int, total: int) -> None:
        """``done`` of ``total`` decoder blocks of the running cell are pruned."""

    def cell_end(self, cell: PlannedCell, error: str | None) -> None:
        """A cell's rows are saved; ``error`` is None when it succeeded."""

    def note(self, message: str) -> None:
        """Something the user should know (e.g. an optional evaluation is skipped)."""


__all__ = ["Events"]
