"""Plumbing written once: atomic writes, file hashes, canonical JSON, "did you mean",
package versions, the Hugging Face offline switches."""

from __future__ import annotations

import difflib
import hashlib
import importlib.metadata
import json
import os
import re
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
"""Environment variables that keep transformers, huggingface_hub and datasets off the network."""


def canonical_json(value: Any) -> str:
    """``value`` as JSON with sorted keys and no whitespace, so equal values give equal text.

    Raises ValueError for NaN, infinities and values JSON cannot hold.
    """
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def digest(*parts: str | bytes, length: int = 64) -> str:
    """sha256 hex of ``parts`` (each length-prefixed, so ``("ab", "c") != ("a", "bc")``)."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:length]


def file_sha256(path: str | os.PathLike, progress: Callable[[int], None] | None = None) -> str:
    """sha256 hex of a file's bytes, read in 1 MiB chunks; ``progress(n)`` after each chunk."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
            if progress:
                progress(len(chunk))
    return h.hexdigest()


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows cannot open a directory; its renames are journalled anyway
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes | Callable[[IO[bytes]], Any]) -> None:
    """Write ``data`` (bytes, or a function called with the open file) to ``path`` atomically.

    The bytes go to a hidden temporary file beside ``path``, are fsynced and renamed over
    it, so a reader (or a killed writer) never sees a half-written file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as fh:
            if isinstance(data, bytes | bytearray):
                fh.write(data)
            else:
                data(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def close_matches(name: str, known: Iterable[str], n: int = 3, cutoff: float = 0.6) -> list[str]:
    """The known names closest to a misspelt ``name``, best first."""
    return difflib.get_close_matches(name, [str(k) for k in known], n=n, cutoff=cutoff)


def suggestion(name: str, known: Iterable[str], n: int = 1, cutoff: float = 0.6) -> str:
    """``did you mean 'x'?`` (or ``'x' or 'y'``) for the closest known names; empty when none is close."""
    close = close_matches(name, known, n, cutoff)
    return f"did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def did_you_mean(name: str, known: Iterable[str], n: int = 1) -> str:
    """``" (did you mean 'x'?)"`` for the closest known names, or an empty string."""
    hint = suggestion(name, known, n)
    return f" ({hint})" if hint else ""


def package_version(distribution: str) -> str | None:
    """The installed version of a distribution, None when it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def offline_variable() -> str | None:
    """The first of OFFLINE_VARS that the environment sets true, else None."""
    for var in OFFLINE_VARS:
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return var
    return None


def hub_offline() -> bool:
    """Whether the environment asks Hugging Face libraries to stay offline."""
    return offline_variable() is not None


def cut(text: str, limit: int = 80) -> str:
    """``text`` cut to at most ``limit`` characters, ending in "…" where it was cut: a user's
    argument quoted in a message stays one readable line however long it was."""
    return text if len(text) <= limit else text[:limit - 1] + "…"


def first_line(text: str | None) -> str:
    """The first line of ``text`` once stripped ("" for none): a docstring's summary, an error's headline."""
    return text.strip().splitlines()[0] if text and text.strip() else ""


# C0 and C1 controls (ESC and CSI start terminal sequences), DEL, and the bidirectional
# overrides that reorder what is shown; newline and tab are layout, not commands.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def visible(text: str) -> str:
    """``text`` with control characters shown as escapes (``\\x1b``, ``\\u202e``), so that text
    from a suite, a model folder or a shared leaderboard cannot drive the terminal."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}", text)


__all__ = ["OFFLINE_VARS", "atomic_write", "canonical_json", "close_matches", "cut", "did_you_mean", "digest",
           "file_sha256", "first_line", "fsync_dir", "hub_offline", "offline_variable", "package_version", "suggestion",
           "visible"]
