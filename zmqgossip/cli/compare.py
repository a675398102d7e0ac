"""`zmqgossip compare`: several runs in the paper's table layout."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .app import app, fail, out


@app.command()
def compare(
    run_dirs: list[Path] = typer.Argument(..., help="run directories to put side by side"),
    markdown: bool = typer.Option(False, "--markdown", help="print a Markdown table (for docs)"),
    plot: Optional[Path] = typer.Option(None, help="also write accuracy over time of all runs to this PNG"),
) -> None:
    """One table across runs: rows = methods, columns = clusters (the paper's layout)."""
    from ..report import compare_markdown, compare_table, plot_compare

    for d in run_dirs:
        if not (d / "summary.json").is_file():
            fail(f"{d} has no summary.json")
    if markdown:
        typer.echo(compare_markdown(run_dirs))
    else:
        out.print(compare_table(run_dirs))
    if plot is not None:
        plot_compare(run_dirs, plot)
        typer.echo(str(plot), err=True)
