"""One ZeroMQ endpoint per peer: serve my snapshot, pull a neighbour's.

Every peer binds one ROUTER *inbox*.  A pull request that arrives there is answered from
the last published :class:`~zmqgossip.wire.ModelPayload` (cached frames, no re-encoding)
whatever else the peer is doing.  Pulls go out through DEALER sockets, one per remote peer,
kept in a small LRU pool so the number of sockets per peer stays bounded however many
peers exist.  Every pull has a deadline; a pull to a dead, slow or unknown peer returns a
failed :class:`PullResult` and leaves the pool usable.

Both sides run on event-loop callbacks, not tasks: ZeroMQ's descriptors are registered with
the loop, a request is answered inside the inbox's readiness callback, and a pull
(:class:`_Pull`) is sent, received, decoded and timed out by callbacks; the task that asked
for a set of pulls wakes once, when all of them are done.  A pull costs no task, no future
of its own and no coroutine frames, which is most of what asyncio would add to a small one.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import resource
import tempfile
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from . import wire
from .config import DEFAULT_HWM, DEFAULT_TIMEOUT_S, SMALL_POOL
from .wire import Kind, Limits, ModelPayload, Schema, WireError

if TYPE_CHECKING:
    from .security import CurveKeys

IPC_PATH_MAX = 107  # sun_path is 108 bytes including the terminating NUL

# Plain ints: with pyzmq's flag enums every `&` and `|` builds an enum member, a cost that
# shows in a pull's profile.
_EVENTS, _POLLIN, _POLLOUT = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.POLLOUT)
_DONTWAIT, _SNDMORE = int(zmq.DONTWAIT), int(zmq.SNDMORE)


_WANT_MODEL = (Kind.MODEL_REPLY, Kind.ERROR_REPLY)
_WANT_PONG = (Kind.PONG, Kind.ERROR_REPLY)
_SERVED = (Kind.PULL_REQUEST, Kind.PING)


def _send_now(sock: zmq.Socket, frames: list, copy: bool = True) -> None:
    """Send a multipart message without waiting (``zmq.Again`` if the queue is full).

    Once the first frame is queued ZeroMQ takes the rest of the message atomically.
    """
    last = len(frames) - 1
    for i, f in enumerate(frames):
        sock.send(f, _DONTWAIT | _SNDMORE if i < last else _DONTWAIT, copy=copy)


def _recv_now(sock: zmq.Socket) -> list:
    """Receive a whole multipart message without waiting, as zero-copy frames."""
    part = sock.recv(_DONTWAIT, copy=False)
    parts = [part]
    while part.more:  # the frame's own flag: no socket option lookup per frame
        part = sock.recv(_DONTWAIT, copy=False)
        parts.append(part)
    return parts


def prepared_frames(frames: Iterable[Any]) -> tuple[zmq.Frame, ...]:
    """ZeroMQ messages made once, for frames sent many times (a published snapshot).

    Every send then shares them by reference count. Sending the buffers themselves makes
    a message per frame per send, and frees each zero-copy one through pyzmq's collector
    thread (a GIL hand-off per frame per reply). Small frames are copied once here; large
    ones are shared with their buffer, which must not change while they exist.
    """
    return tuple(zmq.Frame(f, copy=memoryview(f).nbytes < wire.ZERO_COPY_THRESHOLD) for f in frames)


class TransportError(RuntimeError):
    """A transport cannot be set up (bad endpoint, limits too low, ...)."""


class LinkModel(Protocol):
    """What the transport asks of a link emulator (see :mod:`zmqgossip.links`)."""

    def plan(self, src: int, dst: int, nbytes: int) -> tuple[int, float]:
        """Decide one message's fate at once: (copies that arrive, delay in seconds)."""
        ...


@dataclass
class Counters:
    """Traffic and outcome counters of one peer's transport."""

    msgs_in: int = 0
    msgs_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    pulls_ok: int = 0
    pulls_failed: int = 0
    served: int = 0
    #: why pulls I made failed: "timeout", "unknown_peer", "socket", "refused:<reason>", a WireError reason
    pull_failures: Counter = field(default_factory=Counter)
    #: why requests that reached my inbox got no model: WireError reasons, "not_ready", "dropped_hwm";
    #: with CURVE also connections refused at the handshake: "auth" (key not in the roster),
    #: "handshake" (no key / plaintext, wrong server key, not ZeroMQ)
    refusals: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if not isinstance(v, Counter)}
        d["pull_failures"] = dict(self.pull_failures)
        d["refusals"] = dict(self.refusals)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Counters":
        c = cls(**{k: int(v) for k, v in d.items() if k not in ("pull_failures", "refusals")})
        c.pull_failures.update(d.get("pull_failures", {}))
        c.refusals.update(d.get("refusals", {}))
        return c


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


@dataclass(frozen=True)
class TransportConfig:
    """Socket options and bounds; defaults suit a few thousand peers on one machine."""

    pool_size: int = SMALL_POOL  # outgoing DEALERs kept per peer (LRU)
    timeout_s: float = DEFAULT_TIMEOUT_S  # default per-pull timeout
    hwm: int = DEFAULT_HWM  # messages queued per socket before refusing: models are big
    limits: Limits = wire.DEFAULT_LIMITS
    check_sender: bool = True


def routing_id(peer_id: int) -> bytes:
    return b"p%d" % peer_id


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
        self.endpoint = directory[peer_id] if bind is None else bind
        self.counters = Counters()
        self._payload: ModelPayload | None = None
        self._frames: tuple = ()  # the published payload's frames, ready to send
        self._inbox: zmq.asyncio.Socket | None = None
        self._inbox_sync: zmq.Socket | None = None  # a synchronous view of the same socket
        self._inbox_fd: int | None = None  # registered with the event loop while serving
        self._loop: asyncio.AbstractEventLoop | None = None
        self._monitor: zmq.asyncio.Socket | None = None
        self._monitor_task: asyncio.Task | None = None
        self._pool: OrderedDict[int, _Dealer] = OrderedDict()
        self._dealers: set[_Dealer] = set()  # every open DEALER, pooled or evicted-but-busy
        self._request_ids = iter(range(1, 2**62))
        self._closed = False
        self._delayed: dict[int, asyncio.TimerHandle] = {}  # replies the link emulator holds back
        self._delayed_seq = itertools.count()
        #: what a PING is answered with (the peer sets e.g. ready / done / step)
        self.status: dict[str, Any] = {}
        # Over inproc a zero-copy reply hands the puller a view of my cached snapshot: a
        # puller that changed its tensors in place would change what I serve. Copy there.
        self._copy_out = self.endpoint.startswith("inproc://")

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Bind the inbox and start serving."""
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unroutable replies raise, never vanish
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting puller takes over its id
        sock.setsockopt(zmq.SNDHWM, self.config.hwm)
        sock.setsockopt(zmq.RCVHWM, self.config.hwm)
        sock.setsockopt(zmq.MAXMSGSIZE, 64 * 1024)  # inbound are requests: small
        if self.security is not None:
            self._secure_inbox(sock)
        # A closed inproc socket releases its name only when ZeroMQ's reaper gets to it: a
        # peer that rejoins at once may find the name still taken for a moment.
        retry_until = time.monotonic() + (1.0 if self.endpoint.startswith("inproc://") else 0.0)
        while True:
            try:
                sock.bind(self.endpoint)
                break
            except zmq.ZMQError as e:
                if e.errno == zmq.EADDRINUSE and time.monotonic() < retry_until:
                    await asyncio.sleep(0.01)
                    continue
                self._stop_monitor()
                sock.close(0)
                raise TransportError(f"peer {self.id} cannot bind {self.endpoint}: {e}") from None
        if self.endpoint.startswith("tcp://") and self.endpoint.endswith(":0"):
            self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._inbox = sock
        if self.serving is not None and self.endpoint.startswith("inproc://"):
            self.serving.add(self.endpoint)
        self._inbox_sync = zmq.Socket.shadow(sock.underlying)
        # Served straight from the event loop's readiness callback: no task, no Future per
        # request (pyzmq's asyncio layer costs more than the rest of a small pull).
        self._loop = asyncio.get_running_loop()
        self._inbox_fd = self._inbox_sync.getsockopt(zmq.FD)
        self._loop.add_reader(self._inbox_fd, self._on_inbox)

    async def close(self) -> None:
        """Stop serving and close every socket (LINGER 0: nothing waits)."""
        if self._closed:
            return
        self._closed = True
        if self.serving is not None and self._inbox is not None:
            self.serving.discard(self.endpoint)
        if self._inbox_fd is not None and self._loop is not None:
            self._loop.remove_reader(self._inbox_fd)
            self._inbox_fd = None
        for h in self._delayed.values():
            h.cancel()
        self._delayed.clear()
        if self._monitor_task is not None:
            self._monitor_task.cancel()
            await asyncio.gather(self._monitor_task, return_exceptions=True)
        self._stop_monitor()
        self._pool.clear()
        for d in list(self._dealers):  # pooled ones and evicted ones still in use
            self._close_dealer(d)
        if self._inbox is not None:
            self._inbox.close(0)

    def reopen(self) -> "Transport":
        """A fresh transport at the same endpoint for a peer that rejoins; counters carry over."""
        t = Transport(self.ctx, self.id, self.directory, config=self.config, expect=self.expect, links=self.links,
                      security=self.security, serving=self.serving)
        t.counters = self.counters
        if self._payload is not None:
            t.publish(self._payload)
        return t

    # ------------------------------------------------------------------ CURVE
    def _secure_inbox(self, sock: zmq.asyncio.Socket) -> None:
        """Make the inbox a CURVE server behind the context's gatekeeper (before binding)."""
        from .security import gatekeeper

        keys = self.security
        assert keys is not None
        if self.endpoint.startswith("inproc://"):
            sock.close(0)
            raise TransportError(f"peer {self.id}: CURVE needs tcp or ipc endpoints, not {self.endpoint}")
        # The ZAP handler must run before the first handshake, or libzmq admits any key.
        gatekeeper(self.ctx, keys.peers.values())
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
        events = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
        self._monitor = sock.get_monitor_socket(events)
        self._monitor_task = asyncio.create_task(self._watch_handshakes(self._monitor), name=f"monitor-{self.id}")

    async def _watch_handshakes(self, mon: zmq.asyncio.Socket) -> None:
        """Count the connections my inbox refused during the CURVE handshake."""
        while True:
            try:
                ev = parse_monitor_message(await mon.recv_multipart())
            except asyncio.CancelledError:
                raise
            except Exception:  # a closed monitor or a malformed event: stop counting, keep serving
                return
            if ev["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self.counters.refusals["auth"] += 1  # the gatekeeper did not know the key
            else:
                self.counters.refusals["handshake"] += 1  # plaintext, wrong server key, garbage

    def _stop_monitor(self) -> None:
        mon, self._monitor = self._monitor, None
        if mon is None:
            return
        try:
            if self._inbox is not None:
                self._inbox.disable_monitor()
        except zmq.ZMQError:
            pass
        mon.close(0)

    # ------------------------------------------------------------------ serving
    def publish(self, payload: ModelPayload) -> None:
        """Make ``payload`` the snapshot every later request is answered with."""
        self._payload = payload
        if self._copy_out:
            self._frames = payload.frames
        else:
            self._frames = prepared_frames(payload.frames)

    @property
    def published(self) -> ModelPayload | None:
        return self._payload

    def _on_inbox(self) -> None:
        """The inbox's descriptor fired: answer the requests queued there.

        ZeroMQ's descriptor is edge-triggered: it fires when the socket's state changes and
        is re-armed by reading ``EVENTS``, so the queue is drained until ``EVENTS`` says it
        is empty. A burst is bounded; the rest is answered after the loop's other work.
        """
        sync = self._inbox_sync
        if self._closed or sync is None:
            return
        try:
            for _ in range(256):
                if not sync.getsockopt(_EVENTS) & _POLLIN:
                    return
                self._handle(_recv_now(sync))
        except zmq.Again:
            return
        except zmq.ZMQError:  # e.g. the context is terminating: nothing left to serve
            return
        assert self._loop is not None
        self._loop.call_soon(self._on_inbox)

    def _handle(self, frames: list) -> None:
        """Answer one request that reached the inbox."""
        if len(frames) < 2:
            self.counters.refusals["frames"] += 1
            return
        rid, body = frames[0].bytes, frames[1:]
        self.counters.msgs_in += 1
        try:
            req = wire.decode(body, kinds=_SERVED)
        except WireError as e:
            self.counters.bytes_in += sum(len(f) for f in body)
            self.counters.refusals[e.reason] += 1
            self._send(rid, wire.encode_error(self.id, 0, e.reason, e.detail))
            return
        self.counters.bytes_in += req.nbytes
        if req.kind is Kind.PING:
            self._send(rid, wire.encode_request(self.id, req.request_id, Kind.PONG, self.status))
            return
        payload = self._payload
        if payload is None:
            self.counters.refusals["not_ready"] += 1
            self._send(rid, wire.encode_error(self.id, req.request_id, "not_ready", "no model published yet"))
            return
        frames_out = [wire.reply_head(self.id, req.request_id), *self._frames]
        if self.links is None:
            self._send(rid, frames_out, served=True, nbytes=payload.nbytes + len(frames_out[0]))
            return
        copies, delay = self.links.plan(self.id, req.sender, payload.nbytes)
        if copies and delay > 0:
            # Each delayed reply waits out its own delay on a timer: no head-of-line blocking.
            assert self._loop is not None
            key = next(self._delayed_seq)
            self._delayed[key] = self._loop.call_later(delay, self._deliver_delayed, key, rid, frames_out, copies)
        else:  # lost, or a zero-delay link: no task, no sleep (the emulator costs ~nothing)
            self._deliver(rid, frames_out, copies)

    def _deliver_delayed(self, key: int, rid: bytes, frames: list, copies: int) -> None:
        del self._delayed[key]
        self._deliver(rid, frames, copies)

    def _deliver(self, rid: bytes, frames: list, copies: int) -> None:
        if not copies:
            self.counters.refusals["link_drop"] += 1
        for _ in range(copies):  # a duplicate is discarded by the puller (request id)
            self._send(rid, frames, served=True)

    def _send(self, rid: bytes, frames: list, served: bool = False, nbytes: int | None = None) -> None:
        """Send without ever blocking the serve loop: a full queue drops the reply."""
        assert self._inbox is not None
        # EAGAIN: the queue is full; EHOSTUNREACH: the puller is gone. Both are counted.
        err: zmq.ZMQError | None = None
        try:  # through the synchronous shadow: no Future per reply
            _send_now(self._inbox_sync, [rid, *frames], copy=self._copy_out)
        except zmq.ZMQError as e:
            err = e
        if isinstance(err, zmq.Again):
            self.counters.refusals["dropped_hwm"] += 1
            return
        if isinstance(err, zmq.ZMQError):  # EHOSTUNREACH: the puller is gone
            self.counters.refusals["unreachable"] += 1
            return
        self.counters.msgs_out += 1
        self.counters.bytes_out += nbytes if nbytes is not None else sum(memoryview(f).nbytes for f in frames)
        if served:
            self.counters.served += 1

    # ------------------------------------------------------------------ pulling
    async def pull(
        self, peer: int, timeout: float | None = None, expect: Schema | None = None, kind: Kind = Kind.PULL_REQUEST
    ) -> PullResult:
        """Pull ``peer``'s current model. Never raises for network trouble; never hangs."""
        return (await self._pulls((peer,), timeout, expect, kind))[0]

    async def pull_many(self, peers: Iterable[int], timeout: float | None = None) -> list[PullResult]:
        """Pull several peers concurrently; results in the order of ``peers``."""
        return await self.start_pulls(peers, timeout).wait()

    def start_pulls(self, peers: Iterable[int], timeout: float | None = None) -> "PullBatch":
        """Send one pull per peer now; ``await batch.wait()`` gives the results in that order.

        For a caller that does something while they travel (a peer lends its turn when
        they take long, see turns.py) without wrapping them in a task of their own.
        """
        return self._begin(tuple(peers), timeout, None, Kind.PULL_REQUEST)

    async def ping(self, peer: int, timeout: float = 1.0) -> dict[str, Any] | None:
        """``peer``'s status map if it answers within ``timeout``, else None."""
        r = await self.pull(peer, timeout, kind=Kind.PING)
        return r.message.meta if r.ok and r.message is not None else None

    async def _pulls(self, peers: tuple[int, ...], timeout: float | None, expect: Schema | None, kind: Kind) -> list[PullResult]:
        return await self._begin(peers, timeout, expect, kind).wait()

    def _begin(self, peers: tuple[int, ...], timeout: float | None, expect: Schema | None, kind: Kind) -> "PullBatch":
        """Start one pull per peer at once.

        A pull is not a task: it is sent, answered and timed out by event-loop callbacks
        (:class:`_Pull`), and the task that waits on the batch wakes once, when the last one
        is done.
        """
        timeout = self.config.timeout_s if timeout is None else timeout
        if self._loop is None:  # a transport that only pulls is never started
            self._loop = asyncio.get_running_loop()
        batch = PullBatch(len(peers), self._loop.create_future())
        expect = expect if expect is not None else self.expect
        try:
            for i, peer in enumerate(peers):
                batch.ops.append(self._start(peer, timeout, expect, kind, batch, i))
        except BaseException:  # e.g. no socket could be opened: end the pulls already sent
            for op in batch.ops:
                op.abandon()
            raise
        if batch.left:  # one timer ends every pull of the batch still going at the deadline
            batch.timer = self._loop.call_at(self._loop.time() + timeout, batch.expire)
        return batch

    def _start(self, peer: int, timeout: float, expect: Schema | None, kind: Kind, batch: "PullBatch", index: int) -> "_Pull":
        op = _Pull(self, peer, expect, kind, batch, index)
        if self._closed:  # no socket may be opened after close(): it would never be closed
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
            self._evict(peer)  # an inproc socket never reconnects: a fresh one serves it when it is back
            op.finish(PullResult(peer, False, reason="unreachable", detail=f"peer {peer} is not serving (nothing bound at {endpoint})"))
            return op
        dealer = op.dealer = self._dealer(peer, endpoint)
        dealer.users += 1  # held from now on: the LRU must not close this socket under the pull
        if dealer.op is None:
            op.begin()
        else:  # one request in flight per socket, so that replies come back in order
            dealer.queue.append(op)
        return op

    def _close_dealer(self, d: "_Dealer") -> None:
        """Close a DEALER; the pulls using or queued on it fail now."""
        if d.closed:
            return
        d.closed = True
        self._dealers.discard(d)
        if self._loop is not None:
            # Before closing: a later socket may get the same descriptor number.
            self._loop.remove_reader(d.fd)
        d.sock.close(0)
        for op in [*([d.op] if d.op is not None else []), *d.queue]:
            op.finish(PullResult(op.peer, False, reason="socket", detail=f"socket to peer {op.peer} was closed"))

    def _count(self, res: PullResult, kind: Kind) -> PullResult:
        """Pull outcomes are counted; pings (readiness, liveness) are not pulls."""
        if kind is Kind.PULL_REQUEST:
            if res.ok:
                self.counters.pulls_ok += 1
            else:
                self.counters.pulls_failed += 1
                self.counters.pull_failures[res.reason or "unknown"] += 1
        return res

    def _dealer(self, peer: int, endpoint: str) -> "_Dealer":
        d = self._pool.get(peer)
        if d is not None:
            self._pool.move_to_end(peer)
            return d
        self._trim(self.config.pool_size - 1)
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # never queue a request for a peer not connected
        # A socket to a peer that is down stays in the pool (see _Pull.unreachable): back off
        # its reconnects from 0.1 s up to 1 s instead of retrying every 0.1 s forever.
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        sock.setsockopt(zmq.ROUTING_ID, routing_id(self.id))
        sock.setsockopt(zmq.SNDHWM, self.config.hwm)
        sock.setsockopt(zmq.RCVHWM, self.config.hwm)
        # A reply bigger than the limit is cut off by ZeroMQ itself before we see it.
        sock.setsockopt(zmq.MAXMSGSIZE, min(self.config.limits.max_bytes + self.config.limits.max_header_bytes + 4096, 2**62))
        if self.security is not None:  # a CURVE client: my key pair, and the key the server must prove
            sock.setsockopt(zmq.CURVE_PUBLICKEY, self.security.public)
            sock.setsockopt(zmq.CURVE_SECRETKEY, self.security.secret)
            sock.setsockopt(zmq.CURVE_SERVERKEY, self.security.server_key(peer))
        sock.connect(endpoint)
        d = _Dealer(sock)
        assert self._loop is not None
        # ipc/tcp sockets reconnect by themselves; an inproc one never does once its peer
        # closed (and a request to an unbound inproc name waits for whoever binds it).
        d.reconnects = not endpoint.startswith("inproc://")
        # Registered for the socket's lifetime: a pull only sets what it waits for.
        self._loop.add_reader(d.fd, d.on_ready)
        self._pool[peer] = d
        self._dealers.add(d)
        return d

    def _trim(self, size: int) -> None:
        """Evict least recently used idle sockets until at most ``size`` remain; busy ones stay."""
        while len(self._pool) > size:
            victim = next((k for k, v in self._pool.items() if v.users == 0), None)
            if victim is None:
                break
            self._evict(victim)

    def _evict(self, peer: int, dealer: "_Dealer | None" = None) -> None:
        """Drop a socket from the pool; it is closed once no pull uses it any more."""
        d = dealer if dealer is not None else self._pool.get(peer)
        if d is None:
            return
        if self._pool.get(peer) is d:
            del self._pool[peer]
        d.evicted = True
        if d.users == 0:
            self._close_dealer(d)

    @property
    def sockets_open(self) -> int:
        return len(self._pool) + (self._inbox is not None and not self._closed)


class _Dealer:
    """One outgoing socket to one peer, its descriptor registered with the event loop."""

    def __init__(self, sock: zmq.asyncio.Socket) -> None:
        self.sock = sock
        self.sync = zmq.Socket.shadow(sock.underlying)  # a synchronous view of the same socket
        self.fd = self.sync.getsockopt(zmq.FD)  # ZeroMQ's descriptor for the event loop
        self.users = 0  # pulls using or queued on this socket
        self.evicted = False  # out of the pool; closed when users drops to 0
        self.closed = False
        self.reconnects = True  # ipc/tcp: ZeroMQ connects again after the peer went away
        self.was_connected = False  # a request went out once: not connected now = peer gone
        self.down = False  # never connected within a pull's timeout: pulls fail at once
        self.op: _Pull | None = None  # the pull whose request is on this socket
        self.want = 0  # what that pull waits for: POLLOUT to send, POLLIN for the reply
        self.queue: deque[_Pull] = deque()  # pulls waiting for the socket

    def on_ready(self) -> None:
        """The descriptor fired: move the current pull on if what it waits for is there.

        Reading ``EVENTS`` re-arms ZeroMQ's edge-triggered descriptor (else the loop would
        call us again and again); ZeroMQ's internal commands (about half the firings during
        a pull) do no other work.
        """
        op = self.op
        try:
            events = self.sync.getsockopt(_EVENTS)
        except zmq.ZMQError as e:
            if op is not None:
                op.fail(e)
            return
        if op is not None and events & self.want:
            if self.want == _POLLIN:
                op.receive(known=True)
            else:
                op.send()


class PullBatch:
    """The pulls of one ``pull``/``pull_many``/``start_pulls`` call; its future is set by the
    last one to finish."""

    __slots__ = ("results", "left", "future", "ops", "timer")

    def __init__(self, n: int, future: asyncio.Future) -> None:
        self.results: list[PullResult | None] = [None] * n
        self.left = n
        self.future = future
        self.ops: list[_Pull] = []
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


class _Pull:
    """One pull: request out, reply in, decoded; driven by event-loop callbacks, not a task.

    Life: queued on its DEALER (one request in flight per socket, so replies come back in
    order) -> :meth:`begin` (the link emulator may delay or lose the request) -> :meth:`send`
    -> :meth:`receive` -> :meth:`finish`. Its batch's timer ends it in any state; a socket that timed
    out may still hold a late reply or a queued request, so it is evicted and a fresh one
    serves the next pull to that peer.
    """

    __slots__ = ("t", "peer", "expect", "kind", "batch", "index", "t0", "dealer", "later",
                 "request_id", "frames", "done")

    def __init__(self, t: Transport, peer: int, expect: Schema | None, kind: Kind, batch: PullBatch, index: int) -> None:
        self.t, self.peer, self.expect, self.kind, self.batch, self.index = t, peer, expect, kind, batch, index
        self.t0 = time.perf_counter()
        self.dealer: _Dealer | None = None
        self.later: asyncio.TimerHandle | None = None  # a request the link emulator delays
        self.request_id = 0
        self.frames: list = []
        self.done = False

    def begin(self) -> None:
        t, d = self.t, self.dealer
        assert d is not None
        d.op = self
        self.request_id = next(t._request_ids)
        self.frames = wire.encode_request(t.id, self.request_id, self.kind)
        if t.links is not None:
            copies, delay = t.links.plan(t.id, self.peer, len(self.frames[0]))
            if not copies:
                return  # a lost request: only the batch's timer ends this pull
            if delay > 0:
                assert t._loop is not None
                self.later = t._loop.call_later(delay, self.send)
                return
        self.send()

    def send(self) -> None:
        self.later = None
        d, loop = self.dealer, self.t._loop
        assert d is not None and loop is not None
        try:
            _send_now(d.sync, self.frames)
        except zmq.Again:  # not connected (IMMEDIATE; one request in flight, so never full)
            if d.was_connected or d.down:  # the peer went away, or never came: do not wait
                if not d.reconnects:
                    self.t._evict(self.peer, d)
                self.unreachable()
                return
            d.want = _POLLOUT  # a fresh socket still connecting: wait, up to the timeout
            loop.call_soon(d.on_ready)  # reads EVENTS: re-arms the descriptor, or sends now
            return
        except zmq.ZMQError as e:
            self.fail(e)
            return
        d.was_connected = True
        c = self.t.counters
        c.msgs_out += 1
        c.bytes_out += len(self.frames[0])
        d.want = _POLLIN
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
        d, t = self.dealer, self.t
        assert d is not None
        c = t.counters
        want = _WANT_PONG if self.kind is Kind.PING else _WANT_MODEL
        try:
            while known or d.sync.getsockopt(_EVENTS) & _POLLIN:
                known = False
                reply = _recv_now(d.sync)
                c.msgs_in += 1
                try:
                    msg = wire.decode(reply, expect=self.expect, limits=t.config.limits, kinds=want)
                except WireError as e:
                    nbytes = sum(memoryview(f).nbytes for f in reply)
                    c.bytes_in += nbytes
                    self.finish(PullResult(self.peer, False, reason=e.reason, detail=e.detail, nbytes=nbytes))
                    return
                nbytes = msg.nbytes  # counted by decode (a model's from its validated table)
                c.bytes_in += nbytes
                if msg.request_id != self.request_id and not (msg.kind is Kind.ERROR_REPLY and msg.request_id == 0):
                    continue  # a late answer to an earlier request on this socket
                if t.config.check_sender and msg.sender != self.peer:
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
        self.t._evict(self.peer, self.dealer)
        self.finish(PullResult(self.peer, False, reason="socket", detail=f"socket error pulling peer {self.peer}: {e}"))

    def expire(self) -> None:
        d = self.dealer
        if d is not None and d.op is self:
            if d.want == _POLLOUT and d.reconnects:
                # Never connected within this pull's timeout: the socket holds no request,
                # so it stays (reconnecting) and the next pulls to this peer fail at once.
                d.down = True
                self.unreachable()
                return
            self.t._evict(self.peer, d)  # it may still get the reply, or hold the request
        self.finish(PullResult(self.peer, False, reason="timeout",
                               detail=f"no reply from peer {self.peer} within {time.perf_counter() - self.t0:.3g}s"))

    def abandon(self) -> None:
        """The caller was cancelled: end the pull without a result or a count."""
        if not self.done:
            if self.dealer is not None and self.dealer.op is self:
                self.t._evict(self.peer, self.dealer)
            self.finish(None)

    def finish(self, res: PullResult | None) -> None:
        if self.done:
            return
        self.done = True
        if self.later is not None:
            self.later.cancel()
            self.later = None
        t, d = self.t, self.dealer
        if d is not None:
            if d.op is self:
                d.op, d.want = None, 0
            else:
                try:
                    d.queue.remove(self)
                except ValueError:
                    pass
            d.users -= 1
            if d.op is None and d.queue and not d.closed:
                d.queue.popleft().begin()  # the next pull waiting for this socket
            if d.evicted and d.users == 0:
                t._close_dealer(d)
            t._trim(t.config.pool_size)  # back to size after more concurrent pulls than it holds
        if res is None:
            return
        res.latency_s = time.perf_counter() - self.t0
        self.batch.deliver(self.index, t._count(res, self.kind))


# ---------------------------------------------------------------------- endpoints


def ipc_dir(prefix: str = "zg") -> str:
    """A fresh short directory for ipc sockets.

    ipc paths must fit in 107 bytes, and a long TMPDIR (macOS, CI runners) breaks that,
    so fall back to /tmp when the default temp dir is too long.
    """
    base = tempfile.gettempdir()
    if len(base) > 40 and os.path.isdir("/tmp"):
        base = "/tmp"
    return tempfile.mkdtemp(prefix=prefix, dir=base)


_INPROC_SEQ = itertools.count()  # inproc names must differ between directories of one process


def make_directory(kind: str, peers: Iterable[int], *, base: str | None = None, host: str = "127.0.0.1",
                   port0: int = 0) -> dict[int, str]:
    """Endpoints for peers on one machine: ``inproc``, ``ipc`` (under ``base``) or ``tcp``.

    For tcp, ``port0`` > 0 assigns consecutive ports; ``port0`` = 0 asks for free ports.
    """
    peers = list(peers)
    if kind == "inproc":
        tag = base or f"{os.getpid()}-{next(_INPROC_SEQ)}"
        return {p: f"inproc://zg-{tag}-{p}" for p in peers}
    if kind == "ipc":
        base = base or ipc_dir()
        out = {p: f"ipc://{base}/{p}" for p in peers}
        longest = max((len(e) - len("ipc://") for e in out.values()), default=0)
        if longest > IPC_PATH_MAX:
            raise TransportError(f"ipc path of {longest} bytes exceeds {IPC_PATH_MAX}: use a shorter base directory than {base!r}")
        return out
    if kind == "tcp":
        ports = [port0 + i for i in range(len(peers))] if port0 else free_tcp_ports(len(peers), host)
        return {p: f"tcp://{host}:{port}" for p, port in zip(peers, ports)}
    raise TransportError(f"unknown transport {kind!r}: use inproc, ipc or tcp")


def free_tcp_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """Ask the OS for ``n`` distinct free ports (held open together, then released)."""
    import socket

    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# ---------------------------------------------------------------------- preflight


@dataclass(frozen=True)
class Budget:
    """What N peers in this process are expected to use."""

    peers: int
    sockets: int
    fds: int


def socket_budget(peers: int, pool_size: int, transport: str, secure: bool = False) -> Budget:
    """Sockets and file descriptors for ``peers`` peers hosted by one process.

    Each ZeroMQ socket holds one descriptor (its mailbox); each ipc/tcp connection holds
    one at each end, and both ends live here when the peers share the process; each
    ipc/tcp inbox also holds the descriptor it listens on. A socket the LRU closes keeps
    its slot and descriptor until ZeroMQ's reaper thread frees them, and under load the
    reaper falls behind by many sockets (1,000 peers pulling uniformly at random, with
    pools of 8, ran out of slots at the exact count): half a pool per peer is kept free
    for them. With CURVE (``secure``) each inbox has a monitor (two sockets) and the
    process one ZAP handler.
    """
    reaping = peers * max(1, pool_size // 2)
    sockets = peers * (2 + pool_size) + reaping + (peers * 2 + 1 if secure else 0)
    # ipc/tcp: each bound inbox also holds its listening descriptor.
    conns = 0 if transport == "inproc" else peers * (pool_size * 2 + 1)
    return Budget(peers, sockets, sockets + conns + 64)


def preflight(ctx: zmq.Context, peers: int, pool_size: int, transport: str, secure: bool = False) -> Budget:
    """Raise the socket and descriptor limits as far as allowed, or fail with what to do.

    Call before the context creates its first socket (ZeroMQ fixes MAX_SOCKETS then).
    """
    need = socket_budget(peers, pool_size, transport, secure)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if need.fds > soft:
        target = need.fds if hard == resource.RLIM_INFINITY else min(need.fds, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if need.fds > soft:
        raise TransportError(
            f"{peers} peers with pool_size={pool_size} over {transport} need about {need.fds} file "
            f"descriptors, but this process may open only {soft} (hard limit {hard}). Raise it "
            f"(e.g. `ulimit -n {need.fds}` as root, or LimitNOFILE for a service), spread the "
            f"peers over more processes, or lower pool_size."
        )
    try:
        if ctx.get(zmq.MAX_SOCKETS) < need.sockets + 16:
            ctx.set(zmq.MAX_SOCKETS, need.sockets + 16)
    except zmq.ZMQError as e:
        raise TransportError(f"cannot raise ZeroMQ MAX_SOCKETS to {need.sockets + 16}: {e}") from None
    limit = ctx.get(zmq.SOCKET_LIMIT)
    if need.sockets + 16 > limit:
        raise TransportError(
            f"{peers} peers need {need.sockets} ZeroMQ sockets; this libzmq allows {limit} per context. "
            f"Spread the peers over more processes or lower pool_size."
        )
    return need
