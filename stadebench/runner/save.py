"""Save a pruned model as a plain Hugging Face folder that ``transformers`` loads as it is.

The folder holds safetensors weights (dense, with exact zeros: no sparse checkpoint
format is maintained any more), the tokenizer, a config whose ``*_bias`` flags make the
biases a bias correction added load back, ``sparsity.json`` (the pattern and the zeros
of every prunable layer, counted from the saved weights) and a model card
(``README.md``). Layout and fields: docs/saving.md.

The folder is written beside its destination under a hidden temporary name and renamed
into place when complete, so a killed save never leaves a half-written folder there.
"""

from __future__ import annotations

import contextlib
import copy
import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..base import NM_RE, Score
from ..core.models import Conv1D, enable_bias_flags, find_blocks, iter_layers, weight_of
from ..errors import ConfigError, StadebenchError
from ..util import canonical_json, digest, fsync_dir
from ..version import __version__

SCHEMA = 1
"""Version of the ``sparsity.json`` layout."""
SPARSITY_FILE = "sparsity.json"
CARD_FILE = "README.md"
_NAME_LIMIT = 200  # a folder name stays well under the 255 bytes filesystems allow


@dataclass
class ModelCard:
    """What the model card (README.md) and ``sparsity.json`` say about a pruned model."""

    base_model: str
    """The model that was pruned: Hub id, local path or asset name."""
    metric: str
    """Pruning metric name."""
    pattern: str
    """Sparsity pattern spec, e.g. ``unstructured`` or ``2:4``."""
    sparsity: float
    """Target sparsity."""
    actual_sparsity: float
    """Realised sparsity over the pruned layers."""
    metric_options: dict[str, Any] = field(default_factory=dict)
    """Metric options, defaults included."""
    allocation: str = "uniform"
    """Allocator that shared the target among layers."""
    allocation_options: dict[str, Any] = field(default_factory=dict)
    """The allocator's options."""
    calibration: dict[str, Any] | None = None
    """Calibration protocol (dataset, n, seqlen, seed, sequential); None for a data-free metric."""
    scores: list[Any] = field(default_factory=list)
    """Scores measured on the pruned model: ``(task, name, value, stderr)`` tuples or ``Score``s."""
    layers: list[dict[str, Any]] = field(default_factory=list)
    """Per layer ``{name, allocated, sparsity}`` (allocated None: left dense); empty: from the weights."""
    cell_key: str | None = None
    """The cell's prune key (``PlannedCell.prune_key``: model, pruning and calibration, no
    evaluation), when it came from a suite or ``stadebench prune``."""


@dataclass(frozen=True)
class SavedModel:
    """Where a pruned model was saved, and what identifies its content."""

    path: Path
    """The folder."""
    weights_sha256: str
    """sha256 over the files that determine the model (``weights_sha256``): not the card."""
    warnings: tuple[str, ...] = ()
    """What will not survive a reload with plain transformers (e.g. biases a family cannot load)."""


def card_from_report(report: Any, base_model: str, *, calibration: dict[str, Any] | None = None,
                     scores: list[Any] = (), allocation: str = "uniform",
                     allocation_options: dict[str, Any] | None = None,
                     allocated: dict[str, float | None] | None = None, cell_key: str | None = None) -> ModelCard:
    """A ``ModelCard`` from a ``PruneReport``; ``calibration`` (dataset, seed, …) is completed with the
    report's n, seqlen and sequential, and dropped for a data-free metric (no windows). Each layer's
    allocated sparsity is ``allocated[name]``, else the report's (None: left dense)."""
    calib = None
    if calibration is not None and report.n:
        calib = {**calibration, "n": report.n, "seqlen": report.seqlen, "sequential": report.sequential}
    given = allocated or {}

    def share(layer):
        return given[layer.name] if layer.name in given else getattr(layer, "allocated", report.target_sparsity)

    layers = [{"name": l.name, "allocated": share(l), "sparsity": l.sparsity} for l in report.layers]
    return ModelCard(base_model=base_model, metric=report.metric, pattern=report.pattern,
                     sparsity=report.target_sparsity, actual_sparsity=report.sparsity,
                     metric_options=dict(report.metric_options), allocation=allocation,
                     allocation_options=dict(allocation_options or {}), calibration=calib, scores=list(scores),
                     layers=layers, cell_key=cell_key)


# --- the output folder --------------------------------------------------------------


def check_out_dir(path: str | os.PathLike, force: bool = False, option: str = "--out",
                  keep: Sequence[tuple[str, str | os.PathLike]] = ()) -> Path:
    """The output folder, absolute, once it is known that a save there can succeed and
    destroys nothing it was not asked to replace; call it before pruning.

    Raises ConfigError when ``path`` is a link, a file, lies under a file, is or holds one
    of ``keep`` (``(what, path)`` pairs, e.g. ``("the model being pruned", …)``), is a
    non-empty folder without ``force``, is a non-empty folder stadebench did not save
    (``force`` replaces only those: ``is_saved_folder``), or cannot be written in;
    ``option`` is what the message tells the user to change (``--out``, or a suite's ``save:``)."""
    target = Path(path).expanduser().absolute()
    if target.is_symlink():
        raise ConfigError(f"output folder {target} is a link (to {os.readlink(target)}); a save would replace "
                          f"the link, not what it points to: give the real folder path for {option}")
    if target.is_file() or (target.exists() and not target.is_dir()):
        raise ConfigError(f"output folder {target} is a file; choose a folder path for {option}")
    real = Path(os.path.realpath(target))
    for what, other in keep:
        other_real = Path(os.path.realpath(Path(other).expanduser().absolute()))
        if real == other_real or real in other_real.parents:
            relation = "is" if real == other_real else "holds"
            raise ConfigError(f"output folder {target} {relation} {what} ({other}); a save there would replace it: "
                              f"choose another {option}")
    if target.is_dir() and any(target.iterdir()):
        saved = is_saved_folder(target)
        if not force:
            raise ConfigError(f"output folder {target} exists and is not empty; pass --force to replace it, "
                              f"or choose another {option}" if saved else
                              f"output folder {target} exists and is not empty; pass --force to replace a model "
                              f"stadebench saved, but this is not one (no {SPARSITY_FILE} and {CARD_FILE} of its "
                              f"own): choose another {option}")
        if not saved:
            raise ConfigError(f"output folder {target} is not a model stadebench saved (no {SPARSITY_FILE} and "
                              f"{CARD_FILE} of its own), and --force replaces only those; empty or remove it "
                              f"yourself, or choose another {option}")
    # The save writes beside the target and renames: what must be writable is its parent.
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"output folder {target} cannot be made: {parent} is a file; choose another {option}")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".stadebench-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"output folder {target} cannot be written: no write access to {parent} "
                          f"({exc.strerror or exc}); choose another {option}") from None
    return target


def is_saved_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a model folder stadebench saved: its marker files, a
    ``sparsity.json`` of ours and a model card, are in it (not in a link)."""
    folder = Path(folder)
    sparsity, card = folder / SPARSITY_FILE, folder / CARD_FILE
    try:
        if sparsity.is_symlink() or card.is_symlink() or not card.is_file():
            return False
        doc = json.loads(sparsity.read_text(encoding="utf-8"))
        return (isinstance(doc, dict) and doc.get("schema") == SCHEMA and doc.get("format") == "dense"
                and isinstance(doc.get("layers"), list) and "stadebench" in card.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def folder_name(model: str, metric_label: str, pattern: str, sparsity: float, allocation: str | None = "uniform",
                cell_key: str | None = None) -> str:
    """A readable, filesystem-safe folder name for a pruned cell, e.g.
    ``smollm2-135m--wanda--2-4--0.5--owl--1a2b3c4d``: the allocation is left out when
    uniform; the last 8 hex digits of ``cell_key`` keep names of different cells apart."""
    base = re.split(r"[/\\]", str(model).rstrip("/\\"))[-1]
    base = re.sub(r"\.gguf$", "", base, flags=re.I)
    parts = [base, metric_label, pattern, f"{float(sparsity):g}"]
    if allocation and allocation != "uniform":
        parts.append(allocation)
    parts = [_safe(p) for p in parts]
    tail = ""
    if cell_key:
        hexpart = re.fullmatch(r"(?:[A-Za-z0-9_]+:)?([0-9a-fA-F]{8,})", cell_key)
        tail = "--" + (hexpart[1][-8:].lower() if hexpart else digest(cell_key, length=8))
    return "--".join(parts)[: _NAME_LIMIT - len(tail)].rstrip("-.") + tail


def _safe(part: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", part.lower()).strip("-.") or "x"


# --- saving -------------------------------------------------------------------------


def save_pruned(model: nn.Module, tokenizer: Any, folder: str | os.PathLike, card: ModelCard,
                force: bool = False, option: str = "--out") -> SavedModel:
    """Save ``model`` (and ``tokenizer``, unless None) to ``folder`` so that
    ``AutoModelForCausalLM.from_pretrained(folder)`` gives the same logits, with
    ``sparsity.json`` and a model card; returns the folder and its ``weights_sha256``.

    ``force`` replaces an existing folder stadebench saved, once the new one is complete
    (``option`` names, in a refusal, what sets the folder). The in-memory
    model is unchanged, except that the config's ``*_bias`` flags are turned on when a
    bias the pruning added would otherwise not load.
    """
    target = check_out_dir(folder, force, option)
    target.parent.mkdir(parents=True, exist_ok=True)
    state_dict, warnings = _reloadable_state(model)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()  # not mkdtemp: its 0700 mode would stay on the renamed folder
    try:
        with _no_bars():  # a suite's log shows one line per cell, not a bar per file written
            model.save_pretrained(tmp, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _write_sparsity(tmp, model, card)
        sha = weights_sha256(tmp)
        (tmp / CARD_FILE).write_text(card_text(card, sha, warnings), encoding="utf-8")
        _install(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return SavedModel(target, sha, tuple(warnings))


def _install(tmp: Path, target: Path) -> None:
    """Rename the complete ``tmp`` folder to ``target``; an old ``target`` is removed only
    after, with any old one a killed save left beside it."""
    old = None
    if target.exists() or target.is_symlink():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    fsync_dir(target.parent)
    for stale in target.parent.glob(f".{glob.escape(target.name)}.old-*"):
        if re.fullmatch(r"[0-9a-f]{8}", stale.name.rpartition(".old-")[2]):
            _remove(stale)


def _remove(path: Path) -> None:
    """Remove a file, link or folder tree (a link is removed, never followed)."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _reloadable_state(model: nn.Module) -> tuple[dict[str, torch.Tensor] | None, list[str]]:
    """The state dict to save (None: the model's own) and what will not reload.

    The model's class is built from its config on the meta device to see which biases a
    reload expects: a layer that has a bias the config does not declare would lose it
    (its flag is turned on when there is one), and a layer the config gives a bias that
    the model lacks (STADE-W corrects only some layers) gets a zero one in the file, so
    that nothing is left to random initialisation.
    """
    have = {f"{prefix}.{i}.{short}.bias": layer for i, short, layer, prefix in _layers(model)}
    have_bias = {k for k, layer in have.items() if getattr(layer, "bias", None) is not None}
    expected = _expected_biases(model, set(have))
    if expected is None:
        return None, ["could not build the model's class from its config to check which biases reload"]
    if have_bias - expected and enable_bias_flags(model):
        expected = _expected_biases(model, set(have)) or set()
    lost = sorted(have_bias - expected)
    warnings = [f"{len(lost)} layers have biases that {type(model).__name__}'s config cannot declare, so plain "
                f"transformers will not load them (e.g. {lost[0]})"] if lost else []
    missing = expected - have_bias
    if not missing:
        return None, warnings
    state = model.state_dict()
    for key in missing:
        w = weight_of(have[key])
        state[key] = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    return state, warnings


def _expected_biases(model: nn.Module, candidates: set[str]) -> set[str] | None:
    """Which of ``candidates`` (bias keys of prunable layers) a model built from the config has."""
    try:
        with torch.device("meta"), _quiet():
            skeleton = type(model)(copy.deepcopy(model.config))  # building may write to its config
    except Exception:  # custom code that cannot be built on meta: the check is skipped, not the save
        return None
    return {k for k in skeleton.state_dict() if k in candidates}


@contextlib.contextmanager
def _quiet():
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


@contextlib.contextmanager
def _no_bars():
    from transformers.utils import logging

    shown = logging.is_progress_bar_enabled()
    if shown:
        logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            logging.enable_progress_bar()


def _layers(model: nn.Module):
    prefix, _ = find_blocks(model)
    for i, short, layer in iter_layers(model):
        yield i, short, layer, prefix


def _tensor_files(folder: Path) -> dict[str, Path]:
    """Saved tensor name -> safetensors file holding it."""
    from safetensors import safe_open

    where = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            where.update(dict.fromkeys(f.keys(), path))
    return where


def _find_key(where: dict[str, Path], name: str, block: int, short: str) -> str:
    key = f"{name}.weight"
    if key in where:
        return key
    # transformers may save some families under their original checkpoint names
    ends = [k for k in where if k.endswith(f".{block}.{short}.weight")]
    if len(ends) == 1:
        return ends[0]
    raise StadebenchError(f"cannot find the weight of layer {name} in the saved files ({len(ends)} candidates)")


def _read(where: dict[str, Path], key: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(where[key], framework="pt") as f:
        return f.get_tensor(key)


def _write_sparsity(folder: Path, model: nn.Module, card: ModelCard) -> None:
    where = _tensor_files(folder)
    allocated = {l["name"]: l.get("allocated") for l in card.layers}
    layers, zeros_total, total = [], 0, 0
    for i, short, layer, prefix in _layers(model):
        name = f"{prefix}.{i}.{short}"
        key = _find_key(where, name, i, short)
        saved = _read(where, key)
        conv = bool(Conv1D) and isinstance(layer, Conv1D)
        out_in = list(saved.shape[::-1] if conv else saved.shape)
        zeros = int((saved == 0).sum())
        zeros_total, total = zeros_total + zeros, total + saved.numel()
        layers.append({"name": name, "key": key, "shape": out_in, "layout": "in,out" if conv else "out,in",
                       "zeros": zeros, "sparsity": zeros / max(saved.numel(), 1),
                       "allocated": allocated.get(name, card.sparsity if not card.layers else None)})
    doc = {"schema": SCHEMA, "format": "dense", "metric": card.metric, "pattern": card.pattern,
           "target_sparsity": card.sparsity, "zeros": zeros_total, "weights": total,
           "sparsity": zeros_total / max(total, 1), "layers": layers}
    (folder / SPARSITY_FILE).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")


def _hashed_files(folder: Path) -> list[Path]:
    names = {"config.json", SPARSITY_FILE}
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and (p.name in names or p.name.endswith((".safetensors", ".safetensors.index.json"))))


def weights_sha256(folder: str | os.PathLike) -> str:
    """sha256 over what determines the model: ``config.json``, ``sparsity.json`` and the
    safetensors files (and their index), in name order, each as its length-prefixed name,
    its 8-byte length and its bytes. The card and tokenizer are not covered."""
    h = hashlib.sha256()
    for path in _hashed_files(Path(folder)):
        name = path.name.encode()
        h.update(len(name).to_bytes(8, "little") + name + path.stat().st_size.to_bytes(8, "little"))
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


# --- the model card -----------------------------------------------------------------


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else canonical_json(value) if isinstance(value, dict | list) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _fraction(value: Any) -> str:
    return "dense" if value is None else f"{float(value):.4f}"


def _score_tuple(score: Any) -> tuple[str, str, float, float | None]:
    if isinstance(score, Score):
        return score.task, score.name, score.value, score.stderr
    task, name, value, *rest = score
    return task, name, value, rest[0] if rest else None


def card_text(card: ModelCard, sha: str, warnings: list[str] = ()) -> str:
    """The model card: YAML front matter (library, tags, base model), then the pruning
    settings, the scores, every layer's sparsity and how to load it."""
    import yaml

    meta = {"library_name": "transformers", "tags": ["pruned", "stadebench"], "base_model": card.base_model}
    calib = card.calibration
    calib_text = ("none (data-free)" if calib is None else
                  ", ".join(f"{k} {_cell(calib[k])}" for k in ("dataset", "n", "seqlen", "seed", "sequential")
                            if k in calib))
    alloc = card.allocation + (f" {canonical_json(card.allocation_options)}" if card.allocation_options else "")
    rows = [("metric", f"{card.metric} {canonical_json(card.metric_options)}"), ("pattern", card.pattern),
            ("allocation", alloc), ("target sparsity", f"{card.sparsity:g}"),
            ("realised sparsity", f"{card.actual_sparsity:.4f}"), ("calibration", calib_text),
            ("weights sha256", sha), ("cell key", card.cell_key or "-"), ("stadebench", __version__)]
    out = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
           f"# {_cell(card.base_model)}, pruned: {card.metric}, {card.pattern}, {card.sparsity:g}", "",
           "Pruned without retraining by stadebench. The weights are "
           "dense, with the pruned ones exactly zero; `sparsity.json` lists the zeros of every pruned layer.",
           "", "## Pruning", "", "| setting | value |", "|---|---|"]
    out += [f"| {k} | {_cell(v)} |" for k, v in rows]
    out += [""] + [f"> Warning: {_cell(w)}" for w in warnings] + ([""] if warnings else [])
    out += ["## Scores", ""]
    if card.scores:
        out += ["| task | score | value | stderr |", "|---|---|---|---|"]
        for task, name, value, stderr in map(_score_tuple, card.scores):
            err = "-" if stderr is None else f"{stderr:.3g}"
            out.append(f"| {_cell(task)} | {_cell(name)} | {value:.6g} | {err} |")
    else:
        out.append("None measured.")
    out += ["", "## Layers", "", "| layer | allocated | realised |", "|---|---|---|"]
    out += [f"| {_cell(l['name'])} | {_fraction(l.get('allocated'))} | {_fraction(l.get('sparsity'))} |"
            for l in card.layers] or ["| (see sparsity.json) | | |"]
    out += ["", "## Loading", "", "```python", "from transformers import AutoModelForCausalLM", "",
            'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")', "```", "",
            "`stadebench.runner.save.verify(folder)` recounts the zeros against `sparsity.json`.", ""]
    return "\n".join(out)


# --- verifying ----------------------------------------------------------------------


def verify(folder: str | os.PathLike, expected_sha256: str | None = None) -> list[str]:
    """Recount every layer's zeros in the saved weights against ``sparsity.json`` (and,
    for an N:M pattern, check every group); returns the mismatches, empty when all agree.
    ``expected_sha256`` (a leaderboard row's ``saved_sha256``) is compared too when given."""
    folder = Path(folder)
    try:
        doc = json.loads((folder / SPARSITY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return [f"{SPARSITY_FILE}: cannot be read ({exc})"]
    if doc.get("schema") != SCHEMA:
        return [f"{SPARSITY_FILE}: schema {doc.get('schema')!r}, this stadebench reads {SCHEMA}"]
    where = _tensor_files(folder)
    nm = NM_RE.match(str(doc.get("pattern", "")))
    problems, zeros_total = [], 0
    for layer in doc.get("layers", []):
        name, key = layer.get("name"), layer.get("key")
        if key not in where:
            problems.append(f"{name}: tensor {key} is not in the saved weights")
            continue
        saved = _read(where, key)
        w = saved.t() if layer.get("layout") == "in,out" else saved
        if list(w.shape) != layer.get("shape"):
            problems.append(f"{name}: shape {list(w.shape)}, sparsity.json says {layer.get('shape')}")
            continue
        zeros = int((w == 0).sum())
        zeros_total += zeros
        if zeros != layer.get("zeros"):
            problems.append(f"{name}: {zeros} zeros in the weights, sparsity.json says {layer.get('zeros')}")
        if nm and layer.get("allocated") is not None:
            problems += _check_nm(name, w, int(nm[1]), int(nm[2]))
    if not problems and zeros_total != doc.get("zeros"):
        problems.append(f"{zeros_total} zeros in all, sparsity.json says {doc.get('zeros')}")
    if expected_sha256 is not None and (sha := weights_sha256(folder)) != expected_sha256:
        problems.append(f"weights_sha256 is {sha}, expected {expected_sha256}")
    return problems


def _check_nm(name: str, w: torch.Tensor, n: int, m: int) -> list[str]:
    if w.shape[-1] % m:
        return [f"{name}: input width {w.shape[-1]} is not a multiple of {m} ({n}:{m})"]
    short = int(((w.reshape(w.shape[0], -1, m) == 0).sum(-1) < n).sum())
    return [f"{name}: {short} groups of {m} have fewer than {n} zeros"] if short else []


__all__ = ["CARD_FILE", "ModelCard", "SCHEMA", "SPARSITY_FILE", "SavedModel", "card_from_report", "card_text",
           "check_out_dir", "folder_name", "is_saved_folder", "save_pruned", "verify", "weights_sha256"]
