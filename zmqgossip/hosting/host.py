"""The one host loop: build this worker's peers, start them, run the schedule, finish.

The same code hosts every peer of a one-process run, a share of them in a worker
process, on one host of a roster, or in any other place a worker runs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence

import torch

from ..allocator import tune_for_hosting
from ..config import ExperimentConfig
from ..data import Partition
from ..heap import long_lived_heap
from ..links import Links
from ..metrics import RunDir, write_json_atomic
from ..security import KeyRing
from . import liveness
from .build import build_partition, build_peers
from .scenario import EventHook, Scenario, late_joiners
from .schedules import run_async, run_sequential


async def host_peers(
    cfg: ExperimentConfig,
    ids: Sequence[int],
    directory: Mapping[int, str],
    run: RunDir,
    *,
    t0: float,
    part: Partition | None = None,
    on_event: EventHook | None = None,
    stop: asyncio.Event | None = None,
    ready_timeout_s: float = 300.0,
    resume: bool = False,
    keyring: KeyRing | None = None,
) -> dict[int, dict]:
    """Run the peers ``ids`` of an experiment to completion; return their results.

    The experiment's scenario is applied here to the peers this process hosts. A
    ``keyring`` makes them CURVE peers (a roster with ``security = "curve"``). With
    ``resume``, peers restart from their checkpoints and finished peers only serve.
    """
    # When each phase ended (wall clock), for the summary's account of where a run's time goes.
    timeline: dict[str, float] = {"host": time.time()}
    tune_for_hosting()
    torch.set_num_threads(cfg.compute.threads)
    part = part if part is not None else build_partition(cfg)
    links = None if cfg.links.is_ideal else Links(cfg.links, cfg.peers, cfg.seed)
    hosted = build_peers(cfg, part, ids, directory, run, t0, links=links, keyring=keyring)
    timeline["built"] = time.time()
    peers = hosted.peers
    late = late_joiners(cfg)
    remote = [p for p in directory if p not in peers and p not in late]
    scenario = Scenario(cfg, peers, links, on_event, stop)
    results: dict[int, dict] = {}
    prior = run.results() if resume else {}
    # The heap built so far (data, models, sockets) lives until the end: the collector
    # leaves it alone meanwhile (heap.py). Entered before the warm-up, so the first
    # collection's pause ages no published model.
    with long_lived_heap():
        try:
            for p in peers.values():
                if resume and p.checkpoint_path.exists():
                    await scenario.resume(p, done=prior.get(p.id, {}).get("status") == "done")
                    if p.state.status == "done":
                        results[p.id] = prior[p.id]  # serves its final model; its result stands
                elif p.id not in late:
                    await scenario.start(p)
            timeline["warmed_up"] = time.time()
            probe = next(iter(peers.values())).transport
            await liveness.wait_for(probe, remote, "ready", liveness.at_start(ready_timeout_s), deadline_s=ready_timeout_s)
            timeline["all_ready"] = time.time()
            if not resume:
                # Round 0 starts when every peer is up: a `seconds` budget, scenario times
                # and event times count from here, not from the launch (spawning workers
                # and warming up take seconds that are no part of the experiment).
                start = time.time()
                for p in peers.values():
                    p.t0 = start

            if cfg.schedule == "sequential":
                await run_sequential(cfg, scenario, on_event, stop)
            else:
                await run_async(scenario)
            timeline["rounds_done"] = time.time()
            for p in peers.values():
                if p.state.status in ("running", "killed"):
                    results[p.id] = await p.finish()
            timeline["evaluated"] = time.time()
            await liveness.part(probe, remote, [p.transport for p in peers.values()], timeout_s=cfg.network.timeout_s)
            timeline["parted"] = time.time()
        finally:
            for p in peers.values():
                if p.id not in results:
                    if p.state.status in ("new", "running"):
                        p.state.status = "interrupted"
                    run.write_result(p.id, p.result())
            if links is not None:
                write_json_atomic(run.root / f"links-{min(ids)}.json", links.stats.as_dict())
            if scenario.applied:
                write_json_atomic(run.root / f"scenario-{min(ids)}.json", scenario.applied)
            await hosted.close()
            run.close()  # the event files it kept open
            timeline["closed"] = time.time()
            write_json_atomic(run.root / f"timeline-{min(ids)}.json", timeline)
    return results
