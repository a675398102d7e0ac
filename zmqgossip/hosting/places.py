"""Where the workers of a run live, behind one small interface.

A :class:`Place` hosts an experiment's peers and returns what the summary should say
about its workers. The places: :class:`Tasks` (asyncio tasks in this process),
:class:`Processes` (spawned worker processes on this machine) and :class:`RosterHosts`
(every host of a roster as a local worker, over loopback tcp). Each worker runs
:func:`~zmqgossip.hosting.host.host_peers` for its share, so a new place adds only how
workers are started, where their endpoints are and how they are watched: never the
peer, the schedules or the run directory.
"""

from __future__ import annotations

import asyncio
import faulthandler
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..config import ExperimentConfig
from ..data import Partition
from ..metrics import EventTail, RunDir
from ..net import check_fits, make_directory
from .endpoints import remove_ipc
from .host import host_peers
from .scenario import EventHook
from .workers import SpawnedWorkers, report_death, split_peers


class Place(Protocol):
    """Hosts every peer of ``cfg`` (a fresh or resumed run in ``run``) to the end."""

    def describe(self, cfg: ExperimentConfig) -> dict[str, Any]:
        """What the summary records about the workers if hosting ends early."""
        ...

    def host(
        self, cfg: ExperimentConfig, run: RunDir, *, part: Partition | None, on_event: EventHook | None, resume: bool,
    ) -> dict[str, Any]:
        """Run the peers; return what the summary records about the workers. ``part``:
        the partition, when the caller built it already (workers build their own)."""
        ...


@dataclass
class Tasks:
    """Every peer as an asyncio task of this process."""

    def describe(self, cfg: ExperimentConfig) -> dict[str, Any]:
        return {}

    def host(
        self, cfg: ExperimentConfig, run: RunDir, *, part: Partition | None, on_event: EventHook | None, resume: bool,
    ) -> dict[str, Any]:
        directory = make_directory(cfg.network.transport, range(cfg.peers))
        try:
            asyncio.run(host_peers(cfg, list(range(cfg.peers)), directory, run, t0=run.config()["t0"],
                                   part=part, on_event=on_event, resume=resume))
        finally:
            remove_ipc(directory)
        return {}


def _dump_stacks(signum: int, frame: object) -> None:
    faulthandler.dump_traceback(all_threads=True)


def worker_main(
    cfg_data: dict[str, Any], ids: list[int], directory: dict[int, str], run_root: str, t0: float, resume: bool = False,
    keys: str | None = None,
) -> None:
    """Entry point of one worker process: host ``ids`` until done or signalled.

    ``keys``: the CURVE keys folder of a secure roster (the worker reads its own peers'
    secret keys from it; they never travel between processes).
    """
    if hasattr(signal, "SIGUSR1"):  # `kill -USR1 <worker pid>`: every thread's stack on stderr
        # A Python-level handler, not faulthandler.register: that one walks the other
        # threads' frames from the C signal handler without the GIL, and on 3.11 a thread
        # caught mid-call can crash the worker (seen in CI). Here the main thread holds the
        # GIL, so every other thread is parked at a safe point while it is dumped.
        signal.signal(signal.SIGUSR1, _dump_stacks)
    cfg = ExperimentConfig.model_validate(cfg_data)
    run = RunDir(Path(run_root))
    keyring = None
    if keys is not None:
        from ..security import load_keyring

        keyring = load_keyring(keys, range(cfg.peers), ids)

    async def main() -> None:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        assert task is not None
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        await host_peers(cfg, ids, directory, run, t0=t0, resume=resume, keyring=keyring)

    try:
        asyncio.run(main())
    except asyncio.CancelledError:
        # Stopped by a signal: host_peers already wrote the partial results.
        raise SystemExit(130) from None


def host_in_workers(
    cfg: ExperimentConfig,
    run: RunDir,
    shares: Sequence[Sequence[int]],
    directory: Mapping[int, str],
    *,
    on_event: EventHook | None,
    resume: bool,
    keys: str | Path | None = None,
    poll_s: float = 0.5,
) -> dict[str, Any]:
    """One spawned worker per share; the parent follows the event files for progress.

    The largest share's socket and descriptor budget is checked here first (and the
    descriptor limit raised as far as allowed; workers inherit it), so a limit that
    cannot be met stops the run with what to raise before any worker starts.
    """
    assert cfg.network.pool_size is not None  # resolved by the config's validator
    check_fits(max(len(s) for s in shares), cfg.network.pool_size, cfg.network.transport, secure=keys is not None)
    workers = SpawnedWorkers()
    t0 = run.config()["t0"]
    data = cfg.model_dump()
    for share in shares:
        workers.start(worker_main, share, data, list(share), dict(directory), str(run.root), t0, resume,
                      None if keys is None else str(keys))
    tail = EventTail(run, [i for s in shares for i in s])
    outcomes = workers.watch(
        poll_s=poll_s,
        on_poll=(lambda: tail.poll(on_event)) if on_event is not None else None,
        on_death=lambda k, code: report_death(k, shares[k], code),
    )
    return {"processes": len(shares), "workers": [o.as_dict() for o in outcomes]}


@dataclass
class Processes:
    """``count`` spawned worker processes on this machine share the peers (ipc or tcp)."""

    count: int

    def describe(self, cfg: ExperimentConfig) -> dict[str, Any]:
        return {"processes": self.count, "workers": []}

    def host(
        self, cfg: ExperimentConfig, run: RunDir, *, part: Partition | None, on_event: EventHook | None, resume: bool,
    ) -> dict[str, Any]:
        directory = make_directory(cfg.network.transport, range(cfg.peers))
        try:
            return host_in_workers(cfg, run, split_peers(cfg.peers, self.count), directory, on_event=on_event,
                                   resume=resume)
        finally:
            remove_ipc(directory)


@dataclass
class RosterHosts:
    """Every host of a roster as a local worker process, at the roster's tcp endpoints;
    with ``keys`` (a CURVE roster) each worker reads its own peers' secret keys."""

    shares: list[list[int]]
    directory: dict[int, str]
    keys: str | Path | None = None

    def describe(self, cfg: ExperimentConfig) -> dict[str, Any]:
        return {"processes": len(self.shares), "workers": []}

    def host(
        self, cfg: ExperimentConfig, run: RunDir, *, part: Partition | None, on_event: EventHook | None, resume: bool,
    ) -> dict[str, Any]:
        return host_in_workers(cfg, run, self.shares, self.directory, on_event=on_event, resume=resume, keys=self.keys)


def default_place(cfg: ExperimentConfig) -> Place:
    """Tasks for one process, else ``compute.processes`` workers."""
    return Processes(cfg.compute.processes) if cfg.compute.processes > 1 else Tasks()
