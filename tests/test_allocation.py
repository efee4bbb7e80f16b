"""Layer-wise sparsity: OWL against a naive implementation written from the paper, the
host's checks of an allocation, targets and ignores, and N:M's refusal."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import stadebench
from stadebench.core import allocation as allocating
from stadebench.core import engine
from stadebench.core.models import find_blocks, iter_layers, layer_names, prunable_layers, weight_of
from stadebench.errors import ConfigError, PluginError
from stadebench.plugins import resolve_allocator, resolve_pattern


def naive_owl(model, windows, sparsity, m=5.0, lam=0.08):
    """OWL as the paper states it, with nothing of stadebench but the layer list: one dense
    forward of the whole model gathers each linear's mean squared input per channel
    (Wanda's ``scaler_row``), a block's outlier ratio is the percentage of its Wanda scores
    |W|·sqrt(scaler_row) above m times their mean, and the ratios are min-max scaled to
    [0, 2λ] and centred on 1 − sparsity as densities."""
    prefix, blocks = find_blocks(model)
    squares, tokens, hooks = {}, {}, []
    for i, block in enumerate(blocks):
        for short, layer in prunable_layers(block):
            name = f"{prefix}.{i}.{short}"

            def hook(module, inputs, output, name=name):
                x = inputs[0].double().reshape(-1, inputs[0].shape[-1])
                squares[name] = squares.get(name, 0) + (x * x).sum(0)
                tokens[name] = tokens.get(name, 0) + x.shape[0]
            hooks.append(layer.register_forward_hook(hook))
    with torch.no_grad():
        model(input_ids=windows, use_cache=False)
    for h in hooks:
        h.remove()
    ratios = []
    for i, block in enumerate(blocks):
        scores = torch.cat([(weight_of(layer).double().abs()
                             * (squares[f"{prefix}.{i}.{short}"] / tokens[f"{prefix}.{i}.{short}"]).sqrt()).flatten()
                            for short, layer in prunable_layers(block)])
        ratios.append(float((scores > scores.mean() * m).sum()) / scores.numel() * 100)
    r = np.array(ratios)
    r = (r - r.min()) * (1 / (r.max() - r.min()) * lam * 2)
    r = r - r.mean() + (1 - sparsity)
    return {f"{prefix}.{i}.{short}": 1 - r[i] for i, block in enumerate(blocks) for short, _ in prunable_layers(block)}


def ours(model, windows, sparsity, pattern="unstructured", **options):
    owl = resolve_allocator("owl", options)
    return allocating.layer_sparsities(model, owl, resolve_pattern(pattern), sparsity, windows=windows,
                                       calibration=engine.Calibration(batch_size=4))


def _tiny(layers=6):
    from stadebench.testing import make_tiny_model

    return make_tiny_model(layers=layers)


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_owl_equals_the_paper_on_a_tiny_model(tiny_calibration, sparsity):
    model = _tiny()
    got, want = ours(model, tiny_calibration, sparsity), naive_owl(model, tiny_calibration, sparsity)
    assert list(got) == list(want) == layer_names(model)
    assert np.allclose(list(got.values()), list(want.values()), rtol=0, atol=1e-9)
    assert len(set(np.round(list(got.values()), 9))) > 2  # not uniform, not just two values
    per_block = {}
    for name, s in got.items():  # one sparsity per block, as the released code applies it
        per_block.setdefault(name.split(".")[2], set()).add(s)
    assert all(len(v) == 1 for v in per_block.values())
    assert math.isclose(max(got.values()) - min(got.values()), 2 * 0.08, abs_tol=1e-12)  # the spread is 2λ


@pytest.mark.slow
def test_owl_equals_the_paper_on_smollm2(smollm2_path, smollm2_calibration):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    got, want = ours(model, smollm2_calibration, 0.7), naive_owl(model, smollm2_calibration, 0.7)
    assert len(got) == 30 * 7
    # float32 statistics against float64 ones: a score next to the threshold may land on
    # the other side, moving one block's ratio by one weight in millions
    assert np.allclose(list(got.values()), list(want.values()), rtol=0, atol=1e-5)
    spread = max(got.values()) - min(got.values())
    assert 0.15 < spread <= 0.16 + 1e-9  # 2λ: the extreme blocks sit at 0.7 ± 0.08 about the centre


def test_allocated_sparsity_is_the_target_over_the_model(tiny_calibration):
    model = _tiny()
    sizes = {name: weight_of(layer).numel() for name, layer in
             ((f"{find_blocks(model)[0]}.{i}.{short}", layer) for i, short, layer in iter_layers(model))}
    shares = ours(model, tiny_calibration, 0.6)
    mean = sum(shares[n] * sizes[n] for n in sizes) / sum(sizes.values())
    assert abs(mean - 0.6) < 1e-12

    # realised: unstructured-layer prunes ⌊numel·s⌋ per layer (within one weight per layer of
    # the target); unstructured prunes ⌊in·s⌋ per row (within one weight per row)
    for pattern, slack in (("unstructured-layer", lambda shape: 1), ("unstructured", lambda shape: shape[0])):
        model = _tiny()
        report = stadebench.prune(model, tiny_calibration, "wanda", pattern, 0.6, allocation="owl", batch_size=4)
        pruned = sum(layer.pruned for layer in report.layers)
        assert abs(pruned - 0.6 * sum(sizes.values())) <= sum(slack(layer.shape) for layer in report.layers)
        for layer in report.layers:
            rows, cols = layer.shape
            want = (math.floor(rows * cols * layer.allocated) if pattern == "unstructured-layer"
                    else rows * math.floor(cols * layer.allocated))
            assert layer.pruned == want == int((weight_of(model.get_submodule(layer.name)) == 0).sum())


def test_an_allocation_outside_0_1_is_one_clear_error(tiny_calibration):
    with pytest.raises(ConfigError, match=r"allocator 'owl' would prune layer model\.layers\.\d+\.\S+ at sparsity "
                                          r"1\.\d+, outside \[0, 1\), for a target of 0\.9; lower the target or "
                                          r"the allocator's spread"):
        ours(_tiny(), tiny_calibration, 0.9, **{"lambda": 0.3})


def test_the_host_refuses_a_wrong_allocation_from_a_plugin(tiny_calibration):
    class Lopsided(stadebench.Allocator):
        """Prunes the first layer harder and forgets to compensate."""

        name = "lopsided"

        def allocate(self, layers, sparsity):
            return [min(sparsity + 0.2, 0.95)] + [sparsity] * (len(layers) - 1)

    class Short(Lopsided):
        """One value too few."""

        name = "short"

        def allocate(self, layers, sparsity):
            return [sparsity] * (len(layers) - 1)

    model = _tiny()
    with pytest.raises(PluginError, match=r"allocator 'lopsided' allocated a mean sparsity of 0\.5\d+ .* not the "
                                          r"target 0\.5"):
        stadebench.prune(model, tiny_calibration, "magnitude", "unstructured", 0.5, allocation=Lopsided())
    with pytest.raises(PluginError, match=rf"returned {6 * 7 - 1} sparsities for {6 * 7} layers"):
        stadebench.prune(model, tiny_calibration, "magnitude", "unstructured", 0.5, allocation=Short())


def test_nm_refuses_a_non_uniform_allocation(tiny_calibration):
    with pytest.raises(ConfigError, match=r"allocator 'owl' gives layers sparsities of their own, but pattern '2:4' "
                                          r"prunes every layer at 0\.5; use it with an unstructured pattern"):
        stadebench.prune(_tiny(), tiny_calibration, "wanda", "2:4", allocation="owl")
    with pytest.raises(ConfigError, match=r"pattern '2:4' prunes every layer at sparsity 0\.5, but the allocation "
                                          r"gives layer"):
        from stadebench.core import engine
        from stadebench.plugins import resolve

        model = _tiny()
        metric, pattern = resolve("magnitude", "2:4")
        engine.prune(model, None, metric, pattern, sparsities=dict.fromkeys(layer_names(model)[:2], 0.6))
    # uniform with 2:4 is today's protocol
    report = stadebench.prune(_tiny(), tiny_calibration, "wanda", "2:4", allocation="uniform", batch_size=4)
    assert report.sparsity == 0.5


def test_ignored_layers_stay_bit_identical_and_the_rest_meet_the_target(tiny_calibration):
    dense = _tiny()
    model = _tiny()
    report = stadebench.prune(model, tiny_calibration, "stade", "unstructured", 0.5, batch_size=4,
                              ignore=[r"layers\.0\.", "lm_head", r"self_attn\.o_proj"])
    by_name = {layer.name: layer for layer in report.layers}
    left = [n for n in layer_names(model) if ".layers.0." in n or n.endswith("o_proj")]
    assert {n for n, layer in by_name.items() if layer.dense} == set(left)
    for name in left:
        a, b = dense.get_submodule(name), model.get_submodule(name)
        assert torch.equal(a.weight, b.weight) and b.bias is None  # no bias correction on a dense layer
    assert torch.equal(dense.lm_head.weight, model.lm_head.weight)
    pruned = [layer for layer in report.layers if not layer.dense]
    assert all(layer.sparsity == 0.5 and layer.allocated == 0.5 for layer in pruned)
    assert report.sparsity == 0.5  # over the pruned layers
    # a layer left dense still has its role in the calibrated protocol, as if it were pruned
    full = stadebench.prune(_tiny(), tiny_calibration, "stade", "unstructured", 0.5, batch_size=4)
    roles = {layer.name: layer.role for layer in full.layers}
    assert {by_name[n].role for n in left} <= {"normed", "internal"}
    assert {n: by_name[n].role for n in by_name} == roles


def test_targets_select_and_a_misspelt_regex_fails(tiny_calibration):
    model = _tiny(layers=2)
    report = stadebench.prune(model, None, "magnitude", "unstructured", 0.5, targets=["mlp"])
    assert {layer.name.split(".", 3)[-1] for layer in report.layers if not layer.dense} == {
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    with pytest.raises(ConfigError, match=r"ignore\[1\] 'lm_haed' matches no linear layer of LlamaForCausalLM"):
        stadebench.prune(_tiny(2), None, "magnitude", "unstructured", 0.5, ignore=["mlp", "lm_haed"])
    with pytest.raises(ConfigError, match="leave no layer of LlamaForCausalLM to prune"):
        stadebench.prune(_tiny(2), None, "magnitude", "unstructured", 0.5, ignore=["layers"])


def test_owl_with_a_data_free_metric_reads_calibration_for_the_allocation_only(tiny_calibration):
    model = _tiny()
    report = stadebench.prune(model, tiny_calibration, "magnitude", "unstructured-layer", 0.6, allocation="owl",
                              batch_size=4)
    assert report.block_passes == 0 and len({layer.allocated for layer in report.layers}) > 2
    with pytest.raises(ConfigError, match="allocator 'owl' reads the dense model's statistics"):
        stadebench.prune(_tiny(), None, "magnitude", "unstructured", 0.6, allocation="owl")
