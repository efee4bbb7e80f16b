"""From a suite to a plan: what runs, under which key, and what is shared.

``plan`` is pure: given a validated suite (its plugins already resolved into instances),
the identities of its models and the keys the leaderboard already holds, it returns every
cell with the evaluations it still lacks, each evaluation's row template (whose key is
the result's identity), the groups of one-shot cells that share one statistics pass, and
a relative cost per cell. ``make_plan`` gathers those inputs (reads the leaderboard,
fingerprints local weights, resolves Hub commits) and calls it. Executors run plans.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..base import Allocator, Evaluator, Metric, Pattern, Reconstructor, Refiner
from ..data.loading import ModelIdentity, identify
from ..errors import PluginError, StadebenchError
from ..results.row import SOURCES, Row, meta
from ..suite import CalibrationSpec, Cell, DatasetSpec, EvaluationSpec, ModelSpec, Suite, expand, select


@dataclass(frozen=True)
class Pending:
    """One evaluation a cell still lacks.

    Attributes:
        spec: the suite's evaluation entry.
        evaluator: its evaluator instance (one per entry, shared by every cell).
        template: the row every score of this evaluation starts from: key fields and
            the plugins' provenance filled in; its ``key()`` is the result's identity.
    """

    spec: EvaluationSpec
    evaluator: Evaluator
    template: Row

    @property
    def key(self) -> str:
        return self.template.key()


@dataclass
class PlannedCell:
    """One cell to run: a model pruned one way, then the evaluations it lacks.

    Attributes:
        cell: the suite's cell (labels, specs).
        metric: the metric instance; None for the dense baseline.
        pattern: the pattern instance; None for the dense baseline.
        calibration: the calibration protocol when the metric or the allocator reads data,
            else None.
        pending: the evaluations to run, in suite order.
        group: key of the statistics group it shares (one-shot cells only), else None.
        allocator: the allocator instance; None for the dense baseline.
        refiner, reconstructor: the stage instances after the metric; None where there is none.
        prune_key: the key of the pruned model itself (model, pruning and calibration
            fields, no evaluation): names its saved folder and goes into its model card.
        cost: relative cost for scheduling: calibration tokens times block passes
            (0 for dense and data-free cells; one pass per group is split among its cells).
    """

    cell: Cell
    metric: Metric | None
    pattern: Pattern | None
    calibration: CalibrationSpec | None
    pending: list[Pending]
    group: str | None = None
    cost: float = 0.0
    allocator: Allocator | None = None
    prune_key: str | None = None
    refiner: Refiner | None = None
    reconstructor: Reconstructor | None = None

    @property
    def label(self) -> str:
        return self.cell.label

    @property
    def statistics(self) -> frozenset[str]:
        """What pruning reads: the metric's statistics and its stages' (empty for dense)."""
        return self.cell.statistics

    @property
    def save_folder(self) -> Path | None:
        """Where the pruned model is saved: ``save`` itself (``save_exact``) or a subfolder
        named after the cell (``runner.save.folder_name``); None when it is not saved."""
        c = self.cell
        if c.dense or not c.save:
            return None
        if c.save_exact:
            return Path(c.save)
        from .save import folder_name

        return Path(c.save) / folder_name(c.model.id, c.metric_label, c.pattern, c.sparsity, c.allocation_label,
                                          self.prune_key)

    @property
    def model(self) -> ModelSpec:
        return self.cell.model


@dataclass(frozen=True)
class SharingGroup:
    """One-shot cells of one model and calibration: one dense statistics pass serves all.

    Attributes:
        calibration: the protocol they share.
        needs: the union of their metrics' statistics.
        cells: how many cells use it (the statistics are freed after the last).
    """

    calibration: CalibrationSpec
    needs: frozenset[str]
    cells: int


@dataclass
class ModelPlan:
    """The cells of one model, loaded once."""

    spec: ModelSpec
    identity: ModelIdentity
    cells: list[PlannedCell]
    groups: dict[str, SharingGroup] = field(default_factory=dict)


@dataclass
class Plan:
    """What a run will do. ``cells`` counts the suite's selected cells, ``skipped`` those
    with nothing left to run; ``notes`` says which optional evaluations are skipped and why."""

    suite: Suite
    models: list[ModelPlan]
    cells: int
    skipped: int
    notes: list[str] = field(default_factory=list)

    @property
    def todo(self) -> list[PlannedCell]:
        return [c for m in self.models for c in m.cells]


def calibration_key(calibration: CalibrationSpec) -> str:
    """Identifies a calibration protocol within a run (windows and shared statistics)."""
    return calibration.model_dump_json()


@dataclass(frozen=True)
class Sources:
    """What a planned row is filled from; each Row field names its own path in here
    (``results.row.SOURCES``, e.g. ``cell.calibration.n`` for ``calib_n``)."""

    cell: Cell
    identity: ModelIdentity
    evaluation: EvaluationSpec | None = None
    calibration_fingerprint: str | None = None
    evaluation_fingerprint: str | None = None

    @property
    def eval_options(self) -> dict[str, Any] | None:
        """The evaluator's options, defaults filled in."""
        if self.evaluation is None:
            return None
        return self.evaluation.resolved.instance.options.model_dump(mode="json")

    @property
    def eval_dataset(self) -> str | None:
        """The name of the dataset the evaluation reads."""
        dataset = (self.eval_options or {}).get("dataset")
        return dataset.get("name") if isinstance(dataset, dict) else dataset

    def value(self, path: str) -> Any:
        """The value at a dotted ``path``: attributes, then mapping keys (a missing key, or
        anything under None, is None)."""
        value: Any = self
        for part in path.split("."):
            if value is None:
                return None
            value = value.get(part) if isinstance(value, dict) else getattr(value, part)
        return value

    def fields(self, *groups: str) -> dict[str, Any]:
        """Every Row field of ``groups`` that has a source, read from here; a dense cell
        fills only the pruning fields marked ``dense``."""
        out = {}
        for name, path in SOURCES.items():
            if meta(name, "group") not in groups or (self.cell.dense and meta(name, "group") == "pruning"
                                                     and not meta(name, "dense")):
                continue
            value = self.value(path)
            if meta(name, "empty_null") and not value:
                value = None
            out[name] = list(value) if isinstance(value, tuple) else value
        return out


def uses_data(cell: Cell) -> bool:
    """Whether the cell reads calibration data: its metric or its allocator does."""
    return cell.uses_data


Fingerprints = Callable[[DatasetSpec | EvaluationSpec], str | None]
"""The fingerprint of the data a resolved dataset or evaluation entry reads."""


def _fingerprint(spec: DatasetSpec | EvaluationSpec) -> str | None:
    try:
        return spec.resolved.instance.fingerprint()
    except StadebenchError:
        raise
    except Exception as exc:  # plugin code: say whose
        who = spec.resolved.who("dataset" if isinstance(spec, DatasetSpec) else "evaluator", spec.name)
        raise PluginError(f"{who}: fingerprint() raised {type(exc).__name__}: {exc}") from None


def _planned(cell: Cell, identity: ModelIdentity, fingerprints: Fingerprints, done: set[str],
             skip: set[str]) -> PlannedCell:
    data = uses_data(cell)
    sources = Sources(cell, identity, calibration_fingerprint=fingerprints(cell.calibration.dataset) if data else None)
    base = sources.fields("model", "pruning", *(["calibration"] if data else []))
    pending = []
    for evaluation in cell.evaluations:
        if evaluation.model_dump_json() in skip:
            continue
        evaluated = dataclasses.replace(sources, evaluation=evaluation, evaluation_fingerprint=fingerprints(evaluation))
        row = Row(**base, **evaluated.fields("evaluation"))
        item = Pending(evaluation, evaluation.resolved.instance, row)
        if item.key not in done:
            pending.append(item)
    return PlannedCell(cell, None if cell.dense else cell.metric_plugin.instance,
                       None if cell.dense else cell.pattern_plugin.instance,
                       cell.calibration if data else None, pending,
                       allocator=None if cell.dense else cell.allocation_plugin.instance, prune_key=Row(**base).key(),
                       refiner=cell.refine_plugin and cell.refine_plugin.instance,
                       reconstructor=cell.reconstruct_plugin and cell.reconstruct_plugin.instance)


def _share(cells: list[PlannedCell]) -> dict[str, SharingGroup]:
    """Groups of one-shot data cells with the same calibration (two or more), and costs."""
    members: dict[str, list[PlannedCell]] = {}
    for c in cells:
        if c.calibration is not None:
            c.cost = 2.0 * c.calibration.n * c.calibration.seqlen
            if not c.calibration.sequential and c.statistics:
                members.setdefault(calibration_key(c.calibration), []).append(c)
    groups = {}
    for key, group in members.items():
        if len(group) < 2:
            continue
        needs = frozenset().union(*(c.statistics for c in group))
        groups[key] = SharingGroup(group[0].calibration, needs, len(group))
        for c in group:
            c.group, c.cost = key, c.calibration.n * c.calibration.seqlen / len(group)
    return groups


def plan(suite: Suite, identities: dict[ModelSpec, ModelIdentity], done: Iterable[str] = (), *,
         only: list[str] | None = None, skip_evaluations: Iterable[str] = (),
         fingerprints: Fingerprints = _fingerprint) -> Plan:
    """The plan of ``suite``: cells selected by ``only`` (``--only`` items), minus the
    (cell, evaluation) keys in ``done`` and the evaluations in ``skip_evaluations``
    (their ``model_dump_json()``). ``fingerprints`` gives the fingerprint of the data a
    calibration dataset or an evaluation reads (default: ask the plugin)."""
    done, skip = set(done), set(skip_evaluations)
    cells = select(expand(suite), only or [])
    models: dict[ModelSpec, ModelPlan] = {}
    for cell in cells:
        planned = _planned(cell, identities[cell.model], fingerprints, done, skip)
        if planned.pending or (cell.save and not cell.evaluations):  # prune-and-save cells re-run every time
            models.setdefault(cell.model, ModelPlan(cell.model, identities[cell.model], [])).cells.append(planned)
    for model in models.values():
        model.groups = _share(model.cells)
    todo = sum(len(m.cells) for m in models.values())
    return Plan(suite, list(models.values()), len(cells), len(cells) - todo)


def make_plan(suite: Suite, folder: str | Path | None = None, *, only: list[str] | None = None,
              force: bool = False) -> Plan:
    """``plan`` with its inputs gathered: the keys finished in the leaderboard ``folder``
    (none with ``force``), the models' identities, and which optional evaluations cannot
    run on this machine (each one noted in ``Plan.notes``)."""
    from ..results import store

    folder = Path(folder or suite.leaderboard)
    done = set() if force else store.finished_cells(folder)
    notes, skip = [], set()
    for e in suite.evaluations:
        reason = e.optional and e.resolved.instance.unavailable()
        if reason:
            skip.add(e.model_dump_json())
            notes.append(f"skipping optional evaluation {e.name} {e.options}: {reason}")
    identities = {m: identify(m) for m in suite.models}
    memo: dict[str, str | None] = {}

    def fingerprint(spec: DatasetSpec | EvaluationSpec) -> str | None:
        key = f"{type(spec).__name__}:{spec.model_dump_json()}"
        if key not in memo:
            memo[key] = _fingerprint(spec)
        return memo[key]

    result = plan(suite, identities, done, only=only, skip_evaluations=skip, fingerprints=fingerprint)
    result.notes = notes
    return result


__all__ = ["ModelPlan", "Pending", "Plan", "PlannedCell", "SharingGroup", "Sources", "calibration_key", "make_plan",
           "plan", "uses_data"]
