"""A problem at a place in a suite file, and pydantic's errors turned into such problems."""

from __future__ import annotations

from typing import Any, get_args

from pydantic import BaseModel, ValidationError

from ..util import suggestion

Loc = tuple[str | int, ...]
Lines = dict[Loc, int]  # path in the file -> 1-based line


class Problem(Exception):
    def __init__(self, loc: Loc, message: str, kind: str = ""):
        super().__init__(message)
        self.loc, self.message, self.kind = tuple(loc), message, kind


def loc_text(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out


def kind_of(value: Any) -> str:
    names = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
             float: "a number", type(None): "nothing"}
    return names.get(type(value), f"a {type(value).__name__}")


def fields_at(model: type[BaseModel] | None, loc: Loc) -> list[str]:
    """Field names of the model found at ``loc`` inside ``model``."""
    for part in loc:
        if model is None or isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        model = model_in(field.annotation) if field else None
    return list(model.model_fields) if model else []


def model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = model_in(arg)
        if found:
            return found
    return None


def from_validation(exc: ValidationError, model: type[BaseModel], prefix: Loc = ()) -> list[Problem]:
    problems = []
    for err in exc.errors(include_url=False):
        loc, kind, msg = tuple(err["loc"]), err["type"], err["msg"].removeprefix("Value error, ")
        if kind == "extra_forbidden":
            allowed = fields_at(model, loc[:-1])
            hint = suggestion(str(loc[-1]), allowed)
            msg = f"unknown key {loc[-1]!r}; " + (f"{hint} " if hint else "")
            msg += f"Expected one of: {', '.join(allowed)}"
        elif kind == "missing":
            msg = "required field is missing"
        elif kind == "too_short":
            msg = "needs at least one entry"
        elif kind in ("model_type", "model_attributes_type", "dict_type") and fields_at(model, loc):
            fields = fields_at(model, loc)
            msg = (f"expected {'a name or ' if {'name', 'id'} & set(fields) else ''}a mapping with keys "
                   f"{', '.join(fields)}, got {kind_of(err['input'])}")
        elif kind != "value_error":
            msg += f" (got {short(err['input'])})"
        problems.append(Problem(prefix + loc, msg, kind))
    return problems


def short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


__all__ = ["Problem", "fields_at", "from_validation", "kind_of", "loc_text", "model_in", "short"]
