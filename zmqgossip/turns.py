"""Turns to pull and compute, for the peers of one process in the async schedule.

The peers of one process share its compute thread. If each pulled whenever it liked, all
of them would pull at once and then queue for the thread, and each would compute on
models pulled about a round earlier: staleness that real peers, each with its own
processor, never see. So they take turns: at most ``1 + pull_ahead`` hold one (one
computes while the others pull), and a peer computes on models pulled moments before.

A pull that takes longer than ``hold_s`` (a slow or lossy link, a timeout) gives its turn
back while it waits, so a peer stuck on the network never idles the compute thread; it
queues for a turn again once its models are in.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

T = TypeVar("T")

#: How long a pull may hold a turn before giving it back (``compute.pull_hold_s``): well
#: above a pull over loopback (milliseconds), below one update's compute (0.1 s and more).
HOLD_S = 0.1


class Turns:
    """The turns of one process's peers."""

    def __init__(self, pull_ahead: int, hold_s: float = HOLD_S) -> None:
        if pull_ahead < 0:
            raise ValueError(f"pull_ahead must be >= 0, got {pull_ahead}")
        self.size = 1 + pull_ahead
        self.hold_s = hold_s
        self._sem = asyncio.Semaphore(self.size)

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator["Turn"]:
        """Hold a turn for one update (pull and compute)."""
        t = Turn(self)
        await t.take()
        try:
            yield t
        finally:
            t.give()


class Turn:
    """One peer's turn; lent out while its pull waits on the network."""

    def __init__(self, turns: Turns) -> None:
        self.turns = turns
        self.held = False

    async def take(self) -> None:
        await self.turns._sem.acquire()
        self.held = True

    def give(self) -> None:
        if self.held:
            self.held = False
            self.turns._sem.release()

    async def wait_for(self, aw: Awaitable[T]) -> T:
        """Await ``aw`` (a pull) holding the turn at most ``hold_s``; hold it again after."""
        task = asyncio.ensure_future(aw)
        try:
            done, _ = await asyncio.wait({task}, timeout=self.turns.hold_s)
            if not done:
                self.give()
                await asyncio.wait({task})
                await self.take()
        except BaseException:
            task.cancel()
            raise
        return task.result()
