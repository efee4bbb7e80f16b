"""The conformance kit (stadebench.testing): every built-in metric, pattern and allocator
and the docs' example refiner and reconstructor pass it, and deliberately broken plugins
fail it with the broken rule named in the output."""

from __future__ import annotations

import importlib.util
import re
import textwrap
from pathlib import Path

import pytest

from stadebench.testing import (RULES, AllocatorConformance, MetricConformance, PatternConformance,
                                ReconstructorConformance, RefinerConformance)

pytest_plugins = ["pytester"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: on a shared CPU a second torch thread slows them down, never up."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

# --- the built-ins pass ----------------------------------------------------------


class TestMagnitude(MetricConformance):
    metric = "magnitude"


class TestRandom(MetricConformance):
    metric = "random"
    options = {"seed": 3}


class TestWanda(MetricConformance):
    metric = "wanda"


class TestStade(MetricConformance):
    metric = "stade"


class TestStadeReleased(MetricConformance):
    metric = "stade"
    options = {"bias_correction": False}


class TestStadeW(MetricConformance):
    metric = "stade-w"


class TestSparseGPT(MetricConformance):
    metric = "sparsegpt"


class TestSparseGPTOddSparsities(MetricConformance):
    """Sparsities whose per-block share is not whole: the layer still prunes the pattern's count."""

    metric = "sparsegpt"
    options = {"blocksize": 24}
    patterns = ("unstructured", "unstructured-layer")
    sparsities = (0.3, 0.6, 0.7)


class TestSparseGPTNoUpdate(MetricConformance):
    metric = "sparsegpt"
    options = {"update": False, "blocksize": 16}
    patterns = ("unstructured", "2:4")
    sparsities = (0.5,)


class TestGblm(MetricConformance):
    metric = "gblm"


class TestGblmInverseL1(MetricConformance):
    metric = "gblm"
    options = {"inverse": True, "gradient": "l1"}


class TestGblmGradientAlone(MetricConformance):
    metric = "gblm"
    options = {"wanda": False, "scale": 10}


class TestPrunerZero(MetricConformance):
    metric = "pruner-zero"


class TestPrunerZeroWithX(MetricConformance):
    metric = "pruner-zero"
    options = {"tree": {"data": "add", "left": {"data": "mul", "left": {"data": "W"}, "right": {"data": "X"}},
                        "right": {"data": "div", "left": {"data": "W"}, "right": {"data": "G"}}}}


class TestUnstructured(PatternConformance):
    pattern = "unstructured"


class TestUnstructuredLayer(PatternConformance):
    pattern = "unstructured-layer"


class Test2of4(PatternConformance):
    pattern = "2:4"


class Test4of8(PatternConformance):
    pattern = "4:8"


class Test1of4(PatternConformance):
    pattern = "1:4"


class TestUniform(AllocatorConformance):
    allocator = "uniform"


class TestOWL(AllocatorConformance):
    allocator = "owl"


class TestOWLWide(AllocatorConformance):
    allocator = "owl"
    options = {"M": 3, "lambda": 0.2}
    sparsities = (0.3, 0.85)  # 0.85 + 0.2 leaves [0, 1): refused with a ConfigError, not served


def _example(name: str):
    """A docs example module (docs/examples/<name>.py), imported from its file."""
    spec = importlib.util.spec_from_file_location(f"stadebench_docs_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
_REFINER_EXAMPLE = _example("refiner_plugin")
_RECONSTRUCTOR_EXAMPLE = _example("reconstructor_plugin")


class TestSwapRefiner(RefinerConformance):
    """docs/examples/refiner_plugin.py: a real refinement (it swaps) passes every rule."""

    refiner = "swap"
    options = {"swaps": 3}
    plugin = _REFINER_EXAMPLE


class TestRefitReconstructor(ReconstructorConformance):
    """docs/examples/reconstructor_plugin.py: a least-squares re-fit passes every rule."""

    reconstructor = "refit"
    plugin = _RECONSTRUCTOR_EXAMPLE


SUITES = (MetricConformance, PatternConformance, AllocatorConformance, RefinerConformance, ReconstructorConformance)


def test_every_rule_has_a_check():
    checks = {name[len("test_"):].replace("_", "-") for cls in SUITES for name in dir(cls) if name.startswith("test_")}
    assert checks == set(RULES)


def test_the_swap_refiner_refines():
    """The example refiner under test changes masks (a refiner that returns its input passes trivially)."""
    import torch

    from stadebench.plugins import resolve_plugin
    from stadebench.testing import layer_inputs

    weight, stats = layer_inputs(statistics={"sumsq"})
    pattern = resolve_plugin("pattern", "2:4")
    mask = pattern.select(weight.abs(), 0.5)
    refined = _REFINER_EXAMPLE.Swap({"swaps": 3}).refine(weight, mask, stats, pattern, 0.5)
    assert not torch.equal(refined, mask)


# --- broken plugins fail, naming the rule ----------------------------------------

HEADER = '''
import pydantic
import torch

import stadebench
from stadebench.testing import (AllocatorConformance, MetricConformance, PatternConformance,
                                ReconstructorConformance, RefinerConformance)


class Plugin:
    """Registers the class under test (the kit registers this object for the test class)."""

    def __init__(self, kind, cls):
        self.kind, self.cls = kind, cls

    @stadebench.hookimpl
    def register_metrics(self, register):
        if self.kind == "metric":
            register(self.cls)

    @stadebench.hookimpl
    def register_patterns(self, register):
        if self.kind == "pattern":
            register(self.cls)

    @stadebench.hookimpl
    def register_allocators(self, register):
        if self.kind == "allocator":
            register(self.cls)

    @stadebench.hookimpl
    def register_refiners(self, register):
        if self.kind == "refiner":
            register(self.cls)

    @stadebench.hookimpl
    def register_reconstructors(self, register):
        if self.kind == "reconstructor":
            register(self.cls)
'''

BROKEN_METRICS = {
    "score-shape": '''
        def score(self, weight, stats):
            return (weight.abs() * stats.norm).t().contiguous()   # transposed
    ''',
    "score-deterministic": '''
        def score(self, weight, stats):
            return weight.abs() * stats.norm * (1 + 0.01 * torch.rand(weight.shape))   # global RNG
    ''',
    "no-mutation": '''
        def score(self, weight, stats):
            weight.abs_()                  # in place: the engine passes the layer's own storage
            return weight * stats.norm
    ''',
    "statistics-unrequested": '''
        def score(self, weight, stats):
            return weight.abs() * (stats.norm - stats.mean.abs())   # mean needs "sum", not declared
    ''',
    "options-unknown-key": '''
        class Options(pydantic.BaseModel):   # not stadebench.Options: extra keys are ignored
            alpha: float = 1.0

        def score(self, weight, stats):
            return weight.abs() * stats.norm
    ''',
    "update-mask": '''
        def score(self, weight, stats):
            return weight.abs() * stats.norm

        def prune_layer(self, weight, stats, pattern, sparsity):
            result = super().prune_layer(weight, stats, pattern, sparsity)
            return stadebench.LayerResult(result.mask, weight.clone())   # "restores" the pruned weights
    ''',
}

BROKEN_PATTERNS = {
    "exact-count": '''
        def select(self, scores, sparsity):   # rounds up instead of down
            k = -(-scores.shape[-1] * sparsity // 1)
            order = torch.argsort(scores, dim=-1, stable=True)
            return torch.zeros_like(scores, dtype=torch.bool).scatter(-1, order[:, : int(k)], True)
    ''',
    "ties-deterministic": '''
        def select(self, scores, sparsity):   # breaks ties at random, with the global RNG
            noisy = scores + 1e-6 * torch.rand(scores.shape)
            k = int(scores.shape[-1] * sparsity)
            order = torch.argsort(noisy, dim=-1, stable=True)
            return torch.zeros_like(scores, dtype=torch.bool).scatter(-1, order[:, :k], True)
    ''',
}

BROKEN_PATTERNS["scores-used"] = '''
        def select(self, scores, sparsity):   # prunes the first columns, whatever the scores
            k = int(scores.shape[-1] * sparsity)
            mask = torch.zeros_like(scores, dtype=torch.bool)
            mask[:, :k] = True
            return mask
    '''
BROKEN_PATTERNS["allocated-sparsity"] = '''
        def __init__(self, options=None):
            super().__init__(options)
            self.first = None

        def select(self, scores, sparsity):   # keeps the first sparsity it saw: one count for every layer
            self.first = sparsity if self.first is None else self.first
            k = int(scores.shape[-1] * self.first)
            order = torch.argsort(scores, dim=-1, stable=True)
            return torch.zeros_like(scores, dtype=torch.bool).scatter(-1, order[:, :k], True)
    '''

BROKEN_ALLOCATORS = {
    "allocation-mean": '''
        def allocate(self, layers, sparsity):   # deeper layers pruned harder, never rebalanced
            return [min(sparsity + 0.01 * entry.layer.block, 0.99) for entry in layers]
    ''',
    "allocation-range": '''
        def allocate(self, layers, sparsity):   # the first half at 0, the rest above the target, even past 1
            half = len(layers) // 2
            return [0.0] * half + [2 * sparsity] * (len(layers) - half)
    ''',
    "allocation-length": '''
        def allocate(self, layers, sparsity):   # one per block, not per layer
            return [sparsity] * len({entry.layer.block for entry in layers})
    ''',
    "allocation-deterministic": '''
        def allocate(self, layers, sparsity):   # jitter from the global RNG
            jitter = torch.rand(len(layers)) * 1e-3
            return [sparsity + float(j - jitter.mean()) for j in jitter]
    ''',
    "statistics-unrequested": '''
        def allocate(self, layers, sparsity):   # reads sum, declares only sumsq
            return [sparsity + 0.0 * float(entry.stats.mean.sum()) for entry in layers]
    ''',
    "uniform-declared": '''
        uniform = True

        def allocate(self, layers, sparsity):   # claims uniform, alternates
            return [sparsity + (0.05 if i % 2 else -0.05) for i in range(len(layers))]
    ''',
}


BROKEN_REFINERS = {
    "refine-count": '''
        def refine(self, weight, mask, stats, pattern, sparsity):   # revives the first pruned weight of each row
            out = mask.clone()
            out[torch.arange(out.shape[0]), out.int().argmax(1)] = False
            return out
    ''',
    "refine-pattern": '''
        def refine(self, weight, mask, stats, pattern, sparsity):   # keeps each row's count, not each group's
            return mask.roll(1, dims=1)
    ''',
    "no-mutation": '''
        def refine(self, weight, mask, stats, pattern, sparsity):   # in place: the metric's mask changes
            return mask.copy_(mask.flip(1))
    ''',
    "statistics-unrequested": '''
        def refine(self, weight, mask, stats, pattern, sparsity):   # reads the mean ("sum"), declares only sumsq
            saliency = weight.abs() * (stats.norm + stats.mean.abs())
            return mask.clone() if saliency.numel() else mask
    ''',
}

BROKEN_RECONSTRUCTORS = {
    "reconstruct-mask": '''
        def reconstruct(self, weight, mask, stats):   # the dense weight: every pruned weight revived
            return stadebench.Reconstruction(weight.clone())
    ''',
    "reconstruct-shape": '''
        def reconstruct(self, weight, mask, stats):   # transposed
            return stadebench.Reconstruction(weight.masked_fill(mask, 0).t().contiguous())
    ''',
    "reconstruct-finite": '''
        def reconstruct(self, weight, mask, stats):   # scales by 1 / an input's energy: Inf for an input always 0
            energy = stats.gram.diagonal()
            return stadebench.Reconstruction((weight * (energy.mean() / energy)).masked_fill(mask, 0))
    ''',
    "no-mutation": '''
        def reconstruct(self, weight, mask, stats):   # in place: the layer's own storage
            return stadebench.Reconstruction(weight.masked_fill_(mask, 0))
    ''',
    "memory-estimate": '''
        def memory_bytes(self, rows, columns):   # a float
            return 4.0 * rows * columns

        def reconstruct(self, weight, mask, stats):
            return stadebench.Reconstruction(weight.masked_fill(mask, 0))
    ''',
    "stage-deterministic": '''
        def reconstruct(self, weight, mask, stats):   # jitter from the global RNG
            return stadebench.Reconstruction((weight + 1e-6 * torch.randn(weight.shape)).masked_fill(mask, 0))
    ''',
}


def stage_file(kind: str, name: str, body: str, statistics: str) -> str:
    """A refiner or reconstructor under test and its suite, as a plugin author writes them."""
    base, suite = ("Refiner", "RefinerConformance") if kind == "refiner" else ("Reconstructor",
                                                                             "ReconstructorConformance")
    return HEADER + f'''

class UnderTest(stadebench.{base}):
    """A {kind} under test."""

    name = "{name}"
    statistics = frozenset({{"{statistics}"}})

{_class_body(body)}


class TestIt({suite}):
    {kind} = "{name}"
    plugin = Plugin("{kind}", UnderTest)
'''


def allocator_file(name: str, body: str) -> str:
    return HEADER + f'''

class UnderTest(stadebench.Allocator):
    """An allocator under test."""

    name = "{name}"
    statistics = frozenset({{"sumsq"}})

{_class_body(body)}


class TestIt(AllocatorConformance):
    allocator = "{name}"
    plugin = Plugin("allocator", UnderTest)
'''


GOOD_METRIC = '''
    def score(self, weight, stats):
        return weight.square() * stats.sumsq.float()
'''


# Inner runs load no installed pytest plugin (hypothesis' and pytest-benchmark's cost seconds
# per in-process run), so the kit is loaded by hand, as before its `pytest11` entry point.
INNER_ARGS = ["-p", "stadebench.testing", "-p", "no:cacheprovider", "-q", "-rf",
              "-W", "ignore::pytest.PytestAssertRewriteWarning"]


@pytest.fixture(autouse=True)
def _no_autoload(monkeypatch):
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv("COLUMNS", "1000")  # one summary line per failure, untruncated


def _class_body(body: str) -> str:
    return textwrap.indent(textwrap.dedent(body).strip("\n"), "    ")


def metric_file(name: str, body: str) -> str:
    return HEADER + f'''

class UnderTest(stadebench.Metric):
    """A metric under test."""

    name = "{name}"
    statistics = frozenset({{"sumsq"}})

{_class_body(body)}


class TestIt(MetricConformance):
    metric = "{name}"
    plugin = Plugin("metric", UnderTest)
'''


def pattern_file(name: str, body: str) -> str:
    return HEADER + f'''

class UnderTest(stadebench.Pattern):
    """A per-row pattern under test."""

    name = "{name}"

{_class_body(body)}


class TestIt(PatternConformance):
    pattern = "{name}"
    plugin = Plugin("pattern", UnderTest)

    def expected_pruned(self, shape, sparsity):
        return shape[0] * int(shape[1] * sparsity)
'''


@pytest.fixture(scope="module", autouse=True)
def _warm_imports():
    """Import everything a prune needs before pytester's in-process runs: they drop the modules
    first imported inside them afterwards, which breaks transformers' lazy imports."""
    import stadebench
    from stadebench.testing import make_tiny_model, make_windows

    stadebench.prune(make_tiny_model(), make_windows(), metric="wanda", pattern="2:4")


def run_kit(pytester, source: str):
    pytester.makepyfile(test_plugin=source)
    return pytester.runpytest(*INNER_ARGS)


def failed_rules(result) -> dict[str, str]:
    """test name -> its FAILED summary line; every one must name a rule."""
    lines = [l for l in result.outlines if l.startswith("FAILED ")]
    out = {}
    for line in lines:
        assert "conformance rule '" in line, f"a failure that names no rule: {line}"
        out[re.search(r"::(test_\w+)", line).group(1)] = line
    return out


@pytest.mark.parametrize("rule", sorted(BROKEN_METRICS))
def test_kit_catches_a_broken_metric(pytester, rule):
    result = run_kit(pytester, metric_file(f"broken-{rule}", BROKEN_METRICS[rule]))
    assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stdout.str()
    failures = failed_rules(result)
    test = "test_" + rule.replace("-", "_")
    assert test in failures, result.stdout.str()
    assert f"conformance rule '{rule}': " in failures[test]
    assert f"broken-{rule}" in failures[test]  # the message names the metric too


def test_score_shape_message_gives_both_shapes(pytester):
    result = run_kit(pytester, metric_file("ria-transposed", BROKEN_METRICS["score-shape"]))
    result.stdout.fnmatch_lines(["*conformance rule 'score-shape': ria-transposed returned [[]40, 24[]] "
                                 "for a weight of [[]24, 40[]]*"])


@pytest.mark.parametrize("rule", sorted(BROKEN_PATTERNS))
def test_kit_catches_a_broken_pattern(pytester, rule):
    result = run_kit(pytester, pattern_file(f"broken-{rule}", BROKEN_PATTERNS[rule]))
    assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stdout.str()
    failures = failed_rules(result)
    test = "test_" + rule.replace("-", "_")
    assert test in failures and f"conformance rule '{rule}': " in failures[test], result.stdout.str()


@pytest.mark.parametrize("rule", sorted(BROKEN_ALLOCATORS))
def test_kit_catches_a_broken_allocator(pytester, rule):
    result = run_kit(pytester, allocator_file(f"broken-{rule}", BROKEN_ALLOCATORS[rule]))
    assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stdout.str()
    failures = failed_rules(result)
    test = "test_" + rule.replace("-", "_")
    assert test in failures and f"conformance rule '{rule}': " in failures[test], result.stdout.str()


@pytest.mark.parametrize("kind,rule", [("refiner", rule) for rule in sorted(BROKEN_REFINERS)]
                         + [("reconstructor", rule) for rule in sorted(BROKEN_RECONSTRUCTORS)])
def test_kit_catches_a_broken_stage(pytester, kind, rule):
    body, statistics = ((BROKEN_REFINERS[rule], "sumsq") if kind == "refiner"
                        else (BROKEN_RECONSTRUCTORS[rule], "gram"))
    result = run_kit(pytester, stage_file(kind, f"broken-{rule}", body, statistics))
    assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stdout.str()
    failures = failed_rules(result)
    test = "test_" + rule.replace("-", "_")
    assert test in failures and f"conformance rule '{rule}': " in failures[test], result.stdout.str()
    assert f"broken-{rule}" in failures[test]  # the message names the plugin too


def test_a_stage_named_none_fails_metadata(pytester):
    result = run_kit(pytester, stage_file("reconstructor", "none", BROKEN_RECONSTRUCTORS["memory-estimate"], "gram"))
    assert "test_metadata" in failed_rules(result), result.stdout.str()
    result.stdout.fnmatch_lines(["*conformance rule 'metadata': *'none', what a suite writes for no reconstructor*"])


def test_a_sound_third_party_metric_passes(pytester):
    result = run_kit(pytester, metric_file("w2x2", GOOD_METRIC))
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    assert failed_rules(result) == {}


def test_an_unregistered_name_fails_the_registered_rule(pytester):
    pytester.makepyfile(test_plugin='''
        from stadebench.testing import MetricConformance

        class TestMissing(MetricConformance):
            metric = "ria-not-installed"
    ''')
    result = pytester.runpytest(*INNER_ARGS, "-k", "registered")
    result.stdout.fnmatch_lines(["*conformance rule 'registered': unknown metric 'ria-not-installed'*pip install*"])


def test_the_pytest_plugin_provides_fixtures(pytester):
    pytester.makepyfile(test_fixtures='''
        import stadebench

        def test_fixtures(tiny_model, calibration_windows, isolated_plugins):
            assert calibration_windows.shape == (4, 16)
            assert isolated_plugins is stadebench.get_plugins()
            assert set(isolated_plugins.metrics.names()) == {
                "magnitude", "random", "wanda", "stade", "stade-w", "sparsegpt", "gblm", "pruner-zero"}
            report = stadebench.prune(tiny_model, calibration_windows, metric="wanda", pattern="2:4")
            assert report.sparsity == 0.5
    ''')
    result = pytester.runpytest(*[a for a in INNER_ARGS if a != "-q"])
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["stadebench *; installed plugins: *"])  # the report header
    result.stdout.no_fnmatch_line("*rror*")
