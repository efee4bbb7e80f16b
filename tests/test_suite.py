"""Suite schema, error messages and grid expansion (stadebench.suite).

Runs against small fake plugins, so it does not depend on the built-in metrics.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import Field

import stadebench
import stadebench.plugins as sp
from stadebench import suite as S
from stadebench.base import NM_RE, Dataset, Evaluator, Metric, Options, Pattern
from stadebench.errors import ConfigError

BAD_SUITES = sorted((Path(__file__).parent / "bad_suites").glob("*.yaml"))


# --- fake plugins ----------------------------------------------------------------


class Magnitude(Metric):
    name = "magnitude"


class Random(Metric):
    name = "random"


class Wanda(Metric):
    name = "wanda"
    statistics = frozenset({"sumsq"})


class Stade(Metric):
    name = "stade"
    version = "2"
    statistics = frozenset({"sum"})

    class Options(Options):
        bias_correction: bool = True


class SparseGPT(Metric):
    name = "sparsegpt"
    statistics = frozenset({"gram"})

    class Options(Options):
        blocksize: int = 128
        update: bool = True


class Unstructured(Pattern):
    name = "unstructured"


class UnstructuredLayer(Pattern):
    name = "unstructured-layer"


class NeedsSparsity(Pattern):
    name = "owl"

    def resolve_sparsity(self, sparsity):
        if sparsity is None:
            raise ConfigError("owl needs a sparsity")
        return float(sparsity)


class NM(Pattern):
    name = "N:M"

    def __init__(self, options=None, n=2, m=4):
        super().__init__(options)
        if not 0 < n < m:
            raise ConfigError(f"pattern '{n}:{m}': N:M needs 0 < N < M")
        self.n, self.m = n, m

    @classmethod
    def matches(cls, spec):
        return bool(NM_RE.match(spec))

    @classmethod
    def from_spec(cls, spec, options=None):
        n, m = NM_RE.match(spec).groups()
        return cls(options, int(n), int(m))

    @property
    def spec(self):
        return f"{self.n}:{self.m}"

    @property
    def fixed_sparsity(self):
        return self.n / self.m, f"prunes {self.n} of every {self.m} weights"


class C4(Dataset):
    name = "c4"


class Wikitext2(Dataset):
    name = "wikitext2"


class Enwiki(Dataset):
    name = "enwiki-2016"


class Perplexity(Evaluator):
    name = "perplexity"

    class Options(Options):
        dataset: str = "wikitext2"
        seqlen: int = Field(2048, ge=8)


class FakePlugin:
    @stadebench.hookimpl
    def register_metrics(self, register):
        for cls in (Magnitude, Random, Wanda, Stade, SparseGPT):
            register(cls)

    @stadebench.hookimpl
    def register_patterns(self, register):
        for cls in (Unstructured, UnstructuredLayer, NeedsSparsity, NM):
            register(cls)

    @stadebench.hookimpl
    def register_allocators(self, register):
        from stadebench.core.allocation import OWL, Uniform

        register(Uniform)
        register(OWL)

    @stadebench.hookimpl
    def register_datasets(self, register):
        for cls in (C4, Wikitext2, Enwiki):
            register(cls)

    @stadebench.hookimpl
    def register_evaluators(self, register):
        register(Perplexity)


@pytest.fixture(autouse=True, scope="module")
def fake_plugins():
    """A plugin manager holding only the fakes (no built-ins, no installed plugins)."""
    saved = sp.DEFAULT_PLUGINS
    sp.DEFAULT_PLUGINS = ()
    try:
        plugins = sp.Plugins(load_entry_points=False)
    finally:
        sp.DEFAULT_PLUGINS = saved
    plugins.register(FakePlugin(), name="fake")
    sp._plugins = plugins
    yield plugins
    sp.reset_plugins()


def suite(**fields):
    data = {"models": ["m"], "metrics": ["wanda"], "patterns": ["unstructured"], "sparsities": [0.5]}
    return S.validate_suite({**data, **fields}, source="t.yaml")


EXAMPLE = """\
name: smoke
leaderboard: leaderboard
device: auto
dense: true
models:
  - id: smollm2-135m
    revision: null
    dtype: float32
    trust_remote_code: false
    gguf_file: null
    tokenizer: null
metrics:
  - magnitude
  - wanda
  - {name: stade, options: {bias_correction: false}, label: stade-released}
patterns: [unstructured, "2:4"]
sparsities: [0.5]
exclude:
  - {metric: sparsegpt, pattern: "2:4"}
calibration:
  dataset: enwiki-2016
  n: 16
  seqlen: 512
  seed: 0
  sequential: true
  batch_size: 8
evaluations:
  - {name: perplexity, options: {dataset: enwiki-2016, seqlen: 512}}
"""


# --- loading ---------------------------------------------------------------------


def test_example_loads_and_round_trips(tmp_path):
    path = tmp_path / "smoke.yaml"
    path.write_text(EXAMPLE.replace("metrics:\n", "metrics:\n  - sparsegpt\n"))
    s = S.load_suite(path)
    assert s.name == "smoke" and s.device == "auto" and s.dense
    assert [m.display for m in s.metrics] == ["sparsegpt", "magnitude", "wanda", "stade-released"]
    assert s.metrics[0].options == {"blocksize": 128, "update": True}  # defaults filled in
    assert s.metrics[3].options == {"bias_correction": False}
    assert [(p.name, p.sparsities) for p in s.patterns] == [("unstructured", [0.5]), ("2:4", [0.5])]
    assert s.calibration.first().dataset.name == "enwiki-2016" and s.calibration.n == [16]
    assert s.evaluations[0].options == {"dataset": "enwiki-2016", "seqlen": 512}

    dumped = yaml.safe_dump(s.model_dump(mode="json"), sort_keys=False)
    again = S.parse_suite(dumped, "dump.yaml")
    assert again == s
    assert S.expand(again) == S.expand(s)


def test_example_suite_file_is_a_valid_suite():
    """The example suite that docs/suites.md shows (docs/examples/suite.yaml) validates and expands."""
    path = Path(__file__).resolve().parents[1] / "docs" / "examples" / "suite.yaml"
    s = S.parse_suite(path.read_text(encoding="utf-8"), path.name)
    assert [p.name for p in s.patterns] == ["unstructured", "2:4"]  # unquoted 2:4 stays a string
    # dense + 3 metrics x 2 patterns x 2 allocations, minus stade-released on 2:4 (both allocations)
    # and owl on 2:4 for the other two metrics
    assert len(S.expand(s)) == 1 + 3 * 2 * 2 - 2 - 2


def test_defaults_and_name_from_file_stem(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text("models: [m]\nmetrics: [magnitude]\n"
                    "patterns: [2:4, '1:3', {name: unstructured, sparsities: [0.3]}]\n")
    s = S.load_suite(path)
    assert s.name == "tiny" and s.leaderboard == "leaderboard" and s.dense is True
    assert s.models[0].dtype == "float32" and s.models[0].trust_remote_code is False
    assert s.calibration.first().dataset.name == "c4" and s.calibration.sequential == [True]
    assert [e.name for e in s.evaluations] == ["perplexity"]
    assert [p.sparsities for p in s.patterns] == [[0.5], [1 / 3], [0.3]]  # N:M implies N/M


def test_local_model_path_is_checked(tmp_path, monkeypatch):
    (tmp_path / "weights").mkdir()
    monkeypatch.chdir(tmp_path)
    assert suite(models=["./weights"]).models[0].id == "./weights"
    assert suite(models=[str(tmp_path / "weights")]).models[0].id == str(tmp_path / "weights")
    with pytest.raises(ConfigError, match=r"models\[0\]\.id: local model path './other' does not exist"):
        suite(models=[{"id": "./other"}])
    with pytest.raises(ConfigError, match=r"models\[1\]: local model path '~/nowhere/x.gguf' does not exist"):
        suite(models=["m", "~/nowhere/x.gguf"])


def test_errors_without_a_file_have_no_line():
    with pytest.raises(ConfigError) as info:
        suite(metrics=["wandda"])
    assert str(info.value).startswith("t.yaml: metrics[0]: unknown metric 'wandda'; did you mean 'wanda'")


def test_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the suite file"):
        S.load_suite(tmp_path / "missing.yaml")


# --- the table of bad suites -----------------------------------------------------


def _headers(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text().splitlines():
        match = re.match(r"#\s*(expect|path|line):\s?(.*)$", line)
        if not match:
            break
        found[match[1]] = match[2].strip()
    return found


def test_bad_suite_corpus_is_large_enough():
    assert len(BAD_SUITES) >= 30
    assert all("expect" in _headers(p) for p in BAD_SUITES)


@pytest.mark.parametrize("path", BAD_SUITES, ids=lambda p: p.stem)
def test_bad_suite(path: Path):
    expected = _headers(path)
    with pytest.raises(ConfigError) as info:
        S.load_suite(path)
    message = str(info.value)
    assert message.startswith(f"{path}:"), message
    if expected.get("line"):
        assert message.startswith(f"{path}:{expected['line']}:"), message
    if expected.get("path"):
        assert f": {expected['path']}: " in message, message
    assert expected["expect"] in message, message
    assert "\n" not in message
    for noise in ("Traceback", "validation error", "errors.pydantic.dev", "For further information"):
        assert noise not in message
    assert info.value.__suppress_context__ or info.value.__context__ is None


# --- expansion -------------------------------------------------------------------


def test_expansion_order_is_grouped_by_model():
    s = suite(models=["org/a", {"id": "b", "dtype": "bfloat16"}], metrics=["magnitude", "wanda"],
              patterns=["unstructured", "2:4"])
    cells = S.expand(s)
    assert [(c.model.id, c.label) for c in cells] == [
        (model, label) for model in ("org/a", "b") for label in (
            "dense", "magnitude · unstructured · 0.5", "magnitude · 2:4 · 0.5",
            "wanda · unstructured · 0.5", "wanda · 2:4 · 0.5")
    ]
    dense = cells[0]
    assert dense.dense and dense.pattern is None and dense.sparsity == 0
    assert S.expand(s) == cells


def test_own_sparsities_and_exclude():
    s = suite(metrics=["magnitude", "wanda", {"name": "stade", "label": "stade-r"}],
              patterns=[{"name": "unstructured", "sparsities": [0.5, 0.7]}, "unstructured-layer",
                        {"name": "4:8", "sparsities": [0.5]}],
              sparsities=[0.5, 0.6],
              exclude=[{"metric": "stade-r", "pattern": "4:8"}, {"sparsity": 0.7, "metric": "magnitude"},
                       {"model": "m", "pattern": "unstructured-layer", "sparsity": 0.6}])
    labels = [c.label for c in S.expand(s)]
    assert labels == [
        "dense",
        "magnitude · unstructured · 0.5", "magnitude · unstructured-layer · 0.5",
        "magnitude · 4:8 · 0.5",
        "wanda · unstructured · 0.5", "wanda · unstructured · 0.7", "wanda · unstructured-layer · 0.5",
        "wanda · 4:8 · 0.5",
        "stade-r · unstructured · 0.5", "stade-r · unstructured · 0.7",
        "stade-r · unstructured-layer · 0.5",
    ]


def test_calibration_lists_vary_cells_that_read_data():
    s = suite(metrics=["magnitude", "wanda"], calibration={"seed": [3, 1, 2], "dataset": ["c4", "enwiki-2016"]})
    cells = S.expand(s)
    assert [c.label for c in cells] == [
        "dense", "magnitude · unstructured · 0.5",
        *(f"wanda · unstructured · 0.5 · dataset={d} · seed={seed}" for d in ("c4", "enwiki-2016")
          for seed in (3, 1, 2))]
    wanda = [c for c in cells if c.metric == "wanda"]
    assert [(c.calibration.dataset.name, c.calibration.seed) for c in wanda] == [
        (d, seed) for d in ("c4", "enwiki-2016") for seed in (3, 1, 2)]
    assert all(c.calibration.dataset.resolved.instance.name == c.calibration.dataset.name for c in wanda)
    assert all(c.metric_plugin is not None and c.uses_data for c in wanda)
    # the data-free cell and the dense cell carry the first protocol and name none in their label
    assert cells[1].calibration.seed == 3 and not cells[1].uses_data
    # each seed's cell has its own key; magnitude's key has no calibration, so it is one cell
    keys = [r.key() for r in plan_rows(s)]
    assert len(keys) == len(set(keys)) == len(cells)
    assert {r.calib_seed for r in plan_rows(s) if r.metric == "wanda"} == {1, 2, 3}
    assert S.select(cells, ["seed=1"]) == [c for c in wanda if c.calibration.seed == 1]
    with pytest.raises(ConfigError, match="a seed is an integer"):
        S.select(cells, ["seed=x"])


def test_a_single_value_list_is_the_same_cell_as_the_value():
    one, listed = suite(calibration={"seed": 4}), suite(calibration={"seed": [4]})
    assert [r.key() for r in plan_rows(one)] == [r.key() for r in plan_rows(listed)]
    assert [c.label for c in S.expand(listed)] == ["dense", "wanda · unstructured · 0.5"]


def test_a_calibration_dataset_listed_twice_is_refused():
    with pytest.raises(ConfigError, match="listed twice"):
        suite(calibration={"dataset": ["c4", {"name": "c4"}]})


def test_everything_excluded_is_an_error():
    with pytest.raises(ConfigError, match="nothing would run"):
        suite(dense=False, exclude=[{"metric": "wanda"}])


def plan_rows(s) -> list:
    """The row template of every (cell, evaluation) of ``s``, as the live key makes them."""
    from stadebench.runner.plan import plan
    from stadebench.data.loading import ModelIdentity

    identities = {m: ModelIdentity("hub", "0" * 40, None, None, None) for m in s.models}
    result = plan(s, identities, fingerprints=lambda spec: f"{spec.name}:fingerprint")
    return [p.template for cell in result.todo for p in cell.pending]


def test_key_fields():
    s = suite(metrics=["stade", "wanda"], patterns=["unstructured"], calibration={"n": 4, "seqlen": 64})
    dense, stade, wanda = plan_rows(s)
    assert stade.metric == "stade" and stade.metric_version == "2"
    assert stade.metric_options == '{"bias_correction":true}'
    calibration = {f: getattr(stade, f) for f in ("calib_dataset", "calib_options", "calib_n", "calib_seqlen",
                                                   "calib_seed", "sequential", "batch_size")}
    assert calibration == {"calib_dataset": "c4", "calib_options": "{}", "calib_n": 4, "calib_seqlen": 64,
                           "calib_seed": 0, "sequential": True, "batch_size": 8}
    assert dense.calib_dataset is None and dense.calib_n is None
    assert dense.sparsity == 0 and dense.pattern is None
    assert len({dense.key(), stade.key(), wanda.key()}) == 3

    other = suite(metrics=["stade", "wanda"], patterns=["unstructured"], calibration={"n": 8, "seqlen": 64})
    dense2, stade2, _ = plan_rows(other)
    assert dense2.key() == dense.key() and stade2.key() != stade.key()

    fp16 = plan_rows(suite(models=[{"id": "m", "dtype": "float16"}]))[0]
    assert fp16.key() != dense.key()


# Independent oracle for the property test: what should survive `exclude`.
def _rule_matches(rule, model, metric, pattern, sparsity):
    return ((rule.get("model") in (None, model, model.split("/")[-1]))
            and rule.get("metric") in (None, metric.get("label") or metric["name"], metric["name"])
            and rule.get("pattern") in (None, pattern)
            and (rule.get("sparsity") is None or math.isclose(rule["sparsity"], sparsity)))


METRIC_CHOICES = ["magnitude", "wanda", "random", {"name": "stade"},
                  {"name": "stade", "options": {"bias_correction": False}, "label": "stade-released"}]


@st.composite
def grids(draw):
    model = st.tuples(st.sampled_from(["org/a", "b", "org/c"]), st.sampled_from(["float32", "bfloat16"]))
    models = draw(st.lists(model, min_size=1, max_size=3, unique=True))
    metrics = draw(st.lists(st.sampled_from(METRIC_CHOICES), min_size=1, max_size=4, unique_by=str))
    top = draw(st.none() | st.lists(st.sampled_from([0.3, 0.5, 0.7]), min_size=1, max_size=3, unique=True))
    names = draw(st.lists(st.sampled_from(["unstructured", "unstructured-layer", "2:4", "4:8", "1:4"]),
                          min_size=1, max_size=4, unique=True))
    patterns, effective = [], {}
    for name in names:
        if ":" in name:
            n, m = map(int, name.split(":"))
            inherits_conflict = top is not None and top != [n / m]
            own = [n / m] if inherits_conflict or draw(st.booleans()) else None
            effective[name] = [n / m]
        else:
            own_list = st.lists(st.sampled_from([0.2, 0.5, 0.9]), min_size=1, max_size=2, unique=True)
            own = draw(own_list if top is None else st.none() | own_list)
            effective[name] = own or top
        patterns.append({"name": name, "sparsities": own} if own else name)
    labels = [m if isinstance(m, str) else m.get("label") or m["name"] for m in metrics]
    field_values = {"model": [m for m, _ in models] + ["a"] * any(m == "org/a" for m, _ in models),
                    "metric": labels, "pattern": names,
                    "sparsity": sorted({s for v in effective.values() for s in v})}
    rule = st.dictionaries(st.sampled_from(sorted(field_values)), st.just(None), min_size=1).flatmap(
        lambda keys: st.fixed_dictionaries({k: st.sampled_from(field_values[k]) for k in keys}))
    exclude = draw(st.lists(rule, max_size=3))
    dense = draw(st.booleans())
    data = {"models": [{"id": i, "dtype": d} for i, d in models], "metrics": metrics, "patterns": patterns,
            "exclude": exclude, "dense": dense}
    if top is not None:
        data["sparsities"] = top
    return data, effective


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(grids())
def test_expansion_property(grid):
    data, effective = grid
    metrics = [{"name": m} if isinstance(m, str) else m for m in data["metrics"]]
    expected, excluded = [], 0
    for model in data["models"]:
        if data["dense"]:
            expected.append((model["id"], "dense"))
        for metric in metrics:
            for pattern in effective:
                for s in effective[pattern]:
                    if any(_rule_matches(r, model["id"], metric, pattern, s) for r in data["exclude"]):
                        excluded += 1
                    else:
                        label = metric.get("label") or metric["name"]
                        expected.append((model["id"], f"{label} · {pattern} · {s:g}"))
    total = len(data["models"]) * (data["dense"] + len(metrics) * sum(map(len, effective.values())))
    if not expected:
        with pytest.raises(ConfigError, match="nothing would run"):
            S.validate_suite(data)
        return
    s = S.validate_suite(data)
    cells = S.expand(s)
    assert len(cells) == total - excluded
    assert [(c.model.id, c.label) for c in cells] == expected
    assert len({r.key() for r in plan_rows(S.validate_suite(data))}) == len(cells) * len(s.evaluations)
    assert S.expand(S.validate_suite(data)) == cells
    # grouped by model: each model's cells are contiguous, dense first
    order = [(c.model.id, c.model.dtype) for c in cells]
    assert order == sorted(order, key=[(m["id"], m["dtype"]) for m in data["models"]].index)


# --- select ----------------------------------------------------------------------


@pytest.fixture
def cells():
    return S.expand(suite(models=["org/small", "big"], metrics=["magnitude", "wanda"],
                          patterns=["unstructured", "2:4"], sparsities=[0.5]))


def test_select(cells):
    assert S.select(cells, []) == cells
    assert {c.metric for c in S.select(cells, ["metric=wanda"])} == {"wanda"}
    assert len(S.select(cells, ["metric=wanda", "pattern=2:4"])) == 2
    assert len(S.select(cells, ["metric=wanda,magnitude", "model=small"])) == 4
    assert len(S.select(cells, ["metric=wanda", "metric=dense"])) == 6
    assert [c.label for c in S.select(cells, ["sparsity=0"])] == ["dense", "dense"]
    assert len(S.select(cells, ["model=org/small", "dtype=float32"])) == 5
    assert len(S.select(cells, ["2:4"])) == 4
    assert len(S.select(cells, ["big", "small"])) == 10  # bare words are alternatives


def test_select_errors(cells):
    with pytest.raises(ConfigError, match="unknown field 'metrc'; did you mean 'metric'"):
        S.select(cells, ["metrc=wanda"])
    with pytest.raises(ConfigError, match="sparsity must be a number"):
        S.select(cells, ["sparsity=half"])
    with pytest.raises(ConfigError, match="matches none of the 10 cells"):
        S.select(cells, ["metric=wandaa"])


# --- JSON schema -----------------------------------------------------------------


def _objects(schema):
    if isinstance(schema, dict):
        if "properties" in schema:
            yield schema
        for value in schema.values():
            yield from _objects(value)
    elif isinstance(schema, list):
        for value in schema:
            yield from _objects(value)


def test_json_schema():
    schema = S.suite_json_schema()
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert set(schema["required"]) == {"models", "metrics", "patterns"}
    objects = list(_objects(schema))
    assert len(objects) >= 8
    for obj in objects:
        assert obj["additionalProperties"] is False
        for name, prop in obj["properties"].items():
            assert prop.get("description"), f"{obj.get('title')}.{name} has no description"
    shorthand = schema["properties"]["metrics"]["items"]["anyOf"]
    assert {"type": "string"} in shorthand
