"""GPU check: prune the real SmolLM2-135M on CUDA in float16 and bfloat16, and measure it.

For each dtype: the dense perplexity, then every metric × pattern at 50% sparsity,
each followed by the perplexity of the pruned model; every row records the prune and
eval seconds, the peak GPU memory of each (``torch.cuda.max_memory_allocated``, reset
before each), the realised sparsity and the perplexity. The weights stay on the CPU
and the engine moves one block at a time to the GPU, as ``stadebench run`` does; the
evaluator moves the whole model there for the eval and back. Every prune starts from a
fresh copy of the dense model.

Then, per dtype, the speed check (``--no-speed`` skips it): the model pruned 2:4 by
magnitude and measured by the ``speed`` evaluator, dense against PyTorch's
semi-structured kernel (matmul sweep over the model's layer shapes, prefill and decode).
On CUDA sm80+ in float16/bfloat16 that kernel must apply (``kernel: semi-structured``);
elsewhere the row must say ``dense`` with a reason and claim no speedup. Either way the
evaluator must leave the pruned model's weights exactly as they were.

    python tests/benchmarks/gpu.py                      # CUDA, float16 + bfloat16: ~3 min on an H200
    python tests/benchmarks/gpu.py --quick              # small calibration, 16 eval windows: ~2 min
    python tests/benchmarks/gpu.py --device cpu --dtypes float32 --quick   # a CPU smoke run
    nox -s gpu -- --quick                               # the same, in the current environment

Defaults by device (each overridable with its flag):

    device, mode    calibration (--calib-n × --calib-seqlen)   eval windows of 512 (--max-windows)
    cuda            128 × 2048 (the Wanda/SparseGPT protocol)   all 209 of the test split
    cuda --quick    16 × 512                                    16
    cpu             16 × 256 (the smollm2 suite's)              8
    cpu --quick     4 × 128                                     8

On an H200 most of the time is SparseGPT's column-by-column loop (~150k small steps per
run, bound by Python and kernel launches, not by the calibration size), so --quick saves
little more than the forward passes; `--metrics magnitude,wanda,stade,stade-w` skips it.

Offline machines: nothing is downloaded when the data is already there. Calibration
and evaluation read the ``enwiki-2016`` asset from the stadebench cache, so copy
``<cache>/assets/enwiki-2016/`` (``stadebench assets list`` shows the path) to the
other machine and point ``$STADEBENCH_CACHE`` at the folder above ``assets/``; the
cache's ``tokens/`` folder may travel too (tokenised text; rebuilt in seconds when
absent). The model is the ``smollm2-135m`` asset from the same cache, or ``--model``:
a copied folder of it (``config.json``, ``model.safetensors``, tokenizer files) or a
GGUF file (that needs the ``gguf`` package). Needs only torch, transformers and what
stadebench imports (pydantic, pluggy, platformdirs, filelock, rich, pyyaml); stadebench
is imported from this checkout when it is not installed.

Results: Markdown tables on stdout (perplexity rows, then speed rows); progress and
errors on stderr; everything as JSON in ``--out``, rewritten after every row so that a
killed run keeps what it finished. Exit status 0 when every row ran with a finite
perplexity and its sparsity within 1e-3 of the target and every speed row passed its
checks, 1 otherwise, 2 when the check could not start.
"""

from __future__ import annotations

import argparse
import copy
import enum
import gc
import importlib.util
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
MIB = 2**20
SPARSITY_TOLERANCE = 1e-3
DATASET = "enwiki-2016"
DTYPES = ("float16", "bfloat16", "float32")  # what stadebench.data.loading loads
# (device type, quick) -> calibration windows, their length, eval windows (None: all)
PRESETS = {
    ("cuda", False): (128, 2048, None),
    ("cuda", True): (16, 512, 16),
    ("cpu", False): (16, 256, 8),
    ("cpu", True): (4, 128, 8),
}
# (device type, quick) -> options of the speed evaluator (CUDA full: its defaults)
SPEED_PRESETS = {
    ("cuda", False): {},
    ("cuda", True): {"prefill_tokens": 256, "decode_tokens": 16, "repeats": 3, "warmup": 1},
    ("cpu", False): {"token_counts": [1, 16, 128], "prefill_tokens": 64, "decode_tokens": 8, "repeats": 3},
    ("cpu", True): {"token_counts": [1, 16], "prefill_tokens": 32, "decode_tokens": 4, "repeats": 2, "warmup": 1},
}
SPEED_PATTERN = "2:4"


class ExitCode(enum.IntEnum):
    OK = 0  # every row ran and passed its checks
    FAILED = 1  # a row raised, gave a non-finite perplexity, or missed its sparsity
    NOT_STARTED = 2  # bad options, no CUDA, no model or no data: nothing was measured


class SetupError(Exception):
    """The check cannot start; the message says why."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    presets = "; ".join(f"{dev}{' --quick' if quick else ''}: {n}×{seqlen}, {windows or 'all'}"
                        for (dev, quick), (n, seqlen, windows) in PRESETS.items())
    p = argparse.ArgumentParser(
        prog="gpu.py", description=__doc__.split("\n\n")[0],
        epilog=f"Defaults by device (calibration windows × tokens, eval windows): {presets}. "
               f"Data: the {DATASET} asset in the stadebench cache ($STADEBENCH_CACHE). "
               "Exit status: 0 all rows passed, 1 a row failed, 2 could not start.")
    p.add_argument("--model", default="smollm2-135m",
                   help="asset name, model folder or GGUF file (default: the smollm2-135m asset)")
    p.add_argument("--device", default="cuda", help="torch device (default: cuda)")
    p.add_argument("--dtypes", default="float16,bfloat16", help="comma-separated (default: float16,bfloat16)")
    p.add_argument("--metrics", default="magnitude,wanda,stade,stade-w,sparsegpt",
                   help="comma-separated (default: %(default)s)")
    p.add_argument("--patterns", default="unstructured,2:4", help="comma-separated specs (default: %(default)s)")
    p.add_argument("--sparsity", type=float, default=0.5, help="target sparsity (default: 0.5)")
    p.add_argument("--quick", action="store_true", help="small calibration and few eval windows")
    p.add_argument("--calib-n", type=int, help="calibration windows (by device)")
    p.add_argument("--calib-seqlen", type=int, help="tokens per calibration window (by device)")
    p.add_argument("--seed", type=int, default=0, help="calibration seed (default: 0)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward pass (default: 8)")
    p.add_argument("--eval-seqlen", type=int, default=512, help="tokens per eval window (default: 512)")
    p.add_argument("--eval-batch-size", type=int, default=8, help="eval windows per forward pass (default: 8)")
    p.add_argument("--max-windows", type=int, help="eval windows, 0 for all (by device)")
    p.add_argument("--no-speed", dest="speed", action="store_false",
                   help="skip the speed check (2:4 semi-structured kernel against dense)")
    p.add_argument("--out", default="gpu-check.json", help="JSON results (default: gpu-check.json)")
    args = p.parse_args(argv)
    for name in ("dtypes", "metrics", "patterns"):
        items = [s.strip() for s in getattr(args, name).split(",") if s.strip()]
        if not items:
            p.error(f"--{name} is empty")
        setattr(args, name, items)
    unknown = sorted(set(args.dtypes) - set(DTYPES))
    if unknown:
        p.error(f"--dtypes: unknown {', '.join(unknown)}; choose from {', '.join(DTYPES)}")
    kind = args.device.split(":")[0]
    n, seqlen, windows = PRESETS.get((kind, args.quick), PRESETS["cpu", args.quick])
    args.calib_n = n if args.calib_n is None else args.calib_n
    args.calib_seqlen = seqlen if args.calib_seqlen is None else args.calib_seqlen
    args.max_windows = windows if args.max_windows is None else (args.max_windows or None)
    args.speed_options = SPEED_PRESETS.get((kind, args.quick), SPEED_PRESETS["cpu", args.quick])
    return args


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)



def finite_or_text(value: Any) -> Any:
    """JSON has no NaN or Infinity: non-finite floats become the strings "nan", "inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: finite_or_text(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_text(v) for v in value]
    return value


def write_json(path: Path, results: dict) -> None:
    """Write atomically: a kill mid-write leaves the previous version."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(finite_or_text(results), f, indent=1, default=str)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Check:
    """The loaded pieces shared by all rows, and the row measurements."""

    def __init__(self, args: argparse.Namespace):
        import torch

        from stadebench.evaluation.perplexity import Perplexity

        self.args, self.torch = args, torch
        self.dev = torch.device(args.device)
        if self.dev.type == "cuda" and not torch.cuda.is_available():
            build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise SetupError(f"--device {args.device}: CUDA is not available here (torch {torch.__version__}, "
                             f"{build}); use --device cpu --dtypes float32")
        self.cuda = self.dev.type == "cuda"
        if self.cuda:
            self.dev = torch.device("cuda", torch.cuda.current_device() if self.dev.index is None else self.dev.index)
        self.perplexity = Perplexity({"dataset": DATASET, "seqlen": args.eval_seqlen,
                                      "batch_size": args.eval_batch_size, "max_windows": args.max_windows})
        self.windows = None  # calibration windows, cut once with the first tokenizer

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.dev)

    def reset_peak(self) -> None:
        if self.cuda:
            self.sync()
            self.torch.cuda.reset_peak_memory_stats(self.dev)

    def peak_mib(self) -> float | None:
        return self.torch.cuda.max_memory_allocated(self.dev) / MIB if self.cuda else None

    def load(self, dtype: str):
        from stadebench.data.loading import load_model
        from stadebench.suite import ModelSpec

        spec = ModelSpec(id=self.args.model, dtype=dtype)
        # Weights stay on the CPU when pruning on a GPU: the engine moves one block at a time.
        return load_model(spec, "cpu" if self.cuda else self.dev)

    def calibration(self, tokenizer):
        if self.windows is None:
            from stadebench.data.calibration import calibration_windows
            from stadebench.plugins import get_plugins

            dataset = get_plugins().datasets.get(DATASET).cls({})
            t0 = time.perf_counter()
            self.windows = calibration_windows(dataset, tokenizer, self.args.calib_seqlen, self.args.calib_n,
                                               self.args.seed)
            log(f"calibration: {self.args.calib_n} × {self.args.calib_seqlen} tokens of {DATASET} "
                f"in {time.perf_counter() - t0:.1f} s")
        return self.windows

    def evaluate(self, model, tokenizer) -> dict[str, Any]:
        self.reset_peak()
        t0 = time.perf_counter()
        score = self.perplexity.evaluate(model, tokenizer, self.dev)[0]
        self.sync()
        return {"ppl": score.value, "eval_seconds": time.perf_counter() - t0, "peak_eval_mib": self.peak_mib(),
                "eval": {k: score.details[k] for k in ("windows", "tokens", "seqlen", "split")}}

    def warm_up(self, model, tokenizer) -> float:
        """One eval window, so that CUDA's and cuBLAS's start-up is in no row's seconds."""
        from stadebench.evaluation.perplexity import Perplexity

        t0 = time.perf_counter()
        Perplexity({"dataset": DATASET, "seqlen": self.args.eval_seqlen, "batch_size": 1,
                    "max_windows": 1}).evaluate(model, tokenizer, self.dev)
        self.sync()
        return time.perf_counter() - t0

    def prune(self, model, metric: str, pattern: str) -> dict[str, Any]:
        from stadebench import prune

        self.reset_peak()  # prune resets it too; this also drops the previous row's
        t0 = time.perf_counter()
        report = prune(model, self.windows, metric=metric, pattern=pattern, sparsity=self.args.sparsity,
                       batch_size=self.args.batch_size, device=self.dev)
        self.sync()
        seconds = time.perf_counter() - t0
        return {"prune_seconds": report.seconds, "prune_wall_seconds": seconds,
                "prune_timings": report.timings, "block_passes": report.block_passes,
                "peak_prune_mib": self.peak_mib(),
                "peak_rss_mib": None if self.cuda else report.peak_memory_bytes / MIB,
                "target_sparsity": report.target_sparsity, "sparsity": report.sparsity,
                "offloaded": report.offloaded, "metric_version": report.metric_version,
                "bias_added": sum(layer.bias_added for layer in report.layers)}

    def speed(self, model, tokenizer, dtype: str) -> dict[str, Any]:
        """The speed evaluator on a 2:4 magnitude-pruned copy: its scores, kernel and checks."""
        from stadebench import prune
        from stadebench.evaluation.speed import Speed

        pruned = copy.deepcopy(model)
        prune(pruned, None, metric="magnitude", pattern=SPEED_PATTERN, device=self.dev)
        before = {k: v.clone() for k, v in pruned.state_dict().items()}
        t0 = time.perf_counter()
        scores = Speed(self.args.speed_options).evaluate(pruned, tokenizer, self.dev)
        seconds = time.perf_counter() - t0
        after = pruned.state_dict()
        details = scores[0].details
        row = {"dtype": dtype, "pattern": SPEED_PATTERN, "speed_seconds": seconds, "kernel": details["kernel"],
               "reason": details.get("reason"), "backend": details.get("backend"), "device": details["device"],
               "options": self.args.speed_options, "scores": {s.name: s.value for s in scores},
               "spread": {s.name: s.details["spread"] for s in scores},
               "unchanged": after.keys() == before.keys() and all(torch_equal(after[k], v) for k, v in before.items())}
        if self.cuda:
            props = self.torch.cuda.get_device_properties(self.dev)
            row["kernel_expected"] = (props.major, props.minor) >= (8, 0) and dtype in ("float16", "bfloat16")
        else:
            row["kernel_expected"] = False
        return row


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def speed_problems(row: dict) -> list[str]:
    """What makes a finished speed row fail the check."""
    out = []
    scores = row["scores"]
    speedups = {k: v for k, v in scores.items() if "speedup" in k}
    if row["kernel_expected"] and row["kernel"] != "semi-structured":
        out.append(f"the semi-structured kernel should apply here, got dense: {row['reason']}")
    if row["kernel"] == "dense" and (speedups or not row["reason"]):
        out.append("a dense row must give a reason and claim no speedup")
    if row["kernel"] == "semi-structured" and not speedups:
        out.append("the semi-structured kernel ran but no speedup was reported")
    if not all(math.isfinite(v) and v > 0 for v in scores.values()):
        out.append("a timing is not a positive finite number")
    if not row["unchanged"]:
        out.append("the evaluator changed the model's weights")
    return out


def speed_table(rows: list[dict]) -> str:
    ts = sorted({int(k.split("=")[1]) for r in rows for k in r.get("scores", {}) if k.startswith("dense_ms@t=")})
    head = (["dtype", "kernel"] + [f"speedup t={t}" for t in ts]
            + ["prefill speedup", "decode speedup", "dense prefill ms", "dense decode ms/token", "status"])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        sc = r.get("scores", {})
        cells = ([r["dtype"], r.get("kernel") or "-"] + [fmt(sc.get(f"speedup@t={t}"), ".2f") for t in ts]
                 + [fmt(sc.get("prefill_speedup"), ".2f"), fmt(sc.get("decode_speedup"), ".2f"),
                    fmt(sc.get("dense_prefill_ms"), ".2f"), fmt(sc.get("dense_decode_ms"), ".2f"), r["status"]])
        lines.append("| " + " | ".join(cells) + " |")
    reasons = sorted({f"{r['dtype']}: {r['reason']}" for r in rows if r.get("reason")})
    return "\n".join(lines + [f"dense because {why}" for why in reasons])


def problems(row: dict) -> list[str]:
    """What makes a finished row fail the check."""
    out = []
    ppl = row.get("ppl")
    if ppl is None or not math.isfinite(ppl):
        out.append(f"perplexity is {ppl}")
    target = row.get("target_sparsity")
    if target is not None and abs(row["sparsity"] - target) > SPARSITY_TOLERANCE:
        out.append(f"sparsity {row['sparsity']:.6f} is {row['sparsity'] - target:+.2e} off the target {target}")
    return out


def fmt(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec)


def table(rows: list[dict]) -> str:
    head = ["dtype", "metric", "pattern", "prune s", "eval s", "peak prune MiB", "peak eval MiB", "sparsity",
            "ppl", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [r["dtype"], r["metric"], r.get("pattern") or "-", fmt(r.get("prune_seconds"), ".2f"),
                 fmt(r.get("eval_seconds"), ".2f"), fmt(r.get("peak_prune_mib"), ".0f"),
                 fmt(r.get("peak_eval_mib"), ".0f"), fmt(r.get("sparsity"), ".4f"), fmt(r.get("ppl"), ".3f"),
                 r["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def environment(check: Check) -> dict[str, Any]:
    import torch
    import transformers

    import stadebench
    from stadebench.runner.run import git_commit

    env = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "transformers": transformers.__version__,
           "stadebench": stadebench.__version__, "stadebench_path": str(Path(stadebench.__file__).parent),
           "python": platform.python_version(), "git_commit": git_commit(), "host_cpu": platform.machine(),
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if check.cuda:
        props = torch.cuda.get_device_properties(check.dev)
        env.update(device=torch.cuda.get_device_name(check.dev), device_memory_mib=props.total_memory / MIB,
                   device_capability=f"{props.major}.{props.minor}")
    else:
        env["device"] = f"cpu ({platform.machine()})"
    return env


def run(args: argparse.Namespace) -> ExitCode:
    from stadebench.plugins import resolve

    check = Check(args)
    for metric in args.metrics:  # unknown names stop the check before any time is spent
        for pattern in args.patterns:
            try:
                resolve(metric, pattern)[1].resolve_sparsity(args.sparsity)
            except Exception as exc:
                raise SetupError(f"--metrics {metric} / --patterns {pattern}: {exc}") from None
    from stadebench.suite import ModelSpec

    try:
        ModelSpec(id=args.model)
    except ValueError as exc:
        raise SetupError(f"--model {args.model}: {exc.errors()[0]['msg'] if hasattr(exc, 'errors') else exc}") from None
    # A missing asset would be downloaded: on an offline machine, pip's retries waste minutes.
    from stadebench.data.assets import list_assets

    cached = {a["name"]: a for a in list_assets()}
    for name in (DATASET, args.model):
        if name in cached and not cached[name]["cached"]:
            raise SetupError(f"asset {name!r} is not in the cache ({cached[name]['path']}): run "
                             f"`stadebench assets fetch {name}` (network), or copy that folder from a machine "
                             "that has it and point $STADEBENCH_CACHE at the folder above assets/")

    out = Path(args.out)
    results: dict[str, Any] = {
        "schema": 1, "check": "gpu", "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "finished": None, "environment": environment(check), "options": vars(args), "loads": {}, "rows": [],
        "speed": [],
    }
    rows = results["rows"]
    write_json(out, results)
    log(f"gpu check on {results['environment']['device']}: torch {results['environment']['torch']}, "
        f"transformers {results['environment']['transformers']}; results in {out}")
    total = len(args.dtypes) * (1 + len(args.metrics) * len(args.patterns))

    for dtype in args.dtypes:
        plan = [("dense", None)] + [(m, p) for m in args.metrics for p in args.patterns]
        try:
            t0 = time.perf_counter()
            loaded = check.load(dtype)
            load_seconds = time.perf_counter() - t0
            log(f"{dtype}: loaded {args.model} ({loaded.source}) in {load_seconds:.1f} s")
            windows = check.calibration(loaded.tokenizer)
            warmup = check.warm_up(loaded.model, loaded.tokenizer)
            results["loads"][dtype] = {"source": loaded.source, "load_seconds": load_seconds,
                                       "warmup_seconds": warmup, "calibration_shape": list(windows.shape)}
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}"
            log(f"{dtype}: cannot load the model or the data: {message}\n{traceback.format_exc()}")
            for metric, pattern in plan:
                rows.append({"dtype": dtype, "metric": metric, "pattern": pattern, "status": "error",
                             "error": f"load: {message}"})
            if args.speed:
                results["speed"].append({"dtype": dtype, "status": "error", "error": f"load: {message}"})
            write_json(out, results)
            continue

        for metric, pattern in plan:
            row: dict[str, Any] = {"dtype": dtype, "metric": metric, "pattern": pattern}
            label = f"[{len(rows) + 1}/{total}] {dtype} {metric} {pattern or ''}".rstrip()
            model = None
            try:
                if metric == "dense":
                    model = loaded.model
                else:
                    model = copy.deepcopy(loaded.model)
                    row.update(check.prune(model, metric, pattern))
                    peak = (f"peak {row['peak_prune_mib']:.0f} MiB" if check.cuda
                            else f"peak RSS {row['peak_rss_mib']:.0f} MiB")
                    log(f"{label}: pruned to {row['sparsity']:.4f} in {row['prune_seconds']:.2f} s, "
                        f"{row['block_passes']} block passes, {peak}")
                row.update(check.evaluate(model, loaded.tokenizer))
                found = problems(row)
                row.update(status="ok" if not found else "check failed", problems=found)
                peak = f", peak {row['peak_eval_mib']:.0f} MiB" if check.cuda else ""
                log(f"{label}: ppl {row['ppl']:.3f} in {row['eval_seconds']:.2f} s{peak}"
                    + "".join(f"; FAILED: {p}" for p in found))
            except Exception as exc:
                row.update(status="error", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
                log(f"{label}: ERROR {row['error']}\n{row['traceback']}")
            finally:
                if model is not None and model is not loaded.model:
                    del model
            rows.append(row)
            write_json(out, results)
            if check.cuda:
                check.torch.cuda.empty_cache()
        if args.speed:
            results["speed"].append(speed_row(check, loaded, dtype))
            write_json(out, results)
        del loaded
        gc.collect()

    results["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_json(out, results)
    print(table(rows), flush=True)
    if results["speed"]:
        print("\n" + speed_table(results["speed"]), flush=True)
    bad = [r for r in rows if r["status"] != "ok"]
    bad_speed = [r for r in results["speed"] if r["status"] != "ok"]
    if bad:
        log(f"{len(bad)} of {len(rows)} rows failed: "
            + "; ".join(f"{r['dtype']} {r['metric']} {r['pattern'] or ''}: "
                        f"{(r.get('error') or ', '.join(r['problems'])).splitlines()[0]}" for r in bad))
    if bad_speed:
        log(f"{len(bad_speed)} speed rows failed: "
            + "; ".join(f"{r['dtype']}: {(r.get('error') or ', '.join(r['problems'])).splitlines()[0]}"
                        for r in bad_speed))
    return ExitCode.FAILED if bad or bad_speed else ExitCode.OK


def speed_row(check: Check, loaded, dtype: str) -> dict[str, Any]:
    """One speed row for a dtype; an error becomes the row's status, never the run's."""
    label = f"speed {dtype} {SPEED_PATTERN}"
    try:
        row = check.speed(loaded.model, loaded.tokenizer, dtype)
        found = speed_problems(row)
        row.update(status="ok" if not found else "check failed", problems=found)
        sc = row["scores"]
        gains = ", ".join(f"{k} {v:.2f}" for k, v in sc.items() if "speedup" in k) or f"none ({row['reason']})"
        log(f"{label}: kernel {row['kernel']} in {row['speed_seconds']:.1f} s; speedups: {gains}"
            + "".join(f"; FAILED: {p}" for p in found))
    except Exception as exc:
        row = {"dtype": dtype, "status": "error", "error": f"{type(exc).__name__}: {exc}",
               "traceback": traceback.format_exc()}
        log(f"{label}: ERROR {row['error']}\n{row['traceback']}")
    if check.cuda:
        check.torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if importlib.util.find_spec("stadebench") is None:  # a copied checkout, not installed
        sys.path.insert(0, str(REPO))
    try:
        return run(args)
    except SetupError as exc:
        log(f"error: {exc}")
        return ExitCode.NOT_STARTED


if __name__ == "__main__":
    sys.exit(main())
