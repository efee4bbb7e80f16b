"""Developer sessions: `nox -s tests`, and the first-party plugins in plugins/.

- `nox -s tests`: the core's test suite.
- `nox -s plugin`: each plugin installed from its folder (as `pip install` would, not
  editable) into a fresh venv next to the core, then its own tests;
  `nox -s "plugin(stadebench-ria)"` for one.
- `nox -s tests_with_plugins`: the core's tests with every plugin installed, so an
  installed plugin cannot break the core (its entry points load in every run).
- `nox -s bench`: the speed gate (tests/benchmarks/gate.py): the working tree's benchmarks
  against the commit in tests/benchmarks/BASELINE, interleaved on this machine; fails on
  a regression. `nox -s bench -- --base HEAD -- -k score_mask` for a quick one.
- `nox -s gpu -- --quick`: the CUDA check (tests/benchmarks/gpu.py) in the current
  environment, installing nothing (the GPU machine is offline).
- `nox -s docs`: regenerate the reference pages made from the code (docs/suites.md,
  docs/leaderboard.md); tests/test_docs.py fails when they are stale.
- `nox -s parity`: masks against the released Wanda/SparseGPT/STADE code, loaded from local
  clones named by $STADEBENCH_REFERENCE_WANDA and $STADEBENCH_REFERENCE_STADE
  (docs/parity.md); skipped without them.
"""

import os
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["tests"]

# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH = "torch==2.13.0"
PLUGINS = sorted(p.parent.name for p in Path(__file__).parent.glob("plugins/*/pyproject.toml"))


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite (benchmark bodies run once, untimed)."""
    session.install(TORCH)
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session
@nox.parametrize("name", PLUGINS, ids=PLUGINS)
def plugin(session: nox.Session, name: str) -> None:
    """One first-party plugin: the core, then the plugin from its folder, then its tests."""
    session.install(TORCH)
    session.install("-e", ".")
    session.install(f"./plugins/{name}[test]")
    session.run("stadebench", "plugins", "--format", "csv")  # loaded from its entry point, no problem
    session.chdir(f"plugins/{name}")
    session.run("pytest", *session.posargs)


@nox.session
def tests_with_plugins(session: nox.Session) -> None:
    """The core's tests with every first-party plugin installed."""
    session.install(TORCH)
    session.install("-e", ".[test]")
    session.install(*(f"./plugins/{name}" for name in PLUGINS))
    session.run("stadebench", "plugins", "--format", "csv")
    session.run("pytest", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Speed gate: working tree vs the BASELINE commit, A B B A on this machine (docs/performance.md)."""
    session.install(TORCH)
    session.install("-e", ".[test]")
    session.run("python", "tests/benchmarks/gate.py", *session.posargs)


@nox.session
def parity(session: nox.Session) -> None:
    """Reference parity (tests/reference): the released code, from local clones, against stadebench.

    The clones' paths come from $STADEBENCH_REFERENCE_WANDA, $STADEBENCH_REFERENCE_STADE,
    $STADEBENCH_REFERENCE_GBLM, $STADEBENCH_REFERENCE_PRUNER_ZERO, $STADEBENCH_REFERENCE_DSNOT
    and $STADEBENCH_REFERENCE_ADMM (the tests skip, naming the variable, when one is unset);
    nothing of theirs is installed.
    """
    session.install(TORCH)
    session.install("-e", ".[test]")
    env = {k: v for k, v in os.environ.items() if k.startswith("STADEBENCH_")}
    session.run("pytest", "tests/reference", "-q", *session.posargs, env=env)


@nox.session(venv_backend="none")
def gpu(session: nox.Session) -> None:
    """The CUDA check (tests/benchmarks/gpu.py) in the current environment, installing nothing.

    SmolLM2-135M pruned in float16 and bfloat16 by every metric: seconds, peak GPU memory
    and perplexity; options after `--`, e.g. `nox -s gpu -- --quick`. It runs the `python`
    on PATH, because it needs a CUDA build of torch (not the pinned CPU build) and the GPU
    machine has no network. The model and data come from the stadebench cache
    (`$STADEBENCH_CACHE`).
    """
    session.run("python", "tests/benchmarks/gpu.py", *session.posargs)


@nox.session(venv_backend="none")
def docs(session: nox.Session) -> None:
    """Regenerate docs/suites.md and docs/leaderboard.md from the code, in the current environment.

    The pages are generated from the suite schema's field descriptions and the leaderboard
    row's column docs (``stadebench/results/reference.py``); tests/test_docs.py fails when a
    committed page differs from what it generates.
    """
    session.run("python", "-m", "stadebench.results.reference", "--write")
