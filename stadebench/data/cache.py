"""Where stadebench keeps downloaded assets and tokenised text.

The cache may be shared and read-only (clusters often mount it so). Its memo folders
(``MEMOS``: token streams, file hashes, gradient statistics) only save time: when one cannot be made or
written, the run goes on without it, with one warning that caching is off. What must be
written (an asset not fetched yet) asks for a writable folder with ``writable_dir``, a
ConfigError naming the folder.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import platformdirs

from ..errors import ConfigError

CACHE_ENV = "STADEBENCH_CACHE"
MEMOS = frozenset({"tokens", "fingerprints", "gradients"})
"""Sub-folders whose contents are only remembered work: a run does without them."""

_WARNED: set[str] = set()  # cache roots already said to be off, once per process


def cache_root(override: str | os.PathLike | None = None) -> tuple[Path, str]:
    """The cache root (not created) and where it was set, for messages."""
    if override:
        root, origin = override, "--cache-dir"
    elif os.environ.get(CACHE_ENV):
        root, origin = os.environ[CACHE_ENV], f"${CACHE_ENV}"
    else:
        root, origin = platformdirs.user_cache_dir("stadebench"), "the platform's cache folder"
    return Path(root).expanduser(), origin


def cache_dir(override: str | os.PathLike | None = None, sub: str | None = None) -> Path:
    """The cache root, or its folder ``sub``, created if needed: ``override``, else
    ``$STADEBENCH_CACHE``, else the platform default.

    A ``MEMOS`` folder that cannot be created or written is returned all the same, after
    one warning that caching is off; readers find nothing or what is there, writers'
    OSErrors are theirs to ignore. Any other folder that cannot be created is a
    ConfigError naming it and where it was set."""
    root, origin = cache_root(override)
    target = root / sub if sub else root
    optional = sub in MEMOS
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if optional:
            caching_off(target, _reason(exc), override)
            return target
        raise ConfigError(f"cache folder {str(target)!r} (from {origin}) cannot be created: {_reason(exc)}; "
                          f"set {CACHE_ENV} to a folder you can write") from None
    if optional and not os.access(target, os.W_OK):
        caching_off(target, "it is read-only", override)
    return target


def writable_dir(sub: str, override: str | os.PathLike | None = None, *, why: str) -> Path:
    """The cache folder ``sub``, created and writable, for something that must be written
    (``why``, e.g. ``asset 'x' is not fetched yet``); else a ConfigError naming the folder
    and the fix."""
    root, origin = cache_root(override)
    target = root / sub
    try:
        target.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=target, prefix=".stadebench-write-test-")
        os.close(fd)
        os.unlink(probe)
        reason = None
    except OSError as exc:
        reason = _reason(exc)
    if reason:
        raise ConfigError(f"{why} and must be written to the cache folder {str(target)!r} (from {origin}), but "
                          f"it cannot be written: {reason}; set {CACHE_ENV} (or --cache-dir) to a folder you can "
                          "write, or fill this cache where it is writable (`stadebench assets fetch`)")
    return target


def caching_off(folder: Path, reason: str, override: str | os.PathLike | None = None) -> None:
    """Warn, once per process and cache root, that the cache at ``folder`` is not written."""
    root, origin = cache_root(override)
    if str(root) in _WARNED:
        return
    _WARNED.add(str(root))
    warnings.warn(f"cache folder {str(folder)!r} (from {origin}) cannot be written ({reason}): caching is off, "
                  "so token streams, file hashes and gradient statistics are recomputed each run; set "
                  f"{CACHE_ENV} to a folder you can write to keep them", stacklevel=3)


def _reason(exc: OSError) -> str:
    if isinstance(exc, FileExistsError | NotADirectoryError):
        return "a file is in the way"
    return exc.strerror or str(exc)


__all__ = ["CACHE_ENV", "MEMOS", "cache_dir", "cache_root", "caching_off", "writable_dir"]
