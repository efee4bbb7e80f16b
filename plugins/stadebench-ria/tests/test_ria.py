"""RIA: the stadebench conformance kit, and the formula checked entry by entry."""

import importlib.metadata

import pytest
import torch

import stadebench
import stadebench_ria
from stadebench.testing import MetricConformance, layer_inputs


class TestRIA(MetricConformance):
    metric = "ria"
    plugin = stadebench_ria  # registered for these tests when the package is not installed


class TestRIAWithoutActivations(MetricConformance):
    metric = "ria"
    options = {"a": 0.0}
    plugin = stadebench_ria


def reference(w, x_norm, a):
    """The paper's formula, one weight at a time."""
    out, inp = w.shape
    s = torch.empty(out, inp, dtype=torch.float64)
    for i in range(out):
        for j in range(inp):
            col = sum(abs(w[k, j]) for k in range(out))
            row = sum(abs(w[i, k]) for k in range(inp))
            s[i, j] = (abs(w[i, j]) / col + abs(w[i, j]) / row) * x_norm[j] ** a
    return s


@pytest.mark.parametrize("a", [0.5, 0.0, 1.0])
def test_formula(a):
    weight, stats = layer_inputs((6, 10), statistics={"sumsq"}, seed=3)
    got = stadebench_ria.RIA({"a": a}).score(weight, stats)
    want = reference(weight.double(), stats.sumsq.sqrt(), a)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)


def test_zero_rows_and_columns_score_zero():
    weight, stats = layer_inputs((6, 10), statistics={"sumsq"}, degenerate=True)
    scores = stadebench_ria.RIA().score(weight, stats)
    assert torch.isfinite(scores).all()
    assert (scores[1] == 0).all() and (scores[:, 0] == 0).all()


def test_negative_exponent_is_rejected():
    with pytest.raises(stadebench.ConfigError, match="greater than or equal to 0"):
        stadebench_ria.RIA({"a": -1})


def test_the_installed_distribution_registers_ria(monkeypatch):
    """Installed from its folder (nox -s plugin), the entry point registers `ria`."""
    from stadebench.plugins import get_plugins, reset_plugins

    monkeypatch.delenv("STADEBENCH_LOAD_PLUGINS", raising=False)
    reset_plugins()
    try:
        reg = get_plugins().metrics.get("ria")
        assert get_plugins().provenance(reg.plugin) == ("stadebench-ria", importlib.metadata.version("stadebench-ria"))
    finally:
        reset_plugins()
