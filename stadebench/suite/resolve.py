"""Resolution of a suite against the plugin registries: names, options, sparsities and
the grid rules that need the plugins (N:M sparsities, allocations, exclude values)."""

from __future__ import annotations

import math
from typing import Any

from pydantic import ValidationError

from ..errors import ConfigError, UnknownNameError
from ..plugins import get_plugins
from ..util import canonical_json, suggestion
from .cells import Cell, expand, model_names
from .problems import Loc, Problem, from_validation, loc_text
from .schema import (DENSE, NONE, AllocationSpec, CalibrationGrid, DatasetSpec, EvaluationSpec, MetricSpec, PatternSpec,
                     Resolved, StageSpec, Suite)

def _options(cls: type, options: dict[str, Any], loc: Loc) -> None:
    try:
        cls.Options.model_validate(options)
    except ValidationError as exc:
        raise from_validation(exc, cls.Options, (*loc, "options"))[0] from None


def _resolution(registration: Any, instance: Any) -> Resolved:
    dist, version = get_plugins().provenance(registration.plugin)
    return Resolved(instance, registration.version, dist, version)


def _plugin(registry: Any, spec: MetricSpec | AllocationSpec | DatasetSpec | EvaluationSpec,
            loc: Loc) -> tuple[Any, dict]:
    """The resolved plugin a spec names, and its options with defaults filled in."""
    try:
        reg = registry.get(spec.name)
    except UnknownNameError as exc:
        raise Problem((*loc, "name"), str(exc)) from None
    _options(reg.cls, spec.options, loc)
    try:
        item = reg.cls(spec.options)
    except ConfigError as exc:
        raise Problem((*loc, "options"), str(exc)) from None
    return _resolution(reg, item), item.options.model_dump(mode="json")


def _labelled(registry: Any, spec: MetricSpec | AllocationSpec, loc: Loc, what: str,
              labels: dict[str, int]) -> MetricSpec | AllocationSpec:
    """A metric or allocation entry resolved, its options filled in; its label (name when
    none) must be new among ``labels`` (label -> index), which it joins."""
    reg, options = _plugin(registry, spec, loc)
    if spec.display in labels:
        raise Problem((*loc, "label" if spec.label else "name"),
                       f"{what} label {spec.display!r} is already used by {loc[0]}[{labels[spec.display]}]; "
                       f"give each variant a label: {{name: {spec.name}, options: {{...}}, label: ...}}")
    labels[spec.display] = loc[1]
    resolved = spec.model_copy(update={"options": options})
    resolved._resolved = reg
    return resolved


def _check(resolved: Resolved, loc: Loc) -> None:
    """The plugin's own check of its options (local files exist), as a problem at ``loc``."""
    try:
        resolved.instance.check()
    except ConfigError as exc:
        raise Problem(loc, str(exc)) from None


def resolve_suite(suite: Suite) -> Suite:
    """Check names, options and grid rules; return the suite with options and sparsities filled in."""
    plugins = get_plugins()

    seen: dict[tuple, int] = {}
    for i, m in enumerate(suite.models):
        ident = (m.id, m.revision, m.dtype, m.gguf_file)
        if ident in seen:
            raise Problem(("models", i), f"duplicate of models[{seen[ident]}] "
                                          f"(same id, revision, dtype and gguf_file)")
        seen[ident] = i

    metrics, labels = [], {}
    for i, spec in enumerate(suite.metrics):
        loc = ("metrics", i)
        if DENSE in (spec.name, spec.label):
            raise Problem((*loc, "name" if spec.name == DENSE else "label"),
                           "'dense' is the unpruned baseline, not a metric; switch it with the top-level "
                           "`dense: true` or `dense: false`")
        metric = _labelled(plugins.metrics, spec, loc, "metric", labels)
        metrics.append(metric.model_copy(update={
            role: None if getattr(spec, role) is None else _stages(plugins, getattr(spec, role), (*loc, role))
            for role in ("refine", "reconstruct")}))
        metrics[-1]._resolved = metric._resolved

    patterns, specs = [], {}
    for i, spec in enumerate(suite.patterns):
        patterns.append(_pattern(plugins, suite, spec, ("patterns", i), specs))

    labels = {}
    allocations = [_labelled(plugins.allocators, spec, ("allocations", i), "allocation", labels)
                   for i, spec in enumerate(suite.allocations)]

    if not suite.evaluations and not (suite.save or all(m.save for m in suite.metrics)):
        raise Problem(("evaluations",), "needs at least one entry (an empty list only prunes and saves: set "
                                         "`save:` to keep the pruned models)")

    stages = {role: _stages(plugins, getattr(suite, role), (role,)) for role in ("refine", "reconstruct")}
    resolved = suite.model_copy(update={"metrics": metrics, "patterns": patterns, "allocations": allocations, **stages,
                                        "calibration": _calibration(plugins, suite.calibration),
                                        "evaluations": _evaluations(plugins, suite.evaluations)})
    _check_exclude(resolved)
    cells = expand(resolved)
    if not cells:
        raise Problem(("exclude",), "every cell is excluded and `dense` is false: nothing would run")
    _check_allocations(resolved, cells)
    _check_refiners(cells)
    return resolved


_STAGE_KINDS = {"refine": "refiner", "reconstruct": "reconstructor"}


def _stages(plugins: Any, specs: list[StageSpec], loc: Loc) -> list[StageSpec]:
    """One stage axis (``refine`` or ``reconstruct``) resolved: names, options, distinct labels."""
    kind = _STAGE_KINDS[loc[-1]]
    out, labels = [], {}
    for i, spec in enumerate(specs):
        where = (*loc, i)
        if spec.none:
            if spec.options or spec.label:
                raise Problem(where, f"`{NONE}` means no {kind}: it takes no options or label")
            resolved = spec
        else:
            reg, options = _plugin(plugins.registries[kind], spec, where)
            resolved = spec.model_copy(update={"options": options})
            resolved._resolved = reg
        if resolved.display in labels:
            raise Problem((*where, "label" if spec.label else "name"),
                          f"{kind} {resolved.display!r} is already {loc_text((*loc, labels[resolved.display]))}; "
                          f"give each variant a label: {{name: {spec.name}, options: {{...}}, label: ...}}")
        labels[resolved.display] = i
        out.append(resolved)
    return out


def _check_refiners(cells: list[Cell]) -> None:
    """A refiner must be able to keep each pattern it is crossed with."""
    for cell in cells:
        if cell.refine_plugin is None:
            continue
        why = cell.refine_plugin.instance.supports(cell.pattern_plugin.instance)
        if why:
            raise Problem(("refine",), f"refiner {cell.refine_label!r} cannot refine pattern {cell.pattern!r}: "
                                       f"{why}; add `exclude: [{{refine: {cell.refine_label}, pattern: "
                                       f"'{cell.pattern}'}}]`")


def _calibration(plugins: Any, calibration: CalibrationGrid) -> CalibrationGrid:
    """The calibration knobs with each dataset resolved and checked."""
    datasets = []
    for i, spec in enumerate(calibration.dataset):
        loc = ("calibration", "dataset", i) if len(calibration.dataset) > 1 else ("calibration", "dataset")
        dataset, options = _plugin(plugins.datasets, spec, loc)
        _check(dataset, (*loc, "options"))
        datasets.append(spec.model_copy(update={"options": options}))
        datasets[-1]._resolved = dataset
    if len({(d.name, canonical_json(d.options)) for d in datasets}) < len(datasets):
        raise Problem(("calibration", "dataset"), "the same dataset is listed twice once defaults are filled in; "
                                                  "list each calibration dataset once")
    return calibration.model_copy(update={"dataset": datasets})


def _evaluations(plugins: Any, specs: list[EvaluationSpec]) -> list[EvaluationSpec]:
    """Each evaluation resolved and checked (an optional one's data may be missing); no two alike."""
    evaluations, seen = [], {}
    for i, spec in enumerate(specs):
        evaluator, options = _plugin(plugins.evaluators, spec, ("evaluations", i))
        if not spec.optional:  # an optional one whose data is missing is skipped, with a note
            _check(evaluator, ("evaluations", i, "options"))
        ident = (spec.name, canonical_json(options))
        if ident in seen:
            raise Problem(("evaluations", i), f"duplicate of evaluations[{seen[ident]}]")
        seen[ident] = i
        evaluation = spec.model_copy(update={"options": options})
        evaluation._resolved = evaluator
        evaluations.append(evaluation)
    return evaluations


def _check_allocations(suite: Suite, cells: list[Cell]) -> None:
    """A pattern with a fixed sparsity (N:M) takes only the uniform allocation."""
    for cell in cells:
        if cell.dense or cell.allocation_plugin.instance.uniform or cell.pattern_plugin.instance.per_layer_sparsity:
            continue
        i = next(k for k, a in enumerate(suite.allocations) if a.display == cell.allocation_label)
        raise Problem(("allocations", i), f"allocation {cell.allocation_label!r} gives layers sparsities of their "
                                           f"own, but pattern {cell.pattern!r} prunes every layer at "
                                           f"{cell.sparsity:g}; add `exclude: [{{allocation: {cell.allocation_label}, "
                                           f"pattern: '{cell.pattern}'}}]`")


def _pattern(plugins: Any, suite: Suite, spec: PatternSpec, loc: Loc, specs: dict[tuple, int]
             ) -> PatternSpec:
    """Check one pattern and resolve its sparsities (own, inherited, or the pattern's default)."""
    try:
        reg = plugins.patterns.get(spec.name)
    except UnknownNameError as exc:
        raise Problem((*loc, "name"), str(exc)) from None
    _options(reg.cls, spec.options, loc)
    try:
        pattern = reg.cls.from_spec(spec.name, spec.options)
    except ConfigError as exc:
        raise Problem((*loc, "name"), str(exc)) from None
    options = pattern.options.model_dump(mode="json")
    ident = (pattern.spec, canonical_json(options))
    if ident in specs:
        raise Problem((*loc, "name"), f"pattern {pattern.spec!r} is already patterns[{specs[ident]}]")
    specs[ident] = loc[1]

    own = spec.sparsities is not None
    values, where = (spec.sparsities, (*loc, "sparsities")) if own else (suite.sparsities, ("sparsities",))
    if pattern.fixed_sparsity is not None:
        fixed, why = pattern.fixed_sparsity
        for k, s in enumerate(values or ()):
            if not math.isclose(s, fixed, abs_tol=1e-9):
                fix = (f"its sparsity is fixed: drop its `sparsities` or write [{fixed:g}]"
                       if own else
                       "give other patterns their own sparsities: {name: unstructured, sparsities: [...]}")
                raise Problem((*where, k), f"pattern {pattern.spec!r} {why} (sparsity {fixed:g}); "
                                            f"{loc_text((*where, k))} = {s:g} conflicts; {fix}")
        values = [fixed]
    if not values:
        try:
            values = [pattern.resolve_sparsity(None)]
        except ConfigError:
            raise Problem(loc, f"pattern {pattern.spec!r} has no sparsities; add a top-level "
                                f"`sparsities: [0.5]` or give it its own: "
                                f"{{name: {pattern.spec}, sparsities: [0.5]}}") from None
    values = list(values)
    for k, s in enumerate(values):
        if any(math.isclose(s, t) for t in values[:k]):
            raise Problem((*where, k), f"sparsity {s:g} is listed twice")
        try:
            values[k] = pattern.resolve_sparsity(s)
        except ConfigError as exc:
            raise Problem((*where, k), str(exc)) from None
    resolved = spec.model_copy(update={"name": pattern.spec, "options": options, "sparsities": values})
    resolved._resolved = _resolution(reg, pattern)
    return resolved


def _check_exclude(suite: Suite) -> None:
    """Every value in an exclude rule must name something in the suite (catches typos)."""
    known: dict[str, set] = {
        "model": set().union(*(model_names(m) for m in suite.models)),
        "metric": {m.name for m in suite.metrics} | {m.display for m in suite.metrics},
        "pattern": {p.name for p in suite.patterns},
        "allocation": {a.name for a in suite.allocations} | {a.display for a in suite.allocations},
        **{role: {NONE} | {x for m in suite.metrics for spec in (getattr(m, role) or []) + getattr(suite, role)
                           for x in (spec.name, spec.display)} for role in ("refine", "reconstruct")},
    }
    sparsities = {s for p in suite.patterns for s in p.sparsities}
    for i, rule in enumerate(suite.exclude):
        for field in ("model", "metric", "pattern", "allocation", "refine", "reconstruct"):
            value = getattr(rule, field)
            if value is not None and value not in known[field]:
                hint = suggestion(value, known[field])
                hint = f"; {hint}" if hint else ""
                raise Problem(("exclude", i, field), f"{value!r} matches no {field} of this suite{hint} "
                                                      f"({field}s: {', '.join(sorted(known[field]))})")
        if rule.sparsity is not None and not any(math.isclose(rule.sparsity, s) for s in sparsities):
            listed = ", ".join(f"{s:g}" for s in sorted(sparsities))
            raise Problem(("exclude", i, "sparsity"),
                           f"{rule.sparsity:g} matches no sparsity of this suite (sparsities: {listed})")


__all__ = ["resolve_suite"]
