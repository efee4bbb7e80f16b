"""wanda-alpha passes stadebench's conformance kit and means what it says."""

import torch

import stadebench_wanda_alpha
from stadebench.testing import MetricConformance, layer_inputs


class TestWandaAlpha(MetricConformance):
    metric = "wanda-alpha"
    plugin = stadebench_wanda_alpha  # registered for the tests even before `pip install`


class TestWandaAlphaSquared(MetricConformance):
    metric = "wanda-alpha"
    options = {"alpha": 2.0}
    plugin = stadebench_wanda_alpha


def test_alpha_one_is_wanda_and_zero_is_magnitude():
    weight, stats = layer_inputs((8, 16), statistics={"sumsq"})
    wanda = stadebench_wanda_alpha.WandaAlpha({"alpha": 1})
    magnitude = stadebench_wanda_alpha.WandaAlpha({"alpha": 0})
    torch.testing.assert_close(wanda.score(weight, stats), weight.abs() * stats.norm)
    torch.testing.assert_close(magnitude.score(weight, stats), weight.abs())
