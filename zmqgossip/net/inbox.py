"""The server side of a peer: its inbox answers every request from the published snapshot.

Every peer binds one ROUTER *inbox*.  A pull request that arrives there is answered from
the last published :class:`~zmqgossip.wire.ModelPayload` (cached frames, no re-encoding)
whatever else the peer is doing: the inbox's descriptor is registered with the event loop
and requests are answered inside its readiness callback.  Awaiting ``recv`` instead would
cost a task wake-up and a Future per request (see docs/NETWORK.md).  A link emulator may
delay or lose each reply; with CURVE the inbox is a CURVE server behind the context's
gatekeeper, and the handshakes it refuses are counted.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import TYPE_CHECKING, Any, Protocol

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from .. import wire
from ..wire import Kind, ModelPayload, WireError
from .admission import Admission
from .config import Counters, TransportConfig, TransportError
from .frames import EVENTS, POLLIN, prepared_frames, recv_now, send_now

if TYPE_CHECKING:
    from ..security import CurveKeys

SERVED = (Kind.PULL_REQUEST, Kind.PING)
#: the longest one readiness callback works before the loop's other work runs
SLICE_S = 0.0005
#: flooded, the rounds of reads per call, and the longest wait for the next call
FLOOD_ROUNDS = 2
FLOOD_TICK_S = 0.005


class LinkModel(Protocol):
    """What the transport asks of a link emulator (see :mod:`zmqgossip.links`)."""

    def plan(self, src: int, dst: int, nbytes: int) -> tuple[int, float]:
        """Decide one message's fate at once: (copies that arrive, delay in seconds)."""
        ...


class Inbox:
    """One peer's ROUTER socket, serving its published snapshot. Use within one event loop."""

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        peer_id: int,
        endpoint: str,
        *,
        config: TransportConfig,
        counters: Counters,
        links: LinkModel | None = None,
        security: "CurveKeys | None" = None,
        serving: set[str] | None = None,
    ) -> None:
        self.ctx = ctx
        self.id = peer_id
        self.endpoint = endpoint
        self.config = config
        self.counters = counters
        self.links = links
        self.security = security
        #: the inproc endpoints served right now in this context (see Transport)
        self.serving = serving
        #: what a PING is answered with (the peer sets e.g. ready / done / step)
        self.status: dict[str, Any] = {}
        self.payload: ModelPayload | None = None
        self._frames: tuple = ()  # the published payload's frames, ready to send
        self._sock: zmq.asyncio.Socket | None = None
        self._sync: zmq.Socket | None = None  # a synchronous view of the same socket
        self._fd: int | None = None  # registered with the event loop while serving
        self._loop: asyncio.AbstractEventLoop | None = None
        self._monitor: zmq.asyncio.Socket | None = None
        self._monitor_task: asyncio.Task | None = None
        self._delayed: dict[int, asyncio.TimerHandle] = {}  # replies the link emulator holds back
        self._delayed_seq = itertools.count()
        self.admission = Admission(share=config.flood_share)
        self._tick: asyncio.TimerHandle | None = None  # flooded: the next round at the latest
        self._closed = False
        # Over inproc a zero-copy reply hands the puller a view of my cached snapshot: a
        # puller that changed its tensors in place would change what I serve. Copy there.
        self._copy_out = endpoint.startswith("inproc://")

    @property
    def is_open(self) -> bool:
        return self._sock is not None and not self._closed

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Bind and start serving."""
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unroutable replies raise, never vanish
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting puller takes over its id
        sock.setsockopt(zmq.SNDHWM, self.config.hwm)
        sock.setsockopt(zmq.RCVHWM, self.config.hwm)
        sock.setsockopt(zmq.MAXMSGSIZE, 64 * 1024)  # inbound are requests: small
        if self.security is not None:
            self._secure(sock)
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
        self._sock = sock
        if self.serving is not None and self.endpoint.startswith("inproc://"):
            self.serving.add(self.endpoint)
        self._sync = zmq.Socket.shadow(sock.underlying)
        # Served straight from the event loop's readiness callback: no task, no Future per
        # request (pyzmq's asyncio layer costs more than the rest of a small pull).
        self._loop = asyncio.get_running_loop()
        self._fd = self._sync.getsockopt(zmq.FD)
        self._loop.add_reader(self._fd, self._on_ready)

    async def close(self) -> None:
        """Stop serving and close the socket (LINGER 0: nothing waits)."""
        if self._closed:
            return
        self._closed = True
        if self.serving is not None and self._sock is not None:
            self.serving.discard(self.endpoint)
        if self._fd is not None and self._loop is not None:
            self._loop.remove_reader(self._fd)
            self._fd = None
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        for h in self._delayed.values():
            h.cancel()
        self._delayed.clear()
        if self._monitor_task is not None:
            self._monitor_task.cancel()
            await asyncio.gather(self._monitor_task, return_exceptions=True)
        self._stop_monitor()
        if self._sock is not None:
            self._sock.close(0)

    # ------------------------------------------------------------------ CURVE
    def _secure(self, sock: zmq.asyncio.Socket) -> None:
        """Make the inbox a CURVE server behind the context's gatekeeper (before binding)."""
        from ..security import gatekeeper

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
            if self._sock is not None:
                self._sock.disable_monitor()
        except zmq.ZMQError:
            pass
        mon.close(0)

    # ------------------------------------------------------------------ serving
    def publish(self, payload: ModelPayload) -> None:
        """Make ``payload`` the snapshot every later request is answered with."""
        self.payload = payload
        self._frames = payload.frames if self._copy_out else prepared_frames(payload.frames)

    def _on_ready(self) -> None:
        """The descriptor fired: answer the requests queued there.

        ZeroMQ's descriptor is edge-triggered: it fires when the socket's state changes and
        is re-armed by reading ``EVENTS``, so the queue is drained until ``EVENTS`` says it
        is empty. One call works for at most ``SLICE_S``, then lets the loop's other work
        run before it goes on. Trusted senders are answered at once, the others within the
        admission budget (see :mod:`.admission`).

        Once that budget is spent (a flood), a call reads ``FLOOD_ROUNDS`` *rounds*: ZeroMQ
        hands out one message per connection in turn, so reading until a routing id comes
        back reads every connection's next message, an honest request among them. The
        second round finds the connections that have just been emptied, and ZeroMQ signals
        the next message of a connection only once it has been seen empty. So the next
        call comes when the descriptor fires again, mostly for an honest request (the
        flood's connections stay full), or after ``FLOOD_TICK_S``; the messages left queued
        push back on their senders.
        """
        sync = self._sync
        if self._closed or sync is None:
            return
        adm = self.admission
        now = time.perf_counter()
        adm.refill(now)
        end = now + SLICE_S
        seen: set[bytes] | None = None  # the routing ids of this round, once flooded
        rounds = 0
        try:
            while True:
                if not sync.getsockopt(EVENTS) & POLLIN:
                    return
                frames = recv_now(sync)
                rid = frames[0].bytes
                if adm.is_trusted(rid):
                    self._handle(frames)
                elif adm.may_answer:
                    # CPU time, not wall time: a loaded machine's preemptions and waits for
                    # the GIL are not this sender's doing.
                    cpu = time.thread_time()
                    self._handle(frames)
                    adm.charge(time.thread_time() - cpu)
                else:
                    self._shed(frames)
                if seen is None:
                    if not adm.may_answer:
                        seen = {rid}
                elif rid not in seen:
                    seen.add(rid)
                else:
                    rounds += 1
                    if rounds == FLOOD_ROUNDS:
                        break
                    seen = {rid}
                now = time.perf_counter()
                if now >= end:
                    break
        except zmq.Again:
            return
        except zmq.ZMQError:  # e.g. the context is terminating: nothing left to serve
            return
        loop = self._loop
        assert loop is not None
        if adm.may_answer:
            loop.call_soon(self._on_ready)
        elif self._tick is None:
            self._tick = loop.call_later(FLOOD_TICK_S, self._on_tick)

    def _on_tick(self) -> None:
        self._tick = None
        self._on_ready()

    def _shed(self, frames: list) -> None:
        """Drop an untrusted message unread: the admission budget is spent (a flood)."""
        self.counters.msgs_in += 1
        self.counters.refusals["shed"] += 1

    def _handle(self, frames: list) -> None:
        """Answer one request that reached the inbox."""
        if len(frames) < 2:
            self.counters.refusals["frames"] += 1
            self.admission.distrust(frames[0].bytes)
            return
        rid, body = frames[0].bytes, frames[1:]
        self.counters.msgs_in += 1
        try:
            req = wire.decode(body, kinds=SERVED)
        except WireError as e:
            self.counters.bytes_in += sum(len(f) for f in body)
            self.counters.refusals[e.reason] += 1
            self.admission.distrust(rid)
            self._send(rid, wire.encode_error(self.id, 0, e.reason, e.detail))
            return
        self.counters.bytes_in += req.nbytes
        if req.kind is Kind.PING:
            self._send(rid, wire.encode_request(self.id, req.request_id, Kind.PONG, self.status), answered=True)
            return
        payload = self.payload
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

    def _send(self, rid: bytes, frames: list, served: bool = False, nbytes: int | None = None,
              answered: bool = False) -> None:
        """Send without ever blocking the serve loop: a full queue drops the reply.

        A model (``served``) or a pong (``answered``) that goes out makes its sender trusted.
        """
        assert self._sync is not None
        # EAGAIN: the queue is full; EHOSTUNREACH: the puller is gone. Both are counted.
        try:  # through the synchronous shadow: no Future per reply
            send_now(self._sync, [rid, *frames], copy=self._copy_out)
        except zmq.Again:
            self.counters.refusals["dropped_hwm"] += 1
            self.admission.distrust(rid)
            return
        except zmq.ZMQError:  # EHOSTUNREACH: the puller is gone
            self.counters.refusals["unreachable"] += 1
            self.admission.distrust(rid)
            return
        self.counters.msgs_out += 1
        self.counters.bytes_out += nbytes if nbytes is not None else sum(memoryview(f).nbytes for f in frames)
        if served:
            self.counters.served += 1
        if served or answered:
            self.admission.trust(rid)
