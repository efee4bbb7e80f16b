"""Load a suite's model and tokenizer from a Hub id, a local folder, a GGUF file or an asset,
and say which weights those are (``identify``) without loading them."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..util import atomic_write, canonical_json, digest, file_sha256, hub_offline
from .cache import cache_dir

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
    """``(source, path or id, gguf file)`` for a model spec: the one place that decides
    where a model comes from."""
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


@dataclass(frozen=True)
class ModelIdentity:
    """Which weights a model spec names: the model part of a result's key.

    Attributes:
        source: ``hub``, ``local``, ``gguf`` or ``asset`` (a GGUF file on the Hub is ``hub``
            with a ``file``).
        revision: the resolved Hub commit; an asset's package pin; None for local files
            or when the Hub commit cannot be found (then the cells fail to load anyway).
        file: the GGUF file the weights are read from, if any.
        tokenizer: the tokenizer id or path when it is not the model's own.
        fingerprint: sha256 over the local files that define the model (names and
            contents; documentation such as the card is left out, see ``is_documentation``),
            or over an asset's pinned identity; None for the Hub.
    """

    source: str
    revision: str | None
    file: str | None
    tokenizer: str | None
    fingerprint: str | None


_COMMIT = re.compile(r"[0-9a-f]{40}")


def on_this_machine(spec: Any) -> bool:
    """Whether ``spec``'s files are here without fetching: a local folder or GGUF file, or
    an asset already in the cache (a Hub model is asked of the Hub when it is loaded)."""
    from . import assets

    if spec.id in assets.CATALOGUE:
        return assets.cached(spec.id)
    return Path(spec.id).expanduser().exists()


def identify(spec: Any) -> ModelIdentity:
    """The identity of ``spec``'s weights, found without loading them (local files are
    hashed once and then remembered by size and modification time)."""
    from . import assets

    source, where, gguf = _where(spec) if spec.id not in assets.CATALOGUE else ("asset", spec.id, spec.gguf_file)
    tokenizer = spec.tokenizer if spec.tokenizer not in (None, spec.id) else None
    if source == "asset":
        asset = assets.CATALOGUE[spec.id]
        return ModelIdentity(source, asset.requirement, gguf, tokenizer,
                             digest(canonical_json(assets.identity(asset)), length=32))
    if source == "hub":
        return ModelIdentity(source, resolve_revision(spec.id, spec.revision), gguf, tokenizer, None)
    folder = Path(where)
    files = [folder / gguf] if gguf else sorted(p for p in folder.iterdir() if p.is_file()
                                                 and not p.name.startswith(".") and not is_documentation(p.name))
    return ModelIdentity(source, None, gguf, tokenizer, fingerprint(files, folder))


_DOC_SUFFIXES = frozenset({".md", ".markdown", ".rst", ".pdf", ".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp"})
_DOC_STEMS = frozenset({"README", "LICENSE", "LICENCE", "NOTICE", "COPYING", "AUTHORS", "CITATION", "CHANGELOG"})


def is_documentation(name: str) -> bool:
    """Whether a model folder's file ``name`` documents the model rather than defines it: the
    card (README.md) and other Markdown or reStructuredText, licences and notices, figures.
    The fingerprint leaves them out, so editing a card does not make a new model; weights,
    config, tokenizer, code and anything else stay in (merges.txt and vocab.txt are tokenizer
    files, so text files are not documentation by their suffix)."""
    path = Path(name)
    return path.suffix.lower() in _DOC_SUFFIXES or path.stem.upper() in _DOC_STEMS


def fingerprint(files: list[Path], root: Path) -> str:
    """sha256 over ``files``' names (relative to ``root``) and content hashes."""
    parts = []
    for path in files:
        try:
            parts += [str(path.relative_to(root)), _content_hash(path)]
        except OSError as exc:
            raise ConfigError(f"cannot read model file {path}: {exc.strerror or exc}") from None
    return digest(*parts, length=32)


def _content_hash(path: Path) -> str:
    """sha256 of a file, remembered by (path, size, mtime, inode) so a re-run hashes nothing."""
    st = path.stat()
    memo = cache_dir(sub="fingerprints")
    entry = memo / digest(str(path.resolve()), str(st.st_size), str(st.st_mtime_ns), str(st.st_ino),
                          length=32)
    try:
        sha = json.loads(entry.read_text())["sha256"]
        if isinstance(sha, str) and _SHA256.fullmatch(sha):
            return sha
    except (OSError, ValueError, KeyError, TypeError):
        pass  # a damaged entry is recomputed and replaced
    sha = file_sha256(path)
    try:
        atomic_write(entry, json.dumps({"path": str(path), "sha256": sha}).encode())
    except OSError:
        pass  # an unwritable memo costs a re-hash next time, not a wrong answer
    return sha


_SHA256 = re.compile(r"[0-9a-f]{64}")


def check_files(spec: Any) -> None:
    """Refuse, naming the file, local weights that cannot be read as they are: a GGUF or
    safetensors file that is truncated or not what its name says, and a PyTorch pickle
    that holds more than tensors (which the safe loader refuses on purpose). Reads headers
    and a pickle's object graph (tensors memory-mapped), never the weights. Hub models
    are left to the loader."""
    source, where, gguf = _where(spec)
    if source == "hub":
        return
    folder = Path(where)
    if gguf:
        _check_gguf(folder / gguf)
        return
    tensors = sorted(folder.glob("*.safetensors"))
    for path in tensors:
        _check_safetensors(path)
    if not tensors:  # transformers reads .bin weights only when there is no safetensors file
        for path in sorted(folder.glob("pytorch_model*.bin")):
            _check_pickle(path)


def _check_gguf(path: Path) -> None:
    from gguf import GGUFReader

    try:
        GGUFReader(path)
    except Exception as exc:  # struct, numpy and value errors alike mean "not a whole GGUF file"
        raise ConfigError(f"{path} is not a readable GGUF file ({type(exc).__name__}: "
                          f"{exc}); it may be truncated: download it again") from None


def _check_safetensors(path: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as exc:
        raise ConfigError(f"{path} is not a readable safetensors file ({exc}); it may be "
                          "truncated: download or save it again") from None


def _check_pickle(path: Path) -> None:
    import pickle
    import zipfile

    try:  # only the zip format can be memory-mapped; legacy pickles are read whole
        torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))  # torch names the first class it refused
        what = f"an object of class {found[1]}" if found else "Python objects other than tensors"
        raise ConfigError(f"refused to load {path}: it holds {what}, and stadebench loads weights only "
                          "with torch's safe loader (weights_only=True), on purpose. Convert it to "
                          "safetensors where you trust its source, or use a safetensors copy") from None
    except Exception as exc:
        raise ConfigError(f"{path} is not a readable PyTorch weights file "
                          f"({type(exc).__name__}: {exc}); it may be truncated: download it again") from None


def resolve_revision(repo: str, revision: str | None) -> str | None:
    """The commit a Hub revision (branch, tag or commit; None = main) points at: asked of
    the Hub unless offline, else read from the local Hugging Face cache; None if neither knows."""
    if revision and _COMMIT.fullmatch(revision):
        return revision
    if not hub_offline():
        try:
            from huggingface_hub import HfApi

            return HfApi().model_info(repo, revision=revision, timeout=10).sha
        except Exception:  # unreachable Hub or unknown repo: the cache may still know it
            pass
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo, "config.json", revision=revision)
    except Exception:
        return None
    if isinstance(found, str | os.PathLike):
        commit = Path(found).parent.name
        return commit if _COMMIT.fullmatch(commit) else None
    return None


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

    try:
        check_files(spec)
    except ConfigError as exc:
        raise ConfigError(f"model {spec.id!r}: {exc}") from None
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


__all__ = ["DTYPES", "Loaded", "ModelIdentity", "check_files", "fingerprint", "identify", "is_documentation",
           "load_config_and_tokenizer", "load_model", "on_this_machine", "resolve_revision"]
