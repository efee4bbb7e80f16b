"""The pruning engine: protocol (data-free, sequential, one-shot), statistics it collects,
the report, batching, numerical checks, model state, and third-party metrics by name."""

from __future__ import annotations

import copy
import json
import math
import sys

import numpy as np
import pytest
import torch
from torch import nn

import stadebench
from stadebench.errors import ConfigError, NumericalError
from stadebench.core.metrics.basic import Wanda
from stadebench.core.metrics.sparsegpt import SparseGPT
from stadebench.core.metrics.stade import Stade, StadeW
from stadebench.plugins import get_plugins, reset_plugins

pytestmark = pytest.mark.usefixtures("single_thread")


def linears(model) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}


def zero_masks(model) -> dict[str, torch.Tensor]:
    return {n: m.weight == 0 for n, m in linears(model).items()}


def linear_inputs(model, calibration) -> dict[str, torch.Tensor]:
    """Every input row of every prunable linear over a forward pass of the whole model."""
    store: dict[str, list[torch.Tensor]] = {}
    handles = [m.register_forward_hook(
        lambda mod, args, out, n=n: store.setdefault(n, []).append(args[0].reshape(-1, args[0].shape[-1]).double()))
        for n, m in linears(model).items()]
    with torch.no_grad():
        model(input_ids=calibration, use_cache=False)
    for h in handles:
        h.remove()
    return {n: torch.cat(v) for n, v in store.items()}


def spying(cls):
    """A subclass of metric ``cls`` that records the statistics it is given, per layer."""

    class Spy(cls):
        def __init__(self, options=None):
            super().__init__(options)
            self.seen = {}
            self.scores = {}

        def score(self, weight, stats):
            self.seen[stats.layer.name] = stats
            self.scores[stats.layer.name] = s = super().score(weight, stats)
            return s

        def prune_layer(self, weight, stats, pattern, sparsity):
            self.seen[stats.layer.name] = stats
            return super().prune_layer(weight, stats, pattern, sparsity)

    Spy.__name__ = f"Spy{cls.__name__}"
    return Spy()


# ----------------------------------------------------------------------------------------
# data-free metrics


@pytest.mark.parametrize("metric", ["magnitude", "random"])
@pytest.mark.parametrize("with_calibration", [False, True])
def test_data_free_metrics_run_no_forward_pass(tiny_llama, tiny_calibration, monkeypatch, metric, with_calibration):
    calls = []

    def refuse(module, args, kwargs=None):
        calls.append(type(module).__name__)
        raise AssertionError("forward pass during data-free pruning")

    handles = [tiny_llama.register_forward_pre_hook(refuse), tiny_llama.model.register_forward_pre_hook(refuse)]
    for block in tiny_llama.model.layers:
        handles.append(block.register_forward_pre_hook(refuse))
        monkeypatch.setattr(block, "forward", lambda *a, **k: refuse(block, a))
    monkeypatch.setattr(tiny_llama, "forward", lambda *a, **k: refuse(tiny_llama, a))

    report = stadebench.prune(tiny_llama, tiny_calibration if with_calibration else None, metric=metric,
                              pattern="unstructured", sparsity=0.5)
    for h in handles:
        h.remove()
    assert calls == []
    assert report.block_passes == 0
    assert report.timings["stats"] == 0 and report.timings["forward"] == 0
    assert [b.mse for b in report.blocks] == [None, None] and [b.cosine for b in report.blocks] == [None, None]
    assert all(layer.role is None for layer in report.layers)
    assert report.sparsity == 0.5
    assert all(m.sum() * 2 == m.numel() for m in zero_masks(tiny_llama).values())


@pytest.mark.parametrize("bad", [None, "float", "1d"])
def test_calibrated_metrics_need_token_windows(tiny_llama, tiny_calibration, bad):
    calibration = {None: None, "float": tiny_calibration.float(), "1d": tiny_calibration[0]}[bad]
    with pytest.raises(ConfigError, match="calibration"):
        stadebench.prune(tiny_llama, calibration, metric="wanda")


# ----------------------------------------------------------------------------------------
# statistics and protocol


@pytest.mark.parametrize("cls,needs", [(Wanda, {"sumsq"}), (Stade, {"sum"}), (StadeW, {"sum", "sumsq"}),
                                       (SparseGPT, {"gram"})])
def test_engine_collects_exactly_the_statistics_a_metric_declares(tiny_llama, tiny_calibration, cls, needs):
    spy = spying(cls)
    stadebench.prune(tiny_llama, tiny_calibration, metric=spy, pattern="2:4", sequential=False)
    assert set(spy.seen) == set(linears(tiny_llama))
    for stats in spy.seen.values():
        assert {k for k in ("sum", "sumsq", "gram") if getattr(stats, k) is not None} == needs
        assert stats.count == tiny_calibration.numel()  # tokens, not windows


def test_one_shot_statistics_are_the_dense_models_and_sequential_ones_see_pruned_blocks(
        tiny_llama, tiny_calibration):
    dense = copy.deepcopy(tiny_llama)
    one_shot_model, seq_model = copy.deepcopy(tiny_llama), copy.deepcopy(tiny_llama)
    one, seq = spying(StadeW), spying(StadeW)
    stadebench.prune(one_shot_model, tiny_calibration, metric=one, sequential=False)
    stadebench.prune(seq_model, tiny_calibration, metric=seq, sequential=True)

    dense_inputs = linear_inputs(dense, tiny_calibration)
    # the inputs block 1 gets in the sequential protocol: the pruned block 0, dense block 1
    hybrid = copy.deepcopy(dense)
    hybrid.model.layers[0] = copy.deepcopy(seq_model.model.layers[0])  # with STADE's new biases
    hybrid_inputs = linear_inputs(hybrid, tiny_calibration)

    for name, x in dense_inputs.items():
        for spy, reference in ((one, x), (seq, hybrid_inputs[name] if ".layers.1." in name else x)):
            stats = spy.seen[name]
            assert stats.count == reference.shape[0]
            torch.testing.assert_close(stats.sum, reference.sum(0), rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(stats.sumsq, reference.pow(2).sum(0), rtol=1e-5, atol=1e-4)
        if ".layers.1." in name:  # the protocols really differ for block 1 ...
            assert not torch.allclose(seq.seen[name].sumsq, one.seen[name].sumsq, rtol=1e-3)
    one_masks, seq_masks = zero_masks(one_shot_model), zero_masks(seq_model)
    for name in one_masks:
        if ".layers.0." in name:  # ... and not for block 0
            assert torch.equal(one_masks[name], seq_masks[name]), name
    assert any(not torch.equal(one_masks[n], seq_masks[n]) for n in one_masks if ".layers.1." in n)


def test_layers_of_a_block_share_one_dense_pass(tiny_llama, tiny_calibration):
    # o_proj's statistics come from the dense attention even though q/k/v of the same
    # block are pruned before o_proj is: all layers of a block use pass 1.
    spy = spying(Wanda)
    dense_inputs = linear_inputs(copy.deepcopy(tiny_llama), tiny_calibration)
    stadebench.prune(tiny_llama, tiny_calibration, metric=spy, sequential=True)
    for name in ("model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"):
        torch.testing.assert_close(spy.seen[name].sumsq, dense_inputs[name].pow(2).sum(0), rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------------------
# the report


def block_io(model, calibration):
    """Each block's input hidden states and output hidden states (forward hooks)."""
    ins, outs, handles = {}, {}, []
    for k, block in enumerate(model.model.layers):
        handles.append(block.register_forward_pre_hook(
            lambda m, a, kw, k=k: ins.__setitem__(k, (a[0] if a else kw["hidden_states"]).detach()), with_kwargs=True))
        handles.append(block.register_forward_hook(
            lambda m, a, o, k=k: outs.__setitem__(k, (o[0] if isinstance(o, tuple) else o).detach())))
    with torch.no_grad():
        model(input_ids=calibration, use_cache=False)
    for h in handles:
        h.remove()
    return ins, outs


def with_blocks(base, source, indices):
    """A copy of ``base`` whose blocks ``indices`` are taken from ``source``."""
    model = copy.deepcopy(base)
    for k in indices:
        model.model.layers[k] = copy.deepcopy(source.model.layers[k])
    return model


def mse_cos(d, p):
    d, p = d.double(), p.double()
    return (d - p).pow(2).mean().item(), torch.nn.functional.cosine_similarity(d, p, dim=-1).mean().item()


@pytest.mark.parametrize("sequential", [True, False])
def test_report_reconstruction_error_matches_an_independent_computation(tiny_llama, tiny_calibration, sequential):
    dense = copy.deepcopy(tiny_llama)
    report = stadebench.prune(tiny_llama, tiny_calibration, metric="wanda", pattern="2:4", sequential=sequential,
                              batch_size=3)
    n = len(dense.model.layers)
    for k in range(n):
        if sequential:  # block k sees pruned blocks < k: dense block k vs pruned block k on that input
            dense_out = block_io(with_blocks(dense, tiny_llama, range(k)), tiny_calibration)[1][k]
            pruned_out = block_io(tiny_llama, tiny_calibration)[1][k]
        else:  # block k sees the dense model's hidden states
            dense_out = block_io(dense, tiny_calibration)[1][k]
            pruned_out = block_io(with_blocks(dense, tiny_llama, [k]), tiny_calibration)[1][k]
        mse, cos = mse_cos(dense_out, pruned_out)
        assert mse > 0 and cos < 1
        assert report.blocks[k].index == k
        assert report.blocks[k].mse == pytest.approx(mse, rel=1e-4)
        assert report.blocks[k].cosine == pytest.approx(cos, rel=1e-5)


# ----------------------------------------------------------------------------------------
# one-shot statistics shared across metrics, patterns and sparsities

SHARED_CELLS = [("wanda", "unstructured", 0.5), ("stade", "2:4", None), ("stade-w", "unstructured-layer", 0.3),
                ("sparsegpt", "unstructured", 0.6), ("stade-w", "4:8", None), ("magnitude", "2:4", None)]


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_shared_statistics_prune_exactly_as_each_metrics_own_one_shot_pass(tiny_calibration, family):
    from conftest import make_tiny

    dense = make_tiny(family)
    needs = set().union(*(get_plugins().metrics.get(m).cls.statistics for m, _, _ in SHARED_CELLS))
    shared = stadebench.collect_statistics(dense, tiny_calibration, needs, batch_size=3)
    assert torch.equal(torch.cat([p.flatten() for p in dense.parameters()]),
                       torch.cat([p.flatten() for p in make_tiny(family).parameters()]))  # collecting changes nothing
    for metric, pattern, sparsity in SHARED_CELLS:
        own, reused = copy.deepcopy(dense), copy.deepcopy(dense)
        a = stadebench.prune(own, tiny_calibration, metric=metric, pattern=pattern, sparsity=sparsity,
                             sequential=False, batch_size=3)
        b = stadebench.prune(reused, None, metric=metric, pattern=pattern, sparsity=sparsity,
                             sequential=False, statistics=shared)
        for (name, x), y in zip(own.state_dict().items(), reused.state_dict().values()):
            assert torch.equal(x, y), (metric, pattern, name)  # bit for bit: same numbers, same masks, same biases
        assert [(l.name, l.role, l.pruned, l.bias_added) for l in a.layers] == \
               [(l.name, l.role, l.pruned, l.bias_added) for l in b.layers]
        data_free = metric == "magnitude"
        assert b.shared_statistics is not data_free and b.block_passes == 0
        assert (b.n, b.seqlen, b.batch_size) == ((8, 32, 3) if not data_free else (0, 0, 8))


def test_shared_statistics_hold_each_layers_role_and_only_what_was_asked(tiny_llama, tiny_calibration):
    shared = stadebench.collect_statistics(tiny_llama, tiny_calibration, {"sumsq"}, batch_size=4)
    assert set(shared.layers) == set(linears(tiny_llama)) and shared.block_passes == 2
    assert (shared.n, shared.seqlen, shared.batch_size) == (8, 32, 4)
    for name, stats in shared.layers.items():
        assert stats.layer.name == name and stats.count == tiny_calibration.numel()
        assert stats.sum is None and stats.gram is None and stats.sumsq.device.type == "cpu"
        assert stats.layer.role == ("internal" if name.endswith(("o_proj", "down_proj")) else "normed")
    # q/k/v read one tensor: one copy of its statistics, counted once
    q, k = shared.layers["model.layers.0.self_attn.q_proj"], shared.layers["model.layers.0.self_attn.k_proj"]
    assert q.sumsq is k.sumsq
    assert shared.nbytes == 2 * (3 * 64 + 128) * 8  # 2 blocks × (attn, o_proj, mlp, down_proj inputs), float64


def test_shared_statistics_are_one_shot_and_must_cover_the_metric(tiny_llama, tiny_calibration):
    shared = stadebench.collect_statistics(tiny_llama, tiny_calibration, {"sumsq"})
    with pytest.raises(ConfigError, match="sequential=False"):
        stadebench.prune(tiny_llama, None, metric="wanda", sequential=True, statistics=shared)
    with pytest.raises(ConfigError, match=r"needs statistics \['sum'\]"):
        stadebench.prune(tiny_llama, None, metric="stade", sequential=False, statistics=shared)
    with pytest.raises(ConfigError, match="subset"):
        stadebench.collect_statistics(tiny_llama, tiny_calibration, {"mean"})
    with pytest.raises(ConfigError, match="another model"):
        stadebench.prune(_renamed(tiny_llama), None, metric="wanda", sequential=False, statistics=shared)


def _renamed(model):
    """The same model with its blocks under another attribute path."""
    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.config = inner.config

    return Wrapper(copy.deepcopy(model))


def test_report_fields(tiny_llama, tiny_calibration):
    progress = []
    report = stadebench.prune(tiny_llama, tiny_calibration, metric="stade", pattern="2:4", batch_size=3,
                              progress=lambda done, total: progress.append((done, total)))
    assert progress == [(1, 2), (2, 2)]
    assert (report.metric, report.metric_version, report.pattern) == ("stade", "1", "2:4")
    assert report.metric_options == {"bias_correction": True}
    assert report.target_sparsity == 0.5 and report.sequential is True
    assert (report.n, report.seqlen, report.batch_size, report.device) == (8, 32, 3, "cpu")
    assert report.block_passes == 4  # two blocks, pass 1 and pass 2 each
    # per-layer realised sparsity from the weights themselves
    layers = linears(tiny_llama)
    assert [layer.name for layer in report.layers] == list(layers)
    total = pruned = 0
    for entry in report.layers:
        w = layers[entry.name].weight
        assert entry.shape == tuple(w.shape)
        assert entry.block == int(entry.name.split(".")[2])
        assert entry.pruned == int((w == 0).sum())
        assert entry.sparsity == pytest.approx(entry.pruned / w.numel())
        assert entry.sparsity == 0.5
        total, pruned = total + w.numel(), pruned + entry.pruned
    assert report.sparsity == pruned / total
    assert [layer.bias_added for layer in report.layers] == [True] * len(layers)  # Llama has no biases
    # timings, memory
    assert set(report.timings) == {"capture", "stats", "prune", "forward"}
    assert all(v > 0 for v in report.timings.values())
    assert report.seconds >= sum(report.timings.values()) * 0.999
    assert all(b.seconds > 0 for b in report.blocks)
    assert report.peak_memory_bytes > 0
    assert all(b.mse is not None and b.mse > 0 and 0 < b.cosine < 1 for b in report.blocks)
    json.dumps(report.to_dict())


@pytest.mark.parametrize("sequential,reconstruction,passes", [(True, False, 4), (False, True, 4), (False, False, 2)])
def test_block_passes_and_reconstruction_switch(tiny_llama, tiny_calibration, sequential, reconstruction, passes):
    report = stadebench.prune(tiny_llama, tiny_calibration, metric="wanda", sequential=sequential,
                              reconstruction=reconstruction)
    assert report.block_passes == passes
    if passes == 2:
        assert all(b.mse is None and b.cosine is None for b in report.blocks)
    else:
        assert all(b.mse is not None for b in report.blocks)


# ----------------------------------------------------------------------------------------
# batching


def near_tie(scores: torch.Tensor, pattern: str, rtol: float) -> torch.Tensor:
    """Weights whose score is within rtol of the pruning threshold of their group
    (see test_metrics_reference.assert_masks_match for why this band is sufficient)."""
    m = 4 if pattern == "2:4" else scores.shape[1]
    k = 2 if pattern == "2:4" else scores.shape[1] // 2
    s = scores.double().reshape(-1, m).numpy()
    ordered = np.sort(s, axis=1)
    t_k, t_k1 = ordered[:, k - 1:k], ordered[:, k:k + 1]
    return torch.from_numpy((s >= t_k1 * (1 - rtol)) & (s <= t_k * (1 + rtol))).reshape(scores.shape)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_batch_size_does_not_change_statistics_or_masks(tiny_llama, tiny_calibration, pattern):
    runs = {}
    for batch_size in (1, 3, 4, 8):
        model, spy = copy.deepcopy(tiny_llama), spying(Stade)
        report = stadebench.prune(model, tiny_calibration, metric=spy, pattern=pattern, batch_size=batch_size)
        assert report.batch_size == batch_size
        runs[batch_size] = (spy, zero_masks(model))
    ref_spy, ref_masks = runs[4]
    for batch_size, (spy, masks) in runs.items():
        for name, stats in ref_spy.seen.items():
            # float32 per-batch reductions summed in float64: only summation order differs
            torch.testing.assert_close(spy.seen[name].sum, stats.sum, rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(spy.seen[name].sumsq, stats.sumsq, rtol=1e-5, atol=1e-4)
            assert spy.seen[name].count == stats.count
            # masks equal away from near-ties (score relative error ≲ 1e-5 ⇒ band 1e-4)
            ties = near_tie(ref_spy.scores[name], pattern, 1e-4)
            assert torch.equal(masks[name][~ties], ref_masks[name][~ties]), (batch_size, name)
            assert ties.double().mean() < 0.01


@pytest.mark.parametrize("sequential", [True, False])
def test_offloaded_activations_give_the_same_pruned_model(tiny_llama, tiny_calibration, sequential):
    # On a CPU the transfers are no-ops, but the offload path (activations kept in a
    # separate store, moved per batch) must be the very same computation.
    results = {}
    for offload in (False, True):
        model = copy.deepcopy(tiny_llama)
        report = stadebench.prune(model, tiny_calibration, metric="sparsegpt", pattern="2:4",
                                  sequential=sequential, batch_size=3, offload=offload)
        assert report.offloaded is offload
        results[offload] = (model.state_dict(), [(b.mse, b.cosine) for b in report.blocks])
    for name, tensor in results[False][0].items():
        assert torch.equal(tensor, results[True][0][name]), name
    assert results[False][1] == results[True][1]


def test_solver_details_are_recorded_per_layer(tiny_llama, tiny_calibration):
    class Noting(SparseGPT):
        def prune_layer(self, weight, stats, pattern, sparsity):
            r = super().prune_layer(weight, stats, pattern, sparsity)
            return stadebench.LayerResult(r.mask, r.weight, r.bias_delta,
                                          {"percdamp": 0.5} if stats.layer.short_name == "mlp.down_proj" else {})

    report = stadebench.prune(tiny_llama, tiny_calibration, metric=Noting(), pattern="2:4")
    noted = {layer.name: layer.details for layer in report.layers if layer.details}
    assert noted == {f"model.layers.{i}.mlp.down_proj": {"percdamp": 0.5} for i in range(2)}


# ----------------------------------------------------------------------------------------
# numerical checks and model state


@pytest.mark.parametrize("metric", ["magnitude", "random", "wanda", "stade", "stade-w", "sparsegpt"])
def test_nan_weight_is_a_numerical_error_naming_layer_and_metric(tiny_llama, tiny_calibration, metric):
    with torch.no_grad():
        tiny_llama.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    tiny_llama.train()
    with pytest.raises(NumericalError) as info:
        stadebench.prune(tiny_llama, tiny_calibration, metric=metric, pattern="unstructured")
    message = str(info.value)
    assert "model.layers.1.mlp.up_proj" in message
    assert metric in message
    assert tiny_llama.training  # state restored on the error path too


def test_nan_in_calibration_activations_is_a_numerical_error(tiny_llama, tiny_calibration):
    with torch.no_grad():
        tiny_llama.model.embed_tokens.weight[int(tiny_calibration[0, 0])] = float("nan")
    with pytest.raises(NumericalError, match=r"model\.layers\.0\.self_attn\.q_proj.*wanda"):
        stadebench.prune(tiny_llama, tiny_calibration, metric="wanda")


@pytest.mark.parametrize("training", [True, False])
def test_model_mode_and_cache_flag_are_restored(tiny_llama, tiny_calibration, training):
    tiny_llama.train(training)
    tiny_llama.config.use_cache = True
    stadebench.prune(tiny_llama, tiny_calibration, metric="wanda")
    assert all(m.training == training for m in tiny_llama.modules())
    assert tiny_llama.config.use_cache is True


def test_statistics_are_collected_in_eval_mode(tiny_llama, tiny_calibration):
    # With attention dropout active in train mode, statistics would be random.
    for block in tiny_llama.model.layers:
        block.self_attn.attention_dropout = 0.5
    tiny_llama.train()
    masks = []
    for seed in (0, 1):
        model = copy.deepcopy(tiny_llama)
        torch.manual_seed(seed)
        stadebench.prune(model, tiny_calibration, metric="wanda")
        masks.append(zero_masks(model))
        assert model.training
    assert all(torch.equal(masks[0][n], masks[1][n]) for n in masks[0])


def test_weights_outside_the_blocks_are_never_touched(tiny_llama, tiny_calibration):
    outside = {n: p.detach().clone() for n, p in tiny_llama.named_parameters() if ".layers." not in n}
    stadebench.prune(tiny_llama, tiny_calibration, metric="sparsegpt", pattern="2:4")
    for n, p in tiny_llama.named_parameters():
        if n in outside:
            assert torch.equal(p, outside[n]), n


# ----------------------------------------------------------------------------------------
# a metric defined right here, registered as a plugin, used by name


class LargestFirst(stadebench.Metric):
    """Test plugin: prunes the largest |W| first and reads only Σx."""

    name = "my-metric"
    version = "0.1"
    statistics = frozenset({"sum"})
    calls: list = []

    def score(self, weight, stats):
        LargestFirst.calls.append((stats.layer.name, stats.sum is not None, stats.sumsq, stats.gram, stats.count))
        return -weight.abs()


@stadebench.hookimpl
def register_metrics(register):
    register(LargestFirst)


@pytest.fixture
def fresh_plugins():
    reset_plugins()
    yield get_plugins()
    reset_plugins()


def test_a_test_module_metric_is_usable_by_name(fresh_plugins, tiny_llama, tiny_calibration):
    assert "my-metric" not in fresh_plugins.metrics
    fresh_plugins.register(sys.modules[__name__])
    assert fresh_plugins.metrics.get("my-metric").cls is LargestFirst
    LargestFirst.calls.clear()
    dense = {n: m.weight.detach().clone() for n, m in linears(tiny_llama).items()}
    report = stadebench.prune(tiny_llama, tiny_calibration, metric="my-metric", pattern="unstructured")
    assert (report.metric, report.metric_version) == ("my-metric", "0.1")
    assert report.block_passes == 4  # it declared a statistic: calibrated protocol
    assert [c[0] for c in LargestFirst.calls] == [layer.name for layer in report.layers]
    assert all(has_sum and sumsq is None and gram is None and count == tiny_calibration.numel()
               for _, has_sum, sumsq, gram, count in LargestFirst.calls)
    for name, layer in linears(tiny_llama).items():
        pruned = layer.weight == 0
        magnitude = dense[name].abs()
        kept_max = magnitude.masked_fill(pruned, -math.inf).amax(1)
        pruned_min = magnitude.masked_fill(~pruned, math.inf).amin(1)
        assert (kept_max <= pruned_min).all(), name  # the largest went first
    reset_plugins()
    with pytest.raises(stadebench.UnknownNameError):
        stadebench.prune(tiny_llama, tiny_calibration, metric="my-metric")
