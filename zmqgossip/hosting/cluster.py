"""Workers on a Ray cluster: Ray places and watches them, ZeroMQ carries every model.

One actor per worker, spread over the nodes by a placement group. Each actor binds its
peers' endpoints on tcp at its node's address and reports them; the driver builds the
directory from the reports and starts every actor. An actor runs its share on a thread
of its own (its own asyncio loop, the same host loop as every other place), so Ray's
calls to it are answered while its peers train: ``collect`` hands the driver what the
share wrote into the actor's staging directory (:mod:`.mirror`; no shared filesystem),
``stop`` cancels the share, which still writes its partial results.

Ray is an optional dependency (``zmqgossip[ray]``); this module imports it only when a
cluster is used.
"""

from __future__ import annotations

import asyncio
import os
import platform
import resource
import shutil
import socket
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError, ExperimentConfig
from ..data import Partition
from ..metrics import Event, RunDir, parse_events, write_json_atomic
from ..net import TransportError, check_fits
from .mirror import Change, Mirror, apply_changes, seed_files
from .scenario import EventHook
from .workers import split_peers

RAY_MISSING = "Ray is not installed: pip install 'zmqgossip[ray]'"
#: Set on a node (in the environment of `ray start`) to advertise another address than
#: the one Ray uses for the node, on hosts with several interfaces.
ADVERTISE_ENV = "ZMQGOSSIP_ADVERTISE"


class ClusterError(ConfigError):
    """No cluster to use, or one that cannot hold the workers; the message says what to do."""


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ClusterError(RAY_MISSING) from None
    return ray


# ---------------------------------------------------------------------- the actor


def node_address(node_id: str) -> str:
    """The address Ray knows a node by (``ray start --node-ip-address``)."""
    import ray

    for n in ray.nodes():
        if n.get("NodeID") == node_id:
            return str(n["NodeManagerAddress"])
    return str(ray.util.get_node_ip_address())


ShareFn = Callable[..., Coroutine[Any, Any, Any]]


def _reserve_ports(n: int, host: str) -> list[socket.socket]:
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket()
            socks.append(s)
            s.bind((host, 0))
    except OSError as e:
        for s in socks:
            s.close()
        raise TransportError(f"cannot bind {n} tcp ports at {host} ({e}): set --advertise (or {ADVERTISE_ENV} "
                             "on that node) to an address of the node") from None
    return socks


def _remove_stale_stages() -> None:
    """Staging folders of workers that died on this node (a killed actor cannot remove
    its own; what the driver needed of it was collected while it ran)."""
    for d in Path(tempfile.gettempdir()).glob("zgray-*-*"):
        try:
            pid = int(d.name.split("-")[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (ValueError, PermissionError):
            continue


class PeerWorker:
    """One Ray actor: hosts a share of the peers on a thread, in a staging run directory."""

    def __init__(self, index: int, advertise: str | None, seed: Sequence[tuple[str, bytes, bool]] = ()) -> None:
        import ray

        self.index = index
        _remove_stale_stages()
        self.stage = Path(tempfile.mkdtemp(prefix=f"zgray-{os.getpid()}-"))
        apply_changes(self.stage, seed)
        self.mirror = Mirror(self.stage)
        self.node_id = ray.get_runtime_context().get_node_id()
        self.host = advertise or os.environ.get(ADVERTISE_ENV) or node_address(self.node_id)
        self.thread: threading.Thread | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.task: asyncio.Task | None = None
        self.state = "new"  # new, running, done, failed, stopped
        self.error: str | None = None
        self.result: Any = None
        self.lock = threading.Lock()  # one collection at a time
        self.reserved: list[socket.socket] = []

    def where(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "address": self.host, "hostname": platform.node(), "pid": os.getpid()}

    def bind(self, ids: Sequence[int], pool_size: int, secure: bool) -> dict[int, str]:
        """This share's endpoints, on tcp at this node's address (limits checked first)."""
        check_fits(len(ids), pool_size, "tcp", secure=secure)
        # Held until the share starts: actors sharing a node (or a machine) ask the OS for
        # ports at the same time, and a port let go at once could be handed to another.
        self.reserved = _reserve_ports(len(ids), self.host)
        return {p: f"tcp://{self.host}:{s.getsockname()[1]}" for p, s in zip(ids, self.reserved)}

    def start(self, fn: ShareFn, args: Mapping[str, Any], directory: Mapping[int, str]) -> None:
        """Run ``fn(directory=..., stage=..., **args)`` on a thread of its own."""
        ready = threading.Event()

        async def main() -> Any:
            self.loop = asyncio.get_running_loop()
            self.task = asyncio.current_task()
            ready.set()
            return await fn(directory=dict(directory), stage=self.stage, **args)

        def run() -> None:
            try:
                self.result = asyncio.run(main())
                self.state = "done"
            except asyncio.CancelledError:
                self.state = "stopped"
            except BaseException as e:  # noqa: BLE001 - the driver reports it
                self.error = f"{type(e).__name__}: {e}"
                self.state = "failed"
                traceback.print_exc()
            finally:
                ready.set()

        for sock in self.reserved:
            sock.close()
        self.reserved = []
        self.state = "running"
        self.thread = threading.Thread(target=run, name=f"zmqgossip-worker-{self.index}", daemon=True)
        self.thread.start()
        ready.wait()

    def collect(self) -> dict[str, Any]:
        """What the share wrote since the last call, and how it is doing."""
        with self.lock:
            state = self.state  # read first: a share that ended has written everything
            changes = [c.as_tuple() for c in self.mirror.changes()]
            return {"state": state, "error": self.error, "result": self.result if state == "done" else None,
                    "changes": changes, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}

    def stop(self, grace_s: float = 30.0) -> str:
        """Cancel the share (it writes its partial results) and wait up to ``grace_s``."""
        if self.loop is not None and self.task is not None and self.state == "running":
            self.loop.call_soon_threadsafe(self.task.cancel)
        if self.thread is not None:
            self.thread.join(grace_s)
        return self.state

    def cleanup(self) -> None:
        shutil.rmtree(self.stage, ignore_errors=True)


# ---------------------------------------------------------------------- the driver


def _ray_address(address: str) -> str | None:
    return None if address == "local" else address


def _reachable(address: str, timeout_s: float = 5.0) -> None:
    """A HOST:PORT address answers (Ray itself retries an unreachable one for minutes)."""
    if address == "auto" or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as e:
        raise ClusterError(f"no Ray cluster answers at {address} ({e}): start its head with `ray start --head` "
                           "there, or name another address") from None


@dataclass
class RayConnection:
    """Attached to a cluster for as long as it is entered: ``auto`` (a running cluster:
    ``ray start --head`` or ``RAY_ADDRESS``), ``local`` (a private one on this machine,
    stopped at the end) or an address. Already attached (``ray.init`` by the caller):
    that connection is used and left open."""

    address: str = "auto"
    owned: bool = field(default=False, init=False)

    def __enter__(self) -> "RayConnection":
        ray = import_ray()
        if ray.is_initialized():
            return self
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True, "configure_logging": False}
        if self.address == "local":
            kwargs["_node_ip_address"] = "127.0.0.1"
        else:
            _reachable(self.address)
        try:
            ray.init(address=_ray_address(self.address), **kwargs)
        except ConnectionError as e:
            if self.address == "auto":
                raise ClusterError("no Ray cluster is running here: start one with `ray start --head` (and "
                                   "`ray start --address=HEAD:6379` on the other hosts), or try --ray local") from None
            raise ClusterError(f"cannot attach to the Ray cluster at {self.address}: {e}") from None
        self.owned = True
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.owned:
            import_ray().shutdown()
            self.owned = False

    def cpus(self) -> float:
        return cluster_cpus()

    def nodes(self) -> list[dict[str, Any]]:
        return [n for n in import_ray().nodes() if n.get("Alive")]


def cluster_cpus() -> float:
    """The CPUs the attached cluster offers, all nodes together."""
    return float(import_ray().cluster_resources().get("CPU", 0.0))


def default_workers(cpus: float, peers: int) -> int:
    """One worker per CPU the cluster offers, capped by the peers."""
    return max(1, min(peers, int(cpus)))


def check_workers(workers: int | None, peers: int) -> None:
    if workers is not None and workers < 1:
        raise ClusterError(f"--workers must be at least 1 (got {workers})")
    if workers is not None and workers > peers:
        raise ClusterError(f"--workers {workers} is more than the {peers} peers: a worker hosts at least one peer")


@dataclass
class WorkerOutcome:
    """How one actor ended, and where it ran."""

    worker: int
    peers: list[int]
    where: dict[str, Any]
    state: str = "running"
    error: str | None = None
    result: Any = None
    rss_mb: float | None = None  # peak resident memory of the actor's process, last reported

    def as_dict(self) -> dict[str, Any]:
        return {"worker": self.worker, "peers": self.peers, **self.where, "state": self.state, "rss_mb": self.rss_mb,
                **({"error": self.error} if self.error else {})}


class ActorPool:
    """The actors of one run: placed over the nodes, bound, started, collected, stopped.

    ``into``: the run directory the actors' files are copied to (None: nothing is copied,
    e.g. a stress run, whose figures come back as the actors' results).
    """

    def __init__(self, shares: Sequence[Sequence[int]], *, into: Path | None, seed: Callable[[Sequence[int]], list[Change]]
                 | None = None, advertise: str | None = None, grace_s: float = 30.0) -> None:
        ray = import_ray()
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.ray = ray
        self.shares = [list(s) for s in shares]
        self.into = into
        self.grace_s = grace_s
        n = len(self.shares)
        cpus = cluster_cpus()
        # Each worker takes an equal slice of the cluster's CPUs (at most one): a SPREAD
        # placement group then puts two workers of a two-node cluster on the two nodes.
        per = min(1.0, int(cpus / n * 1000) / 1000) if cpus else 0.0
        self.pg = placement_group([{"CPU": per}] * n, strategy="SPREAD") if per > 0 else None
        if self.pg is not None:
            try:
                ray.get(self.pg.ready(), timeout=120)
            except Exception:  # noqa: BLE001 - a GetTimeoutError, or the group was refused
                ray.util.remove_placement_group(self.pg)
                raise ClusterError(f"the Ray cluster could not place {n} workers of {per:g} CPU each "
                                   f"({cpus:g} CPUs in all): ask for fewer with --workers") from None
        actor_cls = ray.remote(PeerWorker)
        self.actors = []
        for k, share in enumerate(self.shares):
            opts: dict[str, Any] = {"num_cpus": per, "max_concurrency": 4, "max_restarts": 0}
            if self.pg is not None:
                opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=k)
            files = [c.as_tuple() for c in seed(share)] if seed is not None else []
            self.actors.append(actor_cls.options(**opts).remote(k, advertise, files))
        self.outcomes = [WorkerOutcome(k, s, w) for k, (s, w) in
                         enumerate(zip(self.shares, self._get([a.where.remote() for a in self.actors])))]

    def _get(self, refs: Any, timeout: float | None = None) -> Any:
        """ray.get, with an error raised inside an actor re-raised as itself where it is
        one of ours (a limit that cannot be met, bad keys)."""
        try:
            return self.ray.get(refs, timeout=timeout)
        except self.ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, (ConfigError, TransportError)):
                raise cause from None
            raise

    def bind(self, pool_size: int, secure: bool) -> dict[int, str]:
        """Every actor's endpoints, as one directory."""
        directory: dict[int, str] = {}
        for d in self._get([a.bind.remote(s, pool_size, secure) for a, s in zip(self.actors, self.shares)]):
            directory.update({int(k): v for k, v in d.items()})
        return directory

    def start(self, fn: ShareFn, args: Sequence[Mapping[str, Any]], directory: Mapping[int, str]) -> None:
        self._get([a.start.remote(fn, dict(x), dict(directory)) for a, x in zip(self.actors, args)])

    def _live(self) -> list[int]:
        return [k for k, o in enumerate(self.outcomes) if o.state == "running"]

    def collect(self, on_changes: Callable[[list[Change]], None] | None = None,
                on_death: Callable[[int, str], None] | None = None, timeout: float = 60.0) -> None:
        """One collection from every live actor; an actor that died is marked dead."""
        live = self._live()
        refs = [self.actors[k].collect.remote() for k in live]
        for k, ref in zip(live, refs):
            o = self.outcomes[k]
            try:
                got = self.ray.get(ref, timeout=timeout)
            except (self.ray.exceptions.RayActorError, self.ray.exceptions.GetTimeoutError) as e:
                o.state, o.error = "died", type(e).__name__
                if on_death is not None:
                    on_death(k, o.error)
                continue
            o.rss_mb = got["rss_mb"]
            changes = [Change(*c) for c in got["changes"]]
            if self.into is not None and changes:
                apply_changes(self.into, changes)
            if on_changes is not None and changes:
                on_changes(changes)
            if got["state"] != "running":
                o.state, o.error, o.result = got["state"], got["error"], got["result"]
                if o.state == "failed" and on_death is not None:
                    on_death(k, o.error or "failed")

    def watch(self, *, poll_s: float = 0.5, on_changes: Callable[[list[Change]], None] | None = None,
              on_death: Callable[[int, str], None] | None = None, stop_after: Callable[[], bool] | None = None
              ) -> list[WorkerOutcome]:
        """Collect until every actor has ended; Ctrl-C (or ``stop_after``) stops them all."""
        try:
            while self._live():
                time.sleep(poll_s)
                self.collect(on_changes, on_death)
                if stop_after is not None and stop_after():
                    raise KeyboardInterrupt
        except BaseException:
            self.stop(on_changes)
            raise
        return self.outcomes

    def stop(self, on_changes: Callable[[list[Change]], None] | None = None) -> None:
        """Cancel every live actor's share, then collect what they wrote."""
        live = self._live()
        try:
            self.ray.get([self.actors[k].stop.remote(self.grace_s) for k in live], timeout=self.grace_s + 10)
        except Exception:  # noqa: BLE001 - an actor that is gone or stuck: its files are what we have
            pass
        try:
            self.collect(on_changes, timeout=10)
        except Exception:  # noqa: BLE001
            pass

    def close(self) -> None:
        """Remove the staging directories, the actors and the placement group."""
        for a in self.actors:
            try:
                self.ray.get(a.cleanup.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - a dead actor has nothing to remove
                pass
            self.ray.kill(a)
        if self.pg is not None:
            self.ray.util.remove_placement_group(self.pg)

    def __enter__(self) -> "ActorPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---------------------------------------------------------------------- learning runs


async def host_learning_share(
    *, directory: dict[int, str], stage: Path, cfg_data: dict[str, Any], ids: list[int], t0: float, resume: bool,
    public: dict[int, bytes] | None, secret: dict[int, bytes] | None,
) -> None:
    """A worker's share of a learning run, written into its staging directory."""
    from ..security import KeyRing
    from .host import host_peers

    cfg = ExperimentConfig.model_validate(cfg_data)
    keyring = None if public is None else KeyRing(public, secret or {}, Path("<keys of this run>"))
    await host_peers(cfg, ids, directory, RunDir(stage), t0=t0, resume=resume, keyring=keyring)


def curve_keys(peers: int) -> tuple[dict[int, bytes], dict[int, bytes]]:
    """A fresh CURVE key pair per peer, in memory: (public, secret), z85."""
    import zmq

    public, secret = {}, {}
    for p in range(peers):
        public[p], secret[p] = zmq.curve_keypair()
    return public, secret


def events_of(changes: Sequence[Change]) -> list[Event]:
    """The event lines among ``changes`` (progress for the driver)."""
    out = []
    for c in changes:
        if c.append and c.path.startswith("events/peer-"):
            try:
                peer = int(c.path.rsplit("-", 1)[1].split(".", 1)[0])
            except ValueError:
                continue
            out += parse_events(c.data, peer)
    return out


@dataclass
class RayActors:
    """Peers hosted by Ray actors, one per worker, spread over a cluster's nodes.

    ``address``: ``auto``, ``local`` or a cluster address (see :class:`RayConnection`);
    ``workers``: default one per CPU of the cluster, capped by the peers; ``advertise``:
    the address every actor binds its peers' endpoints at (default: its node's address,
    or ``ZMQGOSSIP_ADVERTISE`` set on the node); ``curve``: CURVE on every link, with
    fresh keys of which each actor receives only its own peers' secret keys.
    """

    address: str = "auto"
    workers: int | None = None
    advertise: str | None = None
    curve: bool = False
    poll_s: float = 0.5
    grace_s: float = 30.0
    _outcomes: list[WorkerOutcome] = field(default_factory=list, init=False, repr=False)

    def describe(self, cfg: ExperimentConfig) -> dict[str, Any]:
        return {"ray": {"address": self.address}, "processes": len(self._outcomes),
                "security": "curve" if self.curve else "none", "workers": [o.as_dict() for o in self._outcomes]}

    def host(
        self, cfg: ExperimentConfig, run: RunDir, *, part: Partition | None, on_event: EventHook | None, resume: bool,
    ) -> dict[str, Any]:
        check_workers(self.workers, cfg.peers)
        cfg = cfg.model_copy(deep=True)
        cfg.network.transport = "tcp"  # across nodes
        assert cfg.network.pool_size is not None
        with RayConnection(self.address) as conn:
            n = self.workers or default_workers(conn.cpus(), cfg.peers)
            shares = split_peers(cfg.peers, n)
            seed = (lambda share: seed_files(run.root, share)) if resume else None
            public, secret = curve_keys(cfg.peers) if self.curve else (None, None)
            t0 = run.config()["t0"]
            data = cfg.model_dump()
            with ActorPool(shares, into=run.root, seed=seed, advertise=self.advertise, grace_s=self.grace_s) as pool:
                self._outcomes = pool.outcomes  # the summary's, should hosting end early
                directory = pool.bind(cfg.network.pool_size, self.curve)
                # Which ports the peers use, for a user (or a firewall rule) to look up.
                write_json_atomic(run.root / "endpoints.json", {str(p): e for p, e in sorted(directory.items())})
                args = [{"cfg_data": data, "ids": s, "t0": t0, "resume": resume, "public": public,
                         "secret": None if secret is None else {p: secret[p] for p in s}} for s in shares]
                pool.start(host_learning_share, args, directory)

                def changed(changes: list[Change]) -> None:
                    if on_event is not None:
                        for e in events_of(changes):
                            on_event(e)

                def died(k: int, why: str) -> None:
                    s = shares[k]
                    print(f"[zmqgossip] worker {k} (peers {s[0]}..{s[-1]}) on node {pool.outcomes[k].where['node_id'][:8]} "
                          f"died ({why}); the other peers go on", flush=True)

                outcomes = pool.watch(poll_s=self.poll_s, on_changes=changed, on_death=died)
                nodes = len(conn.nodes())
            return {"ray": {"address": self.address, "nodes": nodes}, "processes": n,
                    "security": "curve" if self.curve else "none",
                    "workers": [o.as_dict() for o in outcomes]}
