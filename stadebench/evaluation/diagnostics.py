"""The ``diagnostics`` evaluator: STADE's theory of the output error against measurement.

For every pruned layer of a cell it predicts, from the dense model's calibration
statistics, the output error of the mask the cell applied (and of the masks the other
built-in metrics would have chosen for that layer at its sparsity), and measures each on
held-out windows, with the layer's inputs taken from the dense model so that layers are
comparable. The formulas are in ``stadebench.core.diagnostics`` and docs/diagnostics.md.

The dense model's statistics (calibration and held-out: sums and Gram matrices) are
collected once per model and kept for its other cells.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field

from ..base import CellContext, Evaluator, LayerResult, Options, Score
from ..core import diagnostics as theory
from ..core.engine import Calibration, collect_statistics
from ..core.models import check_context, weight_of
from ..data.calibration import eval_tokens
from ..errors import ConfigError
from ..hookspecs import hookimpl
from .perplexity import DatasetRef, Perplexity

APPLIED = "applied"
_SIDE = {"high_mean": "above", "low_mean": "at or below"}


class Diagnostics(Evaluator):
    """Predicted against measured output error of every pruned layer (STADE's theory), and the winners."""

    name = "diagnostics"
    version = "1"
    needs_cell = True

    class Options(Options):
        dataset: str | DatasetRef = Field("enwiki-2016", description="held-out text: a dataset name, or {name, "
                                                                     "options}; its evaluation split is used")
        split: str | None = Field(None, description="split of the held-out windows; default the dataset's "
                                                    "eval_split")
        seqlen: int = Field(512, ge=2, le=1 << 20, description="tokens per held-out window")
        max_windows: int = Field(8, ge=1, le=1 << 16, description="held-out windows")
        metrics: list[str] = Field(["magnitude", "wanda", "stade", "sparsegpt"], min_length=1,
                                   description="metrics whose masks are diagnosed beside the applied one")

    def __init__(self, options=None):
        super().__init__(options)
        from ..plugins import get_plugins

        unknown = [m for m in self.options.metrics if m not in get_plugins().metrics]
        if unknown:
            raise ConfigError(f"diagnostics: unknown metric {unknown[0]!r} in metrics; see `stadebench list metrics`")
        plugins = get_plugins().metrics
        graded = [m for m in self.options.metrics if "gradient" in plugins.get(m).cls.statistics]
        if graded:
            raise ConfigError(f"diagnostics: metric {graded[0]!r} in metrics reads gradients, which diagnostics do "
                              "not compute (they compare input statistics); leave it out of metrics")
        self._dense: dict[tuple, tuple[Any, Any]] = {}

    def _windows(self) -> Perplexity:
        return Perplexity({"dataset": self.options.dataset, "split": self.options.split,
                           "seqlen": self.options.seqlen, "max_windows": self.options.max_windows})

    def unavailable(self) -> str | None:
        return self._windows().unavailable()

    def check(self) -> None:
        self._windows().check()

    def check_model(self, config: Any) -> None:
        check_context(config, self.options.seqlen, "seqlen")

    def fingerprint(self) -> str | None:
        return self._windows().fingerprint()

    def heldout(self, tokenizer: Any) -> torch.Tensor:
        """The held-out windows: the first ``max_windows`` of the evaluation stream (those
        perplexity reads, never calibration windows)."""
        dataset = self._windows().dataset()
        stream = eval_tokens(dataset, tokenizer, self.options.split)
        windows = min(stream.numel() // self.options.seqlen, self.options.max_windows)
        if windows == 0:
            raise ConfigError(f"diagnostics: {dataset.name!r} has {stream.numel()} evaluation tokens, fewer than "
                              f"one window of seqlen={self.options.seqlen}")
        return stream[: windows * self.options.seqlen].view(windows, self.options.seqlen)

    def dense_statistics(self, model: torch.nn.Module, tokenizer: Any, cell: CellContext, device: Any):
        """Calibration and held-out statistics of the dense model, once per model and windows."""
        key = (id(model), cell.calibration.shape, hash(cell.calibration.numpy().tobytes()))
        if key not in self._dense:
            self._dense.clear()  # one model at a time: they take the memory of two Gram matrices per layer
            needs = {"sum", "sumsq", "gram"}
            with cell.dense():
                settings = Calibration(sequential=False, batch_size=cell.batch_size)
                calibration = collect_statistics(model, cell.calibration, needs, calibration=settings, device=device)
                heldout = collect_statistics(model, self.heldout(tokenizer), needs, calibration=settings,
                                             device=device)
                weights = {name: (weight_of(model.get_submodule(name)).detach().float().clone(),
                                  _bias(model.get_submodule(name))) for name in calibration.layers}
            self._dense[key] = (calibration, heldout, weights)
        return self._dense[key]

    def evaluate(self, model: torch.nn.Module, tokenizer: Any, device: torch.device | str | None = None,
                 cell: CellContext | None = None) -> list[Score]:
        if cell is None or cell.metric is None:  # the dense baseline: nothing was pruned
            return [Score("diagnostics", "layers", 0.0, details={"note": "dense: no pruned layer"})]
        from ..plugins import resolve_plugin

        calibration, heldout, dense = self.dense_statistics(model, tokenizer, cell, device)
        candidates = {m: resolve_plugin("metric", m) for m in self.options.metrics}
        diagnoses = []
        for layer in cell.layers:
            if layer.dense:
                continue
            weight, bias = dense[layer.name]
            stats = calibration.layers[layer.name]
            module = model.get_submodule(layer.name)
            pruned = weight_of(module).detach().float()
            now = _bias(module)
            applied = LayerResult(pruned == 0, pruned.clone(), None if now is None else now - (
                0 if bias is None else bias))
            decided = {APPLIED: applied}
            for name, metric in candidates.items():
                decided[name] = metric.prune_layer(weight, stats, cell.pattern, layer.allocated)
            diagnoses.append(theory.diagnose_from_stats(weight, stats, heldout.layers[layer.name], decided))
        return _scores(diagnoses, cell.metric.name, self.options.model_dump(mode="json"))


def _bias(module: torch.nn.Module) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    return None if bias is None else bias.detach().double().clone()


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _scores(diagnoses: list[theory.LayerDiagnosis], metric: str, options: dict[str, Any]) -> list[Score]:
    """Per-cell summaries, and the per-layer records on the ``layers`` score."""
    summary = theory.summarise(diagnoses)
    records = [_record(d, name) for d in diagnoses for name in d.metrics]
    details = {"metric": metric, "held_out": {k: options[k] for k in ("dataset", "split", "seqlen", "max_windows")}}
    scores = [Score("diagnostics", "layers", float(len(diagnoses)), details=details, layers=records)]
    for name, rho in summary["spearman"].items():
        if _finite(rho):
            scores.append(Score("diagnostics", f"spearman_{name}", rho, details={
                "what": "rank correlation over layers of predicted and measured relative output error"}))
        errors = [d.relative(name) for d in diagnoses if _finite(d.relative(name))]
        if errors:
            scores.append(Score("diagnostics", f"relative_error_{name}", sum(errors) / len(errors),
                                higher_is_better=False, details={
                                    "what": "mean over layers of measured E|e|^2 / E|Wx|^2 on held-out windows"}))
    if _finite(summary["winner_agreement"]):
        scores.append(Score("diagnostics", "winner_agreement", summary["winner_agreement"], details={
            "what": "share of layers whose predicted lowest-error metric is the measured one"}))
    split = summary["stade_vs_wanda"]
    if split:
        for side in ("high_mean", "low_mean"):
            if _finite(split[side]):
                scores.append(Score("diagnostics", f"stade_beats_wanda_{side}", split[side], details={
                    "threshold": split["threshold"], "layers": split[f"{side}_layers"],
                    "what": f"share of layers with median |mu|/sigma {_SIDE[side]} the threshold where STADE's "
                            "measured error is below Wanda's"}))
    return scores


def _record(d: theory.LayerDiagnosis, name: str) -> dict[str, Any]:
    m = d.metrics[name]
    return {"name": d.layer, "block": d.block, "role": d.role, "regime_median": d.regime_median,
            "regime_p90": d.regime_p90, "output_energy": d.output_energy, "candidate": name,
            "applied": name == APPLIED, "bias_corrected": m.bias_corrected,
            "predicted_diagonal": m.predicted_diagonal, "predicted_diagonal_corrected": m.predicted_diagonal_corrected,
            "predicted_gram": m.predicted_gram, "predicted": m.predicted, "measured": m.measured,
            "relative_predicted": d.relative(name, "predicted"), "relative_measured": d.relative(name),
            "predicted_winner": d.predicted_winner == name, "measured_winner": d.measured_winner == name}


@hookimpl
def register_evaluators(register):
    register(Diagnostics)


__all__ = ["APPLIED", "Diagnostics"]
