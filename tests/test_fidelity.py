"""The fidelity evaluator (stadebench.evaluation.fidelity): exact KL from the dense model's
next-token distribution and top-1 agreement, on tiny models and through a suite."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny
from tinymodel import load_tiny_suite, shared_assets

from stadebench.errors import ConfigError
from stadebench.evaluation.fidelity import divergence
from stadebench.results.paired import aggregate


def _swap(model, dense_state):
    """A CellContext.dense stand-in: the dense weights in, the model's own back after."""
    @contextlib.contextmanager
    def dense():
        own = copy.deepcopy(model.state_dict())
        model.load_state_dict(dense_state)
        try:
            yield
        finally:
            model.load_state_dict(own)
    return dense


def test_kl_and_agreement_are_the_definitions():
    dense = make_tiny("llama", seed=0)
    pruned = copy.deepcopy(dense)
    with torch.no_grad():
        for module in pruned.modules():
            if isinstance(module, torch.nn.Linear) and module is not pruned.lm_head:
                module.weight.mul_(torch.rand_like(module.weight) > 0.5)
    ids = torch.randint(0, 128, (3, 20), generator=torch.Generator().manual_seed(0))
    before = copy.deepcopy(pruned.state_dict())
    kl, agree, _ = divergence(pruned, ids, 2, torch.device("cpu"), _swap(pruned, dense.state_dict()))
    with torch.no_grad():
        p = F.log_softmax(dense(ids).logits[:, :-1].double(), -1)
        q = F.log_softmax(pruned(ids).logits[:, :-1].double(), -1)
    expected = (p.exp() * (p - q)).sum(-1).mean(-1)
    torch.testing.assert_close(torch.tensor(kl, dtype=torch.float64), expected, rtol=1e-4, atol=1e-6)
    assert agree == (p.argmax(-1) == q.argmax(-1)).double().mean(-1).tolist()
    assert all(k > 0 for k in kl) and all(0 <= a < 1 for a in agree)
    # the model holds its pruned weights again
    assert all(torch.equal(before[k], v) for k, v in pruned.state_dict().items())


def test_the_dense_model_against_itself():
    model = make_tiny("opt")
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    kl, agree, _ = divergence(model, ids, 4, torch.device("cpu"), _swap(model, model.state_dict()))
    assert kl == [0.0, 0.0] and agree == [1.0, 1.0]


def test_outside_a_cell_it_says_what_it_needs():
    from stadebench.plugins import resolve_plugin

    evaluator = resolve_plugin("evaluator", "fidelity", {"dataset": "enwiki-2016", "seqlen": 16, "max_windows": 1})
    with pytest.raises(ConfigError, match="compares a pruned model with its dense weights"):
        evaluator.evaluate(make_tiny("llama"), None)


@pytest.fixture
def assets(tmp_path_factory):
    return shared_assets(tmp_path_factory)


def test_through_a_suite(tmp_path, assets, monkeypatch):
    from stadebench.results.store import read
    from stadebench.runner.run import run_suite

    monkeypatch.setenv("STADEBENCH_CACHE", str(tmp_path / "cache"))
    text = {"name": "text", "options": {"path": str(assets["corpus"])}}
    evaluations = [{"name": "perplexity", "options": {"dataset": text, "seqlen": 16, "batch_size": 4,
                                                      "max_windows": 4}},
                   {"name": "fidelity", "options": {"dataset": text, "seqlen": 16, "batch_size": 3,
                                                    "max_windows": 4}}]
    suite = load_tiny_suite(tmp_path, assets, metrics=["magnitude", "wanda"], evaluations=evaluations)
    summary = run_suite(suite)
    assert not summary.failed
    rows = {(r["metric"], r["score"]): r for r in read(tmp_path / "lb").to_pylist() if r["evaluator"] == "fidelity"}
    assert rows[("dense", "kl")]["value"] == 0.0 and rows[("dense", "top1_agreement")]["value"] == 1.0
    for metric in ("magnitude", "wanda"):
        assert rows[(metric, "kl")]["value"] > 0 and 0 <= rows[(metric, "top1_agreement")]["value"] <= 1
        assert rows[(metric, "kl")]["higher_is_better"] is False
    # the pruned cells were evaluated on their pruned weights: perplexity differs from the dense one
    ppl = {r["metric"]: r["value"] for r in read(tmp_path / "lb").to_pylist() if r["evaluator"] == "perplexity"}
    assert ppl["magnitude"] != ppl["dense"]
    for r in read(tmp_path / "lb").to_pylist():  # every row carries its windows as items, which give it back
        assert [i["id"] for i in r["items"]] == [0, 1, 2, 3] and {i["weight"] for i in r["items"]} == {15}
        assert aggregate(r["items"], r["item_aggregate"]) == pytest.approx(r["value"], rel=1e-12, abs=1e-15)


def test_perplexity_takes_fidelitys_pass_and_gets_the_same_numbers(tmp_path, assets, monkeypatch):
    """One forward pass per window for both measures when their windows and batches agree,
    every value the same, bit for bit, as perplexity's own pass."""
    import json

    from stadebench.results.store import read
    from stadebench.runner.run import run_suite

    monkeypatch.setenv("STADEBENCH_CACHE", str(tmp_path / "cache"))
    options = {"dataset": {"name": "text", "options": {"path": str(assets["corpus"])}}, "seqlen": 16,
               "batch_size": 3, "max_windows": 5}
    both = [{"name": "perplexity", "options": options}, {"name": "fidelity", "options": options}]
    rows = {}
    for name, evaluations in (("both", both), ("alone", both[:1])):
        (tmp_path / name).mkdir()
        suite = load_tiny_suite(tmp_path / name, assets, metrics=["wanda"], evaluations=evaluations)
        assert not run_suite(suite).failed
        rows[name] = {(r["metric"], r["score"]): r for r in read(tmp_path / name / "lb").to_pylist()}
    for metric in ("dense", "wanda"):
        shared, alone = rows["both"][(metric, "ppl")], rows["alone"][(metric, "ppl")]
        assert shared["value"] == alone["value"] and shared["items"] == alone["items"]
        assert shared["cell_key"] == alone["cell_key"]
        assert json.loads(shared["details"])["eval"]["shared_pass"] is True
        assert json.loads(alone["details"])["eval"]["shared_pass"] is False
    assert rows["both"][("wanda", "kl")]["value"] > 0
