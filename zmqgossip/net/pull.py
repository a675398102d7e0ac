"""The client side of a peer: pulls, each a small state machine driven by event-loop callbacks.

:meth:`Puller.start` sends one pull per peer at once and returns their :class:`PullBatch`;
``await batch.wait()`` gives the results in the order the peers were given (a single pull
is a batch of one).  A pull (:class:`Pull`) is sent, received, decoded and timed out by
callbacks: the task that waits on the batch wakes once, when all of them are done.  A pull
costs no task, no future of its own and no coroutine frames, which is most of what asyncio
would add to a small one.  Every pull has a deadline; a pull to a dead, slow or unknown
peer gives a failed :class:`PullResult` and leaves the socket pool usable.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import zmq
import zmq.asyncio

from .. import wire
from ..wire import Kind, Schema, WireError
from .config import Counters, TransportConfig
from .frames import EVENTS, POLLIN, POLLOUT, recv_now, send_now
from .inbox import LinkModel
from .pool import Dealer, SocketPool

if TYPE_CHECKING:
    from ..security import CurveKeys

_WANT_MODEL = (Kind.MODEL_REPLY, Kind.ERROR_REPLY)
_WANT_PONG = (Kind.PONG, Kind.ERROR_REPLY)


@dataclass
class PullResult:
    """The outcome of one pull: a decoded model, or why there is none."""

    peer: int
    ok: bool
    message: wire.Message | None = None
    reason: str | None = None
    detail: str | None = None
    latency_s: float = 0.0
    nbytes: int = 0


class PullBatch:
    """The pulls started together by :meth:`Puller.start`; its future is set by the last
    one to finish."""

    __slots__ = ("results", "left", "future", "ops", "timer", "check_values")

    def __init__(self, n: int, future: asyncio.Future, check_values: bool = True) -> None:
        self.check_values = check_values  # False: the caller checks the models' values (wire.check_values)
        self.results: list[PullResult | None] = [None] * n
        self.left = n
        self.future = future
        self.ops: list[Pull] = []
        self.timer: asyncio.TimerHandle | None = None

    def deliver(self, index: int, res: PullResult) -> None:
        self.results[index] = res
        self.left -= 1
        if not self.left:
            self._stop_timer()
            self.ops = []  # they refer to the batch: no cycle keeps the results' frames alive
            if not self.future.done():
                self.future.set_result(None)

    def expire(self) -> None:
        """The timeout: every pull still going fails now (late replies are dropped)."""
        self.timer = None
        for op in self.ops:
            if not op.done:
                op.expire()

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    async def wait(self) -> list[PullResult]:
        """The results, in the order the peers were given, once every pull is done."""
        if self.left:
            try:
                await self.future
            except asyncio.CancelledError:  # the caller is gone: drop its pulls, count nothing
                self._stop_timer()
                for op in self.ops:
                    op.abandon()
                self.ops = []
                raise
        return self.results  # type: ignore[return-value]


class Pull:
    """One pull: request out, reply in, decoded; driven by event-loop callbacks, not a task.

    Life: queued on its DEALER (one request in flight per socket, so replies come back in
    order) -> :meth:`begin` (the link emulator may delay or lose the request) -> :meth:`send`
    -> :meth:`receive` -> :meth:`finish`. Its batch's timer ends it in any state; a socket that timed
    out may still hold a late reply or a queued request, so it is evicted and a fresh one
    serves the next pull to that peer.
    """

    __slots__ = ("client", "peer", "expect", "kind", "batch", "index", "t0", "dealer", "later",
                 "request_id", "frames", "done")

    def __init__(self, client: "Puller", peer: int, expect: Schema | None, kind: Kind, batch: PullBatch, index: int) -> None:
        self.client, self.peer, self.expect, self.kind, self.batch, self.index = client, peer, expect, kind, batch, index
        self.t0 = time.perf_counter()
        self.dealer: Dealer | None = None
        self.later: asyncio.TimerHandle | None = None  # a request the link emulator delays
        self.request_id = 0
        self.frames: list = []
        self.done = False

    def begin(self) -> None:
        c, d = self.client, self.dealer
        assert d is not None
        d.op = self
        self.request_id = c.next_request_id()
        self.frames = wire.encode_request(c.id, self.request_id, self.kind)
        if c.links is not None:
            copies, delay = c.links.plan(c.id, self.peer, len(self.frames[0]))
            if not copies:
                return  # a lost request: only the batch's timer ends this pull
            if delay > 0:
                self.later = c.loop.call_later(delay, self.send)
                return
        self.send()

    def send(self) -> None:
        self.later = None
        d, c = self.dealer, self.client
        assert d is not None
        try:
            send_now(d.sync, self.frames)
        except zmq.Again:  # not connected (IMMEDIATE; one request in flight, so never full)
            if d.was_connected or d.down:  # the peer went away, or never came: do not wait
                if not d.reconnects:
                    c.pool.evict(self.peer, d)
                self.unreachable()
                return
            d.want = POLLOUT  # a fresh socket still connecting: wait, up to the timeout
            c.loop.call_soon(d.on_ready)  # reads EVENTS: re-arms the descriptor, or sends now
            return
        except zmq.ZMQError as e:
            self.fail(e)
            return
        d.was_connected = True
        counters = c.counters
        counters.msgs_out += 1
        counters.bytes_out += len(self.frames[0])
        d.want = POLLIN
        d.on_ready()  # reads EVENTS: re-arms the descriptor (or the reply is already here)

    def unreachable(self) -> None:
        """No connection to the peer: fail now. An ipc/tcp socket stays in the pool and keeps
        reconnecting, so later pulls fail at once while the peer is down and go through as
        soon as it is back."""
        self.finish(PullResult(self.peer, False, reason="unreachable",
                               detail=f"no connection to peer {self.peer} (down, a wrong endpoint, or a refused handshake)"))

    def receive(self, known: bool = False) -> None:
        """Read the replies queued on the socket until this pull's own one is there.

        ``known``: the caller has just read ``EVENTS`` and seen a reply waiting (reading
        it again costs ZeroMQ a look at its command queue: a poll and a getpid call).
        """
        d, client = self.dealer, self.client
        assert d is not None
        c = client.counters
        want = _WANT_PONG if self.kind is Kind.PING else _WANT_MODEL
        try:
            while known or d.sync.getsockopt(EVENTS) & POLLIN:
                known = False
                reply = recv_now(d.sync)
                c.msgs_in += 1
                try:
                    msg = wire.decode(reply, expect=self.expect, limits=client.config.limits, kinds=want,
                                      check_values=self.batch.check_values)
                except WireError as e:
                    nbytes = sum(memoryview(f).nbytes for f in reply)
                    c.bytes_in += nbytes
                    self.finish(PullResult(self.peer, False, reason=e.reason, detail=e.detail, nbytes=nbytes))
                    return
                nbytes = msg.nbytes
                c.bytes_in += nbytes
                if msg.request_id != self.request_id and not (msg.kind is Kind.ERROR_REPLY and msg.request_id == 0):
                    continue  # a late answer to an earlier request on this socket
                if client.config.check_sender and msg.sender != self.peer:
                    self.finish(PullResult(self.peer, False, reason="sender",
                                           detail=f"asked peer {self.peer}, reply says {msg.sender}", nbytes=nbytes))
                elif msg.kind is Kind.ERROR_REPLY:
                    self.finish(PullResult(self.peer, False, reason=f"refused:{msg.reason}", detail=msg.detail,
                                           nbytes=nbytes))
                else:
                    self.finish(PullResult(self.peer, True, message=msg, nbytes=nbytes))
                return
        except zmq.ZMQError as e:
            self.fail(e)

    def fail(self, e: zmq.ZMQError) -> None:
        """The socket broke under this pull (e.g. the transport was closed)."""
        self.client.pool.evict(self.peer, self.dealer)
        self.finish(PullResult(self.peer, False, reason="socket", detail=f"socket error pulling peer {self.peer}: {e}"))

    def socket_closed(self) -> None:
        self.finish(PullResult(self.peer, False, reason="socket", detail=f"socket to peer {self.peer} was closed"))

    def expire(self) -> None:
        d = self.dealer
        if d is not None and d.op is self:
            if d.want == POLLOUT and d.reconnects:
                # Never connected within this pull's timeout: the socket holds no request,
                # so it stays (reconnecting) and the next pulls to this peer fail at once.
                d.down = True
                self.unreachable()
                return
            self.client.pool.evict(self.peer, d)  # it may still get the reply, or hold the request
        self.finish(PullResult(self.peer, False, reason="timeout",
                               detail=f"no reply from peer {self.peer} within {time.perf_counter() - self.t0:.3g}s"))

    def abandon(self) -> None:
        """The caller was cancelled: end the pull without a result or a count."""
        if not self.done:
            if self.dealer is not None and self.dealer.op is self:
                self.client.pool.evict(self.peer, self.dealer)
            self.finish(None)

    def finish(self, res: PullResult | None) -> None:
        if self.done:
            return
        self.done = True
        if self.later is not None:
            self.later.cancel()
            self.later = None
        if self.dealer is not None:
            self.client.pool.release(self.dealer, self)
        if res is None:
            return
        res.latency_s = time.perf_counter() - self.t0
        self.batch.deliver(self.index, self.client.count(res, self.kind))


class Puller:
    """The pulling side of one peer: its socket pool, request ids and pull counters."""

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        peer_id: int,
        directory: Mapping[int, str],
        *,
        config: TransportConfig,
        counters: Counters,
        expect: Schema | None = None,
        links: LinkModel | None = None,
        security: "CurveKeys | None" = None,
        serving: set[str] | None = None,
    ) -> None:
        self.ctx = ctx
        self.id = peer_id
        self.directory = directory
        self.config = config
        self.counters = counters
        self.expect = expect
        self.links = links
        self.security = security
        self.serving = serving
        self._request_ids = iter(range(1, 2**62))
        self._pool: SocketPool | None = None  # made with the first pull (it needs the running loop)
        self.closed = False

    @property
    def pool(self) -> SocketPool:
        if self._pool is None:
            self._pool = SocketPool(self.ctx, self.id, self.config, asyncio.get_running_loop(), self.security)
        return self._pool

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self.pool.loop

    def next_request_id(self) -> int:
        return next(self._request_ids)

    def start(self, peers: tuple[int, ...], timeout: float | None = None, expect: Schema | None = None,
              kind: Kind = Kind.PULL_REQUEST, check_values: bool = True) -> PullBatch:
        """Start one pull per peer at once; their batch."""
        timeout = self.config.timeout_s if timeout is None else timeout
        loop = self.loop
        batch = PullBatch(len(peers), loop.create_future(), check_values)
        expect = expect if expect is not None else self.expect
        try:
            for i, peer in enumerate(peers):
                batch.ops.append(self._start_one(peer, expect, kind, batch, i))
        except BaseException:  # e.g. no socket could be opened: end the pulls already sent
            for op in batch.ops:
                op.abandon()
            raise
        if batch.left:  # one timer ends every pull of the batch still going at the deadline
            batch.timer = loop.call_at(loop.time() + timeout, batch.expire)
        return batch

    def _start_one(self, peer: int, expect: Schema | None, kind: Kind, batch: PullBatch, index: int) -> Pull:
        op = Pull(self, peer, expect, kind, batch, index)
        if self.closed:  # no socket may be opened after close(): it would never be closed
            op.finish(PullResult(peer, False, reason="closed", detail="this transport is closed"))
            return op
        endpoint = self.directory.get(peer)
        if endpoint is None or peer == self.id:
            op.finish(PullResult(peer, False, reason="unknown_peer", detail=f"peer {peer} is not in the directory"))
            return op
        if self.security is not None and self.security.server_key(peer) is None:
            op.finish(PullResult(peer, False, reason="unknown_peer", detail=f"no CURVE public key for peer {peer}"))
            return op
        if self.serving is not None and endpoint not in self.serving and endpoint.startswith("inproc://"):
            self.pool.evict(peer)  # an inproc socket never reconnects: a fresh one serves it when it is back
            op.finish(PullResult(peer, False, reason="unreachable", detail=f"peer {peer} is not serving (nothing bound at {endpoint})"))
            return op
        dealer = op.dealer = self.pool.get(peer, endpoint)
        dealer.users += 1  # held from now on: the pool must not close this socket under the pull
        if dealer.op is None:
            op.begin()
        else:  # one request in flight per socket, so that replies come back in order
            dealer.queue.append(op)
        return op

    def count(self, res: PullResult, kind: Kind) -> PullResult:
        """Pull outcomes are counted; pings (readiness, liveness) are not pulls."""
        if kind is Kind.PULL_REQUEST:
            if res.ok:
                self.counters.pulls_ok += 1
            else:
                self.counters.pulls_failed += 1
                self.counters.pull_failures[res.reason or "unknown"] += 1
        return res

    def refuse(self, res: PullResult, error: WireError) -> None:
        """A delivered model refused later by the caller's value check: counted as failed."""
        if not res.ok:
            return
        res.ok, res.message, res.reason, res.detail = False, None, error.reason, error.detail
        self.counters.pulls_ok -= 1  # counted ok when it was delivered
        self.count(res, Kind.PULL_REQUEST)

    def close(self) -> None:
        """Close every socket; pulls still going fail, later ones fail at once."""
        self.closed = True
        if self._pool is not None:
            self._pool.close()

    @property
    def sockets_open(self) -> int:
        return len(self._pool.sockets) if self._pool is not None else 0
