"""Cells: a validated suite expanded into units of work, and ``--only`` selection."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from ..errors import ConfigError
from ..util import suggestion
from .schema import (DENSE, SELECT_FIELDS, UNIFORM, CalibrationSpec, EvaluationSpec, ExcludeRule, ModelSpec, Resolved,
                     Suite)


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

    @property
    def dense(self) -> bool:
        """Whether this is the unpruned baseline."""
        return self.metric == DENSE

    @property
    def uses_data(self) -> bool:
        """Whether the cell reads calibration data: its metric or its allocator does."""
        return not self.dense and not (self._metric.instance.data_free() and self._allocation.instance.data_free())

    @property
    def label(self) -> str:
        """Short human label, e.g. ``wanda · unstructured · 0.5`` (``· owl`` when not uniform,
        ``· seed=3`` for each calibration knob the suite varies)."""
        if self.dense:
            return DENSE
        label = f"{self.metric_label} · {self.pattern} · {self.sparsity:g}"
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
            and (rule.allocation is None or rule.allocation in (cell.allocation, cell.allocation_label)))


def expand(suite: Suite) -> list[Cell]:
    """The cells of a validated suite, grouped by model: dense first, then metric × pattern ×
    sparsity × allocation × calibration protocol (one protocol only for a cell that reads no data)."""
    cells = []
    protocols, varied = suite.calibration.protocols(), suite.calibration.varied
    for model in suite.models:
        common = {"model": model, "evaluations": tuple(suite.evaluations)}
        if suite.dense:
            cells.append(Cell(metric=DENSE, metric_label=DENSE, calibration=protocols[0], **common))
        for metric in suite.metrics:
            for pattern in suite.patterns:
                for sparsity in pattern.sparsities or suite.sparsities or ():
                    for allocation in suite.allocations:
                        save = metric.save or suite.save
                        cell = Cell(metric=metric.name, metric_label=metric.display, metric_options=metric.options,
                                    pattern=pattern.name, pattern_options=pattern.options, sparsity=sparsity,
                                    allocation=allocation.name, allocation_label=allocation.display,
                                    allocation_options=allocation.options, targets=tuple(suite.targets),
                                    ignore=tuple(suite.ignore), save=_absolute(save), calibration=protocols[0],
                                    save_exact=suite._save_exact, **common)
                        cell._metric, cell._pattern = metric._resolved, pattern._resolved
                        cell._allocation = allocation._resolved
                        if any(_excluded(rule, cell) for rule in suite.exclude):
                            continue
                        cells += _per_protocol(cell, protocols, varied) if cell.uses_data else [cell]
    return cells


def _per_protocol(cell: Cell, protocols: list[CalibrationSpec], varied: tuple[str, ...]) -> list[Cell]:
    """``cell`` once per calibration protocol, each naming the knobs that vary."""
    out = []
    for protocol in protocols:
        copy = cell.model_copy(update={"calibration": protocol, "calibration_varied": varied})
        copy._metric, copy._pattern, copy._allocation = cell._metric, cell._pattern, cell._allocation
        out.append(copy)
    return out


def select(cells: list[Cell], only: list[str]) -> list[Cell]:
    """Cells matching ``--only`` items: ``field=value[,value]`` or a bare label substring.

    Items naming the same field (bare substrings count as one field) are alternatives;
    different fields must all match. Fields: model, metric, pattern, sparsity, dtype, allocation, seed.
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
    return value == cell.pattern


__all__ = ["Cell", "exact_save", "expand", "model_names", "select"]
