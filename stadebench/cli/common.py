"""What every command shares: consoles, exit codes, error handling, output formats."""

from __future__ import annotations

import contextlib
import enum
import errno
import functools
import logging
import os
import sys
import traceback
import warnings
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from ..errors import ConfigError, StadebenchError
from ..util import cut, visible


class PlainConsole(Console):
    """A console that reads strings as plain text: no markup, no emoji codes, control
    characters shown as escapes. Labels, paths, plugin texts and leaderboard values are
    not ours, so nothing in them may style, crash or drive the terminal; our own styling
    is built as ``rich.text.Text``."""

    def __init__(self, **kwargs):
        super().__init__(soft_wrap=True, markup=False, emoji=False, highlight=False, **kwargs)

    def render_str(self, text: str, **kwargs) -> Text:
        return super().render_str(visible(text), **kwargs)


#: Results go to stdout; progress, warnings and errors to stderr.
out = PlainConsole()
err = PlainConsole(stderr=True)


def styled(*parts: str | tuple[str, str]) -> Text:
    """Plain text with styled parts, e.g. ``styled(("failed", "red"), ": ", message)``;
    every part has its control characters made visible."""
    return Text.assemble(*[(visible(p[0]), p[1]) if isinstance(p, tuple) else visible(p) for p in parts])


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` for the command line: one plain ``warning:`` line."""
    err.print(styled(("warning:", "yellow"), " ", str(message)))


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
    latex = "latex"


FormatOption = Annotated[Format, typer.Option("--format", "-f", help="Output format.")]


def fail(message: str, code: ExitCode = ExitCode.USAGE) -> typer.Exit:
    err.print(styled(("error:", "bold red"), " ", message))
    return typer.Exit(int(code))


_PATH_ERRNOS = (errno.ENAMETOOLONG, errno.ELOOP)


def handle_errors(func):
    """Known errors become one line and an exit code, warnings one line each; tracebacks
    only when debugging."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            with warnings.catch_warnings():
                warnings.showwarning = show_warning
                return func(*args, **kwargs)
        except typer.Exit:
            raise
        except (ConfigError, StadebenchError) as exc:
            if os.environ.get("STADEBENCH_DEBUG"):
                traceback.print_exc()
            code = ExitCode.USAGE if isinstance(exc, ConfigError) else ExitCode.ERROR
            raise fail(str(exc), code) from None
        except SystemExit as exc:  # our own exits are typer.Exit: this came from a plugin or a library
            raise fail(f"code outside stadebench (a plugin or a library) called sys.exit({exc.code!r}); the "
                       "command stopped (`stadebench plugins` lists what is installed)", ExitCode.ERROR) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(int(ExitCode.INTERRUPTED)) from None
        except OSError as exc:
            if os.environ.get("STADEBENCH_DEBUG"):
                traceback.print_exc()
            if exc.errno in _PATH_ERRNOS:  # a path the user gave that no file system takes
                raise fail(f"{cut(str(exc.filename or ''))}: {exc.strerror}; give a shorter path, or one without "
                           "a loop of links", ExitCode.USAGE) from None
            raise fail(f"{type(exc).__name__}: {exc} (set STADEBENCH_DEBUG=1 for the traceback)",
                       ExitCode.ERROR) from None
        except Exception as exc:
            if os.environ.get("STADEBENCH_DEBUG"):
                traceback.print_exc()
            raise fail(f"{type(exc).__name__}: {exc} (set STADEBENCH_DEBUG=1 for the traceback)",
                       ExitCode.ERROR) from None

    return wrapper


def progress_enabled() -> bool:
    return err.is_terminal and not os.environ.get("CI")


HEARTBEAT_SECONDS = 30.0


def heartbeat_seconds() -> float:
    """How often a long phase says it is still running when stderr is not a terminal:
    ``STADEBENCH_HEARTBEAT`` seconds (0 turns it off), else HEARTBEAT_SECONDS."""
    try:
        return max(0.0, float(os.environ.get("STADEBENCH_HEARTBEAT", HEARTBEAT_SECONDS)))
    except ValueError:
        return HEARTBEAT_SECONDS


#: Read by tqdm (every bar's default), datasets, huggingface_hub and transformers when they are imported.
QUIET_VARS = {"TQDM_DISABLE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
              "TRANSFORMERS_VERBOSITY": "error", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
#: Loggers of libraries that log progress (lm-eval logs every task it builds).
QUIET_LOGGERS = ("lm_eval", "datasets")


@contextlib.contextmanager
def quiet_libraries(verbose: bool = False):
    """While active, the progress bars and info logs of lm-eval, datasets, transformers
    and the Hub stay off stderr, which carries our own progress; ``verbose`` leaves them
    on. Variables the user set win; everything changed is put back afterwards."""
    if verbose:
        yield
        return
    saved_env = {var: os.environ.get(var) for var in QUIET_VARS}
    for var, value in QUIET_VARS.items():
        os.environ.setdefault(var, value)
    saved_levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    undo = _quiet_imported()
    try:
        yield
    finally:
        for restore in undo:
            restore()
        for name, level in saved_levels.items():
            logging.getLogger(name).setLevel(level)
        for var, value in saved_env.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def _quiet_imported() -> list:
    """Quiet the libraries already imported (they read QUIET_VARS only at import); returns
    the calls that undo it. A library not imported yet is not imported for this."""
    undo = []
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

        if not are_progress_bars_disabled():
            disable_progress_bars()
            undo.append(enable_progress_bars)
    if "transformers" in sys.modules:
        from transformers.utils import logging as tf_logging

        level, bars = tf_logging.get_verbosity(), tf_logging.is_progress_bar_enabled()
        tf_logging.set_verbosity_error()
        tf_logging.disable_progress_bar()
        undo += [lambda: tf_logging.set_verbosity(level)] + ([tf_logging.enable_progress_bar] if bars else [])
    if "datasets" in sys.modules:
        from datasets.utils import logging as ds_logging

        level, bars = ds_logging.get_verbosity(), ds_logging.is_progress_bar_enabled()
        ds_logging.set_verbosity_error()
        ds_logging.disable_progress_bar()
        undo += [lambda: ds_logging.set_verbosity(level)] + ([ds_logging.enable_progress_bar] if bars else [])
    return undo


def write_rows(rows: list[dict], fmt: Format) -> None:
    """Print plain rows as JSON, CSV, Markdown or a LaTeX tabular on stdout (JSON escapes
    control characters itself; the others show them as escapes)."""
    import csv
    import json

    if fmt is Format.json:
        sys.stdout.write(json.dumps(rows, indent=2, default=str) + "\n")
        return
    columns = list(rows[0]) if rows else []
    rows = [{k: visible(v) if isinstance(v, str) else v for k, v in r.items()} for r in rows]
    if fmt is Format.csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        return
    if fmt is Format.latex:
        def tex(v) -> str:
            text = "" if v is None else str(v)
            for a, b in (("\\", "\\textbackslash{}"), ("&", "\\&"), ("%", "\\%"), ("_", "\\_"), ("#", "\\#")):
                text = text.replace(a, b)
            return text

        lines = ["\\begin{tabular}{" + "l" * len(columns) + "}", "\\toprule", " & ".join(map(tex, columns)) + " \\\\",
                 "\\midrule", *(" & ".join(tex(r[c]) for c in columns) + " \\\\" for r in rows), "\\bottomrule",
                 "\\end{tabular}"]
        sys.stdout.write("\n".join(lines) + "\n")
        return
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join("" if r[c] is None else str(r[c]) for c in columns) + " |" for r in rows]
    sys.stdout.write("\n".join(lines) + "\n")
