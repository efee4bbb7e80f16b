"""The driver: suite -> plan -> preflight -> executor -> leaderboard.

``run_suite`` plans the suite against its leaderboard, checks before the first cell
what would fail every cell of a model (tokenizer, context length, pattern shapes,
calibration text) and cuts the calibration windows, then lets an executor run the
cells. Each result is written as soon as it arrives, one Parquet file per cell, by
this process alone; a killed run loses at most the cells in flight, and the same
command resumes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ..core.models import check_context, iter_layers, select_layers, text_config, weight_of
from ..data.calibration import calibration_windows
from ..data.loading import check_files, load_config_and_tokenizer, on_this_machine
from ..errors import ConfigError, PluginError
from ..util import canonical_json, package_version
from ..version import __version__
from ..results import store
from .executor import Events, Executor, LocalExecutor
from ..results.store import LeaderboardError
from .plan import Plan, PlannedCell, calibration_key, make_plan, uses_data
from ..results.row import RecordError, Row
from .session import CellResult, Windows, watch_ctrl_c
from ..suite import Cell, EvaluationSpec, ModelSpec, Suite, expand

PHASES = ("load", "restore", "calibration", "statistics", "gradients", "prune", "eval", "save", "write", "total")


@dataclass(frozen=True)
class SavedCell:
    """A pruned cell saved by the run (``save:``)."""

    label: str
    path: str
    sha256: str
    actual_sparsity: float | None


@dataclass
class Summary:
    """What a run did."""

    run_id: str
    cells: int = 0
    skipped: int = 0
    finished: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    saved: list[SavedCell] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    """Wall time by phase; ``statistics`` is shared one-shot passes, ``total`` the whole run."""


@functools.cache
def git_commit() -> str | None:
    """The stadebench checkout's commit (``-dirty`` with uncommitted changes), if it is one."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("-dirty" if dirty else "")


def new_run_id() -> str:
    """A sortable, unique run id: UTC time plus random hex."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + uuid.uuid4().hex[:6]


def resolve_device(name: str) -> torch.device:
    """The device a suite's ``device:`` names; ``auto`` is CUDA when available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r}: CUDA is not available on this machine; use device: cpu or auto")
    return device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()})"


def check_writable(folder: Path) -> None:
    """Fail before any cell runs when results could not be saved."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise ConfigError(f"leaderboard folder {str(folder)!r} is not writable ({exc.strerror}); "
                          "set `leaderboard:` in the suite to a folder you can write") from None


# --- preflight ------------------------------------------------------------------------


def _check_shapes(where: str, config: Any, spec: ModelSpec, cells: list[Cell], device: str = "auto") -> None:
    """Every pattern fits every prunable layer (N:M needs widths divisible by M), every
    ``targets`` / ``ignore`` regex finds a layer, and every reconstructor fits the largest
    layer in the memory of ``device``; the layers come from a weightless copy of the model
    built on the meta device."""
    from transformers import AutoModelForCausalLM

    patterns = {(c.pattern, canonical_json(c.pattern_options)): c.pattern_plugin.instance
                for c in cells if not c.dense}  # options may change what fits
    if not patterns:
        return
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=spec.trust_remote_code)
    for targets, ignore in sorted({(c.targets, c.ignore) for c in cells if not c.dense}):
        try:
            select_layers(skeleton, targets, ignore)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    shapes = {tuple(weight_of(layer).shape): name for _, name, layer in iter_layers(skeleton)}
    for _, pattern in sorted(patterns.items()):
        for shape, name in shapes.items():
            try:
                pattern.check_shape(shape)
            except ConfigError as exc:
                raise ConfigError(f"{where}: layer {name} {list(shape)}: {exc}") from None
    _check_reconstructors(where, cells, shapes, _memory_budget(device))


def _memory_budget(device: str) -> int:
    """Memory a layer's reconstruction may use on the suite's ``device``: the GPU's, or RAM."""
    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.device("cuda" if device == "auto" else device)).total_memory
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def _check_reconstructors(where: str, cells: list[Cell], shapes: dict[tuple, str], budget: int) -> None:
    """Every reconstructor fits the largest layer it would reconstruct in ``budget`` bytes."""
    for cell in cells:
        if cell.reconstruct_plugin is None:
            continue
        need, shape = max((cell.reconstruct_plugin.instance.memory_bytes(*shape), shape) for shape in shapes)
        if need > budget:
            raise ConfigError(f"{where}: reconstruct {cell.reconstruct_label!r} needs about {need / 2**30:.1f} GiB "
                              f"for layer {shapes[shape]} {list(shape)}, more than the {budget / 2**30:.1f} GiB "
                              f"here; drop it for this model (exclude: [{{reconstruct: {cell.reconstruct_label}}}]) "
                              "or use a machine with more memory")


def check_model(suite: Suite, spec: ModelSpec, cells: list[Cell], windows: Windows | None = None) -> None:
    """Check, with no weights loaded, what would fail every cell of one model: its weight
    files are readable (and safe to load), the tokenizer's ids fit the embedding, every
    pattern fits every layer, calibration windows and every evaluation fit the context, and
    the calibration text is long enough. The windows it cuts go into ``windows``. A model
    that cannot be reached is left to fail its own cells. Raises ConfigError."""
    where = f"{suite.name}: models[{suite.models.index(spec)}] {spec.id!r}"
    try:
        check_files(spec)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    try:
        config, tokenizer = load_config_and_tokenizer(spec)
    except Exception:  # noqa: BLE001 -- unreachable or unknown: its cells fail with the loader's message
        return
    vocab = getattr(text_config(config), "vocab_size", None)
    if isinstance(vocab, int) and len(tokenizer) > vocab:
        raise ConfigError(f"{where}: its tokenizer has {len(tokenizer)} tokens but the model embeds only "
                          f"{vocab}; give the matching `tokenizer:`")
    _check_shapes(where, config, spec, cells, suite.device)
    for i, evaluation in enumerate(suite.evaluations):
        try:
            evaluation.resolved.instance.check_model(config)
        except ConfigError as exc:
            raise ConfigError(f"{where}: evaluations[{i}].options.{exc}") from None
        except Exception as exc:  # plugin code: say whose
            raise PluginError(f"{where}: {evaluation.resolved.who('evaluator', evaluation.name)}: "
                              f"check_model() raised {type(exc).__name__}: {exc}") from None
    calibrations = {calibration_key(c.calibration): c.calibration for c in cells if uses_data(c)}
    for key, c in calibrations.items():
        check_context(config, c.seqlen, f"{where}: calibration.seqlen")
        try:
            cut = calibration_windows(c.dataset.resolved.instance, tokenizer, c.seqlen, c.n, c.seed)
        except ConfigError as exc:
            raise ConfigError(f"{where}: calibration: {exc}") from None
        except Exception:  # noqa: BLE001 -- dataset plugin code: its cells fail, naming it
            continue
        if windows is not None:
            windows[spec.model_dump_json(), key] = cut


def check_save_folders(folders: list[tuple[Path, bool]]) -> None:
    """Every ``(folder, exact)`` a pruned model will be saved to can be made and written;
    one that exists is replaced when its cell runs (re-running a cell is explicit).
    ``exact``: the folder of ``stadebench prune --out``. Raises ConfigError."""
    from .save import check_out_dir

    for folder, exact in sorted(set(folders)):
        check_out_dir(folder, force=True, option="--out" if exact else "`save:` in the suite")


def check_suite(suite: Suite) -> list[str]:
    """What ``stadebench validate`` checks beyond the schema: ``check_model`` for every
    model whose files are on this machine, over all of the suite's cells, and the ``save:``
    folders. Returns a note for each model left for the run to check (a Hub model, an
    asset not yet fetched)."""
    cells, notes = expand(suite), []
    # a cell's own folder is named after its key, which needs the model's identity: any child stands in
    check_save_folders([(Path(c.save) if c.save_exact else Path(c.save) / "cell", c.save_exact)
                        for c in cells if c.save and not c.dense])
    for i, spec in enumerate(suite.models):
        if on_this_machine(spec):
            check_model(suite, spec, [c for c in cells if c.model == spec])
        else:
            notes.append(f"models[{i}] {spec.id!r} is not on this machine yet: the run checks it once "
                         "it is fetched")
    return notes


def preflight(plan: Plan) -> tuple[Windows, float]:
    """``check_model`` for every model with cells to run, and ``check_save_folders``, before
    any cell runs. Returns the calibration windows (cut now, once per model and protocol)
    and the seconds it took. Raises ConfigError."""
    t0, windows = time.perf_counter(), {}
    check_save_folders([(c.save_folder, c.cell.save_exact) for c in plan.todo if c.save_folder is not None])
    for model_plan in plan.models:
        check_model(plan.suite, model_plan.spec, [c.cell for c in model_plan.cells], windows)
    return windows, time.perf_counter() - t0


# --- what a run is doing ------------------------------------------------------------------


def _option_text(value: Any) -> str:
    if isinstance(value, dict) and isinstance(value.get("name"), str):
        return value["name"]  # a dataset entry: its name tells entries apart far more often than not
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _distinguishing(texts: list[dict[str, str]]) -> list[str]:
    """The fewest keys (picked greedily, in the first entry's order on ties) whose values
    tell the entries ``texts`` apart, as far as any of their keys can."""
    def kinds(keys: list[str]) -> int:
        return len({tuple(t.get(k) for k in keys) for t in texts})

    left, chosen = list(texts[0]), []
    target = kinds(left)
    while kinds(chosen) < target:
        best = max(left, key=lambda k: kinds([*chosen, k]))
        chosen.append(best)
        left.remove(best)
    return chosen


def evaluation_labels(evaluations: list[EvaluationSpec]) -> dict[str, str]:
    """A short label for each evaluation entry, keyed by its ``model_dump_json()``: its
    name, and for a name the suite uses more than once the fewest options that tell those
    entries apart, e.g. ``perplexity(seqlen=4096)`` and ``perplexity(seqlen=2048)``."""
    groups: dict[str, list[EvaluationSpec]] = {}
    for e in evaluations:
        groups.setdefault(e.name, []).append(e)
    labels = {}
    for name, entries in groups.items():
        texts = [{k: _option_text(v) for k, v in e.resolved.instance.options.model_dump(mode="json").items()}
                 for e in entries]
        chosen = _distinguishing(texts) if len(entries) > 1 else []
        for e, t in zip(entries, texts):
            shown = ", ".join(f"{k}={t.get(k)}" for k in chosen)
            labels[e.model_dump_json()] = f"{name}({shown})" if shown else name
    return labels


class _Announced:
    """An evaluator that tells ``phase`` when one cell's evaluation with it starts."""

    def __init__(self, evaluator: Any, phase: Any, cell: PlannedCell, label: str):
        self._evaluator, self._phase, self._cell, self._label = evaluator, phase, cell, label

    def __getattr__(self, name: str) -> Any:
        return getattr(self._evaluator, name)

    def evaluate(self, *args: Any, **kwargs: Any) -> Any:
        self._phase(self._cell, f"evaluate {self._label}")
        return self._evaluator.evaluate(*args, **kwargs)


class _Phases(Events):
    """Relays every event to ``events`` and tells its ``phase(cell, name)`` what a local
    run is doing between them: ``load <model>`` (cell None), ``prune``, ``evaluate <label>``.

    Executors report only cells and decoder blocks; in this process the driver can tell
    more, because it knows the order the local executor runs cells in and can wrap each
    cell's evaluators (a remote executor's evaluators cannot be wrapped this way)."""

    def __init__(self, events: Any, plan: Plan):
        self.events, self.todo, self.ended = events, plan.todo, 0
        labels = evaluation_labels(plan.suite.evaluations)
        for cell in self.todo:
            cell.pending = [dataclasses.replace(p, evaluator=_Announced(p.evaluator, events.phase, cell,
                                                                        labels[p.spec.model_dump_json()]))
                            for p in cell.pending]

    def _next_load(self) -> None:
        before = self.todo[self.ended - 1].model if self.ended else None
        if self.ended < len(self.todo) and self.todo[self.ended].model != before:
            self.events.phase(None, f"load {self.todo[self.ended].model.id}")

    def plan(self, todo: int, skipped: int) -> None:
        self.events.plan(todo, skipped)
        self._next_load()

    def cell_start(self, cell: PlannedCell, index: int, total: int) -> None:
        self.events.cell_start(cell, index, total)
        if cell.metric is not None:
            self.events.phase(cell, "prune")

    def blocks(self, done: int, total: int) -> None:
        self.events.blocks(done, total)

    def cell_end(self, cell: PlannedCell, error: str | None) -> None:
        self.events.cell_end(cell, error)
        self.ended += 1
        self._next_load()

    def note(self, message: str) -> None:
        self.events.note(message)


# --- results to rows ------------------------------------------------------------------


def rows_of(result: CellResult, provenance: dict[str, Any]) -> list[Row]:
    """The leaderboard rows of one cell result: one per score, or one failed row per
    pending evaluation. The only place rows are made."""
    common = {"actual_sparsity": result.actual_sparsity, "prune_seconds": result.prune_seconds,
              "peak_memory_bytes": result.peak_memory_bytes, "layers": result.layers,
              "dense_layers": result.dense_layers, "saved_path": result.saved_path,
              "saved_sha256": result.saved_sha256, **provenance}
    pending = result.cell.pending
    if result.error is not None:
        return [p.template.replace(status="failed", error=result.error, **common) for p in pending]
    rows = []
    for p, evaluation in zip(pending, result.evaluations, strict=True):
        for s in evaluation.scores:
            rows.append(p.template.replace(
                task=s.task, score=s.name, value=s.value, stderr=s.stderr, higher_is_better=s.higher_is_better,
                status="ok", eval_seconds=evaluation.seconds, details={**result.details, "eval": s.details},
                layer_diagnostics=s.layers, items=s.items, item_aggregate=s.aggregate, **common))
    return rows


def _provenance(suite: Suite, run_id: str, device: torch.device, executor: Executor) -> dict[str, Any]:
    return {"run_id": run_id, "suite": suite.name, "stadebench_version": __version__,
            "torch_version": torch.__version__, "transformers_version": package_version("transformers"),
            "lm_eval_version": package_version("lm_eval"), "git_commit": git_commit(),
            "device": device_name(device), "executor": executor.name}


def _record(summary: Summary, result: CellResult, folder: Path, provenance: dict[str, Any]) -> CellResult:
    """Write one result's rows (as a failed cell when what it holds cannot be stored);
    returns the result recorded."""
    t0 = time.perf_counter()
    if result.cell.pending:  # a cell that only prunes and saves (no evaluations) has no rows
        try:
            path = store.write_rows(folder, rows_of(result, provenance))
        except (RecordError, LeaderboardError) as exc:  # nothing written: what a plugin returned cannot be stored
            result = CellResult(result.cell, error=f"cannot store the result: {exc}", seconds=result.seconds,
                                saved_path=result.saved_path, saved_sha256=result.saved_sha256)
            path = store.write_rows(folder, rows_of(result, provenance))
        summary.files.append(path)
    if result.saved_path is not None:
        summary.saved.append(SavedCell(result.cell.label, result.saved_path, result.saved_sha256,
                                       result.actual_sparsity))
    summary.seconds["write"] += time.perf_counter() - t0
    for phase, seconds in result.seconds.items():
        summary.seconds[phase] += seconds
    if result.error is None:
        summary.finished.append(result.cell.label)
    else:
        summary.failed.append((result.cell.label, result.error))
    return result


def run_suite(suite: Suite, *, only: list[str] | None = None, force: bool = False, events: Events | None = None,
              leaderboard_dir: str | Path | None = None, executor: Executor | None = None,
              run_id: str | None = None) -> Summary:
    """Run every pending cell of ``suite`` and write its results to the leaderboard
    (``leaderboard_dir``, default the suite's). A failing cell is recorded as failed and
    the rest go on; KeyboardInterrupt propagates after the finished cells are saved."""
    t0 = time.perf_counter()
    events, executor = events or Events(), executor or LocalExecutor()
    folder = Path(leaderboard_dir or suite.leaderboard)
    device = resolve_device(suite.device)
    summary = Summary(run_id=run_id or new_run_id())
    plan = make_plan(suite, folder, only=only, force=force)
    for note in plan.notes:
        events.note(note)
    summary.cells, summary.skipped = plan.cells, plan.skipped
    check_writable(folder)
    if callable(getattr(events, "phase", None)):
        events.phase(None, "check the models, cut calibration windows")
        if isinstance(executor, LocalExecutor):
            events = _Phases(events, plan)
    windows, summary.seconds["calibration"] = preflight(plan)
    # a run killed mid-write may have left superseded rows in view; old-schema files are rewritten
    store.compact(folder, upgrade=True)
    events.plan(len(plan.todo), plan.skipped)
    provenance = _provenance(suite, summary.run_id, device, executor)
    with watch_ctrl_c():
        for result in executor.run(plan, device, windows, events):
            result = _record(summary, result, folder, provenance)
            events.cell_end(result.cell, result.error)
    summary.seconds["total"] = time.perf_counter() - t0
    return summary


__all__ = ["Events", "SavedCell", "Summary", "check_save_folders", "check_writable", "device_name",
           "evaluation_labels", "new_run_id", "preflight", "resolve_device", "rows_of", "run_suite"]
