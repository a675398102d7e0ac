"""Host peers: as asyncio tasks in one process, or a share of them per worker process.

:func:`host_peers` is the one place peers are built and driven; the in-process run, each
worker process and each host of a roster call it with the ids they own and the directory
of every peer's endpoint.  Everything a peer needs is derived from the config and the
seed, so every worker builds the same partition without anything being shipped to it.

Start and end need no server either: a peer's transport answers pings with its status
(``ready`` after warm-up, ``done`` at the end), and each host waits until every other
peer is ready before round 0, and until every other peer is done (or unreachable)
before it closes its sockets, so no peer pulls from one that has already left.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zmq
import zmq.asyncio

from . import models
from .allocator import tune_for_hosting
from .compute import ComputeThread
from .config import ConfigError, ExperimentConfig
from .data import LabelPermutation, LabelShift, Partition, Rotation, load_dataset
from .heap import long_lived_heap
from .links import Links, ScenarioEvent
from .metrics import RunDir, summarize, write_json_atomic
from .peer import Peer, PeerSettings
from .policies import make_policy
from .security import KeyRing, stop_gatekeeper
from .transport import Transport, TransportConfig, make_directory, preflight
from .turns import Turns
from .wire import Kind, Limits, schema_of

EventHook = Callable[[dict[str, Any]], None]

#: Seconds a remote peer may have no connection at all before a waiting host gives it up
#: (its process is gone): enough to ride out a reconnect.
GONE_WHEN_CUT_S = 2.0

def make_shift(cfg: ExperimentConfig, num_classes: int) -> LabelShift | LabelPermutation | Rotation:
    """The partitioner a config describes (paper defaults where fractions are omitted)."""
    d = cfg.data
    if d.shift == "label":
        fr = d.fractions or ([0.4, 0.6] if len(d.groups) == 2 else [1.0 / len(d.groups)] * len(d.groups))
        return LabelShift(d.groups, fr)
    if d.shift == "label-random":
        fr = d.fractions or [1.0 / d.clusters] * d.clusters
        return LabelShift.random_groups(len(fr), d.classes_per_cluster, num_classes, fractions=fr, seed=cfg.seed)
    if d.shift == "label-permutation":
        fr = d.fractions or [1.0 / d.clusters] * d.clusters
        return LabelPermutation(fr, seed=cfg.seed, allow_overlap=d.allow_overlap)
    fr = d.fractions or ([0.7, 0.2, 0.05, 0.05] if len(d.angles) == 4 else [1.0 / len(d.angles)] * len(d.angles))
    return Rotation(d.angles, fr, allow_overlap=d.allow_overlap)


def build_partition(cfg: ExperimentConfig) -> Partition:
    """Load the data and split it over the peers; deterministic in ``cfg.seed``."""
    d = cfg.data
    data = load_dataset(d.dataset, d.root, test_per_class=d.test_per_class, seed=cfg.seed)
    return make_shift(cfg, data.num_classes).split(data, cfg.peers, d.n_train, d.n_val, seed=cfg.seed)


def model_name(cfg: ExperimentConfig, part: Partition) -> str:
    return models.default_model_for(part.input_shape) if cfg.train.model == "auto" else cfg.train.model


def check_model(cfg: ExperimentConfig, part: Partition) -> None:
    """Raise ValueError (with the reason) if the configured model cannot take this data."""
    models.build_model(model_name(cfg, part), part.input_shape, part.num_classes)


def peer_settings(cfg: ExperimentConfig, pid: int) -> PeerSettings:
    t = cfg.train
    return PeerSettings(
        epochs=t.epochs, batch_size=t.batch_size, lr=t.lr, warmup=t.warmup, test_every=t.test_every,
        pull_timeout_s=cfg.network.timeout_s,
        speed=cfg.compute.slow_factor if pid in cfg.compute.slow_peers else 1.0,
        rounds=cfg.rounds, seconds=cfg.seconds if cfg.schedule == "async" else None,
        checkpoint_every=t.checkpoint_every, checkpoint_min_s=t.checkpoint_min_s, max_sample_ratio=cfg.policy.max_sample_ratio,
    )


def transport_config(cfg: ExperimentConfig) -> TransportConfig:
    n = cfg.network
    return TransportConfig(pool_size=n.pool_size, timeout_s=n.timeout_s, hwm=n.hwm, limits=Limits(max_abs=n.max_abs))


@dataclass
class Hosted:
    """The peers one process hosts, and what they share."""

    peers: dict[int, Peer]
    ctx: zmq.asyncio.Context
    compute: ComputeThread

    async def close(self) -> None:
        await asyncio.gather(*(p.transport.close() for p in self.peers.values()), return_exceptions=True)
        self.compute.shutdown()
        stop_gatekeeper(self.ctx)  # its ZAP socket would keep term() waiting
        self.ctx.term()


def build_peers(
    cfg: ExperimentConfig,
    part: Partition,
    ids: Sequence[int],
    directory: Mapping[int, str],
    run: RunDir,
    t0: float,
    *,
    links: Links | None = None,
    keyring: KeyRing | None = None,
) -> Hosted:
    """Models, policies and transports for the peers ``ids`` (sockets not yet bound).

    With a ``keyring`` (roster ``security = "curve"``) every transport is a CURVE peer.
    """
    ctx = zmq.asyncio.Context()
    preflight(ctx, len(ids), cfg.network.pool_size, cfg.network.transport, secure=keyring is not None)
    compute = ComputeThread("compute")
    turns = Turns(cfg.compute.pull_ahead, cfg.compute.pull_hold_s)  # one computes, pull_ahead pull meanwhile
    name = model_name(cfg, part)
    clusters = {i: c for i, c in enumerate(part.clusters)}
    all_ids = list(range(cfg.peers))
    peers: dict[int, Peer] = {}
    schema = None
    tcfg = transport_config(cfg)
    serving: set[str] = set()  # inproc endpoints bound now (in this context, so in this process)
    for pid in ids:
        torch.manual_seed(cfg.seed if cfg.train.same_init else cfg.seed * 100_003 + pid)
        model = models.build_model(name, part.input_shape, part.num_classes)
        scratch = models.build_model(name, part.input_shape, part.num_classes)
        schema = schema or schema_of(model.state_dict())
        policy = make_policy(
            cfg.method, pid, all_ids, n=cfg.policy.n, rng=np.random.default_rng([cfg.seed, pid]),
            clusters=clusters, tau=cfg.policy.tau, similarity_weighted=cfg.policy.similarity_weighted,
            pens_sampled=cfg.policy.pens_sampled, pens_phase1_rounds=cfg.policy.pens_phase1_rounds,
        )
        transport = Transport(ctx, pid, directory, config=tcfg, expect=schema, links=links,
                              security=keyring.for_peer(pid) if keyring is not None else None, serving=serving)
        peers[pid] = Peer(
            pid, part.clients[pid], model, scratch, policy, transport, peer_settings(cfg, pid), run, compute,
            seed=cfg.seed * 1_000_003 + pid, t0=t0, turns=turns,
        )
    return Hosted(peers, ctx, compute)


async def _wait_remote(
    probe: Transport, remote: Sequence[int], key: str, deadline: float, gone_after: float,
    gone_when_unreachable: float | None = None, cut_only_after_answer: bool = False,
) -> list[int]:
    """Ping remote peers until each reports ``key`` (or stays silent ``gone_after`` s).

    ``gone_when_unreachable``: give a peer up sooner, after that many seconds in which its
    pings found no connection at all (its process is gone) rather than no answer (a peer
    too busy to answer in time). ``cut_only_after_answer``: apply that rule only to a peer
    that answered a ping of this wait before (at start-up a peer nobody can reach may not
    be up yet; one that answered and then lost every connection has died). Returns the
    peers given up on.  A peer's status travels in its PONG.
    """
    pending = set(remote)
    silent_since: dict[int, float] = {}
    cut_since: dict[int, float] = {}
    answered: set[int] = set()
    gone: list[int] = []
    while pending and time.time() < deadline:
        batch = sorted(pending)[: probe.config.pool_size]
        replies = await asyncio.gather(*(probe.pull(p, 1.0, kind=Kind.PING) for p in batch))
        now = time.time()
        for p, r in zip(batch, replies):
            st = r.message.meta if r.ok and r.message is not None else None
            if st is not None and st.get(key):
                pending.discard(p)
                silent_since.pop(p, None)
            elif st is None:
                since = silent_since.setdefault(p, now)
                if r.reason == "unreachable" and (p in answered or not cut_only_after_answer):
                    cut_since.setdefault(p, now)
                else:  # late, timed out, or not reached yet at start-up: not known to be gone
                    cut_since.pop(p, None)
                cut = cut_since.get(p)
                if now - since >= gone_after or (
                    gone_when_unreachable is not None and cut is not None and now - cut >= gone_when_unreachable
                ):
                    pending.discard(p)
                    gone.append(p)
            else:
                answered.add(p)
                silent_since.pop(p, None)
                cut_since.pop(p, None)
        if pending:
            await asyncio.sleep(0.1)
    gone.extend(sorted(pending))
    return gone


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

    The same code hosts all peers of a one-process run and a share of them in a worker
    process or on one host of a roster.  The experiment's scenario (kill, partition,
    heal, join, rejoin) is applied here to the peers this process hosts.  A ``keyring``
    makes them CURVE peers (a roster with ``security = "curve"``).
    """
    tune_for_hosting()
    torch.set_num_threads(cfg.compute.threads)
    part = part if part is not None else build_partition(cfg)
    links = None if cfg.links.is_ideal else Links(cfg.links, cfg.peers, cfg.seed)
    hosted = build_peers(cfg, part, ids, directory, run, t0, links=links, keyring=keyring)
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
            probe = next(iter(peers.values())).transport
            # A remote that answered and then lost every connection (its worker died while
            # this one waited) is given up after GONE_WHEN_CUT_S, not after the start-up deadline.
            await _wait_remote(probe, remote, "ready", time.time() + ready_timeout_s, gone_after=ready_timeout_s,
                               gone_when_unreachable=GONE_WHEN_CUT_S, cut_only_after_answer=True)
            if not resume:
                # Round 0 starts now: a `seconds` budget, scenario times and event times count
                # from here, not from the launch (spawning workers and warming up take seconds,
                # which left a --processes run with a short budget no round at all).
                start = time.time()
                for p in peers.values():
                    p.t0 = start

            if cfg.schedule == "sequential":
                await _sequential(cfg, scenario, on_event, stop)
            else:
                await scenario.run_async()
            for p in peers.values():
                if p.state.status in ("running", "killed"):
                    results[p.id] = await p.finish()
                p.transport.status["done"] = True
            # Keep serving until the others are done too, so nobody pulls from a closed peer.
            # A peer whose connection is cut (its worker died) is given up after GONE_WHEN_CUT_S;
            # one that is only silent (busy, slow link) after 3 timeouts.
            gone = await _wait_remote(probe, remote, "done", time.time() + 24 * 3600, gone_after=3 * cfg.network.timeout_s,
                                      gone_when_unreachable=GONE_WHEN_CUT_S)
            # Then until each other host has seen us done ("finished": it saw all its remotes
            # done). Without this second phase a host that closed right after seeing the last
            # host done left that host pinging silence for 3 timeouts before it could end.
            # Every remote still here was seen done, so silence now just means it has left.
            for p in peers.values():
                p.transport.status["finished"] = True
            await _wait_remote(probe, [p for p in remote if p not in gone], "finished", time.time() + 24 * 3600, gone_after=0)
            if remote:  # a moment more, so the others' next ping (every 0.1 s) sees us finished
                await asyncio.sleep(0.3)
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
    return results


def late_joiners(cfg: ExperimentConfig) -> set[int]:
    """Peers whose first scenario action is ``join``: they start only then."""
    first: dict[int, str] = {}
    for e in sorted(cfg.links.scenario, key=_when):
        for p in e.peers:
            first.setdefault(p, e.action)
    return {p for p, a in first.items() if a == "join"}


def _when(e: ScenarioEvent) -> float:
    return e.at_s if e.at_s is not None else float(e.at_round or 0)


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
        self.events = sorted(cfg.links.scenario, key=_when)
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
                self._launch(p)
            elif e.action == "join" and p.state.status == "new":
                await self.start(p)
                self._launch(p)

    async def _settle(self, pid: int) -> None:
        t = self.tasks.get(pid)
        if t is not None:
            await asyncio.gather(t, return_exceptions=True)

    def _launch(self, p: Peer) -> None:
        if self.cfg.schedule == "async":
            self.tasks[p.id] = asyncio.create_task(p.run(self.on_event, self.stop), name=f"peer-{p.id}")

    async def _drive(self, t0: float) -> None:
        for e in self.events:
            if e.at_s is None:
                continue
            await asyncio.sleep(max(0.0, t0 + e.at_s - time.time()))
            await self.apply(e)

    async def run_async(self) -> None:
        """Every running peer free until its budget; scenario events at their times."""
        for p in self.peers.values():
            if p.state.status == "running":
                self._launch(p)
        t0 = next(iter(self.peers.values())).t0
        driver = asyncio.create_task(self._drive(t0), name="scenario")
        try:
            while True:
                pending = [t for t in self.tasks.values() if not t.done()]
                if not driver.done():
                    pending.append(driver)
                if not pending:
                    break
                await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for t in self.tasks.values():
                t.result()  # surface a peer's crash
        finally:
            driver.cancel()
            for t in self.tasks.values():
                t.cancel()
            await asyncio.gather(driver, *self.tasks.values(), return_exceptions=True)


async def _sequential(
    cfg: ExperimentConfig, scenario: Scenario, on_event: EventHook | None, stop: asyncio.Event | None
) -> None:
    """The reference code's rounds: each peer once per round, in a fresh random order;
    later peers see the models earlier ones published in the same round."""
    rng = np.random.default_rng([cfg.seed, 2**31 - 1])
    ids = sorted(scenario.peers)
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


def run_local(
    cfg: ExperimentConfig, out: str | Path, *, on_event: EventHook | None = None, resume: bool = False
) -> dict[str, Any]:
    """Run a whole experiment in this process (peers as asyncio tasks); return the summary.

    With ``resume``, ``out`` is an earlier run's directory: peers restart from their
    checkpoints, finished peers only serve, and the run completes.
    """
    part = build_partition(cfg)
    run = RunDir(Path(out)) if resume else prepare_run(cfg, Path(out), part)
    t0 = run.config()["t0"]
    kind = cfg.network.transport
    directory = make_directory(kind, range(cfg.peers))
    start = time.perf_counter()
    try:
        asyncio.run(host_peers(cfg, list(range(cfg.peers)), directory, run, t0=t0, part=part, on_event=on_event,
                               resume=resume))
    finally:
        # Partial results are summarised too (Ctrl-C, a failing peer).
        summary = summarize(run, wall_s=time.perf_counter() - start)
        _cleanup_ipc(directory)
    return summary


def _cleanup_ipc(directory: Mapping[int, str]) -> None:
    for ep in directory.values():
        if ep.startswith("ipc://"):
            path = ep[len("ipc://"):]
            try:
                os.unlink(path)
            except OSError:
                pass
    dirs = {os.path.dirname(ep[len("ipc://"):]) for ep in directory.values() if ep.startswith("ipc://")}
    for d in dirs:
        try:
            os.rmdir(d)
        except OSError:
            pass
