"""`stadebench report`: the leaderboard as a self-contained HTML page with figures."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import handle_errors, out

Filter = Annotated[list[str] | None, typer.Option(help="Keep only these (repeatable).", show_default=False)]


def report(
    leaderboard: Annotated[Path, typer.Argument(help="Leaderboard folder.")] = Path("leaderboard"),
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for index.html and figures/.")] = Path("report"),
    suite: Annotated[list[str] | None, typer.Option(
        help="Keep only this suite's rows: its name, or its YAML file (the cells it runs, whichever run wrote "
             "them); repeatable.", show_default=False)] = None,
    model: Filter = None,
    task: Filter = None,
    metric: Annotated[list[str] | None, typer.Option(
        help="Keep only these metrics (repeatable); the dense baseline stays.", show_default=False)] = None,
    pattern: Annotated[list[str] | None, typer.Option(
        help="Keep only these patterns (repeatable); the dense baseline stays.", show_default=False)] = None,
    refine: Annotated[list[str] | None, typer.Option(
        help="Keep only these refiners (none: without one; repeatable); the dense baseline stays.",
        show_default=False)] = None,
    reconstruct: Annotated[list[str] | None, typer.Option(
        help="Keep only these reconstructors (none: without one; repeatable); the dense baseline stays.",
        show_default=False)] = None,
    png: Annotated[Path | None, typer.Option(
        "--png", help="Also copy the selection's one main figure to this PNG file: by stage where cells ran "
                      "stages, else score against sparsity (how docs/sweep.png is made).", show_default=False)] = None,
    open_page: Annotated[bool, typer.Option("--open", help="Open the page in a web browser.")] = False,
    published: Annotated[Path | None, typer.Option(
        "--published", help="A folder of published results (e.g. published/) to set beside the cells.",
        show_default=False)] = None,
) -> None:
    """Write a static HTML report: pivot tables against dense, score-against-sparsity figures
    (also as PNG, SVG and PDF), per-cell provenance and per-layer records, diagnostics plots."""
    _report(leaderboard, out_dir, suite=suite, model=model, task=task, metric=metric, pattern=pattern, refine=refine,
            reconstruct=reconstruct, png=png, open_page=open_page, published=published)


@handle_errors
def _report(leaderboard: Path, out_dir: Path, *, open_page: bool, **filters) -> None:
    from ..report import build_report

    index = build_report(leaderboard, out_dir, **filters)
    out.print(str(index))
    if open_page:
        import webbrowser

        webbrowser.open(index.resolve().as_uri())


__all__ = ["report"]
