"""The client side's sockets: one DEALER per remote peer, in a small LRU pool.

The number of sockets a peer holds stays bounded however many peers exist. A socket busy
with a pull is never closed under it: it leaves the pool (*evicted*) and is closed once
its last pull is done. Each socket's descriptor is registered with the event loop for the
socket's lifetime; the pull that owns the socket (see :mod:`zmqgossip.net.pull`) is moved
on from that readiness callback.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from typing import TYPE_CHECKING, Protocol

import zmq
import zmq.asyncio

from .config import TransportConfig, routing_id
from .frames import EVENTS, POLLIN

if TYPE_CHECKING:
    from ..security import CurveKeys


class SocketUser(Protocol):
    """What a socket asks of the pull that uses it (see :class:`~zmqgossip.net.pull.Pull`)."""

    def begin(self) -> None: ...
    def send(self) -> None: ...
    def receive(self, known: bool = False) -> None: ...
    def fail(self, e: zmq.ZMQError) -> None: ...
    def socket_closed(self) -> None: ...


class Dealer:
    """One outgoing socket to one peer, its descriptor registered with the event loop."""

    def __init__(self, sock: zmq.asyncio.Socket, peer: int, reconnects: bool) -> None:
        self.sock = sock
        self.peer = peer
        self.sync = zmq.Socket.shadow(sock.underlying)  # a synchronous view of the same socket
        self.fd = self.sync.getsockopt(zmq.FD)  # ZeroMQ's descriptor for the event loop
        self.users = 0  # pulls using or queued on this socket
        self.evicted = False  # out of the pool; closed when users drops to 0
        self.closed = False
        #: ipc/tcp sockets reconnect by themselves; an inproc one never does once its peer
        #: closed (and a request to an unbound inproc name waits for whoever binds it)
        self.reconnects = reconnects
        self.was_connected = False  # a request went out once: not connected now = peer gone
        self.down = False  # never connected within a pull's timeout: pulls fail at once
        self.op: SocketUser | None = None  # the pull whose request is on this socket
        self.want = 0  # what that pull waits for: POLLOUT to send, POLLIN for the reply
        self.queue: deque[SocketUser] = deque()  # pulls waiting for the socket

    def on_ready(self) -> None:
        """The descriptor fired: move the current pull on if what it waits for is there.

        Reading ``EVENTS`` re-arms ZeroMQ's edge-triggered descriptor (else the loop would
        call us again and again); ZeroMQ's internal commands (about half the firings during
        a pull) do no other work.
        """
        op = self.op
        try:
            events = self.sync.getsockopt(EVENTS)
        except zmq.ZMQError as e:
            if op is not None:
                op.fail(e)
            return
        if op is not None and events & self.want:
            if self.want == POLLIN:
                op.receive(known=True)
            else:
                op.send()


class SocketPool:
    """The DEALERs of one peer: at most ``config.pool_size`` pooled, LRU."""

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        peer_id: int,
        config: TransportConfig,
        loop: asyncio.AbstractEventLoop,
        security: "CurveKeys | None" = None,
    ) -> None:
        self.ctx = ctx
        self.id = peer_id
        self.config = config
        self.loop = loop
        self.security = security
        self.sockets: OrderedDict[int, Dealer] = OrderedDict()  # pooled, least recently used first
        self.open: set[Dealer] = set()  # every open DEALER, pooled or evicted-but-busy

    def get(self, peer: int, endpoint: str) -> Dealer:
        """The pooled socket to ``peer``, or a new one (evicting the least recently used)."""
        d = self.sockets.get(peer)
        if d is not None:
            self.sockets.move_to_end(peer)
            return d
        self.trim(self.config.pool_size - 1)
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # never queue a request for a peer not connected
        # A socket to a peer that is down stays in the pool (see Pull.unreachable): back off
        # its reconnects from 0.1 s up to 1 s instead of retrying every 0.1 s forever.
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        sock.setsockopt(zmq.ROUTING_ID, routing_id(self.id))
        sock.setsockopt(zmq.SNDHWM, self.config.hwm)
        sock.setsockopt(zmq.RCVHWM, self.config.hwm)
        # A reply bigger than the limit is cut off by ZeroMQ itself before we see it.
        limits = self.config.limits
        sock.setsockopt(zmq.MAXMSGSIZE, min(limits.max_bytes + limits.max_header_bytes + 4096, 2**62))
        if self.security is not None:  # a CURVE client: my key pair, and the key the server must prove
            sock.setsockopt(zmq.CURVE_PUBLICKEY, self.security.public)
            sock.setsockopt(zmq.CURVE_SECRETKEY, self.security.secret)
            sock.setsockopt(zmq.CURVE_SERVERKEY, self.security.server_key(peer))
        sock.connect(endpoint)
        d = Dealer(sock, peer, reconnects=not endpoint.startswith("inproc://"))
        # Registered for the socket's lifetime: a pull only sets what it waits for.
        self.loop.add_reader(d.fd, d.on_ready)
        self.sockets[peer] = d
        self.open.add(d)
        return d

    def release(self, d: Dealer, user: SocketUser) -> None:
        """``user`` is done with ``d``: the next pull queued on it starts; an evicted socket
        is closed once unused; the pool shrinks back to its size."""
        if d.op is user:
            d.op, d.want = None, 0
        else:
            try:
                d.queue.remove(user)
            except ValueError:
                pass
        d.users -= 1
        if d.op is None and d.queue and not d.closed:
            d.queue.popleft().begin()  # the next pull waiting for this socket
        if d.evicted and d.users == 0:
            self.close_socket(d)
        self.trim(self.config.pool_size)  # back to size after more concurrent pulls than it holds

    def trim(self, size: int) -> None:
        """Evict least recently used idle sockets until at most ``size`` remain; busy ones stay."""
        while len(self.sockets) > size:
            victim = next((k for k, v in self.sockets.items() if v.users == 0), None)
            if victim is None:
                break
            self.evict(victim)

    def evict(self, peer: int, dealer: Dealer | None = None) -> None:
        """Drop a socket from the pool; it is closed once no pull uses it any more."""
        d = dealer if dealer is not None else self.sockets.get(peer)
        if d is None:
            return
        if self.sockets.get(peer) is d:
            del self.sockets[peer]
        d.evicted = True
        if d.users == 0:
            self.close_socket(d)

    def close_socket(self, d: Dealer) -> None:
        """Close a DEALER; the pulls using or queued on it fail now."""
        if d.closed:
            return
        d.closed = True
        self.open.discard(d)
        # Before closing: a later socket may get the same descriptor number.
        self.loop.remove_reader(d.fd)
        d.sock.close(0)
        for op in [*([d.op] if d.op is not None else []), *d.queue]:
            op.socket_closed()

    def close(self) -> None:
        """Close every socket, pooled ones and evicted ones still in use."""
        self.sockets.clear()
        for d in list(self.open):
            self.close_socket(d)
