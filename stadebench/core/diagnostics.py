"""Theory against measurement: the output error a pruned layer should make, and the one it makes.

For a linear layer y = Wx whose pruning changes the weight by ΔW = W − Ŵ and the bias by
b_Δ, the output error on an input x is e = b_Δ − ΔW x. Over inputs with mean μ and
covariance Σ (second moment S = Σ + μμᵀ), row i expects

    E[e_i²] = ΔW_i Σ ΔW_iᵀ + (ΔW_i μ − b_Δi)²,

which is ``ΔW_i Σ ΔW_iᵀ`` with STADE's correction (b_Δ = ΔW μ) and ``ΔW_i S ΔW_iᵀ``
without it (the "gram" form). Treating channels as independent keeps the diagonal of Σ
only: Σ_j ΔW_ij² σ_j² (+ (ΔW_i μ)² uncorrected), the "diagonal" form Wanda (|W|·‖x‖) and
STADE (|W|·σ) rank by.

Every error here is E‖e‖² per token: the mean over tokens of the squared error summed over
output rows, in the squared units of the layer's output. ``relative=True`` divides it by the
dense layer's E‖Wx‖² (its output without the bias), so that layers of any size and scale
compare. docs/diagnostics.md has the derivation and how to read the numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..base import INPUT_STATISTICS, LayerInfo, LayerResult, LayerStats, Metric, Pattern
from ..errors import ConfigError
from .statistics import Accumulator

Form = Literal["diagonal", "gram"]
_CHUNK = 8192  # tokens per matmul in measured errors: bounds memory on long held-out sets


def stats_from_inputs(x: torch.Tensor, layer_info: LayerInfo,
                      needs: Iterable[str] = INPUT_STATISTICS) -> LayerStats:
    """The ``LayerStats`` the engine would collect from inputs ``x`` (``[tokens, in]``, any float
    dtype), through the engine's own accumulator: sums float64, Gram float32."""
    needs = frozenset(needs)
    if not needs <= INPUT_STATISTICS:
        raise ConfigError(f"unknown input statistics {sorted(needs - INPUT_STATISTICS)}; known: "
                          f"{sorted(INPUT_STATISTICS)}")
    acc = Accumulator(needs)
    acc.add(x)
    return acc.stats(layer_info)


def _moments(stats: LayerStats) -> tuple[torch.Tensor, torch.Tensor]:
    """μ and the population variance (over tokens, /n as the Gram form's E[xxᵀ]), float64."""
    if stats.sum is None or (stats.m2 is None and stats.sumsq is None):
        raise ConfigError(f"diagnostics of {stats.layer.name} need the 'sum' statistic (means and variances)")
    n = stats.count
    mean = stats.sum.double() / n
    m2 = stats.m2 if stats.m2 is not None else stats.sumsq - stats.sum * stats.sum / n
    return mean, (m2.double() / n).clamp_min(0)


def _quantile(values: torch.Tensor, q: float) -> float:
    """Linear-interpolation quantile that keeps infinities (torch.quantile turns them into NaN)."""
    v = values.sort().values
    pos = q * (len(v) - 1)
    lo, hi = float(v[math.floor(pos)]), float(v[math.ceil(pos)])
    frac = pos - math.floor(pos)
    return lo if lo == hi or frac == 0 else lo + (hi - lo) * frac


def input_regime(stats: LayerStats) -> dict[str, float]:
    """How far the inputs are from centred: ``{"median", "p90"}`` of |μ_j|/σ_j over channels.

    A constant channel (σ_j = 0) counts as infinitely off-centre, an all-zero one is left out;
    NaN when every channel is zero.
    """
    mean, var = _moments(stats)
    sd, mu = var.sqrt(), mean.abs()
    live = (sd > 0) | (mu > 0)
    ratio = torch.where(sd > 0, mu / sd.clamp_min(torch.finfo(sd.dtype).tiny), math.inf)[live]
    if not len(ratio):
        return {"median": math.nan, "p90": math.nan}
    return {"median": _quantile(ratio, 0.5), "p90": _quantile(ratio, 0.9)}


def weight_change(weight: torch.Tensor, mask: torch.Tensor, new_weight: torch.Tensor | None = None) -> torch.Tensor:
    """ΔW = W − Ŵ (float64) where Ŵ is ``new_weight`` (the dense weight when None) with the
    mask's weights zeroed, as the engine applies a ``LayerResult``."""
    applied = (weight if new_weight is None else new_weight).double().masked_fill(mask, 0.0)
    return weight.double() - applied


def _expected_energy(d: torch.Tensor, stats: LayerStats, bias_corrected: bool, form: Form) -> float:
    """Σ_i E[(d_i x − corr_i)²] for the rows d_i of ``d`` (float64), in the given form."""
    if form == "gram":
        if stats.gram is None:
            raise ConfigError(f"the Gram form needs the 'gram' statistic, which {stats.layer.name} lacks")
        second = stats.gram.double() / stats.count
        total = float(((d @ second) * d).sum())
        if bias_corrected:
            mean, _ = _moments(stats)
            total -= float((d @ mean).square().sum())
        return max(total, 0.0)
    if form != "diagonal":
        raise ConfigError(f"form must be 'diagonal' or 'gram', got {form!r}")
    mean, var = _moments(stats)
    total = float((d.square() @ var).sum())
    if not bias_corrected:
        total += float((d @ mean).square().sum())
    return total


def predicted_error(weight: torch.Tensor, mask: torch.Tensor, stats: LayerStats, *, bias_corrected: bool,
                    form: Form = "diagonal", new_weight: torch.Tensor | None = None,
                    relative: bool = False) -> float:
    """E‖e‖² per token that the statistics predict for pruning ``mask`` (True = pruned) out of
    ``weight`` (``[out, in]``), the kept weights replaced by ``new_weight`` when given.

    ``bias_corrected`` assumes the bias absorbs the error's mean (b_Δ = ΔW μ, STADE's
    correction), leaving the variance term only. ``form="diagonal"`` treats channels as
    independent (needs ``sum``); ``"gram"`` uses the full covariance (needs ``gram``, and
    ``sum`` when corrected; ConfigError when missing). ``relative`` divides by the dense
    layer's E‖Wx‖² predicted in the same form.
    """
    err = _expected_energy(weight_change(weight, mask, new_weight), stats, bias_corrected, form)
    if relative:
        return err / _expected_energy(weight.double(), stats, False, form)
    return err


def _mean_sq_norm(x: torch.Tensor, matrix: torch.Tensor, offset: torch.Tensor | None) -> float:
    """Mean over the rows x_t of ``x`` of ‖matrix x_t + offset‖²."""
    total = 0.0
    for chunk in x.split(_CHUNK):
        out = chunk.to(matrix.device, matrix.dtype) @ matrix.t()
        if offset is not None:
            out = out + offset
        total += float(out.square().sum(dtype=torch.float64))
    return total / x.shape[0]


def output_energy(weight: torch.Tensor, inputs: torch.Tensor) -> float:
    """Measured E‖Wx‖² per token of the dense layer (bias left out) on ``inputs`` ``[tokens, in]``."""
    return _mean_sq_norm(inputs, weight.float(), None)


def measured_error(weight: torch.Tensor, new_weight: torch.Tensor, bias_delta: torch.Tensor | None,
                   inputs: torch.Tensor, *, relative: bool = False) -> float:
    """Measured E‖e‖² per token on ``inputs`` (``[tokens, in]``, held-out activations entering the
    dense layer): the pruned layer computes Ŵx + b + b_Δ, so e = (Ŵ − W)x + b_Δ.

    ``new_weight`` is the pruned weight Ŵ as applied (pruned entries zero), ``bias_delta`` what
    was added to the bias (None: nothing). ``relative`` divides by the dense E‖Wx‖².
    """
    # the difference first, in float64, so that small errors do not cancel in float32 outputs
    diff = (new_weight.double() - weight.double()).float()
    delta = None if bias_delta is None else bias_delta.float()
    err = _mean_sq_norm(inputs, diff, delta)
    return err / output_energy(weight, inputs) if relative else err


@dataclass
class MetricDiagnosis:
    """Predicted and measured output error of one metric's decision on one layer (E‖e‖² per token)."""

    bias_corrected: bool
    """Whether the metric returned a bias delta; the applied prediction then drops the mean term."""
    predicted_diagonal: float
    """Diagonal form, no bias correction: Σ_ij ΔW_ij² σ_j² + Σ_i (ΔW_i μ)²."""
    predicted_diagonal_corrected: float
    """Diagonal form with the mean moved into the bias: Σ_ij ΔW_ij² σ_j²."""
    predicted_gram: float | None
    """Full-covariance form matching ``bias_corrected`` (ΔW_i Σ ΔW_iᵀ, or with E[xxᵀ] when
    uncorrected); None without a Gram matrix."""
    measured: float
    """Measured on the held-out inputs, with the mask, weight and bias delta as the engine applies them."""

    @property
    def predicted(self) -> float:
        """The prediction for the metric as applied: the Gram form when there is one, else the
        diagonal form, corrected exactly when the metric corrects the bias."""
        if self.predicted_gram is not None:
            return self.predicted_gram
        return self.predicted_diagonal_corrected if self.bias_corrected else self.predicted_diagonal


@dataclass
class LayerDiagnosis:
    """Theory against measurement for one layer and several candidate metrics.

    Absolute errors are E‖e‖² per token; divide by ``output_energy`` (``relative``) to
    compare layers.
    """

    layer: str
    """The layer's module path."""
    block: int
    """Index of its decoder block (depth)."""
    role: str | None
    """``"normed"`` / ``"internal"`` input, None when unknown."""
    regime_median: float
    """Median over input channels of |μ_j|/σ_j (calibration statistics)."""
    regime_p90: float
    """90th percentile over input channels of |μ_j|/σ_j."""
    output_energy: float
    """Measured E‖Wx‖² per token of the dense layer on the held-out inputs: the relative scale."""
    metrics: dict[str, MetricDiagnosis] = field(default_factory=dict)
    """Per candidate metric name."""
    predicted_winner: str | None = None
    """The candidate with the lowest applied prediction (``MetricDiagnosis.predicted``)."""
    measured_winner: str | None = None
    """The candidate with the lowest measured error."""

    def relative(self, metric: str, which: str = "measured") -> float:
        """A metric's error (``which``: a ``MetricDiagnosis`` field or ``"predicted"``) over
        ``output_energy``; NaN when that number is missing or the dense output is zero."""
        value = getattr(self.metrics[metric], which)
        if value is None or self.output_energy == 0:
            return math.nan
        return value / self.output_energy


def applied_weight(weight: torch.Tensor, result: LayerResult) -> torch.Tensor:
    """The weight the engine writes for ``result``: its new weight (or the dense one), masked."""
    return (weight if result.weight is None else result.weight).float().masked_fill(result.mask, 0.0)


def diagnose_metric(weight: torch.Tensor, stats: LayerStats, inputs: torch.Tensor,
                    result: LayerResult) -> MetricDiagnosis:
    """Predicted and measured error of one ``LayerResult`` for ``weight``."""
    corrected = result.bias_delta is not None
    new = result.weight
    diag = {c: predicted_error(weight, result.mask, stats, bias_corrected=c, new_weight=new) for c in (False, True)}
    gram = None
    if stats.gram is not None:
        gram = predicted_error(weight, result.mask, stats, bias_corrected=corrected, form="gram", new_weight=new)
    measured = measured_error(weight, applied_weight(weight, result), result.bias_delta, inputs)
    return MetricDiagnosis(corrected, diag[False], diag[True], gram, measured)


def diagnose_layer(weight: torch.Tensor, stats: LayerStats, inputs: torch.Tensor, metrics: Mapping[str, Metric],
                   pattern: Pattern, sparsity: float) -> LayerDiagnosis:
    """Prune ``weight`` (``[out, in]``) with every candidate in ``metrics`` and compare each
    decision's predicted error (from ``stats``, the calibration statistics, which must hold
    what every metric reads plus ``sum``) with its error measured on ``inputs`` (held-out
    ``[tokens, in]`` activations entering the dense layer)."""
    weight = weight.float()
    needed = frozenset({"sum"}).union(*(m.statistics for m in metrics.values()))
    missing = sorted(s for s in needed if getattr(stats, s) is None)
    if missing:
        raise ConfigError(f"diagnosing {stats.layer.name} needs the statistics {missing}")
    regime = input_regime(stats)
    out = LayerDiagnosis(stats.layer.name, stats.layer.block, stats.layer.role, regime["median"], regime["p90"],
                         output_energy(weight, inputs))
    for name, metric in metrics.items():
        out.metrics[name] = diagnose_metric(weight, stats, inputs, metric.prune_layer(weight, stats, pattern, sparsity))
    if out.metrics:
        out.predicted_winner = min(out.metrics, key=lambda n: out.metrics[n].predicted)
        out.measured_winner = min(out.metrics, key=lambda n: out.metrics[n].measured)
    return out


def measured_from_stats(weight: torch.Tensor, new_weight: torch.Tensor, bias_delta: torch.Tensor | None,
                        heldout: LayerStats, *, relative: bool = False) -> float:
    """``measured_error`` over held-out inputs summarised by their statistics (``sum`` and
    ``gram`` of the tokens entering the dense layer), with no activations kept: the mean of
    ‖(Ŵ − W)x + b_Δ‖² over tokens is (Ŵ − W) S (Ŵ − W)ᵀ summed over rows, plus 2 b_Δ·(Ŵ − W)μ
    plus ‖b_Δ‖², exactly (S = Σ xxᵀ / n, μ = Σ x / n of those same tokens)."""
    if heldout.gram is None or heldout.sum is None:
        raise ConfigError(f"measuring {heldout.layer.name} from statistics needs 'sum' and 'gram' of the held-out "
                          "inputs")
    second = heldout.gram.double() / heldout.count
    diff = new_weight.double() - weight.double()
    err = float(((diff @ second) * diff).sum())
    if bias_delta is not None:
        b = bias_delta.double()
        err += 2 * float((b * (diff @ (heldout.sum.double() / heldout.count))).sum()) + float(b.square().sum())
    err = max(err, 0.0)
    if relative:
        w = weight.double()
        return err / float(((w @ second) * w).sum())
    return err


def diagnose_from_stats(weight: torch.Tensor, calibration: LayerStats, heldout: LayerStats,
                        candidates: Mapping[str, LayerResult]) -> LayerDiagnosis:
    """``diagnose_layer`` for decisions already made (``candidates``: name -> ``LayerResult``,
    e.g. the mask a cell applied and the masks other metrics would have chosen), predicted
    from the ``calibration`` statistics (``sum``, ``sumsq``, ``gram``) and measured on the
    held-out inputs through their statistics (``measured_from_stats``)."""
    weight = weight.float()
    regime = input_regime(calibration)
    second = heldout.gram.double() / heldout.count
    energy = float(((weight.double() @ second) * weight.double()).sum())
    out = LayerDiagnosis(calibration.layer.name, calibration.layer.block, calibration.layer.role, regime["median"],
                         regime["p90"], energy)
    for name, result in candidates.items():
        corrected = result.bias_delta is not None
        diag = {c: predicted_error(weight, result.mask, calibration, bias_corrected=c, new_weight=result.weight)
                for c in (False, True)}
        gram = None
        if calibration.gram is not None:
            gram = predicted_error(weight, result.mask, calibration, bias_corrected=corrected, form="gram",
                                   new_weight=result.weight)
        measured = measured_from_stats(weight, applied_weight(weight, result), result.bias_delta, heldout)
        out.metrics[name] = MetricDiagnosis(corrected, diag[False], diag[True], gram, measured)
    if out.metrics:
        out.predicted_winner = min(out.metrics, key=lambda n: out.metrics[n].predicted)
        out.measured_winner = min(out.metrics, key=lambda n: out.metrics[n].measured)
    return out


def average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks of ``values``, ties sharing the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks); NaN for fewer than two
    pairs or when either side is constant."""
    if len(a) != len(b):
        raise ValueError(f"spearman needs equal lengths, got {len(a)} and {len(b)}")
    if len(a) < 2:
        return math.nan
    ra, rb = average_ranks(a), average_ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return cov / math.sqrt(va * vb) if va and vb else math.nan


def _share(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def summarise(diagnoses: Sequence[LayerDiagnosis]) -> dict:
    """Across layers: how well theory ranks and picks.

    Returns ``{"layers", "spearman": {metric: ρ}, "winner_agreement", "stade_vs_wanda"}``:
    ρ between predicted and measured *relative* error across the layers that have the
    metric (relative, so that layer size alone does not make the ranks agree);
    ``winner_agreement`` the share of layers whose predicted winner is the measured one;
    ``stade_vs_wanda`` (None unless both ``stade`` and ``wanda`` were candidates) the share
    of layers where STADE's measured error is below Wanda's, among layers whose
    ``regime_median`` is above the median of all layers' (``high_mean``) and among the rest
    (``low_mean``), with the threshold and layer counts.
    """
    names = list(dict.fromkeys(n for d in diagnoses for n in d.metrics))
    rho = {}
    for name in names:
        have = [d for d in diagnoses if name in d.metrics]
        rho[name] = spearman([d.relative(name, "predicted") for d in have], [d.relative(name) for d in have])
    decided = [d for d in diagnoses if d.measured_winner is not None]
    out = {"layers": len(diagnoses), "spearman": rho,
           "winner_agreement": _share([d.predicted_winner == d.measured_winner for d in decided]),
           "stade_vs_wanda": None}
    both = [d for d in diagnoses if {"stade", "wanda"} <= d.metrics.keys()]
    if both:
        threshold = _quantile(torch.tensor([d.regime_median for d in both], dtype=torch.float64), 0.5)
        wins = {"high_mean": [], "low_mean": []}
        for d in both:
            wins["high_mean" if d.regime_median > threshold else "low_mean"].append(
                d.metrics["stade"].measured < d.metrics["wanda"].measured)
        out["stade_vs_wanda"] = {"threshold": threshold,
                                 **{k: _share(v) for k, v in wins.items()},
                                 **{f"{k}_layers": len(v) for k, v in wins.items()}}
    return out


__all__ = ["LayerDiagnosis", "MetricDiagnosis", "applied_weight", "average_ranks", "diagnose_from_stats",
           "diagnose_layer", "diagnose_metric", "input_regime", "measured_error", "measured_from_stats",
           "output_energy", "predicted_error", "spearman", "stats_from_inputs", "summarise", "weight_change"]
