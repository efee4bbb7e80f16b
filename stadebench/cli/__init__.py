"""The `stadebench` command line: typer commands, rich output, exit codes in ``ExitCode``."""

from __future__ import annotations

from typing import Annotated

import typer

from . import assets, board, diagnose, diff, prune, registry, report, run
from .common import ExitCode, out

app = typer.Typer(
    name="stadebench",
    help="Benchmark pruning metrics for LLMs: run suites, read the leaderboard.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from ..util import package_version
        from ..version import __version__

        out.print(f"stadebench {__version__}")
        out.print(", ".join(f"{name} {package_version(name) or 'not installed'}" for name in ("torch", "transformers")))
        raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False) -> None:
    """Options that come before any command (the app's help is ``help=`` above)."""


app.command("run")(run.run)
app.command("prune")(prune.prune)
app.command("diagnose")(diagnose.diagnose)
app.command("diff")(diff.diff)
app.command("report")(report.report)
app.command("validate")(run.validate)
app.command("schema")(run.schema)
app.command("list")(registry.list_items)
app.command("plugins")(registry.plugins_command)
app.add_typer(board.app, name="leaderboard")
app.add_typer(assets.app, name="assets")


def main() -> None:
    app()


__all__ = ["ExitCode", "app", "main"]
