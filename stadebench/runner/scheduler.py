"""Which actor runs which cells: the Ray executor's placement rule, without Ray.

A model's cells are cut into units (``units``); ``Scheduler`` hands them to actors by
``pick``, retries the units of actors that die, and ``simulate`` replays the same
``Scheduler`` with given cell and load costs. Actors are any hashable handles: Ray's
actor handles in ``RayExecutor``, integers in ``simulate`` and the tests.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from .plan import ModelPlan, Plan, PlannedCell

UNPLACED = "no Ray worker could be placed for this model's resources"


@dataclass
class Unit:
    """Cells of one model that one actor runs in order: a sharing group, or one cell.
    ``attempts`` counts the actor deaths it has been blamed for."""

    model: ModelPlan
    attempts: int = 0


@dataclass
class Running:
    """A unit on its actor: ``left`` the indices of its cells not yet returned, ``loaded``
    whether the actor finished loading the model, ``load`` the seconds that took (until the
    unit's next cell result carries them)."""

    unit: Unit
    key: str
    left: set[int]
    loaded: bool = False
    load: float = 0.0


class Assignment(NamedTuple):
    """A unit given to an actor; ``moved``: the actor did not hold that model before."""

    actor: Hashable
    unit: Unit
    moved: bool


def units(plan: Plan) -> dict[str, deque[Unit]]:
    """Each model's units in plan order, by model spec JSON: the one-shot cells that share
    statistics form one unit (they must meet on one actor), every other cell is its own."""
    out: dict[str, deque[Unit]] = {}
    for model in plan.models:
        atoms: dict[str, list[PlannedCell]] = {}
        for i, c in enumerate(model.cells):
            atoms.setdefault(c.group or f"cell {i}", []).append(c)
        out[model.spec.model_dump_json()] = deque(Unit(subplan(model, cells)) for cells in atoms.values())
    return out


def pick(queues: dict[str, deque[Unit]], held: str | None, holders: Counter) -> str | None:
    """The model whose next unit an idle actor takes: the one it holds while that has work
    (no reload), else the one with the most units left per actor holding it."""
    if held is not None and queues.get(held):
        return held
    left = [(len(q) / (1 + holders[key]), key) for key, q in queues.items() if q]
    return max(left)[1] if left else None


def subplan(model: ModelPlan, cells: list[PlannedCell]) -> ModelPlan:
    """``model``'s plan cut down to ``cells``, with the sharing groups they use."""
    groups = {key: g for key, g in model.groups.items() if any(c.group == key for c in cells)}
    return ModelPlan(model.spec, model.identity, cells, groups)


class Scheduler:
    """The units of a plan, the actors running them, and who gets what next.

    The driver starts and stops actors and runs the units; it tells the scheduler what
    happened (``loaded``, ``finished``, ``load_failed``, ``died``) and asks ``dispatch`` for
    the next assignments. An actor takes only models that need the GPUs it reserved.

    Args:
        plan: the plan whose cells to place.
        slots: how many actors may live at once.
        gpus: the GPUs an actor holding a model reserves (default 0 for every model).
        max_retries: fresh actors a unit gets after its actor died.
    """

    def __init__(self, plan: Plan, slots: int, gpus: Callable[[ModelPlan], float] = lambda model: 0.0,
                 max_retries: int = 2):
        self.queues = units(plan)
        self.slots, self.max_retries = slots, max_retries
        self.needs = {m.spec.model_dump_json(): gpus(m) for m in plan.models}
        self.live: list[Hashable] = []  # every live actor, in start order
        self.holding: dict[Hashable, str] = {}  # live actor -> the model it holds or loads
        self.gpus_of: dict[Hashable, float] = {}  # live actor -> the GPUs it reserved
        self.idle: dict[Hashable, str | None] = {}  # idle actor -> the model it holds
        self.running: dict[Hashable, Running] = {}  # busy actor -> its unit

    @property
    def waiting(self) -> bool:
        """Whether units wait for an actor."""
        return any(self.queues.values())

    def dispatch(self, start: Callable[[float], Hashable], stop: Callable[[Hashable], None]) -> Iterator[Assignment]:
        """Give idle actors the next unit, stop one that fits no waiting unit when no slot is
        free, start actors (``start(gpus)`` returns one) for free slots and give them a unit;
        lazily, so that the driver sends each unit before the next actor starts."""
        for actor in list(self.idle):
            assignment = self._assign(actor)
            if assignment is not None:
                yield assignment
        if self.waiting and self.idle and len(self.live) >= self.slots:  # nothing fits an idle actor:
            actor = next(iter(self.idle))  # free its resources for one that fits
            del self.idle[actor]
            self._forget(actor)
            stop(actor)
        while len(self.live) < self.slots and self.waiting:
            key = pick(self.queues, None, Counter(self.holding.values()))
            actor = start(self.needs[key])
            self.live.append(actor)
            self.gpus_of[actor] = self.needs[key]
            yield self._give(actor, key)

    def loaded(self, actor: Hashable, run: Running | None = None) -> None:
        """``actor`` finished loading the model of ``run`` (default: its unit now). Results
        may be seen out of call order, so a load can be reported after its unit finished:
        it then marks that finished unit, never the actor's next one."""
        (run or self.running[actor]).loaded = True

    def finished(self, actor: Hashable, index: int) -> bool:
        """``actor`` returned cell ``index`` of its unit; whether that was the unit's last."""
        run = self.running[actor]
        run.left.discard(index)
        if run.left:
            return False
        del self.running[actor]
        self.idle[actor] = run.key
        return True

    def load_failed(self, actor: Hashable) -> list[PlannedCell]:
        """``actor`` could not load its unit's model: the unit's cells (they fail), the actor idle."""
        cells = self._unfinished(self.running.pop(actor))
        self.idle[actor] = None
        self.holding.pop(actor, None)
        return cells

    def died(self, actor: Hashable, reason: str) -> list[tuple[PlannedCell, str]]:
        """``actor`` died: its unfinished cells go back to the queue, the one it was running (all
        of them before the load returned) blamed; the blamed cells past ``max_retries``
        come back with their error."""
        run = self.running.pop(actor)
        self._forget(actor)
        cells, unit, queue = self._unfinished(run), run.unit, self.queues[run.key]
        # calls run in order: the first unfinished cell was running (or, before the load
        # returned, the load was); only that one is blamed, the others go on unblamed
        blamed, spared = (cells, []) if not run.loaded else (cells[:1], cells[1:])
        if spared:
            queue.appendleft(Unit(subplan(unit.model, spared), unit.attempts))
        if unit.attempts < self.max_retries:
            queue.appendleft(Unit(subplan(unit.model, blamed), unit.attempts + 1))
            return []
        error = f"the Ray worker died {unit.attempts + 1} time(s) running this cell; last: {reason}"
        return [(cell, error) for cell in blamed]

    def unplaced(self) -> list[PlannedCell]:
        """The cells of the units still waiting (none once every unit found an actor)."""
        return [cell for q in self.queues.values() for u in q for cell in u.model.cells]

    def _assign(self, actor: Hashable) -> Assignment | None:
        """The next unit for idle ``actor``, if a waiting model fits it."""
        fits = {k: q for k, q in self.queues.items() if self.needs[k] == self.gpus_of[actor]}
        key = pick(fits, self.idle[actor], Counter(v for a, v in self.holding.items() if a is not actor))
        if key is None:
            return None
        del self.idle[actor]
        return self._give(actor, key)

    def _give(self, actor: Hashable, key: str) -> Assignment:
        """The next unit of model ``key`` to ``actor``."""
        unit = self.queues[key].popleft()
        moved = self.holding.get(actor) != key
        self.holding[actor] = key
        self.running[actor] = Running(unit, key, set(range(len(unit.model.cells))))
        return Assignment(actor, unit, moved)

    def _forget(self, actor: Hashable) -> None:
        """``actor`` is gone (stopped or dead)."""
        self.live.remove(actor)
        self.holding.pop(actor, None)
        self.gpus_of.pop(actor, None)

    @staticmethod
    def _unfinished(run: Running) -> list[PlannedCell]:
        """``run``'s cells not yet returned, in order."""
        return [run.unit.model.cells[i] for i in sorted(run.left)]


def simulate(plan: Plan, slots: int, cell_seconds: Callable[[PlannedCell], float],
             load_seconds: Callable[[ModelPlan], float], actor_start: float = 0.0) -> dict[str, float]:
    """The schedule the Ray executor's ``Scheduler`` makes of ``plan`` on ``slots`` actors,
    given each cell's cost and each model's load time (e.g. from a leaderboard's recorded
    seconds): the actor free first takes the next unit, loading when it changes model.
    Returns the makespan, the summed cell seconds, the loads, and the efficiency: cell
    seconds over slots × makespan."""
    slots = max(1, slots)
    scheduler, free = Scheduler(plan, slots), {}
    work = loads = 0.0

    def start(gpus: float) -> int:
        """A new actor, free once started."""
        free[len(free)] = actor_start
        return len(free) - 1

    def stop(actor: Hashable) -> None:
        """Never called: every simulated actor fits every model."""
        raise AssertionError("a simulated actor fits every model")

    given = list(scheduler.dispatch(start, stop))
    while True:
        for actor, unit, moved in given:
            cells = sum(cell_seconds(c) for c in unit.model.cells)
            load = load_seconds(unit.model) if moved else 0.0
            free[actor] += cells + load
            work, loads = work + cells, loads + load
        if not scheduler.running:
            break
        actor = min(scheduler.running, key=lambda a: (free[a], a))
        for i in range(len(scheduler.running[actor].unit.model.cells)):
            scheduler.finished(actor, i)
        given = list(scheduler.dispatch(start, stop))
    makespan = max(free.values(), default=actor_start)
    return {"makespan": makespan, "cell_seconds": work, "load_seconds": loads,
            "efficiency": work / (slots * makespan) if makespan else 1.0}


__all__ = ["UNPLACED", "Assignment", "Running", "Scheduler", "Unit", "pick", "simulate", "subplan", "units"]
