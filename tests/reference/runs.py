"""One (metric, pattern) cell pruned by a released implementation and by stadebench, and
their masks compared layer by layer.

Each cell is run by the release that defines it: locuslab/wanda for wanda, magnitude
(its whole-matrix threshold, and N:M) and SparseGPT; Coello-dev/STADE for stade, stade-w
and its per-row magnitude. ``RELEASED`` gives the stadebench options that reproduce each
release's choices; the defaults differ only where documented in docs/parity.md.

The gradient metrics (below) are run by VILA-Lab/GBLM-Pruner (gblm: ``prune_gblm``,
``prune_gradient``) and pprp/Pruner-Zero (pruner-zero: ``prune_pruner_zero``), which read
the gradient statistics GBLM-Pruner's script computes (``released_gradients``).
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


# --- gradient metrics: VILA-Lab/GBLM-Pruner and pprp/Pruner-Zero ----------------------
#
# Both releases read per-weight gradient statistics from a file their gradient scripts write
# (GBLM-Pruner's ``gradient_computation.py``, Pruner-Zero's copy ``lib/gradient_computation.py``:
# a dict keyed ``{name}_layer_{i}``, float16); stadebench
# computes them in the engine (``core.gradients``). ``released_gradients`` runs the script's
# loop; ``ours_name`` maps its keys to stadebench's layer names.


def released_gradients(env: str, model: nn.Module, windows: torch.Tensor, scale: float = 100) -> dict[str, dict]:
    """``{"l1": …, "l2": …}`` as the release's gradient script (``extract.GRADIENT_SCRIPTS``)
    saves them: its ``__main__`` loop (train mode, ``model(input_ids,
    labels=input_ids).loss.backward()``, ``update_gradient``, zero_grad) on each window, then
    l2 = sqrt, stored float16. ``model`` gets gradients: pass a copy."""
    grad_up = extract.gradient_computation(env)(model, scale)
    model.train()
    for nsample, window in enumerate(windows, 1):
        ids = window.unsqueeze(0)
        model(input_ids=ids, labels=ids.clone()).loss.backward()
        grad_up.update_gradient(model, nsample)
        model.zero_grad(set_to_none=True)  # the script's optimizer.zero_grad()
    model.eval()
    l2 = {name: torch.sqrt(value).to(dtype=torch.float16) for name, value in grad_up.gradients_l2.items()}
    return {"l1": grad_up.gradients_l1, "l2": l2}


def ours_name(released_name: str) -> str:
    """``self_attn.q_proj_layer_0`` → ``model.layers.0.self_attn.q_proj``."""
    short, block = released_name.rsplit("_layer_", 1)
    return f"model.layers.{block}.{short}"


#: stadebench options that reproduce the releases' gradient metrics, by pattern family.
GRADIENT_PATTERN_OPTIONS = {"unstructured": {}, "N:M": {"ties": "topk"}}


def prune_released_gradient(model: nn.Module, windows: torch.Tensor, metric: str, pattern: str, gradient_path: str,
                            *, wanda: bool = True, inverse: bool = False, tree: dict | None = None) -> None:
    """Prune ``model`` in place with GBLM-Pruner's ``prune_gblm`` (``wanda``) or
    ``prune_gradient`` (not ``wanda``), or Pruner-Zero's ``prune_pruner_zero`` with the JSON
    ``tree`` (``GPTree._deserialize_tree``), reading the gradient dict saved at ``gradient_path``."""
    if family(pattern) not in GRADIENT_PATTERN_OPTIONS:
        raise ValueError(f"the releases prune per row (unstructured) or N:M, not {pattern}")
    n, m = nm(pattern)
    args = SimpleNamespace(nsamples=len(windows), seed=0, sparsity_ratio=n / m if n else 0.5, use_variant=False,
                           gradient_inv=inverse, gradient_path=gradient_path)
    model.seqlen = windows.shape[1]
    model.hf_device_map = {}
    cpu = torch.device("cpu")
    env = extract.GBLM_ENV if metric == "gblm" else extract.PRUNER_ZERO_ENV
    module = extract.load(env)
    with extract.feeding(module, windows), extract.position_embeddings(model), extract.no_breakpoints(), \
            torch.no_grad():
        if metric == "pruner-zero":
            engine = extract.load(env, "gptree").GPTree._deserialize_tree(tree)
            module.prune_pruner_zero(args, model, None, cpu, n, m, engine=engine)
        elif wanda:
            module.prune_gblm(args, model, None, cpu, n, m)
        else:
            module.prune_gradient(args, model, None, cpu, n, m)
    del model.hf_device_map


def prune_ours_gradient(model: nn.Module, windows: torch.Tensor, metric: str, pattern: str, gradients=None, *,
                        accumulate: str = "released", batch_size: int = 1, **metric_options):
    """Prune ``model`` in place with stadebench's ``gblm`` / ``pruner-zero``, sequentially,
    with the releases' N:M tie order (``ties: topk``); ``gradients`` (a ``GradientStatistics``)
    shared, or computed by the engine when None."""
    from stadebench.core import engine
    from stadebench.plugins import resolve

    metric_, pattern_ = resolve(metric, pattern, metric_options, GRADIENT_PATTERN_OPTIONS[family(pattern)])
    calibration = engine.Calibration(sequential=True, batch_size=batch_size, accumulate=accumulate)
    return engine.prune(model, windows, metric_, pattern_, None if nm(pattern)[0] else 0.5, calibration=calibration,
                        device="cpu", gradients=gradients)
