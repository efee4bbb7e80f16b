"""The input side: a suite file read (``loading``), checked against the plugin registries
(``resolve``) and expanded into cells (``cells``); ``schema`` declares every field, and
``reference`` generates docs/suites.md from it."""

from .cells import Cell, exact_save, expand, select
from .loading import load_suite, parse_suite, parse_value, validate_suite
from .schema import (DENSE, UNIFORM, AllocationSpec, CalibrationGrid, CalibrationSpec, DatasetSpec, EvaluationSpec,
                     ExcludeRule, MetricSpec, ModelSpec, PatternSpec, Resolved, StageSpec, Suite, suite_json_schema)

__all__ = ["DENSE", "UNIFORM", "AllocationSpec", "CalibrationGrid", "CalibrationSpec", "Cell", "DatasetSpec",
           "EvaluationSpec", "ExcludeRule", "MetricSpec", "ModelSpec", "PatternSpec", "Resolved", "StageSpec", "Suite",
           "exact_save", "expand", "load_suite", "parse_suite", "parse_value", "select", "suite_json_schema",
           "validate_suite"]
