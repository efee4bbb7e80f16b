"""The columns pattern: the conformance kit for each reduction, and its semantics by hand."""

import math

import pytest
import torch

import stadebench
import stadebench_structured
from stadebench.suite import expand, parse_suite
from stadebench.testing import PatternConformance, make_tiny_model, make_windows
from stadebench_structured import Columns


class TestColumns(PatternConformance):
    pattern = "columns"
    plugin = stadebench_structured

    def expected_pruned(self, shape, sparsity):
        return shape[0] * math.floor(shape[1] * sparsity)


class TestColumnsL2(TestColumns):
    pattern = "columns:l2"


class TestColumnsMaxByOption(TestColumns):
    options = {"reduce": "max"}


@pytest.fixture(autouse=True)
def registered():
    plugins = stadebench.get_plugins()
    if not plugins.pm.is_registered(stadebench_structured):
        plugins.register(stadebench_structured, name="stadebench_structured")
        yield
        plugins.unregister("stadebench_structured")
    else:
        yield


@pytest.mark.parametrize("reduce,pruned", [("sum", 1), ("l2", 2), ("max", 0)])
def test_each_reduction_picks_its_lowest_column(reduce, pruned):
    scores = torch.tensor([[1.1, 2.9, 1.5, 5.0],
                           [1.1, 0.0, 1.5, 5.0],
                           [1.1, 0.0, 0.0, 5.0],
                           [1.1, 0.0, 0.0, 5.0]])
    # sum 4.4, 2.9, 3.0, 20 / l2 2.2, 2.9, 2.12, 10 / max 1.1, 2.9, 1.5, 5
    mask = Columns({"reduce": reduce}).select(scores, 0.25)
    assert torch.nonzero(mask[0]).flatten().tolist() == [pruned]
    assert (mask == mask[0]).all()  # every row loses the same inputs


def test_rounds_down_and_breaks_ties_by_lower_index():
    mask = Columns().select(torch.ones(3, 10), 0.35)  # ⌊10·0.35⌋ = 3 columns, all tied
    assert mask[0].tolist() == [True] * 3 + [False] * 7
    assert not Columns().select(torch.ones(3, 10), 0.09).any()  # ⌊0.9⌋ = 0


def test_spec_and_options_agree():
    assert Columns.from_spec("columns:max").spec == "columns:max"
    assert Columns.from_spec("columns", {"reduce": "l2"}).spec == "columns:l2"
    assert Columns.from_spec("columns:l2", {"reduce": "l2"}).options.reduce == "l2"
    with pytest.raises(stadebench.ConfigError, match="reduce=l2 but its options say reduce=max"):
        Columns.from_spec("columns:l2", {"reduce": "max"})
    with pytest.raises(stadebench.ConfigError, match="reduce"):
        Columns({"reduce": "mean"})
    assert not Columns.matches("columns:mean") and not Columns.matches("rows")


def test_a_suite_names_it_and_records_the_reduction():
    suite = parse_suite("""
models: [HuggingFaceTB/SmolLM2-135M]
metrics: [wanda]
patterns: [columns, {name: columns, options: {reduce: max}}, "columns:l2"]
sparsities: [0.5]
dense: false
""")
    assert [c.pattern for c in expand(suite)] == ["columns", "columns:max", "columns:l2"]


def test_prune_zeroes_whole_input_columns():
    model = make_tiny_model()
    report = stadebench.prune(model, make_windows(), metric="wanda", pattern="columns:l2", sparsity=0.5)
    for layer in report.layers:
        w = model.get_submodule(layer.name).weight
        dead = (w == 0).all(0)
        assert int(dead.sum()) == layer.shape[1] // 2 and layer.pruned == layer.shape[0] * (layer.shape[1] // 2)
