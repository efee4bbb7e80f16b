"""Full-model agreement: SmolLM2-135M pruned whole by the released code and by stadebench.

Each cell (metric, pattern) is run by up to three sides on the same 16×256 ``enwiki-2016``
calibration windows, sequentially, then evaluated by perplexity on the same 8×512
held-out windows (the smollm2 suite's protocol):

- ``released``: the release that defines the cell (tests/reference/runs.py);
- ``released-reversed``: the same release with the windows in reverse order, its own
  float noise floor (same statistics, other summation order);
- ``ours``: stadebench with its defaults (``stade``: ``bias_correction: false``, what the
  release does);
- ``ours-released``: stadebench with the options that reproduce the release (``runs.RELEASED``);
- ``ours-released-stats``: the same, its statistics accumulated as the release does
  (``accumulate: released``, one window per batch): the float rounding of the release.

One JSON line per run is appended to ``--out``; ``--table`` prints the table from it.
CPU-heavy (1-3 min a run on two cores), so run one cell at a time, e.g.::

    export STADEBENCH_REFERENCE_WANDA=/tmp/ref-wanda STADEBENCH_REFERENCE_STADE=/tmp/ref-stade
    python tests/reference/full_model.py --cell magnitude/2:4 --out /tmp/parity/full.jsonl
    python tests/reference/full_model.py --table --out /tmp/parity/full.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `reference` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "reference"

from . import runs  # noqa: E402

CELLS = ("dense", "magnitude/unstructured", "magnitude/unstructured-layer", "magnitude/2:4", "wanda/unstructured",
         "wanda/2:4", "stade/unstructured", "stade/2:4", "sparsegpt/unstructured-layer", "sparsegpt/2:4")
SIDES = ("released", "released-reversed", "ours", "ours-released", "ours-released-stats")


def setup(calib_n: int = 16, seqlen: int = 256, blocks: int | None = None):
    """(model loader, tokenizer, calibration windows) of the smollm2 suite's protocol."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stadebench.data import assets
    from stadebench.data.calibration import calibration_windows
    from stadebench.plugins import get_plugins

    path = assets.fetch("smollm2-135m", progress=False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    dataset = get_plugins().datasets.get("enwiki-2016").cls()
    windows = calibration_windows(dataset, tokenizer, seqlen, calib_n, 0)

    def load():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        if blocks is not None:
            model.model.layers = model.model.layers[:blocks]
            model.config.num_hidden_layers = blocks
        return model

    return load, tokenizer, windows


def perplexity(model, tokenizer, eval_windows: int = 8) -> float:
    from stadebench.evaluation.perplexity import Perplexity

    evaluator = Perplexity({"dataset": "enwiki-2016", "seqlen": 512, "batch_size": 4, "max_windows": eval_windows})
    return evaluator.evaluate(model, tokenizer, "cpu")[0].value


def run_cell(cell: str, side: str, load, tokenizer, windows, eval_windows: int = 8) -> dict:
    """Prune a fresh model for ``cell`` on ``side`` and measure its perplexity."""
    model = load()
    t0 = time.perf_counter()
    options = {}
    if cell != "dense":
        metric, pattern = cell.split("/")
        if side.startswith("released"):
            with contextlib.redirect_stdout(io.StringIO()):  # the releases print every layer
                runs.prune_released(model, windows.flip(0) if side == "released-reversed" else windows, metric,
                                    pattern)
            del model.hf_device_map
        else:
            extra = {"metric_options": {"bias_correction": False}} if metric.startswith("stade") else {}
            like_release = side.startswith("ours-released")
            stats = side == "ours-released-stats"
            runs.prune_ours(model, windows, metric, pattern, released=like_release, batch_size=1 if stats else 8,
                            accumulate="released" if stats else "float64", **extra)
            options = dict(zip(("metric", "pattern"), runs.released_options(metric, pattern))) \
                if like_release else extra
    seconds = time.perf_counter() - t0
    masks = runs.pruned_masks(model)
    zeros = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    return {"cell": cell, "side": side, "ppl": perplexity(model, tokenizer, eval_windows), "prune_seconds": seconds,
            "zeros": zeros, "options": options}


def needless(cell: str) -> set[str]:
    """Sides that would repeat another: magnitude reads no windows (their order cannot
    matter), and without released options ``ours-released`` is ``ours``."""
    metric, pattern = cell.split("/")
    skip = {"released-reversed", "ours-released-stats"} if metric == "magnitude" else set()
    return skip | ({"ours-released"} if runs.released_options(metric, pattern) == ({}, {}) or
                   metric == "stade" and pattern == "unstructured" else set())


def table(rows: list[dict]) -> str:
    """Markdown: ppl by side, and each side minus released, relative."""
    by = {(r["cell"], r["side"]): r["ppl"] for r in rows}

    def val(cell, side):
        v = by.get((cell, side))
        return "" if v is None else f"{v:.2f}"

    def rel(cell, side):
        v, ref = by.get((cell, side)), by.get((cell, "released"))
        return "" if v is None or ref is None else f"{100 * (v / ref - 1):+.2f}%"

    lines = ["| cell | released | released, windows reversed | stadebench | stadebench, released options | "
             "... and released statistics |", "|---|---|---|---|---|---|"]
    for cell in dict.fromkeys(r["cell"] for r in rows):
        lines.append(f"| {cell} | {val(cell, 'released')} | " + " | ".join(
            f"{val(cell, side)} {rel(cell, side)}".strip() for side in SIDES[1:]) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cell", action="append", choices=CELLS, help="cell(s) to run (default: all)")
    parser.add_argument("--side", action="append", choices=SIDES, help="side(s) to run (default: all)")
    parser.add_argument("--out", type=Path, default=Path("parity-full.jsonl"), help="JSON lines, appended")
    parser.add_argument("--table", action="store_true", help="print the table from --out and exit")
    parser.add_argument("--calib-n", type=int, default=16)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--blocks", type=int, default=None, help="keep only the first blocks (a quick check)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.table:
        print(table([json.loads(line) for line in args.out.read_text().splitlines() if line.strip()]))
        return
    torch.set_num_threads(args.threads)
    load, tokenizer, windows = setup(args.calib_n, blocks=args.blocks)
    for cell in args.cell or CELLS:
        for side in (["ours"] if cell == "dense" else args.side or SIDES):
            if cell != "dense" and side in needless(cell):
                continue
            row = run_cell(cell, side, load, tokenizer, windows, args.eval_windows)
            print(json.dumps(row), flush=True)
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
