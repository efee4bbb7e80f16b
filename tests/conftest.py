"""Shared fixtures: the real SmolLM2-135M (truncated to its first blocks) with real-text
calibration windows, tiny random models of six families with random-token calibration,
and a one-thread switch for torch."""

from __future__ import annotations

import copy
import types
from pathlib import Path

import pytest
import torch

import stadebench
from stadebench.plugins import get_plugins, reset_plugins

#: Decoder blocks kept from SmolLM2's 30: enough for the sequential protocol (block 1
#: sees the pruned block 0), cheap enough to prune many times on a CPU.
SMOL_BLOCKS = 2

# A few paragraphs of ordinary English, varied sentence by sentence so that the
# calibration windows are not one repeated phrase.
_SENTENCES = [
    "The river had risen overnight, and by morning the low fields near the mill were under water.",
    "Farmers walked the embankment with long poles, testing the soft ground before each step.",
    "In the town, the baker opened an hour early because nobody could sleep through the rain.",
    "Children gathered at the bridge to watch branches and whole fence posts drift past.",
    "The schoolteacher used the flood to explain how a watershed collects water from the hills.",
    "Engineers later measured the flow and found it was the highest since records began in 1871.",
    "A committee was formed to decide whether the old stone weir should be rebuilt or removed.",
    "Some argued that the weir protected the mill; others said it made the flooding worse upstream.",
    "After three long meetings, the council voted to commission a study of the whole valley.",
    "The study took two years, and its final report ran to more than four hundred pages.",
    "It recommended planting trees on the steep slopes and restoring the wetlands by the lake.",
    "Most people never read the report, but everyone remembered the morning the river came to town.",
]


def english_text(n_sentences: int = 400) -> str:
    """Deterministic English prose: the sentences above in a shifting order."""
    out = []
    for i in range(n_sentences):
        out.append(_SENTENCES[(i * 7 + i // len(_SENTENCES)) % len(_SENTENCES)])
    return " ".join(out)


@pytest.fixture
def single_thread():
    """Run torch on one thread for the test: the tensors here are small, and on a shared
    machine a second intra-op thread makes small ops many times slower, not faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The SmolLM2-135M Hugging Face folder (downloaded and converted on first use)."""
    from stadebench.data import assets

    return Path(assets.fetch("smollm2-135m"))


@pytest.fixture(scope="session")
def _smollm2_truncated(smollm2_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    model.model.layers = model.model.layers[:SMOL_BLOCKS]
    model.config.num_hidden_layers = SMOL_BLOCKS
    return model.eval()


@pytest.fixture
def smollm2(_smollm2_truncated):
    """A fresh SmolLM2-135M with only its first SMOL_BLOCKS decoder blocks (float32)."""
    return copy.deepcopy(_smollm2_truncated)


@pytest.fixture(scope="session")
def smollm2_calibration(smollm2_path) -> torch.Tensor:
    """8 windows x 64 tokens of tokenised English text, LongTensor [8, 64]."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    ids = tokenizer(english_text(), return_tensors="pt").input_ids[0]
    assert ids.numel() >= 8 * 64
    return ids[: 8 * 64].reshape(8, 64).clone()


def _tiny_config(family: str, layers: int):
    import transformers as T

    attn = dict(num_hidden_layers=layers, num_attention_heads=4, vocab_size=128, max_position_embeddings=128)
    if family in ("llama", "mistral", "qwen2"):
        cls = {"llama": T.LlamaConfig, "mistral": T.MistralConfig, "qwen2": T.Qwen2Config}[family]
        return cls(hidden_size=64, intermediate_size=128, num_key_value_heads=2, **attn)
    if family == "opt":
        return T.OPTConfig(hidden_size=64, ffn_dim=128, word_embed_proj_dim=64, **attn)
    if family == "gpt-neox":
        return T.GPTNeoXConfig(hidden_size=64, intermediate_size=128, **attn)
    if family == "gpt2":
        return T.GPT2Config(n_embd=64, n_layer=layers, n_head=4, vocab_size=128, n_positions=128,
                            bos_token_id=0, eos_token_id=0)
    raise ValueError(family)


FAMILIES = {  # family -> transformers class name
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "opt": "OPTForCausalLM", "gpt-neox": "GPTNeoXForCausalLM", "gpt2": "GPT2LMHeadModel",
}


def make_tiny(family: str = "llama", seed: int = 0, layers: int = 2):
    """A random causal LM of ``family``: hidden 64, 4 heads, MLP 128 (GPT-2: 256), vocab 128."""
    import transformers

    torch.manual_seed(seed)
    return getattr(transformers, FAMILIES[family])(_tiny_config(family, layers)).eval()


@pytest.fixture
def tiny_llama():
    """A fresh random 2-block Llama (same weights every time)."""
    return make_tiny("llama")


@pytest.fixture
def tiny_factory():
    """``make_tiny(family, seed, layers)``, for tests that need other families or seeds."""
    return make_tiny


@pytest.fixture(scope="session")
def tiny_calibration() -> torch.Tensor:
    """8 windows x 32 random token ids for the tiny models (vocab 128)."""
    return torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1234))


# ----------------------------------------------------------------------------------------
# a metric plugin whose score always raises


class Explode(stadebench.Metric):
    """A metric whose score always raises."""

    name = "explode"
    version = "7"

    def score(self, weight, stats):
        raise RuntimeError("boom in the score")


explode_plugin = types.ModuleType("explode_plugin")


@stadebench.hookimpl
def _register_explode(register):
    register(Explode)


explode_plugin.register_metrics = _register_explode


@pytest.fixture
def exploding():
    """The `explode` metric registered as a plugin named `explode-plugin`."""
    reset_plugins()
    get_plugins().register(explode_plugin, name="explode-plugin")
    yield "explode"
    reset_plugins()
