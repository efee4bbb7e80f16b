"""Layer-wise sparsity through a suite: the allocation axis, targets/ignore, the typed
per-layer records in the Parquet files, and `stadebench leaderboard show`."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_cli import WIDE, invoke
from tinymodel import shared_assets, suite_dict, write_suite

from stadebench.results import store as lb
from stadebench.results.row import LAYER_TYPE
from stadebench.cli import ExitCode


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    assets = shared_assets(tmp_path_factory)
    root = tmp_path_factory.mktemp("layerwise")
    suite = write_suite(root / "owl.yaml", suite_dict(
        assets, name="owl", leaderboard=root / "lb", metrics=("magnitude", "wanda"), patterns=("unstructured", "2:4"),
        sparsities=(0.5,), allocations=["uniform", {"name": "owl", "options": {"lambda": 0.1}}],
        ignore=[r"layers\.0\.", "lm_head"], exclude=[{"allocation": "owl", "pattern": "2:4"}]))
    result = invoke("run", suite, cache=root / "cache")
    return root, assets, result


def test_the_allocation_axis_runs_and_labels_its_rows(run):
    root, _, result = run
    assert result.exit_code == ExitCode.OK, result.output
    rows = [r for r in lb.current(lb.read(root / "lb")).to_pylist() if r["status"] == "ok"]
    cells = {(r["metric"], r["pattern"], r["allocation"]) for r in rows}
    assert cells == {("dense", None, None), ("magnitude", "unstructured", "uniform"), ("magnitude", "2:4", "uniform"),
                     ("wanda", "unstructured", "uniform"), ("wanda", "unstructured", "owl"),
                     ("magnitude", "unstructured", "owl"), ("wanda", "2:4", "uniform")}
    owl = next(r for r in rows if r["allocation"] == "owl" and r["metric"] == "wanda")
    assert json.loads(owl["allocation_options"]) == {"M": 5.0, "lambda": 0.1}
    assert owl["calib_dataset"] == "text"
    # magnitude reads no data, but its owl allocation does: the calibration is part of its key
    mag = {r["allocation"]: r for r in rows if r["metric"] == "magnitude" and r["pattern"] == "unstructured"}
    assert mag["uniform"]["calib_dataset"] is None and mag["owl"]["calib_dataset"] == "text"
    assert all(json.loads(r["layer_ignore"]) == [r"layers\.0\.", "lm_head"] for r in rows if r["metric"] != "dense")
    table = result.stdout
    assert "wanda · owl(lambda=0.1)" in table and "magnitude · owl(lambda=0.1)" in table  # M is the default


def test_ignored_layers_stay_dense_and_the_rest_meet_the_target(run):
    root, assets, _ = run
    rows = [r for r in lb.current(lb.read(root / "lb")).to_pylist()
            if r["status"] == "ok" and r["metric"] != "dense" and r["task"] is not None]
    for r in rows:
        layers = r["layers"]
        assert len(layers) == 14 and r["dense_layers"] == 7
        dense = [layer for layer in layers if layer["dense"]]
        assert {layer["block"] for layer in dense} == {0}
        assert all(layer["pruned"] == 0 and layer["allocated"] is None for layer in dense)
        pruned = [layer for layer in layers if not layer["dense"]]
        weights = sum(layer["rows"] * layer["columns"] for layer in pruned)
        assert sum(layer["pruned"] for layer in pruned) == pytest.approx(r["actual_sparsity"] * weights, abs=1e-6)
        if r["allocation"] == "uniform":
            assert r["actual_sparsity"] == 0.5 and all(layer["allocated"] == 0.5 for layer in pruned)
        else:  # one block left: OWL with a single block is the target (no spread to scale)
            assert all(math.isclose(layer["allocated"], 0.5) for layer in pruned)


def test_the_layers_column_is_typed_arrow_data(run):
    root, _, _ = run
    files = sorted((root / "lb").glob("*.parquet"))
    schema = pq.read_schema(files[0])
    assert schema.field("layers").type == pa.list_(LAYER_TYPE)
    table = pq.read_table(files, columns=["metric", "layers"]) if len(files) == 1 else \
        pa.concat_tables([pq.read_table(f, columns=["metric", "layers"]) for f in files])
    flat = pa.Table.from_pylist([x for row in table["layers"].to_pylist() if row for x in row], schema=None)
    assert {"name", "block", "role", "allocated", "sparsity", "block_mse", "output_mse"} <= set(flat.column_names)
    assert flat["block"].type == pa.int64() or flat["block"].type == pa.int32()


def test_leaderboard_show_prints_one_cell_layer_by_layer(run):
    root, _, _ = run
    r = invoke("leaderboard", "show", "wanda · unstructured · 0.5 · owl", "--dir", root / "lb")
    assert r.exit_code == ExitCode.OK, r.output
    assert "target 0.5 over 7 pruned layer(s)" in r.stdout and "7 left dense" in r.stdout
    assert r.stdout.count("dense") >= 7 and "mlp.down_proj" in r.stdout
    r = invoke("leaderboard", "show", "wanda · unstructured · 0.5 · owl", "--dir", root / "lb", "--format", "json")
    layers = json.loads(r.stdout)
    assert len(layers) == 14 and sum(layer["dense"] for layer in layers) == 7
    # ambiguous and unknown cells: one error line, exit 2, listing what exists
    r = invoke("leaderboard", "show", "wanda", "--dir", root / "lb")
    assert r.exit_code == ExitCode.USAGE and "matches 3 pruned cells" in " ".join(r.output.split())
    r = invoke("leaderboard", "show", "stadee", "--dir", root / "lb")
    assert r.exit_code == ExitCode.USAGE and "no cell matches 'stadee'" in r.output


def test_ignore_leaves_block_0_bit_identical_to_dense(run, tmp_path):
    """The engine's own word checked against the weights: prune as the suite did, compare."""
    import stadebench
    from transformers import AutoModelForCausalLM

    _, assets, _ = run
    dense = AutoModelForCausalLM.from_pretrained(assets["model"])
    model = AutoModelForCausalLM.from_pretrained(assets["model"])
    windows = torch.randint(0, dense.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    stadebench.prune(model, windows, "wanda", "unstructured", 0.5, allocation="owl", batch_size=2,
                     ignore=[r"layers\.0\.", "lm_head"])
    for (name, a), (_, b) in zip(dense.named_parameters(), model.named_parameters()):
        if "layers.0." in name or "lm_head" in name or "embed" in name:
            assert torch.equal(a, b), name
        elif name.endswith("proj.weight"):
            assert not torch.equal(a, b), name


def test_owl_with_nm_in_a_suite_is_one_error_naming_the_fix(run, tmp_path):
    _, assets, _ = run
    suite = write_suite(tmp_path / "bad.yaml", suite_dict(assets, patterns=("2:4",), allocations=["owl"]))
    r = invoke("validate", suite)
    assert r.exit_code == ExitCode.USAGE
    assert "allocations[0]: allocation 'owl' gives layers sparsities of their own, but pattern '2:4'" in r.output
    assert "exclude: [{allocation: owl, pattern: '2:4'}]" in r.output
    assert WIDE
