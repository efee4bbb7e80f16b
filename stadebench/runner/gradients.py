"""Gradient statistics kept on disk, so that a second metric or a second run reuses them.

An entry is one safetensors file in the cache folder ``gradients/``, named by the sha256
of what determines its values: the model (its spec and identity), the calibration
windows themselves, the scale, the accumulation, the statistic's version, the torch
version and the device type (kernels round differently). It is written to a temporary
file and renamed into place when complete, so a killed pass leaves nothing a later run
would read (a writer killed mid-write leaves a hidden partial file, which the next writer
on the same host removes). An entry that cannot be read, or whose recorded key or layers
do not match the model, is removed with a warning and computed again. The folder only saves time
(``data.cache.MEMOS``): where it cannot be written, runs go on without it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import socket
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from ..core.gradients import VERSION, GradientStatistics
from ..data.cache import cache_dir
from ..util import canonical_json

SUB = "gradients"


def entry_key(spec_json: str, identity: Any, windows: torch.Tensor, scale: float, accumulate: str,
              device: torch.device) -> str | None:
    """The key of an entry, or None when the model's weights are not pinned (a Hub model
    whose commit is unknown): such gradients are not cached."""
    ident = dataclasses.asdict(identity) if dataclasses.is_dataclass(identity) else identity
    if not ident or not (ident.get("revision") or ident.get("fingerprint")):
        return None
    windows_hash = hashlib.sha256(windows.contiguous().numpy().tobytes()).hexdigest()
    return canonical_json({"version": VERSION, "model": spec_json, "identity": ident, "windows": windows_hash,
                           "shape": list(windows.shape), "scale": float(scale), "accumulate": accumulate,
                           "torch": torch.__version__.split("+")[0], "device": device.type})


def _path(key: str) -> Path:
    return cache_dir(sub=SUB) / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".safetensors")


def load(key: str, expected: dict[str, tuple[int, int]]) -> GradientStatistics | None:
    """The entry for ``key`` when there is a sound one; ``expected`` gives every prunable
    layer's ``[out, in]`` shape. A damaged or mismatched entry is removed with a warning."""
    from safetensors import safe_open

    path = _path(key)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key:
                raise ValueError("it was written for another model or calibration")
            layers = {}
            for name, shape in expected.items():
                l1, l2 = f.get_tensor(f"{name}/l1"), f.get_tensor(f"{name}/l2")
                if tuple(l1.shape) != shape or tuple(l2.shape) != shape:
                    raise ValueError(f"layer {name} has shape {tuple(l1.shape)}, not {shape}")
                layers[name] = (l1, l2)
            n, seqlen = int(meta["n"]), int(meta["seqlen"])
            scale, accumulate, seconds = float(meta["scale"]), meta["accumulate"], float(meta["seconds"])
    except Exception as exc:  # noqa: BLE001 - any damage means: compute it again
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        warnings.warn(f"gradient cache entry {str(path)!r} is damaged or stale ({reason}): removed, the "
                      "gradients are computed again", stacklevel=2)
        path.unlink(missing_ok=True)
        return None
    nbytes = sum(t.numel() * t.element_size() for pair in layers.values() for t in pair)
    return GradientStatistics(layers, n=n, seqlen=seqlen, scale=scale, accumulate=accumulate, seconds=seconds,
                              nbytes=nbytes, cached=True)


_PARTIAL = ".partial-"
_HOST = socket.gethostname().replace("-", "_")


def _reap(folder: Path) -> None:
    """Remove what writers on this host that were killed mid-write left behind (a shared
    cache's other hosts are left alone: their writers may be alive)."""
    for path in folder.glob(f"{_PARTIAL}{_HOST}-*"):
        try:
            pid = int(path.name[len(_PARTIAL) + len(_HOST) + 1:].split("-", 1)[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
        except (ValueError, OSError):
            continue


def store(key: str, stats: GradientStatistics) -> Path | None:
    """Write ``stats`` under ``key``, atomically; None (and a warning) when the cache
    folder cannot take it (read-only, or too little free space)."""
    from safetensors.torch import save_file

    path = _path(key)
    folder = path.parent
    if not os.access(folder, os.W_OK):  # data.cache has said that caching is off
        return None
    try:
        free = shutil.disk_usage(folder).free
        if stats.nbytes > 0.5 * free:
            warnings.warn(f"gradient statistics ({stats.nbytes / 2**30:.1f} GiB) are not cached: {folder} has "
                          f"{free / 2**30:.1f} GiB free", stacklevel=2)
            return None
        tensors = {f"{name}/{which}": t.contiguous() for name, pair in stats.layers.items()
                   for which, t in zip(("l1", "l2"), pair)}
        meta = {"key": key, "n": str(stats.n), "seqlen": str(stats.seqlen), "scale": repr(stats.scale),
                "accumulate": stats.accumulate, "seconds": repr(stats.seconds)}
        _reap(folder)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f"{_PARTIAL}{_HOST}-{os.getpid()}-", suffix=".safetensors")
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as any other file of the cache, not mkstemp's 0600
        try:
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as exc:
        warnings.warn(f"gradient statistics are not cached in {str(folder)!r}: {exc.strerror or exc}", stacklevel=2)
        return None
    return path


__all__ = ["SUB", "entry_key", "load", "store"]
