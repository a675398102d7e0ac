"""A run from start to summary: the run directory, a place for the workers, the summary."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..config import ConfigError, ExperimentConfig
from ..data import Partition
from ..metrics import RunDir, summarize
from .build import build_partition, model_name
from .places import Place, default_place
from .scenario import EventHook


def prepare_run(cfg: ExperimentConfig, out: Path, part: Partition) -> RunDir:
    """A fresh run directory; one that already holds a run is refused (mixing two runs'
    events would corrupt both summaries), except through ``--resume``."""
    if (out / "events").is_dir() and any((out / "events").iterdir()):
        raise ConfigError(f"{out} already holds a run: choose another --out, delete it, or finish it with --resume")
    run = RunDir(out)
    run.write_config({**cfg.model_dump(), "model": model_name(cfg, part), "t0": time.time()})
    run.write_clusters(part.clusters, part.cluster_names)
    return run


def load_run_config(run: RunDir) -> ExperimentConfig:
    """The experiment a run directory was started with (for --resume)."""
    raw = {k: v for k, v in run.config().items() if k not in ("environment", "model", "t0")}
    return ExperimentConfig.model_validate(raw)


def run_experiment(
    cfg: ExperimentConfig,
    out: str | Path,
    *,
    place: Place | None = None,
    on_event: EventHook | None = None,
    resume: bool = False,
    part: Partition | None = None,
) -> dict[str, Any]:
    """Run a whole experiment; return its summary.

    ``place``: where the workers run (default: this process, or ``compute.processes``
    worker processes). With ``resume``, ``out`` is an earlier run's directory: peers
    restart from their checkpoints, finished peers only serve, and the run completes.
    A partial run (Ctrl-C, a failing peer) is summarised too. ``part``: the experiment's
    partition, when the caller built it already.
    """
    part = part if part is not None else build_partition(cfg)  # validates the data before any worker starts
    run = RunDir(Path(out)) if resume else prepare_run(cfg, Path(out), part)
    place = place or default_place(cfg)
    start, started = time.perf_counter(), time.time()
    extra: dict[str, Any] | None = None
    try:
        extra = place.host(cfg, run, part=part, on_event=on_event, resume=resume)
    finally:
        if extra is None:  # hosting ended early (Ctrl-C, an error): what the place knows
            extra = place.describe(cfg)
        summary = summarize(run, wall_s=time.perf_counter() - start, started=started, extra=extra)
    return summary
