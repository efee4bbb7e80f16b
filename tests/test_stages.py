"""Pruning as stages (metric → refiner → reconstructor): the engine applies and checks them,
suites cross them as grid axes, results key and label them, comparisons set them side by side.

The stages here are small but real: a refiner that swaps, in each row, the largest pruned
weight with the smallest kept one, and a least-squares reconstructor of each row's kept
weights from the Gram matrix.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from stadebench import hookimpl
from stadebench.base import Reconstruction, Reconstructor, Refiner
from stadebench.core import engine
from stadebench.core.stages import Stages
from stadebench.errors import ConfigError, PluginError
from stadebench.plugins import get_plugins, reset_plugins, resolve_plugin
from stadebench.testing import ReconstructorConformance, RefinerConformance
from conftest import make_tiny


class SwapOne(Refiner):
    """Swap, in each row, the largest-|w| pruned weight with the smallest-|w| kept one."""

    name = "swap-one"

    def supports(self, pattern):
        return "it moves weights across a whole row" if pattern.group_size else None

    def refine(self, weight, mask, stats, pattern, sparsity):
        mask = mask.clone()
        size = weight.abs()
        for row in range(mask.shape[0]):
            pruned, kept = mask[row].nonzero().flatten(), (~mask[row]).nonzero().flatten()
            if len(pruned) and len(kept):
                mask[row, pruned[size[row, pruned].argmax()]] = False
                mask[row, kept[size[row, kept].argmin()]] = True
        return mask


class LeastSquares(Reconstructor):
    """Each row's kept weights re-fitted to the dense row's outputs on the calibration inputs."""

    name = "least-squares"
    statistics = frozenset({"gram"})

    def memory_bytes(self, rows, columns):
        return 4 * columns * columns

    def reconstruct(self, weight, mask, stats):
        gram = stats.gram.double()
        gram = gram + 1e-4 * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
        new = torch.zeros_like(weight, dtype=torch.float64)
        for row in range(weight.shape[0]):
            keep = ~mask[row]
            target = gram[keep] @ weight[row].double()
            new[row, keep] = torch.linalg.solve(gram[keep][:, keep], target)
        return Reconstruction(new.float(), details={"fitted": True})


class MaskOnly(Reconstructor):
    """Keeps the dense weights (the engine zeroes the pruned ones); reads the Gram matrix, so
    the engine measures each layer's output error."""

    name = "mask-only"
    statistics = frozenset({"gram"})

    def reconstruct(self, weight, mask, stats):
        return Reconstruction()


class Hungry(Reconstructor):
    """Says it needs a petabyte per layer."""

    name = "hungry"

    def memory_bytes(self, rows, columns):
        return 1 << 50

    def reconstruct(self, weight, mask, stats):
        return Reconstruction()


class CountChanger(Refiner):
    """Broken: revives every pruned weight of row 0."""

    name = "count-changer"

    def refine(self, weight, mask, stats, pattern, sparsity):
        mask = mask.clone()
        mask[0] = False
        return mask


@hookimpl
def register_refiners(register):
    register(SwapOne)
    register(CountChanger)


@hookimpl
def register_reconstructors(register):
    register(LeastSquares)
    register(MaskOnly)
    register(Hungry)


@pytest.fixture
def plugins():
    reset_plugins()
    get_plugins().register(sys.modules[__name__], name="test-stages")
    yield get_plugins()
    reset_plugins()


def windows(n=8, seqlen=16, seed=0):
    return torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def prune(model, metric, stages=None, sequential=True, **kwargs):
    return engine.prune(model, windows(), resolve_plugin("metric", metric), resolve_plugin("pattern", "unstructured"),
                        0.5, calibration=engine.Calibration(batch_size=4, sequential=sequential), stages=stages,
                        **kwargs)


def test_a_refiner_moves_pruned_weights_and_keeps_the_counts(plugins):
    plain, refined = make_tiny(), make_tiny()
    prune(plain, "wanda")
    report = prune(refined, "wanda", Stages(SwapOne()))
    for (name, a), b in zip(plain.named_parameters(), refined.parameters()):
        if "layers" in name and a.ndim == 2:
            assert torch.equal((a == 0).sum(1), (b == 0).sum(1)) and not torch.equal(a == 0, b == 0)
    assert report.stages["refine"]["name"] == "swap-one" and report.stages["seconds"]["refine"] > 0
    assert all(layer.details.get("refined") for layer in report.layers if not layer.dense)


def test_a_reconstructor_lowers_each_layers_error_and_keeps_the_mask(plugins):
    plain, rebuilt = make_tiny(), make_tiny()
    # one-shot: every block sees dense inputs, so wanda picks the same masks in both
    before = prune(plain, "wanda", Stages(reconstructor=MaskOnly()), sequential=False)
    after = prune(rebuilt, "wanda", Stages(reconstructor=LeastSquares()), sequential=False)
    for p, r in zip(plain.parameters(), rebuilt.parameters()):
        assert p.ndim < 2 or torch.equal(p == 0, r == 0)
    # every layer's output error on the calibration inputs drops (exact, from the Gram matrix)
    errors = [(a.output_mse, b.output_mse) for a, b in zip(after.layers, before.layers)]
    assert all(a < b for a, b in errors) and len(errors) == 14
    assert sum(b.mse for b in after.blocks) < sum(b.mse for b in before.blocks)
    # sequential: the next block is pruned on the reconstructed block's outputs
    sequential = make_tiny()
    prune(sequential, "wanda", Stages(reconstructor=LeastSquares()))
    second = [(n, p) for n, p in sequential.named_parameters() if "layers.1." in n and p.ndim == 2]
    assert any(not torch.equal(p == 0, dict(rebuilt.named_parameters())[n] == 0) for n, p in second)


def test_a_data_free_metric_with_a_data_reading_stage_runs_the_calibrated_protocol(plugins):
    report = prune(make_tiny(), "magnitude", Stages(reconstructor=LeastSquares()))
    assert report.block_passes == 4 and report.n == 8  # statistics and pruned passes of 2 blocks
    report = prune(make_tiny(), "magnitude", Stages(SwapOne()))
    assert report.block_passes == 0  # the refiner reads nothing: no pass


def test_the_host_refuses_a_refiner_that_changes_counts(plugins):
    with pytest.raises(PluginError, match="refiner 'count-changer' changed how many weights are pruned in a row"):
        prune(make_tiny(), "wanda", Stages(CountChanger()))


def test_a_reconstructor_replaces_a_metrics_bias_correction(plugins):
    def biases(model):
        return {n: p.detach().clone() for n, p in model.named_parameters() if "layers" in n and n.endswith("bias")
                and "norm" not in n}

    dense = biases(make_tiny("opt"))  # OPT's linears have biases
    stade, rebuilt = make_tiny("opt"), make_tiny("opt")
    prune(stade, "stade")  # bias_correction: its mean-compensating bias deltas
    report = prune(rebuilt, "stade", Stages(reconstructor=LeastSquares()))
    assert any(not torch.equal(b, dense[n]) for n, b in biases(stade).items())
    assert all(torch.equal(b, dense[n]) for n, b in biases(rebuilt).items())  # the reconstructor gave none
    assert all(layer.details.get("fitted") for layer in report.layers if not layer.dense)


# --- suites, keys, labels --------------------------------------------------------------


def test_suites_cross_stages_as_axes(plugins, tmp_path):
    from stadebench import suite as S
    from stadebench.runner.plan import plan
    from stadebench.data.loading import ModelIdentity

    s = S.validate_suite({"models": ["m"], "metrics": ["magnitude", {"name": "wanda", "reconstruct": ["none"]}],
                          "patterns": ["unstructured"], "sparsities": [0.5], "refine": ["none", "swap-one"],
                          "reconstruct": ["none", {"name": "least-squares", "label": "ls"}],
                          "exclude": [{"metric": "magnitude", "refine": "swap-one", "reconstruct": "none"}]},
                         source="t.yaml")
    labels = [c.label for c in S.expand(s)]
    assert labels == ["dense", "magnitude · unstructured · 0.5", "magnitude → ls · unstructured · 0.5",
                      "magnitude → swap-one → ls · unstructured · 0.5", "wanda · unstructured · 0.5",
                      "wanda → swap-one · unstructured · 0.5"]
    cells = S.expand(s)
    assert cells[2].uses_data and not cells[1].uses_data  # least-squares reads the Gram matrix
    rows = [p.template for c in plan(s, {m: ModelIdentity("hub", "0" * 40, None, None, None) for m in s.models},
                                     fingerprints=lambda spec: "f").todo for p in c.pending]
    assert len({r.key() for r in rows}) == len(rows) == 6
    ls = next(r for r in rows if r.reconstruct == "least-squares")
    assert (ls.reconstruct_version, ls.reconstruct_plugin, ls.reconstruct_options) == ("1", "test-stages", None)
    assert ls.calib_n is not None and rows[1].refine is None and rows[1].calib_n is None
    assert [c.label for c in S.select(cells, ["refine=none", "reconstruct=ls"])] == [
        "magnitude → ls · unstructured · 0.5"]


@pytest.mark.parametrize("fields, message", [
    ({"refine": ["swap-one"], "patterns": ["2:4"]}, "refiner 'swap-one' cannot refine pattern '2:4': it moves"),
    ({"refine": ["swapone"]}, "did you mean 'swap-one'"),
    ({"reconstruct": [{"name": "none", "options": {"a": 1}}]}, "`none` means no reconstructor"),
    ({"reconstruct": ["least-squares", "least-squares"]}, "is already reconstruct[0]"),
    ({"exclude": [{"refine": "nope"}]}, "'nope' matches no refine of this suite"),
])
def test_bad_stage_entries_are_refused(plugins, fields, message):
    from stadebench import suite as S

    data = {"models": ["m"], "metrics": ["wanda"], "patterns": ["unstructured"], "sparsities": [0.5], **fields}
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        S.validate_suite(data, source="t.yaml")


def test_a_suite_runs_stages_and_compares_them(plugins, tmp_path, tmp_path_factory, monkeypatch):
    from typer.testing import CliRunner

    from stadebench.cli import app
    from stadebench.results.store import read
    from stadebench.runner.run import run_suite
    from tinymodel import load_tiny_suite, shared_assets

    monkeypatch.setenv("STADEBENCH_LOAD_PLUGINS", "")
    assets = shared_assets(tmp_path_factory)
    suite = load_tiny_suite(tmp_path, assets, metrics=["wanda"], reconstruct=["none", "least-squares"])
    assert not run_suite(suite).failed
    rows = {r["reconstruct"]: r for r in read(tmp_path / "lb").to_pylist() if r["metric"] == "wanda"}
    assert set(rows) == {None, "least-squares"}
    details = json.loads(rows["least-squares"]["details"])["prune"]
    assert details["stages"]["reconstruct"]["name"] == "least-squares"
    r = CliRunner().invoke(app, ["leaderboard", "compare", "none", "least-squares", "--by", "reconstruct", "--dir",
                                 str(tmp_path / "lb"), "--format", "json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    (row,) = json.loads(r.stdout)
    assert row["metric"] == "wanda" and row["delta"] == rows["least-squares"]["value"] - rows[None]["value"]
    compare = ["leaderboard", "compare", "none", "least-squares", "--by", "reconstruct", "--dir", str(tmp_path / "lb")]
    r = CliRunner().invoke(app, [*compare, "--metric", "wanda", "--sparsity", "0.5", "--refine", "none", "--format",
                                 "json"], catch_exceptions=False)
    assert r.exit_code == 0 and [x["metric"] for x in json.loads(r.stdout)] == ["wanda"], r.output
    r = CliRunner().invoke(app, [*compare, "--sparsity", "0.7"], catch_exceptions=False)
    assert r.exit_code == 2 and "share no cells to compare" in r.stderr and "--sparsity 0.7" in r.stderr
    r = CliRunner().invoke(app, [*compare, "--reconstruct", "none"], catch_exceptions=False)
    assert r.exit_code == 2 and "--reconstruct filters what --by reconstruct compares" in r.stderr
    r = CliRunner().invoke(app, ["leaderboard", "--dir", str(tmp_path / "lb"), "--reconstruct", "least-squares",
                                 "--format", "markdown"], catch_exceptions=False)
    assert "wanda → least-squares" in r.stdout and "| wanda |" not in r.stdout
    _check_the_report_draws_stages(tmp_path, list(rows.values()))


def _check_the_report_draws_stages(tmp_path, rows):
    """The report's by-stage figure: a bar per cell at its leaderboard value, grouped by
    metric, and `--png` copies it (not the sweep)."""
    from stadebench.report import build_report, figures
    from test_report import page_data

    index = build_report(tmp_path / "lb", tmp_path / "report", png=tmp_path / "stages.png")
    (spec,) = [f for f in page_data(index.read_text(encoding="utf-8"))["figures"] if f["kind"] == "stages"]
    assert spec["metrics"] == ["wanda"] and spec["reconstructors"] == ["none", "least-squares"]
    (panel,) = spec["panels"]
    assert panel["title"] == "unstructured 0.5"
    by_cell = {r["cell_key"]: r for r in rows}
    assert {b["cell_key"]: b["y"] for b in panel["bars"]} == {k: r["value"] for k, r in by_cell.items()}
    assert [(b["reconstruct"], round(b["x"], 9)) for b in panel["bars"]] == [("none", 0.05), ("least-squares", 0.15)]
    fig = figures.draw(spec)
    heights = sorted(p.get_height() for p in fig.axes[0].patches)
    assert heights == sorted(r["value"] for r in rows)
    assert (tmp_path / "stages.png").read_bytes() == (tmp_path / "report" / "figures" /
                                                      f"{spec['slug']}.png").read_bytes()


def test_validate_refuses_a_reconstructor_too_large_for_memory(plugins, tmp_path, tmp_path_factory):
    from stadebench.runner.run import check_suite
    from tinymodel import load_tiny_suite, shared_assets

    suite = load_tiny_suite(tmp_path, shared_assets(tmp_path_factory), metrics=["wanda"],
                            reconstruct=["none", "least-squares", "hungry"])
    with pytest.raises(ConfigError, match=r"reconstruct 'hungry' needs about 1048576\.0 GiB for layer .*"
                                          r"\(exclude: \[\{reconstruct: hungry\}\]\)"):
        check_suite(suite)
    check_suite(load_tiny_suite(tmp_path, shared_assets(tmp_path_factory), metrics=["wanda"],
                                reconstruct=["least-squares"]))


@pytest.mark.parametrize("accumulate", ["float64", "released"])
def test_the_within_window_variance_statistic(accumulate):
    from stadebench.base import LayerInfo
    from stadebench.core.statistics import ACCUMULATORS

    x = torch.randn(6, 10, 4, generator=torch.Generator().manual_seed(0)) * torch.tensor([1.0, 2.0, 0.5, 3.0])
    x = x + torch.arange(6.0).reshape(6, 1, 1)  # windows with different means: within-window < overall spread
    acc = ACCUMULATORS[accumulate](frozenset({"window_var"}))
    for batch in x.split(4):  # batches of windows, as the engine feeds them
        acc.add(batch)
    stats = acc.stats(LayerInfo("l", 0, "l"))
    expected = torch.stack([w.var(0, unbiased=False) * len(w) for w in x.double()]).sum(0)
    torch.testing.assert_close(stats.window_m2, expected)
    torch.testing.assert_close(stats.window_var, (expected / 60).float())
    assert (stats.window_var < x.reshape(-1, 4).var(0)).all()


# --- the built-in stages pass the conformance kit ------------------------------------


class TestDSnoTConformance(RefinerConformance):
    refiner = "dsnot"
    options = {"skip_layer": "no_skip", "max_cycles": 8}


class TestMeanBiasConformance(ReconstructorConformance):
    reconstructor = "mean-bias"


class TestOBSConformance(ReconstructorConformance):
    reconstructor = "obs"
    options = {"blocksize": 16}


class TestADMMConformance(ReconstructorConformance):
    reconstructor = "admm"
    options = {"iterations": 5}


def test_built_in_stages_through_the_engine(plugins):
    """stade → mean-bias is stade with its bias correction; wanda → obs has wanda's mask and
    sparsegpt's update for it; admm lowers every layer's error; each on the tiny Llama."""
    stade = make_tiny("opt")
    prune(stade, "stade", sequential=False)
    staged = make_tiny("opt")
    prune(staged, "stade", Stages(reconstructor=resolve_plugin("reconstructor", "mean-bias")), sequential=False)
    for a, b in zip(stade.parameters(), staged.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    plain, obs, admm = make_tiny(), make_tiny(), make_tiny()
    base = prune(plain, "wanda", Stages(reconstructor=MaskOnly()), sequential=False)
    for model, name in ((obs, "obs"), (admm, "admm")):
        report = prune(model, "wanda", Stages(reconstructor=resolve_plugin("reconstructor", name)), sequential=False)
        for p, q in zip(plain.parameters(), model.parameters()):
            assert p.ndim < 2 or torch.equal(p == 0, (q == 0) | (p == 0))
        assert all(a.output_mse < b.output_mse for a, b in zip(report.layers, base.layers)), name


def test_a_single_stage_may_be_written_bare(plugins):
    from stadebench import suite as S

    s = S.validate_suite({"models": ["m"], "metrics": [{"name": "wanda", "reconstruct": "least-squares"}],
                          "patterns": ["unstructured"], "sparsities": [0.5], "refine": "swap-one"}, source="t.yaml")
    assert [c.label for c in S.expand(s)] == ["dense", "wanda → swap-one → least-squares · unstructured · 0.5"]


def test_the_public_prune_takes_stages_by_name(plugins):
    """`stadebench.prune(refine=..., reconstruct=...)` is the engine with those stages: the
    same weights, the stages in the report, a data-free metric then needing windows, and a
    pattern the refiner cannot keep refused before anything changes."""
    import stadebench

    by_engine, by_api = make_tiny(), make_tiny()
    prune(by_engine, "magnitude", Stages(resolve_plugin("refiner", "swap-one"),
                                         resolve_plugin("reconstructor", "least-squares")))
    report = stadebench.prune(by_api, windows(), "magnitude", "unstructured", 0.5, batch_size=4, refine="swap-one",
                              reconstruct="least-squares")
    for a, b in zip(by_engine.parameters(), by_api.parameters()):
        assert torch.equal(a, b)
    assert report.to_dict()["stages"]["refine"]["name"] == "swap-one"
    assert report.to_dict()["stages"]["reconstruct"]["name"] == "least-squares"
    with pytest.raises(ConfigError, match="needs calibration windows"):
        stadebench.prune(make_tiny(), None, "magnitude", reconstruct="least-squares")
    untouched = make_tiny()
    before = [p.clone() for p in untouched.parameters()]
    with pytest.raises(ConfigError, match="refiner 'swap-one' cannot refine pattern '2:4': it moves weights"):
        stadebench.prune(untouched, windows(), "wanda", "2:4", refine="swap-one")
    assert all(torch.equal(a, b) for a, b in zip(before, untouched.parameters()))
    with pytest.raises(ConfigError, match="refine options go with a refiner name"):
        stadebench.prune(make_tiny(), windows(), "wanda", refine=SwapOne(), refine_options={"x": 1})
    shared = stadebench.collect_statistics(make_tiny(), windows(), metrics=["wanda"], batch_size=4)
    with pytest.raises(ConfigError, match=r"metric 'wanda' with its stages needs statistics \['gram'\]"):
        stadebench.prune(make_tiny(), None, "wanda", sequential=False, statistics=shared, reconstruct="least-squares")


def test_the_stage_figure_tells_option_sets_of_a_stage_apart():
    from stadebench.report import figures, series

    def row(refine=None, reconstruct=None, refine_options=None):
        return {"refine": refine, "refine_options": refine_options, "reconstruct": reconstruct,
                "reconstruct_options": None if reconstruct is None else "{}"}

    # labels as grid.pivot writes them: method, then allocation and varied knobs, space-joined
    both = row("dsnot", "admm", '{"skip_layer": "no_skip"}')
    assert series._split_stages("stade (bias_correction=false) → dsnot (skip_layer=no_skip) → admm seed=1", both) \
        == ("stade (bias_correction=false) seed=1", "dsnot (skip_layer=no_skip)", "admm")
    assert series._split_stages("wanda → admm · owl", row(reconstruct="admm")) == ("wanda · owl", "none", "admm")
    assert series._split_stages("wanda → dsnot", row(refine="dsnot", refine_options="{}")) == ("wanda", "dsnot",
                                                                                              "none")
    bars = [{"metric": "wanda", "refine": r, "reconstruct": "none", "x": x, "y": y}
            for r, x, y in (("none", 0.05, 30.0), ("dsnot", 0.15, 33.0), ("dsnot (skip_layer=no_skip)", 0.25, 36.0))]
    spec = {"kind": "stages", "title": "t", "score": "ppl", "higher_is_better": False, "log_y": False,
            "metrics": ["wanda"], "ticks": [0.15], "width": 0.1, "refiners": [b["refine"] for b in bars],
            "reconstructors": ["none"], "panels": [{"title": "unstructured 0.5", "bars": bars}], "dense": []}
    fig = figures.draw(spec)
    hatches = [p.get_hatch() or "" for p in fig.axes[0].patches]
    assert len(set(hatches)) == 3 and [p.get_height() for p in fig.axes[0].patches] == [30.0, 33.0, 36.0]
