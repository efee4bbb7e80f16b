"""The released reference implementations, loaded at test time from local clones.

Nothing of theirs is vendored: each clone's ``lib`` package is imported from the folder an
environment variable names, under its own name in ``sys.modules`` only while it loads
(both releases call their package ``lib``), with their calibration loader (``lib.data``,
which downloads C4) replaced by a stub that hands over stadebench's windows.

- ``STADEBENCH_REFERENCE_WANDA``: a clone of locuslab/wanda (``prune_wanda``,
  ``prune_magnitude``, ``prune_sparsegpt`` in ``lib/prune.py``).
- ``STADEBENCH_REFERENCE_STADE``: a clone of Coello-dev/STADE (``prune_process`` in
  ``lib/prune.py``, one pruner class per method in ``lib/prune_zoo/``).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
import types
from pathlib import Path

import torch

WANDA_ENV = "STADEBENCH_REFERENCE_WANDA"
STADE_ENV = "STADEBENCH_REFERENCE_STADE"
#: The files each release must have; the tests skip when one is missing.
FILES = {
    WANDA_ENV: ("lib/prune.py", "lib/sparsegpt.py", "lib/layerwrapper.py", "lib/ablate.py"),
    STADE_ENV: ("lib/prune.py", "lib/utils.py", "lib/prune_zoo/basepruner.py", "lib/prune_zoo/stade.py",
                "lib/prune_zoo/wanda.py", "lib/prune_zoo/sparsegpt.py", "lib/prune_zoo/magnitudepruner.py"),
}
#: The commits the parity figures in docs/parity.md were measured at.
MEASURED_AT = {WANDA_ENV: "8e8fc87b4a2f9955baa7e76e64d5fce7fa8724a6",
               STADE_ENV: "596b0b6b42f3a17cea7f9ac713b34fb2e4fdcbce"}

_loaded: dict[str, types.ModuleType] = {}


def unavailable(env: str) -> str | None:
    """Why the release ``env`` names cannot be used (None when it can)."""
    root = os.environ.get(env)
    if not root:
        return f"${env} is not set (the path of a local clone; see docs/parity.md)"
    missing = [f for f in FILES[env] if not (Path(root) / f).is_file()]
    if missing:
        return f"${env}={root} lacks {', '.join(missing)}"
    return None


def commit(env: str) -> str | None:
    """The clone's HEAD commit, or None when it is not a git work tree."""
    try:
        out = subprocess.run(["git", "-C", os.environ[env], "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def load(env: str) -> types.ModuleType:
    """The release's ``lib.prune`` module, imported from the clone (once per process)."""
    if env in _loaded:
        return _loaded[env]
    reason = unavailable(env)
    if reason:
        raise RuntimeError(reason)
    saved = {k: v for k, v in sys.modules.items() if k == "lib" or k.startswith("lib.")}
    for key in saved:
        del sys.modules[key]
    stub = types.ModuleType("lib.data")
    stub.get_loaders = _no_loader
    sys.modules["lib.data"] = stub
    sys.path.insert(0, os.environ[env])
    try:
        module = importlib.import_module("lib.prune")
    finally:
        sys.path.remove(os.environ[env])
        for key in [k for k in sys.modules if k == "lib" or k.startswith("lib.")]:
            del sys.modules[key]
        sys.modules.update(saved)
    _loaded[env] = module
    return module


def _no_loader(*args, **kwargs):
    raise RuntimeError("the release's calibration loader is replaced by feeding(): call it inside")


@contextlib.contextmanager
def feeding(module: types.ModuleType, windows: torch.Tensor):
    """Run the release on ``windows`` (LongTensor [n, seqlen]) instead of its C4 draw, on a
    CPU: its ``.cuda()`` and ``torch.cuda.synchronize()`` calls become no-ops."""
    loader = [(w.unsqueeze(0), None) for w in windows]
    before = module.get_loaders, torch.Tensor.cuda, torch.cuda.synchronize
    module.get_loaders = lambda *a, **k: (loader, None)
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.cuda.synchronize = lambda *a, **k: None
    try:
        yield
    finally:
        module.get_loaders, torch.Tensor.cuda, torch.cuda.synchronize = before


@contextlib.contextmanager
def position_embeddings(model: torch.nn.Module):
    """Give each decoder block the rotary embeddings when a caller passes none.

    locuslab/wanda calls blocks with ``attention_mask`` and ``position_ids`` only, as
    transformers < 4.45 allowed; transformers 5 blocks need ``position_embeddings``, which
    are what the model itself would pass (``rotary_emb`` of the positions)."""
    rotary = model.model.rotary_emb

    def hook(module, args, kwargs):
        if kwargs.get("position_embeddings") is None:
            hidden = args[0] if args else kwargs["hidden_states"]
            kwargs["position_embeddings"] = rotary(hidden, kwargs["position_ids"])
        return args, kwargs

    handles = [block.register_forward_pre_hook(hook, with_kwargs=True) for block in model.model.layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
