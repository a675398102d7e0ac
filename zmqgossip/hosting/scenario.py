"""The experiment's scenario (kill, partition, heal, join, rejoin) applied to one
host's peers and links, at its times (async) or rounds (sequential)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping

from ..config import ExperimentConfig
from ..links import Links, ScenarioEvent
from ..metrics import Event
from ..peer import Peer

EventHook = Callable[[Event], None]


def when(e: ScenarioEvent) -> float:
    """Sort key of a scenario event: its time, or its round."""
    return e.at_s if e.at_s is not None else float(e.at_round or 0)


def late_joiners(cfg: ExperimentConfig) -> set[int]:
    """Peers whose first scenario action is ``join``: they start only then."""
    first: dict[int, str] = {}
    for e in sorted(cfg.links.scenario, key=when):
        for p in e.peers:
            first.setdefault(p, e.action)
    return {p for p, a in first.items() if a == "join"}


async def drive_timed(events: Iterable[ScenarioEvent], t0: float, apply: Callable[[ScenarioEvent], Awaitable[None]]) -> None:
    """Apply each timed event (``at_s`` seconds after wall time ``t0``) when it is due."""
    for e in sorted((e for e in events if e.at_s is not None), key=when):
        await asyncio.sleep(max(0.0, t0 + (e.at_s or 0.0) - time.time()))
        await apply(e)


class Scenario:
    """Applies the experiment's scenario to this process's peers and links."""

    def __init__(
        self, cfg: ExperimentConfig, peers: Mapping[int, Peer], links: Links | None,
        on_event: EventHook | None, stop: asyncio.Event | None,
    ) -> None:
        self.cfg = cfg
        self.peers = peers
        self.links = links
        self.on_event = on_event
        self.stop = stop
        self.events = sorted(cfg.links.scenario, key=when)
        self.tasks: dict[int, asyncio.Task] = {}
        # What was applied and when: a busy event loop applies an event late, and the
        # run's record must say when peers really died or healed, not when they were due.
        self.applied: list[dict] = []

    async def start(self, p: Peer) -> None:
        """Bind, warm up, publish: the peer is then ready to be pulled."""
        await p.transport.start()
        p.transport.status.update(ready=False, done=False)
        await p.warmup()
        p.transport.status["ready"] = True

    async def resume(self, p: Peer, *, done: bool) -> None:
        """Restore ``p`` from its checkpoint and publish; a peer that had finished only serves."""
        step = p.restore(p.checkpoint_path)
        await p.transport.start()
        await p.publish()
        if done:
            p.state.status = "done"
        else:
            p.state.status = "running"
            p.resumed_from = step
        p.transport.status.update(ready=True, done=False, step=step)

    def active(self, pid: int) -> bool:
        p = self.peers.get(pid)
        return p is not None and p.state.status == "running"

    async def apply(self, e: ScenarioEvent) -> None:
        t0 = min((p.t0 for p in self.peers.values()), default=time.time())
        self.applied.append({"action": e.action, "peers": list(e.peers), "at_s": e.at_s, "at_round": e.at_round,
                             "applied_s": time.time() - t0, "here": sorted(set(e.peers) & set(self.peers))})
        if e.action == "partition" and self.links is not None:
            self.links.partition(e.groups)
        elif e.action == "heal" and self.links is not None:
            self.links.heal()
        for pid in e.peers:
            p = self.peers.get(pid)
            if p is None:
                continue  # another host's peer: that host applies it
            if e.action == "kill" and p.state.status == "running":
                p.halt = True  # stops after the update in progress
                p.state.status = "killed"
                await p.transport.close()
            elif e.action == "rejoin" and p.state.status == "killed":
                await self._settle(pid)
                p.transport = p.transport.reopen()
                await p.transport.start()
                p.transport.status.update(ready=True, done=False, step=p.state.step)
                await p.publish()
                p.halt = False
                p.state.status = "running"
                self.launch(p)
            elif e.action == "join" and p.state.status == "new":
                await self.start(p)
                self.launch(p)

    async def _settle(self, pid: int) -> None:
        t = self.tasks.get(pid)
        if t is not None:
            await asyncio.gather(t, return_exceptions=True)

    def launch(self, p: Peer) -> None:
        """Let ``p`` run free (async schedule; the sequential one drives peers itself)."""
        if self.cfg.schedule == "async":
            self.tasks[p.id] = asyncio.create_task(p.run(self.on_event, self.stop), name=f"peer-{p.id}")
