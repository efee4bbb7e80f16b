"""Where stadebench keeps downloaded assets and tokenised text."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

CACHE_ENV = "STADEBENCH_CACHE"


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The cache root: ``override``, else ``$STADEBENCH_CACHE``, else the platform default."""
    root = override or os.environ.get(CACHE_ENV) or platformdirs.user_cache_dir("stadebench")
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path
