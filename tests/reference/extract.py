"""The released reference implementations, loaded at test time from local clones.

Nothing of theirs is vendored: each clone's ``lib`` package is imported from the folder an
environment variable names, under its own name in ``sys.modules`` only while it loads
(every release calls its package ``lib``), with their calibration loader (``lib.data``,
which downloads C4) replaced by a stub that hands over stadebench's windows.

- ``STADEBENCH_REFERENCE_WANDA``: a clone of locuslab/wanda (``prune_wanda``,
  ``prune_magnitude``, ``prune_sparsegpt`` in ``lib/prune.py``).
- ``STADEBENCH_REFERENCE_STADE``: a clone of Coello-dev/STADE (``prune_process`` in
  ``lib/prune.py``, one pruner class per method in ``lib/prune_zoo/``).
- ``STADEBENCH_REFERENCE_GBLM``: a clone of VILA-Lab/GBLM-Pruner (``prune_gblm``,
  ``prune_gradient`` in ``lib/prune.py``; the ``gradient_computation`` class of the script
  ``gradient_computation.py``).
- ``STADEBENCH_REFERENCE_PRUNER_ZERO``: a clone of pprp/Pruner-Zero (``prune_pruner_zero``
  in ``lib/prune.py``, ``GPTree`` in ``lib/gptree.py``, ``GradientComputation`` in
  ``lib/gradient_computation.py``).
- ``STADEBENCH_REFERENCE_DSNOT``: a clone of zyxxmu/DSnoT (``prune_DSnoT`` in
  ``lib/prune.py``, ``WrappedGPT`` in ``lib/layerwrapper.py``).

Where a release imports a name this environment no longer has (``transformers.AdamW``,
gone in transformers 5, which GBLM-Pruner imports and never calls in the code the tests
run) or a module its clone lacks (Pruner-Zero's ``lib/prune.py`` imports ``lib.ablate``,
which it does not ship), a placeholder stands in while it loads; calling one is an error.
"""

from __future__ import annotations

import ast
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
GBLM_ENV = "STADEBENCH_REFERENCE_GBLM"
PRUNER_ZERO_ENV = "STADEBENCH_REFERENCE_PRUNER_ZERO"
DSNOT_ENV = "STADEBENCH_REFERENCE_DSNOT"
#: The files each release must have; the tests skip when one is missing.
FILES = {
    WANDA_ENV: ("lib/prune.py", "lib/sparsegpt.py", "lib/layerwrapper.py", "lib/ablate.py"),
    STADE_ENV: ("lib/prune.py", "lib/utils.py", "lib/prune_zoo/basepruner.py", "lib/prune_zoo/stade.py",
                "lib/prune_zoo/wanda.py", "lib/prune_zoo/sparsegpt.py", "lib/prune_zoo/magnitudepruner.py"),
    GBLM_ENV: ("gradient_computation.py", "lib/prune.py", "lib/layerwrapper.py", "lib/sparsegpt.py"),
    PRUNER_ZERO_ENV: ("lib/prune.py", "lib/gptree.py", "lib/gradient_computation.py", "lib/layerwrapper.py",
                      "lib/sparsegpt.py"),
    DSNOT_ENV: ("lib/prune.py", "lib/layerwrapper.py", "lib/sparsegpt.py", "lib/save_results.py"),
}
#: The commits the parity figures in docs/parity.md were measured at.
MEASURED_AT = {WANDA_ENV: "8e8fc87b4a2f9955baa7e76e64d5fce7fa8724a6",
               STADE_ENV: "596b0b6b42f3a17cea7f9ac713b34fb2e4fdcbce",
               GBLM_ENV: "9e8aea22e37c15f083f4a85fb7498b1aed75f30e",
               PRUNER_ZERO_ENV: "db70134ed7d4c521a57060fd698f353d04268429",
               DSNOT_ENV: "4c029dfa66cae3dba7f4a77c78a524e272fc638c"}
#: Modules a release imports that its clone lacks: ``{env: {module: names}}``, placeholders.
MISSING_MODULES = {PRUNER_ZERO_ENV: {"lib.ablate": ("AblateGPT",)}}
#: Names a release imports from an installed package that this environment lacks.
MISSING_NAMES = {"transformers": ("AdamW",)}

_loaded: dict[tuple[str, str], types.ModuleType] = {}


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


def load(env: str, name: str = "prune") -> types.ModuleType:
    """The release's ``lib.<name>`` module, imported from the clone (once per process)."""
    if (env, name) in _loaded:
        return _loaded[env, name]
    reason = unavailable(env)
    if reason:
        raise RuntimeError(reason)
    saved = {k: v for k, v in sys.modules.items() if k == "lib" or k.startswith("lib.")}
    for key in saved:
        del sys.modules[key]
    stub = types.ModuleType("lib.data")
    stub.get_loaders = _no_loader
    sys.modules["lib.data"] = stub
    for module_name, names in MISSING_MODULES.get(env, {}).items():
        sys.modules[module_name] = _placeholders(types.ModuleType(module_name), names)
    sys.path.insert(0, os.environ[env])
    try:
        with _missing_names():
            module = importlib.import_module(f"lib.{name}")
    finally:
        sys.path.remove(os.environ[env])
        for key in [k for k in sys.modules if k == "lib" or k.startswith("lib.")]:
            del sys.modules[key]
        sys.modules.update(saved)
    _loaded[env, name] = module
    return module


def _no_loader(*args, **kwargs):
    raise RuntimeError("the release's calibration loader is replaced by feeding(): call it inside")


def _placeholder(name: str):
    def missing(*args, **kwargs):
        raise RuntimeError(f"{name} is a placeholder for a name this environment lacks: the release called it")
    missing.__name__ = name
    return missing


def _placeholders(module: types.ModuleType, names) -> types.ModuleType:
    for name in names:
        setattr(module, name, _placeholder(f"{module.__name__}.{name}"))
    return module


@contextlib.contextmanager
def _missing_names():
    """Placeholders for the ``MISSING_NAMES`` an installed package lacks, while a release loads."""
    added = []
    for package, names in MISSING_NAMES.items():
        module = importlib.import_module(package)
        for name in names:
            try:
                getattr(module, name)
            except (AttributeError, ImportError):
                setattr(module, name, _placeholder(f"{package}.{name}"))
                added.append((module, name))
    try:
        yield
    finally:
        for module, name in added:
            delattr(module, name)


#: Where each release computes its gradient statistics: (script, class).
GRADIENT_SCRIPTS = {GBLM_ENV: ("gradient_computation.py", "gradient_computation"),
                    PRUNER_ZERO_ENV: ("lib/gradient_computation.py", "GradientComputation")}


def gradient_computation(env: str) -> type:
    """The release's gradient-statistics class (GBLM-Pruner's ``gradient_computation``,
    Pruner-Zero's copy of it, ``GradientComputation``), from its script.

    The scripts print package versions and import names transformers 5 lacks when they
    are imported, so only the class and the ``find_layers`` it calls are taken from the
    script's syntax tree and executed, with ``torch``, ``nn`` and a silent ``tqdm``: its
    own code, as written."""
    script, cls = GRADIENT_SCRIPTS[env]
    if (env, script) in _loaded:
        return getattr(_loaded[env, script], cls)
    reason = unavailable(env)
    if reason:
        raise RuntimeError(reason)
    path = Path(os.environ[env]) / script
    tree = ast.parse(path.read_text(), str(path))
    wanted = {"find_layers", cls}
    body = [node for node in tree.body if isinstance(node, ast.FunctionDef | ast.ClassDef) and node.name in wanted]
    if {node.name for node in body} != wanted:
        raise RuntimeError(f"{path} lacks {', '.join(sorted(wanted - {node.name for node in body}))}")
    module = types.ModuleType(f"released_{cls}")
    module.__file__ = str(path)
    module.__dict__.update(torch=torch, nn=torch.nn, tqdm=lambda iterable, *a, **k: iterable)
    exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), module.__dict__)  # noqa: S102
    _loaded[env, script] = module
    return getattr(module, cls)


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
def no_breakpoints():
    """A release's ``breakpoint()`` (Pruner-Zero's ``GPTree.compute_tree`` calls it when an
    operator raises) raises instead of waiting for a debugger."""
    def hook(*args, **kwargs):
        raise RuntimeError("the release called breakpoint()")

    before, sys.breakpointhook = sys.breakpointhook, hook
    try:
        yield
    finally:
        sys.breakpointhook = before


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
