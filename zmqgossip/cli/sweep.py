"""`zmqgossip sweep`: a grid of runs on warm workers, ending with the compare table."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from .app import app, fail, out


@app.command()
def sweep(
    experiment: str = typer.Argument(..., help="a preset name (see `zmqgossip presets`) or a TOML file"),
    method: Optional[str] = typer.Option(None, help="methods, comma-separated, e.g. dac-var,random,oracle"),
    seed: Optional[str] = typer.Option(None, help="seeds: 0-4, 1,3,7 or 0-2,9"),
    set_: list[str] = typer.Option([], "--set", help="a key and its values, e.g. --set policy.tau=10,30 (repeatable)"),
    fixed: list[str] = typer.Option([], "--fix", help="a key every run takes as is, e.g. --fix rounds=10 (repeatable)"),
    parallel: int = typer.Option(1, min=1, help="runs at once (one warm worker process each)"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="sweep directory (default: runs/sweep-EXPERIMENT-TIME)"),
    ray: Optional[str] = typer.Option(None, "--ray", help=(
        "host every run's peers on a Ray cluster: auto (a running one), local (a private one per run) or its ADDRESS")),
    workers: Optional[int] = typer.Option(None, help="with --ray: worker actors per run (default: one per CPU of the cluster)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress display"),
) -> None:
    """Run every combination of methods, seeds and settings; print the compare table.

    Started again with the same arguments and --out, a sweep runs only what is missing.
    """
    from .. import sweep as sweep_mod
    from ..metrics import EventTail, RunDir
    from ..progress import RunProgress
    from ..report import compare_markdown, compare_table, plot_compare

    if ray is None and workers is not None:
        fail("--workers goes with --ray")
    try:
        methods = sweep_mod.parse_values(method, "--method") if method is not None else None
        seeds = sweep_mod.parse_seeds(seed) if seed is not None else None
        specs = sweep_mod.expand(experiment, methods=methods, seeds=seeds, sets=set_, fixed=fixed)
        total = sweep_mod.total_peer_rounds(specs)
        on_ray = None
        if ray is not None:
            from ..hosting.cluster import check_workers, import_ray

            import_ray()
            for spec in specs:
                check_workers(workers, spec.config().peers)
            on_ray = sweep_mod.OnRay(ray, workers)
    except (sweep_mod.SweepError, ValueError) as e:
        fail(str(e))
    root = out_dir or Path("runs") / f"sweep-{Path(experiment).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    typer.echo(f"sweep directory: {root} ({len(specs)} runs, {parallel} at once)", err=True)
    tails: dict[Path, EventTail] = {}

    with RunProgress(total, quiet=quiet) as progress:

        def follow(d: Path) -> None:
            if d not in tails:
                if not (d / "clusters.json").is_file():
                    return
                tails[d] = EventTail(RunDir.reader(d), RunDir.reader(d).peer_ids())
            tails[d].poll(progress)

        def ran(spec: "sweep_mod.RunSpec", how: str) -> None:
            if how == "done before":
                cfg_total = sweep_mod.total_peer_rounds([spec])
                progress.done += cfg_total
            elif not quiet:
                typer.echo(f"  {spec.name}: {how}", err=True)

        try:
            dirs = sweep_mod.run_sweep(specs, root, parallel=parallel, ray=on_ray, on_progress=follow, on_run=ran)
        except sweep_mod.SweepError as e:
            fail(str(e))
        except KeyboardInterrupt:
            typer.echo(f"interrupted: start the same command again to run what is missing in {root}", err=True)
            raise typer.Exit(130)
    out.print(compare_table(dirs))
    (root / "compare.md").write_text(compare_markdown(dirs) + "\n")
    plot_compare(dirs, root / "compare.png")
    typer.echo(f"compare: {root / 'compare.md'}, {root / 'compare.png'}", err=True)
