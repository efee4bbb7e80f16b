"""The figures, drawn with matplotlib from the specs of ``series``, checked against them,
and written as PNG (the page and the README), SVG and PDF (papers).

matplotlib is the field's default: its PDF and SVG go into LaTeX papers as they are, and
it renders without a display (the Agg canvas; no pyplot, so no global figure state).
Every leaderboard string a figure shows (titles, legends, the score) is drawn literally:
mathtext off (a ``$`` is a dollar sign), control characters as ``\\xNN``, long text cut.
"""

from __future__ import annotations

import io
import math
import re
from pathlib import Path
from typing import Any

FORMATS = ("png", "svg", "pdf")
DPI = 150
_STYLE = {"svg.hashsalt": "stadebench", "svg.fonttype": "path", "pdf.fonttype": 42, "font.size": 9,
          "axes.grid": True, "grid.alpha": 0.3}
_DASHES = ["-", "--", ":", "-."]
_LINE_MARKERS = ["o", "v", "^", "<", ">"]
_POINT_MARKERS = ["D", "s", "P", "X", "*"]
_METRIC_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
# the built-in metrics keep one tab10 colour in every report, so two reports read alike
_METRIC_SLOTS = {"magnitude": 0, "wanda": 1, "sparsegpt": 2, "stade": 3, "stade-w": 4, "random": 5}


def colour_slots(keys, size: int = 10) -> dict[str, int]:
    """A palette index per line key: the built-in metrics' fixed slots; every other key (a
    label with options, a plugin) its hashed slot among the slots no built-in owns, the
    next free one when the figure already uses that, then a slot of a built-in the figure
    does not show. Keys of one figure share a slot only past ``size`` keys."""
    import hashlib

    slots = {k: _METRIC_SLOTS[k] for k in keys if k in _METRIC_SLOTS}
    taken = set(slots.values())
    spare = [i for i in range(size) if i not in _METRIC_SLOTS.values()]
    for key in sorted(set(keys) - set(slots)):  # sorted: the order lines come in changes nothing
        start = int(hashlib.sha256(key.encode()).hexdigest(), 16) % len(spare)
        order = spare[start:] + spare[:start] + sorted(_METRIC_SLOTS.values())
        free = [i for i in order if i not in taken]
        slots[key] = free[0] if free else spare[start]
        taken.add(slots[key])
    return slots


class FigureMismatch(AssertionError):
    """A drawn artist's data differ from the spec embedded in the page (a bug in the report)."""


def _check(drawn: list[tuple[Any, list, list]]) -> None:
    import numpy as np

    for artist, xs, ys in drawn:
        data = artist.get_xydata() if hasattr(artist, "get_xydata") else artist.get_offsets()
        want = np.column_stack([np.asarray(xs, float), np.asarray(ys, float)])
        if not np.array_equal(np.asarray(data, float), want):
            raise FigureMismatch(f"{artist} plots {np.asarray(data).tolist()}, the page says {want.tolist()}")


def _plain_log(axis) -> None:
    """Log-axis labels as plain numbers (0.3, 30, 600), minor ticks too when it spans under two decades."""
    import matplotlib as mpl

    class Plain(mpl.ticker.LogFormatter):
        def _num_to_string(self, x, vmin, vmax):  # LogFormatter writes 4e-01 below 1
            return f"{x:g}"

    axis.set_major_formatter(Plain())
    axis.set_minor_formatter(Plain(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _short_label(text: str, limit: int = 60) -> str:
    """A leaderboard string as a figure shows it: control characters as ``\\xNN`` (no font
    draws them, and they are not valid in SVG), cut to ``limit`` characters."""
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _literal(*texts) -> None:
    """Draw these Text artists as they are: a ``$`` in a label is no mathtext (a formula that
    does not parse would fail the figure, one that does would change what it says)."""
    for text in texts:
        text.set_parse_math(False)


def _legend(owner, handles: list, labels: list[str], **kwargs):
    """A legend of these handles and labels, all shown (a label starting with '_' too) and literal."""
    legend = owner.legend(handles, labels, **kwargs)
    _literal(*legend.get_texts())
    return legend


def _sweep(fig, spec: dict, drawn: list) -> None:
    import matplotlib as mpl

    ax = fig.add_subplot()
    colours = mpl.colormaps["tab10"].colors
    slots = colour_slots([line["colour_key"] for line in spec["lines"]], len(colours))
    allocations = list(dict.fromkeys(line["allocation"] or "uniform" for line in spec["lines"]))
    if "uniform" in allocations:  # uniform is the solid line whatever comes first
        allocations.remove("uniform")
        allocations.insert(0, "uniform")
    line_families = list(dict.fromkeys(line["family"] for line in spec["lines"] if line["style"] == "line"))
    point_families = list(dict.fromkeys(line["family"] for line in spec["lines"] if line["style"] == "points"))
    handles, labels = [], []
    for k, line in enumerate(spec["lines"]):
        colour = colours[slots[line["colour_key"]]]
        dash = _DASHES[allocations.index(line["allocation"] or "uniform") % len(_DASHES)]
        points = line["style"] == "points"
        marker = (_POINT_MARKERS[point_families.index(line["family"]) % len(_POINT_MARKERS)] if points
                  else _LINE_MARKERS[line_families.index(line["family"]) % len(_LINE_MARKERS)])
        yerr = [e or 0.0 for e in line["stderr"]] if any(e for e in line["stderr"]) else None
        container = ax.errorbar(line["x"], line["y"], yerr=yerr, color=colour, marker=marker,
                                markersize=6 if points else 4, linestyle="none" if points else dash,
                                linewidth=1.5, capsize=2, markerfacecolor="white" if points and dash != "-" else colour)
        handles.append(container)
        labels.append(_short_label(line["legend"]))
        container.lines[0].set_gid(f"series-{k}")  # names the line in the SVG, and for tests
        drawn.append((container.lines[0], line["x"], line["y"]))
    for i, d in enumerate(spec["dense"]):
        h = ax.axhline(d["value"], color="0.35", linestyle=(0, (5, 3)), linewidth=1, gid=f"dense-{i}")
        handles.append(h)
        labels.append(f"dense ({d['value']:.4g})")
        drawn.append((h, [0.0, 1.0], [d["value"], d["value"]]))  # axhline spans axes coordinates 0-1 in x
    if spec["log_y"]:
        ax.set_yscale("log")
        _plain_log(ax.yaxis)
    xs = sorted({x for line in spec["lines"] for x in line["x"]})
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.set_xlabel("sparsity")
    arrow = {True: " (higher is better)", False: " (lower is better)"}.get(spec["higher_is_better"], "")
    _literal(ax.set_ylabel(f"{_short_label(spec['score'], 80)}{' (log scale)' if spec['log_y'] else ''}{arrow}"),
             ax.set_title(_short_label(spec["title"], 120)))
    _legend(fig, handles, labels, loc="outside right upper", fontsize=8, frameon=False)


def _scatter(fig, spec: dict, drawn: list) -> None:
    import matplotlib as mpl

    panels = spec["panels"]
    cols = min(len(panels), 4)
    rows = math.ceil(len(panels) / cols)
    fig.set_size_inches(3.2 * cols + 1.2, 3.0 * rows + 0.6)
    labels = list(dict.fromkeys(s["label"] for p in panels for s in p["series"]))
    handles: dict[str, Any] = {}
    cmap = mpl.colormaps["viridis"]
    values = [v for p in panels for s in p["series"] for v in (*s["x"], *s["y"])]
    lo, hi = min(values) / 1.5, max(values) * 1.5
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)
    for ax, panel in zip(axes.flat, panels):
        for s in panel["series"]:
            colour = cmap(labels.index(s["label"]) / max(len(labels) - 1, 1))
            pc = ax.scatter(s["x"], s["y"], s=10, color=colour, alpha=0.8)
            handles.setdefault(s["label"], pc)
            drawn.append((pc, s["x"], s["y"]))
        ax.plot([lo, hi], [lo, hi], color="0.4", linewidth=0.8, linestyle="--")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        _literal(ax.set_title(_short_label(panel["title"])))
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("predicted E|e|² / E|Wx|²")
    for ax in axes[:, 0]:
        ax.set_ylabel("measured E|e|² / E|Wx|²")
    order = [label for label in labels if label in handles]
    _legend(fig, [handles[label] for label in order], [_short_label(label) for label in order],
            title="pattern and sparsity", loc="outside lower center", fontsize=8, ncols=min(len(order), 6),
            frameon=False)
    _literal(fig.suptitle(_short_label(spec["title"], 120)))


def _depth(fig, spec: dict, drawn: list) -> None:
    import matplotlib as mpl
    import numpy as np

    panels = spec["panels"]
    fig.set_size_inches(4.2 * len(panels) + 1.6, 3.4)
    regimes = [v for p in panels for s in p["series"] for v in s["regime"] if v is not None and v > 0]
    norm = mpl.colors.LogNorm(min(regimes), max(regimes)) if len(set(regimes)) > 1 else None
    cmap = mpl.colormaps["plasma"].with_extremes(bad="0.6")
    metrics = list(dict.fromkeys(s["metric"] for p in panels for s in p["series"]))
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    mappable = None
    for ax, panel in zip(axes, panels):
        for s in panel["series"]:
            x = [b + s["offset"] for b in s["block"]]
            c = np.array([np.nan if v is None or v <= 0 else v for v in s["regime"]], float)
            mappable = ax.scatter(x, s["y"], c=c, cmap=cmap, norm=norm, s=14, alpha=0.85, edgecolors="none",
                                  marker=_METRIC_MARKERS[metrics.index(s["metric"]) % len(_METRIC_MARKERS)],
                                  label=s["metric"], plotnonfinite=True)
            drawn.append((mappable, x, s["y"]))
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(mpl.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("block")
        _literal(ax.set_title(_short_label(panel["title"])))
    axes[0].set_ylabel("measured E|e|² / E|Wx|²")
    if mappable is not None and norm is not None:
        bar = fig.colorbar(mappable, ax=list(axes), label="median |μ|/σ", pad=0.02)
        _plain_log(bar.ax.yaxis)
    handles = [mpl.lines.Line2D([], [], color="0.3", linestyle="none",
                                marker=_METRIC_MARKERS[i % len(_METRIC_MARKERS)]) for i in range(len(metrics))]
    _legend(axes[0], handles, [_short_label(m) for m in metrics], fontsize=7, loc="best")
    _literal(fig.suptitle(_short_label(spec["title"], 120)))


class _Bars:
    """A bar container's (centre, height) points, as ``_check`` reads them; the centre is
    rounded (matplotlib stores the left edge, so centre - width / 2 + width / 2 may differ
    in the last bit), the height is exact."""

    def __init__(self, container):
        self.container = container

    def get_xydata(self):
        return [(round(r.get_x() + r.get_width() / 2, 9), r.get_height()) for r in self.container.patches]

    def __str__(self) -> str:
        return f"bars {self.container.get_label()!r}"


_HATCHES = ["", "////", "xxx", "...", "\\\\"]


def _stages(fig, spec: dict, drawn: list) -> None:
    import matplotlib as mpl

    panels = spec["panels"]
    fig.set_size_inches(7.5, 2.3 * len(panels) + 0.9)
    colours = mpl.colormaps["tab10"].colors
    fill = {name: "0.6" if name == "none" else colours[k % len(colours)]
            for k, name in enumerate(n for n in spec["reconstructors"] if n != "none")} | {"none": "0.6"}
    hatch = {name: _HATCHES[k % len(_HATCHES)] for k, name in enumerate(spec["refiners"])}
    axes = fig.subplots(len(panels), 1, squeeze=False, sharex=True)[:, 0]
    for ax, panel in zip(axes, panels):
        for k, bar in enumerate(panel["bars"]):
            container = ax.bar([bar["x"]], [bar["y"]], width=spec["width"] * 0.92, color=fill[bar["reconstruct"]],
                               hatch=hatch[bar["refine"]], edgecolor="0.15", linewidth=0.5, label=f"bar-{k}")
            container.patches[0].set_gid(f"bar-{k}")
            drawn.append((_Bars(container), [round(bar["x"], 9)], [bar["y"]]))
        for i, d in enumerate(spec["dense"]):
            h = ax.axhline(d["value"], color="0.2", linestyle=(0, (5, 3)), linewidth=1, gid=f"dense-{i}")
            drawn.append((h, [0.0, 1.0], [d["value"], d["value"]]))
        if spec["log_y"]:
            ax.set_yscale("log")
            _plain_log(ax.yaxis)
        _literal(ax.set_title(_short_label(panel["title"]), fontsize=9, loc="left"))
    axes[-1].set_xticks(spec["ticks"], [_short_label(m, 40).replace(" (", "\n(", 1) for m in spec["metrics"]])
    _literal(*axes[-1].get_xticklabels())
    arrow = {True: " ↑", False: " ↓"}.get(spec["higher_is_better"], "")
    _literal(fig.supylabel(f"{_short_label(spec['score'], 60)}{' (log)' if spec['log_y'] else ''}{arrow}"),
             fig.suptitle(_short_label(spec["title"], 120)))
    patch = mpl.patches.Patch
    handles = [patch(facecolor=fill[n], edgecolor="0.15", label=n) for n in spec["reconstructors"]]
    labels = [f"reconstruct: {_short_label(n, 30)}" for n in spec["reconstructors"]]
    handles += [patch(facecolor="white", edgecolor="0.15", hatch=hatch[n]) for n in spec["refiners"]]
    labels += [f"refine: {_short_label(n, 30)}" for n in spec["refiners"]]
    for d in spec["dense"]:
        handles.append(mpl.lines.Line2D([], [], color="0.2", linestyle=(0, (5, 3)), linewidth=1))
        labels.append(f"dense ({d['value']:.4g})")
    _legend(fig, handles, labels, loc="outside right upper", fontsize=8, frameon=False)


_DRAW = {"sweep": _sweep, "stages": _stages, "diagnostics-scatter": _scatter, "diagnostics-depth": _depth}


def draw(spec: dict):
    """A matplotlib Figure of ``spec``, its every plotted point checked to equal the spec's."""
    import matplotlib as mpl
    from matplotlib.figure import Figure

    with mpl.rc_context(_STYLE):
        fig = Figure(figsize=(7.5, 4.2), layout="constrained")
        drawn: list = []
        _DRAW[spec["kind"]](fig, spec, drawn)
    _check(drawn)
    return fig


def save(spec: dict, folder: Path) -> tuple[dict[str, Path], bytes]:
    """Draw ``spec`` and write it to ``folder/<slug>.{png,svg,pdf}``; returns the paths and the PNG bytes."""
    import matplotlib as mpl

    fig = draw(spec)
    folder.mkdir(parents=True, exist_ok=True)
    paths, png = {}, b""
    with mpl.rc_context(_STYLE):
        for ext in FORMATS:
            buffer = io.BytesIO()
            # no dates in the files: a figure redrawn from the same results is the same file
            metadata = {"Software": None} if ext == "png" else {"Date": None} if ext == "svg" else \
                {"CreationDate": None}
            fig.savefig(buffer, format=ext, dpi=DPI, metadata=metadata)
            fig.set_layout_engine("none")  # laid out once: the other formats keep the same positions
            data = buffer.getvalue()
            paths[ext] = folder / f"{spec['slug']}.{ext}"
            paths[ext].write_bytes(data)
            if ext == "png":
                png = data
    return paths, png
