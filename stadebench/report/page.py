"""The report page: one self-contained HTML file. Figures are inlined as PNG data URIs,
style and script are inline, and a Content-Security-Policy forbids fetching anything, so
the page opens from disk with no network and shows the same everywhere.

A leaderboard's strings are untrusted (a shared leaderboard is someone else's text): every
one is HTML-escaped where it lands (text, attribute, embedded JSON), none becomes a link,
control characters show as their Unicode pictures, and the policy runs only the page's
own script (by its hash): no inline handler or injected ``<script>`` could run."""

from __future__ import annotations

import base64
import hashlib
import json
from html import escape
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from ..results.row import SCHEMA
from ..util import digest
from .series import finite

if TYPE_CHECKING:
    from ..results.grid import Grid

__all__ = ["POLICY", "detail_id", "details", "embedded_json", "figure", "fmt_value", "page", "pivot_table"]

_SCALARS = [f.name for f in SCHEMA if not pa.types.is_list(f.type) and f.name != "details"]
_DOCS = {f.name: (f.metadata or {}).get(b"doc", b"").decode() for f in SCHEMA}
_LAYER_COLUMNS = ("block", "layer", "role", "shape", "allocated", "sparsity", "pruned", "bias_added", "output_mse",
                  "block_mse")
_DIAGNOSTIC_COLUMNS = ("block", "layer", "role", "median |μ|/σ", "mask", "mean term in bias",
                       "predicted / E|Wx|²", "measured / E|Wx|²", "lowest predicted", "lowest measured")

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0 auto;max-width:1200px;padding:1em 2em;
color:#222}
h1{font-size:1.6em}h2{margin-top:2em;border-bottom:1px solid #ccc}h3{font-size:1.05em}
table{border-collapse:collapse;margin:.5em 0 1em}th,td{padding:.2em .6em;border-bottom:1px solid #e3e3e3;
text-align:right;vertical-align:top}th{background:#f4f4f4}td.label,th.label{text-align:left}
.worse{color:#b0201c}.better{color:#17762b}.muted{color:#777}.stderr{color:#777;font-size:.9em}
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}figcaption{color:#555}
details.cell{margin:.3em 0;border:1px solid #ddd;border-radius:4px;padding:.2em .6em}details.cell[open]{
background:#fafafa}details.cell summary{cursor:pointer}dl.meta{display:grid;grid-template-columns:max-content 1fr;
gap:0 1em}dl.meta dt{font-weight:600}dl.meta dd{margin:0;word-break:break-all}pre{white-space:pre-wrap;
font-size:.85em;background:#f6f6f6;padding:.5em}nav ul{columns:2}code{font-size:.9em}
table.layers td,table.layers th{font-size:.85em;padding:.1em .4em}
"""

# Runs after every image has loaded (the load event waits for them); a browser test reads the attributes.
_SCRIPT = """
(function () {
  function openTarget() {
    var id = decodeURIComponent(location.hash.slice(1));
    var el = id && document.getElementById(id);
    for (; el; el = el.parentElement) { if (el.tagName === "DETAILS") { el.open = true; } }
  }
  window.addEventListener("hashchange", openTarget);
  window.addEventListener("load", function () {
    openTarget();
    var images = Array.prototype.slice.call(document.images);
    var broken = images.filter(function (img) { return !(img.complete && img.naturalWidth > 0); });
    document.body.setAttribute("data-images", String(images.length));
    document.body.setAttribute("data-broken-images", String(broken.length));
    document.body.setAttribute("data-report-ready", "true");
    window.__reportReady = true;
  });
})();
"""
# inline script runs only when it is this one (its hash): never a leaderboard string's
POLICY = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
          f"script-src 'sha256-{base64.b64encode(hashlib.sha256(_SCRIPT.encode()).digest()).decode()}'; "
          "base-uri 'none'; form-action 'none'")
# C0 controls (but tab, newline, carriage return) and DEL as their Unicode control pictures (U+2400...)
_VISIBLE = {**{c: 0x2400 + c for c in range(0x20) if chr(c) not in "\t\n\r"}, 0x7F: 0x2421}
_JSON_ESCAPES = {ord("<"): "\\u003c", ord(">"): "\\u003e", ord("&"): "\\u0026", 0x2028: "\\u2028",
                 0x2029: "\\u2029"}


def detail_id(row: dict) -> str:
    """The anchor of one row's details: stable across reports of the same leaderboard."""
    return "d-" + digest(row["cell_key"], str(row["task"]), str(row["score"]), length=16)


def fmt_value(value: Any) -> str:
    """A value as the page shows it: 4 significant digits, "—" when missing, NaN or infinite."""
    v = finite(value) if isinstance(value, float) else value
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def _relative(rel: float | None, higher: bool | None, significant: bool | None = None) -> str:
    """The change against dense, coloured by direction; ``~`` and muted when it cannot be told
    from noise (``GridCell.significant``: a paired bootstrap, or the standard errors)."""
    rel = finite(rel)
    if rel is None:
        return ""
    worse = rel < 0 if higher else rel > 0
    kind = "muted" if higher is None or significant is False else "worse" if worse else "better"
    text = f"{rel:+.1%}" if abs(rel) < 0.1 else f"{rel:+.0%}"  # small changes keep a digit: no "-0%"
    return f' <span class="{kind}">({"~" if significant is False else ""}{text})</span>'


def _short(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[-2:]) if len(parts) > 2 else name


def _layer_table(css: str, columns: tuple[str, ...], rows: list[tuple[str, tuple]], labels: set[str]) -> str:
    """A table with a row per (full layer name, values in ``columns`` order): the ``layer``
    column holds the short name, the full one on hover; ``labels`` columns align left."""
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    body = []
    for name, values in rows:
        cells = "".join(f'<td class=label title="{escape(name)}">{escape(fmt_value(v))}</td>' if c == "layer"
                        else f"<td{' class=label' if c in labels else ''}>{escape(fmt_value(v))}</td>"
                        for c, v in zip(columns, values, strict=True))
        body.append(f"<tr>{cells}</tr>")
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _layers(layers: list[dict]) -> str:
    rows = []
    for layer in layers:
        values = {"block": layer["block"], "layer": _short(layer["name"]), "role": layer["role"],
                  "shape": f"{layer['rows']}×{layer['columns']}", **{c: layer.get(c) for c in _LAYER_COLUMNS[4:]}}
        if layer["dense"]:
            values.update(allocated="dense", sparsity=0.0, pruned=0)
        rows.append((layer["name"], tuple(values[c] for c in _LAYER_COLUMNS)))
    return _layer_table("layers", _LAYER_COLUMNS, rows, {"role"})


def _diagnostics(records: list[dict], metric: str) -> str:
    """One table row per (layer, mask diagnosed): the numbers behind the diagnostics figures."""
    rows = [(d["name"], (d["block"], _short(d["name"]), d["role"], d["regime_median"],
                         f"{metric} (applied)" if d["applied"] else d["candidate"],
                         "yes" if d["bias_corrected"] else "no", d["relative_predicted"], d["relative_measured"],
                         "✓" if d["predicted_winner"] else "", "✓" if d["measured_winner"] else ""))
            for d in records]
    return _layer_table("layers diagnostics", _DIAGNOSTIC_COLUMNS, rows, {"role", "mask"})


def _details_text(raw: str) -> str:
    """A row's ``details`` indented; text that is not JSON (a leaderboard written by another
    tool) as it is stored, said so."""
    try:
        return f"<pre>{escape(json.dumps(json.loads(raw), indent=1, ensure_ascii=False))}</pre>"
    except (ValueError, RecursionError):
        return f'<p class="muted">not valid JSON; shown as stored:</p><pre>{escape(str(raw))}</pre>'


def details(row: dict, title: str) -> str:
    """A collapsed block with a row's provenance and, for a pruned cell, its per-layer records."""
    meta = "".join(f'<dt title="{escape(_DOCS.get(k, ""))}">{k}</dt><dd>{escape(fmt_value(row[k]))}</dd>'
                   for k in _SCALARS if row.get(k) is not None)
    parts = [f'<details class="cell" id="{detail_id(row)}"><summary>{escape(title)}</summary>',
             f"<dl class=meta>{meta}</dl>"]
    if row.get("details"):
        parts.append(f"<details><summary>details</summary>{_details_text(row['details'])}</details>")
    if row.get("layers"):
        pruned = [la for la in row["layers"] if not la["dense"]]
        parts.append(f"<h4>{len(row['layers'])} prunable layer(s), {len(pruned)} pruned: realised sparsity and "
                     "reconstruction error (MSE on the calibration inputs)</h4>" + _layers(row["layers"]))
    if row.get("layer_diagnostics"):
        layers = len({d["name"] for d in row["layer_diagnostics"]})
        parts.append(f"<h4>{layers} layer(s) diagnosed: predicted and measured relative output error of each "
                     "mask (held-out windows, dense inputs)</h4>" + _diagnostics(row["layer_diagnostics"],
                                                                                   row["metric"]))
    parts.append("</details>")
    return "".join(parts)


def pivot_table(grid: Grid, matched: dict, dense_rows: dict) -> tuple[str, list[str]]:
    """The pivot as HTML (each value links to its details) and the details blocks it links to."""
    head = "".join(f"<th>{escape(c)}</th>" for c in grid.columns)
    body, blocks = [], []
    for i, prow in enumerate(grid.rows):
        dense = dense_rows.get((prow.model, prow.dense))
        dense_text = escape(fmt_value(prow.dense))
        if dense is not None:
            dense_text = f'<a href="#{detail_id(dense)}">{dense_text}</a>'
        cells = []
        for column, cell in grid.cells(prow):
            if cell is None:
                cells.append("<td></td>")
                continue
            text = escape(fmt_value(cell.value))
            r = matched.get((i, column))
            if r is not None:
                text = f'<a href="#{detail_id(r)}">{text}</a>'
                blocks.append(details(r, f"{prow.model} · {prow.label} · {column}"))
            err = finite(cell.sd if cell.n > 1 else cell.stderr)
            spread = f" (n={cell.n})" if cell.n > 1 else ""
            stderr = f' <span class="stderr">± {fmt_value(err)}{spread}</span>' if err is not None else ""
            cells.append(f"<td>{text}{stderr}{_relative(cell.relative, grid.higher_is_better, cell.significant)}</td>")
        body.append(f"<tr><td class=label>{escape(str(prow.model))}</td><td class=label>{escape(prow.label)}"
                    f"</td><td>{dense_text}</td>{''.join(cells)}</tr>")
    table = (f"<table><thead><tr><th class=label>model</th><th class=label>metric</th><th>dense</th>{head}</tr>"
             f"</thead><tbody>{''.join(body)}</tbody></table>")
    return table, blocks


def figure(spec: dict, png: bytes, files: dict[str, str]) -> str:
    links = " · ".join(f'<a href="{escape(path)}">{ext.upper()}</a>' for ext, path in files.items())
    data = base64.b64encode(png).decode()
    return (f'<figure id="fig-{escape(spec["slug"])}"><img alt="{escape(spec["title"])}" '
            f'data-figure="{escape(spec["slug"])}" src="data:image/png;base64,{data}">'
            f"<figcaption>{escape(spec['title'])} — {links}</figcaption></figure>")


def embedded_json(value: Any) -> str:
    """JSON safe inside a <script> element: no '<', '>' or '&' (each only ever inside a JSON
    string, written as its \\u escape), so no text closes the element, opens a comment or
    reads as markup; JSON.parse gives back the same strings."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False).translate(_JSON_ESCAPES)


def page(*, title: str, intro: str, nav: list[tuple[str, str]], sections: list[str], figures: list[dict]) -> str:
    """The whole document."""
    items = "".join(f'<li><a href="#{escape(a)}">{escape(t)}</a></li>' for a, t in nav)
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{POLICY}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<meta name="generator" content="stadebench report">',
        f"<title>{escape(title)}</title><style>{_CSS}</style></head>",
        f"<body><h1>{escape(title)}</h1>{intro}",
        f"<nav><ul>{items}</ul></nav>",
        *sections,
        f'<script type="application/json" id="figure-data">{embedded_json({"figures": figures})}</script>',
        f"<script>{_SCRIPT}</script>",
        "</body></html>",
    ]).translate(_VISIBLE) + "\n"  # the template and the JSON hold no control character: only strings shown
