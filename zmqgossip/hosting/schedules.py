"""The schedules: how a host's peers take their updates.

``async``: every running peer goes free until its budget; scenario events at their
times; no barrier anywhere. ``sequential``: the reference code's rounds, each peer once
per round in a fresh random order, later peers seeing the models earlier ones published
in the same round; one process, reproducible bit for bit.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from ..config import ExperimentConfig
from .scenario import EventHook, Scenario, drive_timed


async def run_async(scenario: Scenario) -> None:
    """Every running peer free until its budget; scenario events at their times."""
    for p in scenario.peers.values():
        if p.state.status == "running":
            scenario.launch(p)
    t0 = next(iter(scenario.peers.values())).t0
    driver = asyncio.create_task(drive_timed(scenario.events, t0, scenario.apply), name="scenario")
    try:
        while True:
            pending = [t for t in scenario.tasks.values() if not t.done()]
            if not driver.done():
                pending.append(driver)
            if not pending:
                break
            await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for t in scenario.tasks.values():
            t.result()  # surface a peer's crash
    finally:
        driver.cancel()
        for t in scenario.tasks.values():
            t.cancel()
        await asyncio.gather(driver, *scenario.tasks.values(), return_exceptions=True)


async def run_sequential(
    cfg: ExperimentConfig, scenario: Scenario, on_event: EventHook | None, stop: asyncio.Event | None
) -> None:
    """The reference code's rounds: each peer once per round, in a fresh random order."""
    ids = sorted(scenario.peers)
    rng = np.random.default_rng([cfg.seed, 2**31 - 1])
    t0 = next(iter(scenario.peers.values())).t0
    pending = list(scenario.events)
    for r in range(cfg.rounds):
        for i in rng.permutation(ids):
            while pending and (pending[0].at_round == r if pending[0].at_round is not None
                               else time.time() >= t0 + (pending[0].at_s or 0.0)):
                await scenario.apply(pending.pop(0))
            if stop is not None and stop.is_set():
                return
            if not scenario.active(int(i)):
                continue
            ev = await scenario.peers[int(i)].step()
            if on_event:
                on_event(ev)
