"""Built-in sparsity patterns: exact counts, stable tie-breaking, and configuration errors.

Every mask is compared with a naive reference written here: a stable sort (numpy
``kind="stable"``) of each decision group, whose first k entries are pruned. Scores are
drawn from a handful of small integers so that ties are the rule, not the exception.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stadebench
from stadebench.errors import ConfigError
from stadebench.core.patterns import NM, Unstructured, UnstructuredLayer
from stadebench.plugins import get_plugins

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

pytestmark = pytest.mark.usefixtures("single_thread")


def naive_lowest(groups: np.ndarray, k: int) -> np.ndarray:
    """Prune the k lowest of every row of ``groups``; equal scores: lower index first."""
    mask = np.zeros(groups.shape, dtype=bool)
    for r in range(groups.shape[0]):
        order = sorted(range(groups.shape[1]), key=lambda j: groups[r, j])  # Python's sort is stable
        mask[r, order[:k]] = True
    return mask


def scores_strategy(rows, cols, values=st.integers(-2, 3)):
    return st.lists(values, min_size=rows * cols, max_size=rows * cols).map(
        lambda v: torch.tensor(v, dtype=torch.float32).reshape(rows, cols))


@st.composite
def matrix_and_sparsity(draw, max_rows=6, max_cols=40):
    rows = draw(st.integers(1, max_rows))
    cols = draw(st.integers(1, max_cols))
    scores = draw(scores_strategy(rows, cols))
    sparsity = draw(st.floats(0.0, 0.99, allow_nan=False, exclude_max=False))
    return scores, sparsity


@st.composite
def nm_case(draw):
    m = draw(st.integers(2, 8))
    n = draw(st.integers(1, m - 1))
    rows = draw(st.integers(1, 6))
    groups = draw(st.integers(1, 6))
    scores = draw(scores_strategy(rows, groups * m))
    return n, m, scores


@SETTINGS
@given(matrix_and_sparsity())
def test_unstructured_prunes_floor_in_times_s_per_row_lowest_first_stable(case):
    scores, s = case
    mask = Unstructured().select(scores, s)
    rows, cols = scores.shape
    k = int(cols * s)  # ⌊in·s⌋ as the reference repos compute it: int(W.shape[1] * sparsity)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    assert mask.sum(1).tolist() == [k] * rows
    assert np.array_equal(mask.numpy(), naive_lowest(scores.numpy(), k))


@SETTINGS
@given(matrix_and_sparsity())
def test_unstructured_layer_prunes_floor_numel_times_s_in_total(case):
    scores, s = case
    mask = UnstructuredLayer().select(scores, s)
    k = int(scores.numel() * s)
    assert mask.shape == scores.shape
    assert int(mask.sum()) == k
    expected = naive_lowest(scores.numpy().reshape(1, -1), k).reshape(scores.shape)
    assert np.array_equal(mask.numpy(), expected)


@SETTINGS
@given(nm_case())
def test_nm_prunes_exactly_n_in_every_group_of_m(case):
    n, m, scores = case
    pattern = NM.from_spec(f"{n}:{m}")
    rows, cols = scores.shape
    pattern.check_shape((rows, cols))
    mask = pattern.select(scores, pattern.resolve_sparsity(None))
    groups = mask.reshape(rows, cols // m, m)
    assert (groups.sum(-1) == n).all()
    expected = naive_lowest(scores.numpy().reshape(-1, m), n).reshape(rows, cols)
    assert np.array_equal(mask.numpy(), expected)


def test_all_equal_scores_prune_the_first_columns():
    scores = torch.zeros(3, 8)
    assert Unstructured().select(scores, 0.5)[:, :4].all()
    assert not Unstructured().select(scores, 0.5)[:, 4:].any()
    layer = UnstructuredLayer().select(scores, 0.25)
    assert layer.flatten()[:6].all() and not layer.flatten()[6:].any()
    nm = NM.from_spec("2:4").select(scores, 0.5)
    assert nm.reshape(3, 2, 4)[..., :2].all() and not nm.reshape(3, 2, 4)[..., 2:].any()


def test_selection_does_not_modify_the_scores_and_works_on_views():
    base = torch.arange(32.0).flip(0).reshape(4, 8)
    view = base.t()  # non-contiguous [8, 4]
    before = view.clone()
    for pattern in (Unstructured(), UnstructuredLayer(), NM.from_spec("2:4")):
        mask = pattern.select(view, 0.5)
        assert mask.shape == view.shape
        assert torch.equal(view, before)
        expected = naive_lowest(view.numpy().reshape(-1, 4), 2).reshape(8, 4) if isinstance(pattern, NM) else None
        if expected is not None:
            assert np.array_equal(mask.numpy(), expected)


@pytest.mark.parametrize("cols,m", [(6, 4), (10, 4), (12, 8), (7, 2)])
def test_nm_width_not_divisible_by_m_is_a_config_error(cols, m):
    with pytest.raises(ConfigError, match=str(m)):
        NM.from_spec(f"1:{m}").check_shape((4, cols))


@pytest.mark.parametrize("cols,m", [(8, 4), (16, 8), (6, 2)])
def test_nm_width_divisible_by_m_is_accepted(cols, m):
    NM.from_spec(f"1:{m}").check_shape((3, cols))


@pytest.mark.parametrize("spec", ["4:4", "5:4", "0:4", "8:8", "0:1"])
def test_nm_needs_0_lt_n_lt_m(spec):
    with pytest.raises(ConfigError):
        NM.from_spec(spec)
    with pytest.raises(ConfigError):  # through the registry, as the engine resolves it
        get_plugins().patterns.get(spec).cls.from_spec(spec)


@pytest.mark.parametrize("spec,bad", [("2:4", 0.6), ("2:4", 0.0), ("4:8", 0.25), ("1:4", 0.5)])
def test_nm_with_a_conflicting_sparsity_is_a_config_error(spec, bad):
    with pytest.raises(ConfigError, match="conflicts"):
        NM.from_spec(spec).resolve_sparsity(bad)


@pytest.mark.parametrize("spec,implied", [("2:4", 0.5), ("4:8", 0.5), ("1:4", 0.25), ("3:8", 0.375), ("1:2", 0.5)])
def test_nm_default_and_matching_sparsity_is_n_over_m(spec, implied):
    pattern = NM.from_spec(spec)
    assert pattern.resolve_sparsity(None) == implied
    assert pattern.resolve_sparsity(implied) == implied
    assert pattern.spec == spec


@pytest.mark.parametrize("cls", [Unstructured, UnstructuredLayer])
def test_default_sparsity_is_one_half(cls):
    assert cls().resolve_sparsity(None) == 0.5
    assert cls().resolve_sparsity(0.3) == 0.3


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
@pytest.mark.parametrize("cls", [Unstructured, UnstructuredLayer])
def test_sparsity_outside_0_1_is_a_config_error(cls, bad):
    with pytest.raises(ConfigError):
        cls().resolve_sparsity(bad)


def test_sparsity_zero_prunes_nothing():
    scores = torch.randn(4, 8)
    for pattern in (Unstructured(), UnstructuredLayer()):
        assert not pattern.select(scores, 0.0).any()


def test_engine_rejects_bad_pattern_configurations_before_touching_the_model(tiny_llama, tiny_calibration):
    dense = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    with pytest.raises(ConfigError):
        stadebench.prune(tiny_llama, tiny_calibration, metric="magnitude", pattern="2:4", sparsity=0.6)
    with pytest.raises(ConfigError):
        stadebench.prune(tiny_llama, tiny_calibration, metric="magnitude", pattern="4:4")
    with pytest.raises(ConfigError, match="multiple of 128"):  # tiny Llama widths are 64 and 128
        stadebench.prune(tiny_llama, tiny_calibration, metric="magnitude", pattern="1:128")
    with pytest.raises(ConfigError):
        stadebench.prune(tiny_llama, tiny_calibration, metric="magnitude", pattern="unstructured", sparsity=1.0)
    for k, v in tiny_llama.state_dict().items():
        assert torch.equal(v, dense[k]), k


def test_engine_default_sparsity_follows_the_pattern(tiny_llama):
    report = stadebench.prune(tiny_llama, None, metric="magnitude", pattern="1:4")
    assert report.target_sparsity == 0.25 and report.sparsity == 0.25
    assert all(layer.pruned * 4 == layer.shape[0] * layer.shape[1] for layer in report.layers)


@SETTINGS
@given(st.integers(1, 200), st.floats(0.0, 0.99))
def test_per_row_count_is_floor_for_awkward_products(cols, s):
    # in·s computed in floating point, e.g. 100 · 0.29 = 28.999…: the count is what
    # int(cols * s) gives, like the reference implementations (no rounding up).
    mask = Unstructured().select(torch.rand(2, cols), s)
    assert mask.sum(1).tolist() == [math.floor(cols * s)] * 2
