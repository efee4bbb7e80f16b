"""Run a plan on Ray: actors that each hold one model session.

A model's cells are cut into units: the one-shot cells that share statistics form one
unit, every other cell is its own. An idle actor takes the next unit of the model it
holds, and when that model has none left, a unit of the model with the most units left
per actor (so more GPUs than models spread a model over several actors, and actors
whose model is done help with the longest one). An actor loads a model once and keeps
it for the next unit of the same model, restores the dense weights in memory between cells as the local
executor does, and returns one ``CellResult`` per call; only the driver writes the
leaderboard, so workers need no shared file system.

What travels: the planned cells (specs, plugin instances, row templates) and the
calibration windows the preflight cut (once, through the object store). Evaluation
token streams are rebuilt on the worker: deterministic, and cached on each node.

An actor that dies (out of memory, a lost node, ``ray.kill``) has its unfinished cells
retried on a fresh actor, up to ``max_retries`` times, then recorded as failed with the
reason; the other actors go on. On any exit, Ctrl-C included, the driver kills its
actors, and shuts Ray down if it started it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError
from ..util import first_line
from .events import Events
from .plan import ModelPlan, Plan, PlannedCell
from .session import CellResult, ModelSession, Windows, describe, headless

ADDRESS_ENV = "RAY_ADDRESS"


def import_ray():
    """The ``ray`` module, or a ConfigError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError("the Ray executor needs Ray: pip install 'stadebench[ray]' "
                          "(or run without --executor ray)") from None
    return ray


@dataclass
class Unit:
    """Cells of one model that one actor runs in order: a sharing group, or one cell.
    ``attempts`` counts the actor deaths it has been blamed for."""

    model: ModelPlan
    attempts: int = 0


def units(plan: Plan) -> dict[str, deque[Unit]]:
    """Each model's units in plan order, by model spec JSON: the one-shot cells that share
    statistics form one unit (they must meet on one actor), every other cell is its own."""
    out: dict[str, deque[Unit]] = {}
    for model in plan.models:
        atoms: dict[str, list[PlannedCell]] = {}
        for i, c in enumerate(model.cells):
            atoms.setdefault(c.group or f"cell {i}", []).append(c)
        out[model.spec.model_dump_json()] = deque(Unit(_subplan(model, cells)) for cells in atoms.values())
    return out


def pick(queues: dict[str, deque[Unit]], held: str | None, holders: Counter) -> str | None:
    """The model whose next unit an idle actor takes: the one it holds while that has work
    (no reload), else the one with the most units left per actor holding it."""
    if held is not None and queues.get(held):
        return held
    left = [(len(q) / (1 + holders[key]), key) for key, q in queues.items() if q]
    return max(left)[1] if left else None


def simulate(plan: Plan, slots: int, cell_seconds: Callable[[PlannedCell], float],
             load_seconds: Callable[[ModelPlan], float], actor_start: float = 0.0) -> dict[str, float]:
    """The schedule this executor makes of ``plan`` on ``slots`` actors, given each cell's
    cost and each model's load time (e.g. from a leaderboard's recorded seconds): the
    actor free first takes the next unit that ``pick`` gives it, loading when it changes
    model. Returns the makespan, the summed cell seconds, the loads, and the efficiency:
    cell seconds over slots × makespan."""
    queues = units(plan)
    free, held = [actor_start] * max(1, slots), [None] * max(1, slots)
    work = loads = 0.0
    while any(queues.values()):
        k = free.index(min(free))
        key = pick(queues, held[k], Counter(h for i, h in enumerate(held) if i != k))
        unit = queues[key].popleft()
        cells = sum(cell_seconds(c) for c in unit.model.cells)
        load = load_seconds(unit.model) if held[k] != key else 0.0
        free[k] += cells + load
        held[k], work, loads = key, work + cells, loads + load
    makespan = max(free)
    return {"makespan": makespan, "cell_seconds": work, "load_seconds": loads,
            "efficiency": work / (len(free) * makespan) if makespan else 1.0}


class Worker:
    """A Ray actor's state: one model session at a time."""

    def __init__(self, device_type: str, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        headless()
        self.device = torch.device(device_type)  # Ray makes the actor's GPUs cuda:0, cuda:1, ...
        self.session: ModelSession | None = None
        self.held: str | None = None

    def load(self, model: ModelPlan, windows: Windows) -> float:
        """Hold ``model``'s session: loaded, or re-planned when this actor holds it already.
        Returns the seconds spent loading (0 for a re-plan)."""
        key = model.spec.model_dump_json()
        if self.session is not None and self.held == key:
            self.session.replan(model)
            return 0.0
        self.session = None  # free the previous model first
        self.session = ModelSession(model, self.device, windows)
        self.held = key
        return self.session.seconds["load"]

    def run(self, index: int) -> CellResult:
        """Run cell ``index`` of the held plan."""
        return self.session.run(self.session.plan.cells[index])


class RayExecutor:
    """Cells on Ray actors; see the module docstring.

    Args:
        address: a running cluster (``ray://…`` or ``host:port``; default ``$RAY_ADDRESS``);
            None starts a local Ray instance for this run.
        actors: how many actors at most (default: as many as the cluster's resources hold).
        num_gpus: GPUs per actor when a model does not say (default 1 on CUDA, else 0).
        num_cpus: CPUs per actor (and torch threads in it); default 1.
        max_retries: fresh actors a unit gets after its actor died.
        init: extra ``ray.init`` arguments for a local instance (e.g. ``num_cpus=2``).
    """

    name = "ray"

    def __init__(self, address: str | None = None, *, actors: int | None = None, num_gpus: float | None = None,
                 num_cpus: float = 1, max_retries: int = 2, init: dict[str, Any] | None = None):
        self.address = address or os.environ.get(ADDRESS_ENV) or None
        self.actors, self.num_gpus, self.num_cpus = actors, num_gpus, num_cpus
        self.max_retries, self.init = max_retries, dict(init or {})
        self.last: dict[str, Any] = {}
        """What the last run did: actors started, actor deaths, seconds to start Ray."""

    def _gpus(self, model: ModelPlan, device: torch.device) -> float:
        if model.spec.num_gpus is not None:
            return model.spec.num_gpus
        if self.num_gpus is not None:
            return self.num_gpus
        return 1.0 if device.type == "cuda" else 0.0

    def _slots(self, ray, plan: Plan, device: torch.device) -> int:
        total = ray.cluster_resources()
        cpus = int(total.get("CPU", 1) // self.num_cpus) if self.num_cpus else len(plan.todo)
        gpus = min((self._gpus(m, device) for m in plan.models), default=0.0)
        most = max((self._gpus(m, device) for m in plan.models), default=0.0)
        if most > total.get("GPU", 0):
            raise ConfigError(f"a Ray worker needs {most:g} GPU(s) but the cluster has {total.get('GPU', 0):g}; "
                              "lower the models' num_gpus or use a larger cluster")
        slots = min(cpus, int(total.get("GPU", 0) // gpus)) if gpus else cpus
        if self.actors:
            slots = min(slots, self.actors)
        return max(1, slots)

    def run(self, plan: Plan, device: torch.device, windows: Windows, events: Events) -> Iterator[CellResult]:
        """Run every cell of ``plan`` on actors; results arrive in completion order."""
        ray = import_ray()
        if not plan.todo:
            return
        t0 = time.perf_counter()
        started = not ray.is_initialized()
        if started:
            _check_reachable(self.address)
            try:
                ray.init(address=self.address, include_dashboard=False, log_to_driver=False,
                         configure_logging=False, **self.init)
            except (Exception, SystemExit) as exc:  # Ray exits when its head cannot be reached
                where = f"the Ray cluster at {self.address!r}" if self.address else "a local Ray instance"
                reason = (f"exit code {exc.code}" if isinstance(exc, SystemExit)
                          else first_line(str(exc)) or "no reason given")
                with contextlib.suppress(Exception):
                    ray.shutdown()  # a half-made connection keeps threads that would hold the process
                raise ConfigError(f"cannot start or reach {where} ({reason}); check --address "
                                  f"or ${ADDRESS_ENV}") from None
        self.last = {"start_seconds": time.perf_counter() - t0, "actors": 0, "deaths": 0}
        actor_class = ray.remote(Worker)
        live: list[Any] = []
        try:
            yield from self._schedule(ray, actor_class, live, plan, device, windows, events)
        finally:
            for actor in live:
                ray.kill(actor)
            if started:
                ray.shutdown()

    def _schedule(self, ray, actor_class, live: list, plan: Plan, device: torch.device, windows: Windows,
                  events: Events) -> Iterator[CellResult]:
        total, index, slots = len(plan.todo), 0, self._slots(ray, plan, device)
        queues = units(plan)
        windows_ref = ray.put(windows)  # once, whatever the number of actors
        inflight: dict[Any, tuple[_Running, int]] = {}  # ref -> (unit on its actor, cell index; -1: load)
        idle: dict[Any, tuple[str, str | None]] = {}  # actor -> (its name, the model spec it holds)
        holding: dict[Any, str] = {}  # every live actor -> the model it holds or loads
        needs = {m.spec.model_dump_json(): self._gpus(m, device) for m in plan.models}
        gpus_of: dict[Any, float] = {}  # an actor only takes models that need what it reserved

        def fits(actor: Any | None) -> dict[str, deque[Unit]]:
            return {k: q for k, q in queues.items() if actor is None or needs[k] == gpus_of[actor]}

        def give(actor: Any, name: str, key: str) -> None:
            unit = queues[key].popleft()
            if holding.get(actor) != key or unit.attempts:  # say who holds which model when it changes
                events.note(f"{name}: {unit.model.spec.id}" + (f" (retry {unit.attempts})" if unit.attempts else ""))
            holding[actor] = key
            run = _Running(actor, name, unit, set(range(len(unit.model.cells))))
            inflight[actor.load.remote(unit.model, windows_ref)] = (run, -1)
            for i in sorted(run.left):  # an actor runs its calls in order
                inflight[actor.run.remote(i)] = (run, i)

        def dispatch() -> None:
            for actor, (name, held) in list(idle.items()):
                key = pick(fits(actor), held, Counter(v for a, v in holding.items() if a is not actor))
                if key is not None:
                    del idle[actor]
                    give(actor, name, key)
            if any(queues.values()) and idle and len(live) >= slots:  # nothing fits an idle actor:
                actor = next(iter(idle))                             # free its resources for one that fits
                del idle[actor]
                holding.pop(actor, None)
                live.remove(actor)
                ray.kill(actor)
            while len(live) < slots and any(queues.values()):
                key = pick(queues, None, Counter(holding.values()))
                actor = actor_class.options(num_cpus=self.num_cpus, num_gpus=needs[key]).remote(
                    device.type, max(1, int(self.num_cpus)))
                live.append(actor)
                gpus_of[actor] = needs[key]
                self.last["actors"] += 1
                give(actor, f"worker {self.last['actors']}", key)

        def drop(run: _Running) -> list[PlannedCell]:
            for ref in [r for r, (other, _) in inflight.items() if other is run]:
                del inflight[ref]
            return [run.unit.model.cells[i] for i in sorted(run.left)]

        dispatch()
        while inflight:
            [ref], _ = ray.wait(list(inflight), num_returns=1)
            run, i = inflight.pop(ref)
            key = run.unit.model.spec.model_dump_json()
            try:
                value = ray.get(ref)
            except ray.exceptions.RayActorError as exc:  # the actor died: every call it held fails alike
                live.remove(run.actor)
                holding.pop(run.actor, None)
                self.last["deaths"] += 1
                cells, unit = drop(run), run.unit
                reason = first_line(str(exc)) or "no reason given"
                # calls run in order: the first unfinished cell was running (or, before the load
                # returned, the load was); only that one is blamed, the others go on unblamed
                blamed, spared = (cells, []) if not run.loaded else (cells[:1], cells[1:])
                events.note(f"{run.name} died ({reason}); {len(cells)} unfinished cell(s) go to fresh workers")
                if spared:
                    queues[key].appendleft(Unit(_subplan(unit.model, spared), unit.attempts))
                if unit.attempts < self.max_retries:
                    queues[key].appendleft(Unit(_subplan(unit.model, blamed), unit.attempts + 1))
                else:
                    for cell in blamed:
                        index += 1
                        events.cell_start(cell, index, total)
                        yield CellResult(cell, error=f"the Ray worker died {unit.attempts + 1} time(s) running "
                                                     f"this cell; last: {reason}")
            except ray.exceptions.RayTaskError as exc:  # loading failed (a cell never raises): its cells fail
                cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else exc
                for cell in drop(run):
                    index += 1
                    events.cell_start(cell, index, total)
                    yield CellResult(cell, error=describe(cause))
                idle[run.actor] = (run.name, None)
                holding.pop(run.actor, None)
            else:
                if i < 0:
                    run.load, run.loaded = value, True
                    if value:
                        events.note(f"{run.name}: loaded {run.unit.model.spec.id} in {value:.1f} s")
                else:
                    run.left.discard(i)
                    index += 1
                    events.cell_start(value.cell, index, total)
                    value.seconds["load"], run.load = run.load, 0.0
                    yield value
                    if not run.left:
                        idle[run.actor] = (run.name, key)
            dispatch()
        for unit in [u for q in queues.values() for u in q]:  # never silently: what could not be placed fails
            for cell in unit.model.cells:
                index += 1
                events.cell_start(cell, index, total)
                yield CellResult(cell, error="no Ray worker could be placed for this model's resources")


@dataclass
class _Running:
    actor: Any
    name: str
    unit: Unit
    left: set[int]
    load: float = 0.0
    loaded: bool = False


def _subplan(model: ModelPlan, cells: list[PlannedCell]) -> ModelPlan:
    groups = {key: g for key, g in model.groups.items() if any(c.group == key for c in cells)}
    return ModelPlan(model.spec, model.identity, cells, groups)


def _check_reachable(address: str | None) -> None:
    """Refuse a ``host:port`` (or ``ray://host:port``) that does not accept a connection
    within 5 s: Ray itself waits minutes for an absent head, then exits."""
    if not address or address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"Ray address {address!r} is not host:port or ray://host:port")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise ConfigError(f"nothing answers at the Ray address {address!r} ({exc.strerror or exc}); start the "
                          f"head (`ray start --head`) or fix --address / ${ADDRESS_ENV}") from None


__all__ = ["RayExecutor", "Unit", "Worker", "import_ray", "pick", "simulate", "units"]
