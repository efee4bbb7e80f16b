"""Reference pages generated from the code, so that they cannot drift from it.

``markdown()`` is docs/suites.md, the suite file reference: every field of every section
(name, type, default, description) read from the pydantic models in ``schema`` (their
``Field(description=...)`` and class docstrings), the example suite docs/examples/suite.yaml,
and the rules no field type states (``RULES``, ``CELLS``: their only copy).
``columns_markdown()`` is docs/leaderboard.md, the leaderboard's columns, read from
``results.row.SCHEMA`` (each field's ``doc``) and ``Row``'s field roles.

Regenerate both with ``python -m stadebench.suite.reference --write`` (or ``nox -s docs``);
tests/test_docs.py fails when a committed page differs from what this module generates.
"""

from __future__ import annotations

import inspect
import math
import textwrap
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types as at
import yaml
from pydantic import BaseModel, BeforeValidator
from pydantic.fields import FieldInfo

from .schema import AXIS, Suite

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = "docs/examples/suite.yaml"
COMMAND = "python -m stadebench.results.reference --write"

INTRO = """\
A suite is a YAML file that declares the grid of a benchmark run: models × metrics ×
patterns × sparsities × allocations, the calibration protocol and the evaluations.
`stadebench validate SUITE` checks one without running it; `stadebench schema` prints the
format as JSON Schema, for editors. A bad suite gets one message naming the file, line and
field, e.g. `suites/x.yaml:8: metrics[0]: unknown metric 'wandda'; did you mean 'wanda'?`."""

RULES = """\
- Metric, pattern, allocator, dataset and evaluator names come from the plugin registries
  (`stadebench list`), and their `options` are checked by the plugin's `Options` model
  (defaults filled in).
- `dense` is the baseline, switched by `dense:`; it is not a metric name.
- `save: DIR` (top level, or per metric, which overrides it) saves each pruned cell as a
  plain Hugging Face folder `DIR/<model>--<metric>--<pattern>--<sparsity>--<key>`
  (`runner.save.folder_name`); a re-run cell replaces its folder. Where a model is saved
  does not change its numbers: `save` is not part of any key. The dense cell is never
  saved (docs/saving.md).
- A sparsity lies strictly between 0 and 1. A pattern without sparsities of its own uses
  the top-level `sparsities`, or its default (0.5; N/M for N:M). An N:M pattern prunes N
  of every M weights, so it admits no sparsity other than N/M.
- `2:4` may be written unquoted (YAML 1.1 would read it as the base-60 number 124).
- Models (id, revision, dtype, gguf_file), metric labels, patterns and evaluations must
  be distinct; a model id that looks like a local path must exist.
- `exclude` applies to pruned cells only, and each value must name something in the
  suite (model id or its last path part, metric name or label, pattern, sparsity,
  allocation name or label).
- An allocation other than `uniform` gives layers sparsities of their own, which an N:M
  pattern refuses: exclude such pairs. `targets` and `ignore` are Python regexes matched
  anywhere in a layer's path (`re.search`); each must find a linear layer of every
  model, and the sparsity is over the layers left to prune.
- Keys are strict: an unknown key is an error (with a "did you mean"), and a YAML `yes`
  or `"16"` is not taken for a boolean or a number."""

CELLS = """\
`expand` turns a suite into cells grouped by model: the dense cell first (when `dense:
true`), then metric × pattern × sparsity × allocation in the order written, minus the
excluded ones. A calibration knob given as a list (`seed: [0, 1, 2]`) repeats each cell
that reads data once per value, per combination when several knobs are lists, the first
knob varying slowest (dataset, n, seqlen, seed, ...); a cell that reads no data (dense,
magnitude) runs once, and its label names no calibration. Listing a value twice is an
error."""


# --- docs/suites.md ------------------------------------------------------------------


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _strip_annotated(tp: Any) -> tuple[Any, list[Any]]:
    """``tp`` without ``Annotated`` layers, and their metadata (constraints, validators)."""
    meta: list[Any] = []
    while get_origin(tp) is Annotated:
        tp, *more = get_args(tp)
        for m in more:
            meta.extend(m.metadata if isinstance(m, FieldInfo) else [m])
    return tp, meta


def _models_in(tp: Any) -> list[type[BaseModel]]:
    tp, _ = _strip_annotated(tp)
    if _is_model(tp):
        return [tp]
    return [m for arg in get_args(tp) for m in _models_in(arg)]


def sections() -> list[tuple[str, type[BaseModel]]]:
    """``(path, model)`` for the top level and every nested model, in the order of their fields."""
    out: list[tuple[str, type[BaseModel]]] = []

    def visit(path: str, model: type[BaseModel]) -> None:
        out.append((path, model))
        for name, info in model.model_fields.items():
            for sub in _models_in(info.annotation):
                if sub not in [m for _, m in out]:
                    visit(f"{path}.{name}" if path else name, sub)

    visit("", Suite)
    return out


def anchor(path: str) -> str:
    return path.replace(".", "-") or "top-level"


def _optional(tp: Any) -> Any:
    """``X`` for ``X | None``, else ``tp``."""
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


_NAMES = {str: ("string", "strings"), bool: ("boolean", "booleans"), int: ("integer", "integers"),
          float: ("number", "numbers"), type(None): ("null", "nulls")}


def _bounds(meta: list[Any]) -> str:
    low = next((f"[{m.ge}" for m in meta if isinstance(m, at.Ge)), None) or next(
        (f"({m.gt}" for m in meta if isinstance(m, at.Gt)), None)
    high = next((f"{m.le}]" for m in meta if isinstance(m, at.Le)), None) or next(
        (f"{m.lt})" for m in meta if isinstance(m, at.Lt)), None)
    if low and high:
        return f" in {low}, {high}"
    if low:
        return f" ≥ {low[1:]}" if low[0] == "[" else f" > {low[1:]}"
    if high:
        return f" ≤ {high[:-1]}" if high[-1] == "]" else f" < {high[:-1]}"
    return ""


def _shorthand_key(model: type[BaseModel]) -> str:
    (key,) = [n for n, f in model.model_fields.items() if f.is_required()]
    return key


def _type(tp: Any, meta: list[Any] = (), plural: bool = False) -> str:
    """A field's type in words, constraints included, nested models as links to their section."""
    tp, inner = _strip_annotated(tp)
    meta = [*meta, *inner]
    non_empty = any(isinstance(m, at.MinLen) and m.min_length >= 1 for m in meta)
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        parts = [_type(a, meta, plural) for a in args if a is not type(None)]
        text = " or ".join(parts)
        return text + " or null" if type(None) in args else text
    if origin is Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args)
    if origin is list and AXIS in meta:
        return f"{_type(args[0])}, or a non-empty list of them (one cell each)"
    if origin is list:
        return ("non-empty list of " if non_empty else "list of ") + _type(args[0], plural=True)
    if origin is dict or tp is dict:
        return "mappings" if plural else "mapping"
    if _is_model(tp):
        path = next(p for p, m in sections() if m is tp)
        link = f"[`{path}` {'entries' if plural else 'entry'}](#{anchor(path)})"
        if any(isinstance(m, BeforeValidator) for m in meta):
            key = _shorthand_key(tp)
            return f"{'strings' if plural else 'a string'} (the `{key}`) or {link}"
        return link
    if tp in _NAMES:
        word = _NAMES[tp][plural]
        if tp is str and non_empty:
            word = "non-empty " + word
        return word + _bounds(meta)
    if tp is Any:
        return "anything"
    raise TypeError(f"no words for the type {tp!r}: teach stadebench.suite.reference._type")


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        dumped = value.model_dump(exclude_defaults=True)
        keys = [n for n, f in type(value).model_fields.items() if f.is_required()]
        return dumped[keys[0]] if list(dumped) == keys and len(keys) == 1 else dumped
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _bare(model: type[BaseModel]) -> BaseModel | None:
    """``model()`` with every default (its axis defaults validated into lists); None when it needs fields."""
    return None if any(f.is_required() for f in model.model_fields.values()) else model()


def _default(info: FieldInfo) -> str:
    if info.is_required():
        return "*required*"
    value = info.get_default(call_default_factory=True)
    if AXIS in info.metadata:
        value = value[0] if isinstance(value, list) else value
    if isinstance(value, BaseModel) and (not value.model_dump(exclude_defaults=True) or value == _bare(type(value))):
        return "its fields' defaults"
    text = yaml.safe_dump(_plain(value), default_flow_style=True, width=math.inf, sort_keys=False)
    return f"`{text.removesuffix(chr(10)).removesuffix('...').strip()}`"


def cell_text(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def fill(text: str) -> str:
    return textwrap.fill(text, width=90, break_on_hyphens=False, break_long_words=False)


def _doc(obj: Any) -> str:
    """A class docstring as Markdown (reST literals become code spans)."""
    return inspect.cleandoc(obj.__doc__ or "").replace("``", "`")


def _table(model: type[BaseModel]) -> list[str]:
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    for name, info in model.model_fields.items():
        kind = cell_text(_type(info.annotation, info.metadata))
        lines.append(f"| `{name}` | {kind} | {cell_text(_default(info))} | {cell_text(info.description or '')} |")
    return lines


def _heading(path: str) -> str:
    if not path:
        return "Top level"
    parent_path, _, name = path.rpartition(".")
    parent = next(m for p, m in sections() if p == parent_path)
    tp = _strip_annotated(_optional(parent.model_fields[name].annotation))[0]
    return f"`{path}:` entries" if get_origin(tp) is list else f"`{path}:`"


def markdown(root: Path = REPO) -> str:
    """docs/suites.md: the suite file reference."""
    example = (root / EXAMPLE).read_text(encoding="utf-8")
    out = [(f"<!-- Generated by `{COMMAND}` from stadebench/suite/: edit the schema's descriptions, "
            f"the example file or stadebench/suite/reference.py, not this page. -->"), "",
           "# Suite files", "", INTRO, "",
           "## Example", "",
           fill(f"Every key is optional unless its default below is *required*. This example is "
                 f"`{EXAMPLE}`, which the tests load:"), "",
           f"<!-- file: {EXAMPLE} -->", "```yaml", example + "```", "",
           "## Keys", ""]
    out += [fill("Each section lists its keys with their type, default and meaning. An entry that may be "
                  "written as a bare string means the mapping with that string as its one key."), ""]
    for path, model in sections():
        out += [f'<a id="{anchor(path)}"></a>', "", f"### {_heading(path)}", "", _doc(model), ""]
        out += _table(model)
        out.append("")
    out += ["## Rules beyond the field types", "", RULES, "", "## Cells", "", CELLS, ""]
    return "\n".join(out)


# --- docs/leaderboard.md -------------------------------------------------------------


__all__ = ["CELLS", "COMMAND", "EXAMPLE", "INTRO", "REPO", "RULES", "anchor", "cell_text", "fill", "markdown",
           "sections"]
