"""`stadebench run`, `validate` and `schema`: execute and check suites."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..util import first_line, visible
from .common import ExitCode, err, fail, handle_errors, out, progress_enabled, styled

SuiteArg = Annotated[Path, typer.Argument(help="Suite YAML file.", show_default=False)]


def _load(path: Path):
    from ..bench.suite import load_suite

    if not path.is_file():
        raise fail(f"{path}: no such suite file (see the suites/ folder for examples)")
    return load_suite(path)


class _Reporter:
    """Draws the runner's progress on stderr: bars on a terminal, one line per cell otherwise."""

    def __init__(self, live: bool):
        self.live = live
        self.progress = Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=err, disable=not live, transient=False)
        self.cells = self.block_task = None
        self.t0 = 0.0

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def plan(self, todo: int, skipped: int) -> None:
        if skipped:
            err.print(f"{skipped} cell(s) already in the leaderboard: skipped (--force to redo them)")
        self.cells = self.progress.add_task("cells", total=todo)

    def cell_start(self, cell, index: int, total: int) -> None:
        self.t0 = time.perf_counter()
        self.prefix = f"[{index}/{total}] {cell.label}"
        self.progress.update(self.cells, description=visible(f"cells: {cell.label}"))  # drawn as plain text
        if self.block_task is not None:
            self.progress.remove_task(self.block_task)
            self.block_task = None

    def blocks(self, done: int, total: int) -> None:
        if self.block_task is None:
            self.block_task = self.progress.add_task("  blocks", total=total)
        self.progress.update(self.block_task, completed=done)

    def cell_end(self, cell, error: str | None) -> None:
        self.progress.advance(self.cells)
        status = ("ok",) if error is None else (("failed", "red"), f": {first_line(error)}")
        if not self.live or error:
            err.print(styled(f"{self.prefix} … ", *status, f" ({time.perf_counter() - self.t0:.1f} s)"))

    def note(self, message: str) -> None:
        err.print(message)


def run(
    suite: SuiteArg,
    only: Annotated[list[str] | None, typer.Option(
        "--only", help="Run only matching cells: field=value (model, metric, pattern, sparsity, dtype) "
                       "or a label substring; repeatable.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Redo cells already in the leaderboard.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the cells that would run; run nothing.")] = False,
    leaderboard: Annotated[Path | None, typer.Option(help="Results folder (default: the suite's).")] = None,
    show: Annotated[bool, typer.Option("--show/--no-show", help="Print the leaderboard at the end.")] = True,
    executor: Annotated[str, typer.Option(
        envvar="STADEBENCH_EXECUTOR", help="Where cells run: local (this process) or ray (actors on a Ray "
                                           "cluster; pip install 'stadebench[ray]').")] = "local",
    address: Annotated[str | None, typer.Option(
        envvar="RAY_ADDRESS", help="Ray cluster to join (default: start a local Ray instance).")] = None,
    workers: Annotated[int | None, typer.Option(
        min=1, help="Ray executor: at most this many actors (default: as many as the resources hold).")] = None,
) -> None:
    """Run a suite: prune and evaluate every cell not yet in the leaderboard."""
    _run(suite, only or [], force, dry_run, leaderboard, show, executor, address, workers)


def _dry_run(suite, folder: Path | None, only: list[str], force: bool) -> None:
    from ..bench.plan import make_plan

    plan = make_plan(suite, folder, only=only, force=force)
    for note in plan.notes:
        err.print(note)
    table = Table("#", "model", "cell", "evaluations", title=f"{suite.name}: {len(plan.todo)} cell(s) to run, "
                  f"{plan.skipped} already done")
    for i, cell in enumerate(plan.todo, 1):
        table.add_row(str(i), cell.model.id, cell.label, ", ".join(p.spec.name for p in cell.pending))
    out.print(table)


def _interrupted(folder: Path, run_id: str) -> typer.Exit:
    from ..bench import leaderboard as lb

    # Count from disk: a cell whose file landed just before the signal is saved too.
    saved = lb.read(folder).select(["run_id", "cell_key"]).to_pylist()
    cells = len({r["cell_key"] for r in saved if r["run_id"] == run_id})
    err.print(f"interrupted: {cells} cell(s) finished and saved in {folder}; "
              "run the same command again to continue")
    return typer.Exit(int(ExitCode.INTERRUPTED))


@handle_errors
def _run(path: Path, only: list[str], force: bool, dry_run: bool, folder: Path | None, show: bool,
         executor: str = "local", address: str | None = None, workers: int | None = None) -> None:
    from ..bench.executor import executor_named
    from ..bench.run import new_run_id, run_suite

    os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's and datasets' bars; ours are on stderr
    suite = _load(path)
    if dry_run:
        return _dry_run(suite, folder, only, force)
    runner = executor_named(executor, address, **({"actors": workers} if workers else {}))
    folder, run_id = Path(folder or suite.leaderboard), new_run_id()
    with _Reporter(progress_enabled()) as reporter:
        try:
            summary = run_suite(suite, only=only, force=force, events=reporter, leaderboard_dir=folder,
                                run_id=run_id, executor=runner)
        except KeyboardInterrupt:
            raise _interrupted(folder, run_id) from None
    s = summary.seconds
    err.print(f"{len(summary.finished)} cell(s) ran, {summary.skipped} skipped, {len(summary.failed)} failed "
              f"in {s['total']:.1f} s (load {s['load']:.1f}, calibration {s['calibration']:.1f}, "
              f"statistics {s['statistics']:.1f}, prune {s['prune']:.1f}, eval {s['eval']:.1f}, "
              f"restore {s['restore']:.2f}, write {s['write']:.2f}); results in {folder}")
    if show:
        from .board import show_leaderboard

        show_leaderboard(folder, suite=[suite.name])
    if summary.failed:
        for label, message in summary.failed:
            err.print(styled(("failed:", "red"), f" {label}: {first_line(message)}"))
        raise typer.Exit(int(ExitCode.CELLS_FAILED))


def validate(suite: SuiteArg) -> None:
    """Check a suite without running it or loading weights: schema, names, options,
    sparsities, data files, and for models on this machine their files, context and shapes."""
    _validate(suite)


@handle_errors
def _validate(path: Path) -> None:
    from ..bench.suite import expand

    os.environ.setdefault("TQDM_DISABLE", "1")
    suite = _load(path)
    cells = expand(suite)
    from ..bench.run import check_suite  # torch: only once the file itself is known to be sane

    for note in check_suite(suite):
        err.print(f"note: {note}")
    models = len(suite.models)
    out.print(f"{path}: ok — {len(cells)} cell(s) over {models} model(s), "
              f"{len(suite.evaluations)} evaluation(s) each")


def schema() -> None:
    """Print the suite JSON Schema (for editor validation of suites)."""
    from ..bench.suite import suite_json_schema

    sys.stdout.write(json.dumps(suite_json_schema(), indent=2) + "\n")
