"""The suite schema: the pydantic models a suite file is validated against.

Each field's ``Field(description=...)`` and each model's docstring are the suite reference:
docs/suites.md is generated from them (``python -m stadebench.suite.reference --write``,
with the rules no field type states and the example docs/examples/suite.yaml), and
tests/test_docs.py fails when the page and the models differ.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, create_model,
                      field_validator, model_validator)

from ..errors import ConfigError

DENSE = "dense"
# Integer knobs are bounded where storage (int32/int64 columns) and computation can hold them.
MAX_WINDOWS = 65_536
MAX_SEQLEN = 1 << 20
MAX_SEED = (1 << 63) - 1
MAX_DEVICE_INDEX = 255
SELECT_FIELDS = ("model", "metric", "pattern", "sparsity", "dtype", "allocation", "seed", "refine", "reconstruct")
UNIFORM = "uniform"

@dataclass(frozen=True)
class Resolved:
    """The plugin instance a suite entry names, built once when the suite is validated.

    Attributes:
        instance: the Metric, Pattern, Dataset or Evaluator, options validated.
        version: the version the plugin class declares.
        distribution: the distribution that registered it (``stadebench`` for built-ins).
        distribution_version: that distribution's version.
    """

    instance: Any = dataclasses.field(compare=False)
    version: str
    distribution: str
    distribution_version: str | None

    def who(self, kind: str, name: str) -> str:
        """``metric 'wanda' (stadebench 0.3.0)``: how errors name the plugin behind an entry."""
        return f"{kind} {name!r} ({self.distribution} {self.distribution_version or ''}".rstrip() + ")"


class _Spec(BaseModel):
    # strict: a YAML `yes` or "16" must not silently become True or 16
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    _resolved: Resolved | None = PrivateAttr(None)

    @property
    def resolved(self) -> Resolved:
        """The plugin this entry names; only suites from ``validate_suite`` carry it."""
        if self._resolved is None:
            raise ConfigError(f"{type(self).__name__} {self!r} was not resolved: build suites with "
                              "load_suite, parse_suite or validate_suite")
        return self._resolved


class _Labelled:
    """An entry with a ``name`` and an optional ``label`` that results show instead."""

    @property
    def display(self) -> str:
        """The label, or the name when no label is given."""
        return self.label or self.name


def _as_list(value: Any) -> Any:
    return value if isinstance(value, list) else [value]


def _shorthand(model: type[BaseModel], key: str = "name") -> Any:
    """``model`` that may also be written as a bare string, meaning ``{key: string}``."""
    def expand_string(value: Any) -> Any:
        return {key: value} if isinstance(value, str) else value

    return Annotated[model, BeforeValidator(expand_string, json_schema_input_type=str | model)]


Sparsity = Annotated[float, Field(gt=0, lt=1, description="Fraction of weights pruned, in (0, 1).")]
OptionsDict = Annotated[dict[str, Any], Field(default_factory=dict,
                                              description="Options, checked by the plugin's Options model.")]


class ModelSpec(_Spec):
    """A model to prune and evaluate."""

    id: str = Field(min_length=1, description="Hub id, local folder, GGUF file, or asset name.")
    revision: str | None = Field(None, description="Branch, tag or commit on the Hub (default: main).")
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="Weight dtype while pruning and evaluating.")
    trust_remote_code: bool = Field(False, description="Run model code from the Hub; never unless true.")
    gguf_file: str | None = Field(None, description="GGUF file inside `id` to load weights from.")
    tokenizer: str | None = Field(None, description="Tokenizer id or path (default: `id`).")
    num_gpus: float | None = Field(None, ge=0, le=64, description="GPUs a Ray worker holding this model "
                                   "reserves (default 1 on CUDA, 0 on CPU); the local executor ignores it.")

    @field_validator("id")
    @classmethod
    def _local_path_exists(cls, value: str) -> str:
        if value.startswith((".", "/", "~")) or value.endswith(".gguf"):
            path = Path(value).expanduser()
            if not path.exists():
                raise ValueError(f"local model path {value!r} does not exist (looked for {path.absolute()})")
        return value


NONE = "none"
"""The stage entry that means no such stage (``refine: [none, dsnot]``)."""


class StageSpec(_Labelled, _Spec):
    """A pruning stage after the metric's mask: a refiner or a reconstructor, or ``none``."""

    name: str = Field(min_length=1, description="Registered refiner or reconstructor name, or `none`.")
    options: OptionsDict
    label: str | None = Field(None, min_length=1, description="Name in results (default: `name`).")

    @property
    def none(self) -> bool:
        """Whether this entry is the absence of the stage."""
        return self.name == NONE


def _stage_list() -> Any:
    """A list of stage entries; a single entry may be written bare (``refine: dsnot``)."""
    return Annotated[list[_shorthand(StageSpec)], BeforeValidator(_as_list)]


def _stages(what: str) -> Any:
    return Field(default_factory=lambda: [StageSpec(name=NONE)], min_length=1,
                 description=f"{what} applied after each metric's mask, as a grid axis; `none` for no stage.")


class MetricSpec(_Labelled, _Spec):
    """A pruning metric with its options; ``label`` tells variants of one metric apart."""

    name: str = Field(min_length=1, description="Registered metric name, e.g. wanda.")
    options: OptionsDict
    label: str | None = Field(None, min_length=1, description="Name in results (default: `name`).")
    save: str | None = Field(None, min_length=1, description="Folder to save this metric's pruned cells under "
                                                             "(default: the suite's `save`).")
    refine: _stage_list() | None = Field(
        None, min_length=1, description="Refiners for this metric, instead of the top-level `refine`.")
    reconstruct: _stage_list() | None = Field(
        None, min_length=1, description="Reconstructors for this metric, instead of the top-level `reconstruct`.")


class PatternSpec(_Spec):
    """A sparsity pattern, optionally with sparsities of its own."""

    name: str = Field(min_length=1, description="Registered pattern name or spec: unstructured, 2:4, ...")
    sparsities: list[Sparsity] | None = Field(
        None, min_length=1, description="Sparsities for this pattern (default: the top-level ones).")
    options: OptionsDict


class AllocationSpec(_Labelled, _Spec):
    """A layer-wise allocator with its options; ``label`` tells variants apart."""

    name: str = Field(min_length=1, description="Registered allocator name, e.g. owl.")
    options: OptionsDict
    label: str | None = Field(None, min_length=1, description="Name in results (default: `name`).")


REGEX_LIMIT = 1000
"""Characters a ``targets`` / ``ignore`` regex may have; matching is bounded in time too
(``core.models.select_layers``)."""


def _regex(value: str) -> str:
    if len(value) > REGEX_LIMIT:
        raise ValueError(f"{value[:40]!r}… is {len(value)} characters long; a layer regex may have at most "
                         f"{REGEX_LIMIT}")
    try:
        re.compile(value)
    except (re.error, RecursionError, OverflowError) as exc:
        raise ValueError(f"{value!r} is not a regular expression: {exc}") from None
    return value


LayerRegex = Annotated[str, Field(min_length=1), BeforeValidator(lambda v: _regex(v) if isinstance(v, str) else v)]


class DatasetSpec(_Spec):
    """A registered text dataset with its options."""

    name: str = Field(min_length=1, description="Registered dataset name, e.g. wikitext2.")
    options: OptionsDict


class EvaluationSpec(_Spec):
    """A registered evaluator with its options."""

    name: str = Field(min_length=1, description="Registered evaluator name, e.g. perplexity.")
    options: OptionsDict
    optional: bool = Field(False, description="Skip it, with a note, when its data cannot be had here "
                                              "(e.g. no local file and no Hub) instead of failing every cell.")


class CalibrationSpec(_Spec):
    """How calibration windows are drawn and fed through the model."""

    dataset: _shorthand(DatasetSpec) = Field(DatasetSpec(name="c4"), description="Calibration dataset.")
    n: int = Field(128, ge=1, le=MAX_WINDOWS, description="Number of calibration windows.")
    seqlen: int = Field(2048, ge=8, le=MAX_SEQLEN, description="Tokens per calibration window.")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed for picking windows.")
    sequential: bool = Field(True, description="Feed each block the pruned previous block's outputs "
                                                "(false: one-shot, dense inputs).")
    batch_size: int = Field(8, ge=1, le=MAX_WINDOWS, description="Windows per forward pass.")
    accumulate: Literal["float64", "released"] = Field(
        "float64", description="How input statistics are summed: float64 sums (the accurate default) or "
                               "released, the reference releases' float32 running updates window by window, "
                               "to reproduce their numbers.")


AXIS = "axis"
"""Metadata marking a calibration knob that a list varies (docs render it as "X, or a list")."""


def _distinct(values: list) -> list:
    seen = []
    for value in values:
        if value in seen:
            shown = value.name if isinstance(value, DatasetSpec) and not value.options else value
            raise ValueError(f"{shown!r} is listed twice; list each value once")
        seen.append(value)
    return values


def _axis(info: Any) -> tuple[Any, Any]:
    """A ``CalibrationSpec`` field as a grid axis: the value, or a list of values (one cell each)."""
    element = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
    kind = Annotated[list[element], BeforeValidator(_as_list), AfterValidator(_distinct), AXIS]
    return kind, Field(info.default, min_length=1, validate_default=True,
                       description=f"{info.description} A list varies it: one cell per value.")


class _CalibrationGrid(_Spec):
    """Calibration knobs, each a value or a list of values that the grid varies."""

    @property
    def varied(self) -> tuple[str, ...]:
        """The knobs given more than one value, in declaration order."""
        return tuple(name for name in type(self).model_fields if len(getattr(self, name)) > 1)

    def protocols(self) -> list[CalibrationSpec]:
        """One calibration protocol per combination of the knobs' values (the first knob varies slowest)."""
        names = list(type(self).model_fields)
        return [CalibrationSpec(**dict(zip(names, combo, strict=True)))
                for combo in itertools.product(*(getattr(self, n) for n in names))]

    def first(self) -> CalibrationSpec:
        """The protocol of every knob's first value (the one data-free and dense cells carry)."""
        return CalibrationSpec(**{n: getattr(self, n)[0] for n in type(self).model_fields})


CalibrationGrid = create_model(
    "CalibrationGrid", __base__=_CalibrationGrid, __module__=__name__,
    __doc__="How calibration windows are drawn and fed through the model. Any knob may be a list, "
            "e.g. ``seed: [0, 1, 2, 3, 4]``: the grid then has one cell per value (per combination "
            "when several knobs are lists) for each metric that reads data.",
    **{name: _axis(info) for name, info in CalibrationSpec.model_fields.items()})


class ExcludeRule(_Spec):
    """Drops the pruned cells that match every field given."""

    model: str | None = Field(None, description="Model id, or its last path part.")
    metric: str | None = Field(None, description="Metric name or label.")
    pattern: str | None = Field(None, description="Pattern spec, e.g. 2:4.")
    sparsity: float | None = Field(None, description="Sparsity, e.g. 0.5.")
    allocation: str | None = Field(None, description="Allocation name or label.")
    refine: str | None = Field(None, description="Refiner name or label (`none`: no refiner).")
    reconstruct: str | None = Field(None, description="Reconstructor name or label (`none`: no reconstructor).")

    @model_validator(mode="after")
    def _not_empty(self) -> ExcludeRule:
        if all(getattr(self, f) is None for f in type(self).model_fields):
            raise ValueError(f"an exclude rule needs at least one of: {', '.join(type(self).model_fields)}")
        return self


class Suite(_Spec):
    """A benchmark grid: models × metrics × patterns × sparsities, calibration and evaluations."""

    name: str = Field("suite", min_length=1, description="Suite name (default: the file stem).")
    leaderboard: str = Field("leaderboard", description="Results folder, relative to the working directory.")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    dense: bool = Field(True, description="Evaluate the unpruned model (metric `dense`) once per model.")
    save: str | None = Field(None, min_length=1, description="Folder to save every pruned cell under, one "
                                                             "subfolder each, relative to the working directory "
                                                             "(default: not saved; docs/saving.md).")
    models: list[_shorthand(ModelSpec, "id")] = Field(min_length=1, description="Models to prune.")
    metrics: list[_shorthand(MetricSpec)] = Field(min_length=1, description="Pruning metrics.")
    patterns: list[_shorthand(PatternSpec)] = Field(min_length=1, description="Sparsity patterns.")
    sparsities: list[Sparsity] | None = Field(
        None, min_length=1, description="Sparsities for patterns without their own.")
    refine: _stage_list() = _stages("Mask refiners (e.g. dsnot)")
    reconstruct: _stage_list() = _stages("Weight reconstructors (e.g. obs, admm, mean-bias)")
    allocations: list[_shorthand(AllocationSpec)] = Field(
        default_factory=lambda: [AllocationSpec(name=UNIFORM)], min_length=1,
        description="How each sparsity is shared out among layers.")
    targets: list[LayerRegex] = Field(default_factory=list, description="Regexes over layer paths: prune only "
                                                                        "the layers they find (default: all).")
    ignore: list[LayerRegex] = Field(default_factory=list, description="Regexes over layer paths: layers left "
                                                                       "dense, e.g. ['layers[.]0[.]', self_attn].")
    exclude: list[ExcludeRule] = Field(default_factory=list, description="Pruned cells to drop.")
    calibration: CalibrationGrid = Field(CalibrationGrid(), description="Calibration protocol; a list "
                                         "for a knob varies it (e.g. seeds).")
    evaluations: list[_shorthand(EvaluationSpec)] = Field(
        default_factory=lambda: [EvaluationSpec(name="perplexity")],
        description="Evaluations run on every cell; empty only to prune and save (`save:` set).")
    # Set by `exact_save` (stadebench prune --out), never by a file: the one pruned cell
    # goes to `save` itself rather than to a subfolder of it.
    _save_exact: bool = PrivateAttr(False)

    @model_validator(mode="before")
    @classmethod
    def _null_is_empty(cls, data: Any) -> Any:
        # `models:` with nothing under it is YAML null: report it as an empty list
        if isinstance(data, dict):
            data = dict(data)
            for key in ("models", "metrics", "patterns", "evaluations", "exclude", "allocations", "targets",
                        "ignore", "refine", "reconstruct"):
                if key in data and data[key] is None:
                    data[key] = []
            if "calibration" in data and data["calibration"] is None:
                del data["calibration"]
        return data

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        match = re.fullmatch(r"auto|cpu|cuda(?::(\d{1,8}))?", value)
        if not match:
            raise ValueError(f"expected auto, cpu, cuda or cuda:N, got {value!r}")
        if match[1] is not None and int(match[1]) > MAX_DEVICE_INDEX:
            raise ValueError(f"device index {int(match[1])} is over {MAX_DEVICE_INDEX}; use cuda:N with a GPU's index")
        return value


def suite_json_schema() -> dict[str, Any]:
    """JSON Schema of a suite file, for editors and ``stadebench schema``."""
    schema = Suite.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


__all__ = ["AXIS", "AllocationSpec", "CalibrationGrid", "CalibrationSpec", "DENSE", "DatasetSpec", "EvaluationSpec",
           "ExcludeRule", "MAX_DEVICE_INDEX", "MAX_SEED", "MAX_SEQLEN", "MAX_WINDOWS", "MetricSpec", "ModelSpec",
           "NONE", "PatternSpec", "Resolved", "SELECT_FIELDS", "StageSpec", "Suite", "UNIFORM", "suite_json_schema"]
