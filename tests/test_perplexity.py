"""The perplexity evaluator against a naive per-window computation."""

from __future__ import annotations

import math
import random

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import stadebench
from stadebench.data.calibration import eval_tokens
from stadebench.data.datasets import TextFiles
from stadebench.errors import ConfigError
from stadebench.evaluation.perplexity import Perplexity
from stadebench.plugins import reset_plugins
from stadebench.results.paired import aggregate

WORDS = "the of and to in a is that for it as was with be by on not river stone light garden window".split()


def paragraphs(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 80))) + "." for _ in range(count)]


@pytest.fixture(scope="module")
def tokenizer():
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(paragraphs(0, 100), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(autouse=True)
def plugins(tmp_path, monkeypatch):
    monkeypatch.setenv("STADEBENCH_CACHE", str(tmp_path / "cache"))
    reset_plugins()
    yield stadebench.get_plugins()
    reset_plugins()


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("\n\n".join(paragraphs(1, 40)), encoding="utf-8")
    return {"name": "text", "options": {"path": str(path), "test_fraction": 0.5}}


def naive_ppl(model, stream: torch.Tensor, seqlen: int, limit: int | None = None) -> float:
    windows = stream.numel() // seqlen
    if limit is not None:
        windows = min(windows, limit)
    with torch.no_grad():
        losses = [model(input_ids=stream[i * seqlen:(i + 1) * seqlen][None],
                        labels=stream[i * seqlen:(i + 1) * seqlen][None]).loss.item() for i in range(windows)]
    return math.exp(sum(losses) / len(losses))


def test_evaluator_is_registered(plugins):
    assert "perplexity" in plugins.evaluators.names()
    assert plugins.evaluators.get("perplexity").cls is Perplexity


def test_matches_naive_computation(model, tokenizer, text):
    (score,) = Perplexity({"dataset": text, "seqlen": 32, "batch_size": 3}).evaluate(model, tokenizer)
    stream = eval_tokens(TextFiles(text["options"]), tokenizer, "test")
    assert score.value == pytest.approx(naive_ppl(model, stream, 32), rel=1e-5)
    assert (score.task, score.name, score.higher_is_better, score.stderr) == ("text", "ppl", False, None)
    d = score.details
    assert d["windows"] == stream.numel() // 32 >= 8 and d["tokens"] == d["windows"] * 32
    assert (d["seqlen"], d["split"], d["max_windows"]) == (32, "test", None)
    assert d["dataset_fingerprint"] == TextFiles(text["options"]).fingerprint()
    # the windows are its items: index, mean NLL per predicted token, predicted tokens as weight
    assert [i["id"] for i in score.items] == list(range(d["windows"])) and score.aggregate == "exp_mean"
    assert {i["weight"] for i in score.items} == {31}
    assert aggregate(score.items, score.aggregate) == pytest.approx(score.value, rel=1e-12)


def test_batch_size_does_not_change_the_result(model, tokenizer, text):
    one = Perplexity({"dataset": text, "seqlen": 32, "batch_size": 1}).evaluate(model, tokenizer)[0].value
    four = Perplexity({"dataset": text, "seqlen": 32, "batch_size": 4}).evaluate(model, tokenizer)[0].value
    assert one == pytest.approx(four, rel=1e-5)


def test_max_windows(model, tokenizer, text):
    (score,) = Perplexity({"dataset": text, "seqlen": 16, "max_windows": 3}).evaluate(model, tokenizer)
    stream = eval_tokens(TextFiles(text["options"]), tokenizer, "test")
    assert score.details["windows"] == 3 and score.details["max_windows"] == 3
    assert score.value == pytest.approx(naive_ppl(model, stream, 16, limit=3), rel=1e-5)


def test_training_mode_is_restored(model, tokenizer, text):
    model.train()
    try:
        Perplexity({"dataset": text, "seqlen": 32, "max_windows": 1}).evaluate(model, tokenizer)
        assert model.training
    finally:
        model.eval()


def test_seqlen_errors(model, tokenizer, text, tmp_path):
    with pytest.raises(ConfigError, match="max_position_embeddings=128"):
        Perplexity({"dataset": text, "seqlen": 129}).evaluate(model, tokenizer)
    path = tmp_path / "tiny.txt"
    path.write_text("the river", encoding="utf-8")
    tiny = {"name": "text", "options": {"path": str(path), "test_fraction": 1.0}}
    with pytest.raises(ConfigError, match=r"has \d+ tokens, fewer than one window of seqlen=64"):
        Perplexity({"dataset": tiny, "seqlen": 64}).evaluate(model, tokenizer)


def test_options_are_validated():
    with pytest.raises(ConfigError, match="seqlen"):
        Perplexity({"seqlen": 1})
    with pytest.raises(ConfigError, match="window"):
        Perplexity({"window": 3})
    with pytest.raises(ConfigError, match="did you mean 'wikitext2'"):
        Perplexity({"dataset": "wikitext"}).dataset()


def test_dataset_evaluation_limits(model, tokenizer, plugins):
    """A dataset's eval_documents / eval_windows (C4: 1100 documents, 256 windows) apply."""

    class Tiny(stadebench.Dataset):
        name, version, join = "tiny", "1", " "
        eval_documents, eval_windows = 30, 4

        def documents(self, split):
            return paragraphs(5, 50)

    class Plugin:
        @stadebench.hookimpl
        def register_datasets(self, register):
            register(Tiny)

    plugins.register(Plugin(), name="tiny-plugin")
    (score,) = Perplexity({"dataset": "tiny", "seqlen": 16}).evaluate(model, tokenizer)
    stream = torch.tensor(tokenizer(" ".join(paragraphs(5, 50)[:30]))["input_ids"])
    assert score.details["stream_tokens"] == stream.numel()
    assert score.details["windows"] == 4
    assert score.value == pytest.approx(naive_ppl(model, stream, 16, limit=4), rel=1e-5)
