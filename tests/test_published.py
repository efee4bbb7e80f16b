"""Published results as data: the files in published/ and their schema, protocol_diff, the
replay suites, `stadebench leaderboard --published` and `stadebench diff`.

The end-to-end tests run the tiny random Llama of tests/tinymodel.py (seconds on a CPU)
and set hand-made "published" rows beside its cells."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from stadebench.results import store as lb
from stadebench.results.row import JSON_FIELDS
from stadebench.results import published as pub
from stadebench.cli import ExitCode, app
from stadebench.cli.diff import diff
from tinymodel import shared_assets, suite_dict, write_suite

REPO = Path(__file__).resolve().parents[1]
PUBLISHED = REPO / "published"


def invoke(*args, command=app):
    env = {"COLUMNS": "1000", "STADEBENCH_DEBUG": None}
    return CliRunner().invoke(command, [str(a) for a in args], env=env, catch_exceptions=False)


def _diff_app() -> typer.Typer:
    """`stadebench diff` as a one-command app: the test does not depend on where it is registered."""
    one = typer.Typer(pretty_exceptions_enable=False)
    one.command()(diff)
    return one


def run_diff(*args):
    return invoke(*args, command=_diff_app())


# --- the files in published/ ------------------------------------------------------------


def test_every_published_file_loads_with_its_citation():
    files = sorted(PUBLISHED.glob("*.yaml"))
    assert {f.stem for f in files} >= {"wanda-llama2", "owl-llama1"}
    rows = pub.load_published(PUBLISHED)
    assert len({r.ref for r in rows}) == len(rows)
    for row in rows:
        assert row.citation.table and (row.citation.arxiv or row.citation.commit)
    assert {r.file for r in rows} == {f.stem for f in files}


def test_the_wanda_readme_table_as_typed_in():
    rows = {r.id: r for r in pub.load_file(PUBLISHED / "wanda-llama2.yaml")}
    assert len(rows) == 30 and rows["7b-dense"].value == 5.12
    wanda = rows["7b-wanda-50"]
    assert (wanda.pattern, wanda.calib_n, wanda.calib_seqlen, wanda.eval_seqlen, wanda.dtype) == \
        ("unstructured", 128, 4096, 4096, "float16")
    assert rows["7b-magnitude-50"].calib_dataset is None  # data-free
    assert rows["13b-sparsegpt-2-4"].pattern_options == {"ties": "topk"}
    assert rows["70b-sparsegpt-50"].pattern_options == {"threshold": "inclusive"}


def test_the_gblm_model_zoo_table_as_typed_in():
    rows = {r.id: r for r in pub.load_file(PUBLISHED / "gblm-llama.yaml")}
    assert len(rows) == 14 and rows["llama2-7b-gblm-50"].value == 6.86 and rows["llama1-30b-gblm-4-8"].value == 5.89
    gblm = rows["llama2-13b-chat-gblm-50"]
    assert (gblm.metric, gblm.pattern, gblm.calib_seqlen, gblm.eval_seqlen, gblm.calib_accumulate) == \
        ("gblm", "unstructured", 2048, 2048, "released")
    assert gblm.metric_options == {"gradient": "l2", "scale": 100, "wanda": True, "inverse": False}
    assert rows["llama2-70b-gblm-4-8"].pattern_options == {"ties": "topk"}
    # the options as written are the registered metric's defaults: nothing is left implicit
    assert pub.protocol_diff(gblm.protocol(), {**gblm.protocol(), "metric_options": {}}) == []


# --- the schema rejects what it must --------------------------------------------------


def _good() -> dict:
    return yaml.safe_load((PUBLISHED / "owl-llama1.yaml").read_text(encoding="utf-8"))


def _write(tmp_path: Path, data: dict, name: str = "table.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _drop(key):
    def change(d):
        del d[key]
    return change


@pytest.mark.parametrize(("change", "words"), [
    (_drop("citation"), ["missing 'citation'", "where the numbers come from"]),
    (lambda d: d["citation"].pop("arxiv") and d["citation"].pop("repository") and d["citation"].pop("commit"),
     ["citation", "arxiv, or repository + commit"]),
    (lambda d: d["citation"].pop("table"), ["missing 'citation.table'"]),
    (lambda d: d["shared"].pop("eval_seqlen"), ["rows[0] (7b-dense)", "missing 'eval_seqlen'"]),
    (lambda d: d["rows"][2].pop("calib_n"), ["rows[2] (7b-wanda-70)", "missing 'calib_n'"]),
    (lambda d: d["shared"].update(eval_seqlenn=2048), ["unknown key 'eval_seqlenn'", "did you mean 'eval_seqlen'"]),
    (lambda d: d.update(note="x"), ["unknown key 'note'"]),
    (lambda d: d["citation"].update(commit="abc"), ["citation.commit"]),
    (lambda d: d["rows"].append(dict(d["rows"][0])), ["id '7b-dense' is used twice"]),
])
def test_a_bad_file_is_rejected_naming_the_file_and_field(tmp_path, change, words):
    data = _good()
    change(data)
    path = _write(tmp_path, data)
    with pytest.raises(pub.PublishedError) as info:
        pub.load_published(tmp_path)
    message = str(info.value)
    assert str(path) in message
    for word in words:
        assert word in message, message


def test_n_m_patterns_stay_strings(tmp_path):
    data = _good()
    data["rows"][2]["pattern"] = "2:4"
    text = yaml.safe_dump(data, sort_keys=False).replace("'2:4'", "2:4")  # unquoted, as people write it
    (tmp_path / "t.yaml").write_text(text, encoding="utf-8")
    assert pub.load_file(tmp_path / "t.yaml")[2].pattern == "2:4"


# --- protocol_diff ----------------------------------------------------------------------


def _wanda_row() -> dict:
    """The Row-like fields of the Wanda README's 7B wanda row, as a leaderboard would store them."""
    fields = pub.load_file(PUBLISHED / "wanda-llama2.yaml")[3].protocol()
    fields = {k: v for k, v in fields.items() if k != "eval_joiner"}
    fields.update(model_revision="0" * 40, metric_options="{}", allocation_options="{}", calib_options="{}",
                  eval_options=json.dumps({"dataset": "wikitext2", "split": "test", "seqlen": 4096,
                                           "batch_size": 4, "max_windows": None}),
                  batch_size=8, metric_version="1", model_source="hub")
    return fields


def test_the_published_protocol_and_a_leaderboard_row_of_it_match():
    paper = pub.load_file(PUBLISHED / "wanda-llama2.yaml")[3]
    assert paper.id == "7b-wanda-50"
    assert pub.protocol_diff(_wanda_row(), paper.protocol()) == []  # revision unpinned; joiner from wikitext2


def test_options_are_canonical_and_defaults_filled():
    a = {**_wanda_row(), "metric": "sparsegpt", "metric_options": '{"blocksize": 128, "percdamp": 0.01}'}
    b = {**a, "metric_options": {"percdamp": 1e-2, "damping_retries": 3, "update": True}}  # the rest: defaults
    assert pub.protocol_diff(a, b) == []
    c = {**a, "metric_options": {"percdamp": 0.1}}
    assert pub.protocol_diff(a, c) == [("metric_options.percdamp", 0.01, 0.1)]
    layer = {**a, "pattern": "unstructured-layer", "pattern_options": None}
    assert pub.protocol_diff(layer, {**layer, "pattern_options": {"threshold": "exact"}}) == []
    assert pub.protocol_diff(layer, {**layer, "pattern_options": '{"threshold": "inclusive"}'}) == \
        [("pattern_options.threshold", "exact", "inclusive")]


def test_what_is_not_counted():
    a = _wanda_row()
    b = {**a, "batch_size": 1, "metric_version": "2", "model_source": "local", "model_fingerprint": "x",
         "eval_options": json.loads(a["eval_options"]) | {"batch_size": 1}}
    assert pub.protocol_diff(a, b) == []
    assert [k for k, *_ in pub.uncounted_diff(a, b)] == ["model_source", "model_fingerprint", "metric_version",
                                                          "batch_size", "eval_options.batch_size"]
    pinned = {**a, "model_revision": "1" * 40}
    assert pub.protocol_diff(a, pinned) == [("model_revision", "0" * 40, "1" * 40)]  # two of ours: both pinned


def test_each_knob_is_named_with_both_values():
    a = _wanda_row()
    b = {**a, "eval_seqlen": 2048, "calib_n": 64, "eval_options": {"max_windows": 8}, "eval_dataset": "c4"}
    assert pub.protocol_diff(a, b) == [("calib_n", 128, 64), ("eval_dataset", "wikitext2", "c4"),
                                       ("eval_seqlen", 4096, 2048), ("eval_joiner", "\n\n", " "),
                                       ("eval_options.max_windows", None, 8)]


# --- the replay suites are the published protocol ------------------------------------------


def _planned_rows(name: str) -> list[dict]:
    from stadebench.runner.plan import plan
    from stadebench.suite import load_suite
    from stadebench.data.loading import ModelIdentity

    suite = load_suite(REPO / "suites" / f"{name}.yaml")
    identities = {m: ModelIdentity("hub", "0" * 40, None, None, None) for m in suite.models}
    rows = []
    for cell in plan(suite, identities, fingerprints=lambda spec: None).todo:
        for item in cell.pending:
            rows.append({**dataclasses.asdict(item.template), "task": "wikitext2", "score": "ppl",
                         "status": "ok", "value": 1.0})
    return rows


@pytest.mark.parametrize(("suite", "table", "replayed", "differs"), [
    ("wanda-llama2", "wanda-llama2", "", []),
    ("owl-llama1", "owl-llama1", "", [("model", "huggyllama/llama-7b", "decapoda-research/llama-7b-hf")]),
    ("gblm-llama2", "gblm-llama", "llama2-", []),  # the LLaMA-2 rows; LLaMA-1 has no replay suite
])
def test_a_replay_suite_plans_exactly_the_published_protocol(suite, table, replayed, differs):
    rows = pub.load_file(PUBLISHED / f"{table}.yaml")
    comparisons = pub.compare(_planned_rows(suite), rows)
    expected = sorted(r.id for r in rows if r.id.startswith(replayed))
    assert expected and sorted(c.published.id for c in comparisons) == expected  # each has its cell
    assert all(c.differs == differs for c in comparisons)


@pytest.mark.parametrize("suite", ["sparsegpt-opt", "gblm-llama2"])
def test_a_replay_suite_validates_without_its_weights(suite):
    r = invoke("validate", REPO / "suites" / f"{suite}.yaml")
    assert r.exit_code == ExitCode.OK, r.output


# --- end to end on the tiny model -----------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A leaderboard of the tiny suite, run twice: calibration batch size 2, then 4 (a second
    wanda cell, same protocol); and the wanda cell's row."""
    assets = shared_assets(tmp_path_factory)
    root = tmp_path_factory.mktemp("published")
    folder = root / "lb"
    for batch in (2, 4):
        suite = suite_dict(assets, name="tiny")
        suite["calibration"]["batch_size"] = batch
        r = invoke("run", write_suite(root / f"tiny{batch}.yaml", suite), "--leaderboard", folder)
        assert r.exit_code == ExitCode.OK, r.output
    rows = [r for r in lb.current(lb.read(folder)).to_pylist() if r["metric"] == "wanda"]
    assert len(rows) == 2
    return folder, sorted(rows, key=lambda r: r["batch_size"])


def _paper_of(row: dict, **changes) -> dict:
    """A hand-made published file with one row of ``row``'s protocol, ``changes`` applied."""
    knobs = {k: (json.loads(row[k]) if k in JSON_FIELDS and row[k] is not None else row[k])
             for k in pub.PROTOCOL_KNOBS if k != "eval_joiner"}
    knobs["eval_options"] = {k: v for k, v in knobs["eval_options"].items() if k not in ("seqlen", "split")}
    knobs.update(eval_joiner="\n\n", model_revision=None, id="tiny-wanda", task=row["task"], score=row["score"],
                 value=round(row["value"] * 0.9, 3), higher_is_better=False)
    knobs.update(changes)
    return {"citation": {"title": "A hand-made table", "repository": "example/none", "commit": "a" * 40,
                         "table": "none"}, "rows": [knobs]}


def test_a_different_seqlen_is_a_protocol_mismatch_not_a_comparison(tiny, tmp_path):
    folder, (row, _) = tiny
    _write(tmp_path, _paper_of(row, eval_seqlen=8), "hand.yaml")
    r = invoke("leaderboard", "--dir", folder, "--published", tmp_path)
    assert r.exit_code == ExitCode.OK, r.output
    assert "published results" not in r.stdout  # nothing compared
    (line,) = [ln for ln in r.stdout.splitlines() if "not compared" in ln]
    assert "published:hand:tiny-wanda" in line and "wanda · unstructured · 0.5" in line
    assert line.endswith("protocol differs in eval_seqlen (ours 16 vs paper 8)")

    r = invoke("leaderboard", "--dir", folder, "--published", tmp_path, "--format", "json")
    (only,) = json.loads(r.stdout)
    assert only["ours"] is None and only["relative"] is None
    assert only["not compared: protocol differs in"] == "eval_seqlen (ours 16 vs paper 8)"

    r = run_diff(row["cell_key"][:10], "published:hand:tiny-wanda", "--dir", folder, "--published", tmp_path)
    assert r.exit_code == ExitCode.OK, r.output
    table = [ln for ln in r.stdout.splitlines() if ln.startswith("│")]
    assert [[c.strip() for c in ln.strip("│").split("│")] for ln in table] == [["eval_seqlen", "16", "8"]]
    r = run_diff(row["cell_key"][:10], "published:hand:tiny-wanda", "--dir", folder, "--published", tmp_path,
                 "--format", "json")
    assert json.loads(r.stdout)["differs"] == [{"knob": "eval_seqlen", "a": 16, "b": 8}]


def test_the_same_protocol_shows_the_paper_value_and_the_difference(tiny, tmp_path):
    folder, (row, _) = tiny
    paper = _paper_of(row)
    _write(tmp_path, paper, "hand.yaml")
    r = invoke("leaderboard", "--dir", folder, "--published", tmp_path)
    assert r.exit_code == ExitCode.OK, r.output
    assert "not compared" not in r.stdout
    (line,) = [ln for ln in r.stdout.splitlines() if "published:hand:tiny-wanda" in ln]
    value = paper["rows"][0]["value"]
    assert f"{row['value']:.4g}" in line and f"{value:.4g}" in line and f"{row['value'] / value - 1:+.1%}" in line

    r = invoke("leaderboard", "--dir", folder, "--published", tmp_path, "--format", "json")
    (only,) = json.loads(r.stdout)  # the two wanda cells have one value: shown once
    assert only["relative"] == pytest.approx(row["value"] / value - 1, abs=1e-4)
    assert only["not compared: protocol differs in"] is None


def test_a_published_stage_is_a_number_of_its_stage_cells_only(tiny, tmp_path):
    """A paper's "Wanda + DSnoT" is set beside the leaderboard's wanda → dsnot cell, never
    beside plain wanda (where it would read "protocol differs in refine")."""
    folder, (row, _) = tiny
    refined = {**row, "refine": "dsnot", "refine_options": json.dumps({"max_cycle_time": 50}), "value": 7.0}
    _write(tmp_path, _paper_of(refined, refine_options={"max_cycle_time": 50}), "hand.yaml")
    (paper,) = pub.load_published(tmp_path)
    assert paper.refine == "dsnot"
    (only,) = pub.compare([row], [paper]) or [None]
    assert only is None  # plain wanda is not its subject
    (only,) = pub.compare([row, refined], [paper])
    assert only.compared and only.ours["refine"] == "dsnot" and only.ours["value"] == 7.0
    other = {**refined, "refine_options": json.dumps({"max_cycle_time": 5})}
    (only,) = pub.compare([row, other], [paper])
    assert only.differs == [("refine_options.max_cycle_time", 5, 50)]


def test_without_published_the_table_is_unchanged(tiny, tmp_path):
    folder, _ = tiny
    _write(tmp_path, _paper_of(tiny[1][0]), "hand.yaml")
    plain = invoke("leaderboard", "--dir", folder)
    assert "published" not in plain.stdout and "paper" not in plain.stdout
    beside = invoke("leaderboard", "--dir", folder, "--published", tmp_path)
    assert beside.stdout.startswith(plain.stdout)


def test_two_cells_of_one_protocol_are_the_same_protocol(tiny):
    folder, (a, b) = tiny
    r = run_diff(a["cell_key"][:12], b["cell_key"][:12], "--dir", folder)
    assert r.exit_code == ExitCode.OK, r.output
    assert "same protocol" in r.stdout
    assert "outside the protocol" in r.stdout and "batch_size (2 vs 4)" in r.stdout


def test_diff_refuses_unknown_and_ambiguous_sides_with_exit_2(tiny, tmp_path):
    folder, (a, _) = tiny
    r = run_diff("no-such-cell", a["cell_key"], "--dir", folder)
    assert r.exit_code == ExitCode.USAGE and "no cell matches 'no-such-cell'" in r.stderr
    assert "close:" in r.stderr
    r = run_diff("wanda", a["cell_key"], "--dir", folder)
    assert r.exit_code == ExitCode.USAGE and "matches 2 cells" in r.stderr and a["cell_key"][:12] in r.stderr
    _write(tmp_path, _paper_of(a), "hand.yaml")
    r = run_diff(a["cell_key"], "published:hand:tiny-wanda-x", "--dir", folder, "--published", tmp_path)
    assert r.exit_code == ExitCode.USAGE and "no row 'tiny-wanda-x'" in r.stderr and "did you mean" in r.stderr
    r = run_diff(a["cell_key"], "published:hnd:tiny-wanda", "--dir", folder, "--published", tmp_path)
    assert r.exit_code == ExitCode.USAGE and "no published file 'hnd'" in r.stderr


def test_published_rows_of_other_cells_are_left_out(tiny, tmp_path):
    folder, (row, _) = tiny
    other = _paper_of(row, model="someone/else")
    _write(tmp_path, copy.deepcopy(other), "hand.yaml")
    r = invoke("leaderboard", "--dir", folder, "--published", tmp_path)
    assert r.exit_code == ExitCode.OK, r.output
    assert "not compared" not in r.stdout and "is of a cell shown here" in r.stderr


@pytest.mark.skipif("diff" not in {c.name for c in app.registered_commands},
                    reason="`diff` is not registered in stadebench/cli/__init__.py yet")
def test_diff_is_a_command():
    r = invoke("diff", "--help")
    assert r.exit_code == ExitCode.OK and "same protocol" in r.stdout


def test_the_report_sets_published_rows_beside_the_cells(tiny, tmp_path):
    from stadebench.report import build_report

    folder, (row, _) = tiny
    (tmp_path / "pub").mkdir()
    _write(tmp_path / "pub", _paper_of(row, eval_seqlen=8), "hand.yaml")
    index = build_report(folder, tmp_path / "report", published=tmp_path / "pub")
    html = index.read_text(encoding="utf-8")
    assert '<h2 id="published">published</h2>' in html
    assert "not compared: protocol differs in eval_seqlen (ours 16 vs paper 8)" in html
    assert "published:hand:tiny-wanda" in html
    assert '<h2 id="published">' not in build_report(folder, tmp_path / "plain").read_text(encoding="utf-8")


# --- hostile published files: the suite's limits, plain values, numbers in range ----


def _bomb() -> str:
    lines = ["a: &a [" + ", ".join(["x"] * 100) + "]"]
    lines += [f"b{i}: &b{i} [" + ", ".join([f"*{'a' if i == 1 else f'b{i - 1}'}"] * 10) + "]" for i in range(1, 12)]
    return "\n".join(lines) + "\n"


def _with_value(value: str, row: int = 1) -> str:
    data = _good()
    data["rows"][row]["value"] = 123456.789
    return yaml.safe_dump(data, sort_keys=False).replace("123456.789", value)


@pytest.mark.parametrize(("text", "words"), [
    (_bomb(), ["expands to more than", "a published file holds a few hundred"]),
    ("rows:\n" + "  - " * 40 + "x\n", ["nested deeper than"]),
    ("citation: !!python/object/apply:os.system ['touch pwned']\nrows: []\n",
     [":1: invalid YAML", "python/object", "no tags"]),
    (_with_value(".nan"), ["rows[1]", "value: nan is not a finite number"]),
    (_with_value(".inf"), ["rows[1]", "value: inf is not a finite number"]),
    (_with_value("0.5"), ["rows[1]", "a perplexity is at least 1, not 0.5"]),
])
def test_a_hostile_published_file_is_refused_in_one_line_before_any_figure(tmp_path, text, words):
    import subprocess
    import sys

    folder = tmp_path / "published"
    folder.mkdir()
    (folder / "hostile.yaml").write_text(text, encoding="utf-8")
    with pytest.raises(pub.PublishedError) as info:
        pub.load_published(folder)
    for word in words:
        assert word in str(info.value), str(info.value)
    from stadebench.results.row import Row

    board = tmp_path / "lb"
    lb.write_rows(board, [Row(model="m", dtype="float32", metric="dense", metric_options={}, sparsity=0.0,
                              evaluator="perplexity", eval_options={}, task="wikitext2", score="ppl", value=10.0,
                              higher_is_better=False, status="ok", suite="s")])
    exe = Path(sys.executable).with_name("stadebench")
    for args in (["leaderboard", "--dir", board, "--published", folder],
                 ["report", board, "--published", folder, "-o", tmp_path / "report"]):
        done = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=120)
        assert done.returncode == ExitCode.USAGE, (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and "hostile.yaml" in lines[0], done.stderr
        assert "Traceback" not in done.stderr and not (tmp_path / "pwned").exists()
    assert not (tmp_path / "report").exists()


def test_the_protocol_is_built_from_the_rows_counted_fields():
    # one declaration: each knob's type comes from the suite field it is read from
    from typing import get_args

    fields = pub.Protocol.model_fields
    assert list(fields)[-2:] == ["eval_joiner", "eval_options"]
    assert fields["model"].is_required() and fields["calib_n"].is_required()
    assert set(get_args(get_args(fields["dtype"].annotation)[0]) or get_args(fields["dtype"].annotation)) == {
        "float32", "float16", "bfloat16"}
    knobs = pub.load_file(PUBLISHED / "wanda-llama2.yaml")[3].model_dump(include=set(fields))
    assert pub.Protocol.model_validate(knobs).calib_n == knobs["calib_n"]
    with pytest.raises(Exception, match="greater than or equal to 1"):
        pub.Protocol.model_validate({**knobs, "calib_n": 0})


def test_the_reproducing_page_names_every_knob():
    page = (REPO / "docs" / "reproducing.md").read_text(encoding="utf-8")
    assert [k for k in pub.PROTOCOL_KNOBS if f"`{k}`" not in page] == []
