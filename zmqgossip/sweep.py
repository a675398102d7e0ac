"""Sweeps: a grid of runs (methods x seeds x settings) on warm workers.

Each run of the grid is an ordinary run with its own run directory, hosted by
:func:`zmqgossip.hosting.run_experiment` exactly as ``zmqgossip run`` hosts it, so a
sequential run of a sweep is bit for bit the same run. What a sweep saves is the start
of a process for every run: ``parallel`` worker processes start once, forked warm by
:mod:`zmqgossip.warm` (torch and the package imported), and take runs one after
another. A sweep that is interrupted continues, when started again with the same
arguments, with the runs that have no summary yet.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import re
import json
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import config as config_mod
from . import warm
from .config import ConfigError
from .metrics import write_json_atomic


class SweepError(ValueError):
    """A grid that cannot be run (empty, malformed, or naming something unknown)."""


@dataclass(frozen=True)
class RunSpec:
    """One run of the grid: its directory name, the experiment (a preset or a TOML file)
    and the ``--set`` overrides that make it."""

    name: str
    overrides: tuple[str, ...]
    experiment: str

    def config(self) -> config_mod.ExperimentConfig:
        return config_mod.load(self.experiment, self.overrides)


def parse_values(text: str, what: str) -> list[str]:
    """``a,b,c`` -> its items (no empty ones)."""
    items = [x.strip() for x in text.split(",")]
    if not items or any(not x for x in items):
        raise SweepError(f"{what}: expected a comma-separated list, got {text!r}")
    return items


def parse_seeds(text: str) -> list[int]:
    """``0-4``, ``1,3,7`` or ``0-2,9`` -> the seeds, in order, each once."""
    out: list[int] = []
    for part in parse_values(text, "--seed"):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if m is None:
            raise SweepError(f"--seed: {part!r} is not a seed or a range like 0-4")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise SweepError(f"--seed: the range {part!r} is empty")
        out.extend(s for s in range(lo, hi + 1) if s not in out)
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text)


def expand(
    experiment: str, *, methods: Sequence[str] | None, seeds: Sequence[int] | None, sets: Sequence[str] = (),
    fixed: Sequence[str] = (),
) -> list[RunSpec]:
    """The grid's runs: every method x seed x combination of the ``--set key=v1,v2`` values.

    ``fixed``: overrides every run takes as they are. Every run's config is validated
    here, so a bad value fails the sweep before anything runs.
    """
    axes: list[list[tuple[str, str]]] = []
    for item in sets:
        if "=" not in item:
            raise SweepError(f"--set {item!r}: expected key=value or key=v1,v2,...")
        key, _, values = item.partition("=")
        axes.append([(key.strip(), v) for v in parse_values(values, f"--set {key.strip()}")])
    if methods is not None:
        axes.insert(0, [("method", m) for m in methods])
    if seeds is not None:
        axes.append([("seed", str(s)) for s in seeds])
    specs = []
    for combo in itertools.product(*axes):
        name = "-".join(_slug(v if k == "method" else f"seed{v}" if k == "seed" else f"{k}={v}")
                        for k, v in combo) or "run"
        specs.append(RunSpec(name, tuple(fixed) + tuple(f"{k}={v}" for k, v in combo), experiment))
    if not specs:
        raise SweepError("the grid is empty")
    check(specs)
    return specs


def check(specs: Sequence[RunSpec]) -> None:
    """Validate every run's config, so a bad value fails the sweep before anything runs."""
    if len({s.name for s in specs}) != len(specs):
        raise SweepError("the grid names a run twice (repeated values?)")
    for s in specs:
        try:
            s.config()
        except ConfigError as e:
            raise SweepError(f"run {s.name}: {e}") from None


def is_done(run_dir: Path) -> bool:
    """A run that finished: its summary exists and every peer finished, except those
    its own scenario killed on purpose."""
    try:
        from .metrics import RunDir

        summary = RunDir.reader(run_dir).summary()
        killed = {p for e in summary.get("scenario") or () if e.get("action") == "kill" for p in e.get("peers", ())}
        return not set(summary["failed_peers"]) - killed
    except (OSError, ValueError, KeyError, TypeError):
        return False


# ---------------------------------------------------------------------- warm workers


def _warm_up(threads: int) -> None:
    """A sweep worker's start (it is forked warm: torch and the package imported once)."""
    import torch

    torch.set_num_threads(threads)


@dataclass(frozen=True)
class OnRay:
    """Host each run of a sweep on a Ray cluster: ``address`` as ``zmqgossip run --ray``
    takes it, ``workers`` actors per run (default: one per CPU of the cluster)."""

    address: str
    workers: int | None = None


def run_one(experiment: str, overrides: Sequence[str], out: str, ray: OnRay | None = None) -> float:
    """One run of the grid, in a warm worker; returns the seconds it took there (config,
    data, peers, rounds, summary: everything but the worker's own start). With ``ray``
    the warm worker is the run's driver and the peers live in actors on the cluster."""
    from .hosting import run_experiment

    t = time.perf_counter()
    cfg = config_mod.load(experiment, overrides)
    path = Path(out)
    if path.exists():  # an interrupted run of an earlier sweep: it starts over
        shutil.rmtree(path)
    place = None
    if ray is not None:
        from .hosting.cluster import RayActors

        place = RayActors(ray.address, ray.workers)
    run_experiment(cfg, path, place=place)
    return time.perf_counter() - t


def run_sweep(
    specs: Sequence[RunSpec],
    out: Path,
    *,
    parallel: int = 1,
    ray: OnRay | None = None,
    on_progress: Callable[[Path], None] | None = None,
    on_run: Callable[[RunSpec, str], None] | None = None,
) -> list[Path]:
    """Run every spec not done yet under ``out``; return every run directory of the grid.

    ``out/sweep.json`` records, per finished run, the seconds it took in its worker.
    The specs may name different experiments (one grid per preset, run as one).

    ``parallel`` runs at once, each in a warm worker process that takes one run after
    another. ``ray``: each run's peers are hosted on that cluster instead (the workers
    drive the runs). ``on_progress`` is called about twice a second with each run directory
    in progress (to follow its events); ``on_run`` once per run with "done" or its error.
    """
    out.mkdir(parents=True, exist_ok=True)
    dirs = [out / s.name for s in specs]
    todo = [(s, d) for s, d in zip(specs, dirs) if not is_done(d)]
    for s, d in zip(specs, dirs):
        if on_run is not None and (s, d) not in todo:
            on_run(s, "done before")
    if not todo:
        return dirs
    errors = []
    record: dict[str, dict] = {}
    try:
        record = json.loads((out / "sweep.json").read_text())["runs"]
    except (OSError, ValueError, KeyError):
        pass
    ctx = warm.context()
    threads = todo[0][0].config().compute.threads
    with cf.ProcessPoolExecutor(max_workers=max(1, min(parallel, len(todo))), mp_context=ctx,
                                initializer=_warm_up, initargs=(threads,)) as pool:
        futures = {pool.submit(run_one, s.experiment, s.overrides, str(d), ray): (s, d) for s, d in todo}
        pending = set(futures)
        try:
            while pending:
                finished, pending = cf.wait(pending, timeout=0.5, return_when=cf.FIRST_COMPLETED)
                if on_progress is not None:
                    for f in pending:
                        on_progress(futures[f][1])
                for f in finished:
                    s, d = futures[f]
                    if on_progress is not None:
                        on_progress(d)
                    exc = f.exception()
                    if exc is not None:
                        errors.append(f"{s.name}: {exc}")
                    else:
                        record[s.name] = {"experiment": s.experiment, "overrides": list(s.overrides),
                                          "seconds": f.result(), "finished_at": time.time()}
                        write_json_atomic(out / "sweep.json", {"runs": record})
                    if on_run is not None:
                        on_run(s, "done" if exc is None else f"failed: {exc}")
        except BaseException:  # Ctrl-C reaches the workers too: their runs end with partial results
            for f in pending:
                f.cancel()
            raise
    if errors:
        raise SweepError("; ".join(errors))
    return dirs


def total_peer_rounds(specs: Iterable[RunSpec]) -> int:
    total = 0
    for s in specs:
        cfg = s.config()
        total += cfg.peers * cfg.rounds
    return total


__all__ = ["OnRay", "RunSpec", "SweepError", "check", "expand", "is_done", "parse_seeds", "parse_values", "run_sweep", "total_peer_rounds"]
