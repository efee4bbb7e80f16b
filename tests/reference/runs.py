"""One (metric, pattern) cell pruned by a released implementation and by stadebench, and
their masks compared layer by layer.

Each cell is run by the release that defines it: locuslab/wanda for wanda, magnitude
(its whole-matrix threshold, and N:M) and SparseGPT; Coello-dev/STADE for stade, stade-w
and its per-row magnitude. ``RELEASED`` gives the stadebench options that reproduce each
release's choices; the defaults differ only where documented in docs/parity.md.
"""

from __future__ import annotations

import contextlib
import math
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


@contextlib.contextmanager
def released_statistics():
    """stadebench's input statistics accumulated as the releases do, for this test harness only.

    The releases update float32 running statistics window by window: Wanda a running mean
    of ‖x_j‖², SparseGPT a running (2/n)·XᵀX, STADE a running mean and a one-pass variance.
    stadebench sums in float64 (the variance by Chan's merge). The masks are the same up to
    float rounding, which the sequential protocol amplifies; with this accumulator (and
    ``batch_size=1``: one window per update) stadebench reproduces the releases' statistics
    bit for bit. It is not a stadebench option: core/statistics.py would hold one.
    """
    from stadebench.base import LayerStats
    from stadebench.core.statistics import Accumulator

    def add(self, x):
        if x.shape[0] != 1:
            raise ValueError("released_statistics() needs batch_size=1 (one window per update)")
        inp = x.reshape(-1, x.shape[-1]).t().float()
        n, tokens = getattr(self, "windows", 0), inp.shape[1]
        if "sumsq" in self.needs:  # locuslab/wanda lib/layerwrapper.py
            self.sumsq = torch.zeros(inp.shape[0]) if self.sumsq is None else self.sumsq
            self.sumsq *= n / (n + 1)
            self.sumsq += torch.norm(inp, p=2, dim=1) ** 2 / (n + 1)
        if "gram" in self.needs:  # lib/sparsegpt.py
            self.gram = torch.zeros(inp.shape[0], inp.shape[0]) if self.gram is None else self.gram
            self.gram *= n / (n + 1)
            scaled = math.sqrt(2 / (n + 1)) * inp
            self.gram += scaled.matmul(scaled.t())
        if "sum" in self.needs:  # Coello-dev/STADE lib/prune_zoo/stade.py
            t, new = self.count, self.count + tokens
            if t:
                new_mean = self.mean * t / new + torch.sum(inp, dim=1) / new
                self.var = ((t - 1) * self.var / (new - 1) + t * self.mean ** 2 / (new - 1)
                            - new * new_mean ** 2 / (new - 1) + torch.sum(inp ** 2, dim=1) / (new - 1))
            else:
                new_mean = torch.sum(inp, dim=1) / new
                self.var = torch.sum((inp - new_mean.reshape(-1, 1)) ** 2, dim=1) / (new - 1)
            self.mean = new_mean
        self.windows, self.count = n + 1, self.count + tokens

    def stats(self, layer):
        # stadebench scales the Gram matrix by 2/count itself; the variance is m2/(count-1)
        gram = None if self.gram is None else self.gram * (self.count / 2)
        total = m2 = None
        if self.mean is not None:
            total, m2 = self.mean.double() * self.count, self.var.double() * (self.count - 1)
        return LayerStats(layer, self.count, total, self.sumsq, gram, m2)

    before = Accumulator.add, Accumulator.stats
    Accumulator.add, Accumulator.stats = add, stats
    try:
        yield
    finally:
        Accumulator.add, Accumulator.stats = before
