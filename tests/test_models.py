"""The generic model adapter on six families, and pruning each of them end to end."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import stadebench
from stadebench.core.models import find_blocks, iter_layers, prunable_layers, set_weight, weight_of

pytestmark = pytest.mark.usefixtures("single_thread")

FAMILIES = ["llama", "mistral", "qwen2", "opt", "gpt-neox", "gpt2"]

# family -> (path of the blocks, [(name in block, type, [out, in])])
LLAMA_LIKE = ("model.layers", [
    ("self_attn.q_proj", nn.Linear, (64, 64)), ("self_attn.k_proj", nn.Linear, (32, 64)),
    ("self_attn.v_proj", nn.Linear, (32, 64)), ("self_attn.o_proj", nn.Linear, (64, 64)),
    ("mlp.gate_proj", nn.Linear, (128, 64)), ("mlp.up_proj", nn.Linear, (128, 64)),
    ("mlp.down_proj", nn.Linear, (64, 128)),
])
EXPECTED = {
    "llama": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "opt": ("model.decoder.layers", [
        ("self_attn.k_proj", nn.Linear, (64, 64)), ("self_attn.v_proj", nn.Linear, (64, 64)),
        ("self_attn.q_proj", nn.Linear, (64, 64)), ("self_attn.out_proj", nn.Linear, (64, 64)),
        ("fc1", nn.Linear, (128, 64)), ("fc2", nn.Linear, (64, 128)),
    ]),
    "gpt-neox": ("gpt_neox.layers", [
        ("attention.query_key_value", nn.Linear, (192, 64)), ("attention.dense", nn.Linear, (64, 64)),
        ("mlp.dense_h_to_4h", nn.Linear, (128, 64)), ("mlp.dense_4h_to_h", nn.Linear, (64, 128)),
    ]),
    "gpt2": ("transformer.h", [
        ("attn.c_attn", Conv1D, (192, 64)), ("attn.c_proj", Conv1D, (64, 64)),
        ("mlp.c_fc", Conv1D, (256, 64)), ("mlp.c_proj", Conv1D, (64, 256)),
    ]),
}
NORMED = {"q_proj", "k_proj", "v_proj", "query_key_value", "c_attn", "gate_proj", "up_proj", "fc1", "c_fc",
          "dense_h_to_4h"}
INTERNAL = {"o_proj", "out_proj", "dense", "c_proj", "down_proj", "fc2", "dense_4h_to_h"}


def role_of(short_name: str) -> str:
    leaf = short_name.rsplit(".", 1)[-1]
    assert (leaf in NORMED) != (leaf in INTERNAL), leaf
    return "normed" if leaf in NORMED else "internal"


@pytest.mark.parametrize("family", FAMILIES)
def test_finds_the_blocks_and_their_linears(tiny_factory, family):
    model = tiny_factory(family)
    path, blocks = find_blocks(model)
    expected_path, expected_layers = EXPECTED[family]
    assert path == expected_path
    assert blocks is model.get_submodule(expected_path) and len(blocks) == 2
    for block in blocks:
        found = prunable_layers(block)
        assert [name for name, _ in found] == [name for name, _, _ in expected_layers]
        for (_, layer), (_, cls, shape) in zip(found, expected_layers):
            assert type(layer) is cls
            assert tuple(weight_of(layer).shape) == shape
    # never the LM head, the embeddings, or anything outside the blocks
    everything = [layer for _, _, layer in iter_layers(model)]
    assert len(everything) == 2 * len(expected_layers)
    block_modules = {id(m) for m in blocks.modules()}
    assert all(id(layer) in block_modules for layer in everything)
    forbidden = {id(model.get_output_embeddings()), id(model.get_input_embeddings())}
    assert not forbidden & {id(layer) for layer in everything}


@pytest.mark.parametrize("family", FAMILIES)
def test_weight_of_is_out_by_in_and_set_weight_round_trips(tiny_factory, family):
    model = tiny_factory(family)
    _, blocks = find_blocks(model)
    for name, layer in prunable_layers(blocks[0]):
        w = weight_of(layer)
        x_in = torch.randn(5, w.shape[1])
        with torch.no_grad():
            expected = torch.nn.functional.linear(x_in, w, layer.bias)
            torch.testing.assert_close(layer(x_in), expected)
            new = torch.randn_like(w)
            set_weight(layer, new)
            assert torch.equal(weight_of(layer), new)
            torch.testing.assert_close(layer(x_in), torch.nn.functional.linear(x_in, new, layer.bias))


def test_conv1d_row_is_an_output_unit(tiny_factory):
    model = tiny_factory("gpt2")
    c_attn = model.transformer.h[0].attn.c_attn
    assert tuple(c_attn.weight.shape) == (64, 192)  # stored [in, out]
    assert weight_of(c_attn).data_ptr() == c_attn.weight.data_ptr()  # a view, not a copy
    stadebench.prune(model, None, metric="magnitude", pattern="unstructured", sparsity=0.25)
    zeros = c_attn.weight == 0  # [in, out]
    # every output unit (a column of the stored weight) lost exactly ⌊64·0.25⌋ of its inputs
    assert (zeros.sum(0) == 16).all()
    # …whereas inputs were not pruned evenly (which pruning stored rows would have done)
    assert not (zeros.sum(1) == 48).all()
    # and within each output unit, the smallest-magnitude weights went
    dense = tiny_factory("gpt2").transformer.h[0].attn.c_attn.weight.abs()
    kept_min = dense.masked_fill(zeros, float("inf")).amin(0)
    pruned_max = dense.masked_fill(~zeros, -1.0).amax(0)
    assert (pruned_max <= kept_min).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_roles_follow_the_data_flow(tiny_factory, tiny_calibration, family):
    model = tiny_factory(family)
    report = stadebench.prune(model, tiny_calibration, metric="wanda", pattern="2:4")
    _, expected_layers = EXPECTED[family]
    assert len(report.layers) == 2 * len(expected_layers)
    for layer in report.layers:
        short = next(n for n, _, _ in expected_layers if layer.name.endswith("." + n))
        assert layer.role == role_of(short), layer.name


def test_roles_of_post_layernorm_opt(tiny_factory, tiny_calibration):
    # OPT-350m normalises *after* each sub-layer (do_layer_norm_before=False): q/k/v of
    # block ≥ 1 read the previous block's final LayerNorm output, a normalised input,
    # and fc1 reads self_attn_layer_norm's output.
    import transformers

    torch.manual_seed(0)
    config = transformers.OPTConfig(hidden_size=64, ffn_dim=128, word_embed_proj_dim=64, num_hidden_layers=2,
                                    num_attention_heads=4, vocab_size=128, max_position_embeddings=128,
                                    do_layer_norm_before=False)
    model = transformers.OPTForCausalLM(config).eval()
    report = stadebench.prune(model, tiny_calibration, metric="wanda")
    roles = {layer.name: layer.role for layer in report.layers}
    assert roles["model.decoder.layers.1.fc1"] == "normed"
    assert roles["model.decoder.layers.1.fc2"] == "internal"
    assert roles["model.decoder.layers.1.self_attn.out_proj"] == "internal"
    for proj in ("q_proj", "k_proj", "v_proj"):
        assert roles[f"model.decoder.layers.1.self_attn.{proj}"] == "normed", proj


def assert_exact_pattern(model, pattern):
    for _, name, layer in iter_layers(model):
        w = weight_of(layer)
        zeros = w == 0
        if pattern == "2:4":
            assert (zeros.reshape(w.shape[0], -1, 4).sum(-1) == 2).all(), name
        else:
            assert (zeros.sum(1) == w.shape[1] // 2).all(), name


@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
@pytest.mark.parametrize("metric", ["wanda", "stade-w", "sparsegpt"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_prunes_exactly_and_still_runs(tiny_factory, tiny_calibration, family, metric, pattern):
    model = tiny_factory(family)
    report = stadebench.prune(model, tiny_calibration, metric=metric, pattern=pattern,
                              sparsity=None if pattern == "2:4" else 0.5)
    assert report.sparsity == 0.5
    assert all(layer.sparsity == 0.5 for layer in report.layers)
    assert_exact_pattern(model, pattern)
    assert all(b.mse is not None and b.mse >= 0 and b.cosine > 0 for b in report.blocks)
    with torch.no_grad():
        logits = model(tiny_calibration[:2]).logits
    assert logits.shape == (2, 32, 128)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_one_shot_and_sequential_both_work(tiny_factory, tiny_calibration, family):
    masks = {}
    for sequential in (True, False):
        model = tiny_factory(family)
        report = stadebench.prune(model, tiny_calibration, metric="stade", pattern="unstructured",
                                  sequential=sequential, batch_size=3)
        assert report.sequential is sequential
        assert_exact_pattern(model, "unstructured")
        with torch.no_grad():
            assert torch.isfinite(model(tiny_calibration[:2]).logits).all()
        masks[sequential] = [weight_of(layer) == 0 for _, _, layer in iter_layers(model)]
    n_first = len(EXPECTED[family][1])
    assert all(torch.equal(a, b) for a, b in zip(masks[True][:n_first], masks[False][:n_first]))
    assert any(not torch.equal(a, b) for a, b in zip(masks[True][n_first:], masks[False][n_first:]))


@pytest.mark.slow
def test_smollm2_adapter(smollm2, smollm2_calibration):
    path, blocks = find_blocks(smollm2)
    assert path == "model.layers" and len(blocks) == 2
    report = stadebench.prune(copy.deepcopy(smollm2), smollm2_calibration, metric="stade-w", pattern="2:4")
    roles = {layer.name.split(".", 3)[-1]: layer.role for layer in report.layers if layer.block == 0}
    assert roles == {name: role_of(name) for name, _, _ in LLAMA_LIKE[1]}
    assert report.sparsity == 0.5
