"""`stadebench prune` and a suite's `save:`: the pruned model is saved as a plain Hugging
Face folder that transformers reloads with the same logits (STADE's biases included),
its leaderboard rows say where it went and its content hash, and a folder it cannot go
to fails with one line before anything is loaded. On the tiny Llama of tests/tinymodel.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

import stadebench
from stadebench.results import store as lb
from stadebench.runner import run as bench_run
from stadebench.runner import save
from stadebench.suite import load_suite, parse_value
from stadebench.cli import ExitCode, app
from stadebench.cli.prune import parse_calibration, parse_options
from stadebench.data.calibration import calibration_windows
from stadebench.data.datasets import TextFiles
from stadebench.errors import ConfigError
from tinymodel import shared_assets, suite_dict, write_suite

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return shared_assets(tmp_path_factory)


def invoke(*args, cache=None):
    env = {"COLUMNS": "1000", "STADEBENCH_DEBUG": None, "STADEBENCH_CACHE": str(cache) if cache else None}
    return CliRunner().invoke(app, [str(a) for a in args], env=env, catch_exceptions=False)


def prune_args(assets, out, lb_dir, *extra, ppl=True):
    """`stadebench prune` on the tiny model: 4 × 16-token windows of the local corpus, perplexity on 4 × 16."""
    ppl_options = ("--eval-option", "seqlen=16", "--eval-option", "max_windows=4") if ppl else ()
    return ("prune", assets["model"], "--out", out, "--leaderboard", lb_dir, "--device", "cpu",
            "--calibration", f"{assets['corpus']}:4x16", *ppl_options, *extra)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def reload(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def test_prune_saves_a_folder_plain_transformers_reloads_with_equal_logits(assets, tmp_path):
    out, lb_dir = tmp_path / "stade", tmp_path / "lb"
    r = invoke(*prune_args(assets, out, lb_dir, "--metric", "stade", "--option", "bias_correction=true"),
               cache=tmp_path / "cache")
    assert r.exit_code == ExitCode.OK, r.output
    sha = save.weights_sha256(out)
    assert f"saved: {out}" in r.stdout and f"weights sha256: {sha}" in r.stdout
    assert "realised sparsity: 0.5000" in r.stdout and "text ppl: " in r.stdout

    # the same cell pruned by the library, on the same calibration windows
    tokenizer = AutoTokenizer.from_pretrained(assets["model"])
    windows = calibration_windows(TextFiles({"path": str(assets["corpus"])}), tokenizer, 16, 4, 0)
    reference = reload(assets["model"])
    stadebench.prune(reference, windows, "stade", "unstructured", 0.5, device="cpu")
    again = reload(out)
    assert torch.equal(logits(again, windows), logits(reference, windows))
    for name, layer in again.named_modules():
        if name.endswith(("q_proj", "down_proj")):
            ref = reference.get_submodule(name)
            assert layer.bias is not None and torch.equal(layer.bias, ref.bias) and layer.bias.abs().sum() > 0
            assert torch.equal(layer.weight == 0, ref.weight == 0)
    assert save.verify(out, sha) == []

    rows = lb.read(lb_dir).to_pylist()
    assert len(rows) == 1 and rows[0]["status"] == "ok" and rows[0]["metric"] == "stade"
    assert rows[0]["saved_path"] == str(out) and rows[0]["saved_sha256"] == sha
    card = (out / "README.md").read_text()
    assert f"| weights sha256 | {sha} |" in card and "| text | ppl |" in card


def test_prune_runs_stages_as_the_library_does(assets, tmp_path):
    """`--refine dsnot --reconstruct admm` (with options) saves the model the library's
    `stadebench.prune(refine=, reconstruct=)` makes, and the row names both stages."""
    out, lb_dir = tmp_path / "staged", tmp_path / "lb"
    r = invoke(*prune_args(assets, out, lb_dir, "--metric", "wanda", "--refine", "dsnot", "--refine-option",
                           "skip_layer=no_skip", "--reconstruct", "admm", "--reconstruct-option", "iterations=5"),
               cache=tmp_path / "cache")
    assert r.exit_code == ExitCode.OK, r.output
    tokenizer = AutoTokenizer.from_pretrained(assets["model"])
    windows = calibration_windows(TextFiles({"path": str(assets["corpus"])}), tokenizer, 16, 4, 0)
    reference = reload(assets["model"])
    stadebench.prune(reference, windows, "wanda", "unstructured", 0.5, device="cpu", refine="dsnot",
                     refine_options={"skip_layer": "no_skip"}, reconstruct="admm",
                     reconstruct_options={"iterations": 5})
    again = reload(out)
    for (name, a), b in zip(again.named_parameters(), reference.parameters()):
        assert torch.equal(a, b), name
    (row,) = lb.read(lb_dir).to_pylist()
    assert (row["refine"], row["reconstruct"]) == ("dsnot", "admm")
    assert '"skip_layer":"no_skip"' in row["refine_options"] and '"iterations":5' in row["reconstruct_options"]


@pytest.mark.parametrize("extra, message", [
    (("--reconstruct-option", "iterations=5"), "--reconstruct-option needs --reconstruct NAME"),
    (("--refine", "dsnott"), "unknown refiner 'dsnott'"),
    (("--refine", "dsnot", "--pattern", "4:8", "--refine-option", "initial_method=nope"), "initial_method"),
])
def test_bad_stage_arguments_exit_2(assets, tmp_path, extra, message):
    r = invoke(*prune_args(assets, tmp_path / "out", tmp_path / "lb", "--metric", "wanda", *extra))
    assert r.exit_code == ExitCode.USAGE and message in r.stderr, r.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "lb").exists()


def test_force_replaces_a_folder_stadebench_saved_and_nothing_else(assets, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    args = prune_args(assets, out, tmp_path / "lb", "--metric", "magnitude", "--pattern", "2:4", "--eval", "none",
                      "--force")
    r = invoke(*args)
    assert r.exit_code == ExitCode.USAGE and "is not a model stadebench saved" in r.output, r.output
    assert (out / "old.txt").read_text() == "x"  # a folder stadebench did not save is never replaced
    (out / "old.txt").unlink()
    assert invoke(*args).exit_code == ExitCode.OK  # an empty folder is written
    (out / "stale.txt").write_text("x")
    r = invoke(*args)  # a saved folder is replaced, leaving nothing stale
    assert r.exit_code == ExitCode.OK, r.output
    assert not (out / "stale.txt").exists() and save.verify(out) == []
    assert f"saved: {out}" in r.stdout and "ppl" not in r.stdout
    assert lb.read(tmp_path / "lb").num_rows == 0  # nothing evaluated: no rows


def test_the_speed_evaluator_runs_from_the_command_line(assets, tmp_path):
    args = prune_args(assets, tmp_path / "out", tmp_path / "lb", "--metric", "magnitude", "--pattern", "2:4",
                      ppl=False)
    speed = ("token_counts=[1]", "prefill_tokens=8", "decode_tokens=2", "repeats=1", "warmup=0")
    r = invoke(*args, "--eval", "speed", *[a for o in speed for a in ("--eval-option", o)])
    assert r.exit_code == ExitCode.OK, r.output
    rows = lb.read(tmp_path / "lb").to_pylist()
    assert {row["task"] for row in rows} == {"speed"} and "speed dense_ms@t=1: " in r.stdout
    assert all(row["saved_path"] == str(tmp_path / "out") for row in rows)


def _no_run(*args, **kwargs):
    raise AssertionError("the suite ran")


@pytest.mark.parametrize("case", ["not empty", "under a file", "unwritable"])
def test_a_bad_out_exits_2_with_one_line_before_anything_runs(assets, tmp_path, monkeypatch, case):
    out = tmp_path / "out"
    if case == "not empty":
        out.mkdir()
        (out / "keep.txt").write_text("x")
        expected = "exists and is not empty; pass --force"
    elif case == "under a file":
        (tmp_path / "notes.txt").write_text("x")
        out, expected = tmp_path / "notes.txt" / "model", "notes.txt is a file"
    else:  # root writes anywhere, so the refusal is simulated where the probe file is made
        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(save.tempfile, "mkstemp", refuse)
        expected = "cannot be written: no write access"
    monkeypatch.setattr(bench_run, "run_suite", _no_run)
    r = invoke(*prune_args(assets, out, tmp_path / "lb", "--metric", "wanda"))
    assert r.exit_code == ExitCode.USAGE, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: output folder") and expected in lines[0]
    assert "--out" in lines[0] and r.stdout == ""
    assert not (tmp_path / "lb").exists()
    if case == "not empty":
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_bad_arguments_exit_2(assets, tmp_path):
    for extra, message in [(("--metric", "wandaa"), "unknown metric 'wandaa'"),
                           (("--metric", "wanda", "--option", "novalue"), "--option 'novalue': expected KEY=VALUE"),
                           (("--metric", "wanda", "--pattern", "2:4", "--sparsity", "0.6"), "conflicts")]:
        r = invoke(*prune_args(assets, tmp_path / "out", tmp_path / "lb", *extra))
        assert r.exit_code == ExitCode.USAGE and message in r.stderr, r.output
    assert not (tmp_path / "out").exists()


def test_the_model_entrys_fields_reach_the_row_and_the_preflight(assets, tmp_path):
    tokenizer = shutil.copytree(assets["model"], tmp_path / "own-tokenizer")
    r = invoke(*prune_args(assets, tmp_path / "out", tmp_path / "lb", "--metric", "magnitude", "--revision", "v1",
                           "--tokenizer", tokenizer, "--trust-remote-code"))
    assert r.exit_code == 0, r.output
    row, = [r for r in lb.read(tmp_path / "lb").to_pylist() if r["status"] == "ok"]
    assert row["model_revision_requested"] == "v1" and row["model_tokenizer"] == str(tokenizer)
    r = invoke(*prune_args(assets, tmp_path / "out2", tmp_path / "lb", "--metric", "wanda", "--gguf-file", "nope.gguf"))
    assert r.exit_code == ExitCode.USAGE and "nope.gguf" in r.stderr, r.output
    assert not (tmp_path / "out2").exists()


def test_option_and_calibration_parsing(tmp_path):
    assert parse_options(["a=true", "b=0.5", "c=128", "d=2:4", "e=[1, 2]", "f=x=y", "g="], "--option") == \
        {"a": True, "b": 0.5, "c": 128, "d": "2:4", "e": [1, 2], "f": "x=y", "g": None}
    assert parse_value("{unclosed") == "{unclosed"
    assert parse_calibration("enwiki-2016:16x256") == {"dataset": "enwiki-2016", "n": 16, "seqlen": 256}
    assert parse_calibration("c4") == {"dataset": "c4"}
    text = tmp_path / "my:notes.txt"
    text.write_text("x")
    assert parse_calibration(f"{text}:8x32") == {"dataset": {"name": "text", "options": {"path": str(text)}},
                                                 "n": 8, "seqlen": 32}


# --- suites -----------------------------------------------------------------------------


def test_a_suite_saves_every_pruned_cell_and_its_rows_find_the_folder(assets, tmp_path):
    models, own = tmp_path / "models", tmp_path / "wanda-models"
    data = suite_dict(assets, metrics=["magnitude", {"name": "wanda", "save": str(own)}], save=str(models),
                      leaderboard=str(tmp_path / "lb"))
    path = write_suite(tmp_path / "suite.yaml", data)
    r = invoke("run", path, "--no-show", cache=tmp_path / "cache")
    assert r.exit_code == ExitCode.OK, r.output
    rows = lb.read(tmp_path / "lb").to_pylist()
    by_metric = {row["metric"]: row for row in rows}
    assert by_metric["dense"]["saved_path"] is None and by_metric["dense"]["saved_sha256"] is None
    folders = {}
    for metric, parent in (("magnitude", models), ("wanda", own)):
        row = by_metric[metric]
        folder = Path(row["saved_path"])
        assert folder.parent == parent and folder.name.startswith(f"tiny--{metric}--unstructured--0.5--")
        assert row["saved_sha256"] == save.weights_sha256(folder) and save.verify(folder) == []
        folders[metric] = folder
    assert [p.name for p in models.iterdir()] == [folders["magnitude"].name]

    # a re-run cell replaces its folder: the same name, nothing left beside it
    mtime = (folders["magnitude"] / "model.safetensors").stat().st_mtime_ns
    r = invoke("run", path, "--no-show", "--force", "--only", "metric=magnitude", cache=tmp_path / "cache")
    assert r.exit_code == ExitCode.OK, r.output
    assert [p.name for p in models.iterdir()] == [folders["magnitude"].name]
    assert (folders["magnitude"] / "model.safetensors").stat().st_mtime_ns != mtime
    assert lb.read(tmp_path / "lb", metric="magnitude").to_pylist()[0]["saved_path"] == str(folders["magnitude"])


def test_a_failed_save_fails_its_cell_only(assets, tmp_path, monkeypatch):
    real = save.save_pruned

    def flaky(model, tokenizer, folder, card, force=False, option="--out"):
        if card.metric == "magnitude":
            raise OSError(28, "No space left on device")
        return real(model, tokenizer, folder, card, force, option)

    monkeypatch.setattr(save, "save_pruned", flaky)
    suite = load_suite(write_suite(tmp_path / "s.yaml", suite_dict(assets, save=str(tmp_path / "models"),
                                                                  leaderboard=str(tmp_path / "lb"))))
    summary = bench_run.run_suite(suite)
    assert [label for label, _ in summary.failed] == ["magnitude · unstructured · 0.5"]
    assert "cannot save the pruned model to" in summary.failed[0][1] and "No space left" in summary.failed[0][1]
    rows = {row["metric"]: row for row in lb.read(tmp_path / "lb").to_pylist()}
    assert rows["magnitude"]["status"] == "failed" and rows["magnitude"]["saved_path"] is None
    assert rows["wanda"]["status"] == "ok" and save.verify(rows["wanda"]["saved_path"]) == []
    assert [s.label for s in summary.saved] == ["wanda · unstructured · 0.5"]


def test_a_save_folder_that_cannot_be_made_fails_the_suite_before_any_cell(assets, tmp_path):
    (tmp_path / "file.txt").write_text("x")
    path = write_suite(tmp_path / "s.yaml", suite_dict(assets, save=str(tmp_path / "file.txt" / "models"),
                                                       leaderboard=str(tmp_path / "lb")))
    for command in ("validate", "run"):
        r = invoke(command, path, cache=tmp_path / "cache")
        assert r.exit_code == ExitCode.USAGE, r.output
        assert "file.txt is a file; choose another `save:` in the suite" in r.stderr and "[1/" not in r.stderr
    assert not list((tmp_path / "lb").glob("*.parquet"))


def test_a_suite_without_evaluations_must_save(assets, tmp_path):
    data = suite_dict(assets, evaluations=[])
    with pytest.raises(ConfigError, match=r"evaluations: needs at least one entry .*set `save:`"):
        load_suite(write_suite(tmp_path / "s.yaml", data))
    suite = load_suite(write_suite(tmp_path / "s.yaml", {**data, "save": str(tmp_path / "m")}))
    summary = bench_run.run_suite(suite, leaderboard_dir=tmp_path / "lb")
    assert len(summary.saved) == 2 and not summary.failed and lb.read(tmp_path / "lb").num_rows == 0
    assert sorted(p.name.split("--")[1] for p in (tmp_path / "m").iterdir()) == ["magnitude", "wanda"]
