"""Zero-shot evaluation against its forward-pass floor: the real SmolLM2-135M on the
offline ARC-Easy, PIQA, HellaSwag and LAMBADA documents (the first ``LIMIT``), through
``LmEval.evaluate`` on lm-eval's own path (``fast: false``) and on shared prefixes
(``fast: true``), against the floor measured in the same process: one plain forward pass
over each distinct context and one over each continuation, batch 1, nothing else; and the
same forwards batched 8 at a time by length, which on a CPU cost much less than one at a
time. ``ratio_to_floor`` / ``ratio_to_batched_floor`` are what the evaluation costs beyond
those floors (task set-up, request building and metrics included); ``ratio_to_stock`` what
shared prefixes save.

Timing only (skipped when benchmarks are disabled): tests/test_prefix.py holds the two
paths to the same values. ``$STADEBENCH_BENCH_LMEVAL_LIMIT`` sets the documents per task
(default 20, to keep the gate's four processes within minutes; the note's figures are at 50).
"""

from __future__ import annotations

import os

import pytest
import torch

from .conftest import record

pytest.importorskip("lm_eval")

TASKS = ["arc_easy", "piqa", "hellaswag", "lambada_openai"]
LIMIT = int(os.environ.get("STADEBENCH_BENCH_LMEVAL_LIMIT", "20"))


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stadebench.data import assets

    path = assets.fetch("smollm2-135m")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def requests(smollm2):
    """Each task's log-likelihood requests as token lists, as lm-eval builds them."""
    from lm_eval.models.huggingface import HFLM

    from stadebench.evaluation.lmeval import prepare_tasks

    model, tokenizer = smollm2
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8)
    out = {}
    for prepared in prepare_tasks(TASKS, "offline"):
        task = prepared.loaded["tasks"][prepared.name]
        task.build_all_requests(limit=LIMIT, rank=0, world_size=1)
        out[prepared.name] = [lm._encode_pair(*instance.args) for instance in task.instances]
    return out


def _skip_unless_timed(benchmark):
    if benchmark.disabled:
        pytest.skip("timing only: tests/test_prefix.py checks the values")


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_lmeval_floor(benchmark, minima, smollm2, requests, task):
    _skip_unless_timed(benchmark)
    benchmark.group = f"lm-eval {task}"
    model, _ = smollm2
    contexts = {tuple(context) for context, _ in requests[task]}
    continuations = [continuation for _, continuation in requests[task]]

    def floor():
        with torch.inference_mode():
            for tokens in [*contexts, *continuations]:
                model(input_ids=torch.tensor([tokens]), use_cache=False)

    benchmark.pedantic(floor, rounds=1, iterations=1)
    benchmark.extra_info.update(contexts=len(contexts), requests=len(continuations),
                                tokens=sum(map(len, contexts)) + sum(map(len, continuations)))
    record(benchmark, minima, f"lmeval:{task}:floor")


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_lmeval_floor_batched(benchmark, minima, smollm2, requests, task):
    """The same plain forwards, batched 8 at a time by length (a CPU runs a batch of short
    sequences in little more time than one): the floor a batched evaluator can reach."""
    _skip_unless_timed(benchmark)
    benchmark.group = f"lm-eval {task}"
    model, _ = smollm2
    sequences = sorted({tuple(context) for context, _ in requests[task]}, key=len, reverse=True)
    sequences += sorted((tuple(c) for _, c in requests[task]), key=len, reverse=True)

    def floor():
        with torch.inference_mode():
            for start in range(0, len(sequences), 8):
                batch = sequences[start:start + 8]
                ids = torch.zeros((len(batch), max(map(len, batch))), dtype=torch.long)
                for r, tokens in enumerate(batch):
                    ids[r, :len(tokens)] = torch.tensor(tokens)
                model(input_ids=ids, use_cache=False)

    benchmark.pedantic(floor, rounds=1, iterations=1)
    record(benchmark, minima, f"lmeval:{task}:floor-batched")


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("fast", [False, True], ids=["stock", "shared-prefix"])
def test_lmeval_evaluate(benchmark, minima, smollm2, requests, task, fast):
    _skip_unless_timed(benchmark)
    from stadebench.evaluation.lmeval import LmEval

    benchmark.group = f"lm-eval {task}"
    model, tokenizer = smollm2
    options = {"tasks": [task], "limit": LIMIT, "source": "offline", "bootstrap_iters": 0, "batch_size": 8}
    if "fast" in LmEval.Options.model_fields:  # the base tree may predate it: its only path is the stock one
        options["fast"] = fast
    elif fast:
        pytest.skip("this tree has no shared-prefix path")
    evaluator = LmEval(options)
    scores = benchmark.pedantic(lambda: evaluator.evaluate(model, tokenizer, "cpu"), rounds=1, iterations=1)
    assert any(s.name == "acc" for s in scores)
    ratios = {"ratio_to_floor": f"lmeval:{task}:floor", "ratio_to_batched_floor": f"lmeval:{task}:floor-batched"}
    if fast:
        ratios["ratio_to_stock"] = f"lmeval:{task}:stock"
    record(benchmark, minima, f"lmeval:{task}:{'fast' if fast else 'stock'}", **ratios)
