"""One (metric, pattern) cell pruned by a released implementation and by stadebench, and
their masks compared layer by layer.

Each cell is run by the release that defines it: locuslab/wanda for wanda, magnitude
(its whole-matrix threshold, and N:M) and SparseGPT; Coello-dev/STADE for stade, stade-w
and its per-row magnitude. ``RELEASED`` gives the stadebench options that reproduce each
release's choices; the defaults differ only where documented in docs/parity.md.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import torch
from torch import nn

import stadebench

from . import extract

#: stadebench options that reproduce the release, by metric and pattern family.
RELEASED = {
    ("magnitude", "unstructured-layer"): ({}, {"threshold": "inclusive"}),
    ("magnitude", "N:M"): ({}, {"ties": "topk"}),
    ("wanda", "N:M"): ({}, {"ties": "topk"}),
    ("stade", "unstructured"): ({"bias_correction": False}, {}),
    ("stade", "N:M"): ({"bias_correction": False}, {"ties": "topk"}),
    ("stade-w", "unstructured"): ({"bias_correction": False}, {}),
    ("stade-w", "N:M"): ({"bias_correction": False}, {"ties": "topk"}),
    ("sparsegpt", "unstructured-layer"): ({"order": "released"}, {"threshold": "inclusive"}),
    ("sparsegpt", "N:M"): ({"order": "released"}, {"ties": "topk"}),
}
_STADE_METHOD = {"stade": "stade", "stade-w": "stadew", "magnitude": "magnitude", "wanda": "wanda"}


def family(pattern: str) -> str:
    return "N:M" if re.fullmatch(r"\d+:\d+", pattern) else pattern


def nm(pattern: str) -> tuple[int, int]:
    return tuple(int(v) for v in pattern.split(":")) if family(pattern) == "N:M" else (0, 0)


def which_release(metric: str, pattern: str) -> str:
    """The environment variable of the release that runs this cell."""
    if metric in ("stade", "stade-w") or (metric == "magnitude" and pattern == "unstructured"):
        return extract.STADE_ENV
    return extract.WANDA_ENV


def released_options(metric: str, pattern: str) -> tuple[dict, dict]:
    """(metric_options, pattern_options) that reproduce the release in stadebench."""
    return RELEASED.get((metric, family(pattern)), ({}, {}))


def prune_released(model: nn.Module, windows: torch.Tensor, metric: str, pattern: str,
                   sparsity: float = 0.5) -> None:
    """Prune ``model`` in place with the released code, sequentially, on ``windows``."""
    env = which_release(metric, pattern)
    module = extract.load(env)
    n, m = nm(pattern)
    sparsity = n / m if n else sparsity
    model.seqlen = windows.shape[1]
    model.hf_device_map = {}
    args = SimpleNamespace(nsamples=len(windows), sparsity_ratio=sparsity, use_variant=False, seed=0,
                           model="llama", prune_method=_STADE_METHOD.get(metric), filter_layer=None)
    cpu = torch.device("cpu")
    with extract.feeding(module, windows), extract.position_embeddings(model), torch.no_grad():
        if env == extract.STADE_ENV:
            module.prune_process(args, model, None, cpu, n, m)
        elif metric == "magnitude":
            if not n and pattern != "unstructured-layer":
                raise ValueError("locuslab/wanda's magnitude is one threshold per matrix: unstructured-layer")
            module.prune_magnitude(args, model, None, cpu, n, m)
        elif metric == "wanda":
            module.prune_wanda(args, model, None, cpu, n, m)
        elif metric == "sparsegpt":
            module.prune_sparsegpt(args, model, None, cpu, n, m)
        else:
            raise ValueError(f"no released implementation of {metric}")


def prune_ours(model: nn.Module, windows: torch.Tensor, metric: str, pattern: str, sparsity: float = 0.5,
               released: bool = True, batch_size: int = 8, **options):
    """Prune ``model`` in place with stadebench (the released options unless ``released`` is false)."""
    metric_options, pattern_options = released_options(metric, pattern) if released else ({}, {})
    metric_options = {**metric_options, **options.pop("metric_options", {})}
    pattern_options = {**pattern_options, **options.pop("pattern_options", {})}
    return stadebench.prune(model, windows, metric, pattern, None if nm(pattern)[0] else sparsity,
                            metric_options=metric_options, pattern_options=pattern_options, sequential=True,
                            batch_size=batch_size, device="cpu", **options)


def pruned_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """weight == 0 for every linear of every block (a dense zero counts as pruned on both sides)."""
    return {f"{i}.{name}": mod.weight.detach() == 0 for i, block in enumerate(model.model.layers)
            for name, mod in block.named_modules() if isinstance(mod, nn.Linear)}


def agreement(a: nn.Module, b: nn.Module) -> dict[str, float]:
    """Per layer, the fraction of equal mask entries."""
    ma, mb = pruned_masks(a), pruned_masks(b)
    return {k: (ma[k] == mb[k]).double().mean().item() for k in ma}
