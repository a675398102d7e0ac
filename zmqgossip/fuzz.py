"""Hostile traffic for a peer's inbox: what the fuzz tests and the fuzz benchmark send.

:func:`hostile_message` draws one message (a list of frames) of a category:

``random_bytes``   one frame of random bytes
``random_frames``  1..12 frames of random bytes, sometimes behind a valid head
``mutated``        a valid request (pull, ping, with or without a body) mutated byte by
                   byte: flips, overwrites, inserts, deletes, truncation, frames dropped,
                   duplicated, swapped or added
``huge_sizes``     msgpack headers that declare containers or strings of up to 4 GiB,
                   deep nesting, out-of-range integers, a model reply whose tensor table
                   declares petabytes
``bad_version``    a well-formed head with a schema version this peer does not speak (1, the
                   version before tensors shared one data frame, among them)

:func:`expected_reason` decodes a message exactly as the inbox does and returns the
refusal reason it must count (None: a valid request, which is answered).  :func:`flood`
sends such messages from raw DEALER sockets at full speed, plus valid pull requests from
sockets that never read their replies (requests faster than the peer can answer), and
tallies what it sent by expected reason, so a test can compare the peer's counters with
it message for message.  It runs in its own process (:func:`start_flooder`), so the peer
under attack has its own interpreter.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Collection
from typing import Any

import msgpack
import zmq

from . import wire
from .wire import Kind, WireError

CATEGORIES = ("random_bytes", "random_frames", "mutated", "huge_sizes", "bad_version")
INBOX_KINDS = (Kind.PULL_REQUEST, Kind.PING)  # what a peer's inbox accepts


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _valid(rng: random.Random) -> list[bytes]:
    sender, rid = rng.randrange(10_000), rng.randrange(1, 2**40)
    choice = rng.randrange(4)
    if choice == 0:
        return [bytes(f) for f in wire.encode_request(sender, rid)]
    if choice == 1:
        return [bytes(f) for f in wire.encode_request(sender, rid, Kind.PING)]
    body = {"want": "model", "round": rng.randrange(100), "note": "x" * rng.randrange(40)}
    return [bytes(f) for f in wire.encode_request(sender, rid, Kind.PULL_REQUEST if choice == 2 else Kind.PING, body)]


def _mutate_frame(rng: random.Random, b: bytes) -> bytes:
    a = bytearray(b)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        op = rng.randrange(6)
        if op == 0 and a:  # flip one bit
            i = rng.randrange(len(a))
            a[i] ^= 1 << rng.randrange(8)
        elif op == 1 and a:  # overwrite a byte
            a[rng.randrange(len(a))] = rng.randrange(256)
        elif op == 2:  # insert a byte
            a.insert(rng.randrange(len(a) + 1), rng.randrange(256))
        elif op == 3 and a:  # delete a byte
            del a[rng.randrange(len(a))]
        elif op == 4 and a:  # truncate
            del a[rng.randrange(len(a)):]
        else:  # an interesting msgpack byte somewhere
            if a:
                a[rng.randrange(len(a))] = rng.choice((0xC0, 0xC1, 0xC2, 0xC3, 0xCF, 0xD3, 0xDD, 0xDF, 0xDB, 0xC6, 0xFF, 0x00, 0x7F, 0x80, 0x90))
    return bytes(a)


def _mutated(rng: random.Random) -> list[bytes]:
    frames = _valid(rng)
    op = rng.randrange(10)
    if op < 6:
        i = rng.randrange(len(frames))
        frames[i] = _mutate_frame(rng, frames[i])
    elif op == 6:
        frames.append(rng.randbytes(rng.randrange(30)))
    elif op == 7:
        frames = frames + frames
    elif op == 8 and len(frames) > 1:
        frames = frames[::-1]
    else:
        frames = [_mutate_frame(rng, f) for f in frames]
    return frames


def _huge(rng: random.Random) -> list[bytes]:
    head = wire.encode_request(rng.randrange(100), rng.randrange(1, 1000))[0]
    cases: list[Callable[[], list[bytes]]] = [
        lambda: [b"\xdd\xff\xff\xff\xff" + rng.randbytes(rng.randrange(20))],  # array32 of 4G items
        lambda: [b"\xdf\xff\xff\xff\xff" + rng.randbytes(rng.randrange(20))],  # map32 of 4G pairs
        lambda: [b"\xc6\xff\xff\xff\xff" + rng.randbytes(rng.randrange(20))],  # bin32 of 4 GiB
        lambda: [b"\xdb\x7f\xff\xff\xff" + rng.randbytes(rng.randrange(20))],  # str32 of 2 GiB
        lambda: [b"\x91" * rng.randrange(50, 250)],  # nesting deeper than anyone needs
        lambda: [head, b"\xdf\xff\xff\xff\xff"],  # request body: a map of 4G pairs
        lambda: [head, b"\xdd\x00\x01\x00\x00" + b"\xc0" * 100],  # body: array of 65536, 100 given
        lambda: [head, b"\x91" * 60_000],  # a 60 KB body of nesting (under the socket's 64 KiB)
        lambda: [_pack([wire.SCHEMA_VERSION, int(Kind.PULL_REQUEST), 2**64 - 1, 1])],  # sender out of range
        lambda: [_pack([wire.SCHEMA_VERSION, int(Kind.PULL_REQUEST), 1, -(2**63)])],  # negative request id
        lambda: [_pack([wire.SCHEMA_VERSION, int(Kind.PULL_REQUEST), 1, 1, "extra"])],  # head too long
        lambda: [_pack([wire.SCHEMA_VERSION] * rng.randrange(257, 4000))],  # head bigger than it may be
        lambda: [  # a model reply (not a request) whose table declares a petabyte
            wire._head(Kind.MODEL_REPLY, 1, 1),
            _pack({"step": 0, "version": 1, "n": 1, "scores": None,
                   "tensors": [["w", "float32", [2**25, 2**25], 0]]}),
            b"\x00" * 16,
        ],
        lambda: [  # a model reply whose tensors overlap and run past its data frame
            wire._head(Kind.MODEL_REPLY, 1, 1),
            _pack({"step": 0, "version": 1, "n": 1, "scores": None,
                   "tensors": [["a", "float32", [64], 0], ["b", "float32", [64], 64]]}),
            b"\x00" * 64,
        ],
        lambda: [_pack([wire.SCHEMA_VERSION, int(Kind.PULL_REQUEST), 1, 1]), b"", b"\x00" * 64],  # a request with a data frame
    ]
    return rng.choice(cases)()


def _bad_version(rng: random.Random) -> list[bytes]:
    v = rng.choice((0, 1, 1, 3, 7, 255, 256, 2**31, 2**63 - 1, -1, 2.0, 0.5, True, False, None, "2", b"\x02", [2]))
    frames = [_pack([v, int(rng.choice(INBOX_KINDS)), rng.randrange(100), rng.randrange(1, 100)])]
    if rng.random() < 0.3:
        frames.append(_pack({"a": 1}))
    return frames


def _random_frames(rng: random.Random) -> list[bytes]:
    frames = [rng.randbytes(rng.randrange(200)) for _ in range(rng.randrange(1, 13))]
    if rng.random() < 0.4:  # a valid head in front of 2..12 junk frames
        frames = [wire.encode_request(rng.randrange(100), rng.randrange(1, 1000))[0], *frames, b""][:max(3, len(frames))]
    return frames


_MAKERS: dict[str, Callable[[random.Random], list[bytes]]] = {
    "random_bytes": lambda rng: [rng.randbytes(rng.randrange(300))],
    "random_frames": _random_frames,
    "mutated": _mutated,
    "huge_sizes": _huge,
    "bad_version": _bad_version,
}


def hostile_message(rng: random.Random, category: str) -> list[bytes]:
    """One message of ``category`` (see the module docstring)."""
    return _MAKERS[category](rng)


def expected_reason(frames: list[bytes]) -> str | None:
    """The refusal reason a peer's inbox must count for ``frames``; None if it is a valid request."""
    try:
        wire.decode(frames, kinds=INBOX_KINDS)
    except WireError as e:
        return e.reason
    return None


# ---------------------------------------------------------------------- the flooder


def _dealer(ctx: zmq.Context, endpoint: str, server_key: bytes | None = None) -> zmq.Socket:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 10_000)  # what was sent is delivered before close returns
    s.setsockopt(zmq.SNDHWM, 1000 if server_key is None else 16)
    s.setsockopt(zmq.RCVHWM, 1000)
    if server_key is not None:
        # A CURVE client with a key of its own making: the peer's gatekeeper refuses it at
        # the handshake.
        public, secret = zmq.curve_keypair()
        s.setsockopt(zmq.CURVE_SERVERKEY, server_key)
        s.setsockopt(zmq.CURVE_PUBLICKEY, public)
        s.setsockopt(zmq.CURVE_SECRETKEY, secret)
    s.connect(endpoint)
    return s


def flood(
    endpoint: str,
    *,
    seconds: float,
    max_messages: int = 10**9,
    sockets: int = 8,
    greedy_sockets: int = 4,
    greedy_share: float = 0.25,
    seed: int = 0,
    report: Callable[[dict[str, Any]], None] | None = None,
    hold: Callable[[], Any] | None = None,
    server_key: bytes | None = None,
    connections_per_s: float = 100.0,
) -> dict[str, Any]:
    """Send hostile messages to ``endpoint`` for ``seconds`` (or ``max_messages``).

    ``sockets`` DEALERs send the hostile categories round robin and read their (error)
    replies now and then; ``greedy_sockets`` DEALERs send valid pull requests and pings
    (``greedy_share`` of all messages) and never read a reply.  Returns what was sent:
    ``expected`` (refusal reason -> count, "valid" for answered requests), ``categories``,
    ``replies`` (reasons of the error replies read back), ``sent``, ``seconds``, ``rate``.

    The sockets stay connected until ``hold()`` returns (after ``report(result)``): a peer
    drops the messages still queued for a connection that closes (its inbox has LINGER 0),
    so a test that counts every message lets the peer read them all first.

    With ``server_key`` (the peer's CURVE public key) every socket is a CURVE client with
    a key the peer does not know: against a CURVE peer none of it gets past the handshake.
    A refused client does not reconnect, so a socket whose queue is full is replaced by a
    new one with a new key: a new connection and handshake each time (``connections``), up
    to ``connections_per_s``.
    """
    rng = random.Random(seed)
    ctx = zmq.Context()
    hostile = [_dealer(ctx, endpoint, server_key) for _ in range(sockets)]
    greedy = [_dealer(ctx, endpoint, server_key) for _ in range(greedy_sockets)]
    expected: Counter = Counter()
    categories: Counter = Counter()
    replies: Counter = Counter()
    blocked = 0
    connections = len(hostile) + len(greedy)
    next_connect = time.perf_counter()
    sent = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    i = 0
    try:
        while sent < max_messages:
            if time.perf_counter() >= deadline:
                break
            i += 1
            if greedy and rng.random() < greedy_share:
                sock = greedy[i % len(greedy)]
                frames = _valid(rng)[:1] if rng.random() < 0.8 else _valid(rng)
                cat = "greedy"
            else:
                sock = hostile[i % len(hostile)]
                cat = CATEGORIES[i % len(CATEGORIES)]
                frames = hostile_message(rng, cat)
            try:
                sock.send_multipart(frames, flags=zmq.NOBLOCK)
            except zmq.Again:  # the peer reads slower than we send: wait for room, never forever
                blocked += 1
                if server_key is not None:  # refused at the handshake: try again as someone else
                    wait = next_connect - time.perf_counter()
                    if wait > 0:
                        time.sleep(wait)
                    next_connect = max(next_connect, time.perf_counter() - 0.1) + 1.0 / connections_per_s
                    pool = greedy if cat == "greedy" else hostile
                    pool[pool.index(sock)] = _dealer(ctx, endpoint, server_key)
                    sock.close(0)
                    connections += 1
                    continue
                if not sock.poll(max(1, min(200, int((deadline - time.perf_counter()) * 1000))), zmq.POLLOUT):
                    continue
                try:
                    sock.send_multipart(frames, flags=zmq.NOBLOCK)
                except zmq.Again:
                    continue
            sent += 1
            categories[cat] += 1
            expected[expected_reason(frames) or "valid"] += 1
            if (sent & 255) == 0:
                for s in hostile:
                    _drain(s, replies)
        elapsed = time.perf_counter() - t0
        for s in hostile:
            _drain(s, replies)
        result = {
            "sent": sent, "seconds": elapsed, "rate": sent / elapsed if elapsed else 0.0, "blocked": blocked,
            "connections": connections,
            "expected": dict(expected), "categories": dict(categories), "replies": dict(replies),
        }
        if report is not None:
            report(result)
        if hold is not None:
            hold()
    finally:
        for s in hostile + greedy:
            s.close()  # LINGER: queued messages still go out
        ctx.term()
    return result


def _drain(sock: zmq.Socket, replies: Counter) -> None:
    while True:
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        try:
            msg = wire.decode(frames)
        except WireError:
            replies["undecodable"] += 1
            continue
        replies[msg.reason if msg.kind is Kind.ERROR_REPLY else msg.kind.name.lower()] += 1


def _flooder_main(endpoint: str, go: Any, release: Any, out: Any, kwargs: dict[str, Any],
                  cpus: Collection[int] | None = None) -> None:
    if cpus is not None:  # before any thread (ZeroMQ's I/O thread) exists: they inherit it
        os.sched_setaffinity(0, cpus)
    go.wait(120)
    try:
        flood(endpoint, report=out.put, hold=lambda: release.wait(120), **kwargs)
    except BaseException as e:  # noqa: BLE001  (report, so the parent does not wait for a result forever)
        out.put({"error": f"{type(e).__name__}: {e}"})


class Flooder:
    """:func:`flood` in a spawned process: ``go()``, then ``result()``, then ``release()``.

    ``cpus``: the CPUs the flooding process may run on (Linux), e.g. to keep it off the
    cores of the peer it floods, as an attacker on another machine would be.
    """

    def __init__(self, endpoint: str, *, cpus: Collection[int] | None = None, **kwargs: Any) -> None:
        ctx = mp.get_context("spawn")
        self._go, self._release, self._out = ctx.Event(), ctx.Event(), ctx.Queue()
        self.process = ctx.Process(target=_flooder_main,
                                   args=(endpoint, self._go, self._release, self._out, kwargs,
                                         None if cpus is None else sorted(cpus)),
                                   daemon=True)
        self.process.start()

    def go(self) -> None:
        self._go.set()

    def result(self, timeout: float = 60) -> dict[str, Any]:
        """What was sent (see :func:`flood`); the sockets stay open until :meth:`release`."""
        return self._out.get(timeout=timeout)

    def release(self, timeout: float = 15) -> None:
        """Let the flooder close its sockets and exit; wait for it."""
        self._go.set()
        self._release.set()
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
