"""Calibration windows and evaluation token streams, cached on disk.

Calibration follows Wanda/SparseGPT for every dataset: with ``random.Random(seed)``,
draw a document index uniformly, redraw while the document has ≤ seqlen tokens,
then draw a start in ``[0, len - seqlen - 1]`` and take seqlen tokens. With the same
documents, tokenizer and seed this reproduces the reference C4 windows exactly.
Documents are only tokenized when drawn; when every document is too short the
request is a ``ConfigError`` naming the longest document (no silent fallback to
another protocol).

Special tokens are added as ``tokenizer(text)`` adds them, like the reference code:
each calibration document is tokenized on its own, so a Llama window that starts
at a document's first token begins with BOS; an evaluation stream is the split's
documents joined with the dataset's ``join`` and tokenized once, so BOS appears only
at its very start, never mid-stream.

Token streams, document lengths and drawn windows are cached under
``cache_dir(sub="tokens")``, keyed by the dataset's ``fingerprint()``, the tokenizer's
fingerprint, the split (and the window parameters). Files are written to a temporary
name and renamed, so concurrent processes can share the cache; a read-only cache is read,
and what it lacks is recomputed each time (one warning says caching is off).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..base import Dataset
from .cache import cache_dir, caching_off
from ..errors import ConfigError
from ..util import atomic_write, canonical_json, digest

CACHE_FORMAT = 2  # 2: entries carry their ids' sha256
# Consecutive too-short draws before every document of the split is measured, to
# tell "unlucky" from "impossible". It never changes which windows are drawn.
SCAN_AFTER = 1000
BATCH = 256


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """``name:vocab size:hash`` of the tokenizer's serialized definition.

    The hash covers the fast tokenizer's JSON (model, normalizer, pre-tokenizer,
    post-processor: whether BOS/EOS are added), or else the vocabulary, plus the
    special tokens and BOS/EOS flags.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = backend.to_str()
    else:
        definition = json.dumps(sorted(tokenizer.get_vocab().items()))
    extras = json.dumps({
        "class": type(tokenizer).__name__,
        "special": {k: str(v) for k, v in (getattr(tokenizer, "special_tokens_map", None) or {}).items()},
        "add_bos": getattr(tokenizer, "add_bos_token", None),
        "add_eos": getattr(tokenizer, "add_eos_token", None),
    }, sort_keys=True, default=str)
    fingerprint = hashlib.sha256((definition + "\0" + extras).encode()).hexdigest()[:16]
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    return f"{name}:{len(tokenizer)}:{fingerprint}"


def eval_tokens(dataset: Dataset, tokenizer: Any, split: str | None = None) -> torch.Tensor:
    """The evaluation stream of ``split`` (default ``dataset.eval_split``): LongTensor ``[T]``.

    The split's first ``dataset.eval_documents`` documents (all when None), joined
    with ``dataset.join`` and tokenized once with the tokenizer's special tokens.
    """
    split = split or dataset.eval_split
    key = _key("stream", dataset, tokenizer, split, join=dataset.join, documents=dataset.eval_documents)
    cached = _load(key)
    if cached is not None:
        return cached
    docs = dataset.documents(split)
    if dataset.eval_documents is not None:
        docs = itertools.islice(docs, dataset.eval_documents)
    ids = torch.tensor(_encode(tokenizer, [dataset.join.join(docs)])[0], dtype=torch.long)
    _store(key, ids)
    return ids


def calibration_windows(dataset: Dataset, tokenizer: Any, seqlen: int, n: int, seed: int,
                        split: str = "train") -> torch.Tensor:
    """``n`` calibration windows of ``seqlen`` tokens: LongTensor ``[n, seqlen]``.

    Deterministic given (dataset fingerprint, tokenizer, seqlen, n, seed, split); see
    the module docstring for the protocol. Raises ``ConfigError`` when no document
    of the split is longer than ``seqlen`` tokens.
    """
    if seqlen < 1 or n < 0:
        raise ConfigError(f"calibration needs seqlen ≥ 1 and n ≥ 0, got seqlen={seqlen}, n={n}")
    key = _key("windows", dataset, tokenizer, split, seqlen=seqlen, n=n, seed=seed)
    cached = _load(key, numel=n * seqlen)
    if cached is not None:
        return cached.view(n, seqlen)
    windows = _draw(dataset, tokenizer, split, seqlen, n, seed)
    _store(key, windows.flatten())
    return windows


def _draw(dataset: Dataset, tokenizer: Any, split: str, seqlen: int, n: int, seed: int) -> torch.Tensor:
    docs = dataset.documents(split)
    if not isinstance(docs, Sequence):
        docs = list(docs)
    if n and not docs:
        raise ConfigError(f"dataset {dataset.name!r} has no documents in its {split!r} split")
    rng = random.Random(seed)
    long_docs: dict[int, list[int]] = {}
    short: set[int] = set()
    lengths: list[int] | None = None  # every document's length, once measured
    out = torch.empty(n, seqlen, dtype=torch.long)
    for k in range(n):
        misses = 0
        while True:
            i = rng.randint(0, len(docs) - 1)
            if i in short or (lengths is not None and lengths[i] <= seqlen):
                ids = None
            else:
                ids = long_docs.get(i) or _encode(tokenizer, [docs[i]])[0]
            if ids is not None and len(ids) > seqlen:
                long_docs[i] = ids
                break
            short.add(i)
            misses += 1
            if lengths is None and (misses >= SCAN_AFTER or len(short) == len(docs)):
                lengths = _document_lengths(dataset, tokenizer, split, docs)
                if max(lengths) <= seqlen:
                    raise ConfigError(
                        f"cannot cut calibration windows of seqlen={seqlen} tokens from dataset "
                        f"{dataset.name!r} ({split} split): its longest document has {max(lengths)} tokens "
                        f"({len(docs)} documents), and a window needs a document longer than seqlen. "
                        "Use a smaller seqlen or a dataset with longer documents (c4, enwiki-2016, "
                        "or text with split_by: file).")
        start = rng.randint(0, len(ids) - seqlen - 1)
        out[k] = torch.tensor(ids[start:start + seqlen])
    return out


def _document_lengths(dataset: Dataset, tokenizer: Any, split: str, docs: Sequence[str]) -> list[int]:
    key = _key("lengths", dataset, tokenizer, split)
    cached = _load(key, numel=len(docs))
    if cached is not None:
        return cached.tolist()
    lengths = []
    for start in range(0, len(docs), BATCH):
        lengths += [len(ids) for ids in _encode(tokenizer, list(docs[start:start + BATCH]))]
    _store(key, torch.tensor(lengths, dtype=torch.long))
    return lengths


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, special tokens added as ``tokenizer(text)`` adds them."""
    # verbose=False: texts longer than model_max_length are expected here (they are
    # cut into windows), so transformers' "sequence is longer" warning is noise.
    return tokenizer(texts, add_special_tokens=True, truncation=False, padding=False, verbose=False,
                     return_attention_mask=False, return_token_type_ids=False)["input_ids"]


# --- on-disk cache -----------------------------------------------------------------


def _key(kind: str, dataset: Dataset, tokenizer: Any, split: str, **extra: Any) -> dict[str, Any]:
    return {"format": CACHE_FORMAT, "kind": kind, "dataset": dataset.fingerprint(),
            "tokenizer": tokenizer_fingerprint(tokenizer), "split": split, **extra}


def _path(key: dict[str, Any]) -> Path:
    return cache_dir(sub="tokens") / f"{key['kind']}-{digest(canonical_json(key), length=32)}.pt"


def _ids_sha(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int32).contiguous().numpy().tobytes()).hexdigest()


def _load(key: dict[str, Any], numel: int | None = None) -> torch.Tensor | None:
    """The cached ids of ``key`` (``numel`` of them when given), or None. An entry that is
    not a whole, matching one (truncated, edited, another key's) is rebuilt, with a warning."""
    path = _path(key)
    if not path.exists():
        return None
    try:
        blob = torch.load(path, weights_only=True)
        ids = blob["ids"]
        whole = (blob["key"] == canonical_json(key) and isinstance(ids, torch.Tensor) and ids.dim() == 1
                 and ids.dtype == torch.int32 and (numel is None or ids.numel() == numel)
                 and blob["sha256"] == _ids_sha(ids))
    except Exception:  # noqa: BLE001 -- not a readable torch file, or not one of ours
        whole = False
    if whole:
        return ids.long()
    warnings.warn(f"token cache file {path} is damaged or not the entry it is named for; rebuilding it",
                  stacklevel=3)
    return None


def _store(key: dict[str, Any], ids: torch.Tensor) -> None:
    path = _path(key)
    blob = {"key": canonical_json(key), "ids": ids.to(torch.int32), "sha256": _ids_sha(ids)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: torch.save(blob, f))
    except OSError as exc:  # a read-only cache costs time, not correctness
        caching_off(path.parent, exc.strerror or str(exc))


__all__ = ["BATCH", "CACHE_FORMAT", "SCAN_AFTER", "calibration_windows", "eval_tokens", "tokenizer_fingerprint"]
