"""A tiny random Llama with its own word-level tokenizer, saved as a local HF folder,
plus a local English corpus: what runner and CLI tests put in suites to run in seconds.

Helpers only (no fixtures): tests/test_runner.py and tests/test_cli.py wrap them in
session-scoped fixtures of their own.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import yaml

# Ordinary English sentences; paragraphs are cut from them in a shifting order so that
# the corpus has many distinct documents (the `text` dataset holds out every 5th one).
_SENTENCES = [
    "The harbour was quiet in the early morning before the fishing boats went out.",
    "A gull stood on the railing and watched the nets being folded on the deck.",
    "Old sailors say that the weather turns when the wind comes from the east.",
    "The lighthouse keeper wrote the time of every passing ship in a thick book.",
    "In winter the roads to the village were often closed for several days.",
    "Children learned to read the tide tables long before they learned to swim.",
    "The market opened at seven and sold bread, cheese, apples and fresh fish.",
    "Every spring the town painted the boats in bright colours of red and blue.",
    "A small museum kept maps of the coast drawn more than two hundred years ago.",
    "The school stood on the hill, and from its windows one could see the sea.",
    "Visitors came in summer to walk along the cliffs and watch the seals below.",
    "At night the lamps of the houses were reflected in the dark water of the bay.",
    "The baker said that the best bread needs time, patience and a warm kitchen.",
    "When the storm came, the whole village gathered in the church to wait it out.",
    "The river that ran into the harbour carried sand from the mountains to the sea.",
    "Some families had lived in the same stone houses for many generations.",
]


def corpus_text(paragraphs: int = 40, sentences_per_paragraph: int = 5) -> str:
    """Deterministic English prose: blank-line separated paragraphs of shuffled sentences."""
    out, k = [], 0
    for p in range(paragraphs):
        sentences = []
        for _ in range(sentences_per_paragraph):
            sentences.append(_SENTENCES[(k * 7 + p) % len(_SENTENCES)])
            k += 1
        out.append(" ".join(sentences))
    return "\n\n".join(out) + "\n"


def build_tokenizer(text: str):
    """A word-level fast tokenizer trained on ``text``; it prepends BOS like Llama's."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], trainers.WordLevelTrainer(special_tokens=special))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def build_model(vocab_size: int, seed: int = 0, hidden: int = 32, layers: int = 2):
    """A random LlamaForCausalLM: hidden 32, 4 heads (2 kv), MLP 64, no biases."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
                         max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def make_assets(root: Path) -> dict[str, Path]:
    """Write ``root/tiny`` (model + tokenizer) and ``root/corpus.txt``; return their paths."""
    root.mkdir(parents=True, exist_ok=True)
    corpus = root / "corpus.txt"
    text = corpus_text()
    corpus.write_text(text, encoding="utf-8")
    tokenizer = build_tokenizer(text)
    model = build_model(len(tokenizer))
    folder = root / "tiny"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {"model": folder, "corpus": corpus}


def suite_dict(assets: dict[str, Path], *, name: str = "tiny", leaderboard: Path | str = "leaderboard",
               metrics=("magnitude", "wanda"), patterns=("unstructured",), sparsities=(0.5,),
               **extra) -> dict:
    """A suite over the tiny model: text-file calibration (4 × 16 tokens), perplexity (4 × 16)."""
    text = {"name": "text", "options": {"path": str(assets["corpus"])}}
    suite = {
        "name": name,
        "leaderboard": str(leaderboard),
        "device": "cpu",
        "models": [{"id": str(assets["model"])}],
        "metrics": list(metrics),
        "patterns": list(patterns),
        "sparsities": list(sparsities),
        "calibration": {"dataset": text, "n": 4, "seqlen": 16, "seed": 0, "batch_size": 2},
        "evaluations": [{"name": "perplexity",
                         "options": {"dataset": text, "seqlen": 16, "batch_size": 4, "max_windows": 4}}],
    }
    suite.update(extra)
    return suite


def write_suite(path: Path, suite: dict | str) -> Path:
    """Write a suite (a dict, or YAML text dedented) to ``path``."""
    text = textwrap.dedent(suite) if isinstance(suite, str) else yaml.safe_dump(suite, sort_keys=False)
    path.write_text(text, encoding="utf-8")
    return path


def load_tiny_suite(folder: Path, assets: dict[str, Path], file: str = "suite.yaml", **kwargs):
    """``suite_dict`` written to ``folder / file`` and loaded; the leaderboard defaults to ``folder / "lb"``."""
    from stadebench.suite import load_suite

    kwargs.setdefault("leaderboard", folder / "lb")
    return load_suite(write_suite(folder / file, suite_dict(assets, **kwargs)))


_SHARED: dict[str, dict[str, Path]] = {}


def shared_assets(tmp_path_factory) -> dict[str, Path]:
    """``make_assets`` once per test session, whichever module asks first."""
    if "assets" not in _SHARED:
        _SHARED["assets"] = make_assets(tmp_path_factory.mktemp("tiny-assets"))
    return _SHARED["assets"]
