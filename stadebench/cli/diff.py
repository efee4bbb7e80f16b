"""`stadebench diff A B`: the protocol knobs on which two results differ — why two numbers differ."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ..util import cut
from .common import Format, FormatOption, err, fail, handle_errors, out, write_rows

Side = Annotated[str, typer.Argument(help="A cell key (or its first characters), part of a cell label such as "
                                          "'wanda · unstructured · 0.5', or published:<file>:<row id>.")]
DirOption = Annotated[Path, typer.Option("--dir", "-d", help="Leaderboard folder.")]
PublishedOption = Annotated[Path, typer.Option("--published", help="Folder of published results.")]


def diff(
    a: Side,
    b: Side,
    folder: DirOption = Path("leaderboard"),
    published: PublishedOption = Path("published"),
    fmt: FormatOption = Format.table,
) -> None:
    """The protocol knobs on which two results differ (a knob | A | B table), or "same protocol"."""
    _diff(a, b, folder, published, fmt)


def label(r: dict[str, Any]) -> str:
    """``model · metric · pattern · sparsity [· allocation] · evaluator(dataset, split, seqlen=…)``."""
    parts = [r["model"], r["metric"]]
    if r["metric"] != "dense":
        parts += [r["pattern"], f"{r['sparsity']:g}"]
        if r["allocation"] not in (None, "uniform"):
            parts.append(r["allocation"])
    evaluation = [p for p in (r["eval_dataset"], r["eval_split"]) if p]
    if r["eval_seqlen"] is not None:
        evaluation.append(f"seqlen={r['eval_seqlen']}")
    parts.append(f"{r['evaluator']}({', '.join(evaluation)})")
    return " · ".join(str(p) for p in parts)


def _cells(folder: Path) -> dict[str, dict[str, Any]]:
    """One ok row per cell key of the current results (a key's rows share its protocol)."""
    from ..results import store as lb

    cells: dict[str, dict[str, Any]] = {}
    for r in lb.current(lb.read(folder)).to_pylist():
        if r["status"] == "ok":
            cells.setdefault(r["cell_key"], r)
    return cells


def _resolve(ref: str, folder: Path, published: Path, memo: dict) -> tuple[str, dict[str, Any], Any]:
    """``(name shown, protocol fields, the published row or None)`` for one side."""
    from ..results import published as pub
    from ..util import close_matches

    if ref.startswith(pub.PREFIX):
        if "published" not in memo:
            memo["published"] = pub.load_published(published)
        try:
            row = pub.find_published(memo["published"], ref)
        except pub.PublishedError as exc:  # it quotes the file and row id given: cut them as ours are
            file, _, rid = ref.removeprefix(pub.PREFIX).partition(":")
            message = str(exc)
            for part in (file.removesuffix(".yaml"), rid):
                message = message.replace(repr(part), repr(cut(part)))
            raise pub.PublishedError(message) from None
        return row.ref, row.protocol(), row
    if "cells" not in memo:
        memo["cells"] = _cells(folder)
    cells = memo["cells"]
    if not cells:
        raise fail(f"no results in {folder} to find {cut(ref)!r} in (or name a published row: "
                   "published:<file>:<id>)")
    found = {k: r for k, r in cells.items() if k.startswith(ref)} or \
        {k: r for k, r in cells.items() if ref == label(r)} or {k: r for k, r in cells.items() if ref in label(r)}
    if not found:
        labels = sorted(label(r) for r in cells.values())
        close = close_matches(ref, labels, n=4, cutoff=0.3) or labels[:4]
        raise fail(f"no cell matches {cut(ref)!r} in {folder}; close: " + "; ".join(close))
    if len(found) > 1:
        listed = "; ".join(f"{label(r)} [{k[:12]}]" for k, r in sorted(found.items(), key=lambda kv: label(kv[1])))
        raise fail(f"{cut(ref)!r} matches {len(found)} cells: {listed}; give more of the label or a cell key")
    key, row = next(iter(found.items()))
    return f"{label(row)} [{key[:12]}]", row, None


@handle_errors
def _diff(a: str, b: str, folder: Path, published: Path, fmt: Format) -> None:
    from ..results import published as pub

    memo: dict = {}
    (name_a, fields_a, row_a), (name_b, fields_b, row_b) = (_resolve(s, folder, published, memo) for s in (a, b))
    differs = pub.protocol_diff(fields_a, fields_b)
    uncounted = pub.uncounted_diff(fields_a, fields_b) if row_a is None and row_b is None else []
    notes = [f"{r.ref}: {r.note}" for r in (row_a, row_b) if r is not None and r.note]
    if fmt is Format.json:
        def plain(items):
            def value(v):
                return "unpinned" if v is pub.UNPINNED else None if v is pub.ABSENT else v

            return [{"knob": k, "a": value(va), "b": value(vb)} for k, va, vb in items]

        print(json.dumps({"a": name_a, "b": name_b, "same_protocol": not differs, "differs": plain(differs),
                          "not_counted": plain(uncounted), "notes": notes}, indent=2, default=str))
        return
    if fmt is not Format.table:
        write_rows([{"knob": k, "a": pub.show_value(va), "b": pub.show_value(vb)} for k, va, vb in differs], fmt)
        return
    out.print(f"A: {name_a}")
    out.print(f"B: {name_b}")
    if not differs:
        out.print("same protocol")
    else:
        view = Table("knob", "A", "B", title=f"{len(differs)} protocol knob(s) differ", title_justify="left")
        for knob, va, vb in differs:
            view.add_row(knob, pub.show_value(va), pub.show_value(vb))
        out.print(view)
    if uncounted:
        out.print("also different, outside the protocol (docs/reproducing.md): "
                  + ", ".join(f"{k} ({pub.show_value(va)} vs {pub.show_value(vb)})" for k, va, vb in uncounted))
    for note in notes:
        err.print(f"note: {note}")


__all__ = ["diff", "label"]
