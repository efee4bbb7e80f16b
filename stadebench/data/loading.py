"""Load a suite's model and tokenizer from a Hub id, a local folder, a GGUF file or an asset."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Loaded:
    """A model ready to prune, with where it came from."""

    model: torch.nn.Module
    tokenizer: Any
    source: str
    """``asset``, ``local``, ``gguf`` or ``hub``."""
    revision: str | None


def _where(spec: Any) -> tuple[str, str, str | None]:
    """``(source, path or id, gguf file)`` for a model spec."""
    from . import assets

    ident = spec.id
    if ident in assets.CATALOGUE:
        return "asset", str(assets.fetch(ident)), spec.gguf_file
    path = Path(ident).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", str(path.parent), path.name
    if path.is_dir():
        return ("gguf" if spec.gguf_file else "local"), str(path), spec.gguf_file
    if ident.startswith((".", "/", "~")) or ident.endswith(".gguf"):
        raise ConfigError(f"model {ident!r}: no such file or folder")
    return "hub", ident, spec.gguf_file


def _sources(spec: Any) -> tuple[str, str, dict[str, Any], str, dict[str, Any]]:
    """``(source, where, kwargs, tokenizer where, tokenizer kwargs)`` for ``from_pretrained``."""
    source, where, gguf = _where(spec)
    common: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code}
    if source == "hub" and spec.revision:
        common["revision"] = spec.revision
    if gguf:
        common["gguf_file"] = gguf
    tok_common = common if spec.tokenizer is None else {"trust_remote_code": spec.trust_remote_code}
    return source, where, common, spec.tokenizer or where, tok_common


def load_config_and_tokenizer(spec: Any) -> tuple[Any, Any]:
    """The model's config and tokenizer, without its weights (for checks before a run)."""
    from transformers import AutoConfig, AutoTokenizer

    _, where, common, tok_where, tok_common = _sources(spec)
    return AutoConfig.from_pretrained(where, **common), AutoTokenizer.from_pretrained(tok_where, **tok_common)


def load_model(spec: Any, device: str | torch.device = "cpu") -> Loaded:
    """Load ``spec`` (a ``stadebench.bench.suite.ModelSpec``) in its dtype, weights on ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bars are on stderr

    source, where, common, tok_where, tok_common = _sources(spec)
    gguf = common.get("gguf_file")
    try:
        # transformers reads safetensors, and .bin files only with torch.load(weights_only=True)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=DTYPES[spec.dtype], **common)
        tokenizer = AutoTokenizer.from_pretrained(tok_where, **tok_common)
    except (OSError, ValueError) as exc:
        hint = (" The Hugging Face Hub may be unreachable: use a local folder, a GGUF file or an asset "
                "(`stadebench assets list`)." if source == "hub" else "")
        raise ConfigError(f"could not load model {spec.id!r}: {exc}.{hint}") from exc
    if getattr(model, "hf_quantizer", None) is not None and gguf:
        model.hf_quantizer = None  # de-quantised on load; pruning edits plain float weights
    model.to(device)
    model.eval()
    return Loaded(model, tokenizer, source, spec.revision)
