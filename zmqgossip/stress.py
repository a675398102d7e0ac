"""The stress engine: peers exchange random tensors, no training.

Every stress peer is a real :class:`~zmqgossip.net.Transport` serving a
:class:`~zmqgossip.wire.ModelPayload` of ``payload_kb`` KiB of random float32 values and
pulling ``fanout`` distinct random peers per round, concurrently, with the same wire format
(the puller decodes and validates every reply against the payload's schema) and the same
link emulation (:class:`~zmqgossip.links.Links`) as a learning run.  What it measures:

* pulls/s and GB/s of reply bytes over the pull phase (from the moment every peer is
  bound and published until every peer has made its pulls or the duration is over);
* pull latency quantiles (successful pulls, request to decoded reply);
* outcomes: ok, failures by reason (``timeout``, ``refused:...``, wire reasons) and the
  serving side's refusals by reason (``link_drop``, ``dropped_hwm``, ...);
* resources: ZeroMQ sockets held by the transports and file descriptors of the process
  (``/proc/self/fd``), sampled during the run; peak RSS of every process
  (``getrusage().ru_maxrss``);
* what the link emulator did (:class:`~zmqgossip.links.LinkStats`);
* CPU seconds of every process over the pull phase (``cpu_us_per_pull``: a figure that a
  busy shared machine disturbs less than pulls/s).

Load: every peer always has its round in flight (a closed loop: latency grows with the
number of peers, by Little's law), unless ``interval_s`` makes it wait between rounds as
a learning peer does while it trains.  Targets are uniform over all other peers (each new
target costs a connection once the LRU pool is full), or over a fixed random set of
``neighbours`` (pool-sized sets reuse their sockets: the steady state of a converged DAC
peer).  ``warmup_rounds`` rounds before the measurement connect the sockets (they count
in the link statistics, nowhere else).

A stress run rides the hosting path of learning runs: ``mode = "asyncio"`` hosts every
:class:`StressPeer` as asyncio tasks of this process; ``"processes"`` spawns ``processes``
workers (:class:`zmqgossip.hosting.workers.SpawnedWorkers`) that each host a share
(:func:`zmqgossip.hosting.workers.split_peers`) over ipc or tcp and write their figures to
a JSON file.  Hosts meet through :mod:`zmqgossip.hosting.liveness`: pulls start when every
peer is published (and, with warm-up rounds, every host is warm), and no host closes while
others still pull from it.

Limits are checked with :func:`~zmqgossip.net.preflight` before any socket exists,
so an impossible number of peers fails at once with what to raise.

Random payloads: each peer serves its own random tensor up to 64 MiB of distinct payload
bytes per process; beyond that peers share buffers round-robin (the bytes on the wire are
the same size; a 10,000-peer run of 256 KiB models would otherwise need 2.5 GB of noise).
"""

from __future__ import annotations

import asyncio
import csv
import json
import math
import os
import random
import resource
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import zmq
import zmq.asyncio
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from .allocator import tune_for_hosting
from .config import NetworkConfig
from .hosting import liveness
from .hosting.endpoints import remove_ipc
from .hosting.scenario import drive_timed
from .hosting.workers import SpawnedWorkers, split_peers
from .metrics import write_json_atomic
from .links import Links, NetworkEmulation
from .net import Transport, TransportConfig, check_fits, make_directory, preflight
from .wire import ModelPayload, schema_of

DISTINCT_PAYLOAD_BYTES = 64 * 1024 * 1024  # random bytes per process before peers share buffers
MAX_LATENCY_SAMPLES = 1_000_000  # per process (reservoir beyond)


class StressConfig(BaseModel):
    """One stress run. Unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")

    peers: int = Field(20, ge=2, description="number of peers")
    payload_kb: float = Field(256.0, gt=0, description="payload per peer in KiB (float32 values)")
    tensors: int = Field(1, ge=1, le=4096, description="the payload is split into this many tensors")
    pulls: int | None = Field(None, ge=1, description="pulls each peer makes (default 20 unless duration_s)")
    duration_s: float | None = Field(None, gt=0, description="or: pull for this many seconds")
    fanout: int = Field(2, ge=1, description="distinct peers pulled concurrently per round")
    warmup_rounds: int = Field(0, ge=0, description="rounds every peer makes before the measurement starts (not counted)")
    interval_s: float = Field(
        0.0, ge=0, description="each peer waits this long between its rounds (emulated compute; first round staggered)")
    neighbours: int | None = Field(
        None, ge=1, description="each peer pulls only from a fixed random set of this many peers (default: all others)")
    mode: Literal["asyncio", "processes"] = Field("asyncio", description="one process, or spawned workers")
    processes: int = Field(2, ge=1, description="processes mode: worker processes")
    network: NetworkConfig = Field(default_factory=NetworkConfig, description=(
        "transport (default: inproc for asyncio, ipc for processes), pool size, timeout, hwm: as in an experiment"))
    seed: int = Field(0, ge=0)
    emulator: Literal["auto", "on", "off"] = Field(
        "auto", description="link emulator: auto (only when links are not ideal), on (always, to measure its cost), off")
    links: NetworkEmulation = NetworkEmulation()

    @model_validator(mode="after")
    def _consistent(self) -> "StressConfig":
        if self.pulls is not None and self.duration_s is not None:
            raise ValueError("give pulls or duration_s, not both")
        if self.pulls is None and self.duration_s is None:
            self.pulls = 20
        if self.fanout >= self.peers:
            raise ValueError(f"fanout ({self.fanout}) must be smaller than peers ({self.peers})")
        if self.neighbours is not None and not self.fanout <= self.neighbours < self.peers:
            raise ValueError(f"neighbours ({self.neighbours}) must be >= fanout ({self.fanout}) and < peers ({self.peers})")
        if self.mode == "processes":
            if "transport" not in self.network.model_fields_set:
                self.network.transport = "ipc"
            elif self.network.transport == "inproc":
                raise ValueError("transport inproc works within one process: use ipc or tcp with mode processes")
            if self.processes > self.peers:
                raise ValueError(f"processes ({self.processes}) exceeds peers ({self.peers})")
        self._pool_given = self.network.pool_size
        self.network.resolve(self.peers, self.processes if self.mode == "processes" else 1)
        for e in self.links.scenario:
            if e.action not in ("partition", "heal"):
                raise ValueError(f"links.scenario: stress runs partition and heal only, not {e.action}")
            if e.at_s is None:
                raise ValueError("links.scenario: stress events need at_s (there are no rounds)")
            if any(not 0 <= p < self.peers for g in e.groups for p in g):
                raise ValueError(f"links.scenario: partition names peers outside 0..{self.peers - 1}")
        for c in self.links.classes:
            if any(not 0 <= p < self.peers for p in c.peers):
                raise ValueError(f"links.classes: peers outside 0..{self.peers - 1}")
        if self.emulator == "off" and not self.links.is_ideal:
            raise ValueError("emulator 'off' with a non-ideal link profile: the profile would be ignored")
        return self

    _pool_given: int | None = PrivateAttr(None)

    @property
    def transport(self) -> str:
        return self.network.transport

    @property
    def pool_size(self) -> int:
        assert self.network.pool_size is not None  # resolved by the validator
        return self.network.pool_size

    def with_peers(self, peers: int, **fields: Any) -> "StressConfig":
        """The same run with another number of peers (a pool size it chose is chosen again)."""
        raw = self.model_dump()
        raw["network"]["pool_size"] = self._pool_given
        return StressConfig.model_validate({**raw, "peers": peers, **fields})

    @property
    def payload_bytes(self) -> int:
        return 4 * self.elements

    @property
    def elements(self) -> int:
        return max(self.tensors, int(round(self.payload_kb * 1024 / 4)))

    @property
    def use_links(self) -> bool:
        return self.emulator == "on" or (self.emulator == "auto" and not self.links.is_ideal)

    def shares(self) -> list[list[int]]:
        if self.mode == "asyncio":
            return [list(range(self.peers))]
        return split_peers(self.peers, self.processes)


# ---------------------------------------------------------------------- measurements


def fd_count() -> int:
    """Open file descriptors of this process."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # the listing's own descriptor
    except OSError:  # pragma: no cover - no procfs
        return -1


def peak_rss_mb() -> float:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def check_limits(cfg: StressConfig) -> None:
    """Fail with the preflight's message if a share of the peers cannot fit in a process.

    Raises the soft descriptor limit of this process as far as needed (spawned workers
    inherit it).  Call before starting anything.
    """
    check_fits(max(len(s) for s in cfg.shares()), cfg.pool_size, cfg.transport)


def make_payloads(cfg: StressConfig, ids: Sequence[int]) -> dict[int, ModelPayload]:
    """Each peer's published snapshot: ``payload_kb`` KiB of random float32 in ``tensors`` tensors."""
    n = cfg.elements
    distinct = max(1, min(len(ids), DISTINCT_PAYLOAD_BYTES // max(cfg.payload_bytes, 1)))
    g = torch.Generator().manual_seed(cfg.seed * 7919 + (min(ids) if ids else 0))
    sizes = [len(a) for a in np.array_split(np.arange(n), cfg.tensors)]
    buffers = []
    for _ in range(distinct):
        flat = torch.randn(n, generator=g)
        parts = torch.split(flat, sizes)
        buffers.append({f"t{i}": p for i, p in enumerate(parts)})
    out = {}
    for k, pid in enumerate(ids):
        # copy=False: the snapshot references the buffer; nothing ever changes it.
        out[pid] = ModelPayload.build(buffers[k % distinct], step=0, version=1, n_samples=1, copy=False)
    return out


def stress_schema(cfg: StressConfig) -> dict:
    sizes = [len(a) for a in np.array_split(np.arange(cfg.elements), cfg.tensors)]
    return schema_of({f"t{i}": torch.empty(s) for i, s in enumerate(sizes)})


class _Reservoir:
    """A bounded uniform sample of latencies (all of them below the bound)."""

    def __init__(self, cap: int, seed: int) -> None:
        self.cap = cap
        self.seen = 0
        self.values: list[float] = []
        self.rng = random.Random(seed)

    def add(self, v: float) -> None:
        self.seen += 1
        if len(self.values) < self.cap:
            self.values.append(v)
        else:
            j = self.rng.randrange(self.seen)
            if j < self.cap:
                self.values[j] = v


# ---------------------------------------------------------------------- a stress peer


class StressPeer:
    """A peer with no learning: it serves a random payload and pulls ``fanout`` peers a
    round, concurrently, through the same transport, wire format and links as a learning
    peer, until its pulls or the run's duration are spent."""

    def __init__(self, cfg: StressConfig, pid: int, transport: Transport, payload: ModelPayload) -> None:
        self.cfg = cfg
        self.id = pid
        self.transport = transport
        self.payload = payload
        self.rng = random.Random(cfg.seed * 1_000_003 + pid)
        self.neighbours = ([q + (q >= pid) for q in self.rng.sample(range(cfg.peers - 1), cfg.neighbours)]
                           if cfg.neighbours is not None else None)

    async def start(self) -> None:
        """Bind and publish: the peer can be pulled."""
        await self.transport.start()
        self.transport.publish(self.payload)

    async def pull_round(self, k: int) -> list[Any]:
        """Pull ``k`` distinct targets at once (uniform over all others, or the neighbours)."""
        if self.neighbours is None:
            targets = [q + (q >= self.id) for q in self.rng.sample(range(self.cfg.peers - 1), k)]
        else:
            targets = self.rng.sample(self.neighbours, k)
        return await self.transport.pull_many(targets, self.cfg.network.timeout_s)

    async def run(self, deadline: float | None, on_results: Callable[[list[Any]], None]) -> None:
        """Rounds until the pulls or the deadline (``time.perf_counter()``) are spent."""
        cfg = self.cfg
        left = cfg.pulls
        if cfg.interval_s:
            await asyncio.sleep(self.rng.uniform(0, cfg.interval_s))  # peers do not all start at once
        while True:
            if left is not None and left <= 0:
                break
            if deadline is not None and time.perf_counter() >= deadline:
                break
            k = cfg.fanout if left is None else min(cfg.fanout, left)
            on_results(await self.pull_round(k))
            if left is not None:
                left -= k
            if cfg.interval_s:
                await asyncio.sleep(cfg.interval_s)


# ---------------------------------------------------------------------- one process's share


async def host_share(
    cfg: StressConfig,
    ids: Sequence[int],
    directory: Mapping[int, str],
    *,
    meet_with: Sequence[int] | None = None,
    start_timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Host the stress peers ``ids`` of ``directory``; return this process's figures.

    Hosts meet as learning runs do (hosting.liveness): every peer is bound and published
    before anyone pulls, every host has warmed up before the measurement starts, and each
    host keeps serving until every other is done pulling. ``meet_with``: one peer of each
    other host (a host announces for all its stress peers at once, so one stands for all;
    default: every remote peer).
    """
    tune_for_hosting()
    ctx = zmq.asyncio.Context()
    stress_peers: dict[int, StressPeer] = {}
    try:
        budget = preflight(ctx, len(ids), cfg.pool_size, cfg.transport)
        fds_base = fd_count()
        links = Links(cfg.links, cfg.peers, cfg.seed) if cfg.use_links else None
        payloads = make_payloads(cfg, ids)
        tcfg = TransportConfig(pool_size=cfg.pool_size, timeout_s=cfg.network.timeout_s, hwm=cfg.network.hwm,
                               flood_share=cfg.network.flood_share)
        schema = stress_schema(cfg)
        t_setup = time.perf_counter()
        for pid in ids:
            sp = stress_peers[pid] = StressPeer(cfg, pid, Transport(ctx, pid, directory, config=tcfg, expect=schema,
                                                                    links=links), payloads[pid])
            await sp.start()
        setup_s = time.perf_counter() - t_setup
        transports = [sp.transport for sp in stress_peers.values()]
        remote = list(meet_with) if meet_with is not None else [p for p in directory if p not in stress_peers]
        probe = transports[0]
        await liveness.meet(probe, remote, "ready", transports, deadline_s=start_timeout_s)

        lat = _Reservoir(MAX_LATENCY_SAMPLES, cfg.seed + (min(ids) if ids else 0))
        ok_bytes = 0
        peak = {"sockets": 0, "fds": 0}

        def sample() -> None:
            peak["sockets"] = max(peak["sockets"], sum(t.sockets_open for t in transports))
            peak["fds"] = max(peak["fds"], fd_count())

        async def monitor() -> None:
            while True:
                await asyncio.sleep(0.25)
                sample()

        def record(results: list[Any]) -> None:
            nonlocal ok_bytes
            for r in results:
                if r.ok:
                    lat.add(r.latency_s)
                    ok_bytes += r.nbytes

        mon = asyncio.create_task(monitor())
        if cfg.warmup_rounds:  # connect (and fill the pools) before anything is measured
            async def warm(sp: StressPeer) -> None:
                for _ in range(cfg.warmup_rounds):
                    await sp.pull_round(cfg.fanout)

            await asyncio.gather(*(warm(sp) for sp in stress_peers.values()))
            await liveness.meet(probe, remote, "warm", transports, deadline_s=start_timeout_s)
        before = _totals(transports)

        start_wall, start, cpu0 = time.time(), time.perf_counter(), time.process_time()
        deadline = None if cfg.duration_s is None else start + cfg.duration_s

        async def apply(e: Any) -> None:
            if links is not None:
                if e.action == "partition":
                    links.partition(e.groups)
                else:
                    links.heal()

        drv = asyncio.create_task(drive_timed(cfg.links.scenario, start_wall, apply))
        try:
            await asyncio.gather(*(sp.run(deadline, record) for sp in stress_peers.values()))
        finally:
            end, cpu1 = time.perf_counter(), time.process_time()
            mon.cancel()
            drv.cancel()
            await asyncio.gather(mon, drv, return_exceptions=True)
        sample()
        end_wall = start_wall + (end - start)
        after = _totals(transports)
        await liveness.part(probe, remote, transports, timeout_s=cfg.network.timeout_s)

        return {
            "pid": os.getpid(),
            "peers": len(ids),
            "setup_s": setup_s,
            "start": start_wall,
            "end": end_wall,
            "wall_s": end - start,
            "cpu_s": cpu1 - cpu0,
            "ok": after["ok"] - before["ok"],
            "failed": after["failed"] - before["failed"],
            "failures": dict(after["failures"] - before["failures"]),
            "refusals": dict(after["refusals"] - before["refusals"]),
            "served": after["served"] - before["served"],
            "ok_bytes": ok_bytes,
            "latencies": lat.values,
            "latency_count": lat.seen,
            "sockets_peak": peak["sockets"],
            "fds_base": fds_base,
            "fds_peak": peak["fds"],
            "budget_sockets": budget.sockets,
            "budget_fds": budget.fds,
            "rss_mb": peak_rss_mb(),
            "links": _links_raw(links),
        }
    finally:
        await asyncio.gather(*(sp.transport.close() for sp in stress_peers.values()), return_exceptions=True)
        ctx.destroy(linger=0)


def _totals(transports: Iterable[Transport]) -> dict[str, Any]:
    """Outcome counters summed over transports (the measured phase is a difference of two)."""
    out: dict[str, Any] = {"ok": 0, "failed": 0, "served": 0, "failures": Counter(), "refusals": Counter()}
    for t in transports:
        c = t.counters
        out["ok"] += c.pulls_ok
        out["failed"] += c.pulls_failed
        out["served"] += c.served
        out["failures"].update(c.pull_failures)
        out["refusals"].update(c.refusals)
    return out


def _links_raw(links: Links | None) -> dict[str, Any] | None:
    if links is None:
        return None
    s = links.stats
    return {"messages": s.messages, "delivered": s.delivered, "dropped": s.dropped, "partitioned": s.partitioned,
            "duplicated": s.duplicated, "delay_sum_s": s.delay_sum_s, "delays_ms": list(s.delays_ms)}


def _worker_main(cfg_data: dict, ids: list[int], directory: dict[int, str], meet_with: list[int], out_path: str) -> None:
    """Entry point of one spawned stress worker: host ``ids``, write figures to ``out_path``."""
    torch.set_num_threads(1)
    cfg = StressConfig.model_validate(cfg_data)
    try:
        res = asyncio.run(host_share(cfg, ids, directory, meet_with=meet_with))
    except BaseException as e:  # noqa: BLE001 - report any failure to the parent, then fail
        write_json_atomic(Path(out_path), {"error": f"{type(e).__name__}: {e}"})
        raise SystemExit(1) from None
    write_json_atomic(Path(out_path), res)


# ---------------------------------------------------------------------- the run


class StressError(RuntimeError):
    """A stress run that could not complete (a worker died, ...)."""


def run_stress(cfg: StressConfig, *, ray: str | None = None, advertise: str | None = None) -> dict[str, Any]:
    """Run one stress configuration; return its figures (see :func:`combine`).

    ``ray``: host the workers (``cfg.processes`` of them, over tcp) as actors of a Ray
    cluster (``auto``, ``local`` or an address; see :mod:`zmqgossip.hosting.cluster`).
    """
    if ray is not None:
        if cfg.mode != "processes" or cfg.transport != "tcp":
            raise StressError("a stress run on Ray needs mode 'processes' and transport 'tcp'")
        t0 = time.perf_counter()
        return combine(cfg, _run_on_ray(cfg, cfg.shares(), ray, advertise), total_s=time.perf_counter() - t0)
    check_limits(cfg)  # before anything: a clear message if the limits are too low
    t0 = time.perf_counter()
    shares = cfg.shares()
    directory = make_directory(cfg.transport, range(cfg.peers))
    try:
        if cfg.mode == "asyncio":
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                parts = [asyncio.run(host_share(cfg, shares[0], directory))]
            finally:
                torch.set_num_threads(threads)
        else:
            parts = _run_workers(cfg, shares, directory)
    finally:
        remove_ipc(directory)
    return combine(cfg, parts, total_s=time.perf_counter() - t0)


def _run_workers(cfg: StressConfig, shares: list[list[int]], directory: Mapping[int, str]) -> list[dict]:
    workers = SpawnedWorkers(daemon=True, grace_s=10.0)
    tmp = tempfile.mkdtemp(prefix="zgstress")
    try:
        for k, share in enumerate(shares):
            others = [s[0] for s in shares if s is not share]
            workers.start(_worker_main, share, cfg.model_dump(), share, dict(directory), others,
                          os.path.join(tmp, f"worker-{k}.json"))
        # One dead worker fails the run: the others are stopped rather than left waiting for it.
        outcomes = workers.watch(poll_s=0.05, on_death=lambda k, code: workers.stop())
        parts, errors = [], []
        for o in outcomes:
            path = os.path.join(tmp, f"worker-{o.worker}.json")
            try:
                with open(path) as f:
                    res = json.load(f)
            except (OSError, ValueError):
                res = {"error": f"no result (exit code {o.exitcode})"}
            if "error" in res or o.exitcode != 0:
                errors.append(f"worker {o.worker} (peers {o.peers[0]}..{o.peers[-1]}): {res.get('error', o.exitcode)}")
            else:
                parts.append(res)
        if errors:
            raise StressError("; ".join(errors))
        return parts
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


async def stress_share(*, directory: dict[int, str], stage: Path, cfg_data: dict, ids: list[int],
                       meet_with: list[int]) -> dict[str, Any]:
    """One Ray actor's share of a stress run (its figures come back as its result)."""
    torch.set_num_threads(1)
    return await host_share(StressConfig.model_validate(cfg_data), ids, directory, meet_with=meet_with)


def _run_on_ray(cfg: StressConfig, shares: list[list[int]], address: str, advertise: str | None) -> list[dict]:
    from .hosting.cluster import ActorPool, RayConnection

    with RayConnection(address), ActorPool(shares, into=None, advertise=advertise, grace_s=10.0) as pool:
        directory = pool.bind(cfg.pool_size, False)
        args = [{"cfg_data": cfg.model_dump(), "ids": s, "meet_with": [o[0] for o in shares if o is not s]}
                for s in shares]
        pool.start(stress_share, args, directory)
        # One dead worker fails the run: the others are stopped rather than left waiting for it.
        outcomes = pool.watch(poll_s=0.2, on_death=lambda k, why: pool.stop())
    parts, errors = [], []
    for o in outcomes:
        if o.state == "done" and isinstance(o.result, dict) and "error" not in o.result:
            parts.append({**o.result, "node_id": o.where["node_id"]})
        else:
            errors.append(f"worker {o.worker} (peers {o.peers[0]}..{o.peers[-1]}) on node {o.where['node_id'][:8]}: "
                          f"{o.error or o.state}")
    if errors:
        raise StressError("; ".join(errors))
    return parts


def _q(values: np.ndarray, p: float) -> float | None:
    return float(np.percentile(values, p)) if values.size else None


def combine(cfg: StressConfig, parts: Sequence[dict], *, total_s: float | None = None) -> dict[str, Any]:
    """The figures of a whole run from each process's share."""
    start = min(p["start"] for p in parts)
    end = max(p["end"] for p in parts)
    wall = max(end - start, 1e-9)
    lat = np.asarray([v for p in parts for v in p["latencies"]], dtype=float) * 1e3
    ok = sum(p["ok"] for p in parts)
    failed = sum(p["failed"] for p in parts)
    failures: Counter = Counter()
    refusals: Counter = Counter()
    for p in parts:
        failures.update(p["failures"])
        refusals.update(p["refusals"])
    ok_bytes = sum(p["ok_bytes"] for p in parts)
    sockets = sum(p["sockets_peak"] for p in parts)
    fds_used = sum(max(0, p["fds_peak"] - p["fds_base"]) for p in parts)
    return {
        "peers": cfg.peers,
        "payload_kb": cfg.payload_kb,
        "payload_bytes": cfg.payload_bytes,
        "tensors": cfg.tensors,
        "fanout": cfg.fanout,
        "interval_s": cfg.interval_s,
        "warmup_rounds": cfg.warmup_rounds,
        "neighbours": cfg.neighbours,
        "pulls_per_peer": cfg.pulls,
        "duration_s": cfg.duration_s,
        "mode": cfg.mode,
        "processes": len(parts) if cfg.mode == "processes" else 1,
        "transport": cfg.transport,
        "pool_size": cfg.pool_size,
        "emulator": cfg.use_links,
        "wall_s": wall,
        "setup_s": max(p["setup_s"] for p in parts),
        "total_s": total_s,
        "pulls": ok + failed,
        "ok": ok,
        "failed": failed,
        "timeouts": failures.get("timeout", 0),
        "failures": dict(sorted(failures.items())),
        "refusals": dict(sorted(refusals.items())),
        "pulls_per_s": ok / wall,
        "cpu_s": sum(p["cpu_s"] for p in parts),
        "cpu_us_per_pull": sum(p["cpu_s"] for p in parts) / ok * 1e6 if ok else None,
        "gb_per_s": ok_bytes / wall / 1e9,
        "bytes": ok_bytes,
        "latency_ms": {"p50": _q(lat, 50), "p90": _q(lat, 90), "p99": _q(lat, 99),
                       "mean": float(lat.mean()) if lat.size else None, "max": float(lat.max()) if lat.size else None},
        "sockets_peak": sockets,
        "sockets_per_peer": sockets / cfg.peers,
        "fds_peak": sum(p["fds_peak"] for p in parts),
        "fds_used": fds_used,
        "fds_per_peer": fds_used / cfg.peers,
        "budget": {"sockets": sum(p["budget_sockets"] for p in parts), "fds": sum(p["budget_fds"] for p in parts)},
        "rss_mb": [round(p["rss_mb"], 1) for p in parts],
        "rss_mb_max": max(p["rss_mb"] for p in parts),
        "links": combine_links([p["links"] for p in parts if p.get("links") is not None]),
        **({"nodes": [p["node_id"] for p in parts]} if any("node_id" in p for p in parts) else {}),
    }


def combine_links(raw: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Sum the emulators' counts over processes; quantiles over their delay samples."""
    if not raw:
        return None
    keys = ("messages", "delivered", "dropped", "partitioned", "duplicated")
    out: dict[str, Any] = {k: sum(r[k] for r in raw) for k in keys}
    delays = np.asarray([d for r in raw for d in r["delays_ms"]], dtype=float)
    delivered = out["delivered"]
    out["delay_mean_ms"] = sum(r["delay_sum_s"] for r in raw) / delivered * 1e3 if delivered else None
    out.update({f"delay_p{p}_ms": _q(delays, p) for p in (50, 90, 99)})
    return out


# ---------------------------------------------------------------------- sweep

SWEEP_COLUMNS = (
    "peers", "payload_kb", "mode", "processes", "transport", "fanout", "neighbours", "wall_s", "pulls", "ok", "failed",
    "timeouts", "pulls_per_s", "gb_per_s", "latency_p50_ms", "latency_p90_ms", "latency_p99_ms",
    "sockets_peak", "sockets_per_peer", "fds_used", "fds_per_peer", "rss_mb_max",
)


def flat_row(res: Mapping[str, Any]) -> dict[str, Any]:
    """One CSV row of a stress result."""
    row = {k: res.get(k) for k in SWEEP_COLUMNS}
    for q in ("p50", "p90", "p99"):
        row[f"latency_{q}_ms"] = res["latency_ms"][q]
    return row


def run_sweep(
    base: StressConfig,
    peers: Iterable[int],
    payload_kb: Iterable[float],
    out_dir: str | Path,
    *,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[list[dict[str, Any]], Path, Path]:
    """Every (peers, payload) of the grid; writes ``sweep.csv`` and ``sweep.png`` into ``out_dir``.

    All grid points are validated and checked against the limits before the first runs.
    """
    cfgs = [base.with_peers(n, payload_kb=kb) for kb in payload_kb for n in peers]
    for c in cfgs:
        check_limits(c)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for c in cfgs:
        r = run_stress(c)
        results.append(r)
        if on_result is not None:
            on_result(r)
    csv_path = out / "sweep.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(SWEEP_COLUMNS))
        w.writeheader()
        for r in results:
            w.writerow(flat_row(r))
    png_path = plot_sweep(results, out / "sweep.png")
    return results, csv_path, png_path


def plot_sweep(results: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """pulls/s, GB/s and p99 latency against peers, one line per payload size."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    by_kb: dict[float, list[Mapping[str, Any]]] = {}
    for r in results:
        by_kb.setdefault(r["payload_kb"], []).append(r)
    panels = (("pulls_per_s", "pulls / s"), ("gb_per_s", "GB / s"), ("p99", "p99 pull latency (ms)"))
    for ax, (key, label) in zip(axes, panels):
        for kb, rows in sorted(by_kb.items()):
            rows = sorted(rows, key=lambda r: r["peers"])
            xs = [r["peers"] for r in rows]
            ys = [r["latency_ms"]["p99"] if key == "p99" else r[key] for r in rows]
            ys = [math.nan if y is None else y for y in ys]
            ax.plot(xs, ys, marker="o", label=f"{kb:g} KiB")
        ax.set_xscale("log")
        ax.set_xlabel("peers")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[0].legend(title="payload", fontsize=8)
    first = results[0] if results else {}
    fig.suptitle(f"zmqgossip stress · {first.get('mode', '')} · {first.get('transport', '')} · "
                 f"fan-out {first.get('fanout', '')}")
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path
