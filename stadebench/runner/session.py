"""A model session: one loaded model serving the cells of one model.

The session loads the model once, keeps a copy of its dense prunable weights and puts
them back (in memory) before each cell, cuts calibration windows once per protocol, and
holds the one-shot statistics a sharing group collects until its last cell has used
them. ``run(cell)`` prunes and evaluates one planned cell and returns a typed
``CellResult``; it writes nothing, so any executor (in-process or remote) can host it.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..base import CellContext, Score
from ..core import allocation as allocating
from ..core import engine
from ..core.engine import CalibrationStatistics
from ..core.gradients import GradientStatistics, gradient_statistics
from ..core.models import iter_layers, named_layers, weight_of
from ..core.stages import Stages
from ..data import loading
from ..data.calibration import calibration_windows
from ..errors import NumericalError, PluginError, StadebenchError
from ..util import canonical_json
from . import gradients as grad_cache
from .plan import ModelPlan, PlannedCell, SharingGroup, calibration_key
from ..results.row import RecordError, normalise

Windows = dict[tuple[str, str], torch.Tensor]
"""Calibration windows by (model spec JSON, calibration JSON)."""


@dataclass
class EvaluationResult:
    """The scores of one pending evaluation and the seconds it took."""

    key: str
    scores: list[Score]
    seconds: float


@dataclass
class CellResult:
    """What running one cell produced; the driver turns it into leaderboard rows.

    Attributes:
        cell: the planned cell.
        evaluations: one result per pending evaluation, in order (empty when it failed).
        error: why the cell failed, else None (then no evaluation of it is recorded as ok).
        actual_sparsity: realised sparsity over the prunable layers (0 for dense).
        prune_seconds: wall time of this cell's pruning (a shared statistics pass is in
            ``details["prune"]["shared_statistics"]``).
        peak_memory_bytes: peak accelerator memory (CPU: process RSS) during the cell.
        details: per-block errors, timings, solver notes, shared statistics.
        seconds: phases of this cell: restore, calibration, statistics (a shared pass it
            triggered, or the dense pass its allocator read), gradients (the gradient pass it
            triggered; 0 when the gradients were in memory or on disk), prune, eval.
        layers: one record per prunable layer (``layer_records``); None for dense.
        dense_layers: prunable layers left dense by the suite's targets / ignore.
        saved_path: the absolute folder the pruned model was saved to (``save:``), else None.
        saved_sha256: that folder's ``runner.save.weights_sha256``.
    """

    cell: PlannedCell
    evaluations: list[EvaluationResult] = field(default_factory=list)
    error: str | None = None
    actual_sparsity: float | None = None
    prune_seconds: float | None = None
    peak_memory_bytes: int | None = None
    details: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    layers: list[dict[str, Any]] | None = None
    dense_layers: int | None = None
    saved_path: str | None = None
    saved_sha256: str | None = None


def layer_records(report: Any) -> list[dict[str, Any]]:
    """``Row.layers`` of a ``PruneReport``: one record per prunable layer (record.LAYER_TYPE)."""
    mse = {b.index: b.mse for b in report.blocks}
    return [{"name": l.name, "block": l.block, "role": l.role, "rows": l.shape[0], "columns": l.shape[1],
             "dense": l.dense, "allocated": l.allocated, "sparsity": l.sparsity, "pruned": l.pruned,
             "bias_added": l.bias_added, "block_mse": mse.get(l.block), "output_mse": l.output_mse}
            for l in report.layers]


def _free_memory() -> int:
    """Free CPU memory in bytes: shared statistics live there (a device holds one block's)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def _prune_details(report: Any, shared: CalibrationStatistics | None) -> dict[str, Any]:
    recon = [b for b in report.blocks if b.mse is not None]
    details = {
        "timings": report.timings, "block_passes": report.block_passes,
        "block_mse": [b.mse for b in recon], "block_cosine": [b.cosine for b in recon],
        "bias_added": sum(layer.bias_added for layer in report.layers),
        "layers": {layer.name: layer.details for layer in report.layers if layer.details},
    }
    if report.stages is not None:  # which stages ran after the metric, and their seconds
        details["stages"] = report.stages
    if shared is not None:  # prune_seconds is this cell's masking alone
        details["shared_statistics"] = {
            "seconds": shared.seconds, "block_passes": shared.block_passes, "needs": sorted(shared.needs),
            "megabytes": round(shared.nbytes / 2**20, 1)}
    return details


class ModelSession:
    """One model loaded for the cells of ``model_plan``; see the module docstring."""

    def __init__(self, model_plan: ModelPlan, device: torch.device, windows: Windows | None = None,
                 progress: Callable[[int, int], None] | None = None):
        self.plan, self.device, self.progress = model_plan, device, progress
        self.windows = windows if windows is not None else {}
        self.seconds: dict[str, float] = {"load": 0.0, "restore": 0.0, "calibration": 0.0, "statistics": 0.0,
                                          "gradients": 0.0}
        t0 = time.perf_counter()
        # Weights stay on the CPU when pruning on a GPU: the engine moves one block at a time.
        loaded = loading.load_model(model_plan.spec, "cpu" if device.type == "cuda" else device)
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.layers = [layer for _, _, layer in iter_layers(self.model)]
        self.dense = [(layer.weight.detach().clone(), None if layer.bias is None else layer.bias.detach().clone())
                      for layer in self.layers]
        self.flags = {k: v for k, v in vars(self.model.config).items() if k.endswith("_bias")}
        self.dirty = False
        self.replan(model_plan)
        self.seconds["load"] += time.perf_counter() - t0

    def _affordable(self, groups: dict[str, SharingGroup]) -> dict[str, SharingGroup]:
        """The groups whose statistics fit, and in ``self.sharing`` the cells that use them.
        Gram matrices are shared only when they fit in a quarter of free memory; otherwise
        a group's solver cells run their own passes and the rest still share."""
        gram_bytes = sum(4 * weight_of(layer).shape[-1] ** 2 for layer in self.layers)  # an upper bound
        gram_fits = gram_bytes < 0.25 * _free_memory()
        members: dict[str, list[PlannedCell]] = {}
        for c in self.plan.cells:
            if c.group in groups and (gram_fits or "gram" not in c.statistics):
                members.setdefault(c.group, []).append(c)
        members = {key: cells for key, cells in members.items() if len(cells) >= 2}
        self.sharing = {id(c): key for key, cells in members.items() for c in cells}
        return {key: SharingGroup(groups[key].calibration, frozenset().union(*(c.statistics for c in cells)),
                                  len(cells)) for key, cells in members.items()}

    def replan(self, model_plan: ModelPlan) -> None:
        """Serve the cells of another plan of the same model; the loaded weights stay."""
        self.restore()
        self.plan = model_plan
        self.groups = self._affordable(model_plan.groups)
        self.users = {key: group.cells for key, group in self.groups.items()}
        self.shared: dict[str, CalibrationStatistics | StadebenchError] = {}
        self.allocations: dict[str, dict[str, float] | None] = {}
        self.allocation_stats: dict[str, CalibrationStatistics] = {}
        self.gradient_users: dict[str, int] = {}
        for c in model_plan.cells:
            key = _gradient_key(c)
            if key is not None:
                self.gradient_users[key] = self.gradient_users.get(key, 0) + 1
        self.gradients: dict[str, GradientStatistics | StadebenchError] = {}

    def restore(self) -> None:
        """Put the dense weights back (and drop biases that pruning added)."""
        if not self.dirty:
            return
        t0 = time.perf_counter()
        with torch.no_grad():
            for layer, (weight, bias) in zip(self.layers, self.dense):
                layer.weight.copy_(weight)
                if bias is None:
                    layer.bias = None
                else:
                    layer.bias.copy_(bias)
        for flag, value in self.flags.items():
            setattr(self.model.config, flag, value)
        self.dirty = False
        self.seconds["restore"] += time.perf_counter() - t0

    def calibration(self, cell: PlannedCell) -> torch.Tensor:
        """The cell's calibration windows, cut once per protocol (the preflight usually has)."""
        return self.windows_for(cell.calibration)

    def windows_for(self, c: Any) -> torch.Tensor:
        """The windows of calibration protocol ``c`` for this model, cut on first use."""
        key = (self.plan.spec.model_dump_json(), calibration_key(c))
        if key not in self.windows:
            t0 = time.perf_counter()
            self.windows[key] = calibration_windows(c.dataset.resolved.instance, self.tokenizer, c.seqlen, c.n,
                                                    c.seed)
            self.seconds["calibration"] += time.perf_counter() - t0
        return self.windows[key]

    def statistics(self, cell: PlannedCell) -> CalibrationStatistics | None:
        """The statistics ``cell`` shares with its group, collected on first use and freed
        after the group's last cell; None when the cell runs its own passes."""
        key = self.sharing.get(id(cell))
        if key not in self.groups:
            return None
        if key not in self.shared:
            self.restore()
            group = self.groups[key]
            try:
                self.shared[key] = engine.collect_statistics(self.model, self.calibration(cell), group.needs,
                                                             calibration=group.calibration, device=self.device,
                                                             progress=self.progress)
            except StadebenchError as exc:  # every cell of the group fails the same way, without a retry
                self.shared[key] = exc
            else:
                self.seconds["statistics"] += self.shared[key].seconds
        stats = self.shared[key]
        self.users[key] -= 1
        if not self.users[key]:  # the group's last cell: free the memory
            del self.shared[key], self.groups[key], self.users[key]
        if isinstance(stats, StadebenchError):
            raise stats
        return stats

    def gradients_for(self, cell: PlannedCell) -> GradientStatistics | None:
        """The gradient statistics ``cell``'s metric reads (None when it reads none): from
        memory when another cell of this model computed them, else from the disk cache,
        else computed (and cached); freed after the last cell that uses them."""
        key = _gradient_key(cell)
        if key is None:
            return None
        if key not in self.gradients:
            self.restore()
            windows = self.calibration(cell)
            scale, accumulate = cell.metric.gradient_scale(), cell.calibration.accumulate
            disk = grad_cache.entry_key(self.plan.spec.model_dump_json(), self.plan.identity, windows, scale,
                                        accumulate, self.device)
            expected = {name: tuple(weight_of(layer).shape) for name, layer in named_layers(self.model).items()}
            found = grad_cache.load(disk, expected) if disk else None
            if found is not None:
                self.gradients[key] = found
            else:
                try:
                    found = self.gradients[key] = gradient_statistics(
                        self.model, windows, scale=scale, accumulate=accumulate, device=self.device,
                        progress=self.progress)
                except StadebenchError as exc:  # every cell that needs them fails the same way
                    self.gradients[key] = exc
                else:
                    self.seconds["gradients"] += found.seconds
                    if disk:
                        grad_cache.store(disk, found)
        stats = self.gradients[key]
        self.gradient_users[key] -= 1
        if not self.gradient_users[key]:
            del self.gradients[key], self.gradient_users[key]
        if isinstance(stats, StadebenchError):
            raise stats
        return stats

    def allocation(self, cell: PlannedCell, shared: CalibrationStatistics | None) -> dict[str, float] | None:
        """Each layer's sparsity for ``cell`` (None: every layer at the target), from the dense
        model: computed once per allocation, sparsity and layer selection. An allocator's
        statistics come from the cell's shared ones when they cover it, else from one dense
        pass per calibration protocol, kept for the model's other cells."""
        c, allocator = cell.cell, cell.allocator
        data = not allocator.data_free()
        key = canonical_json([calibration_key(cell.calibration) if data else None, c.allocation,
                              c.allocation_options, c.sparsity, c.targets, c.ignore])
        if key not in self.allocations:
            stats = shared if shared is not None and allocator.statistics <= shared.needs else None
            if data and stats is None:
                stats_key = calibration_key(cell.calibration)
                if stats_key not in self.allocation_stats:
                    self.restore()
                    self.allocation_stats[stats_key] = engine.collect_statistics(
                        self.model, self.calibration(cell), allocator.statistics, calibration=cell.calibration,
                        device=self.device, progress=self.progress)
                    self.seconds["statistics"] += self.allocation_stats[stats_key].seconds
                stats = self.allocation_stats[stats_key]
            who = c.allocation_plugin.who("allocator", c.allocation_label) if c.allocation_plugin else None
            self.allocations[key] = allocating.layer_sparsities(self.model, allocator, cell.pattern, c.sparsity,
                                                                targets=list(c.targets), ignore=list(c.ignore),
                                                                statistics=stats, who=who)
        return self.allocations[key]

    def _prune(self, cell: PlannedCell, result: CellResult) -> Any:
        """Prune ``cell`` into the loaded model; returns the PruneReport (None for dense)."""
        if cell.metric is None:
            result.actual_sparsity, result.prune_seconds = 0.0, 0.0
            return None
        windows = None if cell.calibration is None else self.calibration(cell)
        shared = None if cell.calibration is None else self.statistics(cell)
        sparsities = self.allocation(cell, shared)
        if not cell.statistics:
            windows = shared = None
        gradients = self.gradients_for(cell)
        self.dirty = True
        report = engine.prune(self.model, windows, cell.metric, cell.pattern, cell.cell.sparsity,
                              calibration=cell.calibration or engine.Calibration(), device=self.device,
                              progress=self.progress, statistics=shared, sparsities=sparsities,
                              gradients=gradients, stages=Stages(cell.refiner, cell.reconstructor))
        result.actual_sparsity, result.prune_seconds = report.sparsity, report.seconds
        result.layers = layer_records(report)
        result.dense_layers = sum(layer.dense for layer in report.layers)
        result.peak_memory_bytes = report.peak_memory_bytes
        result.details["prune"] = _prune_details(report, shared)
        result.seconds["prune"] = report.seconds
        return report

    def _save(self, cell: PlannedCell, result: CellResult, report: Any) -> None:
        """Save the pruned model, its card holding the scores just measured; a cell re-run
        replaces its folder. Any failure fails the cell, naming the folder."""
        from ..data.assets import CATALOGUE
        from . import save

        t0, c, folder = time.perf_counter(), cell.cell, cell.save_folder
        calibration = None if cell.calibration is None else {
            "dataset": cell.calibration.dataset.name, "options": cell.calibration.dataset.options,
            "seed": cell.calibration.seed}
        asset = CATALOGUE.get(c.model.id)
        base = asset.hub_id if asset is not None and asset.hub_id else c.model.id
        card = save.card_from_report(report, base, calibration=calibration,
                                     scores=[s for e in result.evaluations for s in e.scores],
                                     allocation=c.allocation, allocation_options=c.allocation_options,
                                     cell_key=cell.prune_key)
        try:
            option = "--out" if c.save_exact else "`save:` in the suite"
            saved = save.save_pruned(self.model, self.tokenizer, folder, card, force=True, option=option)
        except Exception as exc:  # noqa: BLE001 -- disk full, permissions, a model transformers cannot save
            raise StadebenchError(f"cannot save the pruned model to {folder}: "
                                  f"{exc if isinstance(exc, StadebenchError) else f'{type(exc).__name__}: {exc}'}"
                                  ) from None
        result.saved_path, result.saved_sha256 = str(saved.path), saved.weights_sha256
        result.details["save"] = {"path": str(saved.path), "warnings": list(saved.warnings)}
        result.seconds["save"] = time.perf_counter() - t0

    @contextlib.contextmanager
    def dense_weights(self) -> Iterator[None]:
        """While active the model holds its dense weights, biases and config flags; the
        pruned ones are put back afterwards (an evaluator's ``CellContext.dense``)."""
        pruned = [(layer.weight.detach().clone(), None if layer.bias is None else layer.bias.detach().clone())
                  for layer in self.layers]
        flags = {k: v for k, v in vars(self.model.config).items() if k.endswith("_bias")}
        dirty, self.dirty = self.dirty, True
        self.restore()
        try:
            yield
        finally:
            with torch.no_grad():
                for layer, (weight, bias) in zip(self.layers, pruned):
                    layer.weight.copy_(weight)
                    if bias is None:
                        layer.bias = None
                    elif layer.bias is None:
                        layer.bias = torch.nn.Parameter(bias, requires_grad=False)
                    else:
                        layer.bias.copy_(bias)
            for flag, value in flags.items():
                setattr(self.model.config, flag, value)
            self.dirty = dirty

    def _context(self, cell: PlannedCell, report: Any) -> CellContext:
        """What an evaluator with ``needs_cell`` gets: the suite's calibration windows (also
        for a data-free metric), the metric, pattern and per-layer report, the dense weights."""
        if cell.metric is None:
            return CellContext(self.dense_weights)
        c = cell.cell.calibration
        return CellContext(self.dense_weights, self.windows_for(c), cell.metric, cell.pattern, report.layers,
                           c.batch_size)

    def _evaluate(self, cell: PlannedCell, result: CellResult, report: Any = None) -> None:
        """Every pending evaluation, those that need the cell's context first (what they
        share, e.g. a forward pass, the others reuse); results in the pending order."""
        pending = cell.pending
        context = self._context(cell, report) if any(p.evaluator.needs_cell for p in pending) else None
        done = {}
        for i in sorted(range(len(pending)), key=lambda i: not pending[i].evaluator.needs_cell):
            evaluator, t0 = pending[i].evaluator, time.perf_counter()
            if evaluator.needs_cell or (evaluator.reuses_cell and context is not None):
                scores = evaluator.evaluate(self.model, self.tokenizer, self.device, cell=context)
            else:
                scores = evaluator.evaluate(self.model, self.tokenizer, self.device)
            scores = _checked(pending[i].spec.name, scores)
            elapsed = time.perf_counter() - t0
            for score in scores:
                if not math.isfinite(score.value):
                    raise NumericalError(f"{pending[i].spec.name} gave {score.name}={score.value} on {score.task}")
            done[i] = EvaluationResult(pending[i].key, scores, elapsed)
            result.seconds["eval"] = result.seconds.get("eval", 0.0) + elapsed
        result.evaluations += [done[i] for i in range(len(pending))]

    def run(self, cell: PlannedCell) -> CellResult:
        """Prune (from the dense weights) and evaluate one cell; errors become ``result.error``."""
        result = CellResult(cell)
        before = dict(self.seconds)
        try:
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            self.restore()
            report = self._prune(cell, result)
            self._evaluate(cell, result, report)
            if report is not None and cell.save_folder is not None:
                self._save(cell, result, report)
            if self.device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(self.device)
                result.peak_memory_bytes = max(peak, result.peak_memory_bytes or 0)
        except BaseException as exc:  # plugin code runs here: its sys.exit and Ctrl-C-alikes fail the cell
            if not isinstance(exc, Exception) and not _plugin_raised(exc):
                raise
            result.error = describe(exc, cell)
            result.evaluations = []
            result.saved_path = result.saved_sha256 = None
        for phase in ("restore", "calibration", "statistics", "gradients"):
            result.seconds[phase] = self.seconds[phase] - before[phase]
        return result


def _gradient_key(cell: PlannedCell) -> str | None:
    """Which gradient statistics ``cell`` reads, within its model's session: its windows
    (the calibration protocol), scale and accumulation; None when it reads none."""
    if cell.metric is None or "gradient" not in cell.metric.statistics or cell.calibration is None:
        return None
    c = cell.calibration
    return canonical_json([c.dataset.name, c.dataset.options, c.n, c.seqlen, c.seed, c.accumulate,
                           cell.metric.gradient_scale()])


def _checked(evaluator: str, scores: Any) -> list[Score]:
    """An evaluator's scores, checked for what a row can store."""
    if not isinstance(scores, list | tuple) or not all(isinstance(s, Score) for s in scores):
        raise PluginError(f"evaluator {evaluator!r} returned {type(scores).__name__}, not a list of Score")
    for s in scores:
        if not isinstance(s.value, int | float) or isinstance(s.value, bool):
            raise PluginError(f"evaluator {evaluator!r}: score {s.name!r} is {s.value!r}, not a number")
        for column, value, what in (("details", s.details, "details"), ("layer_diagnostics", s.layers, "layers")):
            try:
                normalise(column, value)
            except RecordError as exc:
                raise PluginError(f"evaluator {evaluator!r}: score {s.name!r} has {what} that cannot be "
                                  f"stored: {exc}") from None
    return list(scores)


class _CtrlC:
    """Whether the user pressed Ctrl-C, told apart from a KeyboardInterrupt that code raised."""

    watching = False
    pressed = False


@contextlib.contextmanager
def watch_ctrl_c() -> Iterator[None]:
    """While active (main thread only), SIGINT is noted before it raises KeyboardInterrupt,
    so that a session fails the cell whose plugin raised one but stops on a real Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def noted(signum, frame):
        if previous == signal.SIG_IGN:
            return
        _CtrlC.pressed = True
        if callable(previous):
            return previous(signum, frame)  # Python's own handler raises KeyboardInterrupt
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, noted)
    _CtrlC.watching, _CtrlC.pressed = True, False
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _CtrlC.watching = False


def headless() -> None:
    """Declare this process one with no user at its terminal (a remote worker): every
    KeyboardInterrupt in a cell then comes from code and fails that cell."""
    _CtrlC.watching, _CtrlC.pressed = True, False


def _plugin_raised(exc: BaseException) -> bool:
    """A SystemExit, or a KeyboardInterrupt with no Ctrl-C behind it (only knowable while
    ``watch_ctrl_c`` is active); GeneratorExit and the like always propagate."""
    if isinstance(exc, SystemExit):
        return True
    return isinstance(exc, KeyboardInterrupt) and _CtrlC.watching and not _CtrlC.pressed


def _culprit(exc: BaseException, cell: PlannedCell) -> str | None:
    """``metric 'x' (dist 1.0)`` for the plugin whose code is innermost in the traceback."""
    parts = [("metric", cell.cell.metric_label, cell.cell.metric_plugin) if cell.metric else None,
             ("pattern", cell.cell.pattern, cell.cell.pattern_plugin) if cell.pattern else None,
             ("allocator", cell.cell.allocation_label, cell.cell.allocation_plugin) if cell.allocator else None,
             *[("evaluator", p.spec.name, p.spec.resolved) for p in cell.pending],
             ("dataset", cell.calibration.dataset.name, cell.calibration.dataset.resolved) if cell.calibration
             else None]
    parts = [p for p in parts if p and p[2]]
    frames = [frame for frame, _ in reversed(list(traceback.walk_tb(exc.__traceback__)))]
    # the innermost frame of a part's own object, else of its module (one module may hold several)
    hit = next((p for f in frames for p in parts if f.f_locals.get("self") is p[2].instance), None) or next(
        (p for f in frames for p in parts if f.f_globals.get("__name__") == type(p[2].instance).__module__), None)
    if hit is None:
        return None
    kind, name, r = hit
    return r.who(kind, name)


def describe(exc: BaseException, cell: PlannedCell | None = None) -> str:
    """The message recorded for a failed cell: the error, and for an unexpected one the
    plugin whose code raised it (the traceback too when STADEBENCH_DEBUG is set)."""
    if isinstance(exc, StadebenchError):
        message = str(exc)
    else:
        message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if isinstance(exc, SystemExit):
            message = f"SystemExit({exc.code!r}): plugin code called sys.exit"
        where = cell and _culprit(exc, cell)
        if where:
            message = f"{where}: {message}"
    if os.environ.get("STADEBENCH_DEBUG"):
        message += "\n" + "".join(traceback.format_exception(exc))
    return message


__all__ = ["CellResult", "EvaluationResult", "ModelSession", "describe", "headless", "watch_ctrl_c"]
