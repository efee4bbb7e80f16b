"""`stadebench run`, `validate` and `schema`: execute and check suites."""

from __future__ import annotations

import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from ..util import canonical_json, first_line, visible
from .common import (ExitCode, err, fail, handle_errors, heartbeat_seconds, out, progress_enabled, quiet_libraries,
                     styled)

SuiteArg = Annotated[Path, typer.Argument(help="Suite YAML file.", show_default=False)]


def _load(path: Path):
    from ..suite import load_suite

    if not path.is_file():
        raise fail(f"{path}: no such suite file (see the suites/ folder for examples)")
    return load_suite(path)


def _duration(seconds: float) -> str:
    """``42 s``, ``3 min 20 s``, ``2 h 05 min``."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class _Eta(ProgressColumn):
    """Time left at the pace so far (time elapsed per step done); blank before a step is done."""

    def render(self, task) -> Text:
        if not task.total or not task.completed or task.elapsed is None or task.finished:
            return Text("")
        left = task.elapsed / task.completed * (task.total - task.completed)
        return Text(f"eta {_duration(left)}", style="progress.remaining")


class _Count(MofNCompleteColumn):
    """``done/total``; blank for a step with no count (an evaluation), whose bar pulses."""

    def render(self, task) -> Text:
        return super().render(task) if task.total is not None else Text("")


class Reporter:
    """Draws the runner's progress on stderr. On a terminal: a bar of cells with its ETA
    and, under it, the running step (load, prune with a bar of blocks, each evaluation)
    with its own elapsed time. Otherwise: a line as each step starts, a heartbeat every
    ``heartbeat`` seconds while one runs (``STADEBENCH_HEARTBEAT``), and a line per cell."""

    def __init__(self, live: bool, heartbeat: float | None = None):
        self.live = live
        self.progress = Progress(TextColumn("{task.description}", markup=False), BarColumn(), _Count(),
                                 TimeElapsedColumn(), _Eta(), console=err, disable=not live, transient=False)
        self.cells = self.step = None
        self.prefix, self.t0, self.cell_phases, self.todo, self.done = "", 0.0, [], 0, 0
        self.current: tuple[str, float, str] | None = None  # the running step: text, start, name within a cell
        self.interval = heartbeat_seconds() if heartbeat is None else heartbeat
        self.stop = threading.Event()
        self.beats = None
        self.last_line = time.perf_counter()

    def __enter__(self):
        self.progress.__enter__()
        self.cells = self.progress.add_task("cells", total=None, visible=False, start=False)
        if not self.live and self.interval > 0:
            self.beats = threading.Thread(target=self._beat, name="stadebench-heartbeat", daemon=True)
            self.beats.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.beats is not None:
            self.beats.join()
        self.progress.__exit__(*exc)

    def _line(self, text) -> None:
        self.last_line = time.perf_counter()
        err.print(text)

    def _beat(self) -> None:
        while not self.stop.wait(self.interval):
            current, now = self.current, time.perf_counter()
            if current is not None and now - self.last_line >= self.interval * 0.99:
                self._line(f"{current[0]} … ({_duration(now - current[1])})")

    def plan(self, todo: int, skipped: int) -> None:
        if skipped:
            err.print(f"{skipped} cell(s) already in the leaderboard: skipped (--force to redo them)")
        self.progress.update(self.cells, total=todo, visible=True)
        self.progress.start_task(self.cells)
        self.todo, self.done = todo, 0
        self._waiting()

    def _waiting(self) -> None:
        """Between cells: the heartbeat says how far the run is (a remote executor reports
        nothing else until a cell's result arrives)."""
        self._finish_phase()
        if self.done < self.todo:
            self.current = (f"running: {self.done} of {self.todo} cell(s) done", time.perf_counter(), "")
        self._drop_step()

    def _finish_phase(self) -> None:
        if self.current is not None and self.current[2]:
            self.cell_phases.append(f"{self.current[2]} {time.perf_counter() - self.current[1]:.1f} s")
        self.current = None

    def phase(self, cell, name: str) -> None:
        self._finish_phase()
        text = f"{self.prefix}{name}" if cell is not None else name
        self.current = (text, time.perf_counter(), name if cell is not None else "")
        self._drop_step()  # a new task: rich cannot set a task's total back to None (a pulsing bar)
        self.step = self.progress.add_task(visible(f"  {name}"), total=None)
        if not self.live:
            self._line(f"{text} …")

    def cell_start(self, cell, index: int, total: int) -> None:
        self._finish_phase()
        self.t0, self.cell_phases = time.perf_counter(), []
        self.label = f"[{index}/{total}] {cell.label}"
        self.prefix = f"{self.label}: "
        self.progress.update(self.cells, description=visible(f"cells: {cell.label}"))  # drawn as plain text
        self._drop_step()

    def _drop_step(self) -> None:
        if self.step is not None:
            self.progress.remove_task(self.step)
            self.step = None

    def blocks(self, done: int, total: int) -> None:
        if self.step is None:
            self.step = self.progress.add_task("  blocks", total=total)
        self.progress.update(self.step, total=total, completed=done)

    def cell_end(self, cell, error: str | None) -> None:
        self._finish_phase()
        self.progress.advance(self.cells)
        self.done += 1
        status = ("ok",) if error is None else (("failed", "red"), f": {first_line(error)}")
        times = f"{time.perf_counter() - self.t0:.1f} s" + (f": {', '.join(self.cell_phases)}"
                                                             if self.cell_phases else "")
        if not self.live or error:
            self._line(styled(f"{self.label} … ", *status, f" ({times})"))
        self._waiting()

    def note(self, message: str) -> None:
        self._line(message)


def run(
    suite: SuiteArg,
    only: Annotated[list[str] | None, typer.Option(
        "--only", help="Run only matching cells: field=value[,value] (model, metric, pattern, sparsity, dtype, "
                       "allocation, seed, refine, reconstruct) or a label substring; repeatable.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Redo cells already in the leaderboard.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the cells that would run; run nothing.")] = False,
    leaderboard: Annotated[Path | None, typer.Option(help="Results folder (default: the suite's).")] = None,
    show: Annotated[bool, typer.Option("--show/--no-show", help="Print the leaderboard at the end.")] = True,
    executor: Annotated[str, typer.Option(
        envvar="STADEBENCH_EXECUTOR", help="Where cells run: local (this process) or ray (actors on a Ray "
                                           "cluster; pip install 'stadebench[ray]').")] = "local",
    address: Annotated[str | None, typer.Option(
        help="Ray executor: the cluster to join, host:port or ray://host:port (default: $RAY_ADDRESS, else a "
             "local Ray instance); a head that does not answer within 5 s is an error. $RAY_ADDRESS alone "
             "never turns the Ray executor on.")] = None,
    workers: Annotated[int | None, typer.Option(
        min=1, help="Ray executor: at most this many actors (default: as many as the resources hold).")] = None,
    verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", help="Also show the libraries' own progress bars and logs (lm-eval, datasets, "
                                "transformers, the Hub).")] = False,
) -> None:
    """Run a suite: prune and evaluate every cell not yet in the leaderboard."""
    _run(suite, only or [], force=force, dry_run=dry_run, folder=leaderboard, show=show, executor=executor,
         address=address, workers=workers, verbose=verbose)


def _options_key(options: Any) -> str:
    return canonical_json(json.loads(options) if isinstance(options, str) else options)


class _PastRuns:
    """Medians of what past runs in a leaderboard took: prune seconds and peak memory by
    (model, metric, pattern), evaluation seconds by (model, evaluator, options)."""

    def __init__(self, folder: Path):
        from ..results import store as lb

        columns = ["run_id", "cell_key", "status", "model", "metric", "pattern", "sparsity", "evaluator",
                   "eval_options", "prune_seconds", "eval_seconds", "peak_memory_bytes", "device"]
        rows = [r for r in lb.read(folder, history=True).select(columns).to_pylist() if r["status"] == "ok"]
        self.folder, self.devices = folder, set()
        prune: dict[tuple, dict[tuple, tuple]] = {}
        evals: dict[tuple, dict[tuple, float]] = {}
        for r in rows:
            cell = (r["model"], r["metric"], r["pattern"])
            if r["prune_seconds"] is not None:  # every row of a cell run repeats its prune time
                once = (r["run_id"], r["sparsity"], r["prune_seconds"])
                prune.setdefault(cell, {})[once] = (r["prune_seconds"], r["peak_memory_bytes"])
            if r["eval_seconds"] is not None:
                evaluation = (r["model"], r["evaluator"], _options_key(r["eval_options"]))
                evals.setdefault(evaluation, {})[r["run_id"], r["cell_key"]] = r["eval_seconds"]
            self.devices.add(r["device"])
        self.prune = {k: statistics.median(s for s, _ in v.values()) for k, v in prune.items()}
        self.memory = {k: statistics.median(m) for k, v in prune.items() if (m := [m for _, m in v.values() if m])}
        self.evals = {k: statistics.median(v.values()) for k, v in evals.items()}
        self.devices.discard(None)

    def cell(self, cell) -> tuple[float | None, int | None]:
        """``(seconds, peak memory bytes)`` of a planned cell, None where no past run tells."""
        fields = (cell.model.id, cell.cell.metric, None if cell.cell.dense else cell.cell.pattern)
        seconds = 0.0 if cell.cell.dense else self.prune.get(fields)
        for p in cell.pending:
            t = self.evals.get((cell.model.id, p.spec.name, _options_key(p.template.eval_options)))
            seconds = None if seconds is None or t is None else seconds + t
        return seconds, self.memory.get(fields)


def _cost_line(past: _PastRuns, costs: list[tuple[float | None, int | None]]) -> str:
    known = [s for s, _ in costs if s is not None]
    if not known:
        return f"cost: no past runs of these cells in {past.folder} to estimate from"
    line = f"cost: about {_duration(sum(known))} for {len(known)} of {len(costs)} cell(s)"
    memory = [m for _, m in costs if m]
    if memory:
        line += f", peak memory about {max(memory) / 2**30:.1f} GiB"
    line += (f" (medians of past runs in {past.folder} on {', '.join(sorted(past.devices)) or 'unknown devices'};"
             " model loading not counted)")
    if len(known) < len(costs):
        line += f"; no past runs for {len(costs) - len(known)} cell(s)"
    return line


def _dry_run(suite, folder: Path | None, only: list[str], force: bool) -> None:
    """The plan, each cell's evaluations and its estimated time; touches no device."""
    from ..runner.plan import make_plan
    from ..runner.run import evaluation_labels

    plan = make_plan(suite, folder, only=only, force=force)
    for note in plan.notes:
        err.print(note)
    for model in plan.models:
        if model.identity.source == "hub" and model.identity.revision is None:
            err.print(f"note: {model.spec.id!r}: its Hub revision is unknown here (the Hub is out of reach and the "
                      "local cache does not hold it), so cells already run at a known revision are listed as to run")
    labels = evaluation_labels(suite.evaluations)
    past = _PastRuns(Path(folder or suite.leaderboard))
    costs = [past.cell(cell) for cell in plan.todo]
    table = Table(title=f"{suite.name}: {len(plan.todo)} cell(s) to run, {plan.skipped} already done")
    for column in ("#", "model", "cell"):
        table.add_column(column, overflow="fold")  # an id or label cut short would not name its cell
    table.add_column("evaluations", min_width=min(40, max(map(len, labels.values()), default=0)))
    table.add_column("time", no_wrap=True)
    for i, (cell, (seconds, _)) in enumerate(zip(plan.todo, costs), 1):
        table.add_row(str(i), cell.model.id, cell.label, "\n".join(labels[p.spec.model_dump_json()]
                                                                   for p in cell.pending),
                      "?" if seconds is None else _duration(seconds))
    out.print(table)
    if plan.todo:
        out.print(_cost_line(past, costs))


def interrupted(folder: Path, run_id: str) -> typer.Exit:
    from ..results import store as lb

    # Count from disk: a cell whose file landed just before the signal is saved too.
    saved = lb.read(folder).select(["run_id", "cell_key"]).to_pylist()
    cells = len({r["cell_key"] for r in saved if r["run_id"] == run_id})
    err.print(f"interrupted: {cells} cell(s) finished and saved in {folder}; "
              "run the same command again to continue")
    return typer.Exit(int(ExitCode.INTERRUPTED))


@handle_errors
def _run(path: Path, only: list[str], *, force: bool, dry_run: bool, folder: Path | None, show: bool,
         executor: str = "local", address: str | None = None, workers: int | None = None,
         verbose: bool = False) -> None:
    with quiet_libraries(verbose):  # before the suite's plugins import tqdm, which reads TQDM_DISABLE once
        suite = _load(path)
        if dry_run:
            return _dry_run(suite, folder, only, force)
        summary, folder = _execute(suite, only, force, folder, executor, address, workers)
    s = summary.seconds
    err.print(f"{len(summary.finished)} cell(s) ran, {summary.skipped} skipped, {len(summary.failed)} failed "
              f"in {s['total']:.1f} s (load {s['load']:.1f}, calibration {s['calibration']:.1f}, "
              f"statistics {s['statistics']:.1f}, "
              f"{'gradients %.1f, ' % s['gradients'] if s['gradients'] else ''}prune {s['prune']:.1f}, "
              f"eval {s['eval']:.1f}, "
              f"restore {s['restore']:.2f}, write {s['write']:.2f}); results in {folder}")
    if show:
        from .board import show_leaderboard

        show_leaderboard(folder, suite=[suite.name])
    if summary.failed:
        for label, message in summary.failed:
            err.print(styled(("failed:", "red"), f" {label}: {first_line(message)}"))
        raise typer.Exit(int(ExitCode.CELLS_FAILED))


def _execute(suite, only: list[str], force: bool, folder: Path | None, executor: str, address: str | None,
             workers: int | None):
    """Run the suite, drawing progress; returns the run's Summary and its leaderboard folder."""
    from ..runner.executor import executor_named
    from ..runner.run import new_run_id, run_suite

    runner = executor_named(executor, address, **({"actors": workers} if workers else {}))
    folder, run_id = Path(folder or suite.leaderboard), new_run_id()
    with Reporter(progress_enabled()) as reporter:
        try:
            return run_suite(suite, only=only, force=force, events=reporter, leaderboard_dir=folder, run_id=run_id,
                             executor=runner), folder
        except KeyboardInterrupt:
            raise interrupted(folder, run_id) from None


def validate(suite: SuiteArg) -> None:
    """Check a suite without running it or loading weights: schema, names, options,
    sparsities, data files, and for models on this machine their files, context and shapes."""
    _validate(suite)


@handle_errors
def _validate(path: Path) -> None:
    from ..suite import expand

    with quiet_libraries():
        suite = _load(path)
        cells = expand(suite)
        from ..runner.run import check_suite  # torch: only once the file itself is known to be sane

        notes = check_suite(suite)
    for note in notes:
        err.print(f"note: {note}")
    models = len(suite.models)
    out.print(f"{path}: ok — {len(cells)} cell(s) over {models} model(s), "
              f"{len(suite.evaluations)} evaluation(s) each")


def schema() -> None:
    """Print the suite JSON Schema (for editor validation of suites)."""
    from ..suite import suite_json_schema

    sys.stdout.write(json.dumps(suite_json_schema(), indent=2) + "\n")


__all__ = ["Reporter", "interrupted", "run", "schema", "validate"]
