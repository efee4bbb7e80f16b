"""Execute a suite's cells: each model loaded once, dense weights restored in memory.

A cell's work is a function of (cell, loaded model, cached calibration windows) that
returns leaderboard rows; the runner writes one Parquet file per cell as soon as it
finishes, so a killed run loses at most the cell in flight, and a re-run skips every
(cell, evaluation) already in the leaderboard.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import tempfile
import time
import traceback
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import groupby
from pathlib import Path
from typing import Any

import torch

from ..version import __version__
from . import leaderboard
from ..errors import ConfigError, NumericalError, StadebenchError
from ..plugins import get_plugins
from .suite import Cell, Suite, expand, select


@dataclass
class Summary:
    """What a run did."""

    run_id: str
    cells: int = 0
    skipped: int = 0
    finished: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=lambda: {
        "load": 0.0, "restore": 0.0, "calibration": 0.0, "prune": 0.0, "eval": 0.0, "write": 0.0, "total": 0.0})
    """Wall time by phase; ``total`` is the whole run."""


class Events:
    """Progress callbacks; the CLI overrides them to draw progress bars."""

    def plan(self, todo: int, skipped: int) -> None: ...
    def cell_start(self, cell: Cell, index: int, total: int) -> None: ...
    def blocks(self, done: int, total: int) -> None: ...
    def cell_end(self, cell: Cell, error: str | None) -> None: ...
    def note(self, message: str) -> None: ...


def model_source(spec: Any) -> str:
    """Where a model spec's weights come from, without loading anything."""
    from ..data.assets import CATALOGUE

    if spec.id in CATALOGUE:
        return "asset"
    path = Path(spec.id).expanduser()
    if path.suffix == ".gguf" or spec.gguf_file:
        return "gguf"
    return "local" if path.exists() else "hub"


@functools.cache
def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("-dirty" if dirty else "")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def resolve_device(name: str) -> torch.device:
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


class Runner:
    """Runs one suite; see ``run``."""

    def __init__(self, suite: Suite, events: Events | None = None, leaderboard_dir: str | Path | None = None):
        self.suite = suite
        self.events = events or Events()
        self.folder = Path(leaderboard_dir or suite.leaderboard)
        self.device = resolve_device(suite.device)
        self.summary = Summary(run_id=datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + uuid.uuid4().hex[:6])
        plugins = get_plugins()
        self._evaluators = {e.name: plugins.evaluators.get(e.name).cls for e in suite.evaluations}
        self._instances: dict[str, Any] = {}
        self.windows: dict[tuple[str, str], torch.Tensor] = {}
        """Calibration windows by (model spec, calibration spec), cut once per run."""
        self._provenance = {
            "run_id": self.summary.run_id, "suite": suite.name, "stadebench_version": __version__,
            "torch_version": torch.__version__, "transformers_version": _version("transformers"),
            "lm_eval_version": _version("lm_eval"), "git_commit": _git_commit(),
            "device": device_name(self.device),
        }

    # --- keys ---------------------------------------------------------------------

    def evaluator(self, evaluation: Any) -> Any:
        """The evaluator an evaluation spec names, built once per run."""
        key = evaluation.model_dump_json()
        if key not in self._instances:
            self._instances[key] = self._evaluators[evaluation.name](evaluation.options)
        return self._instances[key]

    def key_row(self, cell: Cell, evaluation: Any) -> dict[str, Any]:
        """The leaderboard key columns of one (cell, evaluation)."""
        evaluator = self.evaluator(evaluation)
        opts = evaluator.options.model_dump(mode="json")
        dataset = opts.get("dataset")
        row = {
            "model": cell.model.id, "model_revision": cell.model.revision,
            "model_source": model_source(cell.model), "metric": cell.metric,
            "metric_version": cell.metric_version, "metric_options": cell.metric_options,
            "pattern": cell.pattern, "pattern_options": cell.pattern_options or None,
            "sparsity": cell.sparsity, "dtype": cell.model.dtype,
            "evaluator": evaluation.name, "evaluator_version": evaluator.version, "eval_options": opts,
            "eval_dataset": dataset.get("name") if isinstance(dataset, dict) else dataset,
            "eval_split": opts.get("split"), "eval_seqlen": opts.get("seqlen"),
        }
        if not cell.dense:
            c = cell.calibration
            row.update(calib_dataset=c.dataset.name, calib_options=c.dataset.options, calib_n=c.n,
                       calib_seqlen=c.seqlen, calib_seed=c.seed, sequential=c.sequential,
                       batch_size=c.batch_size)
        return row

    def plan(self, only: list[str] | None = None, force: bool = False) -> list[tuple[Cell, list]]:
        """Cells to run, each with the evaluations it still lacks."""
        cells = select(expand(self.suite), only or [])
        done = set() if force else leaderboard.finished_cells(self.folder)
        skip = set()
        for e in self.suite.evaluations:
            reason = e.optional and self.evaluator(e).unavailable()
            if reason:
                skip.add(e.model_dump_json())
                self.events.note(f"skipping optional evaluation {e.name} {e.options}: {reason}")
        todo = []
        for cell in cells:
            pending = [e for e in cell.evaluations
                       if e.model_dump_json() not in skip and leaderboard.cell_key(self.key_row(cell, e)) not in done]
            if pending:
                todo.append((cell, pending))
        self.summary.cells = len(cells)
        self.summary.skipped = len(cells) - len(todo)
        return todo

    def preflight(self, todo: list[tuple[Cell, list]]) -> None:
        """Check before any cell runs what would otherwise fail every cell of a model: the
        tokenizer's ids fit the model's embedding, the calibration windows fit the model's
        context and its text is long enough (the windows are cut now and cached). Raises
        ConfigError; a model that cannot be reached is left to fail its own cells."""
        from ..data.calibration import calibration_windows
        from ..data.loading import load_config_and_tokenizer
        from ..core.models import text_config

        metrics = get_plugins().metrics
        for model, group in groupby(todo, key=lambda item: item[0].model):
            group = list(group)
            calibrations = {c.calibration.model_dump_json(): c.calibration for c, _ in group if not c.dense
                            and (metrics.get(c.metric).cls.statistics or metrics.get(c.metric).cls.solver)}
            try:
                config, tokenizer = load_config_and_tokenizer(model)
            except Exception:
                continue
            text = text_config(config)
            vocab, limit = getattr(text, "vocab_size", None), getattr(text, "max_position_embeddings", None)
            if isinstance(vocab, int) and len(tokenizer) > vocab:
                raise ConfigError(f"{self.suite.name}: model {model.id!r}: its tokenizer has {len(tokenizer)} tokens "
                                  f"but the model embeds only {vocab}; give the matching `tokenizer:`")
            self._check_shapes(model, config, {(c.pattern, json.dumps(c.pattern_options, sort_keys=True))
                                               for c, _ in group if not c.dense})
            for c in calibrations.values():
                where = f"{self.suite.name}: model {model.id!r}: calibration"
                if isinstance(limit, int) and c.seqlen > limit:
                    raise ConfigError(f"{where}.seqlen={c.seqlen} is longer than the model's context "
                                      f"(max_position_embeddings={limit}); use seqlen ≤ {limit}")
                dataset = get_plugins().datasets.get(c.dataset.name).cls(c.dataset.options)
                t0 = time.perf_counter()
                try:
                    self.windows[model.model_dump_json(), c.model_dump_json()] = calibration_windows(
                        dataset, tokenizer, c.seqlen, c.n, c.seed)
                except ConfigError as exc:
                    raise ConfigError(f"{where}: {exc}") from None
                self.summary.seconds["calibration"] += time.perf_counter() - t0

    def _check_shapes(self, model: Any, config: Any, patterns: set[tuple[str, str]]) -> None:
        """Every pattern fits every prunable layer (N:M needs widths divisible by M); the
        layers come from a weightless copy of the model built on the meta device."""
        from transformers import AutoModelForCausalLM

        from ..core.engine import resolve
        from ..core.models import iter_layers, weight_of

        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=model.trust_remote_code)
        shapes = {tuple(weight_of(layer).shape): name for _, name, layer in iter_layers(skeleton)}
        for spec, options in sorted(patterns):
            _, pattern = resolve("magnitude", spec, None, json.loads(options) or None)
            for shape, name in shapes.items():
                try:
                    pattern.check_shape(shape)
                except ConfigError as exc:
                    raise ConfigError(f"{self.suite.name}: model {model.id!r}: layer {name} {list(shape)}: "
                                      f"{exc}") from None

    # --- execution ----------------------------------------------------------------

    def run(self, only: list[str] | None = None, force: bool = False) -> Summary:
        """Run every pending cell; a failing cell is recorded as failed and the rest go on."""
        t0 = time.perf_counter()
        todo = self.plan(only, force)
        check_writable(self.folder)
        self.preflight(todo)
        leaderboard.update_manifest(self.folder)  # a run killed mid-update left it stale
        self.events.plan(len(todo), self.summary.skipped)
        index = 0
        for _, group in groupby(todo, key=lambda item: item[0].model):
            group = list(group)
            try:
                state = _ModelState(self, group[0][0].model, group)
            except Exception as exc:  # a missing model fails its cells, not the suite
                for cell, pending in group:
                    index += 1
                    self.events.cell_start(cell, index, len(todo))
                    self._failed(cell, pending, exc, {})
                continue
            for cell, pending in group:
                index += 1
                self.events.cell_start(cell, index, len(todo))
                self._run_cell(state, cell, pending)
            del state
        self.summary.seconds["total"] = time.perf_counter() - t0
        return self.summary

    def _run_cell(self, state: _ModelState, cell: Cell, pending: list) -> None:
        info: dict[str, Any] = {}
        try:
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            rows = state.run(cell, pending, info)
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            self._failed(cell, pending, exc, info)
            return
        self._write(rows)
        self.summary.finished.append(cell.label)
        self.events.cell_end(cell, None)

    def _failed(self, cell: Cell, pending: list, exc: BaseException, info: dict) -> None:
        message = str(exc) if isinstance(exc, StadebenchError) else f"{type(exc).__name__}: {exc}"
        if os.environ.get("STADEBENCH_DEBUG"):
            message += "\n" + traceback.format_exc()
        rows = [{**self.key_row(cell, e), **info, "status": "failed", "error": message} for e in pending]
        self._write(rows)
        self.summary.failed.append((cell.label, message))
        self.events.cell_end(cell, message)

    def _write(self, rows: list[dict]) -> None:
        t0 = time.perf_counter()
        rows = [{**row, **self._provenance} for row in rows]
        self.summary.files.append(leaderboard.write_rows(self.folder, rows))
        self.summary.seconds["write"] += time.perf_counter() - t0


class _ModelState:
    """A loaded model, a copy of its dense prunable weights, cached calibration windows,
    and the one-shot statistics its cells share."""

    def __init__(self, runner: Runner, spec: Any, group: list[tuple[Cell, list]] = ()):
        from ..data.loading import load_model
        from ..core.models import iter_layers

        self.runner, self.spec = runner, spec
        t0 = time.perf_counter()
        # Weights stay on the CPU when pruning on a GPU: the engine moves one block at a time.
        loaded = load_model(spec, "cpu" if runner.device.type == "cuda" else runner.device)
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.layers = [layer for _, _, layer in iter_layers(self.model)]
        self.dense = [(layer.weight.detach().clone(), None if layer.bias is None else layer.bias.detach().clone())
                      for layer in self.layers]
        self.flags = {k: v for k, v in vars(self.model.config).items() if k.endswith("_bias")}
        self.dirty = False
        runner.summary.seconds["load"] += time.perf_counter() - t0
        self._plan_sharing(group)

    def _plan_sharing(self, group: list[tuple[Cell, list]]) -> None:
        """One-shot cells with the same calibration share one statistics pass, collected
        for the union of their metrics' needs and freed after the last of them. Solver
        cells join only when the Gram matrices fit in a quarter of the free memory."""
        from ..core.models import weight_of

        metrics = get_plugins().metrics
        self.needs: dict[str, set[str]] = {}
        self.users: dict[str, int] = {}
        self.shared: dict[str, Any] = {}
        gram_bytes = sum(4 * weight_of(layer).shape[-1] ** 2 for layer in self.layers)  # an upper bound
        gram_fits = gram_bytes < 0.25 * _free_memory()
        for cell, _ in group:
            if cell.dense or cell.calibration.sequential:
                continue
            cls = metrics.get(cell.metric).cls
            if not cls.statistics or (cls.solver and not gram_fits):
                continue
            key = cell.calibration.model_dump_json()
            self.needs.setdefault(key, set()).update(cls.statistics)
            self.users[key] = self.users.get(key, 0) + 1
        for key in [k for k, n in self.users.items() if n < 2]:  # nothing to share
            del self.needs[key], self.users[key]

    def shared_statistics(self, cell: Cell) -> Any:
        """The statistics ``cell`` shares with other cells, collected on first use; None
        when it runs its own passes."""
        from ..core.engine import collect_statistics

        key = cell.calibration.model_dump_json()
        if key not in self.needs:
            return None
        if key not in self.shared:
            self.restore()
            c = cell.calibration
            try:
                self.shared[key] = collect_statistics(
                    self.model, self.calibration(cell), self.needs[key], batch_size=c.batch_size,
                    device=self.runner.device, progress=self.runner.events.blocks)
            except StadebenchError as exc:  # every cell sharing it fails the same way, without a retry
                self.shared[key] = exc
            if not isinstance(self.shared[key], Exception):
                self.runner.summary.seconds["prune"] += self.shared[key].seconds
        stats = self.shared[key]
        self.users[key] -= 1
        if not self.users[key]:  # the last cell that needs them: free the memory
            del self.shared[key], self.needs[key], self.users[key]
        if isinstance(stats, Exception):
            raise stats
        return stats

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
        self.runner.summary.seconds["restore"] += time.perf_counter() - t0

    def calibration(self, cell: Cell) -> torch.Tensor:
        from ..data.calibration import calibration_windows

        c = cell.calibration
        windows = self.runner.windows
        key = (self.spec.model_dump_json(), c.model_dump_json())
        if key not in windows:  # preflight cuts them unless it could not reach the tokenizer
            t0 = time.perf_counter()
            dataset = get_plugins().datasets.get(c.dataset.name).cls(c.dataset.options)
            windows[key] = calibration_windows(dataset, self.tokenizer, c.seqlen, c.n, c.seed)
            self.runner.summary.seconds["calibration"] += time.perf_counter() - t0
        return windows[key]

    def run(self, cell: Cell, pending: list, info: dict) -> list[dict]:
        from ..core.engine import prune, resolve

        runner, seconds = self.runner, self.runner.summary.seconds
        self.restore()
        details: dict[str, Any] = {}
        if cell.dense:
            info.update(actual_sparsity=0.0, prune_seconds=0.0)
        else:
            metric, pattern = resolve(cell.metric, cell.pattern, cell.metric_options, cell.pattern_options)
            dist, version = get_plugins().provenance(get_plugins().metrics.get(cell.metric).plugin)
            info.update(metric_plugin=dist, metric_plugin_version=version)
            data_free = not metric.statistics and not metric.solver
            windows = None if data_free else self.calibration(cell)
            c = cell.calibration
            shared = None if data_free else self.shared_statistics(cell)
            self.dirty = True
            report = prune(self.model, windows, metric=metric, pattern=pattern, sparsity=cell.sparsity,
                           sequential=c.sequential, batch_size=c.batch_size, device=runner.device,
                           progress=runner.events.blocks, statistics=shared)
            seconds["prune"] += report.seconds
            info.update(actual_sparsity=report.sparsity, prune_seconds=report.seconds,
                        peak_memory_bytes=report.peak_memory_bytes)
            recon = [b for b in report.blocks if b.mse is not None]
            details["prune"] = {
                "timings": report.timings, "block_passes": report.block_passes,
                "block_mse": [b.mse for b in recon], "block_cosine": [b.cosine for b in recon],
                "bias_added": sum(l.bias_added for l in report.layers),
                "layers": {l.name: l.details for l in report.layers if l.details},
            }
            if shared is not None:  # prune_seconds is this cell's masking alone
                details["prune"]["shared_statistics"] = {
                    "seconds": shared.seconds, "block_passes": shared.block_passes, "needs": sorted(shared.needs),
                    "megabytes": round(shared.nbytes / 2**20, 1)}
        rows = []
        for evaluation in pending:
            key = runner.key_row(cell, evaluation)
            evaluator = runner.evaluator(evaluation)
            t0 = time.perf_counter()
            scores = evaluator.evaluate(self.model, self.tokenizer, runner.device)
            elapsed = time.perf_counter() - t0
            seconds["eval"] += elapsed
            for score in scores:
                if not math.isfinite(score.value):
                    raise NumericalError(f"{evaluation.name} gave {score.name}={score.value} on {score.task}")
                rows.append({**key, **info, "task": score.task, "score": score.name, "value": score.value,
                             "stderr": score.stderr, "higher_is_better": score.higher_is_better,
                             "status": "ok", "eval_seconds": elapsed,
                             "details": {**details, "eval": score.details}})
        if runner.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(runner.device)
            for row in rows:
                row["peak_memory_bytes"] = max(peak, row.get("peak_memory_bytes") or 0)
        return rows


def _free_memory() -> int:
    """Free CPU memory in bytes: shared statistics live there (a device holds one block's)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def run_suite(suite: Suite, *, only: list[str] | None = None, force: bool = False,
              events: Events | None = None) -> Summary:
    """Run ``suite``: every pending cell, results written to its leaderboard folder."""
    return Runner(suite, events).run(only, force)


__all__ = ["Events", "Runner", "Summary", "run_suite"]
