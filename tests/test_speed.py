"""The speed evaluator: dense timings on a CPU with the reason no sparse kernel applies and
no speedup claimed, the 2:4 detector, the kernel decision, the bookkeeping of the
semi-structured branch (with a stand-in kernel), and a model left exactly as found."""

from __future__ import annotations

import pytest
import torch

import stadebench
from stadebench.errors import ConfigError
from stadebench.evaluation import speed
from stadebench.evaluation.speed import Speed, choose_kernel, is_2_4
from stadebench.plugins import get_plugins, reset_plugins

pytestmark = pytest.mark.usefixtures("single_thread")

SMALL = {"token_counts": [1, 8], "prefill_tokens": 16, "decode_tokens": 4, "repeats": 2, "warmup": 1}


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_model(model, before: dict[str, torch.Tensor], params: dict) -> bool:
    after = model.state_dict()
    return (after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
            and dict(model.named_parameters()) == params)


def test_cpu_reports_dense_timings_and_no_speedup(tiny_llama):
    stadebench.prune(tiny_llama, None, "magnitude", "2:4")
    before, params = snapshot(tiny_llama), dict(tiny_llama.named_parameters())
    scores = Speed(SMALL).evaluate(tiny_llama, None, "cpu")
    names = [s.name for s in scores]
    assert names == ["dense_ms@t=1", "dense_ms@t=8", "dense_prefill_ms", "dense_prefill_tok_s",
                     "dense_decode_ms", "dense_decode_tok_s"]
    assert not any("speedup" in n or n.startswith("sparse") for n in names)
    for s in scores:
        assert s.task == "speed" and s.value > 0
        assert s.higher_is_better == s.name.endswith("tok_s")
        d = s.details
        assert d["kernel"] == "dense" and "no CUDA device" in d["reason"] and d["weights_2_4"] is True
        assert d["dtype"] == "float32" and d["repeats"] == 2 and d["device"].startswith("cpu")
        assert d["spread"][0] <= s.value <= d["spread"][1]
    assert scores[0].details["shapes"] == [[64, 64, 4], [32, 64, 4], [128, 64, 4], [64, 128, 2]]
    assert scores[0].details["blocks"] == 2 and scores[2].details["prefill_tokens"] == 16
    assert same_model(tiny_llama, before, params) and not tiny_llama.training


def test_the_2_4_detector(tiny_factory):
    nm, unstructured = tiny_factory("llama"), tiny_factory("llama")
    stadebench.prune(nm, None, "magnitude", "2:4")
    stadebench.prune(unstructured, None, "magnitude", "unstructured", 0.5)
    assert all(is_2_4(layer.weight) for _, _, layer in speed.iter_layers(nm))
    assert not all(is_2_4(layer.weight) for _, _, layer in speed.iter_layers(unstructured))
    assert is_2_4(torch.tensor([[0.0, 1, 0, 2, 3, 0, 0, 0]])) and not is_2_4(torch.tensor([[0.0, 1, 2, 3]]))
    assert not is_2_4(torch.zeros(2, 6))  # no whole groups of 4


def test_kernel_decision(tiny_factory, monkeypatch):
    model = tiny_factory("llama")
    assert choose_kernel(model, torch.device("cpu")).reason.startswith("no CUDA device (cpu)")
    cuda = torch.device("cuda")
    capability = [(7, 5)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[0])
    assert "compute capability 7.5" in choose_kernel(model, cuda).reason
    capability[0] = (9, 0)
    assert choose_kernel(model, cuda).reason == "dtype float32 unsupported (float16 or bfloat16 only)"
    model.half()
    assert choose_kernel(model, cuda).reason.startswith("weights are not 2:4")
    stadebench.prune(model, None, "magnitude", "2:4")
    # this CPU build refuses to convert CPU tensors: the failure is the reason, not an error
    kernel = choose_kernel(model, cuda)
    assert kernel.name == "dense" and kernel.reason.startswith("to_sparse_semi_structured failed on shape")
    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", lambda w: w.clone())
    assert choose_kernel(model, cuda) == speed.Kernel("semi-structured", None, "Tensor")


def test_semi_structured_branch_reports_speedups_and_restores_the_model(tiny_llama, monkeypatch):
    stadebench.prune(tiny_llama, None, "magnitude", "2:4")
    converted = []

    def stand_in(w):  # a dense copy in place of the CUDA kernel's compressed tensor
        converted.append(w.shape)
        return w.clone()

    monkeypatch.setattr(speed, "choose_kernel", lambda model, dev: speed.Kernel("semi-structured", None, "Fake"))
    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", stand_in)
    before, params = snapshot(tiny_llama), dict(tiny_llama.named_parameters())
    scores = {s.name: s for s in Speed(SMALL).evaluate(tiny_llama, None, "cpu")}
    assert {"sparse_ms@t=8", "speedup@t=1", "speedup@t=8", "sparse_prefill_ms", "sparse_decode_tok_s",
            "prefill_speedup", "decode_speedup"} <= set(scores)
    assert scores["speedup@t=8"].higher_is_better and not scores["sparse_ms@t=8"].higher_is_better
    assert scores["prefill_speedup"].details["kernel"] == "semi-structured"
    assert scores["prefill_speedup"].details["backend"] == "Fake" and "reason" not in scores["decode_speedup"].details
    assert len(converted) == 4 + 14  # one per distinct shape for the sweep, one per layer end to end
    assert same_model(tiny_llama, before, params)


def test_a_kernel_that_fails_to_run_falls_back_to_dense(tiny_llama, monkeypatch):
    def broken(w):
        raise RuntimeError("CUTLASS: misaligned operand\nmore")

    monkeypatch.setattr(speed, "choose_kernel", lambda model, dev: speed.Kernel("semi-structured", None, "Fake"))
    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", broken)
    before, params = snapshot(tiny_llama), dict(tiny_llama.named_parameters())
    scores = Speed(SMALL).evaluate(tiny_llama, None, "cpu")
    assert not any("speedup" in s.name or s.name.startswith("sparse") for s in scores)
    assert scores[0].details["kernel"] == "dense"
    assert scores[0].details["reason"] == "semi-structured matmul failed: CUTLASS: misaligned operand"
    assert same_model(tiny_llama, before, params)


def test_options():
    assert Speed().options.token_counts == [1, 16, 128, 1024, 4096]
    assert (Speed().options.prefill_tokens, Speed().options.decode_tokens, Speed().options.repeats) == (512, 32, 5)
    with pytest.raises(ConfigError, match="tokens"):
        Speed({"tokens": 5})
    with pytest.raises(ConfigError, match="token_counts"):
        Speed({"token_counts": []})
    with pytest.raises(ConfigError, match="repeats"):
        Speed({"repeats": 0})
    assert Speed().unavailable() is None and Speed().fingerprint() is None


def test_context_is_checked(tiny_llama):
    with pytest.raises(ConfigError, match="prefill_tokens \\+ decode_tokens=160"):
        Speed({"prefill_tokens": 150, "decode_tokens": 10}).check_model(tiny_llama.config)


def test_registers_as_a_built_in_plugin():
    reset_plugins()
    try:
        plugins = get_plugins()
        reg = plugins.evaluators.get("speed")
        assert reg.cls is Speed and reg.plugin == "stadebench.evaluation.speed"
        assert "evaluator speed" in plugins.info["stadebench.evaluation.speed"].registered
    finally:
        reset_plugins()
