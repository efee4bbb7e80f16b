"""magnitude-share: the stadebench conformance kit, and the allocation's behaviour on outliers."""

import pytest
import torch

import stadebench
import stadebench_alpha
from stadebench.testing import AllocatorConformance, make_tiny_model


class TestMagnitudeShare(AllocatorConformance):
    allocator = "magnitude-share"
    plugin = stadebench_alpha  # registered for these tests when the package is not installed


class TestMagnitudeShareWide(AllocatorConformance):
    allocator = "magnitude-share"
    options = {"M": 2.0, "lambda": 0.2}
    plugin = stadebench_alpha


@pytest.fixture
def registered(isolated_plugins):
    """The built-ins plus this module only, whether or not the distribution is installed."""
    isolated_plugins.register(stadebench_alpha, name="stadebench_alpha")
    return isolated_plugins


def block_linears(model, block):
    return [m for m in model.model.layers[block].modules() if isinstance(m, torch.nn.Linear)]


def add_outliers(model, block, every=20, factor=10.0):
    """Set every `every`-th weight of each linear in `block` to ±factor × the layer's mean |W|."""
    with torch.no_grad():
        for linear in block_linears(model, block):
            flat = linear.weight.view(-1)
            scale = factor * flat.abs().mean()
            picked = flat[::every]
            flat[::every] = torch.where(picked >= 0, scale, -scale)


def test_outlier_block_is_pruned_less_and_target_is_met(registered):
    torch.manual_seed(0)
    model = make_tiny_model(layers=4)
    add_outliers(model, block=2)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}

    report = stadebench.prune(model, None, metric="magnitude", pattern="unstructured-layer", sparsity=0.5,
                              allocation="magnitude-share")

    by_block = {}
    for layer in report.layers:
        by_block.setdefault(layer.block, set()).add(layer.allocated)
    assert all(len(values) == 1 for values in by_block.values()), by_block  # one sparsity per block
    allocated = {b: values.pop() for b, values in by_block.items()}
    assert sorted(allocated) == [0, 1, 2, 3]
    assert all(allocated[2] < allocated[b] for b in (0, 1, 3)), allocated
    assert max(allocated.values()) - min(allocated.values()) == pytest.approx(0.1)  # 2 · lambda

    pruned = total = 0
    for layer in report.layers:
        weight = linears[layer.name].weight
        zeros = int((weight == 0).sum())
        assert abs(zeros - weight.numel() * layer.allocated) < 1, layer.name
        pruned += zeros
        total += weight.numel()
    assert abs(pruned - 0.5 * total) <= len(report.layers)
    assert report.sparsity == pytest.approx(0.5, abs=len(report.layers) / total)


def test_equal_shares_give_the_uniform_allocation(registered):
    model = make_tiny_model(layers=4)
    with torch.no_grad():
        for block in range(4):  # the same weights in every block: the same share everywhere
            for src, dst in zip(block_linears(model, 0), block_linears(model, block), strict=True):
                dst.weight.copy_(src.weight)
    report = stadebench.prune(model, None, metric="magnitude", pattern="unstructured-layer", sparsity=0.5,
                              allocation="magnitude-share", allocation_options={"lambda": 0.3})
    assert all(layer.allocated == pytest.approx(0.5, abs=1e-12) for layer in report.layers)


def test_options():
    options = stadebench_alpha.MagnitudeShare({"lambda": 0.1, "M": 4}).options
    assert (options.lambda_, options.M) == (0.1, 4.0)
    assert options.model_dump(mode="json") == {"M": 4.0, "lambda": 0.1}
    for bad in ({"lambda": 0.5}, {"lambda": -0.1}, {"M": 0}):
        with pytest.raises(stadebench.ConfigError):
            stadebench_alpha.MagnitudeShare(bad)


def test_a_target_the_spread_cannot_serve_is_refused(registered):
    model = make_tiny_model(layers=4)
    add_outliers(model, block=0)
    with pytest.raises(stadebench.ConfigError, match="lambda"):
        stadebench.prune(model, None, metric="magnitude", pattern="unstructured-layer", sparsity=0.05,
                         allocation="magnitude-share", allocation_options={"lambda": 0.4})
