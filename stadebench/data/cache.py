"""Where stadebench keeps downloaded assets and tokenised text."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

from ..errors import ConfigError

CACHE_ENV = "STADEBENCH_CACHE"


def cache_dir(override: str | os.PathLike | None = None, sub: str | None = None) -> Path:
    """The cache root, or its folder ``sub``, created if needed: ``override``, else
    ``$STADEBENCH_CACHE``, else the platform default. ConfigError, naming the folder and
    where it was set, when it cannot be created."""
    if override:
        root, origin = override, "--cache-dir"
    elif os.environ.get(CACHE_ENV):
        root, origin = os.environ[CACHE_ENV], f"${CACHE_ENV}"
    else:
        root, origin = platformdirs.user_cache_dir("stadebench"), "the platform's cache folder"
    path = Path(root).expanduser()
    target = path / sub if sub else path
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = ("a file is in the way" if isinstance(exc, FileExistsError | NotADirectoryError)
                  else exc.strerror or str(exc))
        raise ConfigError(f"cache folder {str(target)!r} (from {origin}) cannot be created: {reason}; "
                          f"set {CACHE_ENV} to a folder you can write") from None
    return target


__all__ = ["CACHE_ENV", "cache_dir"]
