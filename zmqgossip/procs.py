"""Peers spread over worker processes (this machine) or named by a roster (several hosts).

Every worker runs :func:`zmqgossip.runner.host_peers` for its share of the peers: the same
peer code as a one-process run.  Workers are started with ``spawn`` (never ``fork`` after
ZeroMQ or torch threads exist), use one torch thread each unless told otherwise, and talk
over ipc (processes) or tcp (roster).  The parent only starts, watches and summarises:
it follows the event files for progress, reports a worker that dies with its exit code
while the others go on, and on Ctrl-C stops all workers, which write what they did.
``kill -USR1`` on a worker prints the stack of each of its threads (to see where a stuck
one waits).
"""

from __future__ import annotations

import asyncio
import faulthandler
import json
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .config import ExperimentConfig
from .metrics import RunDir, summarize
from .runner import EventHook, _cleanup_ipc, build_partition, host_peers, prepare_run
from .transport import make_directory


def split_peers(peers: int, processes: int) -> list[list[int]]:
    """Contiguous, near-equal shares of the peer ids."""
    return [list(map(int, a)) for a in np.array_split(np.arange(peers), processes)]


def worker_main(
    cfg_data: dict[str, Any], ids: list[int], directory: dict[int, str], run_root: str, t0: float, resume: bool = False,
    keys: str | None = None,
) -> None:
    """Entry point of one worker process: host ``ids`` until done or signalled.

    ``keys``: the CURVE keys folder of a secure roster (the worker reads its own peers'
    secret keys from it; they never travel between processes).
    """
    if hasattr(signal, "SIGUSR1"):  # `kill -USR1 <worker pid>`: every thread's stack on stderr
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    cfg = ExperimentConfig.model_validate(cfg_data)
    run = RunDir(Path(run_root))
    keyring = None
    if keys is not None:
        from .security import load_keyring

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


class EventFollower:
    """Reads new complete lines of the peers' event files (progress for the parent)."""

    def __init__(self, run: RunDir, peers: Sequence[int]) -> None:
        self.run = run
        self.offsets = {p: 0 for p in peers}

    def poll(self, on_event: EventHook) -> None:
        for p, off in self.offsets.items():
            path = self.run.events_path(p)
            try:
                with open(path, "rb") as f:
                    f.seek(off)
                    data = f.read()
            except FileNotFoundError:
                continue
            end = data.rfind(b"\n") + 1
            if not end:
                continue
            self.offsets[p] = off + end
            for line in data[:end].splitlines():
                try:
                    on_event(json.loads(line))
                except ValueError:
                    continue


def run_workers(
    cfg: ExperimentConfig,
    shares: Sequence[Sequence[int]],
    directory: Mapping[int, str],
    run: RunDir,
    *,
    on_event: EventHook | None = None,
    poll_s: float = 0.5,
    stop_after: Callable[[], bool] | None = None,
    resume: bool = False,
    keys: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Start one spawned worker per share, watch them, return each one's outcome."""
    ctx = mp.get_context("spawn")
    t0 = run.config()["t0"]
    data = cfg.model_dump()
    procs = []
    for share in shares:
        p = ctx.Process(target=worker_main, daemon=False,
                        args=(data, list(share), dict(directory), str(run.root), t0, resume, None if keys is None else str(keys)))
        p.start()
        procs.append(p)
    follower = EventFollower(run, [i for s in shares for i in s])
    reported: set[int] = set()
    outcomes: list[dict[str, Any]] = []
    try:
        while any(p.is_alive() for p in procs):
            time.sleep(poll_s)
            if on_event:
                follower.poll(on_event)
            for k, p in enumerate(procs):
                if p.exitcode not in (None, 0) and k not in reported:
                    reported.add(k)
                    print(f"[zmqgossip] worker {k} (peers {shares[k][0]}..{shares[k][-1]}) died with exit code {p.exitcode}; "
                          "the other peers go on", flush=True)
            if stop_after is not None and stop_after():
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join()
        raise
    finally:
        if on_event:
            follower.poll(on_event)
        for k, p in enumerate(procs):
            p.join()
            outcomes.append({"worker": k, "peers": list(shares[k]), "exitcode": p.exitcode, "pid": p.pid})
    return outcomes


def run_processes(
    cfg: ExperimentConfig,
    out: str | Path,
    *,
    on_event: EventHook | None = None,
    shares: Sequence[Sequence[int]] | None = None,
    directory: Mapping[int, str] | None = None,
    resume: bool = False,
    keys: str | Path | None = None,
) -> dict[str, Any]:
    """Run an experiment with its peers spread over worker processes.

    By default ``cfg.compute.processes`` workers share the peers over ipc; a roster passes
    its hosts' shares and tcp directory instead, and with ``security = "curve"`` its keys folder.
    """
    part = build_partition(cfg)  # validates the data before any worker starts
    run = RunDir(Path(out)) if resume else prepare_run(cfg, Path(out), part)
    del part
    directory = directory or make_directory(cfg.network.transport, range(cfg.peers))
    shares = shares or split_peers(cfg.peers, cfg.compute.processes)
    start = time.perf_counter()
    workers: list[dict[str, Any]] = []
    try:
        workers = run_workers(cfg, shares, directory, run, on_event=on_event, resume=resume, keys=keys)
    finally:
        summary = summarize(run, wall_s=time.perf_counter() - start, extra={"processes": len(shares), "workers": workers})
        _cleanup_ipc(directory)
    return summary
