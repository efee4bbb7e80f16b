"""The `stadebench` command line: typer commands, rich output, exit codes in ``ExitCode``."""

from __future__ import annotations

import typer

from . import assets, board, diagnose, prune, registry, run
from .common import ExitCode

app = typer.Typer(
    name="stadebench",
    help="Benchmark pruning metrics for LLMs: run suites, read the leaderboard.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.command("run")(run.run)
app.command("prune")(prune.prune)
app.command("diagnose")(diagnose.diagnose)
app.command("validate")(run.validate)
app.command("schema")(run.schema)
app.command("list")(registry.list_items)
app.command("plugins")(registry.plugins_command)
app.add_typer(board.app, name="leaderboard")
app.add_typer(assets.app, name="assets")


def main() -> None:
    app()


__all__ = ["ExitCode", "app", "main"]
