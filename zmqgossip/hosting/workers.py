"""Spawned worker processes, started and watched: one mechanism for every kind of run.

Workers start from a preloaded forkserver (:mod:`zmqgossip.warm`), never by forking a
parent that may hold ZeroMQ or torch threads. The parent only starts and watches them:
it reports a worker that dies with its exit code while the others go on, and on Ctrl-C
(or a caller's stop) sends every worker SIGTERM, gives it ``grace_s`` to write what it
did, then kills what is left.
"""

from __future__ import annotations

import multiprocessing.connection
import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..warm import context


def split_peers(peers: int, workers: int) -> list[list[int]]:
    """Contiguous, near-equal shares of the peer ids."""
    return [list(map(int, a)) for a in np.array_split(np.arange(peers), workers)]


@dataclass(frozen=True)
class Outcome:
    """How one worker ended."""

    worker: int
    peers: list[int]
    exitcode: int | None
    pid: int | None

    def as_dict(self) -> dict[str, Any]:
        return {"worker": self.worker, "peers": self.peers, "exitcode": self.exitcode, "pid": self.pid}


class SpawnedWorkers:
    """A group of spawned worker processes, each hosting one share of the peers."""

    def __init__(self, *, daemon: bool = False, grace_s: float = 30.0) -> None:
        self.ctx = context()  # also for barriers and queues the workers share
        self.daemon = daemon
        self.grace_s = grace_s
        self.procs: list[Any] = []
        self.shares: list[list[int]] = []

    def start(self, target: Callable[..., None], share: Sequence[int], *args: Any) -> None:
        p = self.ctx.Process(target=target, args=args, daemon=self.daemon)
        p.start()
        self.procs.append(p)
        self.shares.append(list(share))

    def died(self) -> list[int]:
        """Workers that ended with a non-zero exit code so far."""
        return [k for k, p in enumerate(self.procs) if p.exitcode not in (None, 0)]

    def watch(
        self,
        *,
        poll_s: float = 0.5,
        on_poll: Callable[[], None] | None = None,
        on_death: Callable[[int, int], None] | None = None,
        stop_after: Callable[[], bool] | None = None,
    ) -> list[Outcome]:
        """Wait for every worker to end; return how each one did."""
        reported: set[int] = set()
        try:
            while any(p.is_alive() for p in self.procs):
                # Wakes as soon as a worker ends, or after poll_s.
                multiprocessing.connection.wait([p.sentinel for p in self.procs if p.is_alive()], timeout=poll_s)
                if on_poll is not None:
                    on_poll()
                for k in self.died():
                    if k not in reported:
                        reported.add(k)
                        if on_death is not None:
                            on_death(k, self.procs[k].exitcode)
                if stop_after is not None and stop_after():
                    raise KeyboardInterrupt
        except BaseException:
            self.stop()
            raise
        finally:
            if on_poll is not None:
                on_poll()
            for p in self.procs:
                p.join()
        return [Outcome(k, self.shares[k], p.exitcode, p.pid) for k, p in enumerate(self.procs)]

    def stop(self) -> None:
        """SIGTERM every live worker, wait ``grace_s`` for it, then kill it."""
        for p in self.procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)
        for p in self.procs:
            p.join(self.grace_s)
            if p.is_alive():
                p.kill()
                p.join()


def report_death(k: int, share: Sequence[int], exitcode: int) -> None:
    print(f"[zmqgossip] worker {k} (peers {share[0]}..{share[-1]}) died with exit code {exitcode}; "
          "the other peers go on", flush=True)
