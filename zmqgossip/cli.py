"""The command line: ``zmqgossip run | presets | report | compare``."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from . import config as config_mod
from .data import DataError
from .transport import TransportError

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


@app.command()
def run(
    experiment: Optional[str] = typer.Argument(None, help="a preset name (see `zmqgossip presets`) or a TOML file"),
    method: Optional[str] = typer.Option(None, help="local, random, oracle, pens, dac or dac-var [default: the experiment's]"),
    schedule: Optional[str] = typer.Option(None, help="async or sequential [default: the experiment's]"),
    processes: Optional[int] = typer.Option(None, help="worker processes hosting the peers [default: the experiment's, else 1]"),
    set_: list[str] = typer.Option([], "--set", help="override a key, e.g. --set policy.tau=10 (repeatable)"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="run directory [default: runs/NAME-METHOD-TIME]"),
    seed: Optional[int] = typer.Option(None, help="random seed [default: the experiment's]"),
    roster: Optional[Path] = typer.Option(None, help="run every host of this roster as a local worker (loopback tcp)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress display"),
    report: bool = typer.Option(True, help="write the report plots at the end"),
) -> None:
    """Run an experiment and print its result table."""
    from .procs import run_processes
    from .progress import RunProgress
    from .report import summary_table
    from .runner import build_partition, run_local

    overrides = list(set_)
    if processes is not None:
        overrides.append(f"compute.processes={processes}")
    shares = directory = None
    try:
        if roster is not None:
            from .roster import load_roster

            ros, cfg = load_roster(roster)
            shares = [h.peers for h in ros.hosts]
            directory = ros.directory()
            out_dir = out_dir or Path(ros.out)
        elif experiment is None:
            fail("name an EXPERIMENT (preset or TOML file) or pass --roster FILE")
        else:
            cfg = config_mod.load(experiment, overrides, method=method, schedule=schedule, seed=seed)
        build_partition(cfg)  # a missing data folder or a bad shift fails here, before anything starts
    except (config_mod.ConfigError, DataError, ValueError) as e:
        fail(str(e))
    run_dir = out_dir or Path("runs") / f"{cfg.name}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    typer.echo(f"run directory: {run_dir}", err=True)
    try:
        with RunProgress(cfg.peers * cfg.rounds, quiet=quiet) as progress:
            if shares is not None or cfg.compute.processes > 1:
                summary = run_processes(cfg, run_dir, on_event=progress, shares=shares, directory=directory)
            else:
                summary = run_local(cfg, run_dir, on_event=progress)
    except (DataError, TransportError, config_mod.ConfigError) as e:
        fail(str(e))
    except KeyboardInterrupt:
        typer.echo(f"interrupted: partial results in {run_dir}", err=True)
        raise typer.Exit(130)
    out.print(summary_table(summary))
    if report:
        from .report import write_plots

        plots = write_plots(run_dir)
        typer.echo(f"plots: {run_dir / 'plots'} ({len(plots)} files)", err=True)


@app.command()
def worker(
    roster: Path = typer.Option(..., help="the roster TOML shared by all hosts"),
    host: str = typer.Option(..., help="which host of the roster this is"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="run directory [default: the roster's out]"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress display"),
) -> None:
    """Run this host's peers of a roster (start one worker on every host)."""
    import asyncio

    from .metrics import RunDir, summarize
    from .progress import RunProgress
    from .report import summary_table
    from .roster import load_roster
    from .runner import build_partition, host_peers, prepare_run

    try:
        ros, cfg = load_roster(roster)
        h = ros.host(host)
        part = build_partition(cfg)
    except (config_mod.ConfigError, DataError, ValueError) as e:
        fail(str(e))
    run_dir = out_dir or Path(ros.out)
    run = RunDir(run_dir) if (run_dir / "config.json").is_file() else prepare_run(cfg, run_dir, part)
    typer.echo(f"host {h.name}: peers {h.peers[0]}..{h.peers[-1]} -> {run_dir}", err=True)
    start = time.perf_counter()
    try:
        with RunProgress(len(h.peers) * cfg.rounds, quiet=quiet) as progress:
            asyncio.run(host_peers(cfg, h.peers, ros.directory(), run, t0=run.config()["t0"], part=part, on_event=progress))
    except TransportError as e:
        fail(str(e))
    except KeyboardInterrupt:
        typer.echo(f"interrupted: partial results in {run_dir}", err=True)
        raise typer.Exit(130)
    if len(run.results()) == cfg.peers:  # the last host to finish (shared folder) summarises
        out.print(summary_table(summarize(run, wall_s=time.perf_counter() - start)))
    else:
        typer.echo(f"host {h.name} done; gather every host's {run_dir} and run `zmqgossip report` on it", err=True)


@app.command()
def presets() -> None:
    """List the presets: name, what it runs, roughly how long it takes here."""
    for name, path in config_mod.list_presets().items():
        try:
            raw, _ = config_mod.load_raw(str(path))
            desc = raw.get("description", "")
        except config_mod.ConfigError as e:
            desc = f"(invalid: {e})"
        typer.echo(f"{name:<30} {desc}")


@app.command("report")
def report_cmd(
    run_dir: Path = typer.Argument(..., help="a run directory written by `zmqgossip run`"),
    plots: bool = typer.Option(True, help="write PNG plots into RUN_DIR/plots"),
) -> None:
    """Print a run's result table and write its plots."""
    from .metrics import RunDir, summarize
    from .report import summary_table, write_plots

    if not (run_dir / "config.json").is_file():
        fail(f"{run_dir} is not a run directory (no config.json)")
    rd = RunDir(run_dir)
    summary = rd.summary() if (run_dir / "summary.json").is_file() else summarize(rd)
    out.print(summary_table(summary))
    if plots:
        for p in write_plots(run_dir):
            typer.echo(str(p))


@app.command()
def compare(
    run_dirs: list[Path] = typer.Argument(..., help="run directories to put side by side"),
    markdown: bool = typer.Option(False, "--markdown", help="print a Markdown table (for docs)"),
    plot: Optional[Path] = typer.Option(None, help="also write accuracy over time of all runs to this PNG"),
) -> None:
    """One table across runs: rows = methods, columns = clusters (the paper's layout)."""
    from .report import compare_markdown, compare_table, plot_compare

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


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
