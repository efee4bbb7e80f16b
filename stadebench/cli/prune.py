"""`stadebench prune`: prune one model one way and save it, as a one-cell suite.

The command builds the suite a file would hold (``dense: false``, one metric, pattern,
sparsity and allocation, ``save: OUT``) and runs it through ``bench.run.run_suite``, so
the model is loaded, calibrated, pruned, evaluated, recorded and saved exactly as a suite
cell is; only the folder differs: the model goes to ``--out`` itself, not to a subfolder.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import ConfigError
from ..util import first_line
from .common import ExitCode, err, handle_errors, out, progress_enabled, quiet_libraries, styled

DEFAULT_CALIBRATION = "enwiki-2016:16x256"
"""The embedded suite's calibration (suites/smollm2.yaml): offline, no Hub needed."""
PERPLEXITY = {"seqlen": 512, "batch_size": 4, "max_windows": 8}
"""Perplexity options beyond the dataset, as in suites/smollm2.yaml; --eval-option overrides them."""
SUITE_NAME = "stadebench-prune"



def _options(what: str) -> Any:
    return Annotated[list[str] | None, typer.Option(metavar="KEY=VALUE", help=f"{what} option, repeatable; "
                                                                              "the value is read as YAML.")]


def _stage(what: str) -> Any:
    return Annotated[str | None, typer.Option(help=f"{what} (default: none).", show_default=False)]


def parse_options(items: list[str] | None, flag: str) -> dict[str, Any]:
    """``KEY=VALUE`` items as a dict, each value read as YAML (``true``, ``0.5``, ``128``)."""
    from ..suite import parse_value

    options = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"{flag} {item!r}: expected KEY=VALUE, e.g. {flag} bias_correction=false")
        options[key.strip()] = parse_value(value)
    return options


def parse_calibration(text: str) -> dict[str, Any]:
    """``DATASET[:NxSEQLEN]`` as a suite's ``calibration`` (``n`` and ``seqlen`` only when
    given). DATASET is a registered dataset name, or a text file (the ``text`` dataset)."""
    match = re.fullmatch(r"(.+?)(?::(\d+)x(\d+))?", text.strip())
    if not match:
        raise ConfigError(f"--calibration {text!r}: expected DATASET or DATASET:NxSEQLEN, e.g. {DEFAULT_CALIBRATION}")
    name, n, seqlen = match.groups()
    path = Path(name).expanduser()
    dataset: Any = name
    if path.is_file() or "/" in name or os.sep in name:
        dataset = {"name": "text", "options": {"path": str(path.absolute())}}
    calibration: dict[str, Any] = {"dataset": dataset}
    if n is not None:
        calibration.update(n=int(n), seqlen=int(seqlen))
    return calibration


def suite_data(model: str, metric: str, out_dir: Path, *, options: dict[str, Any], pattern: str,
               sparsity: float | None, allocation: str, allocation_options: dict[str, Any], targets: list[str],
               ignore: list[str], calibration: dict[str, Any], evaluation: str, eval_options: dict[str, Any],
               dtype: str, device: str, leaderboard: Path, model_options: dict[str, Any] | None = None,
               stages: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The one-cell suite `stadebench prune` runs, as a suite file would give it.
    ``model_options``: the model entry's other fields (revision, trust_remote_code,
    gguf_file, tokenizer), those left None taking the suite's defaults. ``stages``: the
    metric entry's ``refine`` / ``reconstruct`` entries (``{name, options}``), if any."""
    pattern_entry: dict[str, Any] = {"name": pattern}
    if sparsity is not None:
        pattern_entry["sparsities"] = [sparsity]
    evaluations = []
    if evaluation != "none":
        if evaluation == "perplexity":  # on the calibration dataset's held-out split
            eval_options = {"dataset": calibration["dataset"], **PERPLEXITY, **eval_options}
        evaluations.append({"name": evaluation, "options": eval_options})
    return {"name": SUITE_NAME, "leaderboard": str(leaderboard), "device": device, "dense": False,
            "save": str(out_dir),
            "models": [{"id": model, "dtype": dtype,
                        **{k: v for k, v in (model_options or {}).items() if v is not None}}],
            "metrics": [{"name": metric, "options": options, **{k: [v] for k, v in (stages or {}).items()}}],
            "patterns": [pattern_entry],
            "allocations": [{"name": allocation, "options": allocation_options}], "targets": targets,
            "ignore": ignore, "calibration": calibration, "evaluations": evaluations}


def prune(
    model: Annotated[str, typer.Argument(help="Hub id, local folder, GGUF file or asset name.", show_default=False)],
    metric: Annotated[str, typer.Option("--metric", "-m", help="Pruning metric, e.g. wanda or stade.",
                                        show_default=False)],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder to save the pruned model to (it must not "
                                                             "exist, or be empty, unless --force).",
                                          show_default=False)],
    *,
    option: _options("Metric") = None,
    refine: _stage("Mask refiner after the metric, e.g. dsnot") = None,
    refine_option: _options("Refiner") = None,
    reconstruct: _stage("Weight reconstructor for the final mask, e.g. admm, obs, mean-bias") = None,
    reconstruct_option: _options("Reconstructor") = None,
    pattern: Annotated[str, typer.Option(help="Sparsity pattern: unstructured, 2:4, ...")] = "unstructured",
    sparsity: Annotated[float | None, typer.Option(help="Target sparsity (default: the pattern's own; "
                                                        "0.5 unstructured, N/M for N:M).")] = None,
    calibration: Annotated[str, typer.Option(help="DATASET[:NxSEQLEN]: a dataset name or a text file, "
                                                  "N windows of SEQLEN tokens.")] = DEFAULT_CALIBRATION,
    seed: Annotated[int, typer.Option(help="Seed that picks the calibration windows.")] = 0,
    one_shot: Annotated[bool, typer.Option("--one-shot", help="Calibrate every block on dense inputs "
                                                               "(default: sequential).")] = False,
    allocation: Annotated[str, typer.Option(help="How the sparsity is shared among layers: uniform, owl, "
                                                 "...")] = "uniform",
    allocation_option: _options("Allocator") = None,
    target: Annotated[list[str] | None, typer.Option(metavar="REGEX", help="Prune only the layers this "
                                                                           "finds (repeatable).")] = None,
    ignore: Annotated[list[str] | None, typer.Option(metavar="REGEX", help="Leave these layers dense "
                                                                           "(repeatable).")] = None,
    evaluation: Annotated[str, typer.Option("--eval", help="Evaluator to run on the pruned model (perplexity: "
                                                           "on the calibration dataset's held-out split), or "
                                                           "none.")] = "perplexity",
    eval_option: _options("Evaluator") = None,
    dtype: Annotated[str, typer.Option(help="float32, float16 or bfloat16.")] = "float32",
    revision: Annotated[str | None, typer.Option(help="Branch, tag or commit of a Hub model (default: "
                                                      "main); the row records the commit it resolved to.",
                                                 show_default=False)] = None,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Allow running model code "
                                                                                "from the Hub.")] = False,
    gguf_file: Annotated[str | None, typer.Option(help="GGUF file inside MODEL to load the weights from.",
                                                  show_default=False)] = None,
    tokenizer: Annotated[str | None, typer.Option(help="Tokenizer id or path (default: MODEL's own).",
                                                  show_default=False)] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    leaderboard: Annotated[Path, typer.Option(help="Results folder: the cell's rows go here.")] = Path("leaderboard"),
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty --out folder that stadebench "
                                                        "saved (never a link, the model, or the leaderboard).")
                     ] = False,
) -> None:
    """Prune one model with one metric, pattern and sparsity, evaluate it, and save it as a
    plain Hugging Face folder (--out) that transformers loads with no stadebench installed.
    Metric, stage, allocation and evaluator options are KEY=VALUE, e.g. --option bias_correction=false."""
    stages = {"refine": (refine, refine_option), "reconstruct": (reconstruct, reconstruct_option)}
    _prune(model, metric, out_dir, force, leaderboard, options=option, stages=stages, pattern=pattern,
           sparsity=sparsity,
           calibration=calibration, seed=seed, one_shot=one_shot, allocation=allocation,
           allocation_options=allocation_option, targets=target, ignore=ignore, evaluation=evaluation,
           eval_options=eval_option, dtype=dtype, device=device,
           model_options={"revision": revision, "trust_remote_code": trust_remote_code or None,
                          "gguf_file": gguf_file, "tokenizer": tokenizer})


@handle_errors
def _prune(model: str, metric: str, out_dir: Path, force: bool, leaderboard: Path, *, options, stages, pattern,
           sparsity, calibration, seed, one_shot, allocation, allocation_options, targets, ignore, evaluation,
           eval_options, dtype, device, model_options) -> None:
    from ..runner.save import check_out_dir

    for role, (name, items) in stages.items():
        if items and name is None:
            raise ConfigError(f"--{role}-option needs --{role} NAME, the stage it configures")
    # before anything is loaded: a folder the model cannot go to costs nothing
    calib = {**parse_calibration(calibration), "seed": seed, "sequential": not one_shot}
    target = check_out_dir(out_dir, force, keep=_kept(model, model_options.get("tokenizer"), calib, leaderboard))
    data = suite_data(model, metric, target, options=parse_options(options, "--option"), pattern=pattern,
                      sparsity=sparsity, allocation=allocation,
                      allocation_options=parse_options(allocation_options, "--allocation-option"),
                      targets=targets or [], ignore=ignore or [], calibration=calib, evaluation=evaluation,
                      eval_options=parse_options(eval_options, "--eval-option"), dtype=dtype, device=device,
                      leaderboard=leaderboard, model_options=model_options,
                      stages={role: {"name": name, "options": parse_options(items, f"--{role}-option")}
                              for role, (name, items) in stages.items() if name is not None})
    from ..suite import exact_save, validate_suite

    with quiet_libraries():
        suite = exact_save(validate_suite(data, source="stadebench prune", default_name=SUITE_NAME))
        summary = run_cells(suite, leaderboard)
    if summary.failed:
        for label, message in summary.failed:
            err.print(styled(("failed:", "red"), f" {label}: {first_line(message)}"))
        raise typer.Exit(int(ExitCode.CELLS_FAILED))
    _report(summary, leaderboard)


def _kept(model: str, tokenizer: str | None, calibration: dict[str, Any], leaderboard: Path
          ) -> list[tuple[str, Path]]:
    """What --out must neither be nor hold, even with --force: the leaderboard, and the
    model, tokenizer and calibration text when they are files on this machine."""
    kept = [("the leaderboard folder", leaderboard)]
    dataset = calibration.get("dataset")
    text = dataset.get("options", {}).get("path") if isinstance(dataset, dict) else None
    for what, where in (("the model being pruned", model), ("the tokenizer", tokenizer),
                        ("the calibration text", text)):
        if where and Path(where).expanduser().exists():
            kept.append((what, Path(where).expanduser()))
    return kept


def run_cells(suite, leaderboard: Path):
    from ..runner.run import new_run_id, run_suite
    from .run import interrupted, Reporter

    run_id = new_run_id()
    with Reporter(progress_enabled()) as reporter:
        try:
            # force: the user asked for this model now, even if the leaderboard has its numbers
            return run_suite(suite, force=True, events=reporter, leaderboard_dir=leaderboard, run_id=run_id)
        except KeyboardInterrupt:
            raise interrupted(leaderboard, run_id) from None


def _report(summary, leaderboard: Path) -> None:
    """Where the model went, its hash, its realised sparsity and the scores of this run."""
    from ..results import store as lb

    if not summary.saved:
        raise ConfigError(f"nothing was pruned or saved (see {leaderboard})")
    saved = summary.saved[0]
    out.print(f"saved: {saved.path}")
    out.print(f"weights sha256: {saved.sha256}")
    if saved.actual_sparsity is not None:
        out.print(f"realised sparsity: {saved.actual_sparsity:.4f}")
    rows = [r for r in lb.read(leaderboard, suite=[SUITE_NAME]).to_pylist()
            if r["run_id"] == summary.run_id and r["status"] == "ok"]
    for r in rows:
        err_text = "" if r["stderr"] is None else f" ± {r['stderr']:.3g}"
        out.print(f"{r['task']} {r['score']}: {r['value']:.6g}{err_text}")
    if rows:
        err.print(f"results in {leaderboard}")


__all__ = ["DEFAULT_CALIBRATION", "PERPLEXITY", "SUITE_NAME", "parse_calibration", "parse_options", "prune",
           "run_cells", "suite_data"]
