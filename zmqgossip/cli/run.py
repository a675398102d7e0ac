"""`zmqgossip run`: one experiment on this machine (tasks, processes or a local roster)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from .. import config as config_mod
from .app import app, fail, out


@app.command()
def run(
    experiment: Optional[str] = typer.Argument(None, help="a preset name (see `zmqgossip presets`) or a TOML file"),
    method: Optional[str] = typer.Option(None, help="local, random, oracle, pens, dac, dac-var or dac-plus (default: the experiment's)"),
    schedule: Optional[str] = typer.Option(None, help="async or sequential (default: the experiment's)"),
    processes: Optional[int] = typer.Option(None, help="worker processes hosting the peers (default: the experiment's, else 1)"),
    set_: list[str] = typer.Option([], "--set", help="override a key, e.g. --set policy.tau=10 (repeatable)"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="run directory (default: runs/NAME-METHOD-TIME)"),
    seed: Optional[int] = typer.Option(None, help="random seed (default: the experiment's)"),
    roster: Optional[Path] = typer.Option(None, help="run every host of this roster as a local worker (loopback tcp)"),
    resume: Optional[Path] = typer.Option(None, help="finish an interrupted or crashed run from its peers' checkpoints"),
    ray: Optional[str] = typer.Option(None, "--ray", help=(
        "host the peers on a Ray cluster: auto (a running one: `ray start --head`), local (a private one "
        "on this machine) or its ADDRESS")),
    workers: Optional[int] = typer.Option(None, help="with --ray: worker actors (default: one per CPU of the cluster)"),
    advertise: Optional[str] = typer.Option(None, help=(
        "with --ray: the address every worker binds its peers at (default: its node's; per node: "
        "ZMQGOSSIP_ADVERTISE in the environment of `ray start`)")),
    curve: bool = typer.Option(False, "--curve", help="with --ray: CURVE on every link, fresh keys for this run"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress display"),
    report: bool = typer.Option(True, help="write the report plots at the end"),
) -> None:
    """Run an experiment and print its result table."""
    from ..allocator import tune_for_hosting

    tune_for_hosting()  # this process hosts peers (or starts workers that do); before torch allocates
    overrides = list(set_)
    if ray is None and (workers is not None or advertise is not None or curve):
        fail("--workers, --advertise and --curve go with --ray (a roster sets CURVE with security = \"curve\")")
    if ray is not None and (roster is not None or processes is not None):
        fail("--ray places the workers itself: leave out --roster and --processes")
    if processes is not None:
        overrides.append(f"compute.processes={processes}")
    cfg: config_mod.ExperimentConfig | None = None
    if resume is None and roster is None:
        if experiment is None:
            fail("name an EXPERIMENT (preset or TOML file) or pass --roster FILE")
        try:
            cfg = config_mod.load(experiment, overrides, method=method, schedule=schedule, seed=seed)
        except (config_mod.ConfigError, ValueError) as e:
            fail(str(e))
    if ray is None and (roster is not None or (cfg is not None and cfg.compute.processes > 1)):
        from ..warm import prestart

        prestart()  # the workers' server imports torch and the package while this process does
    # Imported here, not at the top: torch loads only when a command needs it.
    from ..data import DataError
    from ..hosting import Place, RosterHosts, build_partition, check_model, default_place, run_experiment
    from ..net import TransportError
    from ..progress import RunProgress
    from ..report import summary_table

    place: Place | None = None
    try:
        if resume is not None:
            from ..hosting import load_run_config
            from ..metrics import RunDir

            if not (resume / "config.json").is_file():
                fail(f"{resume} is not a run directory (no config.json)")
            cfg = load_run_config(RunDir(resume))
            out_dir = resume
        elif roster is not None:
            from ..roster import load_roster

            ros, cfg = load_roster(roster)
            out_dir = out_dir or Path(ros.out)
            keys = None
            if ros.security == "curve":
                from ..security import keys_folder, load_keyring

                keys = keys_folder(ros.keys, roster)
                load_keyring(keys, range(cfg.peers), range(cfg.peers), roster=str(roster))  # missing keys fail here
            place = RosterHosts([h.peers for h in ros.hosts], ros.directory(), keys)
        assert cfg is not None
        part = build_partition(cfg)
        check_model(cfg, part)  # no data folder, a bad shift or model: fails before anything starts
        if ray is not None:
            from ..hosting.cluster import RayActors, check_workers, import_ray

            import_ray()
            check_workers(workers, cfg.peers)
            place = RayActors(ray, workers, advertise=advertise, curve=curve)
    except (config_mod.ConfigError, DataError, ValueError) as e:
        fail(str(e))
    run_dir = out_dir or Path("runs") / f"{cfg.name}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    typer.echo(f"run directory: {run_dir}", err=True)
    try:
        with RunProgress(cfg.peers * cfg.rounds, quiet=quiet) as progress:
            summary = run_experiment(cfg, run_dir, place=place or default_place(cfg), on_event=progress,
                                     resume=resume is not None, part=part)
    except (DataError, TransportError, config_mod.ConfigError) as e:
        fail(str(e))
    except KeyboardInterrupt:
        typer.echo(f"interrupted: partial results in {run_dir}", err=True)
        raise typer.Exit(130)
    out.print(summary_table(summary))
    if report:
        from ..report import write_plots

        plots = write_plots(run_dir)
        typer.echo(f"plots: {run_dir / 'plots'} ({len(plots)} files)", err=True)
