"""Saving a pruned model: plain transformers reloads it with the same logits and the biases
STADE added, sparsity.json matches the saved weights, the card says what was done, a bad
output folder fails before any work, and a failed save leaves nothing half-written."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import stadebench
from stadebench.runner import save
from stadebench.runner.save import ModelCard, card_from_report, check_out_dir, folder_name, save_pruned, verify
from stadebench.errors import ConfigError
from tinymodel import build_tokenizer, corpus_text

pytestmark = pytest.mark.usefixtures("single_thread")

CALIB = {"dataset": "text", "seed": 0}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(corpus_text())


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def reload(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def saved_keys(folder) -> set[str]:
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        return set(f.keys())


def test_stade_round_trip(tiny_llama, tiny_calibration, tokenizer, tmp_path):
    report = stadebench.prune(tiny_llama, tiny_calibration, "stade", "unstructured", 0.5, device="cpu")
    assert all(layer.bias_added for layer in report.layers)
    card = card_from_report(report, "tiny-llama", calibration=CALIB, scores=[("text", "ppl", 123.4, None)])
    saved = save_pruned(tiny_llama, tokenizer, tmp_path / "out", card)
    assert saved.path == tmp_path / "out" and saved.warnings == ()

    again = reload(saved.path)
    assert torch.equal(logits(again, tiny_calibration), logits(tiny_llama, tiny_calibration))
    q = again.model.layers[0].self_attn.q_proj
    assert q.bias is not None and torch.equal(q.bias, tiny_llama.model.layers[0].self_attn.q_proj.bias)
    config = json.loads((saved.path / "config.json").read_text())
    assert config["attention_bias"] is True and config["mlp_bias"] is True
    assert AutoTokenizer.from_pretrained(saved.path)("the harbour").input_ids == tokenizer("the harbour").input_ids

    doc = json.loads((saved.path / "sparsity.json").read_text())
    assert doc["schema"] == save.SCHEMA and doc["pattern"] == "unstructured" and doc["target_sparsity"] == 0.5
    assert {l["name"]: (l["zeros"], l["shape"], l["allocated"]) for l in doc["layers"]} == {
        l.name: (l.pruned, list(l.shape), 0.5) for l in report.layers}
    assert verify(saved.path) == [] and verify(saved.path, saved.weights_sha256) == []


def test_the_card_says_what_was_done(tiny_llama, tiny_calibration, tmp_path):
    report = stadebench.prune(tiny_llama, tiny_calibration, "stade", "unstructured", 0.5, device="cpu")
    card = card_from_report(report, "org/tiny-llama", calibration=CALIB, scores=[("text", "ppl", 123.4, 0.5)],
                            cell_key="ab" * 32)
    saved = save_pruned(tiny_llama, None, tmp_path / "out", card)
    text = (saved.path / "README.md").read_text()
    front = yaml.safe_load(text.split("---\n")[1])
    assert front == {"library_name": "transformers", "tags": ["pruned", "stadebench"], "base_model": "org/tiny-llama"}
    for fact in ('stade {"bias_correction":true}', "| pattern | unstructured |", "| allocation | uniform |",
                 "dataset text, n 8, seqlen 32, seed 0, sequential True", "| text | ppl | 123.4 | 0.5 |",
                 f"| stadebench | {stadebench.__version__} |", saved.weights_sha256, "ab" * 32,
                 "| model.layers.1.mlp.down_proj | 0.5000 | 0.5000 |"):
        assert fact in text
    data_free = stadebench.prune(tiny_llama, None, "magnitude", "unstructured", 0.5)
    assert "none (data-free)" in save.card_text(card_from_report(data_free, "m", calibration=CALIB), "0" * 64)


def test_stade_w_biases_on_some_layers_reload_exactly(tiny_llama, tiny_calibration, tmp_path):
    report = stadebench.prune(tiny_llama, tiny_calibration, "stade-w", "unstructured", 0.5, device="cpu")
    assert 0 < sum(l.bias_added for l in report.layers) < len(report.layers)
    saved = save_pruned(tiny_llama, None, tmp_path / "out", card_from_report(report, "tiny"))
    # the config now declares a bias on every attention and MLP layer: the others are saved as zeros
    assert "model.layers.0.self_attn.q_proj.bias" in saved_keys(saved.path)
    assert tiny_llama.model.layers[0].self_attn.q_proj.bias is None  # the model itself is unchanged
    assert torch.equal(logits(reload(saved.path), tiny_calibration), logits(tiny_llama, tiny_calibration))


def test_2_4_round_trip(tiny_llama, tiny_calibration, tmp_path):
    report = stadebench.prune(tiny_llama, None, "magnitude", "2:4")
    saved = save_pruned(tiny_llama, None, tmp_path / "out", card_from_report(report, "tiny"))
    assert torch.equal(logits(reload(saved.path), tiny_calibration), logits(tiny_llama, tiny_calibration))
    doc = json.loads((saved.path / "sparsity.json").read_text())
    assert doc["pattern"] == "2:4" and doc["sparsity"] == 0.5
    assert all(l["zeros"] * 2 == l["shape"][0] * l["shape"][1] for l in doc["layers"])
    assert verify(saved.path) == []


def test_verify_finds_changed_weights(tiny_llama, tmp_path):
    report = stadebench.prune(tiny_llama, None, "magnitude", "2:4")
    saved = save_pruned(tiny_llama, None, tmp_path / "out", card_from_report(report, "tiny"))
    file = saved.path / "model.safetensors"
    tensors = load_file(file)
    key = "model.layers.1.mlp.up_proj.weight"
    tensors[key][0, :4] = 1.0  # one group of 4 with no zero left
    save_file(tensors, file, metadata={"format": "pt"})
    problems = verify(saved.path, saved.weights_sha256)
    assert any("model.layers.1.mlp.up_proj: " in p and "zeros in the weights" in p for p in problems)
    assert any("groups of 4 have fewer than 2 zeros" in p for p in problems)
    assert any("weights_sha256" in p for p in problems)
    (saved.path / "sparsity.json").unlink()
    assert verify(saved.path)[0].startswith("sparsity.json: cannot be read")


def test_the_hash_covers_the_model_not_the_card(tiny_factory, tmp_path):
    def saved(seed, folder, scores):
        model = tiny_factory("llama", seed)
        report = stadebench.prune(model, None, "magnitude", "unstructured", 0.5)
        return save_pruned(model, None, tmp_path / folder, card_from_report(report, "tiny", scores=scores))

    a, b = saved(0, "a", [("t", "ppl", 1.0)]), saved(0, "b", [("t", "ppl", 2.0)])
    assert a.weights_sha256 == b.weights_sha256 == save.weights_sha256(a.path)
    assert (a.path / "README.md").read_text() != (b.path / "README.md").read_text()
    assert saved(1, "c", []).weights_sha256 != a.weights_sha256


def test_biases_a_family_cannot_declare_are_a_warning(tiny_factory, tiny_calibration, tmp_path):
    model = tiny_factory("mistral")
    report = stadebench.prune(model, tiny_calibration, "stade", "unstructured", 0.5, device="cpu")
    saved = save_pruned(model, None, tmp_path / "out", card_from_report(report, "tiny-mistral"))
    assert len(saved.warnings) == 1 and "will not load them" in saved.warnings[0]
    assert "> Warning: " in (saved.path / "README.md").read_text()


# --- the output folder ----------------------------------------------------------------


def test_check_out_dir(tmp_path):
    assert check_out_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checking creates nothing
    (tmp_path / "empty").mkdir()
    assert check_out_dir(tmp_path / "empty") == tmp_path / "empty"
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    with pytest.raises(ConfigError, match=r"full exists and is not empty; pass --force"):
        check_out_dir(full)
    with pytest.raises(ConfigError, match=r"not a model stadebench saved"):
        check_out_dir(full, force=True)  # --force replaces only a folder stadebench saved
    file = tmp_path / "file.txt"
    file.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        check_out_dir(file, force=True)
    with pytest.raises(ConfigError, match=r"file.txt is a file"):
        check_out_dir(file / "sub")


def test_unwritable_parent(tmp_path, monkeypatch):
    # root writes anywhere, so the refusal is simulated where the probe file is made
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(save.tempfile, "mkstemp", refuse)
    with pytest.raises(ConfigError, match=r"cannot be written: no write access to .* \(Permission denied\)"):
        check_out_dir(tmp_path / "out")


def card() -> ModelCard:
    return ModelCard(base_model="tiny", metric="magnitude", pattern="unstructured", sparsity=0.5,
                     actual_sparsity=0.5)


def test_force_replaces_only_when_asked(tiny_llama, tmp_path):
    stadebench.prune(tiny_llama, None, "magnitude", "unstructured", 0.5)
    out = tmp_path / "out"
    first = save_pruned(tiny_llama, None, out, card())
    (out / "stale.txt").write_text("from before")
    with pytest.raises(ConfigError, match="--force"):
        save_pruned(tiny_llama, None, out, card())
    second = save_pruned(tiny_llama, None, out, card(), force=True)
    assert second.weights_sha256 == first.weights_sha256 and not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or old folder left


def test_a_failed_save_leaves_no_half_folder(tiny_llama, tmp_path):
    class Broken:
        def save_pretrained(self, folder):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_pruned(tiny_llama, Broken(), tmp_path / "out", card())
    assert list(tmp_path.iterdir()) == []
    old = save_pruned(tiny_llama, None, tmp_path / "out", card())
    with pytest.raises(OSError, match="disk full"):
        save_pruned(tiny_llama, Broken(), tmp_path / "out", card(), force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and verify(old.path) == []


def test_folder_name():
    key = "0123456789abcdef" * 4
    assert folder_name("HuggingFaceTB/SmolLM2-135M", "wanda", "2:4", 0.5, "owl", key) == \
        "smollm2-135m--wanda--2-4--0.5--owl--89abcdef"
    assert folder_name("/models/tiny/", "stade", "unstructured", 0.6, "uniform") == "tiny--stade--unstructured--0.6"
    odd = folder_name("C:\\m\\Weird Name!.gguf", "my metric/v2", "4:8", 0.5, None, "not hex")
    assert odd.startswith("weird-name--my-metric-v2--4-8--0.5--") and len(odd.split("--")[-1]) == 8
    assert set(odd) <= set("abcdefghijklmnopqrstuvwxyz0123456789.-_")
    assert folder_name("m", "w", "2:4", 0.5, cell_key="1" * 64) != folder_name("m", "w", "2:4", 0.5, cell_key="2" * 64)
    assert len(folder_name("x" * 400, "w", "2:4", 0.5, cell_key=key)) <= 200
