"""Cells: a validated suite expanded into units of work, and ``--only`` selection."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from ..errors import ConfigError
from ..util import suggestion
from .schema import (DENSE, NONE, SELECT_FIELDS, UNIFORM, CalibrationSpec, EvaluationSpec, ExcludeRule, MetricSpec,
                     ModelSpec, Resolved, StageSpec, Suite)


class Cell(BaseModel):
    """One unit of work: a model pruned with one metric, pattern and sparsity, then evaluated.

    The dense baseline is a cell with metric ``dense``, no pattern and sparsity 0.
    """

    model_config = ConfigDict(frozen=True)

    model: ModelSpec = Field(description="The model.")
    metric: str = Field(min_length=1, description="Metric name, or `dense`.")
    metric_label: str = Field(description="Metric label in results.")
    metric_options: dict[str, Any] = Field(default_factory=dict, description="Metric options, with defaults.")
    pattern: str | None = Field(None, description="Pattern spec; None for dense.")
    pattern_options: dict[str, Any] = Field(default_factory=dict,
                                            description="Pattern options, with defaults.")
    sparsity: float = Field(0.0, ge=0, lt=1, description="Target sparsity over the pruned layers; 0 for dense.")
    allocation: str | None = Field(None, description="Allocator name; None for dense.")
    allocation_label: str | None = Field(None, description="Allocation label in results.")
    allocation_options: dict[str, Any] = Field(default_factory=dict, description="Allocator options, with "
                                                                                 "defaults.")
    refine: str | None = Field(None, description="Refiner name; None: no refinement (and for dense).")
    refine_label: str | None = Field(None, description="Refiner label in results.")
    refine_options: dict[str, Any] = Field(default_factory=dict, description="Refiner options, with defaults.")
    reconstruct: str | None = Field(None, description="Reconstructor name; None: no reconstruction (and for dense).")
    reconstruct_label: str | None = Field(None, description="Reconstructor label in results.")
    reconstruct_options: dict[str, Any] = Field(default_factory=dict, description="Reconstructor options, with "
                                                                                  "defaults.")
    targets: tuple[str, ...] = Field((), description="Regexes of the layers to prune (empty: all).")
    ignore: tuple[str, ...] = Field((), description="Regexes of the layers left dense.")
    calibration: CalibrationSpec = Field(description="Calibration protocol (unused by dense cells).")
    calibration_varied: tuple[str, ...] = Field((), description="Calibration knobs the suite varies (named in "
                                                                "the label).")
    evaluations: tuple[EvaluationSpec, ...] = Field((), description="Evaluations to run.")
    save: str | None = Field(None, description="Absolute folder to save the pruned model under (None: not "
                                               "saved); not part of the key.")
    save_exact: bool = Field(False, description="Save to `save` itself, not to a subfolder named after the cell.")
    _metric: Resolved | None = PrivateAttr(None)
    _pattern: Resolved | None = PrivateAttr(None)
    _allocation: Resolved | None = PrivateAttr(None)
    _refine: Resolved | None = PrivateAttr(None)
    _reconstruct: Resolved | None = PrivateAttr(None)

    @property
    def dense(self) -> bool:
        """Whether this is the unpruned baseline."""
        return self.metric == DENSE

    @property
    def statistics(self) -> frozenset[str]:
        """What pruning the cell reads: its metric's statistics and its stages'."""
        stages = [r.instance for r in (self._refine, self._reconstruct) if r is not None]
        return frozenset() if self.dense else frozenset(self._metric.instance.statistics).union(
            *(s.statistics for s in stages))

    @property
    def uses_data(self) -> bool:
        """Whether the cell reads calibration data: its metric, a stage or its allocator does."""
        return not self.dense and bool(self.statistics or not self._allocation.instance.data_free())

    @property
    def method(self) -> str:
        """The metric and its stages, e.g. ``wanda → dsnot → admm``."""
        return " → ".join(filter(None, (self.metric_label, self.refine_label, self.reconstruct_label)))

    @property
    def label(self) -> str:
        """Short human label, e.g. ``wanda · unstructured · 0.5`` (``· owl`` when not uniform,
        ``· seed=3`` for each calibration knob the suite varies)."""
        if self.dense:
            return DENSE
        label = f"{self.method} · {self.pattern} · {self.sparsity:g}"
        if self.allocation != UNIFORM:
            label += f" · {self.allocation_label}"
        for knob in self.calibration_varied:
            value = getattr(self.calibration, knob)
            label += f" · {knob}={value.name if knob == 'dataset' else value}"
        return label

    @property
    def metric_plugin(self) -> Resolved | None:
        """The resolved metric (None for dense)."""
        return self._metric

    @property
    def pattern_plugin(self) -> Resolved | None:
        """The resolved pattern (None for dense)."""
        return self._pattern

    @property
    def allocation_plugin(self) -> Resolved | None:
        """The resolved allocator (None for dense)."""
        return self._allocation

    @property
    def refine_plugin(self) -> Resolved | None:
        """The resolved refiner (None: no refinement)."""
        return self._refine

    @property
    def reconstruct_plugin(self) -> Resolved | None:
        """The resolved reconstructor (None: no reconstruction)."""
        return self._reconstruct


def _absolute(folder: str | None) -> str | None:
    return None if folder is None else str(Path(folder).expanduser().absolute())


def exact_save(suite: Suite) -> Suite:
    """``suite`` (one pruned cell, ``save`` set) with that cell saved to exactly ``save``
    rather than to a subfolder named after it: what ``stadebench prune --out DIR`` runs."""
    cells = [c for c in expand(suite) if not c.dense]
    if len(cells) != 1 or not cells[0].save:
        raise ConfigError(f"exact_save takes a suite of one pruned cell with `save:` set, not {len(cells)} cells")
    exact = suite.model_copy()
    exact._save_exact = True
    return exact


def model_names(model: ModelSpec) -> set[str]:
    return {model.id, model.id.rstrip("/").rsplit("/", 1)[-1]}


def _excluded(rule: ExcludeRule, cell: Cell) -> bool:
    return ((rule.model is None or rule.model in model_names(cell.model))
            and (rule.metric is None or rule.metric in (cell.metric, cell.metric_label))
            and (rule.pattern is None or rule.pattern == cell.pattern)
            and (rule.sparsity is None or math.isclose(rule.sparsity, cell.sparsity))
            and (rule.allocation is None or rule.allocation in (cell.allocation, cell.allocation_label))
            and (rule.refine is None or rule.refine in (cell.refine or NONE, cell.refine_label or NONE))
            and (rule.reconstruct is None or rule.reconstruct in (cell.reconstruct or NONE,
                                                                  cell.reconstruct_label or NONE)))


def expand(suite: Suite) -> list[Cell]:
    """The cells of a validated suite, grouped by model: dense first, then metric × refiner ×
    reconstructor × pattern × sparsity × allocation × calibration protocol (one protocol only
    for a cell that reads no data)."""
    cells = []
    protocols, varied = suite.calibration.protocols(), suite.calibration.varied
    for model in suite.models:
        common = {"model": model, "evaluations": tuple(suite.evaluations)}
        if suite.dense:
            cells.append(Cell(metric=DENSE, metric_label=DENSE, calibration=protocols[0], **common))
        for metric in suite.metrics:
            for refine, reconstruct in itertools.product(metric.refine or suite.refine,
                                                         metric.reconstruct or suite.reconstruct):
                for cell in _pruned(suite, metric, refine, reconstruct, {**common, "calibration": protocols[0]}):
                    if not any(_excluded(rule, cell) for rule in suite.exclude):
                        cells += _per_protocol(cell, protocols, varied) if cell.uses_data else [cell]
    return cells


def _pruned(suite: Suite, metric: MetricSpec, refine: StageSpec, reconstruct: StageSpec, common: dict) -> list[Cell]:
    """The cells of one metric and stages: pattern × sparsity × allocation."""
    cells = []
    stages = {**_stage_fields("refine", refine), **_stage_fields("reconstruct", reconstruct)}
    for pattern in suite.patterns:
        for sparsity in pattern.sparsities or suite.sparsities or ():
            for allocation in suite.allocations:
                cell = Cell(metric=metric.name, metric_label=metric.display, metric_options=metric.options,
                            pattern=pattern.name, pattern_options=pattern.options, sparsity=sparsity,
                            allocation=allocation.name, allocation_label=allocation.display,
                            allocation_options=allocation.options, targets=tuple(suite.targets),
                            ignore=tuple(suite.ignore), save=_absolute(metric.save or suite.save),
                            save_exact=suite._save_exact, **stages, **common)
                _bind(cell, metric._resolved, pattern._resolved, allocation._resolved,
                      None if refine.none else refine._resolved, None if reconstruct.none else reconstruct._resolved)
                cells.append(cell)
    return cells


def _stage_fields(role: str, spec: StageSpec) -> dict[str, Any]:
    """A cell's fields for one stage entry (``refine``, ``refine_label``, ``refine_options``)."""
    if spec.none:
        return {role: None, f"{role}_label": None, f"{role}_options": {}}
    return {role: spec.name, f"{role}_label": spec.display, f"{role}_options": spec.options}


def _bind(cell: Cell, *resolved: Resolved | None) -> Cell:
    """``cell`` with its plugins: metric, pattern, allocator, refiner, reconstructor."""
    cell._metric, cell._pattern, cell._allocation, cell._refine, cell._reconstruct = resolved
    return cell


def _per_protocol(cell: Cell, protocols: list[CalibrationSpec], varied: tuple[str, ...]) -> list[Cell]:
    """``cell`` once per calibration protocol, each naming the knobs that vary."""
    out = []
    for protocol in protocols:
        copy = cell.model_copy(update={"calibration": protocol, "calibration_varied": varied})
        out.append(_bind(copy, cell._metric, cell._pattern, cell._allocation, cell._refine, cell._reconstruct))
    return out


def select(cells: list[Cell], only: list[str]) -> list[Cell]:
    """Cells matching ``--only`` items: ``field=value[,value]`` or a bare label substring.

    Items naming the same field (bare substrings count as one field) are alternatives;
    different fields must all match. Fields: model, metric, pattern, sparsity, dtype, allocation, seed,
    refine, reconstruct.
    """
    wanted: dict[str, list[str]] = {}
    for item in only:
        field, eq, value = item.partition("=")
        field = field.strip()
        if not eq:
            wanted.setdefault("", []).append(item)
            continue
        if field not in SELECT_FIELDS:
            hint = suggestion(field, SELECT_FIELDS)
            raise ConfigError(f"--only {item!r}: unknown field {field!r}; {hint + ' ' if hint else ''}"
                              f"use one of {', '.join(SELECT_FIELDS)}, or a bare part of a cell label")
        values = [v.strip() for v in value.split(",") if v.strip()]
        if not values:
            raise ConfigError(f"--only {item!r}: give a value, e.g. {field}=...")
        if field == "seed":
            try:
                values = [int(v) for v in values]
            except ValueError:
                raise ConfigError(f"--only {item!r}: a seed is an integer, e.g. seed=0") from None
        if field == "sparsity":
            try:
                values = [float(v) for v in values]
            except ValueError:
                raise ConfigError(f"--only {item!r}: sparsity must be a number, e.g. sparsity=0.5") from None
        wanted.setdefault(field, []).extend(values)
    kept = [c for c in cells if all(any(_selected(c, f, v) for v in vs) for f, vs in wanted.items())]
    if only and cells and not kept:
        raise ConfigError(f"--only {' '.join(only)} matches none of the {len(cells)} cells; "
                          f"labels look like {cells[-1].model.id} · {cells[-1].label}")
    return kept


def _selected(cell: Cell, field: str, value: Any) -> bool:
    if field == "":
        return value in f"{cell.model.id} · {cell.label}"
    if field == "model":
        return value in model_names(cell.model)
    if field == "metric":
        return value in (cell.metric, cell.metric_label)
    if field == "sparsity":
        return math.isclose(value, cell.sparsity)
    if field == "dtype":
        return value == cell.model.dtype
    if field == "seed":
        return cell.uses_data and value == cell.calibration.seed
    if field == "allocation":
        return value in (cell.allocation, cell.allocation_label)
    if field in ("refine", "reconstruct"):
        return not cell.dense and value in (getattr(cell, field) or NONE, getattr(cell, f"{field}_label") or NONE)
    return value == cell.pattern


__all__ = ["Cell", "exact_save", "expand", "model_names", "select"]
