"""Run a plan on Ray: actors that each hold one model session.

``RayExecutor`` starts actors (``Worker``), sends each the units its ``Scheduler`` gives it
(``stadebench.runner.scheduler``: which actor runs which cells, retries after an actor
dies), and turns the actors' answers into ``CellResult``s; only the driver writes the
leaderboard. docs/ray.md explains the placement, what travels and the retries.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import time
from collections.abc import Iterator
from typing import Any

import torch

from ..errors import ConfigError
from ..util import first_line
from .events import Events
from .plan import ModelPlan, Plan, PlannedCell
from .scheduler import UNPLACED, Running, Scheduler, Unit
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
    """Cells on Ray actors, placed by a ``Scheduler``; see docs/ray.md.

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
        if self.address:
            parse_address(self.address)  # a malformed address is refused before anything runs
        self.actors, self.num_gpus, self.num_cpus = actors, num_gpus, num_cpus
        self.max_retries, self.init = max_retries, dict(init or {})
        self.last: dict[str, Any] = {}
        """What the last run did: actors started, actor deaths, seconds to start Ray."""

    def check(self) -> None:
        """Refuse, before anything runs, an address whose head does not answer (see
        ``_check_reachable``); nothing to check when Ray is already initialised here."""
        if not import_ray().is_initialized():
            _check_reachable(self.address)

    def _gpus(self, model: ModelPlan, device: torch.device) -> float:
        """The GPUs an actor holding ``model`` reserves."""
        if model.spec.num_gpus is not None:
            return model.spec.num_gpus
        if self.num_gpus is not None:
            return self.num_gpus
        return 1.0 if device.type == "cuda" else 0.0

    def _slots(self, ray, plan: Plan, device: torch.device) -> int:
        """How many actors the cluster holds at once for ``plan`` (a ConfigError if none can)."""
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
        driver = _Driver(self, ray, device, events)
        try:
            yield from driver.results(plan, windows)
        finally:
            driver.stop_all()
            if started:
                ray.shutdown()


class _Driver:
    """One run's Ray side: starts and stops the actors its ``Scheduler`` asks for, sends them
    their units, and turns what comes back into results, in completion order."""

    def __init__(self, executor: RayExecutor, ray, device: torch.device, events: Events):
        self.executor, self.ray, self.device, self.events = executor, ray, device, events
        self.actor_class = ray.remote(Worker)
        self.scheduler: Scheduler | None = None
        self.inflight: dict[Any, tuple[Any, Running, int]] = {}  # ref -> (actor, its unit, cell; -1: the load)
        self.names: dict[Any, str] = {}  # actor -> its name in notes
        self.windows_ref: Any = None
        self.index = self.total = 0

    def results(self, plan: Plan, windows: Windows) -> Iterator[CellResult]:
        """Every cell of ``plan``'s result; a cell no actor could be placed for fails."""
        ex = self.executor
        self.total = len(plan.todo)
        slots = ex._slots(self.ray, plan, self.device)
        self.scheduler = Scheduler(plan, slots, lambda m: ex._gpus(m, self.device), ex.max_retries)
        self.windows_ref = self.ray.put(windows)  # once, whatever the number of actors
        self._dispatch()
        while self.inflight:
            [ref], _ = self.ray.wait(list(self.inflight), num_returns=1)
            actor, run, i = self.inflight.pop(ref)
            try:
                value = self.ray.get(ref)
            except self.ray.exceptions.RayActorError as exc:  # the actor died: every call it held fails alike
                yield from self._died(actor, exc)
            except self.ray.exceptions.RayTaskError as exc:  # loading failed (a cell never raises)
                yield from self._load_failed(actor, exc)
            else:
                yield from self._returned(actor, run, i, value)
            self._dispatch()
        for cell in self.scheduler.unplaced():  # never silently: what could not be placed fails
            yield self._failed(cell, UNPLACED)

    def stop_all(self) -> None:
        """Kill every live actor."""
        for actor in self.scheduler.live if self.scheduler else []:
            self.ray.kill(actor)

    def _dispatch(self) -> None:
        """Start, stop and feed actors as the scheduler says."""
        for actor, unit, moved in self.scheduler.dispatch(self._start, self.ray.kill):
            if moved or unit.attempts:  # say who holds which model when it changes
                retry = f" (retry {unit.attempts})" if unit.attempts else ""
                self.events.note(f"{self.names[actor]}: {unit.model.spec.id}{retry}")
            self._send(actor, unit)

    def _start(self, gpus: float) -> Any:
        """A fresh actor reserving ``gpus`` GPUs."""
        ex = self.executor
        actor = self.actor_class.options(num_cpus=ex.num_cpus, num_gpus=gpus).remote(
            self.device.type, max(1, int(ex.num_cpus)))
        ex.last["actors"] += 1
        self.names[actor] = f"worker {ex.last['actors']}"
        return actor

    def _send(self, actor: Any, unit: Unit) -> None:
        """Queue ``unit``'s load and cells on ``actor`` (an actor runs its calls in order, but
        ``ray.wait`` may hand their results back in another)."""
        run = self.scheduler.running[actor]
        self.inflight[actor.load.remote(unit.model, self.windows_ref)] = (actor, run, -1)
        for i in range(len(unit.model.cells)):
            self.inflight[actor.run.remote(i)] = (actor, run, i)

    def _returned(self, actor: Any, run: Running, i: int, value: Any) -> Iterator[CellResult]:
        """``actor``'s load of ``run`` (``i`` < 0: ``value`` its seconds) or its cell ``i`` (the result) returned."""
        if i < 0:
            self.scheduler.loaded(actor, run)
            run.load = value
            if value:
                self.events.note(f"{self.names[actor]}: loaded {run.unit.model.spec.id} in {value:.1f} s")
            return
        self.scheduler.finished(actor, i)
        self.index += 1
        self.events.cell_start(value.cell, self.index, self.total)
        value.seconds["load"], run.load = run.load, 0.0
        yield value

    def _died(self, actor: Any, exc: Exception) -> Iterator[CellResult]:
        """``actor`` died: its unfinished cells go back to the scheduler; those out of retries fail."""
        self.executor.last["deaths"] += 1
        reason = first_line(str(exc)) or "no reason given"
        left = len(self.scheduler.running[actor].left)
        self._drop(actor)
        failed = self.scheduler.died(actor, reason)
        self.events.note(f"{self.names[actor]} died ({reason}); {left} unfinished cell(s) go to fresh workers")
        for cell, error in failed:
            yield self._failed(cell, error)

    def _load_failed(self, actor: Any, exc: Exception) -> Iterator[CellResult]:
        """``actor`` could not load its unit's model: the unit's cells fail with the cause."""
        cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else exc
        self._drop(actor)
        for cell in self.scheduler.load_failed(actor):
            yield self._failed(cell, describe(cause))

    def _drop(self, actor: Any) -> None:
        """Forget ``actor``'s calls in flight."""
        for ref in [r for r, (other, _, _) in self.inflight.items() if other is actor]:
            del self.inflight[ref]

    def _failed(self, cell: PlannedCell, error: str) -> CellResult:
        """A failed result of ``cell``, counted as the next one."""
        self.index += 1
        self.events.cell_start(cell, self.index, self.total)
        return CellResult(cell, error=error)


PROBE_SECONDS = 5.0
"""How long the address check waits for the head to accept a connection, then to answer."""
# The client half of an HTTP/2 greeting (connection preface and an empty SETTINGS frame):
# a Ray head (GCS or Ray client server, both gRPC) answers it with its own SETTINGS frame.
_HTTP2_HELLO = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,252})|\[[0-9A-Fa-f:.]{2,45}(?:%[A-Za-z0-9_.-]{1,32})?\]")
_SHOWN = 80  # characters of an address quoted in a message


def _shown(address: str) -> str:
    """``address`` quoted for a message: control characters escaped, a long one cut."""
    if len(address) <= _SHOWN:
        return repr(address)
    return f"{address[:_SHOWN]!r}… ({len(address)} characters)"


def parse_address(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of a ``host:port`` or ``ray://host:port`` address (IPv6 in
    brackets), None for ``auto`` and ``local``; a ConfigError for any other form."""
    if address in ("auto", "local"):
        return None
    host, _, port = address.removeprefix("ray://").rpartition(":")
    labels = host.split(".")
    if not (_HOST.fullmatch(host) and all(len(label) < 64 for label in labels) and all(labels[:-1])
            and re.fullmatch(r"[0-9]{1,5}", port) and 0 < int(port) < 65536):
        raise ConfigError(f"Ray address {_shown(address)} is not host:port or ray://host:port (a host name or IP "
                          f"address, a port 1-65535), auto or local; fix --address or ${ADDRESS_ENV}")
    return host.removeprefix("[").removesuffix("]"), int(port)


def _check_reachable(address: str | None) -> None:
    """Refuse an address that is malformed, that does not accept a connection within
    PROBE_SECONDS, or that accepts one but does not answer a gRPC greeting within
    PROBE_SECONDS more: Ray itself waits minutes for an absent or mute head."""
    where = parse_address(address) if address else None
    if where is None:
        return
    fix = f"start the head (`ray start --head`) or fix --address / ${ADDRESS_ENV}"
    try:
        sock = socket.create_connection(where, timeout=PROBE_SECONDS)
    except TimeoutError:
        raise ConfigError(f"the Ray address {_shown(address)} did not accept a connection within "
                          f"{PROBE_SECONDS:g} s; {fix}") from None
    except (OSError, ValueError) as exc:  # ValueError: UnicodeError of an impossible host name
        raise ConfigError(f"nothing answers at the Ray address {_shown(address)} "
                          f"({getattr(exc, 'strerror', None) or exc}); {fix}") from None
    try:
        with sock:
            sock.settimeout(PROBE_SECONDS)
            sock.sendall(_HTTP2_HELLO)
            answer = sock.recv(1)
    except TimeoutError:
        raise ConfigError(f"the Ray address {_shown(address)} accepted a connection but did not answer within "
                          f"{PROBE_SECONDS:g} s: it is not a Ray head, or the head is stuck; {fix}") from None
    except OSError as exc:
        answer, reason = b"", exc.strerror or str(exc)
    else:
        reason = "it closed the connection"
    if not answer:
        raise ConfigError(f"the Ray address {_shown(address)} accepted a connection but did not answer ({reason}): "
                          f"it is not a Ray head; {fix}")


__all__ = ["PROBE_SECONDS", "RayExecutor", "Worker", "import_ray", "parse_address"]
