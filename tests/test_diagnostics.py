"""Predicted against measured output error (stadebench.core.diagnostics) on synthetic layers
whose answer is known: centred inputs, inputs with large means, correlated channels."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from stadebench.base import LayerInfo
from stadebench.core.diagnostics import (
    LayerDiagnosis,
    MetricDiagnosis,
    average_ranks,
    diagnose_layer,
    input_regime,
    measured_error,
    predicted_error,
    spearman,
    stats_from_inputs,
    summarise,
)
from stadebench.core.models import add_bias
from stadebench.errors import ConfigError
from stadebench.plugins import resolve_metric, resolve_pattern

pytestmark = pytest.mark.usefixtures("single_thread")

OUT, IN, TOKENS, SPARSITY = 64, 128, 4096, 0.5
INFO = LayerInfo("model.layers.0.mlp.down_proj", 0, "mlp.down_proj", "internal")
# Sampling tolerance. Per token, ‖e‖² is a sum of squared Gaussians whose relative variance
# is 2·tr(C²)/tr(C)² ≤ 2 (C the error covariance), so a mean over T tokens has relative sd
# ≤ √(2/T); the calibration estimate of the statistics the prediction reads has the same
# bound. Three worst-case standard deviations of their difference: 3·√2·√(2/T) = 9.4% at
# T = 4096. (The rows here are nearly independent, so the real spread is ~8x smaller.)
SAMPLING_RTOL = 3 * math.sqrt(2) * math.sqrt(2 / TOKENS)


def candidates(*names: str) -> dict:
    return {name: resolve_metric(name) for name in names}


def layer(gen: torch.Generator, sample, weight: torch.Tensor, *names: str) -> LayerDiagnosis:
    """Diagnose ``weight`` with statistics of one draw of ``sample`` and held-out inputs of another."""
    stats = stats_from_inputs(sample(gen), INFO)
    return diagnose_layer(weight, stats, sample(gen), candidates(*names), resolve_pattern("unstructured"), SPARSITY)


def deviation(predicted: float, measured: float) -> float:
    return abs(predicted / measured - 1)


def heterogeneous_sd(gen: torch.Generator) -> torch.Tensor:
    return torch.exp(torch.rand(IN, generator=gen) * 3 - 1.5)  # σ_j over a 20x range


def test_centred_inputs_wanda_is_best_and_the_diagonal_prediction_holds():
    gen = torch.Generator().manual_seed(0)
    sd = heterogeneous_sd(gen)
    weight = torch.randn(OUT, IN, generator=gen)
    d = layer(gen, lambda g: torch.randn(TOKENS, IN, generator=g) * sd, weight, "magnitude", "wanda", "stade")
    m = d.metrics
    assert d.regime_median < 0.05
    assert m["wanda"].measured < m["magnitude"].measured / 3
    # σ_j = ‖x_j‖/√n when μ = 0: STADE ranks as Wanda does, up to sampling ties
    stats = stats_from_inputs(torch.randn(TOKENS, IN, generator=gen) * sd, INFO)
    pattern = resolve_pattern("unstructured")
    wanda = resolve_metric("wanda").prune_layer(weight, stats, pattern, SPARSITY).mask
    stade = resolve_metric("stade").prune_layer(weight, stats, pattern, SPARSITY).mask
    assert (wanda != stade).float().mean() <= 0.005
    for name in ("magnitude", "wanda"):
        assert deviation(m[name].predicted_diagonal, m[name].measured) < SAMPLING_RTOL
    assert deviation(m["stade"].predicted_diagonal_corrected, m["stade"].measured) < SAMPLING_RTOL
    assert d.measured_winner in {"wanda", "stade"} and d.predicted_winner in {"wanda", "stade"}


def test_large_means_stade_with_correction_beats_wanda_and_the_prediction_says_so():
    gen = torch.Generator().manual_seed(1)
    sd = heterogeneous_sd(gen)
    # μ_j = ±(2..8)·σ_j: every channel far from centred, by a varied amount
    offset = (torch.rand(IN, generator=gen) * 6 + 2) * torch.randn(IN, generator=gen).sign()
    weight = torch.randn(OUT, IN, generator=gen)
    d = layer(gen, lambda g: (torch.randn(TOKENS, IN, generator=g) + offset) * sd, weight,
              "magnitude", "wanda", "stade", "sparsegpt")
    m = d.metrics
    assert d.regime_median > 3
    assert m["stade"].bias_corrected and not m["wanda"].bias_corrected
    assert m["stade"].measured < m["wanda"].measured / 5
    assert d.predicted_winner == d.measured_winner == "stade"
    # the mean term is what Wanda pays: its uncorrected prediction holds, its corrected one is far below
    assert deviation(m["wanda"].predicted_diagonal, m["wanda"].measured) < SAMPLING_RTOL
    assert m["wanda"].predicted_diagonal_corrected < m["wanda"].measured / 5
    assert deviation(m["stade"].predicted, m["stade"].measured) < SAMPLING_RTOL


def test_correlated_channels_break_the_diagonal_form_not_the_gram_form():
    gen = torch.Generator().manual_seed(2)
    # x = A z with a dense A: a random rotation of a spectrum decaying over three decades,
    # and weight rows in the span of the 16 leading directions. Channels are then strongly
    # correlated in the directions the weights read, which the diagonal form cannot see.
    rotation, _ = torch.linalg.qr(torch.randn(IN, IN, generator=gen))
    mixing = rotation * torch.logspace(1, -2, IN).sqrt()
    weight = 3 * torch.randn(OUT, 16, generator=gen) @ rotation[:, :16].t()
    d = layer(gen, lambda g: torch.randn(TOKENS, IN, generator=g) @ mixing.t(), weight,
              "magnitude", "wanda", "stade", "sparsegpt")
    for name in ("magnitude", "wanda", "stade"):
        m = d.metrics[name]
        diagonal = m.predicted_diagonal_corrected if m.bias_corrected else m.predicted_diagonal
        assert deviation(diagonal, m.measured) > 0.15, name  # seen: 0.25 below the measurement
        assert deviation(m.predicted_gram, m.measured) < 0.03, name  # seen: 0.003-0.005
    # SparseGPT's reconstruction uses the correlations: diagonally it looks ~5x worse than it is
    sparsegpt = d.metrics["sparsegpt"]
    assert sparsegpt.predicted_diagonal > 3 * sparsegpt.measured
    # fitted to the calibration Gram, its in-sample prediction is a little optimistic (seen: 0.005)
    assert deviation(sparsegpt.predicted_gram, sparsegpt.measured) < 0.03
    assert d.predicted_winner == d.measured_winner == "sparsegpt"


def test_measured_error_follows_the_engines_bias_convention():
    gen = torch.Generator().manual_seed(3)
    offset = torch.randn(IN, generator=gen) * 4
    x = torch.randn(TOKENS, IN, generator=gen) + offset
    dense = nn.Linear(IN, OUT)
    with torch.no_grad():
        dense.weight.normal_(generator=gen)
        dense.bias.normal_(generator=gen)
    weight = dense.weight.detach().clone()
    stats = stats_from_inputs(x[:2048], INFO)
    result = resolve_metric("stade").prune_layer(weight, stats, resolve_pattern("unstructured"), SPARSITY)
    pruned = nn.Linear(IN, OUT)
    pruned.load_state_dict(dense.state_dict())
    with torch.no_grad():
        add_bias(pruned, result.bias_delta)  # as the engine applies a LayerResult
        pruned.weight.masked_fill_(result.mask, 0)
        direct = (pruned(x) - dense(x)).double().square().sum(1).mean().item()
        energy = (x @ weight.t()).double().square().sum(1).mean().item()
    new_weight = pruned.weight.detach()
    got = measured_error(weight, new_weight, result.bias_delta, x)
    assert got == pytest.approx(direct, rel=1e-4)
    assert measured_error(weight, new_weight, result.bias_delta, x, relative=True) == pytest.approx(
        direct / energy, rel=1e-4)
    # the convention matters: the opposite sign, or no correction, is far worse
    assert measured_error(weight, new_weight, -result.bias_delta, x) > 10 * got
    assert measured_error(weight, new_weight, None, x) > 5 * got


def test_predicted_error_forms_and_missing_statistics():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(512, 8, generator=gen) + 1
    weight = torch.randn(4, 8, generator=gen)
    mask = torch.rand(4, 8, generator=gen) < 0.5
    stats = stats_from_inputs(x, INFO)
    delta = (weight * mask).double()
    second = x.double().t() @ x.double() / len(x)
    exact = float(((delta @ second) * delta).sum())
    assert predicted_error(weight, mask, stats, bias_corrected=False, form="gram") == pytest.approx(exact, rel=1e-5)
    centred = x.double() - x.double().mean(0)
    cov = centred.t() @ centred / len(x)
    assert predicted_error(weight, mask, stats, bias_corrected=True, form="gram") == pytest.approx(
        float(((delta @ cov) * delta).sum()), rel=1e-5)
    assert predicted_error(weight, mask, stats, bias_corrected=True) == pytest.approx(
        float((delta.square() @ cov.diagonal()).sum()), rel=1e-9)
    # a new weight equal to the dense one changes nothing; the relative form divides by E‖Wx‖²
    assert predicted_error(weight, mask, stats, bias_corrected=False, form="gram", new_weight=weight) == \
        predicted_error(weight, mask, stats, bias_corrected=False, form="gram")
    dense = float(((weight.double() @ second) * weight.double()).sum())
    assert predicted_error(weight, mask, stats, bias_corrected=False, form="gram", relative=True) == \
        pytest.approx(exact / dense, rel=1e-5)
    with pytest.raises(ConfigError, match="gram"):
        predicted_error(weight, mask, stats_from_inputs(x, INFO, {"sum"}), bias_corrected=True, form="gram")
    with pytest.raises(ConfigError, match="sum"):
        predicted_error(weight, mask, stats_from_inputs(x, INFO, {"gram"}), bias_corrected=False)


def test_input_regime_guards_constant_and_dead_channels():
    x = torch.randn(1000, 4, generator=torch.Generator().manual_seed(5))
    x[:, 0] = 3.0  # constant: all mean
    x[:, 1] = 0.0  # dead: left out
    x[:, 2] += 2 * x[:, 2].std()
    regime = input_regime(stats_from_inputs(x, INFO, {"sum"}))
    assert math.isfinite(regime["median"]) and regime["p90"] == math.inf


def test_spearman_with_ties_against_a_hand_computation():
    assert average_ranks([3, 1, 3, 3]) == [3.0, 1.0, 3.0, 3.0]
    assert average_ranks([1, 2, 2, 3, 5]) == [1.0, 2.5, 2.5, 4.0, 5.0]
    # ranks a: 1 2.5 2.5 4 5; b: 2 1 3.5 3.5 5; both centred on 3:
    # Σ da·db = 2 + 1 − 0.25 + 0.5 + 4 = 7.25, Σ da² = Σ db² = 9.5, ρ = 7.25/9.5 = 29/38
    assert spearman([1, 2, 2, 3, 5], [2, 1, 4, 4, 6]) == pytest.approx(29 / 38)
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3])) and math.isnan(spearman([1], [2]))


def fake(name: str, regime: float, energy: float, errors: dict[str, tuple[float, float]]) -> LayerDiagnosis:
    """A diagnosis with given (predicted, measured) errors per metric."""
    d = LayerDiagnosis(name, 0, None, regime, regime, energy,
                       {k: MetricDiagnosis(False, p, p, None, m) for k, (p, m) in errors.items()})
    d.predicted_winner = min(errors, key=lambda k: errors[k][0])
    d.measured_winner = min(errors, key=lambda k: errors[k][1])
    return d


def test_summarise_ranks_winners_and_regimes():
    layers = [
        fake("a", 0.1, 1.0, {"wanda": (1, 1), "stade": (2, 1.5)}),
        fake("b", 0.2, 2.0, {"wanda": (4, 3), "stade": (5, 4)}),
        fake("c", 3.0, 1.0, {"wanda": (9, 8), "stade": (2, 2)}),
        fake("d", 5.0, 4.0, {"wanda": (6, 10), "stade": (7, 9)}),
    ]
    s = summarise(layers)
    assert s["layers"] == 4
    # on relative errors (over output_energy): wanda predicted 1 2 9 1.5, measured 1 1.5 8 2.5,
    # ranks 1 3 4 2 against 1 2 4 3: Σ d·d = 2.25 − 0.25 + 2.25 − 0.25 = 4, Σ d² = 5, ρ = 0.8
    assert s["spearman"]["wanda"] == pytest.approx(0.8)
    assert s["spearman"]["stade"] == pytest.approx(spearman([2, 2.5, 2, 1.75], [1.5, 2, 2, 2.25]))
    assert s["winner_agreement"] == pytest.approx(3 / 4)  # d: predicted wanda, measured stade
    assert s["stade_vs_wanda"] == {"threshold": pytest.approx(1.6), "high_mean": 1.0, "low_mean": 0.0,
                                   "high_mean_layers": 2, "low_mean_layers": 2}
    assert summarise([fake("a", 0.1, 1.0, {"wanda": (1, 1)})])["stade_vs_wanda"] is None


def test_measured_from_statistics_equals_measured_on_the_tokens():
    """The held-out Gram matrix gives the mean squared output error exactly: no activations kept."""
    from stadebench.core.diagnostics import measured_error, measured_from_stats, stats_from_inputs
    from stadebench.base import LayerInfo

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2048, 48, generator=g, dtype=torch.float64) * 2 + torch.randn(48, generator=g, dtype=torch.float64)
    w = torch.randn(16, 48, generator=g)
    new = w.masked_fill(torch.rand(w.shape, generator=g) < 0.5, 0.0) * 1.01
    bias = torch.randn(16, generator=g)
    stats = stats_from_inputs(x, LayerInfo("l", 0, "l"))
    for b in (None, bias):
        direct = measured_error(w, new, b, x.float())
        assert measured_from_stats(w, new, b, stats) == pytest.approx(direct, rel=1e-5)


# --- the evaluator, through a suite ----------------------------------------------------


def test_the_diagnostics_evaluator_in_a_suite(tmp_path_factory):
    """Diagnostics first, perplexity after: perplexity equals a run without diagnostics (the
    pruned weights are back), and the per-layer records are typed Arrow data on one row."""
    import pyarrow as pa
    from tinymodel import shared_assets, suite_dict, write_suite

    from stadebench.results import store as lb
    from stadebench.results.row import DIAGNOSTIC_TYPE
    from stadebench.runner.run import run_suite
    from stadebench.suite import load_suite

    assets = shared_assets(tmp_path_factory)
    root = tmp_path_factory.mktemp("diagnostics")
    base = suite_dict(assets, metrics=("magnitude", "stade"), ignore=[r"layers\.0\.self_attn\.o_proj"])
    text = base["evaluations"][0]["options"]["dataset"]
    with_diagnostics = {**base, "leaderboard": str(root / "a"), "evaluations": [
        {"name": "diagnostics", "options": {"dataset": text, "seqlen": 16, "max_windows": 4,
                                            "metrics": ["magnitude", "wanda", "stade", "sparsegpt"]}},
        *base["evaluations"]]}
    run_suite(load_suite(write_suite(root / "a.yaml", with_diagnostics)))
    run_suite(load_suite(write_suite(root / "b.yaml", {**base, "leaderboard": str(root / "b")})))
    a, b = (lb.current(lb.read(root / x)).to_pylist() for x in "ab")
    ppl = {x: {(r["metric"], r["pattern"]): r["value"] for r in rows if r["score"] == "ppl"}
           for x, rows in (("a", a), ("b", b))}
    assert ppl["a"] == ppl["b"] and len(ppl["a"]) == 3

    diag = {(r["metric"], r["score"]): r for r in a if r["task"] == "diagnostics"}
    assert diag[("dense", "layers")]["value"] == 0
    layers = diag[("stade", "layers")]
    assert layers["value"] == 13  # 14 prunable layers, one ignored
    assert lb.SCHEMA.field("layer_diagnostics").type == pa.list_(DIAGNOSTIC_TYPE)
    records = layers["layer_diagnostics"]
    assert {r["candidate"] for r in records} == {"applied", "magnitude", "wanda", "stade", "sparsegpt"}
    assert len(records) == 13 * 5 and all(r["measured"] >= 0 and r["predicted"] >= 0 for r in records)
    # STADE's applied mask on the first block (one-shot inputs: dense) is the one stade would choose
    first = {r["candidate"]: r for r in records if r["name"] == "model.layers.0.self_attn.q_proj"}
    assert first["applied"]["measured"] == pytest.approx(first["stade"]["measured"], rel=1e-6)
    assert first["applied"]["bias_corrected"] and not first["magnitude"]["bias_corrected"]
    for name in ("spearman_applied", "relative_error_stade", "winner_agreement"):
        assert ("stade", name) in diag, name
    assert all(r["layer_diagnostics"] is None for r in a if r["score"] != "layers")


def test_stadebench_diagnose_prints_the_theory_against_measurement(tmp_path_factory, tmp_path):
    from test_cli import invoke
    from tinymodel import shared_assets

    from stadebench.cli import ExitCode

    assets = shared_assets(tmp_path_factory)
    r = invoke("diagnose", assets["model"], "--metrics", "magnitude,stade", "--calibration",
               f"{assets['corpus']}:4x16", "--windows", "4x16", "--device", "cpu", "--leaderboard", tmp_path / "lb")
    assert r.exit_code == ExitCode.OK, r.output
    text = " ".join(r.stdout.split())
    assert "pruned cells" in text and "every metric's mask on the dense model's layers" in text
    assert "the predicted lowest-error mask is the measured one on" in text
    r = invoke("diagnose", assets["model"], "--metrics", "magnitude,stadee", "--leaderboard", tmp_path / "lb")
    assert r.exit_code == ExitCode.USAGE and "unknown metric 'stadee'" in r.output
