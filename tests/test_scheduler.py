"""The Ray executor's placement rule without Ray: units, ``pick``, the ``Scheduler`` driven by
hand with integer actors, and ``simulate`` (which drives the same class) on known cases."""

from __future__ import annotations

from collections import Counter, deque
from types import SimpleNamespace

import pytest

from stadebench.runner.plan import ModelPlan, Plan
from stadebench.runner.scheduler import UNPLACED, Scheduler, pick, simulate, units
from stadebench.suite import ModelSpec


def cell(label: str, group: str | None = None, seconds: float = 10.0) -> SimpleNamespace:
    """A stand-in planned cell: what the scheduler reads (its group) and a label."""
    return SimpleNamespace(label=label, group=group, seconds=seconds)


def model(name: str, *cells: SimpleNamespace, gpus: float | None = None) -> ModelPlan:
    """A model plan of stand-in cells, with a stand-in sharing group per group named."""
    groups = {c.group: SimpleNamespace(cells=0) for c in cells if c.group}
    return ModelPlan(ModelSpec(id=name, num_gpus=gpus), None, list(cells), groups)


def make(*models: ModelPlan) -> Plan:
    return Plan(None, list(models), sum(len(m.cells) for m in models), 0)


def key(name: str, gpus: float | None = None) -> str:
    return ModelSpec(id=name, num_gpus=gpus).model_dump_json()


class Fleet:
    """Integer actors for ``Scheduler.dispatch``: records what was started and stopped."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler, self.started, self.stopped = scheduler, [], []

    def start(self, gpus: float) -> int:
        self.started.append(gpus)
        return len(self.started) - 1

    def stop(self, actor: int) -> None:
        self.stopped.append(actor)

    def dispatch(self) -> list[tuple[int, str, list[str], bool]]:
        """(actor, model id, cell labels, moved) for each assignment, in order."""
        return [(a, u.model.spec.id, [c.label for c in u.model.cells], moved)
                for a, u, moved in self.scheduler.dispatch(self.start, self.stop)]

    def finish(self, actor: int) -> None:
        """``actor`` loads its model and returns every cell of its unit."""
        run = self.scheduler.running[actor]
        self.scheduler.loaded(actor)
        done = [self.scheduler.finished(actor, i) for i in range(len(run.unit.model.cells))]
        assert done == [False] * (len(done) - 1) + [True]


def test_one_shot_sharing_groups_are_one_unit_and_other_cells_their_own():
    plan = make(model("a", cell("dense"), cell("wanda", "g"), cell("mag"), cell("stade", "g"), cell("sgpt", "h")),
                model("b", cell("dense")))
    queues = units(plan)
    assert list(queues) == [key("a"), key("b")]
    assert [[c.label for c in u.model.cells] for u in queues[key("a")]] == [
        ["dense"], ["wanda", "stade"], ["mag"], ["sgpt"]]
    assert [sorted(u.model.groups) for u in queues[key("a")]] == [[], ["g"], [], ["h"]]
    assert all(u.attempts == 0 and u.model.spec.id == "a" for u in queues[key("a")])
    assert [[c.label for c in u.model.cells] for u in queues[key("b")]] == [["dense"]]


def test_pick_keeps_the_held_model_while_it_has_work_else_most_units_per_holder():
    queues = {"a": deque([1]), "b": deque([1, 2, 3, 4]), "c": deque([1, 2, 3])}
    assert pick(queues, "a", Counter({"b": 9})) == "a"
    assert pick(queues, None, Counter({"b": 3, "c": 0})) == "c"  # 4/4 < 3/1
    assert pick(queues, "a", Counter({"b": 1, "c": 2})) == "a"
    assert pick({**queues, "a": deque()}, "a", Counter({"b": 1, "c": 2})) == "b"  # 4/2 > 3/3
    assert pick({"a": deque()}, "a", Counter()) is None


def test_an_idle_actor_keeps_its_model_while_it_has_work_then_helps_the_model_with_most_per_holder():
    plan = make(model("a", cell("a0"), cell("a1")), model("b", *(cell(f"b{i}") for i in range(6))))
    scheduler = Scheduler(plan, slots=3)
    fleet = Fleet(scheduler)
    # b: 6/1 > a: 2/1; then b: 5/2 = 2.5 > a: 2; then a: 2 > b: 4/3
    assert fleet.dispatch() == [(0, "b", ["b0"], True), (1, "b", ["b1"], True), (2, "a", ["a0"], True)]
    assert fleet.started == [0.0, 0.0, 0.0] and scheduler.live == [0, 1, 2]
    fleet.finish(2)
    assert scheduler.idle == {2: key("a")}
    assert fleet.dispatch() == [(2, "a", ["a1"], False)]  # keeps a although b has 4/2 per holder
    fleet.finish(2)
    assert fleet.dispatch() == [(2, "b", ["b2"], True)]  # a is done: moves to b
    fleet.finish(0)
    fleet.finish(1)
    assert fleet.dispatch() == [(0, "b", ["b3"], False), (1, "b", ["b4"], False)]
    assert fleet.stopped == [] and len(fleet.started) == 3


def test_a_free_slot_starts_an_actor_for_the_model_with_most_units_per_holder():
    plan = make(model("a", cell("a0")), model("b", cell("b0"), cell("b1")), model("c", cell("c0"), cell("c1"),
                                                                                  cell("c2")))
    scheduler = Scheduler(plan, slots=2)
    fleet = Fleet(scheduler)
    assert fleet.dispatch() == [(0, "c", ["c0"], True), (1, "b", ["b0"], True)]  # c: 3; then b: 2 > c: 2/2
    fleet.finish(0)
    assert fleet.dispatch() == [(0, "c", ["c1"], False)]
    fleet.finish(1)
    fleet.finish(0)
    assert fleet.dispatch() == [(1, "b", ["b1"], False), (0, "c", ["c2"], False)]
    fleet.finish(1)
    fleet.finish(0)
    assert fleet.dispatch() == [(1, "a", ["a0"], True)]
    fleet.finish(1)
    assert fleet.dispatch() == [] and not scheduler.waiting and not scheduler.running
    assert scheduler.unplaced() == [] and scheduler.idle == {0: key("c"), 1: key("a")}


def test_an_idle_actor_that_fits_no_waiting_model_is_stopped_for_one_that_does():
    plan = make(model("a", cell("a0"), gpus=1), model("b", cell("b0"), cell("b1"), gpus=2))
    scheduler = Scheduler(plan, slots=1, gpus=lambda m: m.spec.num_gpus)
    fleet = Fleet(scheduler)
    assert fleet.dispatch() == [(0, "b", ["b0"], True)]
    fleet.finish(0)
    assert fleet.dispatch() == [(0, "b", ["b1"], False)]
    fleet.finish(0)
    assert fleet.dispatch() == [(1, "a", ["a0"], True)]
    assert fleet.stopped == [0] and fleet.started == [2, 1] and scheduler.live == [1]
    assert scheduler.gpus_of == {1: 1} and scheduler.holding == {1: key("a", 1)}


def test_a_death_before_the_load_returned_blames_every_cell_of_the_unit():
    plan = make(model("a", cell("w", "g"), cell("s", "g"), cell("d")))
    scheduler = Scheduler(plan, slots=1, max_retries=2)
    fleet = Fleet(scheduler)
    assert fleet.dispatch() == [(0, "a", ["w", "s"], True)]
    assert scheduler.died(0, "out of memory") == []
    assert scheduler.live == [] and scheduler.holding == {} and scheduler.running == {}
    assert [([c.label for c in u.model.cells], u.attempts, sorted(u.model.groups))
            for u in scheduler.queues[key("a")]] == [(["w", "s"], 1, ["g"]), (["d"], 0, [])]
    assert fleet.dispatch() == [(1, "a", ["w", "s"], True)]  # a fresh actor, the retry first
    assert scheduler.running[1].unit.attempts == 1


def test_a_death_after_the_load_blames_the_running_cell_and_spares_those_behind_it():
    plan = make(model("a", cell("w", "g"), cell("s", "g"), cell("x", "g")))
    scheduler = Scheduler(plan, slots=1, max_retries=2)
    fleet = Fleet(scheduler)
    fleet.dispatch()
    scheduler.loaded(0)
    assert scheduler.finished(0, 0) is False
    assert scheduler.died(0, "killed") == []
    assert [([c.label for c in u.model.cells], u.attempts) for u in scheduler.queues[key("a")]] == [
        (["s"], 1), (["x"], 0)]


def test_a_dead_actors_cell_is_retried_up_to_max_retries_then_failed_with_the_reason():
    plan = make(model("a", cell("die"), cell("ok")))
    scheduler = Scheduler(plan, slots=1, max_retries=2)
    fleet = Fleet(scheduler)
    assert fleet.dispatch() == [(0, "a", ["die"], True)]
    for attempt in (1, 2):
        scheduler.loaded(attempt - 1)
        assert scheduler.died(attempt - 1, f"death {attempt}") == []
        assert fleet.dispatch() == [(attempt, "a", ["die"], True)]
        assert scheduler.running[attempt].unit.attempts == attempt
    scheduler.loaded(2)
    failed = scheduler.died(2, "death 3")
    assert [(c.label, error) for c, error in failed] == [
        ("die", "the Ray worker died 3 time(s) running this cell; last: death 3")]
    assert fleet.dispatch() == [(3, "a", ["ok"], True)]  # the rest goes on
    fleet.finish(3)
    assert fleet.dispatch() == [] and scheduler.unplaced() == []


def test_max_retries_zero_fails_at_the_first_death():
    scheduler = Scheduler(make(model("a", cell("c"))), slots=1, max_retries=0)
    Fleet(scheduler).dispatch()
    assert [(c.label, e) for c, e in scheduler.died(0, "lost node")] == [
        ("c", "the Ray worker died 1 time(s) running this cell; last: lost node")]


def test_a_failed_load_returns_the_units_cells_and_leaves_the_actor_idle_holding_nothing():
    plan = make(model("a", cell("a0", "g"), cell("a1", "g"), cell("a2"), cell("a3")), model("b", cell("b0"),
                                                                                          cell("b1")))
    scheduler = Scheduler(plan, slots=2)
    fleet = Fleet(scheduler)
    assert fleet.dispatch() == [(0, "a", ["a0", "a1"], True), (1, "b", ["b0"], True)]
    assert [c.label for c in scheduler.load_failed(0)] == ["a0", "a1"]
    assert scheduler.idle == {0: None} and scheduler.holding == {1: key("b")} and scheduler.live == [0, 1]
    assert fleet.dispatch() == [(0, "a", ["a2"], True)]  # a: 2/1 > b: 1/2; it holds nothing: a load again


def test_units_left_waiting_are_unplaced():
    scheduler = Scheduler(make(model("a", cell("a0"), cell("a1", "g"), cell("a2", "g"))), slots=1)
    assert [c.label for c in scheduler.unplaced()] == ["a0", "a1", "a2"] and UNPLACED.startswith("no Ray worker")


def test_simulate_gives_the_makespan_of_a_known_schedule():
    plan = make(model("a", *(cell(f"a{i}") for i in range(4))), model("b", cell("b0", seconds=5.0)))
    cost, load = (lambda c: c.seconds), (lambda m: 1.0)
    # actor 0: a0, a2, then b0 (a reload); actor 1: a1, a3
    assert simulate(plan, 2, cost, load) == {"makespan": 27.0, "cell_seconds": 45.0, "load_seconds": 3.0,
                                             "efficiency": 45 / 54}
    assert simulate(plan, 1, cost, load) == {"makespan": 47.0, "cell_seconds": 45.0, "load_seconds": 2.0,
                                             "efficiency": 45 / 47}
    five = simulate(plan, 5, cost, load, actor_start=10.0)  # idle slots count against the efficiency
    assert five == {"makespan": 21.0, "cell_seconds": 45.0, "load_seconds": 5.0, "efficiency": 45 / 105}


@pytest.mark.parametrize("slots", [0, 1])
def test_simulate_of_an_empty_plan(slots):
    assert simulate(make(), slots, lambda c: 1.0, lambda m: 1.0, actor_start=3.0) == {
        "makespan": 3.0, "cell_seconds": 0.0, "load_seconds": 0.0, "efficiency": 0.0}


def test_a_load_seen_after_its_units_cells_marks_that_unit_not_the_actors_next():
    # ray.wait may hand back an actor's results out of call order: the load of its first unit
    # can be seen after that unit's cells, when the actor already runs its second unit
    scheduler = Scheduler(make(model("a", cell("dense"), cell("mag"))), slots=1)
    fleet = Fleet(scheduler)
    assert fleet.dispatch() == [(0, "a", ["dense"], True)]
    first = scheduler.running[0]
    assert scheduler.finished(0, 0)  # the cell came back before its load
    assert fleet.dispatch() == [(0, "a", ["mag"], False)]
    second = scheduler.running[0]
    scheduler.loaded(0, first)
    assert first.loaded and not second.loaded
    # so a death now blames the whole second unit (its load had not returned)
    assert scheduler.died(0, "oom") == []
    assert [[c.label for c in u.model.cells] for u in scheduler.queues[key("a")]] == [["mag"]]
    assert scheduler.queues[key("a")][0].attempts == 1
