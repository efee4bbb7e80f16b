"""What every command shares: consoles, exit codes, error handling, output formats."""

from __future__ import annotations

import enum
import functools
import os
import sys
import traceback
from typing import Annotated

import typer
from rich.console import Console

from ..errors import ConfigError, StadebenchError

#: Results go to stdout; progress, warnings and errors to stderr.
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


class ExitCode(enum.IntEnum):
    """Exit status of every command."""

    OK = 0  #: everything ran
    CELLS_FAILED = 1  #: the run finished, but some cells failed (recorded as failed)
    USAGE = 2  #: bad suite, option or name: nothing ran
    ERROR = 3  #: an unexpected error (set STADEBENCH_DEBUG=1 for the traceback)
    INTERRUPTED = 130  #: stopped with Ctrl-C; finished cells are saved


class Format(str, enum.Enum):
    table = "table"
    json = "json"
    csv = "csv"
    markdown = "markdown"


FormatOption = Annotated[Format, typer.Option("--format", "-f", help="Output format.")]


def fail(message: str, code: ExitCode = ExitCode.USAGE) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False, markup=True)
    return typer.Exit(int(code))


def handle_errors(func):
    """Known errors become one paragraph and an exit code; tracebacks only when debugging."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except typer.Exit:
            raise
        except (ConfigError, StadebenchError) as exc:
            if os.environ.get("STADEBENCH_DEBUG"):
                traceback.print_exc()
            code = ExitCode.USAGE if isinstance(exc, ConfigError) else ExitCode.ERROR
            raise fail(_escape(str(exc)), code) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(int(ExitCode.INTERRUPTED)) from None
        except Exception as exc:
            if os.environ.get("STADEBENCH_DEBUG"):
                traceback.print_exc()
            raise fail(f"{type(exc).__name__}: {_escape(str(exc))} (set STADEBENCH_DEBUG=1 for the traceback)",
                       ExitCode.ERROR) from None

    return wrapper


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def progress_enabled() -> bool:
    return err.is_terminal and not os.environ.get("CI")


def write_rows(rows: list[dict], fmt: Format) -> None:
    """Print plain rows as JSON, CSV or Markdown on stdout."""
    import csv
    import json

    if fmt is Format.json:
        sys.stdout.write(json.dumps(rows, indent=2, default=str) + "\n")
        return
    columns = list(rows[0]) if rows else []
    if fmt is Format.csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        return
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join("" if r[c] is None else str(r[c]) for c in columns) + " |" for r in rows]
    sys.stdout.write("\n".join(lines) + "\n")
