"""Find the decoder blocks and their prunable linear layers in any HF causal LM.

No per-family code: the blocks are the ``ModuleList`` whose length is the config's
number of hidden layers (preferring one whose class is in ``_no_split_modules``); the
prunable layers are the ``nn.Linear`` and transformers ``Conv1D`` modules inside a
block. Embeddings and the LM head are outside the blocks and never pruned.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ..errors import ConfigError

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = ()


def text_config(config):
    """The language model's part of a (possibly multimodal) config."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def num_layers(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    config = text_config(config)
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    return None


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: ``(path, ModuleList)``."""
    expected = num_layers(model)
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    candidates = [
        (name, mod) for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) > 0
        and (expected is None or len(mod) == expected)
        and any(is_prunable(m) for m in mod[0].modules())
    ]
    if not candidates:
        raise ConfigError(
            f"could not find the decoder blocks of {type(model).__name__}: no ModuleList of "
            f"{expected} blocks containing linear layers"
        )
    candidates.sort(key=lambda c: (type(c[1][0]).__name__ not in no_split, c[0].count(".")))
    return candidates[0]


def is_prunable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def prunable_layers(block: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name inside the block, module)`` of every prunable linear, in module order."""
    return [(name, mod) for name, mod in block.named_modules() if name and is_prunable(mod)]


def norm_modules(block: nn.Module) -> list[nn.Module]:
    """Normalisation layers inside a block (LayerNorm, RMSNorm of any family)."""
    return [m for m in block.modules()
            if isinstance(m, nn.LayerNorm | nn.GroupNorm) or type(m).__name__.lower().endswith("norm")]


def transposed(layer: nn.Module) -> bool:
    """Whether the layer stores its weight as ``[in, out]`` (transformers' Conv1D)."""
    return bool(Conv1D) and isinstance(layer, Conv1D)


def weight_of(layer: nn.Module) -> torch.Tensor:
    """The weight as ``[out, in]`` (a view; Conv1D stores it transposed)."""
    return layer.weight.t() if transposed(layer) else layer.weight


def set_weight(layer: nn.Module, weight: torch.Tensor) -> None:
    """Copy an ``[out, in]`` weight into the layer, in the layer's dtype."""
    weight_of(layer).copy_(weight)


def add_bias(layer: nn.Module, delta: torch.Tensor) -> None:
    """Add ``delta`` (``[out]``) to the layer's bias, in the bias's dtype, creating a zero
    bias first (the weight's dtype and device, not trainable) if the layer has none."""
    if getattr(layer, "bias", None) is None:
        w = layer.weight
        layer.bias = nn.Parameter(torch.zeros(delta.numel(), dtype=w.dtype, device=w.device), requires_grad=False)
    layer.bias.data += delta.to(layer.bias.dtype)


def module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def move_outside(model: nn.Module, blocks: nn.Module, device: torch.device) -> None:
    """Move every parameter and buffer that is not inside ``blocks`` to ``device``."""

    def contains(mod: nn.Module) -> bool:
        return any(m is blocks for m in mod.modules())

    def visit(mod: nn.Module) -> None:
        if mod is blocks:
            return
        if not contains(mod):
            mod.to(device)
            return
        for p in mod._parameters.values():
            if p is not None:
                p.data = p.data.to(device)
        for key, b in mod._buffers.items():
            if b is not None:
                mod._buffers[key] = b.to(device)
        for child in mod.children():
            visit(child)

    visit(model)


def enable_bias_flags(model: nn.Module) -> list[str]:
    """Turn on the config's ``*_bias`` flags (Llama: attention_bias, mlp_bias) so that
    biases added by pruning are saved and come back on reload; returns the flags set.

    Families whose code fixes ``bias=False`` without a flag (e.g. Mistral) cannot reload
    such biases; the in-memory model is unaffected either way.
    """
    config = getattr(model, "config", None)
    flags = [k for k, v in vars(config).items() if k.endswith("_bias") and v is False] if config else []
    for flag in flags:
        setattr(config, flag, True)
    return flags


def iter_layers(model: nn.Module) -> Iterator[tuple[int, str, nn.Module]]:
    """``(block index, name inside the block, module)`` for every prunable layer."""
    _, blocks = find_blocks(model)
    for i, block in enumerate(blocks):
        for name, layer in prunable_layers(block):
            yield i, name, layer


def named_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every prunable layer by its full name (``model.layers.3.self_attn.o_proj``), in model order."""
    prefix, _ = find_blocks(model)
    return {f"{prefix}.{i}.{name}": layer for i, name, layer in iter_layers(model)}


def layer_names(model: nn.Module) -> list[str]:
    """Full names of every prunable layer, in model order."""
    return list(named_layers(model))


def select_layers(model: nn.Module, targets: Sequence[str] = (), ignore: Sequence[str] = ()) -> list[str]:
    """Full names of the prunable layers to prune, in model order: those a ``targets``
    regex finds (``re.search``; all of them when there is none), minus those an
    ``ignore`` regex finds. Every regex must find some linear module of the model (the
    LM head counts, although it is never pruned), so that a misspelt one is an error. All
    the searches together get MATCH_SECONDS: a regex that backtracks catastrophically is
    a ConfigError naming it, not a hang."""
    linears = [name for name, mod in model.named_modules() if is_prunable(mod)]
    finds = _Finder(type(model).__name__, targets, ignore)
    for key, patterns in (("targets", targets), ("ignore", ignore)):
        for k, pattern in enumerate(patterns):
            if not any(finds(key, k, name) for name in linears):
                raise ConfigError(f"{key}[{k}] {pattern!r} matches no linear layer of {type(model).__name__} "
                                  f"(names look like {linears[0]!r} … {linears[-1]!r})")
    names = [n for n in layer_names(model)
             if (not targets or any(finds("targets", k, n) for k in range(len(targets))))
             and not any(finds("ignore", k, n) for k in range(len(ignore)))]
    if not names:
        raise ConfigError(f"targets {list(targets)} and ignore {list(ignore)} leave no layer of "
                          f"{type(model).__name__} to prune")
    return names


MATCH_SECONDS = 0.5
"""Time all of one ``select_layers`` call's regex searches may take together: a regex that
backtracks catastrophically on the layer names is refused instead of hanging the run."""


class _Finder:
    """``re.search`` of the ``targets`` / ``ignore`` regexes over layer names, run by the
    ``regex`` engine (the same syntax and matches for these patterns) under one deadline."""

    def __init__(self, model: str, targets: Sequence[str], ignore: Sequence[str]):
        import regex  # a dependency of transformers; unlike re, it can stop a search

        self.model, self.regex = model, regex
        self.patterns = {"targets": list(targets), "ignore": list(ignore)}
        self.deadline = time.monotonic() + MATCH_SECONDS

    def __call__(self, key: str, k: int, name: str) -> bool:
        pattern = self.patterns[key][k]
        try:
            compiled = self.regex.compile(pattern, self.regex.V0)
            return compiled.search(name, timeout=max(self.deadline - time.monotonic(), 1e-3)) is not None
        except TimeoutError:
            shown = repr(pattern) if len(pattern) <= 80 else f"{pattern[:80]!r}…"
            raise ConfigError(f"{key}[{k}] {shown} takes longer than {MATCH_SECONDS:g} s to search the layer names of "
                              f"{self.model} (e.g. {name[:120]!r}): it backtracks catastrophically, as a repeated "
                              "group inside a repeat does; write it without nested or overlapping repeats") from None
        except self.regex.error as exc:  # what re accepts, regex should too; say so if not
            raise ConfigError(f"{key}[{k}] {pattern!r} cannot be used as a layer regex: {exc}") from None


def check_context(config, seqlen: int, what: str) -> None:
    """Raise ConfigError when ``seqlen`` tokens exceed the model's context
    (``max_position_embeddings``); ``what`` names the setting, e.g. ``calibration.seqlen``."""
    limit = getattr(text_config(config), "max_position_embeddings", None) if config is not None else None
    if isinstance(limit, int) and seqlen > limit:
        raise ConfigError(f"{what}={seqlen} is longer than the model's context "
                          f"(max_position_embeddings={limit}); use seqlen ≤ {limit}")


__all__ = ["add_bias", "check_context", "enable_bias_flags", "find_blocks", "is_prunable", "iter_layers", "layer_names",
           "module_device", "move_outside", "named_layers", "norm_modules", "num_layers", "prunable_layers",
           "select_layers", "set_weight", "text_config", "transposed", "weight_of"]
