"""One ZeroMQ endpoint per peer: serve my snapshot, pull a neighbour's.

Every peer binds one ROUTER *inbox*.  A pull request that arrives there is answered from
the last published :class:`~zmqgossip.wire.ModelPayload` (cached frames, no re-encoding)
whatever else the peer is doing.  Pulls go out through DEALER sockets, one per remote peer,
kept in a small LRU pool so the number of sockets per peer stays bounded however many
peers exist.  Every await has a timeout; a pull to a dead, slow or unknown peer returns a
failed :class:`PullResult` and leaves the pool usable.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import resource
import tempfile
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from . import wire
from .wire import Kind, Limits, ModelPayload, Schema, WireError

if TYPE_CHECKING:
    from .security import CurveKeys

IPC_PATH_MAX = 107  # sun_path is 108 bytes including the terminating NUL

# Plain ints: with pyzmq's flag enums every `&` and `|` builds an enum member, a cost that
# shows in a pull's profile.
_EVENTS, _POLLIN, _POLLOUT = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.POLLOUT)
_DONTWAIT, _SNDMORE = int(zmq.DONTWAIT), int(zmq.SNDMORE)


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


class TransportError(RuntimeError):
    """A transport cannot be set up (bad endpoint, limits too low, ...)."""


class LinkModel(Protocol):
    """What the transport asks of a link emulator (see :mod:`zmqgossip.links`)."""

    async def transit(self, src: int, dst: int, nbytes: int) -> int:
        """Wait as long as the link src->dst takes for ``nbytes``; return the copies
        that arrive (0: lost, 2: duplicated)."""
        ...

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

    pool_size: int = 8  # outgoing DEALERs kept per peer (LRU)
    timeout_s: float = 10.0  # default per-pull timeout
    hwm: int = 16  # messages queued per socket before refusing: models are big
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
    ) -> None:
        self.ctx = ctx
        self.id = peer_id
        self.directory = directory
        self.config = config
        self.expect = expect
        self.links = links
        #: CURVE keys (own pair, the roster's public keys): encrypted, authenticated peers
        self.security = security
        self.endpoint = directory[peer_id] if bind is None else bind
        self.counters = Counters()
        self._payload: ModelPayload | None = None
        self._inbox: zmq.asyncio.Socket | None = None
        self._inbox_sync: zmq.Socket | None = None  # a synchronous view of the same socket
        self._inbox_fd: int | None = None  # registered with the event loop while serving
        self._loop: asyncio.AbstractEventLoop | None = None
        self._monitor: zmq.asyncio.Socket | None = None
        self._monitor_task: asyncio.Task | None = None
        self._pool: OrderedDict[int, _Dealer] = OrderedDict()
        self._request_ids = iter(range(1, 2**62))
        self._closed = False
        self._replies: set[asyncio.Task] = set()
        #: what a PING is answered with (the peer sets e.g. ready / done / step)
        self.status: dict[str, Any] = {}
        # Over inproc a zero-copy reply hands the puller a view of my cached snapshot: a
        # puller that changed its tensors in place would change what I serve. Copy there.
        self._copy_out = False

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
        try:
            sock.bind(self.endpoint)
        except zmq.ZMQError as e:
            self._stop_monitor()
            sock.close(0)
            raise TransportError(f"peer {self.id} cannot bind {self.endpoint}: {e}") from None
        if self.endpoint.startswith("tcp://") and self.endpoint.endswith(":0"):
            self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._copy_out = self.endpoint.startswith("inproc://")
        self._inbox = sock
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
        if self._inbox_fd is not None and self._loop is not None:
            self._loop.remove_reader(self._inbox_fd)
            self._inbox_fd = None
        tasks = [t for t in (self._monitor_task, *self._replies) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._stop_monitor()
        for d in self._pool.values():
            self._close_dealer(d)
        self._pool.clear()
        if self._inbox is not None:
            self._inbox.close(0)

    def reopen(self) -> "Transport":
        """A fresh transport at the same endpoint for a peer that rejoins; counters carry over."""
        t = Transport(self.ctx, self.id, self.directory, config=self.config, expect=self.expect, links=self.links,
                      security=self.security)
        t.counters = self.counters
        t._payload = self._payload
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
        self.counters.bytes_in += sum(len(f) for f in body)
        try:
            req = wire.decode(body, kinds=(Kind.PULL_REQUEST, Kind.PING))
        except WireError as e:
            self.counters.refusals[e.reason] += 1
            self._send(rid, wire.encode_error(self.id, 0, e.reason, e.detail))
            return
        if req.kind is Kind.PING:
            self._send(rid, wire.encode_request(self.id, req.request_id, Kind.PONG, self.status))
            return
        payload = self._payload
        if payload is None:
            self.counters.refusals["not_ready"] += 1
            self._send(rid, wire.encode_error(self.id, req.request_id, "not_ready", "no model published yet"))
            return
        frames_out = payload.reply(self.id, req.request_id)
        if self.links is None:
            self._send(rid, frames_out, served=True, nbytes=payload.nbytes + len(frames_out[0]))
            return
        copies, delay = self.links.plan(self.id, req.sender, payload.nbytes)
        if copies and delay > 0:
            # Each delayed reply waits out its own delay: no head-of-line blocking.
            t = asyncio.create_task(self._deliver_later(rid, frames_out, copies, delay))
            self._replies.add(t)
            t.add_done_callback(self._replies.discard)
        else:  # lost, or a zero-delay link: no task, no sleep (the emulator costs ~nothing)
            self._deliver(rid, frames_out, copies)

    async def _deliver_later(self, rid: bytes, frames: list, copies: int, delay: float) -> None:
        await asyncio.sleep(delay)
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
        timeout = self.config.timeout_s if timeout is None else timeout
        t0 = time.perf_counter()
        if self._closed:  # no socket may be opened after close(): it would never be closed
            return self._count(PullResult(peer, False, reason="closed", detail="this transport is closed"), kind)
        endpoint = self.directory.get(peer)
        if endpoint is None or peer == self.id:
            res = PullResult(peer, False, reason="unknown_peer", detail=f"peer {peer} is not in the directory")
            return self._count(res, kind)
        if self.security is not None and self.security.server_key(peer) is None:
            res = PullResult(peer, False, reason="unknown_peer", detail=f"no CURVE public key for peer {peer}")
            return self._count(res, kind)
        dealer = self._dealer(peer, endpoint)
        # Held from now on, not from when the lock is taken (on Python < 3.11 wait_for
        # starts the task later): the LRU must not close this socket in between.
        dealer.users += 1

        async def locked() -> PullResult:
            async with dealer.lock:
                return await self._exchange(dealer, peer, expect if expect is not None else self.expect, kind)

        try:
            res = await _within(locked(), timeout)
        except asyncio.TimeoutError:
            # The socket may hold a late reply or a queued request: drop it, a fresh one
            # replaces it on the next pull.
            self._evict(peer, dealer)
            res = PullResult(peer, False, reason="timeout", detail=f"no reply from peer {peer} within {timeout:.3g}s")
        except zmq.ZMQError as e:  # e.g. the transport was closed under this pull
            self._evict(peer, dealer)
            res = PullResult(peer, False, reason="socket", detail=f"socket error pulling peer {peer}: {e}")
        finally:
            dealer.users -= 1
            if dealer.evicted and dealer.users == 0:
                self._close_dealer(dealer)
            self._trim(self.config.pool_size)  # back to size after more concurrent pulls than it holds
        res.latency_s = time.perf_counter() - t0
        return self._count(res, kind)

    async def pull_many(self, peers: Iterable[int], timeout: float | None = None) -> list[PullResult]:
        """Pull several peers concurrently; results in the order of ``peers``."""
        return list(await asyncio.gather(*(self.pull(p, timeout) for p in peers)))

    async def ping(self, peer: int, timeout: float = 1.0) -> dict[str, Any] | None:
        """``peer``'s status map if it answers within ``timeout``, else None."""
        r = await self.pull(peer, timeout, kind=Kind.PING)
        return r.message.meta if r.ok and r.message is not None else None

    async def _exchange(self, dealer: "_Dealer", peer: int, expect: Schema | None, kind: Kind) -> PullResult:
        request_id = next(self._request_ids)
        frames = wire.encode_request(self.id, request_id, kind)
        if self.links is not None and not await self.links.transit(self.id, peer, len(frames[0])):
            await asyncio.sleep(float("inf"))  # a lost request: only the timeout ends it
        while True:  # a full or not yet connected socket (IMMEDIATE) waits; the timeout bounds it
            try:
                _send_now(dealer.sync, frames)
                break
            except zmq.Again:
                await self._ready(dealer, _POLLOUT)
        self.counters.msgs_out += 1
        self.counters.bytes_out += len(frames[0])
        while True:
            await self._ready(dealer, _POLLIN)
            reply = _recv_now(dealer.sync)
            nbytes = sum(len(f) for f in reply)
            self.counters.msgs_in += 1
            self.counters.bytes_in += nbytes
            want = (Kind.PONG, Kind.ERROR_REPLY) if kind is Kind.PING else (Kind.MODEL_REPLY, Kind.ERROR_REPLY)
            try:
                msg = wire.decode(reply, expect=expect, limits=self.config.limits, kinds=want)
            except WireError as e:
                return PullResult(peer, False, reason=e.reason, detail=e.detail, nbytes=nbytes)
            if msg.request_id != request_id and not (msg.kind is Kind.ERROR_REPLY and msg.request_id == 0):
                continue  # a late answer to an earlier request on this socket
            if self.config.check_sender and msg.sender != peer:
                return PullResult(
                    peer, False, reason="sender", detail=f"asked peer {peer}, reply says {msg.sender}", nbytes=nbytes
                )
            if msg.kind is Kind.ERROR_REPLY:
                return PullResult(peer, False, reason=f"refused:{msg.reason}", detail=msg.detail, nbytes=nbytes)
            return PullResult(peer, True, message=msg, nbytes=nbytes)

    async def _ready(self, dealer: "_Dealer", event: int) -> None:
        """Wait until ``dealer`` can do ``event`` (POLLIN / POLLOUT).

        Reading ``EVENTS`` re-arms ZeroMQ's edge-triggered descriptor, so a change after
        the check makes it readable for the event loop, and one before it shows in the check.
        """
        while not dealer.sync.getsockopt(_EVENTS) & event:
            assert self._loop is not None  # set when the DEALER was made
            waiter = self._loop.create_future()
            dealer.waiter = waiter
            try:
                await waiter
            finally:
                dealer.waiter = None

    def _close_dealer(self, d: "_Dealer") -> None:
        """Close a DEALER; a pull waiting on it fails now (its descriptor is gone)."""
        if self._loop is not None:
            # Before closing: a later socket may get the same descriptor number.
            self._loop.remove_reader(d.fd)
        waiter, d.waiter = d.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(zmq.ZMQError(zmq.ENOTSOCK, "the socket was closed"))
        d.sock.close(0)

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
        if self._loop is None:  # a transport that only pulls is never started
            self._loop = asyncio.get_running_loop()
        # Registered for the socket's lifetime: a pull only sets ``waiter``, no system call.
        self._loop.add_reader(d.fd, d.on_ready)
        self._pool[peer] = d
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


if hasattr(asyncio, "timeout"):  # Python >= 3.11

    async def _within(coro: Any, timeout: float) -> Any:
        """``await coro`` with a deadline, in the caller's task: unlike ``wait_for`` (before
        3.12) no extra task, so a pull costs two event-loop turns fewer."""
        async with asyncio.timeout(timeout):
            return await coro

else:  # pragma: no cover - Python 3.10
    _within = asyncio.wait_for


@dataclass
class _Dealer:
    sock: zmq.asyncio.Socket
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0  # pulls holding or waiting for this socket
    evicted: bool = False  # out of the pool; closed when users drops to 0
    sync: zmq.Socket = field(init=False)  # a synchronous view of the same socket
    fd: int = field(init=False)  # ZeroMQ's descriptor for the event loop
    waiter: asyncio.Future | None = None  # the pull waiting for this socket, if any

    def __post_init__(self) -> None:
        self.sync = zmq.Socket.shadow(self.sock.underlying)
        self.fd = self.sync.getsockopt(zmq.FD)

    def on_ready(self) -> None:
        """The descriptor fired: wake the waiting pull, or re-arm it if none waits."""
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)  # it reads EVENTS itself, which re-arms the descriptor
            return
        try:
            self.sync.getsockopt(_EVENTS)  # else the loop would call us again and again
        except zmq.ZMQError:
            pass


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
    ipc/tcp inbox also holds the descriptor it listens on.  A socket
    the LRU closes keeps its slot and descriptor until ZeroMQ's reaper thread frees them,
    so each peer briefly holds one socket more than its inbox and pool.  With CURVE
    (``secure``) each inbox has a monitor (two sockets) and the process one ZAP handler.
    """
    sockets = peers * (2 + pool_size) + (peers * 2 + 1 if secure else 0)
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
