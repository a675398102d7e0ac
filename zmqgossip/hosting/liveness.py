"""Who is up, who finished, who is gone: the start and end of a run without a server.

A peer's transport answers pings with its status (``ready`` after warm-up, ``done`` at
the end, ``finished`` once it has seen every other peer done).  Each host waits until
every remote peer is ready before round 0, and until every remote peer is done (or gone)
before it closes its sockets, so no peer pulls from one that has already left.

How long a silent peer is waited for is a :class:`GiveUp` rule, one per phase.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ..net import Transport
from ..wire import Kind

#: Seconds a remote peer may have no connection at all before a waiting host gives it up
#: (its process is gone): enough to ride out a reconnect.
GONE_WHEN_CUT_S = 2.0
#: Seconds between two rounds of pings, at most (a round to many peers)...
PING_EVERY_S = 0.1
#: ... and per peer pinged: a run's start and end wait on these rounds, so a few peers are
#: pinged often, and many (each ping costs the pinged peer's event loop) at most every
#: PING_EVERY_S.
PING_PER_PEER_S = 0.002


def ping_every(peers: int) -> float:
    """Seconds between two rounds of pings to ``peers`` peers."""
    return min(PING_EVERY_S, max(0.01, PING_PER_PEER_S * peers))


@dataclass(frozen=True)
class GiveUp:
    """When a waiting host stops waiting for a remote peer.

    ``silent_s``: the peer did not answer (timed out, or no connection) for this long.
    ``cut_s``: its pings found no connection at all (its process is gone, rather than too
    busy to answer) for this long. ``cut_needs_answer``: count a cut connection only for a
    peer that answered in this wait before (at start-up a peer nobody reaches may simply
    not be up yet; one that answered and then lost every connection has died).
    """

    silent_s: float
    cut_s: float | None = None
    cut_needs_answer: bool = False


def at_start(deadline_s: float) -> GiveUp:
    """Start-up: wait up to the deadline for peers that are not up yet; a peer that
    answered and then lost every connection is given up after :data:`GONE_WHEN_CUT_S`."""
    return GiveUp(silent_s=deadline_s, cut_s=GONE_WHEN_CUT_S, cut_needs_answer=True)


def at_end(timeout_s: float) -> GiveUp:
    """The end: a peer whose connection is cut is gone after :data:`GONE_WHEN_CUT_S`; one
    that is only silent (busy, slow link) after three pull timeouts."""
    return GiveUp(silent_s=3 * timeout_s, cut_s=GONE_WHEN_CUT_S)


#: After every remote was seen done, silence just means it has left.
AT_ONCE = GiveUp(silent_s=0.0)


async def wait_for(
    probe: Transport, remote: Sequence[int], key: str, rule: GiveUp, *, deadline_s: float = 24 * 3600,
) -> list[int]:
    """Ping ``remote`` peers until each reports ``key`` or ``rule`` gives it up; return
    the peers given up on (those still pending at the deadline included)."""
    deadline = time.time() + deadline_s
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
                if r.reason == "unreachable" and (p in answered or not rule.cut_needs_answer):
                    cut_since.setdefault(p, now)
                else:  # late, timed out, or not reached yet at start-up: not known to be gone
                    cut_since.pop(p, None)
                cut = cut_since.get(p)
                if now - since >= rule.silent_s or (rule.cut_s is not None and cut is not None and now - cut >= rule.cut_s):
                    pending.discard(p)
                    gone.append(p)
            else:
                answered.add(p)
                silent_since.pop(p, None)
                cut_since.pop(p, None)
        if pending:
            await asyncio.sleep(ping_every(len(pending)))
    gone.extend(sorted(pending))
    return gone


def announce(transports: Iterable[Transport], **status: Any) -> None:
    """Set status keys every later ping of these peers reports."""
    for t in transports:
        t.status.update(status)


async def meet(probe: Transport, remote: Sequence[int], key: str, transports: Iterable[Transport], *,
               deadline_s: float) -> list[int]:
    """Announce ``key`` for this host's peers, then wait until every remote peer has
    (a peer that answered and then lost every connection is given up, as at start-up)."""
    announce(transports, **{key: True})
    return await wait_for(probe, remote, key, at_start(deadline_s), deadline_s=deadline_s)


async def part(probe: Transport, remote: Sequence[int], transports: Sequence[Transport], *, timeout_s: float) -> list[int]:
    """The end of a run on this host: announce ``done`` and keep serving until every remote
    peer is done too (or gone), so nobody pulls from a closed peer; then announce
    ``finished`` and wait until each remote host has seen us done. Returns the peers
    given up on."""
    announce(transports, done=True)
    gone = await wait_for(probe, remote, "done", at_end(timeout_s))
    # Without this second phase a host that closed right after seeing the last one done
    # would leave that host pinging silence for three timeouts before it could end.
    announce(transports, finished=True)
    await wait_for(probe, [p for p in remote if p not in gone], "finished", AT_ONCE)
    if remote:  # a moment more, so the others' next ping sees us finished
        await asyncio.sleep(3 * ping_every(len(remote)))
    return gone
