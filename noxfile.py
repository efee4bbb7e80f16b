"""Developer sessions: `nox -s tests`."""

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["tests"]

# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH = "torch==2.13.0"


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite (benchmark bodies run once, untimed)."""
    session.install(TORCH)
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)
