"""Speed regression gate: the working tree against a base commit, on this machine, now.

    python tests/benchmarks/gate.py [--base REV] [--rounds N] [--threshold X]
                                    [--rebaseline [--force]] [-- PYTEST_ARGS...]
    nox -s bench -- --base HEAD -- -k score_mask

Absolute times differ between machines and drift on one, so nothing is compared with
stored numbers. The base commit (``tests/benchmarks/BASELINE`` unless ``--base``) has its
``stadebench/`` exported to a temporary folder; the working tree's ``tests/benchmarks``
then run in separate pytest processes, alternately against the base's package
(``PYTHONPATH`` = that folder) and the working tree's, in the order A B B A (A B B A A B
B A ... for more rounds). Per benchmark and side the figure is the fastest round over
that side's processes (noise only ever adds time); the gate fails when head / base
exceeds the threshold (1.3) for any benchmark, or the phase threshold (1.5) for any
phase a benchmark times on its own (``extra_info["phase_min_s"]``): phases last tens of
milliseconds, and an unchanged tree showed up to 1.44 on them during a slow spell. Benchmarks absent or failing on the base side are
reported as new and not gated; one failing on the working tree fails the gate.

Exit status: 0 no regression, 1 regression or a failing benchmark, 2 could not compare.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BASELINE = Path(__file__).resolve().with_name("BASELINE")
BENCHMARKS = Path(__file__).resolve().parent
OUT = REPO / ".benchmarks" / "gate"

# `python -c` puts the current folder first on sys.path, where the working tree's
# stadebench/ would shadow PYTHONPATH; drop it before pytest starts.
BOOT = "import sys; del sys.path[0]; import pytest; sys.exit(pytest.console_main())"


class CannotCompare(Exception):
    """Setup failed: bad revision, wrong package imported, nothing measured."""


def git(*args: str, binary: bool = False):
    done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, check=False)
    if done.returncode:
        raise CannotCompare(f"git {' '.join(args)}: {done.stderr.decode().strip()}")
    return done.stdout if binary else done.stdout.decode().strip()


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    mine, pytest_args = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(prog="gate.py", description=__doc__.split("\n\n")[0],
                                     epilog="Arguments after `--` go to every pytest run, e.g. -- -k score_mask")
    parser.add_argument("--base", help="base revision (default: the one in tests/benchmarks/BASELINE)")
    parser.add_argument("--rounds", type=int, default=2, help="pytest processes per side (default 2)")
    parser.add_argument("--threshold", type=float, default=1.3,
                        help="fail when head / base is above this for any benchmark (default 1.3)")
    parser.add_argument("--phase-threshold", type=float, default=1.5,
                        help="the same for the phases a benchmark times on its own, which last only tens of "
                             "milliseconds and are noisier (default 1.5)")
    parser.add_argument("--threads", type=int,
                        help="torch threads in the benchmarks (default 1, or $STADEBENCH_BENCH_THREADS; 0: all cores)")
    parser.add_argument("--rebaseline", action="store_true",
                        help="when the gate passes, write `git rev-parse HEAD` into tests/benchmarks/BASELINE")
    parser.add_argument("--force", action="store_true", help="with --rebaseline: write it even if the gate fails")
    parser.add_argument("--out", type=Path,
                        help="folder for the raw JSONs and summary (default .benchmarks/gate/<time>-<base>)")
    parser.add_argument("--verbose", "-v", action="store_true", help="show each pytest run's output")
    args = parser.parse_args(mine)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.threshold <= 1 or args.phase_threshold <= 1:
        parser.error("--threshold and --phase-threshold must be above 1 (head / base)")
    return args, pytest_args


def base_revision(spec: str | None) -> tuple[str, str]:
    """(what was asked for, full commit hash)."""
    if spec is None:
        if not BASELINE.is_file():
            raise CannotCompare(f"{BASELINE.relative_to(REPO)} is missing; pass --base REV")
        spec = BASELINE.read_text().strip()
    try:
        return spec, git("rev-parse", "--verify", f"{spec}^{{commit}}")
    except CannotCompare:
        raise CannotCompare(f"base revision {spec!r} is not in this clone (a shallow checkout? "
                            "fetch more history, e.g. `git fetch --unshallow`)") from None


def export_package(commit: str, dest: Path) -> None:
    """The commit's ``stadebench/`` folder, written under ``dest``."""
    archive = git("archive", "--format=tar", commit, "stadebench", binary=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:  # Python < 3.11.4; the archive comes from our own git objects
            tar.extractall(dest)


def run_side(side: str, index: int, package_root: Path, out: Path, pytest_args: list[str],
             threads: int | None, verbose: bool) -> dict:
    """One pytest process with ``package_root`` first on the import path; its JSON (or {})."""
    json_path = out / f"{index:02d}-{side}.json"
    log_path = out / f"{index:02d}-{side}.log"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(package_root), env.get("PYTHONPATH")) if p)
    if threads is not None:
        env["STADEBENCH_BENCH_THREADS"] = str(threads)
    cmd = [sys.executable, "-c", BOOT, str(BENCHMARKS), "--benchmark-enable", f"--benchmark-json={json_path}",
           "-p", "no:cacheprovider", "--continue-on-collection-errors", "-q", *pytest_args]
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            log.write(line)
            if verbose:
                sys.stderr.write(line)
        code = proc.wait()
    data = json.loads(json_path.read_text()) if json_path.is_file() else {}
    n = len(data.get("benchmarks", []))
    print(f"  run {index} {side:4}: pytest exit {code}, {n} benchmarks, {time.perf_counter() - t0:.0f} s"
          f"  ({log_path.relative_to(REPO) if log_path.is_relative_to(REPO) else log_path})", file=sys.stderr)
    if code not in (0, 1) and not verbose:
        sys.stderr.write("".join(log_path.read_text().splitlines(keepends=True)[-15:]))
    data["_exit"] = code
    return data


def check_import(side: str, data: dict, package_root: Path) -> None:
    """Fail loudly when a side imported stadebench from somewhere other than intended."""
    file = data.get("machine_info", {}).get("stadebench", {}).get("file")
    if file is None:
        return  # no JSON at all: reported as missing benchmarks
    expected = (package_root / "stadebench").resolve()
    if Path(file).resolve().parent != expected:
        raise CannotCompare(f"the {side} run imported stadebench from {file}, not from {expected}")


def measurements(runs: list[dict]) -> tuple[dict, set[str]]:
    """Per benchmark: fastest round over the runs, fastest phases, extra_info ratios; and
    the benchmarks that failed in any run."""
    out: dict[str, dict] = {}
    failed: set[str] = set()
    for data in runs:
        failed.update(nodeid.split("::", 1)[-1] for nodeid in data.get("failed", []))
        for bench in data.get("benchmarks", []):
            row = out.setdefault(bench["name"], {"group": bench.get("group"), "min": [], "phases": {}, "ratios": {}})
            extra = bench.get("extra_info", {})
            row["min"].append(bench["stats"]["min"])
            for phase, seconds in extra.get("phase_min_s", {}).items():
                row["phases"].setdefault(phase, []).append(seconds)
            for key, value in extra.items():
                if "ratio" in key and isinstance(value, int | float):
                    row["ratios"].setdefault(key, []).append(value)
    for row in out.values():
        row["min"] = min(row["min"])
        row["phases"] = {k: min(v) for k, v in row["phases"].items()}
        row["ratios"] = {k: statistics.median(v) for k, v in row["ratios"].items()}
    return out, failed


def compare(base: dict, base_failed: set[str], head: dict, head_failed: set[str], threshold: float,
            phase_threshold: float) -> list[dict]:
    """One row per benchmark and per timed phase: times, ratio, verdict."""
    rows = []
    for name in sorted(set(base) | set(head) | head_failed, key=lambda n: (head.get(n, {}).get("group") or "", n)):
        b, h = base.get(name), head.get(name)
        if name in head_failed or h is None:
            verdict = "error" if name in head_failed else "gone"
            rows.append({"name": name, "base": b and b["min"], "head": None, "ratio": None, "verdict": verdict,
                         "ratios_base": b["ratios"] if b else {}, "ratios_head": {}})
            continue
        new = b is None or name in base_failed
        pairs = [(name, b and b["min"], h["min"])]
        pairs += [(f"{name} / {phase}", b and b["phases"].get(phase), seconds)
                  for phase, seconds in h["phases"].items()]
        for i, (label, tb, th) in enumerate(pairs):
            limit = threshold if i == 0 else phase_threshold
            if new or tb is None:
                ratio, verdict = None, "new"
            else:
                ratio = th / tb
                verdict = "SLOWER" if ratio > limit else ("faster" if ratio < 1 / limit else "ok")
            rows.append({"name": label, "base": None if new else tb, "head": th, "ratio": ratio, "verdict": verdict,
                         "ratios_base": (b["ratios"] if b and not new else {}) if i == 0 else {},
                         "ratios_head": h["ratios"] if i == 0 else {}})
    return rows


def show(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    style = {"SLOWER": "bold red", "error": "bold red", "faster": "green", "new": "yellow", "gone": "yellow"}
    table = Table(title=title, title_justify="left")
    for col in ("benchmark", "base s", "head s", "head/base", "verdict", "in-run ratios (head; base)"):
        table.add_column(col, justify="right" if col in ("base s", "head s", "head/base") else "left")
    for r in rows:
        ratios = "; ".join(f"{k} {v:.2f}" + (f" ({r['ratios_base'][k]:.2f})" if k in r["ratios_base"] else "")
                           for k, v in r["ratios_head"].items())
        table.add_row(escape(r["name"]), "-" if r["base"] is None else f"{r['base']:.4f}",
                      "-" if r["head"] is None else f"{r['head']:.4f}",
                      "-" if r["ratio"] is None else f"{r['ratio']:.2f}",
                      f"[{style.get(r['verdict'], '')}]{r['verdict']}[/]" if r["verdict"] in style else r["verdict"],
                      ratios)
    Console(width=max(160, Console().width)).print(table)


def main(argv: list[str] | None = None) -> int:
    args, pytest_args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        asked, base = base_revision(args.base)
        head = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--", "stadebench"))
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        out = (args.out or OUT / f"{stamp}-{base[:10]}").resolve()
        out.mkdir(parents=True, exist_ok=True)
        print(f"gate: working tree (HEAD {head[:10]}{' + uncommitted changes' if dirty else ''}) "
              f"vs base {asked} ({base[:10]}); {args.rounds} runs per side, threshold {args.threshold}; "
              f"pytest args {pytest_args or 'none'}; output in {out}", file=sys.stderr)
        with tempfile.TemporaryDirectory(prefix="stadebench-base-") as tmp:
            base_root = Path(tmp)
            export_package(base, base_root)
            roots = {"base": base_root, "head": REPO}
            runs: dict[str, list[dict]] = {"base": [], "head": []}
            order = [s for r in range(args.rounds) for s in (("base", "head") if r % 2 == 0 else ("head", "base"))]
            for index, side in enumerate(order, 1):
                data = run_side(side, index, roots[side], out, pytest_args, args.threads, args.verbose)
                check_import(side, data, roots[side])
                runs[side].append(data)
        if not any(d.get("benchmarks") for d in runs["head"]):
            raise CannotCompare(f"the working tree's runs measured nothing; see the logs in {out}")
        if not any(d.get("benchmarks") for d in runs["base"]):
            print(f"gate: the base runs measured nothing (see the logs in {out}): every benchmark counts as new",
                  file=sys.stderr)
    except CannotCompare as exc:
        print(f"gate: cannot compare: {exc}", file=sys.stderr)
        return 2

    base_m, base_failed = measurements(runs["base"])
    head_m, head_failed = measurements(runs["head"])
    rows = compare(base_m, base_failed, head_m, head_failed, args.threshold, args.phase_threshold)
    bad = [r["name"] for r in rows if r["verdict"] in ("SLOWER", "error")]
    show(rows, f"working tree vs {asked} ({base[:10]}): fastest round of {args.rounds} runs per side")

    summary = {
        "base": {"asked": asked, "commit": base}, "head": {"commit": head, "uncommitted_changes": dirty},
        "threshold": args.threshold, "phase_threshold": args.phase_threshold, "rounds": args.rounds, "order": order, "pytest_args": pytest_args,
        "machine_info": next((d["machine_info"] for d in runs["head"] if "machine_info" in d), {}),
        "imported_from": {s: [d.get("machine_info", {}).get("stadebench", {}).get("file") for d in runs[s]]
                          for s in runs},
        "pytest_exit": {s: [d["_exit"] for d in runs[s]] for s in runs},
        "rows": rows, "failed": bad, "passed": not bad,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if bad:
        print(f"gate: FAILED: {len(bad)} slower than {args.threshold}x the base ({args.phase_threshold}x for a "
              f"phase) or failing: {', '.join(bad)}",
              file=sys.stderr)
    else:
        print(f"gate: passed (no benchmark slower than {args.threshold}x the base, no phase slower than "
              f"{args.phase_threshold}x)", file=sys.stderr)

    if args.rebaseline:
        if bad and not args.force:
            print("gate: BASELINE left unchanged (the gate failed; --force to write it anyway)", file=sys.stderr)
        else:
            BASELINE.write_text(head + "\n")
            note = " (the working tree has uncommitted changes under stadebench/: what was measured is not HEAD)"
            print(f"gate: BASELINE is now {head}{note if dirty else ''}; commit it with a message that says why "
                  "this speed is the new reference", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
