"""`zmqgossip report`: a run's table and plots."""

from __future__ import annotations

from pathlib import Path

import typer

from .app import app, fail, out


@app.command("report")
def report_cmd(
    run_dir: Path = typer.Argument(..., help="a run directory written by `zmqgossip run`"),
    plots: bool = typer.Option(True, help="write PNG plots into RUN_DIR/plots"),
) -> None:
    """Print a run's result table and write its plots."""
    from ..metrics import RunDir, summarize
    from ..report import summary_table, write_plots

    if not (run_dir / "config.json").is_file():
        fail(f"{run_dir} is not a run directory (no config.json)")
    rd = RunDir(run_dir)
    summary = rd.summary() if (run_dir / "summary.json").is_file() else summarize(rd)
    out.print(summary_table(summary))
    if plots:
        for p in write_plots(run_dir):
            typer.echo(str(p))
