"""Reference parity of the fixed-mask weight reconstructors (stadebench.core.reconstructors).

On every linear layer of SmolLM2-135M's first ``BLOCKS`` blocks (inputs from the dense
model on conftest's 8×64 English windows), each release's own code and ours run from the
same inputs:

- ADMM (fmfi-compbio/admm-pruning, ``lib/admm.py``, from the clone ``$STADEBENCH_REFERENCE_ADMM``
  names; measured at ``ADMM_MEASURED_AT``): ``AdmmPruner`` accumulates XᵀX itself, window by
  window, then ``fasterprune`` runs its fixed-mask path (``iterative_prune=0``; the release's
  default, 15, picks the mask gradually inside the ADMM loop) with ``prune_admm``'s
  ``percdamp=0.1`` and its defaults ``iters=20``, ρ = 1. That path picks a Wanda mask itself
  (|W|·(‖X_j‖ + 1e-8): per row with ``per_out``, per matrix without, or 2:4); the mask is read
  back from its output (weight == 0, checked to prune exactly the pattern's count) and
  ``admm_update`` gets it with the release's Gram.
- OBS: ``obs_update`` given the mask the ``sparsegpt`` metric chose for the layer reproduces
  that metric's weights (both float orders); and given the mask the released SparseGPT chose
  (``lib/sparsegpt.py`` of the same clone, byte-identical to locuslab/wanda@8e8fc87's, which
  tests/reference/test_parity.py runs), the release's weights, from the release's H.

Run with ``-s`` to see each layer's max abs / max rel difference. Measured on a CPU (torch
2.13, one and two threads): every layer bit for bit, in every test.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from stadebench.base import LayerInfo, LayerStats
from stadebench.core.metrics.sparsegpt import SparseGPT
from stadebench.core.reconstructors import admm_update, obs_update
from stadebench.plugins import get_plugins

#: Decoder blocks whose layers are compared (at most conftest's ``SMOL_BLOCKS``).
BLOCKS = 2
ADMM_ENV = "STADEBENCH_REFERENCE_ADMM"
ADMM_MEASURED_AT = "80392084a939dff5b15a160fb46499b478905506"
#: Largest difference allowed from the release, relative to the layer's largest weight: float
#: rounding through 20 ADMM iterations. Measured on a CPU: 0 (bit for bit) on every layer.
ADMM_TOLERANCE = 1e-5
#: The release's fixed-mask modes: our pattern -> fasterprune's arguments.
ADMM_MODES = {"unstructured": {"per_out": True}, "unstructured-layer": {"per_out": False},
              "2:4": {"prune_n": 2, "prune_m": 4}}

# one thread: the OBS sweep is many small ops, which a second thread on a busy machine slows down many times
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]


def _release(module: str):
    """The clone's ``lib/<module>.py``, loaded on its own (it imports only torch and transformers)."""
    root = os.environ.get(ADMM_ENV)
    if not root:
        pytest.skip(f"${ADMM_ENV} is not set (the path of a local clone of fmfi-compbio/admm-pruning)")
    path = Path(root) / "lib" / f"{module}.py"
    if not path.is_file():
        pytest.skip(f"${ADMM_ENV}={root} lacks lib/{module}.py")
    spec = importlib.util.spec_from_file_location(f"released_admm_{module}", path)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


@contextlib.contextmanager
def _on_cpu():
    """The releases' ``torch.cuda.synchronize()`` made a no-op, and their prints silenced."""
    before = torch.cuda.synchronize
    torch.cuda.synchronize = lambda *a, **k: None
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        torch.cuda.synchronize = before


def _report(**row) -> None:
    print(json.dumps(row))
    path = os.environ.get("STADEBENCH_PARITY_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


@pytest.fixture(scope="module")
def layers(_smollm2_truncated, smollm2_calibration):
    """``{name: (dense weight, inputs [windows, tokens, in])}`` for every linear of the blocks."""
    model = copy.deepcopy(_smollm2_truncated)
    found = {f"{i}.{name}": mod for i, block in enumerate(model.model.layers[:BLOCKS])
             for name, mod in block.named_modules() if isinstance(mod, nn.Linear)}
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in found}
    handles = [mod.register_forward_hook(lambda m, args, out, name=name: inputs[name].append(args[0].detach()))
               for name, mod in found.items()]
    model.model.layers = model.model.layers[:BLOCKS]
    with torch.no_grad():
        for window in smollm2_calibration:
            model.model(window.unsqueeze(0), use_cache=False)
    for h in handles:
        h.remove()
    return {name: (mod.weight.detach().clone(), torch.cat(inputs[name])) for name, mod in found.items()}


def _released_run(cls, weight: torch.Tensor, inputs: torch.Tensor, attribute: str, **kwargs):
    """(the release's accumulated statistic, its pruned weight) for one layer."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data = weight.clone()
    pruner = cls(linear)
    for window in inputs:  # one window per call, as the releases' per-sample loops
        pruner.add_batch(window.unsqueeze(0), None)
    statistic = getattr(pruner, attribute).clone()
    with _on_cpu(), torch.no_grad():
        pruner.fasterprune(0.5, **kwargs)
    return statistic, linear.weight.detach().clone()


def _difference(ours: torch.Tensor, released: torch.Tensor) -> tuple[float, float]:
    """(max |ours − released|, that over the layer's max |released|)."""
    diff = (ours - released).abs().max().item()
    return diff, diff / released.abs().max().item()


def _check_count(mask: torch.Tensor, spec: str) -> None:
    rows, cols = mask.shape
    if spec == "unstructured":
        assert bool((mask.sum(1) == cols // 2).all())
    elif spec == "unstructured-layer":
        assert int(mask.sum()) == rows * cols // 2
    else:
        assert bool((mask.reshape(rows, cols // 4, 4).sum(2) == 2).all())


def _wanda_mask(weight: torch.Tensor, inputs: torch.Tensor, spec: str) -> torch.Tensor:
    x = inputs.reshape(-1, inputs.shape[-1]).double()
    pattern = get_plugins().patterns.get(spec).cls.from_spec(spec)
    return pattern.select(weight.abs() * x.square().sum(0).sqrt().float(), 0.5)


@pytest.mark.parametrize("spec", list(ADMM_MODES))
def test_admm_update_is_the_release_for_its_wanda_mask(layers, spec):
    released_module = _release("admm")
    worst = 0.0
    for name, (weight, inputs) in layers.items():
        gram, released = _released_run(released_module.AdmmPruner, weight, inputs, "XX", percdamp=0.1,
                                        iterative_prune=0, iters=20, **ADMM_MODES[spec])
        mask = released == 0
        _check_count(mask, spec)
        ours = admm_update(weight, mask, gram)
        diff, rel = _difference(ours, released)
        agreement = (mask == _wanda_mask(weight, inputs, spec)).double().mean().item()
        _report(test="admm", pattern=spec, layer=name, max_abs=diff, max_rel=rel, equal=torch.equal(ours, released),
                wanda_mask_agreement=agreement)
        assert agreement > 0.999  # the release's mask is Wanda's (but for its float rounding of ‖X_j‖)
        assert bool((ours[mask] == 0).all())
        worst = max(worst, rel)
    assert worst <= ADMM_TOLERANCE


@pytest.mark.parametrize("spec", ["unstructured", "2:4"])
@pytest.mark.parametrize("order", ["fused", "released"])
def test_obs_update_with_sparsegpts_mask_is_the_sparsegpt_metric(layers, spec, order):
    pattern = get_plugins().patterns.get(spec).cls.from_spec(spec)
    for name, (weight, inputs) in layers.items():
        x = inputs.reshape(-1, inputs.shape[-1])
        stats = LayerStats(LayerInfo(name, int(name.split(".")[0]), name), x.shape[0], gram=x.t() @ x)
        result = SparseGPT({"order": order}).prune_layer(weight, stats, pattern, 0.5)
        ours = obs_update(weight, result.mask, stats.gram, stats.count, order=order)
        diff, rel = _difference(ours, result.weight)
        _report(test="obs-vs-sparsegpt-metric", pattern=spec, order=order, layer=name, max_abs=diff, max_rel=rel)
        assert torch.equal(ours, result.weight)


@pytest.mark.parametrize("spec", ["unstructured-layer", "2:4"])
def test_obs_update_with_the_released_sparsegpts_mask_is_the_release(layers, spec):
    released_module = _release("sparsegpt")
    n, m = (2, 4) if spec == "2:4" else (0, 0)
    for name, (weight, inputs) in layers.items():
        h, released = _released_run(released_module.SparseGPT, weight, inputs, "H", prune_n=n, prune_m=m,
                                    blocksize=128, percdamp=0.01)
        mask = released == 0
        # the release's H is already 2/N·ΣxxᵀN: count 2 makes our 2/count·gram that H exactly
        ours = obs_update(weight, mask, h, 2, order="released")
        diff, rel = _difference(ours, released)
        _report(test="obs-vs-released-sparsegpt", pattern=spec, layer=name, max_abs=diff, max_rel=rel)
        assert torch.equal(ours, released)
