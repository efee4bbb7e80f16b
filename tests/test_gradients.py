"""Gradient statistics (core.gradients), the gblm and pruner-zero metrics, and the
runner's sharing and on-disk cache of gradients, on tiny random models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import stadebench
from stadebench.base import LayerInfo, LayerStats
from stadebench.core import engine
from stadebench.core import gradients as core_gradients
from stadebench.core.gradients import gradient_statistics
from stadebench.core.metrics.gradient import BEST_TREE, evaluate, tree_text
from stadebench.errors import ConfigError
from stadebench.plugins import resolve_metric, resolve_pattern
from stadebench.testing.kit import make_tiny_model, make_windows

from tinymodel import load_tiny_suite, shared_assets


def _by_hand(model, windows, scale=100.0):
    """l1 and l2 from one backward pass per window, with autograd's own .grad."""
    l1, l2 = {}, {}
    params = dict(model.named_parameters())
    for window in windows:
        model.zero_grad()
        model(input_ids=window[None], labels=window[None]).loss.backward()
        for name, p in params.items():
            if name.endswith("_proj.weight"):
                layer = name[: -len(".weight")]
                g = p.grad.float() * scale
                l1[layer] = l1.get(layer, 0) + g.abs()
                l2[layer] = l2.get(layer, 0) + g.square()
    model.zero_grad()
    return l1, {k: v.sqrt() for k, v in l2.items()}


def test_gradient_statistics_are_the_per_window_sums():
    model, windows = make_tiny_model(), make_windows(4, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = gradient_statistics(model, windows, scale=100)
    l1, l2 = _by_hand(make_tiny_model(), windows)
    assert set(stats.layers) == set(l1) and len(l1) == 14
    for name, (a1, a2) in stats.layers.items():
        assert a1.dtype == a2.dtype == torch.float32
        torch.testing.assert_close(a1, l1[name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a2, l2[name], rtol=1e-5, atol=1e-6)
    # the model is as it was: weights, no gradients left, mode and requires_grad restored
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert not model.training
    assert (stats.n, stats.seqlen, stats.scale) == (4, 16, 100.0)


def test_checkpointing_and_scale():
    model, windows = make_tiny_model(), make_windows(3, 16)
    plain = gradient_statistics(model, windows, checkpointing=False)
    checkpointed = gradient_statistics(model, windows, checkpointing=True)
    ten = gradient_statistics(model, windows, scale=10)
    assert type(model.model.layers[0]).forward is model.model.layers[0].forward.__func__  # unwrapped again
    for name, (l1, l2) in plain.layers.items():
        assert torch.equal(l1, checkpointed.layers[name][0]) and torch.equal(l2, checkpointed.layers[name][1])
        torch.testing.assert_close(ten.layers[name][1] * 10, l2)


def test_released_accumulation_is_float16():
    model, windows = make_tiny_model(), make_windows(4, 16)
    released = gradient_statistics(model, windows, accumulate="released")
    exact = gradient_statistics(model, windows)
    for name, (l1, l2) in released.layers.items():
        assert l1.dtype == l2.dtype == torch.float16
        torch.testing.assert_close(l2.float(), exact.layers[name][1], rtol=2e-3, atol=1e-4)
        torch.testing.assert_close(l1.float(), exact.layers[name][0], rtol=5e-3, atol=1e-3)


def test_bad_input_is_refused_before_any_backward(monkeypatch):
    from transformers import LlamaModel

    tiny = make_tiny_model()
    with pytest.raises(ConfigError, match="no language-modelling head"):
        gradient_statistics(LlamaModel(tiny.config), make_windows())
    with pytest.raises(ConfigError, match="2 or more tokens"):
        gradient_statistics(tiny, make_windows(2, 1))
    with pytest.raises(ConfigError, match="positive finite"):
        gradient_statistics(tiny, make_windows(), scale=float("nan"))
    with pytest.raises(ConfigError, match="LongTensor"):
        gradient_statistics(tiny, make_windows().float())
    forwards = []
    tiny.register_forward_hook(lambda *a: forwards.append(1))
    monkeypatch.setattr(core_gradients, "_free_bytes", lambda device: 1 << 16)
    refused = r"needs about [\d.]+ MiB on cpu .* which has 0\.1 MiB free: .*calibration\.seqlen"
    with pytest.raises(ConfigError, match=refused):
        gradient_statistics(tiny, make_windows())
    assert forwards == []


def _stats(weight_shape=(6, 8), seed=0, dtype=torch.float32) -> tuple[torch.Tensor, LayerStats]:
    g = torch.Generator().manual_seed(seed)
    out, inp = weight_shape
    weight = torch.randn(weight_shape, generator=g)
    sumsq = torch.rand(inp, generator=g, dtype=torch.float64) * 40
    grad = torch.rand(weight_shape, generator=g).to(dtype)
    grad[0, 0] = 0
    stats = LayerStats(LayerInfo("model.layers.0.mlp.down_proj", 0, "mlp.down_proj", "internal"), count=64,
                       sumsq=sumsq, windows=4, grad_l1=grad * 3, grad_l2=grad)
    return weight, stats


def test_gblm_scores_are_the_released_formulas():
    weight, stats = _stats()
    x = torch.sqrt((stats.sumsq / 4).float()).reshape(1, -1)
    score = resolve_metric("gblm").score
    torch.testing.assert_close(score(weight, stats), weight.abs() * x + weight.abs() * stats.grad_l2, rtol=0, atol=0)
    l1 = resolve_metric("gblm", {"gradient": "l1"}).score(weight, stats)
    torch.testing.assert_close(l1, weight.abs() * x + weight.abs() * stats.grad_l1, rtol=0, atol=0)
    alone = resolve_metric("gblm", {"wanda": False}).score(weight, stats)
    assert torch.equal(alone, weight.abs() * stats.grad_l2)
    inverse = resolve_metric("gblm", {"inverse": True}).score(weight, stats)
    assert torch.equal(inverse, weight.abs() * x * (1 / (stats.grad_l2 + 1e-8)))
    # float16 gradients (accumulate: released): 1e-8 is 0 in float16, so a zero gradient gives inf, as released
    weight, half = _stats(dtype=torch.float16)
    assert torch.isinf(resolve_metric("gblm", {"inverse": True}).score(weight, half)[0, 0])


def test_pruner_zero_best_tree_and_grammar():
    weight, stats = _stats()
    metric = resolve_metric("pruner-zero")
    assert tree_text(metric.options.tree) == "mul(abs(mul(W, W)), mms(G))" and metric.options.tree == BEST_TREE
    g = stats.grad_l2
    torch.testing.assert_close(metric.score(weight, stats), (weight.abs() ** 2) * (g - g.min()) / (g.max() - g.min()),
                               rtol=1e-6, atol=0)
    x_only = resolve_metric("pruner-zero", {"tree": {"data": "sqrt", "left": {"data": "X"}}})
    scores = x_only.score(weight, stats)
    assert scores.shape == weight.shape and torch.equal(scores[0], scores[-1])
    # div divides by the norm of the whole broadcast operand, as the release does
    div = {"data": "div", "left": {"data": "W"}, "right": {"data": "X"}}
    x = (stats.sumsq / 4).float().reshape(1, -1)
    value = evaluate(div, {"W": weight.abs(), "G": g, "X": x})
    torch.testing.assert_close(value, weight.abs() / torch.norm(x.expand_as(weight)))


@pytest.mark.parametrize(("tree", "message"), [
    ({"data": "W", "left": {"data": "G"}}, "takes no left operand"),
    ({"data": "mul", "left": {"data": "W"}}, "needs a right operand"),
    ({"data": "softmax", "left": {"data": "W"}}, "not in the released grammar"),
    ({"data": "W", "colour": 1}, "unknown keys"),
    ({"left": {"data": "W"}}, "a 'data' label"),
    ("W", "tree: Input should be a valid dictionary"),
])
def test_pruner_zero_refuses_trees_outside_the_grammar(tree, message):
    with pytest.raises(ConfigError, match=message):
        resolve_metric("pruner-zero", {"tree": tree})


def test_pruner_zero_refuses_a_deep_tree():
    tree = {"data": "W"}
    for _ in range(40):
        tree = {"data": "neg", "left": tree}
    with pytest.raises(ConfigError, match="too large"):
        resolve_metric("pruner-zero", {"tree": tree})


def test_given_gradients_prune_as_computed_ones():
    windows = make_windows(4, 16)
    shared = gradient_statistics(make_tiny_model(), windows, scale=100)
    pattern = resolve_pattern("unstructured")
    masks = []
    for gradients in (None, shared):
        model = make_tiny_model()
        report = engine.prune(model, windows, resolve_metric("gblm"), pattern, 0.5, gradients=gradients)
        assert report.gradients["shared"] is (gradients is not None)
        masks.append([layer.weight == 0 for layer in model.modules() if isinstance(layer, torch.nn.Linear)])
    assert all(torch.equal(a, b) for a, b in zip(*masks))
    with pytest.raises(ConfigError, match="scale 100, accumulate 'float64'; metric 'gblm' needs scale 10"):
        engine.prune(make_tiny_model(), windows, resolve_metric("gblm", {"scale": 10}), pattern, 0.5,
                     gradients=shared)


def test_python_api_prunes_with_gblm():
    model = make_tiny_model()
    report = stadebench.prune(model, make_windows(4, 16), "pruner-zero", "2:4")
    assert report.sparsity == 0.5 and report.gradients["seconds"] > 0 and "gradients" in report.timings


# --- the runner: one gradient pass per model, calibration and scale; a cache on disk --------


@pytest.fixture
def assets(tmp_path_factory):
    return shared_assets(tmp_path_factory)


@pytest.fixture
def passes(monkeypatch, tmp_path):
    """Every gradient pass the runner makes, by scale; a per-test cache."""
    import stadebench.runner.session as session

    monkeypatch.setenv("STADEBENCH_CACHE", str(tmp_path / "cache"))
    calls = []
    real = session.gradient_statistics

    def spy(*args, **kwargs):
        calls.append(kwargs["scale"])
        return real(*args, **kwargs)

    monkeypatch.setattr(session, "gradient_statistics", spy)
    return calls


METRICS = ["gblm", "pruner-zero", {"name": "gblm", "options": {"scale": 10}, "label": "gblm-10"}, "wanda"]


def _run(tmp_path, assets, name, **kwargs):
    from stadebench.runner.run import run_suite

    kwargs.setdefault("metrics", METRICS)
    kwargs.setdefault("patterns", ["unstructured", "2:4"])
    return run_suite(load_tiny_suite(tmp_path, assets, name=name, **kwargs))


def test_cells_of_a_model_share_one_pass_per_scale_and_the_disk_keeps_it(tmp_path, assets, passes):
    from stadebench.results.store import read

    first = _run(tmp_path, assets, "first")
    assert not first.failed and len(first.finished) == 9
    assert sorted(passes) == [10.0, 100.0] and first.seconds["gradients"] > 0
    entries = sorted((tmp_path / "cache" / "gradients").glob("*.safetensors"))
    assert len(entries) == 2 and not list((tmp_path / "cache" / "gradients").glob(".partial-*"))
    # a second suite (another leaderboard): read from disk, no pass; the same masks, so the same perplexities
    second = _run(tmp_path, assets, "second", leaderboard=tmp_path / "lb2")
    assert sorted(passes) == [10.0, 100.0] and second.seconds["gradients"] == 0
    values = [{(r["metric"], r["metric_options"], r["pattern"]): r["value"] for r in read(folder).to_pylist()
               if r["status"] == "ok"} for folder in (tmp_path / "lb", tmp_path / "lb2")]
    assert values[0] == values[1]


def test_a_damaged_entry_is_rebuilt_with_a_warning(tmp_path, assets, passes):
    _run(tmp_path, assets, "first", metrics=["gblm"])
    (entry,) = (tmp_path / "cache" / "gradients").glob("*.safetensors")
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
    with pytest.warns(UserWarning, match="gradient cache entry .* is damaged or stale .* computed again"):
        again = _run(tmp_path, assets, "again", metrics=["gblm"], leaderboard=tmp_path / "lb2")
    assert not again.failed and passes == [100.0, 100.0]
    assert entry.stat().st_size > 1000  # written anew, whole


def test_an_entry_for_other_windows_is_not_used(tmp_path, assets, passes):
    _run(tmp_path, assets, "first", metrics=["gblm"])
    text = {"name": "text", "options": {"path": str(assets["corpus"])}}
    _run(tmp_path, assets, "seed1", metrics=["gblm"], leaderboard=tmp_path / "lb2",
         calibration={"dataset": text, "n": 4, "seqlen": 16, "seed": 1, "batch_size": 2})
    assert passes == [100.0, 100.0]
    assert len(list((tmp_path / "cache" / "gradients").glob("*.safetensors"))) == 2


def test_a_cache_that_cannot_be_made_runs_without_caching(tmp_path, assets, passes, monkeypatch):
    (tmp_path / "not-a-folder").write_text("x")
    monkeypatch.setenv("STADEBENCH_CACHE", str(tmp_path / "not-a-folder" / "cache"))  # every mkdir fails
    with pytest.warns(UserWarning, match="caching is off") as caught:
        summary = _run(tmp_path, assets, "off", metrics=["gblm", "pruner-zero"])
    assert not summary.failed and passes == [100.0]
    assert len([w for w in caught if "caching is off" in str(w.message)]) == 1


def test_a_model_without_a_loss_fails_its_gradient_cells_only(tmp_path, assets, passes, monkeypatch):
    import stadebench.core.gradients as grads

    def no_head(model, what="gradient statistics"):
        raise ConfigError(f"{what} need the language-modelling loss, but TinyModel has no language-modelling head")

    monkeypatch.setattr(grads, "check_language_model", no_head)
    summary = _run(tmp_path, assets, "nohead", metrics=["gblm", "pruner-zero", "wanda"], patterns=["unstructured"])
    failed = dict(summary.failed)
    assert set(failed) == {"gblm · unstructured · 0.5", "pruner-zero · unstructured · 0.5"}
    assert all("no language-modelling head" in why for why in failed.values())
    assert "wanda · unstructured · 0.5" in summary.finished


def test_cli_validate_names_a_bad_tree(tmp_path, assets):
    from typer.testing import CliRunner

    from stadebench.cli import app

    from tinymodel import suite_dict, write_suite

    suite = suite_dict(assets, metrics=[{"name": "pruner-zero", "options": {"tree": {"data": "sin",
                                                                                      "left": {"data": "W"}}}}])
    path = write_suite(tmp_path / "bad.yaml", suite)
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert "metrics[0].options" in result.output and "'sin', not in the released grammar" in result.output
    assert not Path(tmp_path / "leaderboard").exists()


def test_diagnostics_do_not_rescore_gradient_metrics():
    with pytest.raises(ConfigError, match="metric 'gblm' in metrics reads gradients"):
        stadebench.plugins.resolve_plugin("evaluator", "diagnostics", {"metrics": ["wanda", "gblm"]})


def _entry(tmp_path, monkeypatch):
    from stadebench.runner import gradients as cache

    monkeypatch.setenv("STADEBENCH_CACHE", str(tmp_path / "cache"))
    windows = make_windows(2, 16)
    stats = gradient_statistics(make_tiny_model(), windows)
    key = cache.entry_key("{}", {"revision": "r", "fingerprint": None}, windows, 100.0, "float64",
                          torch.device("cpu"))
    return cache, key, stats, {name: tuple(l1.shape) for name, (l1, _) in stats.layers.items()}


def test_a_write_interrupted_midway_leaves_no_entry(tmp_path, monkeypatch):
    import safetensors.torch

    cache, key, stats, shapes = _entry(tmp_path, monkeypatch)

    def killed(tensors, path, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        cache.store(key, stats)
    assert list((tmp_path / "cache" / "gradients").iterdir()) == []
    assert cache.load(key, shapes) is None


def test_what_a_killed_writer_left_is_removed_by_the_next(tmp_path, monkeypatch):
    import subprocess
    import sys

    cache, key, stats, shapes = _entry(tmp_path, monkeypatch)
    folder = tmp_path / "cache" / "gradients"
    folder.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = folder / f"{cache._PARTIAL}{cache._HOST}-{dead}-x.safetensors"
    alive = folder / f"{cache._PARTIAL}{cache._HOST}-{os.getpid()}-y.safetensors"
    elsewhere = folder / f"{cache._PARTIAL}otherhost-{dead}-z.safetensors"
    for path in (stale, alive, elsewhere):
        path.write_bytes(b"partial")
    assert cache.load(key, shapes) is None  # a partial file is never read as the entry
    cache.store(key, stats)
    assert not stale.exists() and alive.exists() and elsewhere.exists()
    again = cache.load(key, shapes)
    assert again.cached and all(torch.equal(again.layers[k][1], v[1]) for k, v in stats.layers.items())


def test_an_entry_written_for_another_key_is_removed_and_not_used(tmp_path, monkeypatch):
    cache, key, stats, shapes = _entry(tmp_path, monkeypatch)
    cache.store(key, stats)
    other = key.replace('"scale":100.0', '"scale":10.0')
    assert other != key
    cache._path(key).rename(cache._path(other))  # a file under another entry's name: e.g. copied by hand
    with pytest.warns(UserWarning, match="written for another model or calibration"):
        assert cache.load(other, shapes) is None
    assert not cache._path(other).exists()
