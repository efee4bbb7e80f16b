"""`stadebench diagnose`: STADE's theory of the output error against measurement, on one model.

Builds the suite a file would hold (``dense: false``, the metrics, one pattern and
sparsity, the ``diagnostics`` evaluation) and runs it through ``bench.run.run_suite``, then
prints, per metric, how well the predicted errors rank the measured ones across layers,
how often the predicted winner wins, and where STADE beats Wanda.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..util import cut, first_line
from .common import ExitCode, err, handle_errors, out, quiet_libraries, styled
from .prune import DEFAULT_CALIBRATION, parse_calibration, run_cells

SUITE_NAME = "stadebench-diagnose"


def diagnose(
    model: Annotated[str, typer.Argument(help="Hub id, local folder, GGUF file or asset name.", show_default=False)],
    metrics: Annotated[str, typer.Option(help="Comma-separated metrics to prune with, one cell each.")] =
        "magnitude,wanda,stade,sparsegpt",
    pattern: Annotated[str, typer.Option(help="Sparsity pattern: unstructured, 2:4, ...")] = "unstructured",
    sparsity: Annotated[float | None, typer.Option(help="Target sparsity (default: the pattern's own).")] = None,
    calibration: Annotated[str, typer.Option(help="DATASET[:NxSEQLEN] for pruning and predictions.")] =
        DEFAULT_CALIBRATION,
    heldout: Annotated[str, typer.Option(help="Dataset whose evaluation split gives the held-out windows "
                                              "(default: the calibration dataset's).")] = "",
    windows: Annotated[str, typer.Option(help="Held-out NxSEQLEN.")] = "8x512",
    one_shot: Annotated[bool, typer.Option("--one-shot", help="Calibrate every block on dense inputs.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    leaderboard: Annotated[Path, typer.Option(help="Results folder: the rows go here.")] = Path("leaderboard"),
) -> None:
    """Predicted against measured output error of every pruned layer, for each metric's
    mask and the masks the others would choose (docs/diagnostics.md)."""
    _diagnose(model, metrics, pattern=pattern, sparsity=sparsity, calibration=calibration, heldout=heldout,
              windows=windows, one_shot=one_shot, device=device, leaderboard=leaderboard)


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}"


def _check_loads(spec) -> None:
    """Refuse, naming it, a model whose weight files, config or tokenizer cannot be read or
    that is not a causal language model, before the run makes its leaderboard folder: what
    ``run`` records as each cell's failure, a diagnosis of that model cannot use."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..data.loading import check_files, load_config_and_tokenizer
    from ..errors import ConfigError

    try:
        check_files(spec)
        config, _ = load_config_and_tokenizer(spec)
        with torch.device("meta"):  # the architecture only: no weights are read or allocated
            AutoModelForCausalLM.from_config(config, trust_remote_code=spec.trust_remote_code)
    except ConfigError as exc:
        raise ConfigError(f"model {cut(spec.id)!r}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 -- transformers' errors: OSError, ValueError, KeyError, ...
        why = cut(first_line(str(exc)).rstrip(".") or type(exc).__name__, 300)
        raise ConfigError(f"cannot load model {cut(spec.id)!r}: {why}; give a causal language model: a Hub id, "
                          "a local model folder, a GGUF file or an asset (`stadebench assets list`)") from None


@handle_errors
def _diagnose(model, metrics, *, pattern, sparsity, calibration, heldout, windows, one_shot, device, leaderboard):
    from ..results import store as lb
    from ..suite import validate_suite
    from ..errors import ConfigError

    names = [m.strip() for m in metrics.split(",") if m.strip()]
    n, _, seqlen = windows.partition("x")
    if not (n.isdigit() and seqlen.isdigit()):
        raise ConfigError(f"--windows {windows!r}: expected NxSEQLEN, e.g. 8x512")
    calib = {**parse_calibration(calibration), "sequential": not one_shot}
    dataset = parse_calibration(heldout)["dataset"] if heldout else calib["dataset"]
    entry = {"name": pattern, **({"sparsities": [sparsity]} if sparsity is not None else {})}
    data = {"name": SUITE_NAME, "leaderboard": str(leaderboard), "device": device, "dense": False,
            "models": [model], "metrics": names, "patterns": [entry], "calibration": calib,
            "evaluations": [{"name": "diagnostics", "options": {"dataset": dataset, "seqlen": int(seqlen),
                                                                "max_windows": int(n), "metrics": names}}]}
    with quiet_libraries():
        suite = validate_suite(data, source="stadebench diagnose", default_name=SUITE_NAME)
        _check_loads(suite.models[0])  # before the run: a model that cannot load gets no failed rows
        summary = run_cells(suite, leaderboard)
    rows = [r for r in lb.read(leaderboard, suite=[SUITE_NAME]).to_pylist()
            if r["run_id"] == summary.run_id and r["status"] == "ok" and r["task"] == "diagnostics"]
    by_metric: dict[str, dict[str, float]] = {}
    for r in rows:
        by_metric.setdefault(r["metric"], {})[r["score"]] = r["value"]
    if not by_metric:
        for label, message in summary.failed:
            err.print(styled(("failed:", "red"), f" {label}: {first_line(message)}"))
        raise ConfigError(f"no cell of model {cut(model)!r} was diagnosed (see the failures above, and the rows "
                          f"in {leaderboard})")
    cells = Table("cell (applied mask)", "layers", "ρ(predicted, measured)", "mean relative error",
                  title="pruned cells", title_justify="left")
    for name, values in by_metric.items():
        cells.add_row(name, _num(values.get("layers")), _num(values.get("spearman_applied")),
                      _num(values.get("relative_error_applied")))
    out.print(cells)
    first = next(iter(by_metric.values()))  # candidates are decided on the dense model: alike in every cell
    candidates = Table("candidate mask", "ρ(predicted, measured)", "mean relative error",
                       title="every metric's mask on the dense model's layers", title_justify="left")
    for name in names:
        candidates.add_row(name, _num(first.get(f"spearman_{name}")), _num(first.get(f"relative_error_{name}")))
    out.print(candidates)
    if first.get("winner_agreement") is not None:
        out.print(f"the predicted lowest-error mask is the measured one on {first['winner_agreement']:.0%} of layers")
    if first.get("stade_beats_wanda_high_mean") is not None:
        out.print(f"STADE's mask beats Wanda's on {first['stade_beats_wanda_high_mean']:.0%} of the layers with "
                  f"large |μ|/σ and on {first.get('stade_beats_wanda_low_mean') or 0:.0%} of the rest")
    for label, message in summary.failed:
        err.print(styled(("failed:", "red"), f" {label}: {first_line(message)}"))
    err.print(f"per-layer records: stadebench leaderboard show … --dir {leaderboard}, or the layer_diagnostics "
              f"column of the rows")
    if summary.failed:
        raise typer.Exit(int(ExitCode.CELLS_FAILED))


__all__ = ["SUITE_NAME", "diagnose"]
