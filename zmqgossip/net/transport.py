"""One peer's network side: its inbox (serving) and its puller (pulling), on one context.

The two halves share only the peer's id, settings and counters; each is usable alone
(:class:`~zmqgossip.net.inbox.Inbox`, :class:`~zmqgossip.net.pull.Puller`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import zmq.asyncio

from ..wire import Kind, ModelPayload, Schema, WireError
from .config import Counters, TransportConfig
from .inbox import Inbox, LinkModel
from .pool import SocketPool
from .pull import Puller, PullBatch, PullResult

if TYPE_CHECKING:
    from ..security import CurveKeys


class Transport:
    """The network side of one peer. Use within one asyncio event loop."""

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        peer_id: int,
        directory: Mapping[int, str],
        *,
        config: TransportConfig = TransportConfig(),
        expect: Schema | None = None,
        links: LinkModel | None = None,
        bind: str | None = None,
        security: "CurveKeys | None" = None,
        serving: set[str] | None = None,
    ) -> None:
        self.ctx = ctx
        self.id = peer_id
        self.directory = directory
        self.config = config
        self.expect = expect
        self.links = links
        #: CURVE keys (own pair, the roster's public keys): encrypted, authenticated peers
        self.security = security
        #: the inproc endpoints served right now by the transports of this context (shared
        #: by them): a pull to one that is not fails at once, as a refused connection would
        #: (ZeroMQ itself queues it until someone binds the name)
        self.serving = serving
        self.counters = Counters()
        self.inbox = Inbox(ctx, peer_id, directory[peer_id] if bind is None else bind, config=config,
                           counters=self.counters, links=links, security=security, serving=serving)
        self.puller = Puller(ctx, peer_id, directory, config=config, counters=self.counters, expect=expect,
                             links=links, security=security, serving=serving)

    @property
    def endpoint(self) -> str:
        """Where my inbox is bound (a tcp port 0 is resolved once started)."""
        return self.inbox.endpoint

    @property
    def counters(self) -> Counters:
        return self._counters

    @counters.setter
    def counters(self, c: Counters) -> None:
        self._counters = c
        if hasattr(self, "inbox"):
            self.inbox.counters = self.puller.counters = c

    @property
    def status(self) -> dict[str, Any]:
        """What a PING is answered with (the peer sets e.g. ready / done / step)."""
        return self.inbox.status

    @status.setter
    def status(self, value: dict[str, Any]) -> None:
        self.inbox.status = value

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Bind the inbox and start serving."""
        await self.inbox.start()

    async def close(self) -> None:
        """Stop serving and close every socket (LINGER 0: nothing waits)."""
        self.puller.close()
        await self.inbox.close()

    def reopen(self) -> "Transport":
        """A fresh transport at the same endpoint for a peer that rejoins; counters carry over."""
        t = Transport(self.ctx, self.id, self.directory, config=self.config, expect=self.expect, links=self.links,
                      security=self.security, serving=self.serving)
        t.counters = self.counters
        if self.published is not None:
            t.publish(self.published)
        return t

    # ------------------------------------------------------------------ serving
    def publish(self, payload: ModelPayload) -> None:
        """Make ``payload`` the snapshot every later request is answered with."""
        self.inbox.publish(payload)

    @property
    def published(self) -> ModelPayload | None:
        return self.inbox.payload

    # ------------------------------------------------------------------ pulling
    def start_pulls(self, peers: Iterable[int], timeout: float | None = None, *, expect: Schema | None = None,
                    kind: Kind = Kind.PULL_REQUEST, check_values: bool = True) -> PullBatch:
        """Send one pull per peer now; ``await batch.wait()`` gives the results in that order.

        The one way to pull (a single pull is a batch of one). Never raises for network
        trouble; never hangs: every pull ends by ``timeout`` (default ``config.timeout_s``).
        A caller may do something while they travel (a peer lends its turn when they take
        long, see turns.py) without wrapping them in a task of its own.

        ``check_values=False``: the models' values are left for the caller to check with
        ``wire.check_values`` where it first reads them (off the event loop); a model it
        refuses then is handed back with :meth:`refuse`.
        """
        return self.puller.start(tuple(peers), timeout, expect, kind, check_values)

    def refuse(self, result: PullResult, error: WireError) -> None:
        """``result``'s model failed the value check its caller made after the pull: the pull
        now counts as failed for ``error.reason``, as if decode had refused it. Call it on
        the event loop's thread (it owns the counters)."""
        self.puller.refuse(result, error)

    async def pull(self, peer: int, timeout: float | None = None, expect: Schema | None = None,
                   kind: Kind = Kind.PULL_REQUEST) -> PullResult:
        """Pull ``peer``'s current model: a batch of one."""
        return (await self.start_pulls((peer,), timeout, expect=expect, kind=kind).wait())[0]

    async def pull_many(self, peers: Iterable[int], timeout: float | None = None) -> list[PullResult]:
        """Pull several peers concurrently; results in the order of ``peers``."""
        return await self.start_pulls(peers, timeout).wait()

    async def ping(self, peer: int, timeout: float = 1.0) -> dict[str, Any] | None:
        """``peer``'s status map if it answers within ``timeout``, else None."""
        r = await self.pull(peer, timeout, kind=Kind.PING)
        return r.message.meta if r.ok and r.message is not None else None

    # ------------------------------------------------------------------ sockets
    @property
    def pool(self) -> SocketPool:
        """My pulling sockets."""
        return self.puller.pool

    @property
    def sockets_open(self) -> int:
        return self.puller.sockets_open + self.inbox.is_open
