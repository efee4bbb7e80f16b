"""`stadebench report`: the leaderboard as a static, self-contained HTML page with figures.

``build_report`` writes ``index.html`` (the pivot tables against dense, a figure per model
× task × score of the score against sparsity, per-cell provenance and per-layer records on
demand, and the diagnostics plots when the leaderboard holds ``layer_diagnostics``) and
every figure as PNG, SVG and PDF under ``figures/``. The plotted data are embedded in the
page (``<script type="application/json" id="figure-data">``), checked to equal what
matplotlib drew. See docs/report.md.

The report is built in a hidden folder and moved into place: a report that fails or is
stopped halfway leaves no half-written report folder (a new folder appears whole, by one
rename; in an existing one the figures are replaced first and ``index.html`` last, so its
page is always a whole one). A stopped build's hidden folder is removed by the next report.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import uuid
from collections import defaultdict
from datetime import datetime, timezone
from html import escape
from pathlib import Path

from ..errors import ConfigError
from ..results.grid import Grid, pivot
from ..util import atomic_write
from ..version import __version__
from . import page, series
from .figures import FORMATS, save
from .select import EmptySelection, select

__all__ = ["FORMATS", "EmptySelection", "build_report", "select"]


def _sections(table, ok: list[dict]) -> list[dict]:
    """Per task: its figures' specs and, per score, the pivot and the rows behind its cells."""
    by_pair: dict[tuple, list[dict]] = defaultdict(list)
    for r in ok:
        if r["task"] is not None and r["score"] is not None:
            by_pair[(r["task"], r["score"])].append(r)
    tasks: dict[str, dict] = {}
    for (task, score) in sorted(by_pair, key=lambda p: (series.is_diagnostics(by_pair[p]), p)):
        rows = by_pair[(task, score)]
        grid = pivot(table, task, score)
        if not grid.rows:
            continue
        matched = series.match_cells(grid, [r for r in rows if r["metric"] != "dense"])
        section = tasks.setdefault(task, {"task": task, "specs": [], "tables": []})
        if series.is_diagnostics(rows):
            section["diagnostics"] = True
        else:
            section["specs"] += series.sweep_specs(grid, matched, rows) + series.stage_specs(grid, matched, rows)
        dense = {(r["model"], r["value"]): r for r in rows if r["metric"] == "dense"}
        section["tables"].append((grid, matched, dense))
    diagnosed = [r for r in ok if r["layer_diagnostics"]]
    if diagnosed:
        section = tasks.setdefault(series.DIAGNOSTICS, {"task": series.DIAGNOSTICS, "specs": [], "tables": []})
        section["specs"] = series.diagnostic_specs(diagnosed) + section["specs"]
    return list(tasks.values())


def _grid_section(grid: Grid, matched: dict, dense: dict) -> list[str]:
    """One grid's heading, its table and the details blocks its values link to."""
    arrow = {True: " ↑", False: " ↓"}.get(grid.higher_is_better, "")
    table_html, blocks = page.pivot_table(grid, matched, dense)
    dense_blocks = [page.details(r, f"{r['model']} · dense") for r in dense.values()]
    return [f"<h3>{escape(grid.task)} · {escape(grid.score)}{arrow}</h3>", table_html,
            f"<details><summary>cell details ({len(blocks) + len(dense_blocks)})</summary>",
            *dense_blocks, *blocks, "</details>"]


def _task_sections(sections: list[dict], drawn: dict[str, tuple[dict, bytes]]) -> tuple[list[str], list[tuple]]:
    """The HTML of each task (its figures, then its grids) and the (anchor, task) of each for the navigation."""
    html, nav = [], []
    for k, section in enumerate(sections):
        anchor = f"task-{k}"
        nav.append((anchor, section["task"]))
        parts = [f'<h2 id="{anchor}">{escape(section["task"])}</h2>']
        for spec in section["specs"]:
            parts.append(page.figure(spec, drawn[spec["slug"]][1], spec["files"]))
        for grid, matched, dense in section["tables"]:
            parts += _grid_section(grid, matched, dense)
        html.append("\n".join(parts))
    return html, nav


def _intro(folder: Path, filters: dict, table, failed: list[dict]) -> str:
    given = ", ".join(f"{k} = {' | '.join(map(str, v if isinstance(v, (list, tuple)) else [v]))}"
                      for k, v in filters.items() if v)
    cells = len({r for r in table["cell_key"].to_pylist()})
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = (f"<p>Leaderboard <code>{escape(str(folder))}</code>{escape(' · ' + given) if given else ''}: "
            f"{cells} result key(s), {table.num_rows} row(s). Generated {when} by stadebench {escape(__version__)}. "
            "Every value links to its provenance and, for a pruned cell, its per-layer records; figures link to "
            "their PNG, SVG and PDF files.</p>")
    if failed:
        text += f'<p class="worse">{len(failed)} failed row(s): see <a href="#failed">failed</a>.</p>'
    return text


def _failed(rows: list[dict]) -> str:
    body = "".join(
        f"<tr><td class=label>{escape(str(r['model']))}</td><td class=label>{escape(str(r['metric']))}</td>"
        f"<td class=label>{escape(str(r['pattern'] or ''))}</td><td>{escape(page.fmt_value(r['sparsity']))}</td>"
        f"<td class=label>{escape(str(r['task'] or ''))}</td><td class=label>{escape((r['error'] or '')[:300])}</td>"
        "</tr>" for r in rows)
    return ('<h2 id="failed">Failed</h2><table><thead><tr><th class=label>model</th><th class=label>metric</th>'
            "<th class=label>pattern</th><th>sparsity</th><th class=label>task</th><th class=label>error</th></tr>"
            f"</thead><tbody>{body}</tbody></table>")


def _published(ok: list[dict], published: str | os.PathLike) -> str:
    """The published rows of the shown cells: beside ours where the protocol matches, else
    the knobs that differ (nothing compared)."""
    from ..results.published import compare, load_published, show_value

    comparisons = compare(ok, load_published(published))
    if not comparisons:
        return ""
    rows = []
    for c in comparisons:
        paper, ours = c.published, c.ours
        cell = f"{ours['model']} · {ours['metric']} · {ours['pattern'] or ''} · {ours['sparsity']:g}"
        if c.compared:
            verdict = f"{c.relative:+.1%}" if c.relative is not None else ""
        else:
            verdict = "not compared: protocol differs in " + ", ".join(
                f"{k} (ours {show_value(a)} vs paper {show_value(b)})" for k, a, b in c.differs)
        rows.append(f"<tr><td>{escape(cell)}</td><td>{escape(str(paper.task))} · {escape(str(paper.score))}</td>"
                    f"<td>{escape(page.fmt_value(ours['value']))}</td><td>{escape(page.fmt_value(paper.value))}</td>"
                    f"<td>{escape(verdict)}</td><td>{escape(paper.ref)}</td></tr>")
    return ('<h2 id="published">published</h2><table><thead><tr><th>cell</th><th>task</th><th>ours</th>'
            '<th>paper</th><th>difference</th><th>source</th></tr></thead><tbody>' + "".join(rows)
            + "</tbody></table>")


def _forget_stale(figures_dir: Path, written: set[str]) -> None:
    """Remove the figures the last report listed and this one did not write, then list this one's."""
    manifest = figures_dir / ".written"
    if not written and not manifest.exists():
        return
    try:
        earlier = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # no earlier report here, or a damaged list: remove nothing
        earlier = []
    for name in earlier if isinstance(earlier, list) else []:
        # plain figure names only: a list edited to hold paths removes nothing outside figures/
        if isinstance(name, str) and name not in written and Path(name).name == name and \
                Path(name).suffix.lstrip(".") in FORMATS:
            (figures_dir / name).unlink(missing_ok=True)
    figures_dir.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps(sorted(written)), encoding="utf-8")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # someone else's process
        return True
    return True


def _stage(out_dir: Path) -> tuple[Path, list[Path]]:
    """A new hidden folder to build in, on the file system of ``out_dir`` (inside it when it
    exists, else beside it), and the folders made on the way (removed again on failure).
    Stage folders of builds whose process is gone are removed first."""
    home = out_dir if out_dir.is_dir() else out_dir.parent
    made = []
    for parent in [home, *home.parents]:
        if parent.exists():
            break
        made.append(parent)
    home.mkdir(parents=True, exist_ok=True)
    prefix = ".report-" if home == out_dir else f".{out_dir.name}.report-"
    pattern = re.compile(re.escape(prefix) + r"(\d+)-[0-9a-f]{8}")
    for old in home.glob(f"{glob.escape(prefix)}*"):
        m = pattern.fullmatch(old.name)
        if m and old.is_dir() and not old.is_symlink() and not _alive(int(m[1])):
            shutil.rmtree(old, ignore_errors=True)
    stage = home / f"{prefix}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    return stage, made


def _publish(stage: Path, out_dir: Path, written: set[str]) -> None:
    """Move the report built in ``stage`` to ``out_dir``: a new folder by one rename; into an
    existing one, the figures first, then ``index.html`` (so the page there is always whole),
    then the figures only the last report wrote are removed."""
    if not out_dir.exists():
        _forget_stale(stage / "figures", written)
        try:
            os.rename(stage, out_dir)
            return
        except OSError:  # made meanwhile by someone else: move in as below
            if not out_dir.is_dir():
                raise
    figures = out_dir / "figures"
    if written:
        figures.mkdir(exist_ok=True)
    for name in sorted(written):
        os.replace(stage / "figures" / name, figures / name)
    os.replace(stage / "index.html", out_dir / "index.html")
    _forget_stale(figures, written)


def build_report(folder: str | os.PathLike, out_dir: str | os.PathLike, *, suite=None, model=None, task=None,
                 metric=None, pattern=None, refine=None, reconstruct=None, png: str | os.PathLike | None = None,
                 published: str | os.PathLike | None = None) -> Path:
    """Write the report of the leaderboard ``folder`` to ``out_dir``; returns ``out_dir/index.html``.

    Filters as in ``select`` (a value or a list each; ``suite`` also takes suite files).
    Figures go to ``out_dir/figures/<slug>.{png,svg,pdf}``; the figures an earlier report
    wrote there and this one does not are removed (listed in ``figures/.written``; other
    files are left alone). With ``png``, the selection's one main figure is also copied to
    that file (a ConfigError when there is not exactly one): its by-stage figure where cells
    ran stages, else its score-against-sparsity figure.
    EmptySelection (a ConfigError) when the filters leave nothing. ``published``: a folder
    of published results to set beside the shown cells (``bench.published``). Built in a
    hidden folder and moved into place (see the module docstring): an error or a stop
    halfway leaves ``out_dir`` as it was.
    """
    folder, out_dir = Path(folder), Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir} is a file; give -o a folder for the report")
    filters = {"suite": suite, "model": model, "task": task, "metric": metric, "pattern": pattern, "refine": refine,
               "reconstruct": reconstruct}
    table = select(folder, **filters)
    rows = table.to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    failed = [r for r in rows if r["status"] != "ok"]
    sections = _sections(table, ok)
    specs = series.unique_slugs([s for section in sections for s in section["specs"]])
    kind = "stages" if any(s["kind"] == "stages" for s in specs) else "sweep"
    mains = [s for s in specs if s["kind"] == kind]
    if png is not None and len(mains) != 1:
        listed = ", ".join(s["slug"] for s in mains) or "none"
        what = "by-stage" if kind == "stages" else "score-against-sparsity"
        raise ConfigError(f"--png needs exactly one {what} figure; this selection has "
                          f"{len(mains)} ({listed}): narrow it with --model and --task")
    stage, made = _stage(out_dir)
    try:
        _build(stage, folder, filters, table, sections=sections, specs=specs, published=published, ok=ok,
               failed=failed)
        _publish(stage, out_dir, {Path(f).name for spec in specs for f in spec["files"].values()})
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        for parent in made:  # the folders made for it, when still empty
            try:
                parent.rmdir()
            except OSError:
                break
        raise
    shutil.rmtree(stage, ignore_errors=True)
    index = out_dir / "index.html"
    if png is not None:
        Path(png).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(Path(png), (out_dir / "figures" / f"{mains[0]['slug']}.png").read_bytes())
    return index


def _build(stage: Path, folder: Path, filters: dict, table, *, sections: list[dict], specs: list[dict],
           published, ok: list[dict], failed: list[dict]) -> None:
    """The report's files in ``stage``: figures/ and index.html."""
    drawn: dict[str, tuple[dict, bytes]] = {}
    for spec in specs:
        paths, data = save(spec, stage / "figures")
        spec["files"] = {ext: f"figures/{p.name}" for ext, p in paths.items()}
        drawn[spec["slug"]] = (spec, data)
    html, nav = _task_sections(sections, drawn)
    papers = "" if published is None else _published(ok, published)
    if papers:
        nav.append(("published", "published"))
        html.append(papers)
    if failed:
        nav.append(("failed", "failed"))
        html.append(_failed(failed))
    embedded = [{k: v for k, v in spec.items()} for spec in specs]
    document = page.page(title=f"stadebench report · {folder.name or folder}",
                         intro=_intro(folder, filters, table, failed), nav=nav, sections=html, figures=embedded)
    (stage / "index.html").write_text(document, encoding="utf-8")
