"""`stadebench leaderboard` and `leaderboard compare`: the results as tables."""

from __future__ import annotations

import enum
import math
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from .common import Format, FormatOption, err, fail, handle_errors, out, styled, write_rows

app = typer.Typer(help="Show the leaderboard (metric rows × pattern/sparsity columns).")

DirOption = Annotated[Path, typer.Option("--dir", "-d", help="Leaderboard folder.")]
Filter = Annotated[list[str] | None, typer.Option(help="Keep only these (repeatable).")]


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}"


def _relative(rel: float | None, higher_is_better: bool | None) -> Text:
    if rel is None:
        return Text()
    worse = (rel < 0) if higher_is_better else (rel > 0)
    return styled(" ", (f"({rel:+.0%})", "red" if worse else "green"))


def show_leaderboard(folder: Path, *, suite=None, model=None, task=None, fmt: Format = Format.table) -> None:
    """Print one pivot table per (task, score) of the current results."""
    from ..bench import leaderboard as lb

    table = lb.query(lb.current(lb.read(folder)), suite=suite, model=model, task=task)
    if table.num_rows == 0:
        err.print(f"no results in {folder}" + (" for these filters" if any((suite, model, task)) else ""))
        return
    ok = [r for r in table.to_pylist() if r["status"] == "ok"]
    pairs = sorted({(r["task"], r["score"]) for r in ok})
    if fmt is not Format.table:
        rows = []
        for task_name, score in pairs:
            grid = lb.pivot(table, task_name, score)
            for row in grid["rows"]:
                for column in grid["columns"]:
                    cell = row["values"].get(column)
                    if cell:
                        rows.append({"model": row["model"], "metric": row["label"], "task": task_name,
                                     "score": score, "column": column, "value": cell["value"],
                                     "stderr": cell["stderr"], "dense": row["dense"],
                                     "relative": cell["relative"]})
        write_rows(rows, fmt)
        return
    for task_name, score in pairs:
        grid = lb.pivot(table, task_name, score)
        if not grid["rows"]:
            continue
        arrow = "↑" if grid["higher_is_better"] else "↓"
        view = Table(title=f"{task_name} · {score} {arrow}", title_justify="left")
        view.add_column("model")
        view.add_column("metric")
        view.add_column("dense", justify="right")
        for column in grid["columns"]:
            view.add_column(column, justify="right")
        for row in grid["rows"]:
            cells = []
            for column in grid["columns"]:
                cell = row["values"].get(column)
                cells.append("" if cell is None else styled(_fmt(cell["value"]))
                             + _relative(cell["relative"], grid["higher_is_better"]))
            view.add_row(row["model"], row["label"], _fmt(row["dense"]), *cells)
        out.print(view)
    failed = table.num_rows - len(ok)
    if failed:
        err.print(f"{failed} failed row(s) not shown; see `stadebench leaderboard --format json` "
                  "or the error column")


@app.callback(invoke_without_command=True)
def leaderboard(
    ctx: typer.Context,
    folder: DirOption = Path("leaderboard"),
    suite: Filter = None,
    model: Filter = None,
    task: Filter = None,
    fmt: FormatOption = Format.table,
    history: Annotated[bool, typer.Option("--history", help="List the superseded rows (moved under "
                                                              "_history/ by re-runs) instead.")] = False,
) -> None:
    """Show the current results: one table per task and score, dense baseline and change."""
    if ctx.invoked_subcommand is None:
        if history:
            handle_errors(show_history)(folder, suite=suite, model=model, task=task, fmt=fmt)
        else:
            handle_errors(show_leaderboard)(folder, suite=suite, model=model, task=task, fmt=fmt)


HISTORY_COLUMNS = ("created_at", "run_id", "model", "metric", "pattern", "sparsity", "task", "score", "value",
                   "status")


def show_history(folder: Path, *, suite=None, model=None, task=None, fmt: Format = Format.table) -> None:
    """Print the superseded rows, oldest first, as a flat table."""
    from ..bench import leaderboard as lb

    table = lb.query(lb.superseded(folder), suite=suite, model=model, task=task)
    if table.num_rows == 0:
        err.print(f"no superseded results in {folder}")
        return
    rows = table.sort_by("created_at").select(list(HISTORY_COLUMNS)).to_pylist()
    if fmt is not Format.table:
        write_rows(rows, fmt)
        return
    view = Table(*HISTORY_COLUMNS, title=f"superseded results in {folder}", title_justify="left")
    for r in rows:
        view.add_row(*[_fmt(v) if isinstance(v, float) else "" if v is None else str(v) for v in r.values()])
    out.print(view)


LAYER_COLUMNS = ("name", "role", "rows", "columns", "allocated", "sparsity", "pruned", "bias_added", "block_mse",
                 "output_mse")


def _cell_label(r: dict) -> str:
    label = f"{r['model']} · {r['metric']} · {r['pattern']} · {r['sparsity']:g}"
    return label if r["allocation"] in (None, "uniform") else f"{label} · {r['allocation']}"


@app.command()
def show(
    cell: Annotated[str, typer.Argument(help="A cell key (or its first characters) or part of a cell label, "
                                             "e.g. 'wanda · unstructured · 0.7 · owl'.")],
    folder: DirOption = Path("leaderboard"),
    fmt: FormatOption = Format.table,
) -> None:
    """One pruned cell, layer by layer: allocated and realised sparsity, reconstruction errors."""
    _show(cell, folder, fmt)


@handle_errors
def _show(cell: str, folder: Path, fmt: Format) -> None:
    import pyarrow.compute as pc

    from ..bench import leaderboard as lb

    table = lb.current(lb.read(folder))
    rows = [r for r in table.filter(pc.is_valid(table["layers"])).to_pylist() if r["status"] == "ok"]
    if not rows:
        raise fail(f"no pruned cell with per-layer records in {folder}")
    # the evaluations of one pruned model share its layers: one entry per model pruned
    found: dict[str, dict] = {}
    for r in rows:
        if r["cell_key"].startswith(cell) or cell in _cell_label(r):
            found.setdefault(_cell_label(r) + " " + lb.canonical_json(r["layers"]), r)
    if not found:
        close = sorted({_cell_label(r) for r in rows})
        raise fail(f"no cell matches {cell!r} in {folder}; cells: " + "; ".join(close[:8])
                   + (" …" if len(close) > 8 else ""))
    if len(found) > 1:
        listed = "; ".join(f"{_cell_label(r)} [{r['cell_key'][:12]}]" for r in found.values())
        raise fail(f"{cell!r} matches {len(found)} pruned cells: {listed}; give more of the label or a key")
    r = next(iter(found.values()))
    layers = [{k: layer[k] for k in ("block", *LAYER_COLUMNS)} | {"dense": layer["dense"]} for layer in r["layers"]]
    if fmt is not Format.table:
        write_rows(layers, fmt)
        return
    pruned = [layer for layer in layers if not layer["dense"]]
    title = (f"{_cell_label(r)} — target {r['sparsity']:g} over {len(pruned)} pruned layer(s), realised "
             f"{r['actual_sparsity']:.4f}; {r['dense_layers'] or 0} left dense")
    view = Table("block", *LAYER_COLUMNS, title=title, title_justify="left")
    for layer in layers:
        values = [layer["block"], layer["name"].rsplit(".", 2)[-2] + "." + layer["name"].rsplit(".", 1)[-1],
                  *(layer[c] for c in LAYER_COLUMNS[1:])]
        if layer["dense"]:
            values[5:8] = ["dense", "0", "0"]
        view.add_row(*[_fmt(v) if isinstance(v, float) else "" if v is None else str(v) for v in values])
    out.print(view)


class By(str, enum.Enum):
    run = "run"
    metric = "metric"


@app.command()
def compare(
    a: Annotated[str, typer.Argument(help="First run id or metric.")],
    b: Annotated[str, typer.Argument(help="Second run id or metric.")],
    by: Annotated[By, typer.Option(help="Compare two runs (same cells) or two metrics (same settings).")] = By.metric,
    folder: DirOption = Path("leaderboard"),
    fmt: FormatOption = Format.table,
) -> None:
    """Put two runs or two metrics side by side, matched on everything else."""
    _compare(a, b, by, folder, fmt)


@handle_errors
def _compare(a: str, b: str, by: By, folder: Path, fmt: Format) -> None:
    from ..bench import leaderboard as lb

    # a run's rows that a later run superseded live in _history/
    table = lb.read(folder, history=True) if by is By.run else lb.current(lb.read(folder))
    field = "run_id" if by is By.run else "metric"
    # two metrics are matched on model, pattern, sparsity and evaluation: a data-free
    # metric has no calibration to match, so calibration is left out of the match too
    ignore = {"run_id"} if by is By.run else {"metric", "metric_version", "metric_options", "metric_plugin",
                                              *(f for f in lb.KEY_FIELDS if f.startswith("calib_")),
                                              "sequential", "batch_size"}
    key_fields = [f for f in (*lb.KEY_FIELDS, "task", "score") if f not in ignore]
    if by is By.run:
        key_fields.insert(0, "cell_key")
    sides: dict[str, dict[tuple, dict]] = {a: {}, b: {}}
    for r in table.to_pylist():
        if r[field] in sides and r["status"] == "ok":
            sides[r[field]][tuple(str(r[f]) for f in key_fields)] = r
    for name, rows in sides.items():
        if not rows:
            raise fail(f"no results with {field} = {name!r} in {folder}")
    rows = []
    for key in sorted(sides[a].keys() & sides[b].keys()):
        ra, rb = sides[a][key], sides[b][key]
        delta = rb["value"] - ra["value"] if None not in (ra["value"], rb["value"]) else None
        rows.append({"model": ra["model"], "metric": ra["metric"] if by is By.run else None,
                     "pattern": ra["pattern"], "sparsity": ra["sparsity"], "task": ra["task"],
                     "score": ra["score"], a: ra["value"], b: rb["value"], "delta": delta})
    if not rows:
        raise fail(f"{a!r} and {b!r} share no cells to compare in {folder}")
    if fmt is not Format.table:
        write_rows(rows, fmt)
        return
    view = Table(*[c for c in rows[0] if not (c == "metric" and by is By.metric)], title=f"{a} vs {b}")
    for r in rows:
        view.add_row(*[_fmt(v) if isinstance(v, float) else str(v) for c, v in r.items()
                       if not (c == "metric" and by is By.metric)])
    out.print(view)
