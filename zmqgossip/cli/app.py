"""The Typer app and what every command shares."""

from __future__ import annotations

import typer
from rich.console import Console

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Emulate an asynchronous peer-to-peer network of learning clients over ZeroMQ (DAC and baselines).",
)
out = Console()


def fail(message: str) -> None:
    """One clear line (or a few, one per bad field) on stderr; exit code 2."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)
