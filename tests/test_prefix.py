"""Shared-prefix log-likelihoods (stadebench.evaluation.prefix) against lm-eval's own
``HFLM`` path: every request's log-likelihood within 1e-4 in float32 (two float32 steps
where the value is beyond ±1024, as a 50-token continuation's can be) and ``is_greedy``
identical, on tiny random models of three families (with and without a pad token, either
padding side), and on the real SmolLM2 with the offline tasks, where every accuracy is
identical."""

from __future__ import annotations

import importlib.util
import random

import pytest
import torch

from conftest import make_tiny
from tinymodel import build_tokenizer, corpus_text

pytestmark = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval is not installed")

BOUND = 1e-4


def within(a: float, b: float) -> bool:
    """1e-4 absolute, or two float32 steps of the value where one step is larger (|ll| > 1024:
    float32 itself cannot tell values 1e-4 apart there)."""
    return abs(a - b) <= max(BOUND, 2 * 2.0 ** -23 * max(abs(a), abs(b)))


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(corpus_text())


def _lms(model, tokenizer, batch_size=8):
    from lm_eval.models.huggingface import HFLM

    from stadebench.evaluation.prefix import shared_prefix_class

    return (HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size),
            shared_prefix_class()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size))


def _greedy(model, context, n):
    """The model's own greedy continuation of ``context``: a request whose is_greedy is True."""
    ids = list(context)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(context):]


def _requests(model, seed=0, vocab=128, docs=24):
    """Multiple-choice-like requests: contexts of 1-40 tokens, 1-5 continuations of 1-9
    tokens each (one of them the greedy one), shuffled across documents."""
    rng = random.Random(seed)
    out = []
    for d in range(docs):
        context = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 40))]
        choices = [[rng.randrange(3, vocab) for _ in range(rng.randint(1, 9))] for _ in range(rng.randint(1, 4))]
        choices.append(_greedy(model, context, rng.randint(1, 4)))
        out += [((f"doc{d}", f"choice{c}"), context, cont) for c, cont in enumerate(choices)]
    rng.shuffle(out)
    return out


def _compare(stock, fast, requests):
    a = stock._loglikelihood_tokens(requests, disable_tqdm=True)
    b = fast._loglikelihood_tokens(requests, disable_tqdm=True)
    assert len(a) == len(b) == len(requests)
    assert all(within(x[0], y[0]) for x, y in zip(a, b)), max(abs(x[0] - y[0]) for x, y in zip(a, b))
    assert [x[1] for x in a] == [y[1] for y in b]
    return a, b


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
@pytest.mark.parametrize("pad", ["none", "left", "right"])
def test_every_request_matches_the_stock_path(family, pad, tokenizer):
    model = make_tiny(family)
    tok = build_tokenizer(corpus_text())
    if pad == "none":
        tok.pad_token = None
    else:
        tok.pad_token, tok.padding_side = "</s>", pad
    stock, fast = _lms(model, tok, batch_size=3)
    a, _ = _compare(stock, fast, _requests(model))
    assert sum(greedy for _, greedy in a) >= 24  # the greedy choices are recognised as such on both paths


def test_batches_of_one_and_many_choices(tokenizer):
    model = make_tiny("llama")
    requests = _requests(model, seed=1)
    for batch_size in (1, 2, 64):
        _compare(*_lms(model, tokenizer, batch_size), requests)


def test_requests_longer_than_the_window_take_the_stock_path(tokenizer, monkeypatch):
    import stadebench.evaluation.prefix as prefix

    model = make_tiny("llama")  # max_position_embeddings 128
    stock, fast = _lms(model, tokenizer)
    long_context = list(range(3, 123)) * 2  # 240 tokens: lm-eval cuts it from the left
    requests = [(("long", "a"), long_context, [5, 6]), (("short", "a"), [7, 8, 9], [10])]
    seen = []
    real = prefix.score_contexts

    def spy(model, contexts, *args):
        seen.extend(contexts)
        return real(model, contexts, *args)

    monkeypatch.setattr(prefix, "score_contexts", spy)
    _compare(stock, fast, requests)
    assert seen == [[7, 8, 9]]


def test_a_model_without_a_cache_takes_the_stock_path(tokenizer, monkeypatch):
    model = make_tiny("llama")
    stock, fast = _lms(model, tokenizer)
    requests = _requests(model, docs=4)
    forward = model.forward

    def no_cache(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.cache = None
        return out

    monkeypatch.setattr(model, "forward", no_cache)
    _compare(stock, fast, requests)


def test_the_evaluator_records_which_path_ran():
    from stadebench.plugins import resolve_plugin

    assert resolve_plugin("evaluator", "lm-eval").options.fast is True
    assert resolve_plugin("evaluator", "lm-eval", {"fast": False}).options.fast is False


# --- the real model on the offline tasks ----------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


@pytest.mark.slow
def test_offline_tasks_give_the_stock_accuracies_on_smollm2(smollm2, smollm2_tokenizer, monkeypatch):
    """arc_easy, piqa and lambada_openai at the default suite's limit (50), both paths:
    each request within the bound, is_greedy and every accuracy identical."""
    from lm_eval.models.huggingface import HFLM

    from stadebench.evaluation.lmeval import LmEval

    answers: dict[bool, dict] = {True: {}, False: {}}
    real = HFLM._loglikelihood_tokens
    scores = {}
    for fast in (False, True):
        evaluator = LmEval({"tasks": ["arc_easy", "piqa", "lambada_openai"], "limit": 50, "source": "offline",
                            "bootstrap_iters": 0, "fast": fast})
        if fast:
            from stadebench.evaluation.prefix import shared_prefix_class

            cls = shared_prefix_class()
            monkeypatch.setattr(cls, "_loglikelihood_tokens", _recording(cls._loglikelihood_tokens, answers[True]))
        else:
            monkeypatch.setattr(HFLM, "_loglikelihood_tokens", _recording(real, answers[False]))
        scores[fast] = {(s.task, s.name): s.value for s in evaluator.evaluate(smollm2, smollm2_tokenizer, "cpu")}
        monkeypatch.undo()
    assert answers[True].keys() == answers[False].keys() and len(answers[True]) >= 300
    assert all(within(answers[True][k][0], answers[False][k][0]) for k in answers[True])
    assert all(answers[True][k][1] == answers[False][k][1] for k in answers[True])
    accuracies = {k for k in scores[False] if k[1] in ("acc", "acc_norm")}
    assert len(accuracies) == 5 and all(scores[True][k] == scores[False][k] for k in accuracies)
    assert scores[True][("lambada_openai", "perplexity")] == pytest.approx(scores[False][("lambada_openai",
                                                                                         "perplexity")], rel=1e-4)


def _recording(method, into: dict):
    def recorded(self, requests, disable_tqdm=False, override_bs=None):
        out = method(self, requests, disable_tqdm, override_bs)
        for (key, context, continuation), answer in zip(requests, out):
            into[(key, tuple(context), tuple(continuation))] = answer
        return out
    return recorded


def test_padding_is_counted(tokenizer):
    model = make_tiny("llama")
    _, fast = _lms(model, tokenizer, batch_size=4)
    fast._loglikelihood_tokens(_requests(model, seed=3), disable_tqdm=True)
    tokens, padding = fast.counts["tokens"], fast.counts["padding"]
    assert tokens > 0 and 0 <= padding < tokens


def test_passes_keep_to_the_budget_and_the_padding_cap():
    from stadebench.evaluation.prefix import MAX_PADDING, packed

    lengths = sorted([random.Random(5).randint(1, 60) for _ in range(300)], reverse=True)
    groups = list(packed(lengths, budget=8 * 64))
    assert sorted(k for g in groups for k in g) == list(range(300))
    for group in groups:
        size = len(group) * lengths[group[0]]
        assert len(group) == 1 or size <= 8 * 64
        assert size - sum(lengths[k] for k in group) <= MAX_PADDING * size
