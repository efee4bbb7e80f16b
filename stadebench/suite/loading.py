"""Reading a suite file: YAML with size, depth and alias limits, a line for every field,
and one ``ConfigError`` naming the file, line and field of the first problem."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..errors import ConfigError
from .problems import Lines, Loc, Problem, from_validation, kind_of, loc_text
from .resolve import resolve_suite
from .schema import Suite


class Loader(yaml.SafeLoader):
    """SafeLoader without YAML 1.1 base-60 integers, so that ``2:4`` stays a string."""


_INT = "tag:yaml.org,2002:int"
Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _INT]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Loader.add_implicit_resolver(
    _INT, re.compile(r"^[-+]?(?:0b[01_]+|0x[0-9a-fA-F_]+|0[0-7_]+|0|[1-9][0-9_]*)$"), list("-+0123456789"))


def parse_value(text: str) -> Any:
    """A value given on the command line, read as a suite file would read it: ``true``,
    ``0.5``, ``128``, ``[1, 2]``; ``2:4`` stays a string, and text YAML cannot read too."""
    try:
        return yaml.load(text, Loader=Loader)  # noqa: S506 -- a SafeLoader subclass
    except yaml.YAMLError:
        return text


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


def check_size(text: str, source: str, what: str = "suite") -> None:
    """Refuse, before anything is built, a document over MAX_BYTES, nested deeper than
    MAX_DEPTH or holding more than MAX_NODES values once aliases are expanded. One pass
    over the parser's events, counting each anchor's expanded size once, so neither a deep
    document (which would overflow the recursive composer) nor an alias bomb costs more
    than reading the text."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        raise ConfigError(f"{source}: the {what} is over the limit of {MAX_BYTES:,} bytes")
    sizes: dict[str, int] = {}
    stack: list[list] = [[None, 0]]  # [anchor, expanded values so far] per open collection
    try:
        for event in yaml.parse(text, Loader=Loader):
            if isinstance(event, yaml.CollectionStartEvent):
                if len(stack) > MAX_DEPTH:
                    mark = event.start_mark
                    raise ConfigError(f"{source}:{mark.line + 1}: nested deeper than {MAX_DEPTH} levels; "
                                      f"a {what} is a few levels deep")
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
                                  f"repeat what they name); a {what} holds a few hundred")
    except yaml.YAMLError:
        return  # the loader reports it with its line and column


def parse_suite(text: str, source: str = "<suite>", default_name: str = "suite") -> Suite:
    """Validate a suite given as YAML text; ``source`` names it in error messages."""
    check_size(text, source)
    loader = Loader(text)
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
                          f"(models, metrics, patterns, ...), got {kind_of(data)}")
    data = {"name": default_name, **data}
    try:
        suite = Suite.model_validate(data)
    except ValidationError as exc:
        problems = from_validation(exc, Suite)
        # the first problem in the file, but missing keys last: a typo'd key explains them
        first = min(problems, key=lambda p: (p.kind == "missing", _line(lines, p.loc) or math.inf))
        raise _report(first, source, lines, data) from None
    try:
        return resolve_suite(suite)
    except Problem as problem:
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
                raise ConfigError(f"{source}:{where.start_mark.line + 1}: {loc_text(child)}: duplicate key "
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


def _report(problem: Problem, source: str, lines: Lines, data: Any) -> ConfigError:
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
    path = f"{loc_text(loc)}: " if loc else ""
    return ConfigError(f"{_where(source, lines, problem.loc)}{path}{problem.message}")


def _where(source: str, lines: Lines, loc: Loc) -> str:
    line = _line(lines, loc)
    return f"{source}:{line}: " if line else f"{source}: "


__all__ = ["Loader", "MAX_BYTES", "MAX_DEPTH", "MAX_NODES", "check_size", "load_suite", "parse_suite", "parse_value",
           "validate_suite"]
