"""Suites: the declarative grid of a benchmark run, and its expansion into cells.

A suite is a YAML file; every key below is optional unless marked *required*::

    name: smoke                      # defaults to the file stem
    leaderboard: leaderboard         # folder for results, relative to the current directory
    device: auto                     # auto | cpu | cuda | cuda:N
    dense: true                      # evaluate the unpruned baseline (metric "dense") once per model
    save: null                       # a folder: save every pruned cell under it (docs/saving.md)
    models:                          # required: a Hub id / local path, or a mapping
      - id: smollm2-135m             # Hub id, local folder, GGUF file, or asset name
        revision: null               # branch, tag or commit on the Hub
        dtype: float32               # float32 | float16 | bfloat16
        trust_remote_code: false     # never run model code from the Hub unless true
        gguf_file: null              # file inside `id` to load weights from
        tokenizer: null              # defaults to id
    metrics:                         # required: a name, or {name, options, label}
      - magnitude
      - wanda
      - {name: stade, options: {bias_correction: false}, label: stade-released}
      # - {name: sparsegpt, save: pruned/sparsegpt}   # a metric's own `save` overrides the suite's
    patterns: [unstructured, 2:4]    # required: a name, or {name, sparsities, options}
    sparsities: [0.5]                # for patterns without their own
    allocations:                     # how a sparsity is shared out among layers (default [uniform])
      - uniform
      - {name: owl, options: {M: 5, lambda: 0.08}}
    targets: []                      # regexes over module paths: prune only the layers they find
    ignore: []                       # regexes: layers left dense, e.g. ['layers[.]0[.]', self_attn]
    exclude:                         # drop pruned cells matching every field given
      - {metric: stade-released, pattern: 2:4}
      - {allocation: owl, pattern: 2:4}
    calibration:
      dataset: enwiki-2016           # a name or {name, options}
      n: 16                          # windows
      seqlen: 512                    # tokens per window
      seed: 0
      sequential: true               # false: one-shot (blocks see dense inputs)
      batch_size: 8
      accumulate: float64            # released: the reference releases' float32 running sums
    evaluations:                     # a name or {name, options}
      - {name: perplexity, options: {dataset: enwiki-2016, seqlen: 512}}

Rules beyond the field types:

- Metric, pattern, dataset and evaluator names come from the plugin registries, and
  their ``options`` are checked by the plugin's ``Options`` model (defaults filled in).
- ``dense`` is the baseline, switched by ``dense:``; it is not a metric name.
- ``save: DIR`` (top level, or per metric, which overrides it) saves each pruned cell
  as a plain Hugging Face folder ``DIR/<model>--<metric>--<pattern>--<sparsity>--<key>``
  (``bench.save.folder_name``); a re-run cell replaces its folder. Where a model is saved
  does not change its numbers: ``save`` is not part of any key. The dense cell is never saved.
- A sparsity lies strictly between 0 and 1. A pattern without sparsities of its own
  uses the top-level ``sparsities``, or its default (0.5; N/M for N:M). An N:M pattern
  prunes N of every M weights, so it admits no sparsity other than N/M.
- ``2:4`` may be written unquoted (YAML 1.1 would read it as the base-60 number 124).
- Models (id, revision, dtype, gguf_file), metric labels, patterns and evaluations
  must be distinct; a model id that looks like a local path must exist.
- ``exclude`` applies to pruned cells only, and each value must name something in the
  suite (model id or its last path part, metric name or label, pattern, sparsity,
  allocation name or label).
- An allocation other than ``uniform`` gives layers sparsities of their own, which an
  N:M pattern refuses: exclude such pairs. ``targets`` and ``ignore`` are Python
  regexes matched anywhere in a layer's path (``re.search``); each must find a linear
  layer of every model, and the sparsity is over the layers left to prune.

``expand`` turns a suite into cells grouped by model: the dense cell first, then
metric × pattern × sparsity in the order written, minus the excluded ones.
"""

from __future__ import annotations

import math
import re
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationError,
                      field_validator, model_validator)

from ..errors import ConfigError, UnknownNameError
from ..plugins import get_plugins
from ..util import canonical_json, close_matches

DENSE = "dense"
# Integer knobs are bounded where storage (int32/int64 columns) and computation can hold them.
MAX_WINDOWS = 65_536
MAX_SEQLEN = 1 << 20
MAX_SEED = (1 << 63) - 1
MAX_DEVICE_INDEX = 255
SELECT_FIELDS = ("model", "metric", "pattern", "sparsity", "dtype", "allocation")
UNIFORM = "uniform"


# --- schema ----------------------------------------------------------------------


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
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="Weight dtype.")
    trust_remote_code: bool = Field(False, description="Allow running model code from the Hub.")
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


class MetricSpec(_Spec):
    """A pruning metric with its options; ``label`` tells variants of one metric apart."""

    name: str = Field(min_length=1, description="Registered metric name, e.g. wanda.")
    options: OptionsDict
    label: str | None = Field(None, min_length=1, description="Name in results (default: `name`).")
    save: str | None = Field(None, min_length=1, description="Folder to save this metric's pruned cells under "
                                                             "(default: the suite's `save`).")

    @property
    def display(self) -> str:
        """The label, or the name when no label is given."""
        return self.label or self.name


class PatternSpec(_Spec):
    """A sparsity pattern, optionally with sparsities of its own."""

    name: str = Field(min_length=1, description="Registered pattern name or spec: unstructured, 2:4, ...")
    sparsities: list[Sparsity] | None = Field(
        None, min_length=1, description="Sparsities for this pattern (default: the top-level ones).")
    options: OptionsDict


class AllocationSpec(_Spec):
    """A layer-wise allocator with its options; ``label`` tells variants apart."""

    name: str = Field(min_length=1, description="Registered allocator name, e.g. owl.")
    options: OptionsDict
    label: str | None = Field(None, min_length=1, description="Name in results (default: `name`).")

    @property
    def display(self) -> str:
        """The label, or the name when no label is given."""
        return self.label or self.name


def _regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
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


class ExcludeRule(_Spec):
    """Drops the pruned cells that match every field given."""

    model: str | None = Field(None, description="Model id, or its last path part.")
    metric: str | None = Field(None, description="Metric name or label.")
    pattern: str | None = Field(None, description="Pattern spec, e.g. 2:4.")
    sparsity: float | None = Field(None, description="Sparsity.")
    allocation: str | None = Field(None, description="Allocation name or label.")

    @model_validator(mode="after")
    def _not_empty(self) -> ExcludeRule:
        if not any(v is not None for v in (self.model, self.metric, self.pattern, self.sparsity, self.allocation)):
            raise ValueError("an exclude rule needs at least one of: model, metric, pattern, sparsity, allocation")
        return self


class Suite(_Spec):
    """A benchmark grid: models × metrics × patterns × sparsities, calibration and evaluations."""

    name: str = Field("suite", min_length=1, description="Suite name (default: the file stem).")
    leaderboard: str = Field("leaderboard", description="Results folder, relative to the working directory.")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    dense: bool = Field(True, description="Evaluate the unpruned model (metric `dense`) once per model.")
    save: str | None = Field(None, min_length=1, description="Folder to save every pruned cell under, one "
                                                             "subfolder each, relative to the working directory "
                                                             "(default: not saved).")
    models: list[_shorthand(ModelSpec, "id")] = Field(min_length=1, description="Models to prune.")
    metrics: list[_shorthand(MetricSpec)] = Field(min_length=1, description="Pruning metrics.")
    patterns: list[_shorthand(PatternSpec)] = Field(min_length=1, description="Sparsity patterns.")
    sparsities: list[Sparsity] | None = Field(
        None, min_length=1, description="Sparsities for patterns without their own.")
    allocations: list[_shorthand(AllocationSpec)] = Field(
        default_factory=lambda: [AllocationSpec(name=UNIFORM)], min_length=1,
        description="How each sparsity is shared out among layers.")
    targets: list[LayerRegex] = Field(default_factory=list, description="Regexes: prune only the layers they "
                                                                        "find (default: all).")
    ignore: list[LayerRegex] = Field(default_factory=list, description="Regexes: layers left dense.")
    exclude: list[ExcludeRule] = Field(default_factory=list, description="Pruned cells to drop.")
    calibration: CalibrationSpec = Field(CalibrationSpec(), description="Calibration protocol.")
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
                        "ignore"):
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


# --- cells -----------------------------------------------------------------------


class Cell(BaseModel):
    """One unit of work: a model pruned with one metric, pattern and sparsity, then evaluated.

    The dense baseline is a cell with metric ``dense``, no pattern and sparsity 0.
    """

    model_config = ConfigDict(frozen=True)

    model: ModelSpec = Field(description="The model.")
    metric: str = Field(description="Metric name, or `dense`.")
    metric_label: str = Field(description="Metric label in results.")
    metric_options: dict[str, Any] = Field(default_factory=dict, description="Metric options, with defaults.")
    pattern: str | None = Field(None, description="Pattern spec; None for dense.")
    pattern_options: dict[str, Any] = Field(default_factory=dict,
                                            description="Pattern options, with defaults.")
    sparsity: float = Field(0.0, description="Target sparsity over the pruned layers; 0 for dense.")
    allocation: str | None = Field(None, description="Allocator name; None for dense.")
    allocation_label: str | None = Field(None, description="Allocation label in results.")
    allocation_options: dict[str, Any] = Field(default_factory=dict, description="Allocator options, with "
                                                                                 "defaults.")
    targets: tuple[str, ...] = Field((), description="Regexes of the layers to prune (empty: all).")
    ignore: tuple[str, ...] = Field((), description="Regexes of the layers left dense.")
    calibration: CalibrationSpec = Field(description="Calibration protocol (unused by dense cells).")
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
    def label(self) -> str:
        """Short human label, e.g. ``wanda · unstructured · 0.5`` (``· owl`` when not uniform)."""
        if self.dense:
            return DENSE
        label = f"{self.metric_label} · {self.pattern} · {self.sparsity:g}"
        return label if self.allocation == UNIFORM else f"{label} · {self.allocation_label}"

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


def _model_names(model: ModelSpec) -> set[str]:
    return {model.id, model.id.rstrip("/").rsplit("/", 1)[-1]}


def _excluded(rule: ExcludeRule, cell: Cell) -> bool:
    return ((rule.model is None or rule.model in _model_names(cell.model))
            and (rule.metric is None or rule.metric in (cell.metric, cell.metric_label))
            and (rule.pattern is None or rule.pattern == cell.pattern)
            and (rule.sparsity is None or math.isclose(rule.sparsity, cell.sparsity))
            and (rule.allocation is None or rule.allocation in (cell.allocation, cell.allocation_label)))


def expand(suite: Suite) -> list[Cell]:
    """The cells of a validated suite, grouped by model: dense first, then metric × pattern × sparsity."""
    cells = []
    for model in suite.models:
        common = {"model": model, "calibration": suite.calibration, "evaluations": tuple(suite.evaluations)}
        if suite.dense:
            cells.append(Cell(metric=DENSE, metric_label=DENSE, **common))
        for metric in suite.metrics:
            for pattern in suite.patterns:
                for sparsity in pattern.sparsities or suite.sparsities or ():
                    for allocation in suite.allocations:
                        save = metric.save or suite.save
                        cell = Cell(metric=metric.name, metric_label=metric.display, metric_options=metric.options,
                                    pattern=pattern.name, pattern_options=pattern.options, sparsity=sparsity,
                                    allocation=allocation.name, allocation_label=allocation.display,
                                    allocation_options=allocation.options, targets=tuple(suite.targets),
                                    ignore=tuple(suite.ignore), save=_absolute(save),
                                    save_exact=suite._save_exact, **common)
                        cell._metric, cell._pattern = metric._resolved, pattern._resolved
                        cell._allocation = allocation._resolved
                        if not any(_excluded(rule, cell) for rule in suite.exclude):
                            cells.append(cell)
    return cells


def select(cells: list[Cell], only: list[str]) -> list[Cell]:
    """Cells matching ``--only`` items: ``field=value[,value]`` or a bare label substring.

    Items naming the same field (bare substrings count as one field) are alternatives;
    different fields must all match. Fields: model, metric, pattern, sparsity, dtype.
    """
    wanted: dict[str, list[str]] = {}
    for item in only:
        field, eq, value = item.partition("=")
        field = field.strip()
        if not eq:
            wanted.setdefault("", []).append(item)
            continue
        if field not in SELECT_FIELDS:
            close = close_matches(field, SELECT_FIELDS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"--only {item!r}: unknown field {field!r}; {hint}"
                              f"use one of {', '.join(SELECT_FIELDS)}, or a bare part of a cell label")
        values = [v.strip() for v in value.split(",") if v.strip()]
        if not values:
            raise ConfigError(f"--only {item!r}: give a value, e.g. {field}=...")
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
        return value in _model_names(cell.model)
    if field == "metric":
        return value in (cell.metric, cell.metric_label)
    if field == "sparsity":
        return math.isclose(value, cell.sparsity)
    if field == "dtype":
        return value == cell.model.dtype
    if field == "allocation":
        return value in (cell.allocation, cell.allocation_label)
    return value == cell.pattern


def suite_json_schema() -> dict[str, Any]:
    """JSON Schema of a suite file, for editors and ``stadebench schema``."""
    schema = Suite.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


# --- loading and error reporting -------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader without YAML 1.1 base-60 integers, so that ``2:4`` stays a string."""


_INT = "tag:yaml.org,2002:int"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _INT]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    _INT, re.compile(r"^[-+]?(?:0b[01_]+|0x[0-9a-fA-F_]+|0[0-7_]+|0|[1-9][0-9_]*)$"), list("-+0123456789"))

Loc = tuple[str | int, ...]
Lines = dict[Loc, int]  # path in the file -> 1-based line


def parse_value(text: str) -> Any:
    """A value given on the command line, read as a suite file would read it: ``true``,
    ``0.5``, ``128``, ``[1, 2]``; ``2:4`` stays a string, and text YAML cannot read too."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 -- a SafeLoader subclass
    except yaml.YAMLError:
        return text


class _Problem(Exception):
    def __init__(self, loc: Loc, message: str, kind: str = ""):
        super().__init__(message)
        self.loc, self.message, self.kind = tuple(loc), message, kind


MAX_BYTES = 1 << 20
"""Largest suite file read (a grid of a few hundred cells is a few kilobytes)."""
MAX_DEPTH = 32
"""Deepest nesting of mappings and lists in a suite."""
MAX_NODES = 100_000
"""Most values a suite may hold once its YAML aliases are expanded."""


def load_suite(path: str | Path) -> Suite:
    """Read, validate and resolve a suite file; any problem raises one ConfigError."""
    try:
        size = Path(path).stat().st_size
        if size > MAX_BYTES:
            raise ConfigError(f"{path}: the suite file is {size:,} bytes, over the limit of {MAX_BYTES:,}; "
                              "a suite lists models, metrics and patterns, and is a few kilobytes")
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise ConfigError(f"{path}: cannot read the suite file: {reason}") from None
    return parse_suite(text, source=str(path), default_name=Path(path).stem)


def _check_size(text: str, source: str) -> None:
    """Refuse, before anything is built, a document over MAX_BYTES, nested deeper than
    MAX_DEPTH or holding more than MAX_NODES values once aliases are expanded. One pass
    over the parser's events, counting each anchor's expanded size once, so neither a deep
    document (which would overflow the recursive composer) nor an alias bomb costs more
    than reading the text."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        raise ConfigError(f"{source}: the suite is over the limit of {MAX_BYTES:,} bytes")
    sizes: dict[str, int] = {}
    stack: list[list] = [[None, 0]]  # [anchor, expanded values so far] per open collection
    try:
        for event in yaml.parse(text, Loader=_Loader):
            if isinstance(event, yaml.CollectionStartEvent):
                if len(stack) > MAX_DEPTH:
                    mark = event.start_mark
                    raise ConfigError(f"{source}:{mark.line + 1}: nested deeper than {MAX_DEPTH} levels; "
                                      "a suite is a few levels deep")
                stack.append([event.anchor, 0])
                continue
            if isinstance(event, yaml.CollectionEndEvent):
                anchor, count = stack.pop()
                count += 1
            elif isinstance(event, yaml.AliasEvent):
                anchor, count = None, sizes.get(event.anchor, 1)
            elif isinstance(event, yaml.ScalarEvent):
                anchor, count = event.anchor, 1
            else:
                continue
            if anchor is not None:
                sizes[anchor] = count
            stack[-1][1] += count
            if stack[-1][1] > MAX_NODES:
                raise ConfigError(f"{source}: expands to more than {MAX_NODES:,} values (YAML aliases "
                                  "repeat what they name); a suite holds a few hundred")
    except yaml.YAMLError:
        return  # the loader reports it with its line and column


def parse_suite(text: str, source: str = "<suite>", default_name: str = "suite") -> Suite:
    """Validate a suite given as YAML text; ``source`` names it in error messages."""
    _check_size(text, source)
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        what = ", ".join(filter(None, [getattr(exc, "context", None), getattr(exc, "problem", None)]))
        raise ConfigError(f"{where}: invalid YAML: {what or exc}") from None
    finally:
        loader.dispose()
    if node is None:
        raise ConfigError(f"{source}:1: the file is empty; a suite needs models, metrics and patterns")
    return validate_suite(data, source, default_name, _line_map(node, source))


def validate_suite(data: Any, source: str = "<suite>", default_name: str = "suite",
                   lines: Lines | None = None) -> Suite:
    """Validate a suite given as parsed data: schema, then plugin names, options and grid rules."""
    lines = lines or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{_where(source, lines, ())}the top level must be a mapping of suite fields "
                          f"(models, metrics, patterns, ...), got {_kind(data)}")
    data = {"name": default_name, **data}
    try:
        suite = Suite.model_validate(data)
    except ValidationError as exc:
        problems = _from_validation(exc, Suite)
        # the first problem in the file, but missing keys last: a typo'd key explains them
        first = min(problems, key=lambda p: (p.kind == "missing", _line(lines, p.loc) or math.inf))
        raise _report(first, source, lines, data) from None
    try:
        return _resolve(suite)
    except _Problem as problem:
        raise _report(problem, source, lines, data) from None


def _line_map(root: yaml.Node, source: str) -> Lines:
    lines: Lines = {(): root.start_mark.line + 1}
    stack = [(root, ())]
    while stack:
        node, loc = stack.pop()
        if len(loc) > 32:  # an alias can make a recursive structure
            continue
        if isinstance(node, yaml.MappingNode):
            children = [(str(k.value), k, v) for k, v in node.value]
        elif isinstance(node, yaml.SequenceNode):
            children = [(i, v, v) for i, v in enumerate(node.value)]
        else:
            continue
        for key, where, value in children:
            child = (*loc, key)
            if child in lines:
                raise ConfigError(f"{source}:{where.start_mark.line + 1}: {_path(child)}: duplicate key "
                                  f"(first given on line {lines[child]})")
            lines[child] = where.start_mark.line + 1
            stack.append((value, child))
    return lines


def _line(lines: Lines, loc: Loc) -> int | None:
    """Line of the deepest part of ``loc`` the file shows."""
    line = None
    for i in range(len(loc) + 1):
        if loc[:i] not in lines:
            break
        line = lines[loc[:i]]
    return line


def _report(problem: _Problem, source: str, lines: Lines, data: Any) -> ConfigError:
    loc = problem.loc
    # below a scalar such as `- wanda` (shorthand for {name: wanda}) the file has no keys to name
    for i, part in enumerate(loc):
        try:
            data = data[part] if isinstance(data, (dict, list)) else None
        except (KeyError, IndexError, TypeError):
            break
        if not isinstance(data, (dict, list)):
            loc = loc[:i + 1]
            break
    path = f"{_path(loc)}: " if loc else ""
    return ConfigError(f"{_where(source, lines, problem.loc)}{path}{problem.message}")


def _where(source: str, lines: Lines, loc: Loc) -> str:
    line = _line(lines, loc)
    return f"{source}:{line}: " if line else f"{source}: "


def _path(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out


def _kind(value: Any) -> str:
    names = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
             float: "a number", type(None): "nothing"}
    return names.get(type(value), f"a {type(value).__name__}")


def _fields_at(model: type[BaseModel] | None, loc: Loc) -> list[str]:
    """Field names of the model found at ``loc`` inside ``model``."""
    for part in loc:
        if model is None or isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        model = _model_in(field.annotation) if field else None
    return list(model.model_fields) if model else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found:
            return found
    return None


def _from_validation(exc: ValidationError, model: type[BaseModel], prefix: Loc = ()) -> list[_Problem]:
    problems = []
    for err in exc.errors(include_url=False):
        loc, kind, msg = tuple(err["loc"]), err["type"], err["msg"].removeprefix("Value error, ")
        if kind == "extra_forbidden":
            allowed = _fields_at(model, loc[:-1])
            close = close_matches(str(loc[-1]), allowed, n=1)
            msg = f"unknown key {loc[-1]!r}; " + (f"did you mean {close[0]!r}? " if close else "")
            msg += f"Expected one of: {', '.join(allowed)}"
        elif kind == "missing":
            msg = "required field is missing"
        elif kind == "too_short":
            msg = "needs at least one entry"
        elif kind in ("model_type", "model_attributes_type", "dict_type") and _fields_at(model, loc):
            fields = _fields_at(model, loc)
            msg = (f"expected {'a name or ' if {'name', 'id'} & set(fields) else ''}a mapping with keys "
                   f"{', '.join(fields)}, got {_kind(err['input'])}")
        elif kind != "value_error":
            msg += f" (got {_short(err['input'])})"
        problems.append(_Problem(prefix + loc, msg, kind))
    return problems


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# --- resolution against the plugin registries ------------------------------------


def _options(cls: type, options: dict[str, Any], loc: Loc) -> None:
    try:
        cls.Options.model_validate(options)
    except ValidationError as exc:
        raise _from_validation(exc, cls.Options, (*loc, "options"))[0] from None


def _resolution(registration: Any, instance: Any) -> Resolved:
    dist, version = get_plugins().provenance(registration.plugin)
    return Resolved(instance, registration.version, dist, version)


def _plugin(registry: Any, spec: MetricSpec | AllocationSpec | DatasetSpec | EvaluationSpec,
            loc: Loc) -> tuple[Any, dict]:
    """The resolved plugin a spec names, and its options with defaults filled in."""
    try:
        reg = registry.get(spec.name)
    except UnknownNameError as exc:
        raise _Problem((*loc, "name"), str(exc)) from None
    _options(reg.cls, spec.options, loc)
    try:
        item = reg.cls(spec.options)
    except ConfigError as exc:
        raise _Problem((*loc, "options"), str(exc)) from None
    return _resolution(reg, item), item.options.model_dump(mode="json")


def _labelled(registry: Any, spec: MetricSpec | AllocationSpec, loc: Loc, what: str,
              labels: dict[str, int]) -> MetricSpec | AllocationSpec:
    """A metric or allocation entry resolved, its options filled in; its label (name when
    none) must be new among ``labels`` (label -> index), which it joins."""
    reg, options = _plugin(registry, spec, loc)
    if spec.display in labels:
        raise _Problem((*loc, "label" if spec.label else "name"),
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
        raise _Problem(loc, str(exc)) from None


def _resolve(suite: Suite) -> Suite:
    """Check names, options and grid rules; return the suite with options and sparsities filled in."""
    plugins = get_plugins()

    seen: dict[tuple, int] = {}
    for i, m in enumerate(suite.models):
        ident = (m.id, m.revision, m.dtype, m.gguf_file)
        if ident in seen:
            raise _Problem(("models", i), f"duplicate of models[{seen[ident]}] "
                                          f"(same id, revision, dtype and gguf_file)")
        seen[ident] = i

    metrics, labels = [], {}
    for i, spec in enumerate(suite.metrics):
        loc = ("metrics", i)
        if DENSE in (spec.name, spec.label):
            raise _Problem((*loc, "name" if spec.name == DENSE else "label"),
                           "'dense' is the unpruned baseline, not a metric; switch it with the top-level "
                           "`dense: true` or `dense: false`")
        metrics.append(_labelled(plugins.metrics, spec, loc, "metric", labels))

    patterns, specs = [], {}
    for i, spec in enumerate(suite.patterns):
        patterns.append(_pattern(plugins, suite, spec, ("patterns", i), specs))

    labels = {}
    allocations = [_labelled(plugins.allocators, spec, ("allocations", i), "allocation", labels)
                   for i, spec in enumerate(suite.allocations)]

    if not suite.evaluations and not (suite.save or all(m.save for m in suite.metrics)):
        raise _Problem(("evaluations",), "needs at least one entry (an empty list only prunes and saves: set "
                                         "`save:` to keep the pruned models)")

    calibration = suite.calibration
    dataset, options = _plugin(plugins.datasets, calibration.dataset, ("calibration", "dataset"))
    _check(dataset, ("calibration", "dataset", "options"))
    calibration_dataset = calibration.dataset.model_copy(update={"options": options})
    calibration_dataset._resolved = dataset
    calibration = calibration.model_copy(update={"dataset": calibration_dataset})

    evaluations, seen_evals = [], {}
    for i, spec in enumerate(suite.evaluations):
        evaluator, options = _plugin(plugins.evaluators, spec, ("evaluations", i))
        if not spec.optional:  # an optional one whose data is missing is skipped, with a note
            _check(evaluator, ("evaluations", i, "options"))
        ident = (spec.name, canonical_json(options))
        if ident in seen_evals:
            raise _Problem(("evaluations", i), f"duplicate of evaluations[{seen_evals[ident]}]")
        seen_evals[ident] = i
        evaluation = spec.model_copy(update={"options": options})
        evaluation._resolved = evaluator
        evaluations.append(evaluation)

    resolved = suite.model_copy(update={"metrics": metrics, "patterns": patterns, "allocations": allocations,
                                        "calibration": calibration, "evaluations": evaluations})
    _check_exclude(resolved)
    cells = expand(resolved)
    if not cells:
        raise _Problem(("exclude",), "every cell is excluded and `dense` is false: nothing would run")
    _check_allocations(resolved, cells)
    return resolved


def _check_allocations(suite: Suite, cells: list[Cell]) -> None:
    """A pattern with a fixed sparsity (N:M) takes only the uniform allocation."""
    for cell in cells:
        if cell.dense or cell.allocation_plugin.instance.uniform or cell.pattern_plugin.instance.per_layer_sparsity:
            continue
        i = next(k for k, a in enumerate(suite.allocations) if a.display == cell.allocation_label)
        raise _Problem(("allocations", i), f"allocation {cell.allocation_label!r} gives layers sparsities of their "
                                           f"own, but pattern {cell.pattern!r} prunes every layer at "
                                           f"{cell.sparsity:g}; add `exclude: [{{allocation: {cell.allocation_label}, "
                                           f"pattern: '{cell.pattern}'}}]`")


def _pattern(plugins: Any, suite: Suite, spec: PatternSpec, loc: Loc, specs: dict[tuple, int]
             ) -> PatternSpec:
    """Check one pattern and resolve its sparsities (own, inherited, or the pattern's default)."""
    try:
        reg = plugins.patterns.get(spec.name)
    except UnknownNameError as exc:
        raise _Problem((*loc, "name"), str(exc)) from None
    _options(reg.cls, spec.options, loc)
    try:
        pattern = reg.cls.from_spec(spec.name, spec.options)
    except ConfigError as exc:
        raise _Problem((*loc, "name"), str(exc)) from None
    options = pattern.options.model_dump(mode="json")
    ident = (pattern.spec, canonical_json(options))
    if ident in specs:
        raise _Problem((*loc, "name"), f"pattern {pattern.spec!r} is already patterns[{specs[ident]}]")
    specs[ident] = loc[1]

    own = spec.sparsities is not None
    values, where = (spec.sparsities, (*loc, "sparsities")) if own else (suite.sparsities, ("sparsities",))
    if hasattr(pattern, "n") and hasattr(pattern, "m"):
        n, m = pattern.n, pattern.m
        for k, s in enumerate(values or ()):
            if not math.isclose(s, n / m, abs_tol=1e-9):
                fix = (f"an N:M pattern's sparsity is fixed: drop its `sparsities` or write [{n / m:g}]"
                       if own else
                       "give other patterns their own sparsities: {name: unstructured, sparsities: [...]}")
                raise _Problem((*where, k), f"pattern {pattern.spec!r} prunes {n} of every {m} weights "
                                            f"(sparsity {n / m:g}); {_path((*where, k))} = {s:g} conflicts; "
                                            f"{fix}")
        values = [n / m]
    if not values:
        try:
            values = [pattern.resolve_sparsity(None)]
        except ConfigError:
            raise _Problem(loc, f"pattern {pattern.spec!r} has no sparsities; add a top-level "
                                f"`sparsities: [0.5]` or give it its own: "
                                f"{{name: {pattern.spec}, sparsities: [0.5]}}") from None
    values = list(values)
    for k, s in enumerate(values):
        if any(math.isclose(s, t) for t in values[:k]):
            raise _Problem((*where, k), f"sparsity {s:g} is listed twice")
        try:
            values[k] = pattern.resolve_sparsity(s)
        except ConfigError as exc:
            raise _Problem((*where, k), str(exc)) from None
    resolved = spec.model_copy(update={"name": pattern.spec, "options": options, "sparsities": values})
    resolved._resolved = _resolution(reg, pattern)
    return resolved


def _check_exclude(suite: Suite) -> None:
    """Every value in an exclude rule must name something in the suite (catches typos)."""
    known: dict[str, set] = {
        "model": set().union(*(_model_names(m) for m in suite.models)),
        "metric": {m.name for m in suite.metrics} | {m.display for m in suite.metrics},
        "pattern": {p.name for p in suite.patterns},
        "allocation": {a.name for a in suite.allocations} | {a.display for a in suite.allocations},
    }
    sparsities = {s for p in suite.patterns for s in p.sparsities}
    for i, rule in enumerate(suite.exclude):
        for field in ("model", "metric", "pattern", "allocation"):
            value = getattr(rule, field)
            if value is not None and value not in known[field]:
                close = close_matches(value, known[field], n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise _Problem(("exclude", i, field), f"{value!r} matches no {field} of this suite{hint} "
                                                      f"({field}s: {', '.join(sorted(known[field]))})")
        if rule.sparsity is not None and not any(math.isclose(rule.sparsity, s) for s in sparsities):
            listed = ", ".join(f"{s:g}" for s in sorted(sparsities))
            raise _Problem(("exclude", i, "sparsity"),
                           f"{rule.sparsity:g} matches no sparsity of this suite (sparsities: {listed})")
