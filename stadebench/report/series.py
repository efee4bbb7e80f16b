"""What the figures plot, as plain data: one spec per figure, embedded in the page as JSON
and drawn by ``figures``. Built from the leaderboard's pivot (its row labels and cells)
and the rows behind each cell (sparsity, pattern, allocation, cell key)."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import PurePath
from typing import TYPE_CHECKING, Any

from ..results import store as lb

if TYPE_CHECKING:
    from ..results.grid import Grid

__all__ = ["APPLIED", "DIAGNOSTICS", "NO_STAGE", "diagnostic_specs", "finite", "is_diagnostics", "is_points",
           "log_scale", "match_cells", "short_model", "slug", "split_column", "stage_specs", "sweep_specs",
           "unique_slugs"]

DIAGNOSTICS = "diagnostics"
APPLIED = "applied"
_COLUMN = re.compile(r"(?P<family>.+) (?P<sparsity>\d+(?:\.\d*)?(?:e[-+]?\d+)?)(?: \[[^\]]*\])?")
_NM = re.compile(r"\d+:\d+(\W.*)?")
_ALLOCATION = re.compile(r" · \S+?(?:\([^)]*\))?(?= |$)")


def finite(value: Any) -> float | None:
    """``value`` as a float, or None when it is missing, NaN or infinite (JSON holds neither)."""
    if value is None or isinstance(value, bool):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def split_column(name: str) -> tuple[str, float | None]:
    """A pivot column name, 'pattern(options) sparsity [plugin version]', as (pattern text, sparsity)."""
    m = _COLUMN.fullmatch(name)
    if not m:
        return name, None
    try:
        return m["family"], float(m["sparsity"])
    except ValueError:
        return name, None


def is_points(family: str) -> bool:
    """N:M patterns have one sparsity each: drawn as markers, not joined by a line."""
    return bool(_NM.fullmatch(family))


def short_model(model: str | None) -> str:
    """A model id for a title: a local path by its last part."""
    text = str(model)
    return PurePath(text).name if "/" in text and PurePath(text).is_absolute() else text


def slug(*parts: str | None) -> str:
    """A file-name stem from labels: a local model path by its last part, ASCII letters, digits, '.', '-'."""
    words = []
    for part in parts:
        if part is None:
            continue
        if "/" in part and PurePath(part).is_absolute():
            part = PurePath(part).name
        words.append(re.sub(r"[^A-Za-z0-9.]+", "-", part).strip("-.") or "x")
    return "_".join(words)[:120]


def match_cells(grid: Grid, rows: list[dict]) -> dict[tuple[int, str], dict]:
    """The row behind each cell of ``grid`` (a ``pivot`` of ``rows``), by (row index, column).

    The pivot gives labels and values but not the cell keys, so a cell is matched to the
    row with its model, metric, value, pattern and sparsity (values are copied unchanged
    from the same table, so equality is exact); a cell key in the cell, if the pivot gives
    one, wins.
    """
    by_key = {r["cell_key"]: r for r in rows}
    pool: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        pool[(r["model"], r["metric"], r["value"])].append(r)
    used: set[int] = set()
    found = {}
    for i, prow in enumerate(grid.rows):
        for column, cell in prow.values.items():
            if cell.cell_key in by_key:
                found[(i, column)] = by_key[cell.cell_key]
                continue
            family, sparsity = split_column(column)
            for r in pool.get((prow.model, prow.metric, cell.value), ()):
                if id(r) in used or not family.startswith(r["pattern"] or "-"):
                    continue
                if sparsity is not None and f"{r['sparsity'] or 0.0:g}" != f"{sparsity:g}":
                    continue
                used.add(id(r))
                found[(i, column)] = r
                break
    return found


def is_diagnostics(rows: list[dict]) -> bool:
    return bool(rows) and all(r["evaluator"] == DIAGNOSTICS for r in rows)


def log_scale(score: str, values: list[float]) -> bool:
    """Perplexities grow by orders of magnitude with sparsity: they are read on a log axis
    (unless they stay within a factor of 3, where a log axis would show no tick labels)."""
    return ("ppl" in score or "perplexity" in score) and bool(values) and min(values) > 0 \
        and max(values) / min(values) >= 3


def _sweep_lines(grid: Grid, matched: dict[tuple[int, str], dict], model: str | None) -> dict[tuple, dict]:
    """The lines of one model's figure, by (row label, pattern text): each with its points
    ``(sparsity, value, stderr, cell key)`` in column order (sorted later)."""
    lines: dict[tuple, dict] = {}
    for i, prow in enumerate(grid.rows):
        if prow.model != model:
            continue
        for column, cell in grid.cells(prow):
            y = finite(cell and cell.value)
            if y is None:
                continue
            family, parsed = split_column(column)
            r = matched.get((i, column))
            x = finite(r["sparsity"]) if r else parsed
            if x is None:
                continue
            line = lines.setdefault((prow.label, family), {
                "label": prow.label, "metric": prow.metric, "colour_key": _ALLOCATION.sub("", prow.label),
                "family": family, "style": "points" if is_points(family) else "line",
                "allocation": r["allocation"] if r else None, "points": []})
            line["points"].append((x, y, finite(cell.stderr), r["cell_key"] if r else None))
    return lines


def _dense_lines(grid: Grid, dense_rows: list[dict], model: str | None) -> dict[float, str | None]:
    """The distinct finite dense values of one model's rows, each with the cell key of a dense row of that value."""
    dense: dict[float, str | None] = {}
    for prow in grid.rows:
        if prow.model == model and finite(prow.dense) is not None:
            key = next((r["cell_key"] for r in dense_rows if r["model"] == model and r["value"] == prow.dense), None)
            dense.setdefault(prow.dense, key)
    return dense


def sweep_specs(grid: Grid, matched: dict[tuple[int, str], dict], rows: list[dict]) -> list[dict]:
    """One spec per model: the score against sparsity, a line per (pivot row, pattern) and the dense value.

    ``grid`` is a ``pivot`` of one task and score, ``matched`` its ``match_cells`` and
    ``rows`` the current ok rows of that task and score.
    """
    task, score = grid.task, grid.score
    dense_rows = [r for r in rows if r["metric"] == "dense"]
    specs = []
    for model in grid.models():
        lines = _sweep_lines(grid, matched, model)
        if not lines:
            continue
        dense = _dense_lines(grid, dense_rows, model)
        families = {line["family"] for line in lines.values()}
        out = []
        for line in lines.values():
            points = sorted(line.pop("points"), key=lambda p: p[0])
            line["x"], line["y"], line["stderr"], line["cell_keys"] = (list(v) for v in zip(*points))
            line["legend"] = line["label"] if len(families) == 1 else f"{line['label']} · {line['family']}"
            out.append(line)
        values = [y for line in out for y in line["y"]] + list(dense)
        specs.append({
            "slug": slug(model, task, score), "kind": "sweep", "model": model, "task": task, "score": score,
            "higher_is_better": grid.higher_is_better, "log_y": log_scale(score, values),
            "title": f"{short_model(model)} · {task} · {score}", "lines": out,
            "dense": [{"value": v, "cell_key": k} for v, k in dense.items()]})
    return specs


NO_STAGE = "none"
_BAR, _GAP = 0.1, 0.35  # a bar's width and the space between two metrics' groups, in x units


def _stage_bars(grid: Grid, matched: dict[tuple[int, str], dict], model: str | None) -> dict[str, list[dict]]:
    """One model's bars by pivot column (pattern and sparsity): a bar per pivot row, with its
    metric, refiner and reconstructor as its label names them (``_split_stages``)."""
    columns: dict[str, list[dict]] = {}
    for i, prow in enumerate(grid.rows):
        if prow.model != model:
            continue
        for column, cell in grid.cells(prow):
            y, r = finite(cell and cell.value), matched.get((i, column))
            if y is None or r is None:
                continue
            metric, refine, reconstruct = _split_stages(prow.label, r)
            columns.setdefault(column, []).append({
                "metric": metric, "refine": refine, "reconstruct": reconstruct, "label": prow.label, "y": y,
                "stderr": finite(cell.stderr), "cell_key": r["cell_key"]})
    return columns


def _split_stages(label: str, row: dict) -> tuple[str, str, str]:
    """A pivot row's label as (metric part, refiner, reconstructor): the stages as labels name
    them (``grid.stage_labels``, NO_STAGE for a stage the row did not run), and the label
    without them, which keeps the metric's options, the allocation and the varied knobs:
    ``stade (bias_correction=false) seed=1`` for ``stade (bias_correction=false) → dsnot
    (skip_layer=no_skip) → admm seed=1``. The bars of one group differ only in their stages."""
    from ..results.grid import stage_labels

    stages = stage_labels(row)
    for stage in stages:
        if stage is not None:
            label = label.replace(f" → {stage}", "", 1)
    refine, reconstruct = (NO_STAGE if stage is None else stage for stage in stages)
    return label, refine, reconstruct


def _first_none(values) -> list[str]:
    values = list(dict.fromkeys(values))
    return [NO_STAGE] * (NO_STAGE in values) + [v for v in values if v != NO_STAGE]


def stage_specs(grid: Grid, matched: dict[tuple[int, str], dict], rows: list[dict]) -> list[dict]:
    """One spec per model whose cells ran a refiner or a reconstructor: a panel per pattern
    and sparsity, in it a group of bars per metric, a bar per refine × reconstruct, and the
    dense value. Bar positions are in the spec, so the drawing is checked against them.
    ``grid``, ``matched`` and ``rows`` as for ``sweep_specs``."""
    if not any(r.get("refine") or r.get("reconstruct") for r in rows if r["metric"] != "dense"):
        return []
    specs = []
    for model in grid.models():
        columns = _stage_bars(grid, matched, model)
        bars = [b for column in columns.values() for b in column]
        if not bars:
            continue
        metrics = list(dict.fromkeys(b["metric"] for b in bars))
        refiners, reconstructors = _first_none(b["refine"] for b in bars), _first_none(b["reconstruct"] for b in bars)
        # a group is as wide as its most bars in any panel, so a lone bar (sparsegpt) is narrow
        sizes = [max(sum(1 for b in column if b["metric"] == m) for column in columns.values()) for m in metrics]
        ticks = [sum(sizes[:g]) * _BAR + g * _GAP + sizes[g] * _BAR / 2 for g in range(len(metrics))]
        panels = []
        for column in sorted(columns, key=lambda c: (is_points(split_column(c)[0]), split_column(c))):
            shown = []
            for g, metric in enumerate(metrics):
                group = sorted((b for b in columns[column] if b["metric"] == metric),
                               key=lambda b: (refiners.index(b["refine"]), reconstructors.index(b["reconstruct"])))
                for k, bar in enumerate(group):
                    shown.append({**bar, "x": ticks[g] + (k - (len(group) - 1) / 2) * _BAR})
            panels.append({"title": column, "bars": shown})
        dense = _dense_lines(grid, [r for r in rows if r["metric"] == "dense"], model)
        values = [b["y"] for b in bars] + list(dense)
        specs.append({
            "slug": slug(model, grid.task, grid.score, "stages"), "kind": "stages", "model": model,
            "task": grid.task, "score": grid.score, "higher_is_better": grid.higher_is_better,
            "log_y": log_scale(grid.score, values), "metrics": metrics, "refiners": refiners,
            "reconstructors": reconstructors, "width": _BAR, "ticks": ticks, "panels": panels,
            "title": f"{short_model(model)} · {grid.task} · {grid.score} by stage",
            "dense": [{"value": v, "cell_key": k} for v, k in dense.items()]})
    return specs


def _setting(r: dict) -> str:
    return lb.canonical_json([r["model"], r["eval_options"]])


def _diagnosed(cells: list[dict]) -> list[dict]:
    """The diagnosed (layer, decision) records of one setting's cells, each counted once."""
    seen, records = set(), []
    for r in cells:
        for d in r["layer_diagnostics"]:
            metric = r["metric"] if d["candidate"] == APPLIED else d["candidate"]
            point = (r["pattern"], r["sparsity"], r["allocation"], d["name"], metric,
                     d["relative_predicted"], d["relative_measured"])
            if point not in seen:
                seen.add(point)
                records.append({**d, "metric": metric, "sparsity": r["sparsity"], "pattern": r["pattern"]})
    return records


def _scatter_panels(records: list[dict], metrics: list[str]) -> list[dict]:
    """Per metric: predicted against measured relative error, a series per pattern and sparsity."""
    columns = sorted({(d["pattern"] or "", d["sparsity"]) for d in records if finite(d["sparsity"]) is not None},
                     key=lambda c: (is_points(c[0]), c))
    scatter = []
    for metric in metrics:
        series = []
        for pattern, s in columns:
            pts = [(x, y) for d in records
                   if d["metric"] == metric and (d["pattern"] or "", d["sparsity"]) == (pattern, s)
                   and (x := finite(d["relative_predicted"])) and (y := finite(d["relative_measured"]))
                   and x > 0 and y > 0]
            if pts:
                series.append({"pattern": pattern, "sparsity": s, "label": f"{pattern} {s:g}",
                               "x": [p[0] for p in pts], "y": [p[1] for p in pts]})
        if series:
            scatter.append({"title": metric, "series": series})
    return scatter


def _depth_panels(records: list[dict], metrics: list[str]) -> list[dict]:
    """Per layer role: measured relative error by block, a series per metric."""
    depth = []
    roles = sorted({d["role"] or "unknown" for d in records})
    width = 0.6 / max(len(metrics), 1)
    for role in roles:
        series = []
        for k, metric in enumerate(metrics):
            pts = [(d["block"], y, finite(d["regime_median"])) for d in records
                   if (d["role"] or "unknown") == role and d["metric"] == metric and d["block"] is not None
                   and (y := finite(d["relative_measured"])) and y > 0]
            if pts:
                series.append({"metric": metric, "offset": (k - (len(metrics) - 1) / 2) * width,
                               "block": [p[0] for p in pts], "y": [p[1] for p in pts],
                               "regime": [p[2] for p in pts]})
        if series:
            depth.append({"title": role, "series": series})
    return depth


def diagnostic_specs(rows: list[dict]) -> list[dict]:
    """Per model (and diagnostics setting): predicted against measured relative error per
    metric, and measured error by block per role coloured by median |μ|/σ.

    A cell's own decision counts for its metric; the masks every cell diagnoses beside its
    own (the same in every cell of one pattern and sparsity) are counted once.
    """
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r["layer_diagnostics"]:
            groups[_setting(r)].append(r)
    specs = []
    settings = sorted(groups)
    for setting in settings:
        cells = groups[setting]
        model = cells[0]["model"]
        records = _diagnosed(cells)
        metrics = sorted({d["metric"] for d in records})
        base = slug(model, DIAGNOSTICS) + (f"-{settings.index(setting) + 1}" if len(settings) > 1 else "")
        title = short_model(model)
        scatter, depth = _scatter_panels(records, metrics), _depth_panels(records, metrics)
        common = {"model": model, "task": DIAGNOSTICS, "eval_options": cells[0]["eval_options"]}
        if scatter:
            specs.append({"slug": f"{base}-scatter", "kind": "diagnostics-scatter",
                          "title": f"{title}: predicted against measured relative output error", "panels": scatter,
                          **common})
        if depth:
            specs.append({"slug": f"{base}-depth", "kind": "diagnostics-depth",
                          "title": f"{title}: measured relative error by block, coloured by median |μ|/σ",
                          "panels": depth, **common})
    return specs


def unique_slugs(specs: list[dict]) -> list[dict]:
    """Give repeated slugs a counter, so no figure overwrites another's files."""
    seen: dict[str, int] = {}
    for spec in specs:
        n = seen.get(spec["slug"], 0)
        seen[spec["slug"]] = n + 1
        if n:
            spec["slug"] = f"{spec['slug']}-{n + 1}"
    return specs
