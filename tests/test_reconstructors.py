"""Weight reconstructors for a fixed mask (stadebench.core.reconstructors), on random layers."""

from __future__ import annotations

import pytest
import torch

from stadebench.base import LayerInfo, LayerStats
from stadebench.core.metrics.sparsegpt import SparseGPT
from stadebench.core.metrics.stade import Stade
from stadebench.core.reconstructors import admm_update, mean_bias, obs_update
from stadebench.errors import ConfigError
from stadebench.plugins import get_plugins

ROWS, COLS, TOKENS = 24, 160, 400

pytestmark = pytest.mark.usefixtures("single_thread")


def _problem(seed: int = 0, rows: int = ROWS, cols: int = COLS, tokens: int = TOKENS):
    """(weight, inputs X [tokens, in]) with correlated, non-zero-mean inputs of unequal scales."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(cols) + 0.4 * torch.randn(cols, cols, generator=g) / cols ** 0.5
    x = (torch.randn(tokens, cols, generator=g) @ mix + 0.5) * torch.rand(cols, generator=g).add(0.2)
    return torch.randn(rows, cols, generator=g), x


def _pattern(spec: str):
    return get_plugins().patterns.get(spec).cls.from_spec(spec)


def _mask(weight: torch.Tensor, spec: str) -> torch.Tensor:
    return _pattern(spec).select(weight.abs(), 0.5)


def _error(weight: torch.Tensor, new: torch.Tensor, gram: torch.Tensor) -> float:
    """‖(W − Ŵ)X‖² = trace((W − Ŵ) G (W − Ŵ)ᵀ), in float64."""
    d = (weight - new).double()
    return torch.trace(d @ gram.double() @ d.t()).item()


def _reconstruct(kind: str, weight, mask, gram, count, **options):
    if kind == "obs":
        return obs_update(weight, mask, gram, count, **options)
    return admm_update(weight, mask, gram, **options)


@pytest.mark.parametrize("kind", ["obs", "admm"])
@pytest.mark.parametrize("spec", ["unstructured", "2:4"])
def test_pruned_stay_zero_kept_change_and_the_output_error_drops(kind, spec):
    weight, x = _problem()
    gram = x.t() @ x
    mask = _mask(weight, spec)
    new = _reconstruct(kind, weight, mask, gram, TOKENS)
    assert new.dtype == torch.float32 and new.shape == weight.shape
    assert bool((new[mask] == 0).all())
    assert bool((new[~mask] != weight[~mask]).float().mean() > 0.9)
    plain = weight.masked_fill(mask, 0.0)
    assert _error(weight, new, gram) < 0.8 * _error(weight, plain, gram)


@pytest.mark.parametrize("kind", ["obs", "admm"])
def test_inputs_are_not_modified(kind):
    weight, x = _problem(1)
    gram = x.t() @ x
    gram[:, 3] = gram[3, :] = 0.0  # a dead input: OBS zeroes its weights in its own copy
    mask = _mask(weight, "unstructured")
    saved = weight.clone(), mask.clone(), gram.clone()
    _reconstruct(kind, weight, mask, gram, TOKENS)
    assert all(torch.equal(a, b) for a, b in zip(saved, (weight, mask, gram)))


def test_obs_with_an_empty_mask_returns_the_weight():
    weight, x = _problem(2)
    empty = torch.zeros_like(weight, dtype=torch.bool)
    for order in ("fused", "released"):
        assert torch.equal(obs_update(weight, empty, x.t() @ x, TOKENS, order=order), weight)


def test_admm_with_an_empty_mask_keeps_the_weight():
    weight, x = _problem(2)
    new = admm_update(weight, torch.zeros_like(weight, dtype=torch.bool), x.t() @ x)
    torch.testing.assert_close(new, weight, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spec", ["unstructured", "unstructured-layer", "2:4"])
@pytest.mark.parametrize("order", ["fused", "released"])
def test_obs_with_the_mask_sparsegpt_chose_gives_its_weights_bit_for_bit(spec, order):
    weight, x = _problem(3, cols=300)  # 300: a short last block
    gram = x.t() @ x
    gram[:, 7] = gram[7, :] = 0.0
    stats = LayerStats(LayerInfo("layer", 0, "layer"), TOKENS, gram=gram)
    result = SparseGPT({"order": order, "blocksize": 128}).prune_layer(weight, stats, _pattern(spec), 0.5)
    new = obs_update(weight, result.mask, gram, TOKENS, order=order)
    assert torch.equal(new, result.weight)
    assert bool((new[:, 7] == 0).all())  # the dead input's weights, as SparseGPT


def test_obs_raises_the_damping_when_the_hessian_does_not_factor_and_reports_it():
    # as in tests/test_metrics_reference.py: percdamp 0.01 leaves h[0,0] < 0, 0.1 does not
    gram = torch.eye(16) * 100.0
    gram[0, 0] = -5.0
    weight = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    details: dict = {}
    new = obs_update(weight, _mask(weight, "unstructured"), gram, 200, details=details)
    assert details == {"percdamp": pytest.approx(0.1)} and torch.isfinite(new).all()
    from stadebench.errors import NumericalError
    with pytest.raises(NumericalError, match="obs: the Hessian is not positive definite"):
        obs_update(weight, _mask(weight, "unstructured"), gram, 200, damping_retries=0)


def _admm_optimum(weight, mask, gram, percdamp=0.1, eps=1e-8):
    """The exact minimiser of ADMM's objective, row by row in float64: in the release's scaled
    variables (D = diag(sqrt(diag gram)) + eps, G = D⁻¹ gram D⁻¹ + λI), the kept entries
    v_K = w_K + G_KK⁻¹ G_KP w_P."""
    g = gram.double()
    d = torch.diag(g).sqrt() + eps
    g = g / torch.outer(d, d)
    g = g + percdamp * torch.diag(g).mean() * torch.eye(len(d), dtype=g.dtype)
    w = weight.double() * d
    out = torch.zeros_like(w)
    for i in range(w.shape[0]):
        keep, cut = ~mask[i], mask[i]
        out[i, keep] = w[i, keep] + torch.linalg.solve(g[keep][:, keep], g[keep][:, cut] @ w[i, cut])
    return (out / d).float()


@pytest.mark.parametrize(("rho", "rho_growth", "iterations"), [(1.0, 1.0, 300), (0.1, 1.05, 100)])
def test_admm_converges_to_the_optimum_of_its_objective(rho, rho_growth, iterations):
    # a penalty that grows too fast (1.3 from 1) freezes the iterates before they converge
    weight, x = _problem(4, rows=8, cols=64)
    gram = x.t() @ x
    mask = _mask(weight, "unstructured")
    best = _admm_optimum(weight, mask, gram)
    many = admm_update(weight, mask, gram, iterations=iterations, rho=rho, rho_growth=rho_growth)
    torch.testing.assert_close(many, best, rtol=1e-3, atol=1e-4)
    few = admm_update(weight, mask, gram, iterations=2)
    assert (few - best).abs().max() > 10 * (many - best).abs().max()


def test_admm_depends_on_the_gram_only_up_to_scale():
    weight, x = _problem(5)
    gram = x.t() @ x
    mask = _mask(weight, "2:4")
    torch.testing.assert_close(admm_update(weight, mask, gram / TOKENS), admm_update(weight, mask, gram),
                               rtol=1e-4, atol=1e-5)


def test_admm_with_no_iterations_is_the_masked_weight():
    weight, x = _problem(6)
    mask = _mask(weight, "unstructured")
    torch.testing.assert_close(admm_update(weight, mask, x.t() @ x, iterations=0), weight.masked_fill(mask, 0.0))


@pytest.mark.parametrize("kind", ["obs", "admm"])
def test_a_mask_of_another_shape_is_refused(kind):
    weight, x = _problem()
    with pytest.raises(ConfigError, match="mask of shape"):
        _reconstruct(kind, weight, _mask(weight, "unstructured")[:, :-4], x.t() @ x, TOKENS)


def test_mean_bias_is_what_the_stade_metric_adds():
    weight, x = _problem(7)
    mask = _mask(weight, "unstructured")
    x64 = x.double()
    stats = LayerStats(LayerInfo("layer", 0, "layer"), TOKENS, sum=x64.sum(0), sumsq=x64.square().sum(0))
    expected = Stade().bias_delta(weight, mask, stats)
    assert torch.equal(mean_bias(weight, mask, stats.mean), expected)
    assert torch.equal(mean_bias(weight, mask, stats.mean, updated=weight.masked_fill(mask, 0.0)), expected)
    # the dense layer's mean output: y = W μ = Ŵ μ + bias delta
    torch.testing.assert_close((weight.masked_fill(mask, 0.0) @ stats.mean) + expected, weight @ stats.mean)


def test_mean_bias_after_a_reconstruction_keeps_the_mean_output():
    weight, x = _problem(8)
    mask = _mask(weight, "2:4")
    new = obs_update(weight, mask, x.t() @ x, TOKENS)
    mean = x.mean(0)
    delta = mean_bias(weight, mask, mean, updated=new)
    torch.testing.assert_close(new @ mean + delta, weight @ mean, rtol=1e-4, atol=1e-4)
