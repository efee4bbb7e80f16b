"""One result identity: the key holds every knob that changes the number, and nothing else.

Each test runs (or plans) a suite over the tiny random Llama twice, changing one thing in
between, and checks what re-runs: the weights, the GGUF file, the tokenizer, a plugin
pattern's version, the calibration of a data-free metric, the Hub commit.
"""

from __future__ import annotations

import os
import shutil
import types
from pathlib import Path

import pandas as pd
import pytest
import torch

import stadebench
from stadebench.results import store as lb
from stadebench.runner.plan import make_plan
from stadebench.runner.run import run_suite
from stadebench.core.patterns import Unstructured
from stadebench.data import loading
from tinymodel import build_model, load_tiny_suite, shared_assets, suite_dict


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return shared_assets(tmp_path_factory)


@pytest.fixture(autouse=True)
def token_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STADEBENCH_CACHE", str(tmp_path / "cache"))


def keys(plan) -> set[str]:
    return {p.key for cell in plan.todo for p in cell.pending}


def test_two_models_differing_only_in_gguf_file_are_two_measurements(tmp_path, assets):
    folder = tmp_path / "ggufs"
    folder.mkdir()
    (folder / "a.gguf").write_bytes(b"GGUF one")
    (folder / "b.gguf").write_bytes(b"GGUF two")
    models = [{"id": str(folder), "gguf_file": "a.gguf"}, {"id": str(folder), "gguf_file": "b.gguf"}]
    plan = make_plan(load_tiny_suite(tmp_path, assets, models=models))
    assert [m.identity.file for m in plan.models] == ["a.gguf", "b.gguf"]
    a, b = ({p.key for c in m.cells for p in c.pending} for m in plan.models)
    assert len(a) == len(b) == 3 and not a & b
    rows = [p.template for m in plan.models for c in m.cells for p in c.pending]
    assert {r.model_source for r in rows} == {"gguf"} and {r.model_file for r in rows} == {"a.gguf", "b.gguf"}


def test_a_model_with_another_tokenizer_is_another_measurement(tmp_path, assets):
    twin_tokenizer = tmp_path / "tok"
    shutil.copytree(assets["model"], twin_tokenizer)
    own = load_tiny_suite(tmp_path, assets, metrics=["magnitude"])
    other = load_tiny_suite(tmp_path, assets, file="other.yaml", metrics=["magnitude"],
                     models=[{"id": str(assets["model"]), "tokenizer": str(twin_tokenizer)}])
    assert len(run_suite(own).finished) == 2
    summary = run_suite(other)
    assert len(summary.finished) == 2 and summary.skipped == 0
    table = lb.read(tmp_path / "lb")
    assert len(set(table["cell_key"].to_pylist())) == 4
    assert set(table["model_tokenizer"].to_pylist()) == {None, str(twin_tokenizer)}
    assert run_suite(own).skipped == 2 and run_suite(other).skipped == 2  # both are found again


def test_rewriting_a_local_models_weights_reruns_its_cells(tmp_path, assets):
    model = tmp_path / "model"
    shutil.copytree(assets["model"], model)
    suite = load_tiny_suite(tmp_path, assets, models=[str(model)], metrics=["magnitude"])
    first = run_suite(suite)
    assert len(first.finished) == 2
    assert run_suite(suite).skipped == 2  # unchanged weights: nothing to do
    build_model(vocab_size=first_vocab(model), seed=1).save_pretrained(model)  # new weights, same path
    again = run_suite(suite)
    assert again.skipped == 0 and len(again.finished) == 2
    prints = {r["model_fingerprint"] for r in lb.read(tmp_path / "lb", history=True).to_pylist()}
    assert len(prints) == 2 and None not in prints


def first_vocab(folder: Path) -> int:
    import json

    return json.loads((folder / "config.json").read_text())["vocab_size"]


def pattern_plugin(version: str) -> types.ModuleType:
    """A plugin distribution's per-row pattern, at ``version``."""
    cls = type("Rows", (Unstructured,), {"name": "rows-test", "version": version})
    module = types.ModuleType("rows_plugin")

    @stadebench.hookimpl
    def register_patterns(register):
        register(cls)

    module.register_patterns = register_patterns
    return module


def test_bumping_a_plugin_patterns_version_reruns_its_cells(tmp_path, assets, isolated_plugins):
    def suite_with(version: str):
        from stadebench.plugins import reset_plugins

        reset_plugins()
        stadebench.get_plugins().register(pattern_plugin(version), name="rows_plugin",
                                          distribution="stadebench-rows", version="0.3")
        return load_tiny_suite(tmp_path, assets, patterns=["rows-test"], metrics=["magnitude"])

    first = run_suite(suite_with("1"))
    assert len(first.finished) == 2
    rows = [r for r in lb.read(tmp_path / "lb").to_pylist() if r["metric"] == "magnitude"]
    assert [(r["pattern_version"], r["pattern_plugin"], r["pattern_plugin_version"]) for r in rows] == \
        [("1", "stadebench-rows", "0.3")]
    assert run_suite(suite_with("1")).skipped == 2
    bumped = run_suite(suite_with("2"))
    assert bumped.finished == ["magnitude · rows-test · 0.5"] and bumped.skipped == 1  # dense stays


def test_changing_calibration_does_not_rerun_data_free_cells(tmp_path, assets):
    base = suite_dict(assets, metrics=["magnitude", "random", "wanda"])
    run_suite(load_tiny_suite(tmp_path, assets, metrics=["magnitude", "random", "wanda"]))
    other = load_tiny_suite(tmp_path, assets, file="other.yaml", metrics=["magnitude", "random", "wanda"],
                     calibration={**base["calibration"], "n": 2, "seed": 5})
    summary = run_suite(other)
    assert summary.finished == ["wanda · unstructured · 0.5"] and summary.skipped == 3
    magnitude = [r for r in lb.read(tmp_path / "lb").to_pylist() if r["metric"] == "magnitude"]
    assert [(r["calib_dataset"], r["calib_n"], r["sequential"]) for r in magnitude] == [(None, None, None)]


def test_a_force_rerun_leaves_one_row_per_measurement_for_plain_readers(tmp_path, assets):
    suite = load_tiny_suite(tmp_path, assets)
    first = run_suite(suite)
    run_suite(suite, force=True)
    frame = pd.read_parquet(tmp_path / "lb")
    assert len(frame) == 3
    assert frame.groupby(["cell_key", "task", "score"], dropna=False).size().max() == 1
    history = lb.read(tmp_path / "lb", history=True)
    assert len(history) == 6
    assert sorted(set(lb.superseded(tmp_path / "lb")["run_id"].to_pylist())) == [first.run_id]


def test_hub_revision_is_the_resolved_commit(monkeypatch, tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    calls = []

    class Api:
        def model_info(self, repo, revision=None, timeout=None):
            calls.append((repo, revision))
            return types.SimpleNamespace(sha=commit)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.HfApi", Api)
    assert loading.resolve_revision("org/model", "main") == commit
    assert loading.resolve_revision("org/model", commit) == commit and len(calls) == 1  # a commit is final
    # offline: the local Hugging Face cache says where the branch points
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub"
    repo = cache / "models--org--model"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    assert loading.resolve_revision("org/model", None) == commit
    assert loading.resolve_revision("org/other", None) is None
    spec = types.SimpleNamespace(id="org/model", revision=None, gguf_file=None, tokenizer=None)
    assert loading.identify(spec) == loading.ModelIdentity("hub", commit, None, None, None)
    assert len(calls) == 1


def test_the_row_schema_key_and_labels_derive_from_one_record():
    from stadebench.results import row as record

    names = [f.name for f in record.SCHEMA]
    assert names[0] == "cell_key" and set(record.KEY_FIELDS) < set(names)
    for knob in ("model_file", "model_tokenizer", "model_fingerprint", "model_revision", "metric_plugin",
                 "pattern_version", "pattern_plugin", "calib_fingerprint"):
        assert knob in record.KEY_FIELDS
    assert all(f.metadata[b"doc"] for f in record.SCHEMA)
    row = record.Row(model="m", metric="wanda", sparsity=1, metric_options={"b": 1, "a": 2})
    assert row.key() == record.cell_key({"model": "m", "metric": "wanda", "sparsity": 1.0,
                                         "metric_options": '{"a": 2, "b": 1}', "run_id": "ignored"})



def test_changed_evaluation_text_reruns_even_the_dense_baseline(tmp_path, assets):
    corpus = tmp_path / "corpus.txt"
    shutil.copyfile(assets["corpus"], corpus)
    text = {"name": "text", "options": {"path": str(corpus)}}
    evaluation = {"name": "perplexity", "options": {"dataset": text, "seqlen": 16, "batch_size": 4, "max_windows": 4}}
    suite = load_tiny_suite(tmp_path, assets, metrics=["magnitude"], evaluations=[evaluation])
    assert len(run_suite(suite).finished) == 2
    assert run_suite(suite).skipped == 2
    corpus.write_text(corpus.read_text(encoding="utf-8") + "\n\nA new closing paragraph.\n", encoding="utf-8")
    summary = run_suite(suite)  # the dense cell reads no calibration: only the evaluation text changed
    assert summary.skipped == 0 and len(summary.finished) == 2
    prints = {r["eval_fingerprint"] for r in lb.read(tmp_path / "lb", history=True).to_pylist()}
    assert len(prints) == 2 and None not in prints


def test_the_releases_accumulation_is_another_measurement_for_calibrated_cells_only(tmp_path, assets):
    base = suite_dict(assets, metrics=["magnitude", "wanda"])
    run_suite(load_tiny_suite(tmp_path, assets, metrics=["magnitude", "wanda"]))
    released = load_tiny_suite(tmp_path, assets, file="released.yaml", metrics=["magnitude", "wanda"],
                               calibration={**base["calibration"], "accumulate": "released"})
    summary = run_suite(released)
    assert summary.finished == ["wanda · unstructured · 0.5"] and summary.skipped == 2
    rows = {(r["metric"], r["calib_accumulate"]): r for r in lb.read(tmp_path / "lb").to_pylist()}
    assert set(rows) == {("dense", None), ("magnitude", None), ("wanda", "float64"), ("wanda", "released")}
    # float32 running sums round differently, yet prune almost the same weights
    a, b = rows["wanda", "float64"], rows["wanda", "released"]
    assert a["cell_key"] != b["cell_key"] and a["actual_sparsity"] == pytest.approx(b["actual_sparsity"])


def test_prune_and_shared_statistics_check_the_accumulation(assets):
    model, windows = build_model(100), torch.randint(0, 100, (4, 16))
    stats = stadebench.collect_statistics(model, windows, metrics=["wanda"], batch_size=2, accumulate="released")
    assert stats.accumulate == "released"
    with pytest.raises(stadebench.ConfigError, match="accumulated 'released', not 'float64'"):
        stadebench.prune(model, windows, "wanda", sequential=False, statistics=stats)
    with pytest.raises(stadebench.ConfigError, match="accumulate must be one of"):
        stadebench.prune(model, windows, "wanda", accumulate="float16")
    report = stadebench.prune(model, windows, "wanda", sequential=False, statistics=stats, accumulate="released")
    assert report.accumulate == "released" and report.sparsity == pytest.approx(0.5, abs=0.02)


def test_the_accumulations_a_suite_and_a_published_row_accept_are_the_engines():
    # the suite and the published schema cannot import the core (torch) before validation,
    # so they spell the choices out again: this ties the three spellings together
    from typing import get_args

    from stadebench.results.published import Protocol
    from stadebench.suite import CalibrationSpec
    from stadebench.core.statistics import ACCUMULATORS

    suite = set(get_args(CalibrationSpec.model_fields["accumulate"].annotation))
    published = {a for arg in get_args(Protocol.model_fields["calib_accumulate"].annotation)
                 for a in get_args(arg)}
    assert suite == published == set(ACCUMULATORS)
    assert CalibrationSpec().accumulate == "float64"


def test_every_key_field_names_where_the_plan_takes_it_from():
    from stadebench.results import row
    from stadebench.suite import CalibrationSpec, ModelSpec

    assert set(row.KEY_FIELDS) <= set(row.SOURCES)
    for name, path in row.SOURCES.items():
        assert row.meta(name, "group") in row.GROUPS, name
        parts = path.split(".")
        # one name per knob: a suite knob keeps its word in the row (calibration knobs with a calib_ prefix)
        if parts[:2] == ["cell", "calibration"] and len(parts) == 3:
            assert parts[2] in CalibrationSpec.model_fields and name in (parts[2], f"calib_{parts[2]}"), name
        if parts[:2] == ["cell", "model"]:
            assert parts[2] in ModelSpec.model_fields, name


def test_the_published_protocol_is_the_rows_counted_key_fields():
    from stadebench.results import published, row

    assert set(published.PROTOCOL_KNOBS) == set(row.COUNTED_FIELDS) | {"eval_joiner"}
    assert published.OPTION_KNOBS == row.OPTION_FIELDS
    assert set(published.NOT_COUNTED) - {"eval_options.batch_size"} == set(row.KEY_FIELDS) - set(row.COUNTED_FIELDS)



_NEW_KNOB = '''
    model_trust_remote_code: bool | None = _col(_bool, "Whether model code from the Hub was allowed to run.",
                                                "key", label=True, source="cell.model.trust_remote_code",
                                                group="model")'''

_SEES_THE_KNOB = r'''
import dataclasses, json, sys
from pathlib import Path
import pyarrow as pa
from stadebench.results import grid, published, row, store
from stadebench.runner.plan import make_plan
from stadebench.suite import load_suite

folder = Path(sys.argv[1])
name = "model_trust_remote_code"
# the schema, the key and the labels
assert row.SCHEMA.field(name).type == pa.bool_() and name in row.KEY_FIELDS and name in row.LABEL_FIELDS
# the plan: every template carries it, read from the suite's models[].trust_remote_code
plan = make_plan(load_suite(folder / "suite.yaml"), folder / "lb")
templates = [p.template for c in plan.todo for p in c.pending]
assert templates and all(getattr(t, name) is False for t in templates)
# the key: the same cell with the knob set is another measurement
t = templates[-1]
assert t.replace(**{name: True}).key() != t.key()
# diff: the knob is named with both values
on = t.replace(**{name: True})
assert (name, False, True) in published.protocol_diff(dataclasses.asdict(t), dataclasses.asdict(on))
# labels: two cells that differ only in it are told apart by it
rows = [t.replace(**{name: v}, task="wikitext2", score="ppl", value=10.0 + v, status="ok", suite="s")
        for v in (False, True)]
store.write_rows(folder / "board", rows)
labels = [r.label for r in grid.pivot(store.read(folder / "board"), "wikitext2", "ppl").rows]
assert sorted(labels) == [f"wanda {name}=False", f"wanda {name}=True"], labels
# the published protocol: a required knob of every published row
assert name in published.Protocol.model_fields and name in published.PROTOCOL_KNOBS
try:
    published.load_published(Path(sys.argv[2]))
except published.PublishedError as exc:
    assert f"missing {name!r}" in str(exc), exc
else:
    raise AssertionError("a published row without the new knob loaded")
print("SEEN")
'''


def test_a_knob_declared_on_the_row_alone_reaches_plan_key_diff_labels_and_published(tmp_path, assets):
    # a throw-away key field, added to a copy of the package in one place (the Row) and nowhere else
    import shutil
    import subprocess
    import sys

    package = tmp_path / "pkg"
    shutil.copytree(Path(stadebench.__file__).parent, package / "stadebench")
    row_py = package / "stadebench" / "results" / "row.py"
    text = row_py.read_text(encoding="utf-8")
    anchor = 'group="model", always=True)\n    metric: str | None'
    assert anchor in text
    row_py.write_text(text.replace(anchor, 'group="model", always=True)' + _NEW_KNOB + "\n    metric: str | None"),
                      encoding="utf-8")
    load_tiny_suite(tmp_path, assets, metrics=["wanda"])
    published = tmp_path / "published"
    published.mkdir()
    shutil.copy(Path(__file__).parents[1] / "published" / "wanda-llama2.yaml", published)
    env = {**os.environ, "PYTHONPATH": str(package), "STADEBENCH_LOAD_PLUGINS": ""}
    done = subprocess.run([sys.executable, "-c", _SEES_THE_KNOB, str(tmp_path), str(published)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "SEEN" in done.stdout, done.stderr[-3000:]
