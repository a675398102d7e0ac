"""`zmqgossip worker`: this host's peers of a roster."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from .. import config as config_mod
from .app import app, fail, out


@app.command()
def worker(
    roster: Path = typer.Option(..., help="the roster TOML shared by all hosts"),
    host: str = typer.Option(..., help="which host of the roster this is"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="run directory (default: the roster's out)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress display"),
) -> None:
    """Run this host's peers of a roster (start one worker on every host)."""
    import asyncio

    from ..allocator import tune_for_hosting

    tune_for_hosting()  # this process hosts peers (or starts workers that do); before torch allocates
    # Imported here, not at the top: torch loads only when a command needs it.
    from ..data import DataError
    from ..metrics import RunDir, summarize
    from ..progress import RunProgress
    from ..report import summary_table
    from ..roster import load_roster
    from ..hosting import build_partition, check_model, host_peers, prepare_run
    from ..security import keys_folder, load_keyring
    from ..net import TransportError

    keyring = None
    try:
        ros, cfg = load_roster(roster)
        h = ros.host(host)
        if ros.security == "curve":  # every roster peer's public key, this host's secret keys
            keyring = load_keyring(keys_folder(ros.keys, roster), range(cfg.peers), h.peers, roster=str(roster))
        part = build_partition(cfg)
        check_model(cfg, part)
    except (config_mod.ConfigError, DataError, ValueError) as e:
        fail(str(e))
    run_dir = out_dir or Path(ros.out)
    run = RunDir(run_dir) if (run_dir / "config.json").is_file() else prepare_run(cfg, run_dir, part)
    typer.echo(f"host {h.name}: peers {h.peers[0]}..{h.peers[-1]} -> {run_dir}", err=True)
    start = time.perf_counter()
    try:
        with RunProgress(len(h.peers) * cfg.rounds, quiet=quiet) as progress:
            asyncio.run(host_peers(cfg, h.peers, ros.directory(), run, t0=run.config()["t0"], part=part, on_event=progress,
                                   keyring=keyring))
    except TransportError as e:
        fail(str(e))
    except KeyboardInterrupt:
        typer.echo(f"interrupted: partial results in {run_dir}", err=True)
        raise typer.Exit(130)
    if len(run.results()) == cfg.peers:  # the last host to finish (shared folder) summarises
        out.print(summary_table(summarize(run, wall_s=time.perf_counter() - start)))
    else:
        typer.echo(f"host {h.name} done; gather every host's {run_dir} and run `zmqgossip report` on it", err=True)
