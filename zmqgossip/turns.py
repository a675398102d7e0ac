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
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .net import PullBatch, PullResult

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

    def turn(self) -> "Turn":
        """A turn for one update (pull and compute): ``async with turns.turn() as turn``."""
        return Turn(self)


class Turn:
    """One peer's turn; lent out while its pull waits on the network.

    An async context manager written out rather than a generator one: it is entered once
    per peer-round, on the event loop every peer shares.
    """

    __slots__ = ("turns", "held")

    def __init__(self, turns: Turns) -> None:
        self.turns = turns
        self.held = False

    async def __aenter__(self) -> "Turn":
        await self.take()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.give()

    async def take(self) -> None:
        await self.turns._sem.acquire()
        self.held = True

    def give(self) -> None:
        if self.held:
            self.held = False
            self.turns._sem.release()

    async def wait_for(self, batch: "PullBatch") -> "list[PullResult]":
        """The batch's results, holding the turn at most ``hold_s`` while it travels and
        again after it is in. A timer lends the turn out: no task, no ``asyncio.wait``."""
        if batch.left:
            timer = asyncio.get_running_loop().call_later(self.turns.hold_s, self._lend, batch)
            try:
                await batch.wait()
            finally:
                timer.cancel()
            if not self.held:
                await self.take()
        return batch.results  # type: ignore[return-value]

    def _lend(self, batch: "PullBatch") -> None:
        if batch.left:  # still on the network: let another peer compute meanwhile
            self.give()
