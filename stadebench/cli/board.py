"""`stadebench leaderboard` and `leaderboard compare`: the results as tables."""

from __future__ import annotations

import enum
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table
from rich.text import Text

from ..results.compare import evaluation_label
from ..results.paired import DEFAULT_LEVEL, DEFAULT_RESAMPLES
from ..util import cut, visible
from .common import Format, FormatOption, err, fail, handle_errors, out, styled, write_rows

if TYPE_CHECKING:  # the grid module reads Parquet with pyarrow: imported when a table is shown
    from ..results.grid import Grid, GridCell

__all__ = ["app", "compare", "leaderboard", "show", "show_history", "show_leaderboard"]

app = typer.Typer(help="Show the leaderboard (metric rows × pattern/sparsity columns).")

DirOption = Annotated[Path, typer.Option("--dir", "-d", help="Leaderboard folder.")]
Filter = Annotated[list[str] | None, typer.Option(help="Keep only these (repeatable).")]


def _fmt(value: float | None, precision: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{precision}g}" if abs(value) < 10 ** max(precision, 4) else f"{value:.{max(precision - 1, 1)}e}"


def _relative(cell: GridCell, higher_is_better: bool | None) -> Text:
    """``(+3%)``, red when worse and green when better than dense, plain when the change is
    inside the combined standard error (noise, not a ranking)."""
    rel = cell.relative
    if rel is None:
        return Text()
    if cell.significant is False:
        return styled(" ", (f"(~{rel:+.0%})", "dim"))
    worse = (rel < 0) if higher_is_better else (rel > 0)
    return styled(" ", (f"({rel:+.0%})", "red" if worse else "green"))


def _value_text(cell: GridCell, precision: int) -> str:
    """``value ±stderr``, or for results averaged over calibration seeds ``mean ±sd (n=5)``."""
    text = _fmt(cell.value, precision)
    if cell.n > 1:
        return f"{text} ±{_fmt(cell.sd, 2)} (n={cell.n})"
    return text if cell.stderr is None else f"{text} ±{_fmt(cell.stderr, 2)}"


def _available(table) -> str:
    """What a leaderboard holds, for an error when a filter matched nothing."""
    parts = []
    for field in ("suite", "model", "task", "metric", "pattern"):
        values = sorted({str(v) for v in table[field].to_pylist() if v is not None})
        if values:
            parts.append(f"{field}s: {', '.join(values[:12])}{' …' if len(values) > 12 else ''}")
    sparsities = sorted({v for v in table["sparsity"].to_pylist() if v})
    if sparsities:
        parts.append("sparsities: " + ", ".join(f"{v:g}" for v in sparsities))
    return "; ".join(parts)


def _selected(folder: Path, filters: dict):
    """The current rows the filters keep (the dense baseline kept with metric, pattern or
    sparsity filters); an error listing what exists when nothing matches."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from ..results import store as lb

    everything = lb.current(lb.read(folder))
    if everything.num_rows == 0:
        raise fail(f"no results in {folder}; run a suite first (stadebench run suites/smoke.yaml)")
    table = lb.query(everything, **filters)
    pruning = ("metric", "pattern", "sparsity", "refine", "reconstruct")
    if any(filters.get(k) for k in pruning) and table.num_rows:
        # the dense baseline stays: every change is against it
        cell = {k: v for k, v in filters.items() if k not in pruning}
        dense = lb.query(lb.query(everything, **cell), metric=["dense"])
        table = pa.concat_tables([dense, table.filter(pc.invert(pc.fill_null(pc.equal(table["metric"], "dense"),
                                                                             False)))])
    if table.num_rows == 0:
        given = ", ".join(f"--{k} {' '.join(map(str, v))}" for k, v in filters.items() if v)
        raise fail(f"no results in {folder} for {given}; it holds {_available(everything)}")
    return table


def _split(table) -> bool:
    """Whether tables are shown one per suite: rows of two suites would merge into labels
    of every knob they differ in."""
    return len({s for s in table["suite"].to_pylist() if s is not None}) > 1


def _grids(folder: Path, filters: dict, table=None, seeds: bool = False
           ) -> tuple[list[tuple[str | None, Grid]], int]:
    """``(suite or None, pivot)`` per suite (when several are shown) and (task, score), and
    the number of failed rows; ``table``: the rows ``_selected`` picked, when already read;
    ``seeds``: a row per calibration seed rather than their mean."""
    import pyarrow.compute as pc

    from ..results import store as lb
    from ..results.grid import pivot

    table = _selected(folder, filters) if table is None else table
    ok = table.filter(pc.equal(table["status"], "ok"))
    suites = sorted({s for s in ok["suite"].to_pylist() if s is not None})
    split = _split(ok)
    grids = []
    for suite in suites if split else [None]:
        part = lb.query(ok, suite=suite) if split else ok
        for task_name, score in sorted({(r["task"], r["score"]) for r in part.select(["task", "score"]).to_pylist()
                                        if r["task"] is not None}):
            grid = pivot(part, task_name, score, seeds=seeds)
            if grid.rows:
                grids.append((suite, grid))
    return grids, table.num_rows - ok.num_rows


def _pivot_rows(grids: list[tuple[str | None, Grid]], precision: int) -> list[dict]:
    """The tables as shown, one flat row per table row (for csv, json, markdown, latex)."""
    rows = []
    for suite, grid in grids:
        for row in grid.rows:
            flat = {"suite": suite, "task": grid.task, "score": grid.score, "model": row.model_label,
                    "metric": row.label, "dense": _round(row.dense, precision)}
            if suite is None:
                del flat["suite"]
            for column, cell in grid.cells(row):
                flat[column] = None if cell is None else _round(cell.value, precision)
                flat[f"{column} ±"] = None if cell is None else _round(cell.sd if cell.n > 1 else cell.stderr, 2)
                flat[f"{column} n"] = None if cell is None else cell.n
                flat[f"{column} Δ"] = None if cell is None or cell.relative is None else round(cell.relative, 4)
            rows.append(flat)
    return rows


def _round(value: float | None, precision: int) -> float | None:
    return None if value is None else float(f"{value:.{precision}g}")


def _markdown_cell(cell: GridCell | None, precision: int) -> str:
    """value ± stderr (change vs dense, ~ inside the error); nothing for a missing cell."""
    if cell is None:
        return ""
    text = _value_text(cell, precision)
    if cell.relative is not None:
        mark = "~" if cell.significant is False else ""
        text += f" ({mark}{cell.relative:+.0%})"
    return text


def _markdown(grids: list[tuple[str | None, Grid]], precision: int, latex: bool) -> str:
    """One table per grid, as shown: value ± stderr (change vs dense, ~ inside the error)."""
    blocks = []
    for suite, grid in grids:
        arrow = "↑" if grid.higher_is_better else "↓"
        title = visible(" · ".join(filter(None, [suite, grid.task, grid.score])) + f" {arrow}")
        header = ["model", "metric", "dense", *map(visible, grid.columns)]
        body = [[visible(row.model_label), visible(row.label), _fmt(row.dense, precision),
                 *(_markdown_cell(cell, precision) for _, cell in grid.cells(row))] for row in grid.rows]
        if latex:
            esc = [[_tex(c) for c in r] for r in [header, *body]]
            lines = [f"% {title}", "\\begin{tabular}{ll" + "r" * (len(header) - 2) + "}", "\\toprule",
                     " & ".join(esc[0]) + " \\\\", "\\midrule", *(" & ".join(r) + " \\\\" for r in esc[1:]),
                     "\\bottomrule", "\\end{tabular}"]
        else:
            lines = [f"**{title}**", "", "| " + " | ".join(header) + " |",
                     "|" + "|".join(["---", "---"] + ["---:"] * (len(header) - 2)) + "|",
                     *("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in body)]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def _tex(text: str) -> str:
    for a, b in (("\\", "\\textbackslash{}"), ("&", "\\&"), ("%", "\\%"), ("_", "\\_"), ("#", "\\#"),
                 ("±", "$\\pm$"), ("~", "$\\sim$"), ("→", "$\\to$")):
        text = text.replace(a, b)
    return text


def show_leaderboard(folder: Path, *, fmt: Format = Format.table, precision: int = 4, long: bool = False,
                     published: Path | None = None, seeds: bool = False, **filters) -> None:
    """Print one pivot table per (suite when several, task, score) of the current results,
    or the same tables as Markdown, LaTeX, CSV or JSON; ``long``: the tidy rows.

    ``published``: a folder of published results; under each table, the published rows of
    its cells: beside ours with the relative difference where the protocol matches, else
    the knobs that differ. With ``long``, JSON or CSV: those comparison rows instead.
    Results that differ only in their calibration seed are one cell (mean ± sd, n) unless
    ``seeds``.
    """
    table = _selected(folder, filters)
    grids, failed = _grids(folder, filters, table, seeds)
    papers = None if published is None else _papers(table, published)
    if papers is not None and (long or fmt in (Format.json, Format.csv)):
        write_rows(_paper_rows(papers), Format.csv if fmt in (Format.table, Format.latex) else fmt)
        return
    if long:
        write_rows(_long_rows(grids), Format.csv if fmt in (Format.table, Format.latex) else fmt)
        return
    if fmt in (Format.markdown, Format.latex):
        sys.stdout.write(_markdown(grids, precision, fmt is Format.latex))
        if papers:
            sys.stdout.write("\n")
            write_rows(_paper_rows(papers, precision), fmt)
        return
    if fmt is not Format.table:
        write_rows(_pivot_rows(grids, precision), fmt)
        return
    for suite, grid in grids:
        out.print(_table(suite, grid, precision))
        if papers:
            _print_papers([c for c in papers if (c.ours["suite"] if suite else None, c.ours["task"],
                                                 c.ours["score"]) == (suite, grid.task, grid.score)],
                          precision)
    if papers == []:
        err.print(f"no published result in {published} is of a cell shown here")
    if failed:
        err.print(f"{failed} failed row(s) not shown; see `stadebench leaderboard --long --format json` "
                  "or the error column")


def _long_rows(grids: list[tuple[str | None, Grid]]) -> list[dict]:
    """The tidy rows: one per (table row, column with a value), at full precision."""
    rows = []
    for _, grid in grids:
        for row in grid.rows:
            for column, cell in grid.cells(row):
                if cell is not None:
                    rows.append({"model": row.model, "metric": row.label, "task": grid.task, "score": grid.score,
                                 "column": column, "value": cell.value, "stderr": cell.stderr, "sd": cell.sd,
                                 "n": cell.n, "dense": row.dense, "relative": cell.relative})
    return rows


def _table(suite: str | None, grid: Grid, precision: int) -> Table:
    """One grid as a rich table: value ± stderr and the coloured change vs dense per cell,
    what the asset models really are in the caption."""
    arrow = "↑" if grid.higher_is_better else "↓"
    title = " · ".join(filter(None, [suite, grid.task, grid.score])) + f" {arrow}"
    view = Table(title=title, title_justify="left")
    view.add_column("model")
    view.add_column("metric")
    view.add_column("dense", justify="right")
    for column in grid.columns:
        view.add_column(column, justify="right")
    for row in grid.rows:
        cells = ["" if cell is None else styled(_value_text(cell, precision))
                 + _relative(cell, grid.higher_is_better) for _, cell in grid.cells(row)]
        view.add_row(row.model, row.label, _fmt(row.dense, precision), *cells)
    named = grid.model_labels()
    if named:
        view.caption, view.caption_justify = "; ".join(named), "left"
    return view


# --- published results beside ours ------------------------------------------------------


def _papers(table, folder: Path) -> list:
    """The published rows of ``folder`` against the ok rows of ``table`` (bench.published.compare)."""
    from ..results import published as pub

    return pub.compare(table.to_pylist(), pub.load_published(folder))


def _subject_label(r: dict) -> str:
    """``wanda · unstructured · 0.5 [· owl]``, or ``dense``."""
    if r["metric"] == "dense":
        return "dense"
    label = f"{r['metric']} · {r['pattern']} · {r['sparsity']:g}"
    return label if r["allocation"] in (None, "uniform") else f"{label} · {r['allocation']}"


def _differs_text(differs: list) -> str:
    from ..results.published import show_value

    return ", ".join(f"{k} (ours {show_value(a)} vs paper {show_value(b)})" for k, a, b in differs)


def _paper_rows(papers: list, precision: int | None = None) -> list[dict]:
    """One flat row per comparison: ours, the paper's, the relative difference, or why not compared."""
    def num(v):
        return v if precision is None or v is None else _round(v, precision)

    return [{"model": c.ours["model"], "cell": _subject_label(c.ours), "evaluation": evaluation_label(c.ours),
             "ours": num(c.ours["value"]) if c.compared else None, "paper": num(c.published.value),
             "relative": None if c.relative is None else round(c.relative, 4), "published": c.published.ref,
             "not compared: protocol differs in": _differs_text(c.differs) or None}
            for c in papers]


def _print_papers(papers: list, precision: int) -> None:
    """The compared rows as a table under their grid; the others as one line each."""
    compared = [c for c in papers if c.compared]
    if compared:
        view = Table("model", "cell", "ours", "paper", "ours vs paper", "published", title="published results",
                     title_justify="left")
        for c in compared:
            view.add_row(c.ours["model"], _subject_label(c.ours), _fmt(c.ours["value"], precision),
                         _fmt(c.published.value, precision), "—" if c.relative is None else f"{c.relative:+.1%}",
                         c.published.ref)
        out.print(view)
    for c in papers:
        if not c.compared:
            out.print(f"paper value {_fmt(c.published.value, precision)} ({c.published.ref}) not compared with "
                      f"{c.ours['model']} · {_subject_label(c.ours)}: protocol differs in "
                      f"{_differs_text(c.differs)}")


Precision = Annotated[int, typer.Option(min=1, max=12, help="Significant digits of values in tables and exports.")]
Long = Annotated[bool, typer.Option("--long", help="The tidy rows (one per model, metric, column) at full "
                                                   "precision, instead of the tables.")]
SparsityFilter = Annotated[list[float] | None, typer.Option(help="Keep only these sparsities (repeatable).")]


@app.callback(invoke_without_command=True)
def leaderboard(
    ctx: typer.Context,
    folder: DirOption = Path("leaderboard"),
    suite: Filter = None,
    model: Filter = None,
    task: Filter = None,
    metric: Filter = None,
    pattern: Filter = None,
    sparsity: SparsityFilter = None,
    refine: Filter = None,
    reconstruct: Filter = None,
    fmt: FormatOption = Format.table,
    precision: Precision = 4,
    long: Long = False,
    history: Annotated[bool, typer.Option("--history", help="List the superseded rows (moved under "
                                                              "_history/ by re-runs) instead.")] = False,
    published: Annotated[Path | None, typer.Option(
        "--published", help="Folder of published results (e.g. published): each one beside our value of the same "
                            "cell where the protocol matches, else the knobs that differ.")] = None,
    seeds: Annotated[bool, typer.Option("--seeds", help="A row per calibration seed instead of their mean ± sd "
                                                        "(n).")] = False,
) -> None:
    """Show the current results: one table per task and score, dense baseline and change
    (± standard error, or ± sd over calibration seeds with their n; a change that a paired
    bootstrap over the evaluation items cannot tell from noise is marked ~)."""
    if ctx.invoked_subcommand is None:
        filters = {"suite": suite, "model": model, "task": task, "metric": metric, "pattern": pattern,
                   "sparsity": sparsity, "refine": refine, "reconstruct": reconstruct}
        if history:
            handle_errors(show_history)(folder, suite=suite, model=model, task=task, fmt=fmt)
        else:
            handle_errors(show_leaderboard)(folder, fmt=fmt, precision=precision, long=long, published=published,
                                            seeds=seeds, **filters)


HISTORY_COLUMNS = ("created_at", "run_id", "model", "metric", "pattern", "sparsity", "task", "score", "value",
                   "status")


def show_history(folder: Path, *, suite=None, model=None, task=None, fmt: Format = Format.table) -> None:
    """Print the superseded rows, oldest first, as a flat table."""
    from ..results import store as lb

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

    from ..results import store as lb

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
        raise fail(f"no cell matches {cut(cell)!r} in {folder}; cells: " + "; ".join(close[:8])
                   + (" …" if len(close) > 8 else ""))
    if len(found) > 1:
        listed = "; ".join(f"{_cell_label(r)} [{r['cell_key'][:12]}]" for r in found.values())
        raise fail(f"{cut(cell)!r} matches {len(found)} pruned cells: {listed}; give more of the label or a key")
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
    refine = "refine"
    reconstruct = "reconstruct"


@app.command()
def compare(
    a: Annotated[str, typer.Argument(help="First run id or metric.")],
    b: Annotated[str, typer.Argument(help="Second run id or metric.")],
    by: Annotated[By, typer.Option(help="Compare two metrics, refiners or reconstructors (none: without the "
                                        "stage), everything else the same; or two runs (same cells).")] = By.metric,
    folder: DirOption = Path("leaderboard"),
    fmt: FormatOption = Format.table,
    resamples: Annotated[int, typer.Option(min=100, max=1_000_000, help="Bootstrap resamples of the paired "
                                           "interval.")] = DEFAULT_RESAMPLES,
    level: Annotated[float, typer.Option(min=0.5, max=0.999, help="Level of the paired interval.")] = DEFAULT_LEVEL,
    model: Filter = None,
    task: Filter = None,
    metric: Filter = None,
    pattern: Filter = None,
    sparsity: SparsityFilter = None,
    refine: Annotated[list[str] | None, typer.Option(help="Keep only these refiners (none: without one; "
                                                          "repeatable).")] = None,
    reconstruct: Annotated[list[str] | None, typer.Option(help="Keep only these reconstructors (none: without "
                                                               "one; repeatable).")] = None,
) -> None:
    """Put two runs or two metrics side by side, matched on everything else; each difference
    (b − a) judged by a paired bootstrap over shared windows/documents and calibration seeds.
    The filters keep only the matching cells (not the field compared)."""
    filters = {"model": model, "task": task, "metric": metric, "pattern": pattern, "sparsity": sparsity,
               "refine": refine, "reconstruct": reconstruct}
    _compare(a, b, by, folder, fmt, resamples, level, filters)


@handle_errors
def _compare(a: str, b: str, by: By, folder: Path, fmt: Format, resamples: int, level: float,
             filters: dict | None = None) -> None:
    from ..results import store as lb
    from ..results.compare import BY, compare_rows, side_of

    # a run's rows that a later run superseded live in _history/
    table = lb.read(folder, history=True) if by is By.run else lb.current(lb.read(folder))
    field = BY[by.value][0]
    if (filters or {}).get(by.value):
        raise fail(f"--{by.value} filters what --by {by.value} compares: name the two sides instead "
                   f"(stadebench leaderboard compare A B --by {by.value})")
    known = {side for r in table.select(["metric", field]).to_pylist() if (side := side_of(r, by.value))}
    for name in (a, b):
        if name not in known:
            from ..util import did_you_mean

            listed = sorted(known)
            raise fail(f"no results with {field} = {cut(name)!r} in {folder}{did_you_mean(name, listed)} "
                       f"({field}s: {', '.join(listed[:12])}{' …' if len(listed) > 12 else ''})")
    rows = compare_rows(lb.query(table, **(filters or {})), a, b, by.value, resamples=resamples, level=level)
    if not rows:
        given = " ".join(f"--{k} {v}" for k, vs in (filters or {}).items() for v in vs or ())
        raise fail(f"{cut(a)!r} and {cut(b)!r} share no cells to compare in {folder}"
                   f"{' with ' + given if given else ''}")
    if fmt is not Format.table:
        write_rows(rows, fmt)
        return
    _print_comparison(rows, a, b, by, level)


def _print_comparison(rows: list[dict], a: str, b: str, by: By, level: float) -> None:
    hidden = {"level", "ci_low", "ci_high", "items"} | ({"metric"} if by is By.metric else set())
    if all(r["side_a"] == a and r["side_b"] == b for r in rows):
        hidden |= {"side_a", "side_b"}  # each side ran with one option set: its name says it
    if by in (By.refine, By.reconstruct):
        hidden.discard("metric")
    if all(r["calibration"] == "—" for r in rows):
        hidden.add("calibration")
    hidden |= {c for c in ("refine", "reconstruct") if all(r.get(c) is None for r in rows)}
    columns = [c for c in rows[0] if c not in hidden]
    ci = f"{level:.0%} CI"
    columns.insert(columns.index("delta") + 1, ci)
    view = Table(*columns, title=f"{a} vs {b} (delta = {b} − {a}; ~: no detectable difference)")
    for r in rows:
        interval = "—" if r["ci_low"] is None else f"{_fmt(r['ci_low'])} … {_fmt(r['ci_high'])}"
        cells = {**r, ci: interval} | {c: r[c] or "none" for c in ("refine", "reconstruct") if c in r}
        view.add_row(*[_fmt(cells[c]) if isinstance(cells[c], float) else str(cells[c]) for c in columns])
    out.print(view)
