"""`stadebench list` and `stadebench plugins`: what is registered, and by whom."""

from __future__ import annotations

import enum
import re
from typing import Annotated

import typer
from rich.table import Table

from ..kinds import KINDS
from .common import Format, FormatOption, handle_errors, out, styled, write_rows

__all__ = ["KindName", "kind_names", "list_items", "plugins_command", "summary"]


# Inline markup of reST and Markdown, outermost first, each replaced by its text.
_MARKUP = [
    (re.compile(r":[\w.+-]+(?::[\w.+-]+)*:`([^`<]*?)\s*(?:<[^`>]*>)?`"),  # :role:`text <target>`, :role:`~a.b`
     lambda m: m[1].rsplit(".", 1)[-1] if m[1].startswith("~") else m[1]),
    (re.compile(r"`([^`<]+?)\s*<[^`>]*>`__?"), r"\1"),  # `text <url>`_
    (re.compile(r"``(.+?)``"), r"\1"),  # ``code``
    (re.compile(r"`([^`]+)`__?"), r"\1"),  # `name`_
    (re.compile(r"`([^`]+)`"), r"\1"),  # `code` (Markdown), `interpreted` (reST)
    (re.compile(r"\[([^\]]+)\]\([^)\s]+\)"), r"\1"),  # [text](url)
    (re.compile(r"\*\*(\S(?:.*?\S)?)\*\*"), r"\1"),  # **bold**
    (re.compile(r"(?<![\w*])\*(\S(?:.*?\S)?)\*(?![\w*])"), r"\1"),  # *emphasis*
]


def summary(doc: str | None) -> str:
    """A docstring's first paragraph as one line of plain text: reST and Markdown inline
    markup (``code``, `link`_, :role:`x`, **bold**) replaced by its text, never cut."""
    paragraph = (doc or "").strip().split("\n\n")[0]
    text = " ".join(paragraph.split())
    for pattern, replacement in _MARKUP:
        text = pattern.sub(replacement, text)
    return text


def kind_names() -> type[enum.Enum]:
    """The choices of ``stadebench list``: an enum of the plurals in ``KINDS``."""
    return enum.Enum("KindName", {kind.plural: kind.plural for kind in KINDS.values()}, type=str)


KindName = kind_names()


def list_items(kind: Annotated[KindName, typer.Argument(help="What to list.")],
               fmt: FormatOption = Format.table) -> None:
    """List registered metrics, patterns, allocators, datasets or evaluators."""
    _list(kind, fmt)


_plurals = [kind.plural for kind in KINDS.values()]  # the same sentence, for whatever KINDS holds
list_items.__doc__ = f"List registered {', '.join(_plurals[:-1])} or {_plurals[-1]}."


@handle_errors
def _list(kind: KindName, fmt: Format) -> None:
    from ..plugins import get_plugins

    plugins = get_plugins()
    name = next(k.name for k in KINDS.values() if k.plural == kind.value)
    registry = plugins.registries[name]
    rows = []
    for reg in sorted(registry, key=lambda r: r.name):
        dist, version = plugins.provenance(reg.plugin)
        rows.append({
            "name": reg.name, "version": reg.version, "plugin": dist, "plugin_version": version,
            "statistics": (",".join(sorted(getattr(reg.cls, "statistics", ())))
                           if hasattr(registry.base, "statistics") else None),
            "options": ", ".join(reg.cls.Options.model_fields),
            "description": summary(reg.cls.__doc__),
        })
    if fmt is not Format.table:
        write_rows(rows, fmt)
        return
    table = Table("name", "version", "plugin", "options", "description", title=kind.value)
    for r in rows:
        table.add_row(r["name"], r["version"], f"{r['plugin']} {r['plugin_version'] or ''}".strip(), r["options"],
                      r["description"])
    out.print(table)


def plugins_command(fmt: FormatOption = Format.table) -> None:
    """Installed plugins: distribution, version, hooks, what each registered, and problems."""
    _plugins(fmt)


@handle_errors
def _plugins(fmt: Format) -> None:
    from ..plugins import get_plugins

    plugins = get_plugins()
    plugins.registries  # noqa: B018 - fills `registered` and registration problems
    rows = []
    for info in plugins.info.values():
        dist, version = plugins.provenance(info.name)
        rows.append({"plugin": info.name, "distribution": dist, "version": version,
                     "hooks": ", ".join(info.hooks), "registered": ", ".join(info.registered),
                     "problem": info.error})
    if fmt is not Format.table:
        write_rows(rows, fmt)
        return
    table = Table("plugin", "distribution", "hooks", "registered", "problem", title="plugins")
    for r in rows:
        table.add_row(r["plugin"], f"{r['distribution'] or ''} {r['version'] or ''}".strip(), r["hooks"],
                      r["registered"], styled((r["problem"], "red")) if r["problem"] else "")
    out.print(table)
